// BillingClient: the calls a chat service makes around every model query, with deadlines,
// retries under one request id, typed errors, and a hold helper.

import { type Client, ConnectError, type Transport, createClient } from "@connectrpc/connect";
import { AccountService } from "./gen/billing/v1/account_pb.js";
import { AdminService } from "./gen/billing/v1/admin_pb.js";
import {
  BillingService,
  type CommitRequest,
  type CommitResponse,
  type ExtendHoldRequest,
  type ExtendHoldResponse,
  type RefundResponse,
  type ReleaseRequest,
  type ReleaseResponse,
} from "./gen/billing/v1/billing_pb.js";
import { BudgetService } from "./gen/billing/v1/budget_pb.js";
import type { Decision } from "./gen/billing/v1/types_pb.js";
import { UsageService } from "./gen/billing/v1/usage_pb.js";
import { type ConnectionOptions, connect } from "./connection.js";
import { Denied, billingErrorFrom, codeName } from "./errors.js";
import { Hold, type HoldClient } from "./hold.js";
import {
  type CheckAccessArgs,
  type ExtendArgs,
  type RefundArgs,
  type ReserveArgs,
  type TokenCounts,
  checkAccessRequest,
  commitRequest,
  extendHoldRequest,
  newRequestId,
  refundRequest,
  releaseRequest,
  reserveRequest,
} from "./requests.js";
import { type AttemptOptions, type RetryOptions, RetryPolicy } from "./retry.js";

/** Where the client reports retries, and what it cannot throw (a hold not released, or kept). */
export interface Logger {
  warn(message: string): void;
}

export type BillingClientOptions = ConnectionOptions &
  RetryOptions & {
    /** Default: `console`. */
    readonly logger?: Logger | undefined;
  };

/**
 * A client of the billing service. Make one per process and share it: it holds one HTTP/2
 * connection. Every call has its own deadline (`timeoutMs` per attempt) and is retried on
 * UNAVAILABLE and DEADLINE_EXCEEDED only, up to `maxAttempts`, with the same request id.
 *
 * `billing`, `admin`, `account`, `usage` and `budgets` are the generated Connect clients on the
 * same connection, for the calls this class does not wrap (no retries or request ids added;
 * `call()` adds the retries).
 */
export class BillingClient implements AsyncDisposable {
  readonly billing: Client<typeof BillingService>;
  readonly admin: Client<typeof AdminService>;
  readonly account: Client<typeof AccountService>;
  readonly usage: Client<typeof UsageService>;
  readonly budgets: Client<typeof BudgetService>;
  readonly retry: RetryPolicy;
  readonly #close: () => void;
  readonly #logger: Logger;
  readonly #holds: HoldClient;

