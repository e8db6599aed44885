// What the route's tests share: the billing server tests/typescript started, and its tenants.

import { randomUUID } from "node:crypto";
import { BillingClient } from "@ai-billing/client";

/** The shared test server (plain TCP, no automatic tenants, one micro per token). */
export function billingTarget(): string {
  const target = process.env["BILLING_TEST_TARGET"];
  if (!target) {
    throw new Error(
      "BILLING_TEST_TARGET is not set: run these tests through `pytest tests/typescript`",
    );
  }
  return target;
}

export function chatRequest(body: Record<string, unknown>): Request {
  return new Request("http://localhost/api/chat", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
}

/** A new tenant (with a card and a credit limit unless told otherwise); returns its id. */
export async function newTenant(
  admin: BillingClient,
  { card = true, limit = 1_000_000n }: { card?: boolean; limit?: bigint } = {},
): Promise<string> {
  const tenantId = `chat-${randomUUID().slice(0, 8)}`;
  await admin.admin.createTenant({
    requestId: randomUUID(),
    tenantId,
    paymentMethodOnFile: card,
    creditLimitMicros: limit,
  });
  return tenantId;
}
