// Each error reason a chat service can meet on BillingService, as the typed error, code, reason
// and field the client gives (authentication's reasons: security.test.ts). None is retried.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, test } from "node:test";
import {
  AlreadyExists,
  BillingError,
  BudgetScope,
  Code,
  ErrorReason,
  FailedPrecondition,
  type Hold,
  HoldAlreadyCommitted,
  HoldExpired,
  HoldNotCommitted,
  HoldReleased,
  InvalidArgument,
  NotFound,
  RequestIdReused,
} from "../src/index.js";
import {
  balance,
  client,
  createTenant,
  eventually,
  recorder,
  tenantName,
} from "./support/billing.js";
import { sharedTarget } from "./support/server.js";

const calls = recorder();
const billing = client({ target: sharedTarget(), interceptors: [calls.interceptor] });
after(() => billing.close());

type ErrorClass = abstract new (...args: never[]) => BillingError;

/** Runs `call`, expects it to fail as described, and checks it was sent once (no retry). */
async function expectError(
  call: () => Promise<unknown>,
  expected: { type: ErrorClass; code: Code; reason: ErrorReason; field?: string },
): Promise<BillingError> {
  const before = calls.sent.length;
  let caught: unknown;
  try {
    await call();
  } catch (error) {
    caught = error;
  }
  assert.ok(
    caught instanceof expected.type,
    `expected ${expected.type.name}, got ${String(caught)}`,
  );
  assert.ok(caught instanceof BillingError);
  assert.equal(caught.code, expected.code);
  assert.equal(caught.reason, expected.reason);
  assert.equal(caught.reasonName, ErrorReason[expected.reason]);
  assert.equal(caught.field, expected.field);
  assert.equal(calls.sent.length - before, 1, "an error that is not transient is not retried");
  return caught;
}

async function openHold(label: string, ttlSeconds?: number): Promise<[string, Hold]> {
  const tenantId = tenantName(label);
  await createTenant(billing, tenantId);
  const hold = await billing.reserve({
    tenantId,
    userId: "u",
    model: "unit-priced",
    inputTokens: 100,
    maxTokens: 50,
    ...(ttlSeconds !== undefined && { ttlSeconds }),
  });
  return [tenantId, hold];
}

test("FIELD_INVALID: InvalidArgument naming the field", async () => {
  const error = await expectError(
    () => billing.checkAccess({ tenantId: "", model: "unit-priced" }),
    {
      type: InvalidArgument,
      code: Code.InvalidArgument,
      reason: ErrorReason.FIELD_INVALID,
      field: "tenant_id",
    },
  );
  assert.deepEqual(error.fieldViolations, [{ field: "tenant_id", description: "is required" }]);
  assert.equal(error.codeName, "INVALID_ARGUMENT");
  assert.equal(error.message, "INVALID_ARGUMENT FIELD_INVALID: tenant_id: is required");
});

test("FIELD_INVALID for a nested field", async () => {
  const [, hold] = await openHold("negative");
  await expectError(() => hold.commit({ inputTokens: 1, outputTokens: -1 }), {
    type: InvalidArgument,
    code: Code.InvalidArgument,
    reason: ErrorReason.FIELD_INVALID,
    field: "usage.output_tokens",
  });
  assert.equal(hold.state, "open");
});

test("TENANT_NOT_FOUND: NotFound (automatic tenants are off on the test server)", async () => {
  await expectError(
    () =>
      billing.reserve({
        tenantId: tenantName("nobody"),
        userId: "u",
        model: "unit-priced",
        inputTokens: 1,
        maxTokens: 1,
      }),
    { type: NotFound, code: Code.NotFound, reason: ErrorReason.TENANT_NOT_FOUND },
  );
});

test("RESERVATION_NOT_FOUND: NotFound", async () => {
  const reservationId = `rsv_${randomUUID().replaceAll("-", "")}`;
  await expectError(
    () =>
      billing.commit({ reservationId, requestId: randomUUID(), inputTokens: 1, outputTokens: 1 }),
    { type: NotFound, code: Code.NotFound, reason: ErrorReason.RESERVATION_NOT_FOUND },
  );
});

test("TENANT_ALREADY_EXISTS: AlreadyExists, through call() on the raw admin client", async () => {
  const tenantId = tenantName("twice");
  await createTenant(billing, tenantId);
  const requestId = randomUUID();
  await expectError(
    () =>
      billing.call("CreateTenant", requestId, (options) =>
        billing.admin.createTenant({ requestId, tenantId }, options),
      ),
    { type: AlreadyExists, code: Code.AlreadyExists, reason: ErrorReason.TENANT_ALREADY_EXISTS },
  );
});

test("REQUEST_ID_REUSED: RequestIdReused for the same id with other content", async () => {
  const tenantId = tenantName("reused");
  await createTenant(billing, tenantId);
  const requestId = randomUUID();
  await billing.reserve({
    tenantId,
    userId: "u",
    model: "unit-priced",
    inputTokens: 1,
    maxTokens: 1,
    requestId,
  });
  const error = await expectError(
    () =>
      billing.reserve({
        tenantId,
        userId: "u",
        model: "unit-priced",
        inputTokens: 2,
        maxTokens: 1,
        requestId,
      }),
    { type: RequestIdReused, code: Code.AlreadyExists, reason: ErrorReason.REQUEST_ID_REUSED },
  );
  assert.ok(error instanceof AlreadyExists);
});

