// POST /api/chat: a chat endpoint that bills each model call through @ai-billing/client.
//
//     check access (a fast 402) -> reserve the most the call can cost -> call the model
//     -> commit the model's real token counts
//
// A denial is a 402 naming the reason; a failed model call releases its hold (502); billing
// unreachable is a 503 unless the model is in CHAT_FAIL_OPEN_MODELS. docs/integration.md walks
// through each case.

import {
  type BillingClient,
  BillingUnavailable,
  CommitOutcomeUnknown,
  Denied,
  HoldExpired,
  type UsageRecord,
} from "@ai-billing/client";
import { type ChatModel, type Completion, ModelError, countTokens } from "./model.js";
import type { ChatSettings } from "./settings.js";

/** How long a client should wait before trying again when billing is down. */
export const RETRY_AFTER_S = 5;

export interface ChatRequest {
  readonly tenant_id: string;
  readonly user_id: string;
  readonly model: string;
  readonly prompt: string;
  readonly max_tokens: number;
}

/** What billing did for the call; int64 micros as strings (JSON has no int64). */
export interface BillingOutcome {
  /** False when the call was served but not billed (the log says why). */
  readonly committed: boolean;
  readonly reservation_id: string;
  readonly cost_micros: string;
  readonly charged_micros: string;
  readonly uncollected_micros: string;
}

export interface ChatResponse {
  readonly text: string;
  readonly usage: { readonly input_tokens: number; readonly output_tokens: number };
  readonly billing: BillingOutcome;
}

export interface ChatDependencies {
  readonly billing: BillingClient;
  readonly model: ChatModel;
  readonly settings: ChatSettings;
  readonly log?: Pick<Console, "warn" | "error">;
}

export async function handleChat(request: Request, app: ChatDependencies): Promise<Response> {
  const chat = parseChatRequest(await request.json().catch(() => undefined));
  if (typeof chat === "string") {
    return errorResponse(400, "INVALID_REQUEST", chat);
  }
  try {
    return Response.json(await billedChat(app, chat));
  } catch (error) {
    if (error instanceof Denied) {
      const { status, body } = error.toHttp();
      return Response.json(body, { status });
    }
    if (error instanceof ModelError) {
      return errorResponse(502, "MODEL_FAILED", error.message);
    }
    if (error instanceof BillingUnavailable) {
      if (app.settings.failOpenModels.has(chat.model)) {
        return Response.json(await unbilledChat(app, chat));
      }
      return errorResponse(
        503,
        "BILLING_UNAVAILABLE",
        "Billing is unavailable; try again shortly.",
        {
          "retry-after": String(RETRY_AFTER_S),
        },
      );
    }
    throw error;
  }
}

async function billedChat(app: ChatDependencies, chat: ChatRequest): Promise<ChatResponse> {
  const { billing, model, settings } = app;
  const estimate = countTokens(chat.prompt);
  const query = {
    tenantId: chat.tenant_id,
    userId: chat.user_id,
    model: chat.model,
    inputTokens: estimate,
    maxTokens: chat.max_tokens,
  };
  if (settings.checkAccessFirst) {
    const decision = await billing.checkAccess(query);
    if (!decision.allowed) {
      throw new Denied(decision);
    }
  }
  // Leaving this scope without a commit (a ModelError included) releases the hold.
  await using hold = await billing.reserve({ ...query, ttlSeconds: settings.holdTtlSeconds });
  const completion = await model.complete(chat.model, chat.prompt, chat.max_tokens);
  let record: UsageRecord;
  try {
    record = await hold.commit({
      inputTokens: completion.inputTokens,
      outputTokens: completion.outputTokens,
    });
  } catch (error) {
    if (!(error instanceof CommitOutcomeUnknown || error instanceof HoldExpired)) {
      throw error;
    }
    // The answer exists and the provider bills us for it: serve it, and leave a line to
    // reconcile from. An unknown commit's hold is kept (commit it again with its request id
    // while it is open); an expired one charged nothing.
    (app.log ?? console).error(
      `usage not committed: reservation=${hold.reservationId} ` +
        `commit_request_id=${hold.commitRequestId} tenant=${chat.tenant_id} ` +
        `user=${chat.user_id} model=${chat.model} input=${completion.inputTokens} ` +
        `output=${completion.outputTokens}: ${error.message}`,
    );
    return response(completion, { committed: false, reservation_id: hold.reservationId });
  }
  return response(completion, {
    committed: true,
    reservation_id: record.reservationId,
    cost_micros: record.costMicros.toString(),
    charged_micros: record.chargedMicros.toString(),
    uncollected_micros: record.uncollectedMicros.toString(),
  });
}

/** Fail open: billing is down and the model is one the operator chose to serve anyway. */
async function unbilledChat(app: ChatDependencies, chat: ChatRequest): Promise<ChatResponse> {
  const completion = await app.model.complete(chat.model, chat.prompt, chat.max_tokens);
  (app.log ?? console).warn(
    `served without billing (billing unavailable): tenant=${chat.tenant_id} ` +
      `user=${chat.user_id} model=${chat.model} input=${completion.inputTokens} ` +
      `output=${completion.outputTokens}`,
  );
  return response(completion, { committed: false });
}

function response(completion: Completion, outcome: Partial<BillingOutcome>): ChatResponse {
  return {
    text: completion.text,
    usage: { input_tokens: completion.inputTokens, output_tokens: completion.outputTokens },
    billing: {
      committed: false,
      reservation_id: "",
      cost_micros: "0",
      charged_micros: "0",
      uncollected_micros: "0",
      ...outcome,
    },
  };
}

function errorResponse(
  status: number,
  reason: string,
  message: string,
  headers: Record<string, string> = {},
): Response {
  return Response.json({ error: { reason, message } }, { status, headers });
}

/** The request body, or what is wrong with it. */
export function parseChatRequest(body: unknown): ChatRequest | string {
  if (typeof body !== "object" || body === null) {
    return "the body must be a JSON object";
  }
  const fields = body as Record<string, unknown>;
  for (const name of ["tenant_id", "user_id", "model", "prompt"] as const) {
    const value = fields[name];
    const longest = name === "prompt" ? 100_000 : 128;
    if (typeof value !== "string" || value.length < 1 || value.length > longest) {
      return `${name} must be a string of 1 to ${longest} characters`;
    }
  }
  const maxTokens = fields["max_tokens"] ?? 256;
  if (
    !Number.isSafeInteger(maxTokens) ||
    (maxTokens as number) < 1 ||
    (maxTokens as number) > 32_768
  ) {
    return "max_tokens must be a whole number from 1 to 32768";
  }
  return {
    tenant_id: fields["tenant_id"] as string,
    user_id: fields["user_id"] as string,
    model: fields["model"] as string,
    prompt: fields["prompt"] as string,
    max_tokens: maxTokens as number,
  };
}
