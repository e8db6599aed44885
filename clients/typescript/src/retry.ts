// When a call is tried again: transient codes only, bounded attempts, full-jitter backoff, the
// same request (and so the same request id) on every attempt.

import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError } from "@connectrpc/connect";

/**
 * The only codes that mean "try again". Every BillingService call may be retried: the mutating
 * ones are idempotent by request id and CheckAccess is a read. Any other answer is final.
 */
export const RETRIED_CODES: ReadonlySet<Code> = new Set([Code.Unavailable, Code.DeadlineExceeded]);

/** A failed attempt that will be tried again (for logs and metrics). */
export interface RetryEvent {
  readonly method: string;
  readonly requestId: string;
  /** The attempt that failed, from 1. */
  readonly attempt: number;
  readonly code: Code;
  /** The wait before the next attempt. */
  readonly nextInMs: number;
}

export interface RetryOptions {
  /** Deadline of one attempt. Default 2000 ms. */
  readonly timeoutMs?: number | undefined;
  /** Attempts in all, the first included. Default 4. */
  readonly maxAttempts?: number | undefined;
  /** When set, no attempt starts or runs past this long after the call began. */
  readonly totalTimeoutMs?: number | undefined;
  /** Called before each retry. */
  readonly onRetry?: (event: RetryEvent) => void | undefined;
}

/** What one attempt is given: its deadline, for the Connect call options. */
export interface AttemptOptions {
  readonly timeoutMs: number;
}

const FIRST_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 1000;
// How often an attempt after the first tries to reach a server that refused the connection.
const RECONNECT_FIRST_MS = 50;
const RECONNECT_MAX_MS = 1000;

// Node's errors for a connection that could not be made, or was lost with no answer.
const CONNECTION_ERRORS = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "EHOSTUNREACH",
  "ENETUNREACH",
]);

/** Whether the server could not be reached: the connection was refused or lost, no answer came. */
export function connectionFailed(error: ConnectError): boolean {
  let cause: unknown = error.cause;
  for (let depth = 0; depth < 5 && cause instanceof Error; depth += 1) {
    const code = (cause as NodeJS.ErrnoException).code;
    if (code !== undefined && CONNECTION_ERRORS.has(code)) {
      return true;
    }
    cause = cause.cause;
  }
  return false;
}

/**
 * `maxAttempts` attempts in all; before attempt n+1 a random wait in
 * [0, min(1000, 100 * 2^(n-1))] ms. Each attempt has its own deadline of `timeoutMs`.
 *
 * The first attempt fails fast when the server is unreachable. Later attempts wait for it within
 * their deadline, trying to connect again every 50 ms to 1 s (as gRPC's wait-for-ready, which
 * Connect does not have): that is what carries a call over a server restart.
 *
 * The worst case of one logical call is maxAttempts x timeoutMs plus the waits (at most
 * 0.1 + 0.2 + 0.4 s: 8.7 s with the defaults), or `totalTimeoutMs` when set.
 */
export class RetryPolicy {
  readonly timeoutMs: number;
  readonly maxAttempts: number;
  readonly totalTimeoutMs: number | undefined;
  readonly onRetry: ((event: RetryEvent) => void) | undefined;

  constructor(options: RetryOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? 2000;
    this.maxAttempts = options.maxAttempts ?? 4;
    this.totalTimeoutMs = options.totalTimeoutMs;
    this.onRetry = options.onRetry;
    if (!Number.isInteger(this.maxAttempts) || this.maxAttempts < 1) {
      throw new RangeError("maxAttempts must be an integer of at least 1");
    }
    if (
      !(this.timeoutMs > 0) ||
      (this.totalTimeoutMs !== undefined && !(this.totalTimeoutMs > 0))
    ) {
      throw new RangeError("timeouts must be positive");
    }
  }

  /**
   * Runs `attempt` until it succeeds, fails with a code that is not retried, or the attempts or
   * the time run out; rethrows the last error. `attempt` must send the same request every time.
   */
  async run<T>(
    method: string,
    requestId: string,
    attempt: (options: AttemptOptions) => Promise<T>,
  ): Promise<T> {
    const deadline = this.totalTimeoutMs === undefined ? Infinity : now() + this.totalTimeoutMs;
    for (let number = 1; ; number += 1) {
      const attemptEnd = Math.min(now() + this.timeoutMs, deadline);
      try {
        return await this.tryOnce(attempt, attemptEnd, number > 1);
      } catch (error) {
        if (!(error instanceof ConnectError) || !RETRIED_CODES.has(error.code)) {
          throw error;
        }
        const wait = Math.random() * Math.min(MAX_BACKOFF_MS, FIRST_BACKOFF_MS * 2 ** (number - 1));
        if (number >= this.maxAttempts || now() + wait >= deadline) {
          throw error;
        }
        this.onRetry?.({ method, requestId, attempt: number, code: error.code, nextInMs: wait });
        await sleep(wait);
      }
    }
  }

  private async tryOnce<T>(
    attempt: (options: AttemptOptions) => Promise<T>,
    end: number,
    waitForServer: boolean,
  ): Promise<T> {
    for (let pause = RECONNECT_FIRST_MS; ; pause = Math.min(pause * 2, RECONNECT_MAX_MS)) {
      try {
        return await attempt({ timeoutMs: Math.max(Math.round(end - now()), 1) });
      } catch (error) {
        const unreached = error instanceof ConnectError && connectionFailed(error);
        if (!waitForServer || !unreached || now() + pause >= end) {
          throw error;
        }
        await sleep(pause);
      }
    }
  }
}

function now(): number {
  return performance.now();
}
