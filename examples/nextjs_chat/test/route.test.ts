// The route's 200, 402, 502 and 400, called with Request objects as Next.js calls it, against a
// real billing server.

import assert from "node:assert/strict";
import { after, test } from "node:test";
import { BillingClient, LedgerEntryKind } from "@ai-billing/client";
import { billingTarget, chatRequest, newTenant } from "./support.js";

process.env["CHAT_BILLING_TARGET"] = billingTarget();
const { POST } = await import("../app/api/chat/route.js");
const { chatApp } = await import("../lib/billing.js");

const admin = new BillingClient({ target: billingTarget() });
after(() => {
  admin.close();
  chatApp().billing.close();
});

async function held(tenantId: string): Promise<[bigint, bigint]> {
  const { tenant } = await admin.admin.getTenant({ tenantId });
  assert.ok(tenant?.balance);
  return [tenant.balance.heldMicros, tenant.balance.balanceMicros];
}

test("200: the answer, billed at the model's real token counts", async () => {
  const tenantId = await newTenant(admin);
  const response = await POST(
    chatRequest({
      tenant_id: tenantId,
      user_id: "alice",
      model: "unit-priced",
      prompt: "what is a hold",
      max_tokens: 64,
    }),
  );
  assert.equal(response.status, 200);
  const body = await response.json();
  // 4 prompt words + the provider's 3 system tokens in; "You said: what is a hold" out.
  assert.deepEqual(body.usage, { input_tokens: 7, output_tokens: 6 });
  assert.equal(body.text, "You said: what is a hold");
  assert.deepEqual(
    [body.billing.committed, body.billing.cost_micros, body.billing.charged_micros],
    [true, "13", "13"],
  );
  assert.deepEqual(await held(tenantId), [0n, -13n]);
});

test("402: a denial's reason and message, before any hold", async () => {
  const tenantId = await newTenant(admin, { card: false, limit: 0n });
  const response = await POST(
    chatRequest({ tenant_id: tenantId, user_id: "u", model: "unit-priced", prompt: "hi" }),
  );
  assert.equal(response.status, 402);
  const { error } = await response.json();
  assert.equal(error.reason, "PAYMENT_METHOD_REQUIRED");
  assert.match(error.message, /payment method/i);
  assert.deepEqual(await held(tenantId), [0n, 0n]);
});

test("402: a query above the credit that is left", async () => {
  const tenantId = await newTenant(admin, { limit: 100n });
  const response = await POST(
    chatRequest({
      tenant_id: tenantId,
      user_id: "u",
      model: "unit-priced",
      prompt: "hi",
      max_tokens: 500,
    }),
  );
  assert.equal(response.status, 402);
  const { error } = await response.json();
  assert.deepEqual(
    [error.reason, error.required_micros, error.available_credit_micros],
    ["CREDIT_LIMIT_REACHED", "501", "100"],
  );
});

test("502: the model failed, the hold is released, nothing is charged (needs Release)", async () => {
  const tenantId = await newTenant(admin);
  const response = await POST(
    chatRequest({ tenant_id: tenantId, user_id: "u", model: "unit-priced", prompt: "/fail now" }),
  );
  assert.equal(response.status, 502);
  assert.deepEqual(await response.json(), {
    error: { reason: "MODEL_FAILED", message: "unit-priced is overloaded" },
  });
  assert.deepEqual(await held(tenantId), [0n, 0n]);
  const { ledgerEntries } = await admin.usage.listLedgerEntries({ tenantId, pageSize: 10 });
  assert.deepEqual(
    ledgerEntries.map((entry) => entry.kind),
    [LedgerEntryKind.RELEASE, LedgerEntryKind.HOLD], // newest first
  );
});

test("400: a malformed body names what is wrong", async () => {
  const response = await POST(chatRequest({ tenant_id: "acme", user_id: "u", model: "m" }));
  assert.equal(response.status, 400);
  const { error } = await response.json();
  assert.deepEqual(error, {
    reason: "INVALID_REQUEST",
    message: "prompt must be a string of 1 to 100000 characters",
  });
});
