// @ai-billing/client: a typed TypeScript client of the ai-billing gRPC service.
//
//     const billing = new BillingClient({ target: "localhost:50051", token });
//     await using hold = await billing.reserve({ tenantId, userId, model, inputTokens, maxTokens });
//     const answer = await callModel();                  // throws: the hold is released
//     await hold.commit({ inputTokens: answer.inputTokens, outputTokens: answer.outputTokens });
//
// Money is int64 micros as bigint everywhere (1 USD = 1_000_000n).

export { Code, ConnectError } from "@connectrpc/connect";
export { BillingClient, type BillingClientOptions, type Logger } from "./client.js";
export {
  KEEPALIVE,
  type ConnectionOptions,
  type TlsOptions,
  bearerToken,
  connect,
} from "./connection.js";
export {
  AlreadyExists,
  BillingError,
  type BillingErrorInit,
  BillingUnavailable,
  CommitOutcomeUnknown,
  Denied,
  type DeniedBody,
  ERROR_DOMAIN,
  FailedPrecondition,
  type FieldViolation,
  HoldAlreadyCommitted,
  HoldExpired,
  HoldNotCommitted,
  HoldReleased,
  InvalidArgument,
  NotFound,
  PermissionDenied,
  RequestIdReused,
  Unauthenticated,
  billingErrorFrom,
  codeName,
  denialReasonName,
} from "./errors.js";
export { Hold, type HoldState } from "./hold.js";
export {
  type CheckAccessArgs,
  type Count,
  type ExtendArgs,
  type RefundAmount,
  type RefundArgs,
  type ReserveArgs,
  type TokenCounts,
  newRequestId,
} from "./requests.js";
export {
  type AttemptOptions,
  RETRIED_CODES,
  type RetryEvent,
  type RetryOptions,
  RetryPolicy,
} from "./retry.js";
// The contract's messages, enums and services (protoc-gen-es), for typed requests and responses.
export * from "./gen/billing/v1/account_pb.js";
export * from "./gen/billing/v1/admin_pb.js";
export * from "./gen/billing/v1/billing_pb.js";
export * from "./gen/billing/v1/budget_pb.js";
export * from "./gen/billing/v1/errors_pb.js";
export * from "./gen/billing/v1/types_pb.js";
export * from "./gen/billing/v1/usage_pb.js";
