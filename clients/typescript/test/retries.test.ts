// Retries under one request id across a server restart, and what happens while the server is
// down: a commit whose outcome is unknown is never released, a failed release never hides the
// caller's error. The server is a child process on a fixed port and a SQLite file it keeps
// across restarts.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import {
  BillingUnavailable,
  Code,
  CommitOutcomeUnknown,
  type Hold,
  type RetryEvent,
} from "../src/index.js";
import {
  LIMIT,
  balance,
  client,
  createTenant,
  recorder,
  tenantName,
  warnings,
} from "./support/billing.js";
import { ServerProcess, freePort, scratchDirectory, sqliteSettings } from "./support/server.js";

class ModelFailed extends Error {
  override name = "ModelFailed";
}

/** The server, stopped and started again on the same port and database. */
class Restarts {
  readonly retries: RetryEvent[] = [];
  restartOnRetry = true;
  #server: ServerProcess | undefined;
  #starting: Promise<ServerProcess> | undefined;
  readonly #settings: Record<string, string>;

  constructor(settings: Record<string, string>) {
    this.#settings = settings;
  }

  async start(): Promise<void> {
    this.#starting ??= ServerProcess.start(this.#settings);
    this.#server = await this.#starting;
    this.#starting = undefined;
  }

  async stop(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    assert.equal(await server?.stop(), 0, "the server stops cleanly");
  }

  /** An `onRetry` hook: records the retry and, if the server is down, starts it again. */
  readonly onRetry = (event: RetryEvent): void => {
    this.retries.push(event);
    if (this.restartOnRetry && this.#server === undefined && this.#starting === undefined) {
      void this.start();
    }
  };

  async close(): Promise<void> {
    await this.#starting?.catch(() => undefined);
    this.#server?.kill();
  }
}

const port = await freePort();
const restarts = new Restarts(sqliteSettings(scratchDirectory(), port));
const target = `127.0.0.1:${port}`;
before(() => restarts.start());
after(() => restarts.close());

function query(tenantId: string, requestId?: string) {
  return {
    tenantId,
    userId: "u",
    model: "unit-priced",
    inputTokens: 100,
    maxTokens: 50,
    ...(requestId !== undefined && { requestId }),
  };
}

test("a reservation and a commit each carried over a restart, each under one request id", async () => {
  const calls = recorder();
  // A generous deadline: a retry waits for the restarted server to listen.
  const billing = client({
    target,
    timeoutMs: 60_000,
    onRetry: restarts.onRetry,
    interceptors: [calls.interceptor],
  });
  try {
    const tenantId = tenantName("restart");
    await createTenant(billing, tenantId);
    const requestId = crypto.randomUUID();

    await restarts.stop();
    const hold = await billing.reserve(query(tenantId, requestId));
    await restarts.stop();
    const record = await hold.commit({ inputTokens: 100, outputTokens: 20 });

    assert.deepEqual(
      restarts.retries.map((event) => [event.method, event.attempt, event.requestId]),
      [
        ["ReserveCredit", 1, requestId],
        ["Commit", 1, hold.commitRequestId],
      ],
    );
    const sentIds = (method: string) =>
      new Set(calls.sent.filter((call) => call.method === method).map((call) => call.requestId));
    assert.deepEqual(sentIds("ReserveCredit"), new Set([requestId]));
    assert.deepEqual(sentIds("Commit"), new Set([hold.commitRequestId]));
    assert.deepEqual([record.reservationId, record.chargedMicros], [hold.reservationId, 120n]);

    // The service knows the reservation by its request id: sent again, it is the same hold.
    const again = await billing.reserve(query(tenantId, requestId));
    assert.equal(again.reservationId, hold.reservationId);
    const after = await balance(billing, tenantId);
    assert.deepEqual([after.heldMicros, after.availableCreditMicros], [0n, LIMIT - 120n]);
  } finally {
    billing.close();
  }
});

test("while the server is down", async (t) => {
  const calls = recorder();
  const logged = warnings();
  const billing = client({
    target,
    timeoutMs: 300,
    maxAttempts: 3,
    onRetry: restarts.onRetry,
    interceptors: [calls.interceptor],
    logger: logged.logger,
  });
  t.after(() => billing.close());
  const tenantId = tenantName("down");
  await createTenant(billing, tenantId);
  const unknown = await billing.reserve(query(tenantId));
  const abandoned = await billing.reserve(query(tenantId));
  restarts.restartOnRetry = false;
  await restarts.stop();
  restarts.retries.length = 0;

  await t.test(
    "a call fails with BillingUnavailable after maxAttempts, one request id",
    async () => {
      const requestId = crypto.randomUUID();
      await assert.rejects(billing.reserve(query(tenantId, requestId)), BillingUnavailable);
      assert.deepEqual(
        restarts.retries.map((event) => [event.attempt, event.code, event.requestId]),
        [
          [1, Code.Unavailable, requestId],
          [2, Code.Unavailable, requestId],
        ],
      );
      assert.match(
        logged.messages.join("\n"),
        /billing call ReserveCredit failed with UNAVAILABLE \(attempt 1\), retrying in \d+ ms/,
      );
    },
  );

  await t.test("a commit whose outcome is unknown is never released", async () => {
    let held: Hold | undefined;
    {
      await using hold = unknown;
      held = hold;
      await assert.rejects(
        hold.commit({ inputTokens: 100, outputTokens: 20 }),
        (error: unknown) => {
          assert.ok(error instanceof CommitOutcomeUnknown);
          assert.ok(error instanceof BillingUnavailable);
          assert.deepEqual(
            [error.reservationId, error.commitRequestId],
            [hold.reservationId, hold.commitRequestId],
          );
          return true;
        },
      );
      assert.equal(hold.state, "commit-unknown");
      await assert.rejects(hold.release("changed my mind"), CommitOutcomeUnknown);
    }
    assert.deepEqual(
      calls.sent.filter((call) => call.method === "Release"),
      [],
      "no release was even tried",
    );
    assert.match(logged.messages.join("\n"), new RegExp(`hold ${held.reservationId} not released`));
  });

  await t.test(
    "a release that fails on leaving is logged, the caller's error propagates",
    async () => {
      const before = logged.messages.length;
      await assert.rejects(async () => {
        await using _hold = abandoned;
        throw new ModelFailed("overloaded");
      }, ModelFailed);
      assert.equal(abandoned.state, "open");
      assert.match(
        logged.messages.slice(before).join("\n"),
        new RegExp(`could not release hold ${abandoned.reservationId} .*; it expires at its TTL`),
      );
    },
  );

  await t.test("back up, the unknown commit is committed again under its request id", async () => {
    await restarts.start();
    const record = await unknown.commit({ inputTokens: 100, outputTokens: 20 });
    assert.equal(unknown.state, "committed");
    assert.equal(record.chargedMicros, 120n);
    const commits = calls.sent.filter((call) => call.method === "Commit");
    assert.ok(commits.length >= 2);
    assert.deepEqual(
      new Set(commits.map((call) => call.requestId)),
      new Set([unknown.commitRequestId]),
    );
    const after = await balance(billing, tenantId);
    // The abandoned hold is still held (it expires at its TTL); the other was charged once.
    assert.deepEqual([after.heldMicros, after.balanceMicros], [150n, -120n]);
  });
});
