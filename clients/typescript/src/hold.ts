// A granted hold: commit it at the real token counts, or release it; left open, it is released
// for you, except when its commit's outcome is unknown.

import type {
  CommitRequest,
  CommitResponse,
  ExtendHoldRequest,
  ExtendHoldResponse,
  ReleaseRequest,
  ReleaseResponse,
} from "./gen/billing/v1/billing_pb.js";
import type { Decision, Reservation, UsageRecord } from "./gen/billing/v1/types_pb.js";
import {
  BillingError,
  BillingUnavailable,
  CommitOutcomeUnknown,
  HoldAlreadyCommitted,
  HoldExpired,
  HoldReleased,
} from "./errors.js";
import {
  type ExtendArgs,
  type TokenCounts,
  commitRequest,
  extendHoldRequest,
  newRequestId,
  releaseRequest,
} from "./requests.js";

/**
 * - "open": granted, neither committed nor released;
 * - "committed", "released", "expired": settled, as the service reported;
 * - "commit-unknown": a commit failed with every attempt UNAVAILABLE or DEADLINE_EXCEEDED, so it
 *   may have been charged: the hold is never released, only committed again or left to expire.
 */
export type HoldState = "open" | "committed" | "released" | "expired" | "commit-unknown";

/** What a hold needs of its client: its calls with retries, and somewhere to warn. */
export interface HoldClient {
  commitCall(request: CommitRequest): Promise<CommitResponse>;
  releaseCall(request: ReleaseRequest): Promise<ReleaseResponse>;
  extendCall(request: ExtendHoldRequest): Promise<ExtendHoldResponse>;
  warn(message: string): void;
}

/**
 * A granted hold, from `BillingClient.reserve`. Use it with `await using`: leaving the scope
 * without a commit (an exception included) releases it.
 *
 * Its commit and its release each have one request id, made here: calling `commit()` again after
 * a CommitOutcomeUnknown is a retry of the same commit, never a second charge.
 */
export class Hold implements AsyncDisposable {
  /** The hold as last answered: a granted extension replaces it (its amount and expire time). */
  reservation: Reservation;
  readonly decision: Decision;
  readonly commitRequestId: string = newRequestId();
  readonly releaseRequestId: string = newRequestId();
  /** The usage record, once committed. */
  record: UsageRecord | undefined;
  #state: HoldState = "open";
  #unknownCommit: CommitOutcomeUnknown | undefined;
  readonly #client: HoldClient;

  constructor(client: HoldClient, reservation: Reservation, decision: Decision) {
    this.#client = client;
    this.reservation = reservation;
    this.decision = decision;
  }

  get state(): HoldState {
    return this.#state;
  }

  get reservationId(): string {
    return this.reservation.reservationId;
  }

  /** The amount held, in micros (0n for an included model). */
  get amountMicros(): bigint {
    return this.reservation.amountMicros;
  }

  /**
   * Settles the hold at the model's real token counts; returns the usage record.
   *
   * Throws HoldExpired if the hold expired first (nothing was charged), and CommitOutcomeUnknown
   * when the service could not be reached in time: the hold then stays as it is (commit again,
   * or let it expire).
   */
  async commit(counts: TokenCounts): Promise<UsageRecord> {
    const request = commitRequest(this.commitRequestId, this.reservationId, counts);
    let response: CommitResponse;
    try {
      response = await this.#client.commitCall(request);
    } catch (error) {
      if (error instanceof BillingUnavailable) {
        this.#state = "commit-unknown";
        this.#unknownCommit = new CommitOutcomeUnknown(
          error,
          this.reservationId,
          this.commitRequestId,
        );
        throw this.#unknownCommit;
      }
      this.#noteFailure(error);
      throw error;
    }
    this.record = response.usageRecord;
    this.#state = "committed";
    if (this.record === undefined) {
      throw new TypeError(`Commit of ${this.reservationId} answered without a usage record`);
    }
    return this.record;
  }

  /**
   * Grows the hold by `additionalOutputTokens` more output tokens (ExtendHold), decided like a
   * reservation of their price. A denial is an answer (`decision.allowed` false), not an error:
   * stop the stream after `coveredOutputTokens` more tokens (past the counts sent) and commit.
   * A granted extension updates `reservation`. Throws HoldAlreadyCommitted, HoldReleased or
   * HoldExpired on a settled hold.
   */
  async extend(args: ExtendArgs): Promise<ExtendHoldResponse> {
    let response: ExtendHoldResponse;
    try {
      response = await this.#client.extendCall(extendHoldRequest(this.reservationId, args));
    } catch (error) {
      this.#noteFailure(error);
      throw error;
    }
    if (response.decision?.allowed === true && response.reservation !== undefined) {
      this.reservation = response.reservation;
    }
    return response;
  }

  /**
   * Gives the hold back: nothing is charged. Refused (CommitOutcomeUnknown, nothing sent) after a
   * commit whose outcome is unknown: that hold may be charged already and must stay.
   */
  async release(reason = ""): Promise<ReleaseResponse> {
    if (this.#unknownCommit !== undefined && this.#state === "commit-unknown") {
      throw this.#unknownCommit;
    }
    try {
      const response = await this.#client.releaseCall(
        releaseRequest(this.releaseRequestId, this.reservationId, reason),
      );
      this.#state = "released";
      return response;
    } catch (error) {
      this.#noteFailure(error);
      throw error;
    }
  }

  /**
   * Releases the hold if it is still open, with `reason` for the ledger. Throws no BillingError: a
   * failed release goes to the client's logger, and the hold expires at its TTL, charging nothing.
   */
  async releaseIfOpen(reason: string): Promise<void> {
    if (this.#state === "commit-unknown") {
      this.#client.warn(
        `hold ${this.reservationId} not released: its commit (request id ${this.commitRequestId}) ` +
          "has an unknown outcome; it stays until committed or until it expires",
      );
      return;
    }
    if (this.#state !== "open") {
      return;
    }
    try {
      await this.release(reason);
    } catch (error) {
      if (!(error instanceof BillingError)) {
        throw error;
      }
      if (this.#state === "open") {
        this.#client.warn(
          `could not release hold ${this.reservationId} (${error.message}); it expires at its TTL`,
        );
      }
    }
  }

  /** `await using`: leaving the scope without a commit releases the hold. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.releaseIfOpen("released on leaving its scope uncommitted");
  }

  /** Remembers a final state the service reported, so that nothing acts on it again. */
  #noteFailure(error: unknown): void {
    if (error instanceof HoldAlreadyCommitted) {
      this.#state = "committed";
    } else if (error instanceof HoldReleased) {
      this.#state = "released";
    } else if (error instanceof HoldExpired) {
      this.#state = "expired";
    }
  }
}