  constructor(options: BillingClientOptions) {
    const connection = connect(options);
    this.#close = connection.close;
    this.#logger = options.logger ?? console;
    const onRetry = options.onRetry;
    this.retry = new RetryPolicy({
      ...options,
      onRetry: (event) => {
        this.#logger.warn(
          `billing call ${event.method} failed with ${codeName(event.code)} ` +
            `(attempt ${event.attempt}), retrying in ${Math.round(event.nextInMs)} ms`,
        );
        onRetry?.(event);
      },
    });
    const transport: Transport = connection.transport;
    this.billing = createClient(BillingService, transport);
    this.admin = createClient(AdminService, transport);
    this.account = createClient(AccountService, transport);
    this.usage = createClient(UsageService, transport);
    this.budgets = createClient(BudgetService, transport);
    this.#holds = {
      commitCall: (request) => this.#commit(request),
      releaseCall: (request) => this.#release(request),
      extendCall: (request) => this.#extend(request),
      warn: (message) => this.#logger.warn(message),
    };
  }

  /**
   * Runs `send` with this client's deadline and retry policy; a failure becomes a BillingError.
   * `send` must send the same request on every attempt (put a fixed request id in it first).
   */
  async call<T>(
    method: string,
    requestId: string,
    send: (options: AttemptOptions) => Promise<T>,
  ): Promise<T> {
    try {
      return await this.retry.run(method, requestId, send);
    } catch (error) {
      throw error instanceof ConnectError ? billingErrorFrom(error) : error;
    }
  }

  /**
   * May the tenant run the model now? Read-only advice: it holds nothing, so a later reserve may
   * still be denied. `new Denied(decision).toHttp()` makes the 402 of a denial.
   */
  async checkAccess(args: CheckAccessArgs): Promise<Decision> {
    const request = checkAccessRequest(args);
    const response = await this.call("CheckAccess", "", (o) =>
      this.billing.checkAccess(request, o),
    );
    return required(response.decision, "CheckAccess", "decision");
  }

  /**
   * Holds the most the query can cost (`inputTokens` as uncached input plus `maxTokens` output
   * tokens). Throws Denied when the hold is not granted: nothing is held then.
   *
   *     await using hold = await billing.reserve({ tenantId, userId, model, inputTokens, maxTokens });
   *     const answer = await callModel();           // throws: the hold is released
   *     await hold.commit({ inputTokens: answer.inputTokens, outputTokens: answer.outputTokens });
   */
  async reserve(args: ReserveArgs): Promise<Hold> {
    const request = reserveRequest(args);
    const response = await this.call("ReserveCredit", request.requestId, (o) =>
      this.billing.reserveCredit(request, o),
    );
    const decision = required(response.decision, "ReserveCredit", "decision");
    if (!decision.allowed) {
      throw new Denied(decision);
    }
    return new Hold(
      this.#holds,
      required(response.reservation, "ReserveCredit", "reservation"),
      decision,
    );
  }

  /**
   * Reserves, runs `use` with the hold, and releases the hold unless `use` committed it: with
   * the thrown error's name as the reason when `use` throws (the error is rethrown), or
   * "not committed" when it returns. A hold whose commit outcome is unknown is never released.
   */
  async withHold<T>(args: ReserveArgs, use: (hold: Hold) => Promise<T>): Promise<T> {
    const hold = await this.reserve(args);
    let result: T;
    try {
      result = await use(hold);
    } catch (error) {
      await hold.releaseIfOpen(`${error instanceof Error ? error.name : typeof error} raised`);
      throw error;
    }
    await hold.releaseIfOpen("not committed");
    return result;
  }

  /**
   * Commits a reservation outside its Hold, e.g. later from a queue after CommitOutcomeUnknown:
   * pass the hold's `commitRequestId`, so that it is the same commit, never a second charge.
   */
  async commit(
    args: { reservationId: string; requestId: string } & TokenCounts,
  ): Promise<CommitResponse> {
    return this.#commit(commitRequest(args.requestId, args.reservationId, args));
  }

  /**
   * Releases an open hold: nothing is charged. Never refunds: on a committed hold it fails with
   * HoldAlreadyCommitted.
   */
  async release(args: {
    reservationId: string;
    reason?: string | undefined;
    requestId?: string | undefined;
  }): Promise<ReleaseResponse> {
    return this.#release(
      releaseRequest(args.requestId ?? newRequestId(), args.reservationId, args.reason ?? ""),
    );
  }

  /**
   * Grows an open hold by more output tokens, outside its Hold (see `Hold.extend`). A denial is
   * an answer with `decision.allowed` false and `coveredOutputTokens`, not an error.
   */
  async extendHold(args: { reservationId: string } & ExtendArgs): Promise<ExtendHoldResponse> {
    return this.#extend(extendHoldRequest(args.reservationId, args));
  }

  /**
   * Refunds part (`{ amountMicros }`) or all that is left (`{ all: true }`) of a committed
   * charge. Pass your own `requestId` (a support ticket's) to make it idempotent across processes.
   */
  async refund(args: RefundArgs): Promise<RefundResponse> {
    const request = refundRequest(args);
    return this.call("Refund", request.requestId, (o) => this.billing.refund(request, o));
  }

  /** Closes the connection; calls still running fail. */
  close(): void {
    this.#close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  async #commit(request: CommitRequest): Promise<CommitResponse> {
    return this.call("Commit", request.requestId, (o) => this.billing.commit(request, o));
  }

  async #extend(request: ExtendHoldRequest): Promise<ExtendHoldResponse> {
    return this.call("ExtendHold", request.requestId, (o) => this.billing.extendHold(request, o));
  }

  async #release(request: ReleaseRequest): Promise<ReleaseResponse> {
    return this.call("Release", request.requestId, (o) => this.billing.release(request, o));
  }
}

function required<T>(value: T | undefined, method: string, field: string): T {
  if (value === undefined) {
    throw new TypeError(`${method} answered without ${field}`);
  }
  return value;
}
