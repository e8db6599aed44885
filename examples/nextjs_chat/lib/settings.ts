// The app's settings, from the environment: the same CHAT_* variables as examples/chat_app.

export interface ChatSettings {
  /** host:port of the billing service. */
  readonly billingTarget: string;
  /** Bearer token of the chat-service role, when the billing service requires one. */
  readonly billingToken: string | undefined;
  /** Deadline of one billing call attempt; the client tries up to `billingAttempts` times. */
  readonly billingTimeoutMs: number;
  readonly billingAttempts: number;
  /** Ask CheckAccess before reserving: a denied user gets a 402 without a hold being taken. */
  readonly checkAccessFirst: boolean;
  /**
   * Models served without billing while the billing service is unreachable. Empty (the
   * default): every model fails closed with 503. List only models you do not charge for.
   */
  readonly failOpenModels: ReadonlySet<string>;
  /** How long a hold lives if this process dies before committing, in whole seconds. */
  readonly holdTtlSeconds: number;
}

export function chatSettings(env: NodeJS.ProcessEnv = process.env): ChatSettings {
  return {
    billingTarget: env["CHAT_BILLING_TARGET"] || "localhost:50051",
    billingToken: env["CHAT_BILLING_TOKEN"] || undefined,
    billingTimeoutMs: Math.round(Number(env["CHAT_BILLING_TIMEOUT_S"] || "2") * 1000),
    billingAttempts: Number(env["CHAT_BILLING_ATTEMPTS"] || "3"),
    checkAccessFirst: (env["CHAT_CHECK_ACCESS_FIRST"] ?? "true").toLowerCase() !== "false",
    failOpenModels: new Set(
      (env["CHAT_FAIL_OPEN_MODELS"] ?? "")
        .split(",")
        .map((model) => model.trim())
        .filter(Boolean),
    ),
    holdTtlSeconds: Number(env["CHAT_HOLD_TTL_S"] || "120"),
  };
}
