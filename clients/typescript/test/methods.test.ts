// Every BillingService method through the client, against a real server: balances, records,
// denials and their 402.

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { Denied, DenialReason, ModelBilling, RefundKind, ReservationStatus } from "../src/index.js";
import {
  LIMIT,
  balance,
  client,
  createTenant,
  ledgerOf,
  recorder,
  tenantName,
} from "./support/billing.js";
import { sharedTarget } from "./support/server.js";

const calls = recorder();
const billing = client({ target: sharedTarget(), interceptors: [calls.interceptor] });
after(() => billing.close());

describe("CheckAccess", () => {
  test("allows a query that fits, and says what it would hold", async () => {
    const tenantId = tenantName("check");
    await createTenant(billing, tenantId);
    const decision = await billing.checkAccess({
      tenantId,
      model: "unit-priced",
      inputTokens: 100,
      maxTokens: 50,
    });
    assert.equal(decision.allowed, true);
    assert.equal(decision.reason, DenialReason.UNSPECIFIED);
    assert.equal(decision.requiredMicros, 150n);
    assert.equal(decision.availableCreditMicros, LIMIT);
    assert.equal(decision.modelBilling, ModelBilling.METERED);
  });

  test("denies a tenant without a card a metered model: the reason and a 402 body", async () => {
    const tenantId = tenantName("nocard");
    await createTenant(billing, tenantId, { card: false, limit: 0n });
    const decision = await billing.checkAccess({ tenantId, model: "unit-priced" });
    assert.equal(decision.allowed, false);
    assert.equal(decision.reason, DenialReason.PAYMENT_METHOD_REQUIRED);
    const { status, body } = new Denied(decision).toHttp();
    assert.equal(status, 402);
    assert.deepEqual(body, {
      error: {
        reason: "PAYMENT_METHOD_REQUIRED",
        message: decision.message,
        available_credit_micros: "0",
        required_micros: "1",
      },
    });
    assert.match(decision.message, /payment method/i);
  });
});

describe("ReserveCredit, Commit", () => {
  test("a hold committed at the real counts debits exactly their cost", async () => {
    const tenantId = tenantName("commit");
    await createTenant(billing, tenantId);
    await using hold = await billing.reserve({
      tenantId,
      userId: "alice",
      model: "unit-priced",
      inputTokens: 1200,
      maxTokens: 800,
      ttlSeconds: 120,
    });
    assert.equal(hold.amountMicros, 2000n);
    assert.equal(hold.reservation.status, ReservationStatus.OPEN);
    assert.equal((await balance(billing, tenantId)).heldMicros, 2000n);
    const record = await hold.commit({
      inputTokens: 1000,
      outputTokens: 512,
      cachedInputTokens: 0,
    });
    assert.equal(hold.state, "committed");
    assert.deepEqual(
      [
        record.reservationId,
        record.tenantId,
        record.userId,
        record.costMicros,
        record.chargedMicros,
      ],
      [hold.reservationId, tenantId, "alice", 1512n, 1512n],
    );
    const after = await balance(billing, tenantId);
    assert.deepEqual([after.heldMicros, after.availableCreditMicros], [0n, LIMIT - 1512n]);
  });

  test("a denied reservation throws Denied and holds nothing", async () => {
    const tenantId = tenantName("full");
    await createTenant(billing, tenantId, { limit: 100n });
    await assert.rejects(
      billing.reserve({
        tenantId,
        userId: "u",
        model: "unit-priced",
        inputTokens: 100,
        maxTokens: 50,
      }),
      (error: unknown) => {
        assert.ok(error instanceof Denied);
        assert.equal(error.reason, DenialReason.CREDIT_LIMIT_REACHED);
        assert.equal(error.reasonName, "CREDIT_LIMIT_REACHED");
        assert.equal(error.toHttp().body.error.required_micros, "150");
        return true;
      },
    );
    assert.equal((await balance(billing, tenantId)).heldMicros, 0n);
  });

  test("a reservation sent again with its request id is the same hold", async () => {
    const tenantId = tenantName("replay");
    await createTenant(billing, tenantId);
    const args = {
      tenantId,
      userId: "u",
      model: "unit-priced",
      inputTokens: 10,
      maxTokens: 10,
      requestId: `replay-${tenantId}`,
    };
    const first = await billing.reserve(args);
    const again = await billing.reserve(args);
    assert.equal(again.reservationId, first.reservationId);
    assert.equal((await balance(billing, tenantId)).heldMicros, 20n);
  });

  test("int64 money is bigint and exact at the service's largest amounts", async () => {
    const tenantId = tenantName("big");
    const limit = 1_000_000_000_000n; // the largest amount the service takes
    await createTenant(billing, tenantId, { limit });
    for (const amountMicros of [limit, limit, limit - 1n]) {
      await billing.admin.grantCredit({
        requestId: crypto.randomUUID(),
        tenantId,
        amountMicros,
        reason: "prepaid",
      });
    }
    const after = await balance(billing, tenantId);
    assert.equal(typeof after.balanceMicros, "bigint");
    assert.equal(after.balanceMicros, 2_999_999_999_999n);
    assert.equal(after.availableCreditMicros, 3_999_999_999_999n);
  });
});

describe("Release", () => {
  test("gives the whole hold back and records why", async () => {
    const tenantId = tenantName("release");
    await createTenant(billing, tenantId);
    const hold = await billing.reserve({
      tenantId,
      userId: "u",
      model: "unit-priced",
      inputTokens: 30,
      maxTokens: 20,
    });
    const released = await hold.release("user cancelled");
    assert.equal(hold.state, "released");
    assert.deepEqual([released.releasedMicros, released.availableCreditMicros], [50n, LIMIT]);
    assert.deepEqual(await ledgerOf(billing, tenantId, hold.reservationId), [
      "HOLD",
      "RELEASE user cancelled",
    ]);
    const sent = calls.sent.filter((call) => call.method === "Release");
    assert.deepEqual(sent.at(-1), { method: "Release", requestId: hold.releaseRequestId });
  });

  test("by reservation id, outside its hold", async () => {
    const tenantId = tenantName("release-id");
    await createTenant(billing, tenantId);
    const hold = await billing.reserve({
      tenantId,
      userId: "u",
      model: "unit-priced",
      inputTokens: 1,
      maxTokens: 1,
    });
    const released = await billing.release({ reservationId: hold.reservationId, reason: "ops" });
    assert.equal(released.releasedMicros, 2n);
    assert.equal((await balance(billing, tenantId)).heldMicros, 0n);
  });
});

describe("Refund", () => {
  test("part of a committed charge, then all that is left", async () => {
    const tenantId = tenantName("refund");
    await createTenant(billing, tenantId);
    const hold = await billing.reserve({
      tenantId,
      userId: "u",
      model: "unit-priced",
      inputTokens: 100,
      maxTokens: 100,
    });
    await hold.commit({ inputTokens: 100, outputTokens: 50 });
    const part = await billing.refund({
      reservationId: hold.reservationId,
      refund: { amountMicros: 40n },
      reason: "ticket 4411",
      requestId: `ticket-4411-${tenantId}`,
    });
    assert.deepEqual(
      [part.kind, part.amountMicros, part.refundedTotalMicros],
      [RefundKind.REFUND, 40n, 40n],
    );
    const rest = await billing.refund({ reservationId: hold.reservationId, refund: { all: true } });
    assert.deepEqual(
      [rest.kind, rest.amountMicros, rest.refundedTotalMicros, rest.availableCreditMicros],
      [RefundKind.REFUND, 110n, 150n, LIMIT],
    );
  });
});
