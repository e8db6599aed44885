"""A stand-in for an LLM provider: echoes the prompt and reports token counts as a real API does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class ModelError(Exception):
    """The provider failed (timeout, 5xx, overloaded): no answer, nothing to bill."""


@dataclass(frozen=True)
class Completion:
    text: str
    # The provider's own counts: these, not the estimate, are what is billed.
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class CompletionStream:
    """A streamed answer: its chunks (here one word, one token each) and the provider's count
    of input tokens, which providers report as the stream starts."""

    chunks: Iterator[str]
    input_tokens: int


class ChatModel(Protocol):
    def complete(self, model: str, prompt: str, max_tokens: int) -> Completion: ...

    def stream(self, model: str, prompt: str, max_tokens: int) -> CompletionStream: ...


def count_tokens(text: str) -> int:
    """The app's estimate of a prompt's size before the call. Words stand in for a tokenizer."""
    return len(text.split())


# The provider adds a system prompt of its own: real input counts exceed the app's estimate.
SYSTEM_PROMPT_TOKENS = 3


class EchoModel:
    """Answers "You said: <prompt>", cut at `max_tokens` words. A prompt starting with
    "/fail" makes it fail, to try the failure path by hand."""

    def complete(self, model: str, prompt: str, max_tokens: int) -> Completion:
        if prompt.startswith("/fail"):
            raise ModelError(f"{model} is overloaded")
        words = f"You said: {prompt}".split()[:max_tokens]
        return Completion(" ".join(words), count_tokens(prompt) + SYSTEM_PROMPT_TOKENS, len(words))

    def stream(self, model: str, prompt: str, max_tokens: int) -> CompletionStream:
        """The same answer, word by word; "/fail" fails after the first word."""

        def words() -> Iterator[str]:
            for n, word in enumerate(f"You said: {prompt}".split()[:max_tokens]):
                if n == 1 and prompt.startswith("/fail"):
                    raise ModelError(f"{model} stream broke")
                yield word + " "

        return CompletionStream(words(), count_tokens(prompt) + SYSTEM_PROMPT_TOKENS)
