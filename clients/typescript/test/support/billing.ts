// Tenants, balances and a record of the calls a client sent, for the tests.

import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import type { Interceptor } from "@connectrpc/connect";
import { BillingClient, type BillingClientOptions } from "../../src/index.js";
import type { Balance } from "../../src/gen/billing/v1/admin_pb.js";
import { LedgerEntryKind } from "../../src/gen/billing/v1/usage_pb.js";

export const LIMIT = 1_000_000n;

/** A tenant id no other test uses. */
export function tenantName(label: string): string {
  return `${label}-${randomUUID().slice(0, 8)}`;
}

/** One attempt the client sent: the method and the request id it carried. */
export interface SentCall {
  readonly method: string;
  readonly requestId: string;
}

/** A Connect interceptor that records every attempt, retries included. */
export function recorder(): { interceptor: Interceptor; sent: SentCall[] } {
  const sent: SentCall[] = [];
  const interceptor: Interceptor = (next) => (request) => {
    const message = request.message as { requestId?: unknown };
    const requestId = typeof message.requestId === "string" ? message.requestId : "";
    sent.push({ method: request.method.name, requestId });
    return next(request);
  };
  return { interceptor, sent };
}

/** What the client logged as warnings, instead of the console. */
export function warnings(): { logger: { warn(message: string): void }; messages: string[] } {
  const messages: string[] = [];
  return { logger: { warn: (message) => messages.push(message) }, messages };
}

export function client(options: BillingClientOptions): BillingClient {
  return new BillingClient({ logger: warnings().logger, ...options });
}

export async function createTenant(
  billing: BillingClient,
  tenantId: string,
  { card = true, limit = LIMIT }: { card?: boolean; limit?: bigint } = {},
): Promise<void> {
  await billing.admin.createTenant({
    requestId: randomUUID(),
    tenantId,
    paymentMethodOnFile: card,
    creditLimitMicros: limit,
  });
}

export async function balance(billing: BillingClient, tenantId: string): Promise<Balance> {
  const { tenant } = await billing.admin.getTenant({ tenantId });
  if (tenant?.balance === undefined) {
    throw new Error(`tenant ${tenantId} has no balance`);
  }
  return tenant.balance;
}

/** Waits, up to `timeoutMs`, until `condition` holds; fails with `what` otherwise. */
export async function eventually(
  what: string,
  condition: () => Promise<boolean>,
  timeoutMs = 15_000,
): Promise<void> {
  const end = performance.now() + timeoutMs;
  while (!(await condition())) {
    if (performance.now() > end) {
      throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    }
    await sleep(20);
  }
}

/** The ledger entries of one reservation, as `KIND memo` lines, oldest first. */
export async function ledgerOf(
  billing: BillingClient,
  tenantId: string,
  reservationId: string,
): Promise<string[]> {
  const { ledgerEntries } = await billing.usage.listLedgerEntries({ tenantId, pageSize: 100 });
  return ledgerEntries
    .filter((entry) => entry.reservationId === reservationId)
    .sort((a, b) => Number(a.ledgerEntryId - b.ledgerEntryId))
    .map((entry) => `${LedgerEntryKind[entry.kind]} ${entry.memo}`.trim());
}
