// The requests the client sends, built from plain arguments. int64 fields are bigint; counts
// may be given as numbers (whole, safe integers), money only as bigint micros.

import { create } from "@bufbuild/protobuf";
import { randomUUID } from "node:crypto";
import {
  type CheckAccessRequest,
  CheckAccessRequestSchema,
  type CommitRequest,
  CommitRequestSchema,
  type ExtendHoldRequest,
  ExtendHoldRequestSchema,
  type RefundRequest,
  RefundRequestSchema,
  type ReleaseRequest,
  ReleaseRequestSchema,
  type ReserveCreditRequest,
  ReserveCreditRequestSchema,
} from "./gen/billing/v1/billing_pb.js";

/** A token count: a whole number (a safe integer) or a bigint. */
export type Count = number | bigint;

/** An idempotency key (AIP-155): made once per logical operation, sent on each of its retries. */
export function newRequestId(): string {
  return randomUUID();
}

/** `value` as an int64; a number must be a whole, safe integer. */
export function int64(field: string, value: Count): bigint {
  if (typeof value === "bigint") {
    return value;
  }
  if (!Number.isSafeInteger(value)) {
    throw new RangeError(`${field} must be a whole number, not ${value}`);
  }
  return BigInt(value);
}

export interface CheckAccessArgs {
  readonly tenantId: string;
  readonly model: string;
  /** The query's size; without it, whether the smallest query would fit. */
  readonly inputTokens?: Count | undefined;
  readonly maxTokens?: Count | undefined;
  /** The end user: their budget is taken into account. */
  readonly userId?: string | undefined;
  /** The API key or caller label: its budget is taken into account. */
  readonly apiKeyId?: string | undefined;
}

export interface ReserveArgs {
  readonly tenantId: string;
  readonly userId: string;
  readonly model: string;
  /** The query's input tokens, priced as uncached input. */
  readonly inputTokens: Count;
  /** The output cap passed to the model (`max_tokens`). */
  readonly maxTokens: Count;
  /** How long the hold lives if never committed or released; whole seconds. Server default 300 s. */
  readonly ttlSeconds?: number | undefined;
  readonly apiKeyId?: string | undefined;
  /** Your own idempotency key, to replay a reservation across processes; default a new UUID. */
  readonly requestId?: string | undefined;
}

/** The model's real token counts, as its provider reported them. */
export interface TokenCounts {
  readonly inputTokens: Count;
  readonly outputTokens: Count;
  /** Input tokens served from the provider's prompt cache (billed at the cached price). */
  readonly cachedInputTokens?: Count | undefined;
}

export function checkAccessRequest(args: CheckAccessArgs): CheckAccessRequest {
  const sized = args.inputTokens !== undefined || args.maxTokens !== undefined;
  return create(CheckAccessRequestSchema, {
    tenantId: args.tenantId,
    model: args.model,
    userId: args.userId ?? "",
    apiKeyId: args.apiKeyId ?? "",
    ...(sized && {
      estimate: {
        inputTokens: int64("inputTokens", args.inputTokens ?? 0),
        maxOutputTokens: int64("maxTokens", args.maxTokens ?? 0),
      },
    }),
  });
}

export function reserveRequest(args: ReserveArgs): ReserveCreditRequest {
  if (args.ttlSeconds !== undefined && !Number.isSafeInteger(args.ttlSeconds)) {
    throw new RangeError(`ttlSeconds must be a whole number, not ${args.ttlSeconds}`);
  }
  return create(ReserveCreditRequestSchema, {
    requestId: args.requestId ?? newRequestId(),
    tenantId: args.tenantId,
    userId: args.userId,
    model: args.model,
    apiKeyId: args.apiKeyId ?? "",
    size: {
      case: "estimate",
      value: {
        inputTokens: int64("inputTokens", args.inputTokens),
        maxOutputTokens: int64("maxTokens", args.maxTokens),
      },
    },
    ...(args.ttlSeconds !== undefined && { ttl: { seconds: BigInt(args.ttlSeconds) } }),
  });
}

export function commitRequest(
  requestId: string,
  reservationId: string,
  counts: TokenCounts,
): CommitRequest {
  return create(CommitRequestSchema, {
    requestId,
    reservationId,
    usage: {
      inputTokens: int64("inputTokens", counts.inputTokens),
      outputTokens: int64("outputTokens", counts.outputTokens),
      cachedInputTokens: int64("cachedInputTokens", counts.cachedInputTokens ?? 0),
    },
  });
}

/** An extension of an open hold by more output tokens, priced at the hold's output price. */
export interface ExtendArgs {
  /** How many more output tokens the hold should pay for, 1 to 100,000,000. */
  readonly additionalOutputTokens: Count;
  /** The call's counts so far, to learn how many more output tokens the hold covers past them. */
  readonly inputTokens?: Count | undefined;
  readonly outputTokens?: Count | undefined;
  readonly cachedInputTokens?: Count | undefined;
  /** How long the hold lives from now once extended; whole seconds. Server default 300 s. */
  readonly ttlSeconds?: number | undefined;
  /** Your own idempotency key; default a new UUID (one per extension). */
  readonly requestId?: string | undefined;
}

export function extendHoldRequest(reservationId: string, args: ExtendArgs): ExtendHoldRequest {
  if (args.ttlSeconds !== undefined && !Number.isSafeInteger(args.ttlSeconds)) {
    throw new RangeError(`ttlSeconds must be a whole number, not ${args.ttlSeconds}`);
  }
  return create(ExtendHoldRequestSchema, {
    requestId: args.requestId ?? newRequestId(),
    reservationId,
    additionalOutputTokens: int64("additionalOutputTokens", args.additionalOutputTokens),
    usage: {
      inputTokens: int64("inputTokens", args.inputTokens ?? 0),
      outputTokens: int64("outputTokens", args.outputTokens ?? 0),
      cachedInputTokens: int64("cachedInputTokens", args.cachedInputTokens ?? 0),
    },
    ...(args.ttlSeconds !== undefined && { ttl: { seconds: BigInt(args.ttlSeconds) } }),
  });
}

export function releaseRequest(
  requestId: string,
  reservationId: string,
  reason: string,
): ReleaseRequest {
  return create(ReleaseRequestSchema, { requestId, reservationId, reason: reason.slice(0, 500) });
}

/** What to refund of a committed charge: an amount in micros, or all that is left. */
export type RefundAmount = { readonly amountMicros: bigint } | { readonly all: true };

export interface RefundArgs {
  readonly reservationId: string;
  readonly refund: RefundAmount;
  /** Why, for the ledger (e.g. "ticket 4411: truncated answer"). */
  readonly reason?: string | undefined;
  /** Your own idempotency key (a support ticket's, say); default a new UUID. */
  readonly requestId?: string | undefined;
}

export function refundRequest(args: RefundArgs): RefundRequest {
  // Never the legacy shape (neither an amount nor refund_all), which the service reads as a release.
  const amount =
    "all" in args.refund ? { refundAll: true } : { amountMicros: args.refund.amountMicros };
  if ("amountMicros" in amount && amount.amountMicros <= 0n) {
    throw new RangeError("refund.amountMicros must be positive; use { all: true } for everything");
  }
  return create(RefundRequestSchema, {
    requestId: args.requestId ?? newRequestId(),
    reservationId: args.reservationId,
    reason: args.reason ?? "",
    ...amount,
  });
}
