// The hold helper: `await using` and withHold release a hold the caller did not commit, when the
// model call throws too, and leave a committed or settled hold alone.

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import type { Hold } from "../src/index.js";
import {
  LIMIT,
  balance,
  client,
  createTenant,
  ledgerOf,
  recorder,
  tenantName,
  warnings,
} from "./support/billing.js";
import { sharedTarget } from "./support/server.js";

class ModelFailed extends Error {
  override name = "ModelFailed";
}

const calls = recorder();
const logged = warnings();
const billing = client({
  target: sharedTarget(),
  interceptors: [calls.interceptor],
  logger: logged.logger,
});
after(() => billing.close());

async function tenant(label: string): Promise<string> {
  const tenantId = tenantName(label);
  await createTenant(billing, tenantId);
  return tenantId;
}

function query(tenantId: string) {
  return { tenantId, userId: "u", model: "unit-priced", inputTokens: 100, maxTokens: 50 };
}

function releasesOf(hold: Hold): string[] {
  return calls.sent
    .filter((call) => call.method === "Release" && call.requestId === hold.releaseRequestId)
    .map((call) => call.requestId);
}

// Every test here but the last depends on Release being served.
describe("await using", () => {
  test("a model call that throws releases the hold, and the error propagates", async () => {
    const tenantId = await tenant("using-throws");
    let held: Hold | undefined;
    await assert.rejects(async () => {
      await using hold = await billing.reserve(query(tenantId));
      held = hold;
      assert.equal((await balance(billing, tenantId)).heldMicros, 150n);
      throw new ModelFailed("overloaded");
    }, ModelFailed);
    assert.ok(held !== undefined);
    assert.equal(held.state, "released");
    assert.equal(releasesOf(held).length, 1);
    const after = await balance(billing, tenantId);
    assert.deepEqual([after.heldMicros, after.availableCreditMicros], [0n, LIMIT]);
    assert.deepEqual(await ledgerOf(billing, tenantId, held.reservationId), [
      "HOLD",
      "RELEASE released on leaving its scope uncommitted",
    ]);
  });

  test("leaving the scope without a commit releases the hold", async () => {
    const tenantId = await tenant("using-uncommitted");
    let held: Hold | undefined;
    {
      await using hold = await billing.reserve(query(tenantId));
      held = hold;
    }
    assert.equal(held.state, "released");
    assert.equal((await balance(billing, tenantId)).heldMicros, 0n);
  });

  test("a committed hold is not released on leaving", async () => {
    const tenantId = await tenant("using-committed");
    let held: Hold | undefined;
    {
      await using hold = await billing.reserve(query(tenantId));
      held = hold;
      await hold.commit({ inputTokens: 90, outputTokens: 10 });
    }
    assert.equal(held.state, "committed");
    assert.deepEqual(releasesOf(held), []);
    assert.equal((await balance(billing, tenantId)).availableCreditMicros, LIMIT - 100n);
  });
});

describe("withHold", () => {
  test("releases with the error's name as the reason, and rethrows", async () => {
    const tenantId = await tenant("with-throws");
    let held: Hold | undefined;
    await assert.rejects(
      billing.withHold(query(tenantId), async (hold) => {
        held = hold;
        throw new ModelFailed("overloaded");
      }),
      ModelFailed,
    );
    assert.ok(held !== undefined);
    assert.equal(held.state, "released");
    assert.deepEqual(await ledgerOf(billing, tenantId, held.reservationId), [
      "HOLD",
      "RELEASE ModelFailed raised",
    ]);
  });

  test("returns what the callback returns; a committed hold stays committed", async () => {
    const tenantId = await tenant("with-commit");
    let held: Hold | undefined;
    const record = await billing.withHold(query(tenantId), (hold) => {
      held = hold;
      return hold.commit({ inputTokens: 100, outputTokens: 7 });
    });
    assert.equal(record.chargedMicros, 107n);
    assert.ok(held !== undefined);
    assert.deepEqual(releasesOf(held), []);
    assert.equal((await balance(billing, tenantId)).heldMicros, 0n);
  });

  test("a callback that returns without committing releases the hold", async () => {
    const tenantId = await tenant("with-uncommitted");
    const reservationId = await billing.withHold(
      query(tenantId),
      async (hold) => hold.reservationId,
    );
    assert.deepEqual(await ledgerOf(billing, tenantId, reservationId), [
      "HOLD",
      "RELEASE not committed",
    ]);
  });
});

describe("a hold the service reported settled is left alone", () => {
  test("an expired or released hold is not released again", async () => {
    const tenantId = await tenant("settled");
    const hold = await billing.reserve(query(tenantId));
    await billing.release({ reservationId: hold.reservationId, reason: "elsewhere" });
    await assert.rejects(hold.commit({ inputTokens: 1, outputTokens: 1 }), /HOLD_RELEASED/);
    assert.equal(hold.state, "released");
    await hold[Symbol.asyncDispose]();
    assert.deepEqual(releasesOf(hold), []);
  });
});

describe("a denial", () => {
  test("reserve refuses a denied query before the scope starts", async () => {
    const tenantId = tenantName("denied");
    await createTenant(billing, tenantId, { card: false, limit: 0n });
    let ran = false;
    await assert.rejects(
      billing.withHold(query(tenantId), async () => {
        ran = true;
      }),
      { name: "Denied", reasonName: "PAYMENT_METHOD_REQUIRED" },
    );
    assert.equal(ran, false);
  });
});
