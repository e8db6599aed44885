// One billing client per server process, shared by every request (it holds one HTTP/2
// connection). Kept on globalThis so that Next.js's hot reload in development does not open a
// new connection per reload.

import { BillingClient } from "@ai-billing/client";
import { EchoModel } from "./model.js";
import { type ChatSettings, chatSettings } from "./settings.js";

export interface ChatApp {
  readonly settings: ChatSettings;
  readonly billing: BillingClient;
  readonly model: EchoModel;
}

const shared = globalThis as typeof globalThis & { chatApp?: ChatApp };

/** The process's settings, billing client and model, made on first use. */
export function chatApp(): ChatApp {
  if (shared.chatApp === undefined) {
    const settings = chatSettings();
    const billing = new BillingClient({
      target: settings.billingTarget,
      token: settings.billingToken,
      timeoutMs: settings.billingTimeoutMs,
      maxAttempts: settings.billingAttempts,
    });
    shared.chatApp = { settings, billing, model: new EchoModel() };
  }
  return shared.chatApp;
}