test("HOLD_ALREADY_COMMITTED: a second commit, and a release, of a committed hold", async () => {
  const [tenantId, hold] = await openHold("committed");
  await hold.commit({ inputTokens: 10, outputTokens: 10 });
  const expected = {
    type: HoldAlreadyCommitted,
    code: Code.FailedPrecondition,
    reason: ErrorReason.HOLD_ALREADY_COMMITTED,
  };
  await expectError(
    () =>
      billing.commit({
        reservationId: hold.reservationId,
        requestId: randomUUID(),
        inputTokens: 1,
        outputTokens: 1,
      }),
    expected,
  );
  // Depends on Release being served.
  await expectError(() => billing.release({ reservationId: hold.reservationId }), expected);
  assert.equal((await balance(billing, tenantId)).balanceMicros, -20n);
});

test("HOLD_RELEASED: commit of a released hold (depends on Release being served)", async () => {
  const [, hold] = await openHold("released");
  await hold.release("cancelled");
  await expectError(
    () =>
      billing.commit({
        reservationId: hold.reservationId,
        requestId: randomUUID(),
        inputTokens: 1,
        outputTokens: 1,
      }),
    { type: HoldReleased, code: Code.FailedPrecondition, reason: ErrorReason.HOLD_RELEASED },
  );
});

test("HOLD_EXPIRED: commit after the hold's TTL; nothing is charged", async () => {
  const [tenantId, hold] = await openHold("expired", 1);
  await eventually(
    "the hold expired",
    async () => (await balance(billing, tenantId)).heldMicros === 0n,
  );
  await expectError(() => hold.commit({ inputTokens: 10, outputTokens: 10 }), {
    type: HoldExpired,
    code: Code.FailedPrecondition,
    reason: ErrorReason.HOLD_EXPIRED,
  });
  assert.equal(hold.state, "expired");
  assert.equal((await balance(billing, tenantId)).balanceMicros, 0n);
});

test("HOLD_NOT_COMMITTED: refunding everything of an open hold (depends on the new Refund)", async () => {
  const [tenantId, hold] = await openHold("not-committed");
  await expectError(
    () => billing.refund({ reservationId: hold.reservationId, refund: { all: true } }),
    {
      type: HoldNotCommitted,
      code: Code.FailedPrecondition,
      reason: ErrorReason.HOLD_NOT_COMMITTED,
    },
  );
  assert.equal((await balance(billing, tenantId)).heldMicros, 150n, "the hold is still held");
});

test("PARTIAL_RELEASE_NOT_ALLOWED: refunding an amount of an open hold", async () => {
  const [tenantId, hold] = await openHold("partial");
  await expectError(
    () => billing.refund({ reservationId: hold.reservationId, refund: { amountMicros: 10n } }),
    {
      type: FailedPrecondition,
      code: Code.FailedPrecondition,
      reason: ErrorReason.PARTIAL_RELEASE_NOT_ALLOWED,
    },
  );
  assert.equal((await balance(billing, tenantId)).heldMicros, 150n);
});

test("REFUND_EXCEEDS_CHARGE: refunding more than is left", async () => {
  const [, hold] = await openHold("exceeds");
  await hold.commit({ inputTokens: 10, outputTokens: 10 });
  await expectError(
    () => billing.refund({ reservationId: hold.reservationId, refund: { amountMicros: 21n } }),
    {
      type: FailedPrecondition,
      code: Code.FailedPrecondition,
      reason: ErrorReason.REFUND_EXCEEDS_CHARGE,
    },
  );
});

test("reasons of the other services arrive the same way: BUDGET_NOT_FOUND", async () => {
  const tenantId = tenantName("budgetless");
  await createTenant(billing, tenantId);
  await expectError(
    () =>
      billing.call("GetBudget", "", (options) =>
        billing.budgets.getBudget({ tenantId, scope: BudgetScope.USER, scopeId: "u" }, options),
      ),
    { type: NotFound, code: Code.NotFound, reason: ErrorReason.BUDGET_NOT_FOUND },
  );
});

test("STRIPE_NOT_CONFIGURED: card calls on a server without a Stripe key", async () => {
  const tenantId = tenantName("cardless");
  await createTenant(billing, tenantId);
  const requestId = randomUUID();
  await expectError(
    () =>
      billing.call("CreateSetupIntent", requestId, (options) =>
        billing.account.createSetupIntent({ requestId, tenantId }, options),
      ),
    {
      type: FailedPrecondition,
      code: Code.FailedPrecondition,
      reason: ErrorReason.STRIPE_NOT_CONFIGURED,
    },
  );
});

test("the client never sends a refund that would be read as a release", async () => {
  const before = calls.sent.length;
  await assert.rejects(
    billing.refund({ reservationId: "rsv_x", refund: { amountMicros: 0n } }),
    RangeError,
  );
  assert.equal(calls.sent.length, before);
});
