// What can go wrong: a denial (a normal answer, not an error) and the typed errors of failed
// calls, chosen by gRPC code and by the contract's ErrorReason.

import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorReason, ErrorReasonSchema } from "./gen/billing/v1/errors_pb.js";
import { type Decision, DenialReason } from "./gen/billing/v1/types_pb.js";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** The ErrorInfo domain of every error the service sends. */
export const ERROR_DOMAIN = "ai-billing";

/** One bad field of an INVALID_ARGUMENT (a google.rpc.BadRequest field violation). */
export interface FieldViolation {
  readonly field: string;
  readonly description: string;
}

export interface BillingErrorInit {
  readonly code: Code;
  readonly message: string;
  readonly reasonName?: string;
  readonly domain?: string;
  readonly metadata?: Readonly<Record<string, string>>;
  readonly fieldViolations?: readonly FieldViolation[];
  readonly cause?: unknown;
}

const reasonsByName = new Map(ErrorReasonSchema.values.map((value) => [value.name, value.number]));

/** "FAILED_PRECONDITION" for Code.FailedPrecondition: the status as gRPC tools print it. */
export function codeName(code: Code): string {
  const name = Code[code] as string | undefined;
  return name === undefined ? String(code) : name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/**
 * A call the service refused or could not answer.
 *
 * `code` is the gRPC status; `reason` the contract's stable reason (ERROR_REASON_UNSPECIFIED for a
 * failure of the transport, or a reason added to the contract after this client was built: then
 * `reasonName` still holds the string the server sent); `field` the request field an
 * INVALID_ARGUMENT is about.
 */
export class BillingError extends Error {
  readonly code: Code;
  readonly reason: ErrorReason;
  /** The ErrorInfo reason string as sent ("HOLD_EXPIRED"); "" when there was none. */
  readonly reasonName: string;
  readonly domain: string;
  readonly metadata: Readonly<Record<string, string>>;
  readonly fieldViolations: readonly FieldViolation[];

  constructor(init: BillingErrorInit) {
    const reasonName = init.reasonName ?? "";
    super(`${codeName(init.code)}${reasonName ? ` ${reasonName}` : ""}: ${init.message}`, {
      cause: init.cause,
    });
    this.name = new.target.name;
    this.code = init.code;
    this.reasonName = reasonName;
    this.domain = init.domain ?? "";
    const known = this.domain === ERROR_DOMAIN ? reasonsByName.get(reasonName) : undefined;
    this.reason = known ?? ErrorReason.ERROR_REASON_UNSPECIFIED;
    this.metadata = { ...init.metadata };
    this.fieldViolations = [...(init.fieldViolations ?? [])];
  }

  /** The request field an INVALID_ARGUMENT names ("tenant_id"), if any. */
  get field(): string | undefined {
    return this.metadata["field"] ?? this.fieldViolations[0]?.field;
  }

  /** The status as gRPC tools print it: "FAILED_PRECONDITION". */
  get codeName(): string {
    return codeName(this.code);
  }
}

/** A request field is malformed (see `field` and `fieldViolations`); nothing was changed. */
export class InvalidArgument extends BillingError {}
/** The tenant or reservation does not exist. */
export class NotFound extends BillingError {}
/** The tenant exists already, or a request id was reused (see RequestIdReused). */
export class AlreadyExists extends BillingError {}
/** The request id was used before for a different request; nothing was changed. */
export class RequestIdReused extends AlreadyExists {}
/** The reservation's state does not allow the call. */
export class FailedPrecondition extends BillingError {}
/** The hold was committed already (by another request id). A release never refunds it. */
export class HoldAlreadyCommitted extends FailedPrecondition {}
/** The hold was released; nothing was charged. */
export class HoldReleased extends FailedPrecondition {}
/** The hold expired before the call; nothing was charged. Reserve again. */
export class HoldExpired extends FailedPrecondition {}
/** A refund of everything on a hold that is still open: release it instead. */
export class HoldNotCommitted extends FailedPrecondition {}
/** No credentials, or credentials the server does not know. */
export class Unauthenticated extends BillingError {}
/** The caller's role may not call this service. */
export class PermissionDenied extends BillingError {}

/**
 * The service did not answer in time: UNAVAILABLE or DEADLINE_EXCEEDED on every attempt. The
 * outcome of a mutating call is unknown; calling it again with the same request id is safe.
 */
export class BillingUnavailable extends BillingError {}

/**
 * A commit whose outcome is unknown (every attempt failed with UNAVAILABLE or DEADLINE_EXCEEDED):
 * the charge may or may not have been made. The hold is never released for it: it stays until it
 * is committed (commit again, or later with `BillingClient.commit` and `commitRequestId`: the
 * same request, never a second charge) or until it expires, which charges nothing.
 */
export class CommitOutcomeUnknown extends BillingUnavailable {
  readonly reservationId: string;
  readonly commitRequestId: string;

  constructor(cause: BillingError, reservationId: string, commitRequestId: string) {
    super({
      code: cause.code,
      message:
        `the commit of reservation ${reservationId} (request id ${commitRequestId}) has an ` +
        `unknown outcome: ${cause.message}`,
      reasonName: cause.reasonName,
      domain: cause.domain,
      metadata: cause.metadata,
      cause,
    });
    this.reservationId = reservationId;
    this.commitRequestId = commitRequestId;
  }
}

type BillingErrorClass = new (init: BillingErrorInit) => BillingError;

const byCode = new Map<Code, BillingErrorClass>([
  [Code.InvalidArgument, InvalidArgument],
  [Code.OutOfRange, InvalidArgument],
  [Code.NotFound, NotFound],
  [Code.AlreadyExists, AlreadyExists],
  [Code.FailedPrecondition, FailedPrecondition],
  [Code.Unauthenticated, Unauthenticated],
  [Code.PermissionDenied, PermissionDenied],
  [Code.Unavailable, BillingUnavailable],
  [Code.DeadlineExceeded, BillingUnavailable],
]);

const byReason = new Map<ErrorReason, BillingErrorClass>([
  [ErrorReason.REQUEST_ID_REUSED, RequestIdReused],
  [ErrorReason.HOLD_ALREADY_COMMITTED, HoldAlreadyCommitted],
  [ErrorReason.HOLD_RELEASED, HoldReleased],
  [ErrorReason.HOLD_EXPIRED, HoldExpired],
  [ErrorReason.HOLD_NOT_COMMITTED, HoldNotCommitted],
]);

/** The typed error of a failed call: reads the AIP-193 ErrorInfo and BadRequest details. */
export function billingErrorFrom(error: ConnectError): BillingError {
  const info = error.findDetails(ErrorInfoSchema)[0];
  const fieldViolations = error
    .findDetails(BadRequestSchema)
    .flatMap((badRequest) => badRequest.fieldViolations)
    .map(({ field, description }) => ({ field, description }));
  const init: BillingErrorInit = {
    code: error.code,
    message: error.rawMessage,
    reasonName: info?.reason ?? "",
    domain: info?.domain ?? "",
    metadata: info?.metadata ?? {},
    fieldViolations,
    cause: error,
  };
  const general = byCode.get(error.code) ?? BillingError;
  const typed = new general(init);
  const specific = byReason.get(typed.reason);
  if (specific !== undefined && specific.prototype instanceof general) {
    return new specific(init);
  }
  return typed;
}

/** "CREDIT_LIMIT_REACHED" for DenialReason.CREDIT_LIMIT_REACHED; "" when allowed. */
export function denialReasonName(reason: DenialReason): string {
  if (reason === DenialReason.UNSPECIFIED) {
    return "";
  }
  return DenialReason[reason] ?? String(reason);
}

/** The JSON body of a 402: int64 micros as strings, as in the protobuf JSON mapping. */
export interface DeniedBody {
  readonly error: {
    readonly reason: string;
    readonly message: string;
    readonly available_credit_micros: string;
    readonly required_micros: string;
  };
}

/**
 * The tenant may not run the query (no credit, no card, suspended...): the service answered "no".
 * Not a BillingError: nothing failed. Map it to HTTP 402 with `toHttp()`.
 */
export class Denied extends Error {
  readonly httpStatus = 402;
  readonly decision: Decision;
  readonly reason: DenialReason;
  /** The reason without its prefix: "CREDIT_LIMIT_REACHED". */
  readonly reasonName: string;

  constructor(decision: Decision) {
    const reasonName = denialReasonName(decision.reason);
    super(`${reasonName}: ${decision.message}`);
    this.name = "Denied";
    this.decision = decision;
    this.reason = decision.reason;
    this.reasonName = reasonName;
  }

  /** The HTTP status (402) and a JSON-ready body with the reason and the end user's message. */
  toHttp(): { status: 402; body: DeniedBody } {
    return {
      status: 402,
      body: {
        error: {
          reason: this.reasonName,
          message: this.decision.message,
          available_credit_micros: this.decision.availableCreditMicros.toString(),
          required_micros: this.decision.requiredMicros.toString(),
        },
      },
    };
  }
}
