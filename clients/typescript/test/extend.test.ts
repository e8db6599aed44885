// Holds that grow: Hold.extend and BillingClient.extendHold (ExtendHold) against a real server
// (unit prices: one token, one micro).

import assert from "node:assert/strict";
import { after, test } from "node:test";
import { DenialReason, HoldReleased } from "../src/index.js";
import { balance, client, createTenant, tenantName } from "./support/billing.js";
import { sharedTarget } from "./support/server.js";

const billing = client({ target: sharedTarget() });
after(() => billing.close());

function query(tenantId: string) {
  return { tenantId, userId: "u", model: "unit-priced", inputTokens: 100, maxTokens: 50 };
}

test("a granted extension grows the hold, and a commit settles the real counts", async () => {
  const tenantId = tenantName("extend-granted");
  await createTenant(billing, tenantId);
  await using hold = await billing.reserve(query(tenantId));
  const grown = await hold.extend({
    additionalOutputTokens: 200,
    inputTokens: 100,
    outputTokens: 40,
  });
  assert.equal(grown.decision?.allowed, true);
  assert.equal(grown.extendedMicros, 200n);
  assert.equal(grown.coveredOutputTokens, 10n + 200n);
  assert.equal(hold.amountMicros, 350n);
  assert.equal((await balance(billing, tenantId)).heldMicros, 350n);
  const record = await hold.commit({ inputTokens: 100, outputTokens: 240 });
  assert.equal(record.chargedMicros, 340n);
  assert.equal(record.heldMicros, 350n);
});

test("a denied extension is an answer that says how far the hold still goes", async () => {
  const tenantId = tenantName("extend-denied");
  await createTenant(billing, tenantId, { limit: 200n });
  await using hold = await billing.reserve(query(tenantId));
  const denied = await billing.extendHold({
    reservationId: hold.reservationId,
    additionalOutputTokens: 100,
    inputTokens: 100,
    outputTokens: 20,
  });
  assert.equal(denied.decision?.allowed, false);
  assert.equal(denied.decision?.reason, DenialReason.CREDIT_LIMIT_REACHED);
  assert.equal(denied.extendedMicros, 0n);
  assert.equal(denied.coveredOutputTokens, 30n);
  assert.equal(hold.amountMicros, 150n);
  await hold.release("cancelled");
  await assert.rejects(hold.extend({ additionalOutputTokens: 1 }), HoldReleased);
});
