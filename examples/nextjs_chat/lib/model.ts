// A stand-in for an LLM provider: echoes the prompt and reports token counts as a real API does.

/** The provider failed (timeout, 5xx, overloaded): no answer, nothing to bill. */
export class ModelError extends Error {
  override name = "ModelError";
}

export interface Completion {
  readonly text: string;
  // The provider's own counts: these, not the estimate, are what is billed.
  readonly inputTokens: number;
  readonly outputTokens: number;
}

export interface ChatModel {
  complete(model: string, prompt: string, maxTokens: number): Promise<Completion>;
}

/** The app's estimate of a prompt's size before the call. Words stand in for a tokenizer. */
export function countTokens(text: string): number {
  return text.split(/\s+/).filter(Boolean).length;
}

// The provider adds a system prompt of its own: real input counts exceed the app's estimate.
export const SYSTEM_PROMPT_TOKENS = 3;

/**
 * Answers "You said: <prompt>", cut at `maxTokens` words. A prompt starting with "/fail" makes
 * it fail, to try the failure path. `calls` counts the queries it was asked.
 */
export class EchoModel implements ChatModel {
  calls = 0;

  async complete(model: string, prompt: string, maxTokens: number): Promise<Completion> {
    this.calls += 1;
    if (prompt.startsWith("/fail")) {
      throw new ModelError(`${model} is overloaded`);
    }
    const words = `You said: ${prompt}`.split(/\s+/).filter(Boolean).slice(0, maxTokens);
    return {
      text: words.join(" "),
      inputTokens: countTokens(prompt) + SYSTEM_PROMPT_TOKENS,
      outputTokens: words.length,
    };
  }
}
