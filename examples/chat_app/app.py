"""POST /chat: a chat endpoint that bills each model call through the ai-billing client.

    check access (optional fast 402) -> reserve the most the call can cost -> call the model
    -> commit the model's real token counts

POST /chat/stream streams the answer instead, with a hold that grows: it reserves the input and a
first chunk of output, extends the hold ahead of the words it sends, ends the answer cleanly
where a denied extension leaves the hold, and commits the real counts.

A denial is a 402 naming the reason; a failed model call releases its hold (502); billing
unreachable is a 503 unless the model is listed in CHAT_FAIL_OPEN_MODELS. docs/integration.md
walks through each case.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import TracebackType

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from billing.client import (
    BillingClient,
    BillingError,
    BillingUnavailable,
    CommitOutcomeUnknown,
    Denied,
    HoldExpired,
)
from examples.chat_app.billing_page import install_billing_page
from examples.chat_app.model import ChatModel, Completion, EchoModel, ModelError, count_tokens
from examples.chat_app.settings import ChatSettings

logger = logging.getLogger("chat_app")

# How long a client should wait before trying again when billing is down.
RETRY_AFTER_S = 5


class ChatRequest(BaseModel):
    tenant_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=128)
    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int = Field(256, ge=1, le=32_768)


class TokenCounts(BaseModel):
    input_tokens: int
    output_tokens: int


class BillingOutcome(BaseModel):
    committed: bool
    """False when the call was served but not billed (see the log for why)."""
    reservation_id: str = ""
    cost_micros: int = 0
    charged_micros: int = 0
    uncollected_micros: int = 0


class ChatResponse(BaseModel):
    text: str
    usage: TokenCounts
    billing: BillingOutcome


def create_app(settings: ChatSettings | None = None, model: ChatModel | None = None) -> FastAPI:
    settings = settings or ChatSettings.from_env()
    chat_model = model or EchoModel()
    billing = BillingClient(
        settings.billing_target,
        token=settings.billing_token,
        timeout_s=settings.billing_timeout_s,
        max_attempts=settings.billing_attempts,
    )

    page_billing: BillingClient | None = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        billing.close()
        if page_billing is not None:
            page_billing.close()

    app = FastAPI(title="chat example", lifespan=lifespan)
    # GET /billing/{tenant_id}: what the tenant's admin sees (examples/chat_app/billing_page.py).
    page_billing = install_billing_page(app, settings)

    # A plain `def`: FastAPI runs it in a worker thread, where the blocking client belongs.
    # (AsyncBillingClient has the same calls for an `async def` endpoint.)
    @app.post("/chat", response_model=ChatResponse)
    def chat(request: ChatRequest) -> ChatResponse:
        try:
            return billed_chat(billing, chat_model, settings, request)
        except BillingUnavailable:
            if request.model in settings.fail_open_models:
                return unbilled_chat(chat_model, request)
            raise

    # A denial (402) or billing down (503) is answered before the first word is sent.
    @app.post("/chat/stream")
    def chat_stream(request: ChatRequest) -> StreamingResponse:
        words = streamed_chat(billing, chat_model, settings, request)
        return StreamingResponse(words, media_type="text/plain; charset=utf-8")

    @app.exception_handler(Denied)
    async def denied(_: Request, denied: Denied) -> JSONResponse:
        status, body = denied.to_http()
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ModelError)
    async def model_failed(_: Request, error: ModelError) -> JSONResponse:
        return error_response(502, "MODEL_FAILED", str(error))

    @app.exception_handler(BillingUnavailable)
    async def billing_unavailable(_: Request, error: BillingUnavailable) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        message = "Billing is unavailable; try again shortly."
        return error_response(503, "BILLING_UNAVAILABLE", message, headers=headers)

    return app


def billed_chat(
    billing: BillingClient, model: ChatModel, settings: ChatSettings, request: ChatRequest
) -> ChatResponse:
    estimate = count_tokens(request.prompt)
    if settings.check_access_first:
        billing.check_access(
            request.tenant_id, request.model, input_tokens=estimate, max_tokens=request.max_tokens
        ).raise_if_denied()
    with billing.reserve(
        request.tenant_id,
        request.user_id,
        request.model,
        input_tokens=estimate,
        max_tokens=request.max_tokens,
        ttl_s=settings.hold_ttl_s,
    ) as hold:
        # A ModelError leaves the block, which releases the hold: nothing is charged.
        completion = model.complete(request.model, request.prompt, request.max_tokens)
        try:
            record = hold.commit(
                input_tokens=completion.input_tokens, output_tokens=completion.output_tokens
            )
        except (CommitOutcomeUnknown, HoldExpired) as error:
            # The answer exists and the provider will bill us for it: serve it, and leave a
            # record to reconcile from. A commit with no answer may still have been applied:
            # the hold is not released (leaving the block leaves it alone), and the commit can
            # be sent again with its request id while the hold is open; otherwise it expires.
            logger.error(
                "usage not committed: reservation=%s commit_request_id=%s tenant=%s user=%s "
                "model=%s input=%d output=%d: %s",
                hold.reservation_id,
                error.request_id if isinstance(error, CommitOutcomeUnknown) else "",
                request.tenant_id,
                request.user_id,
                request.model,
                completion.input_tokens,
                completion.output_tokens,
                error,
            )
            outcome = BillingOutcome(committed=False, reservation_id=hold.reservation_id)
            return response(completion, outcome)
    outcome = BillingOutcome(
        committed=True,
        reservation_id=record.reservation_id,
        cost_micros=record.cost_micros,
        charged_micros=record.charged_micros,
        uncollected_micros=record.uncollected_micros,
    )
    return response(completion, outcome)


def streamed_chat(
    billing: BillingClient, model: ChatModel, settings: ChatSettings, request: ChatRequest
) -> Iterator[str]:
    """Reserves now (raising Denied or BillingUnavailable before anything is sent); returns the
    words of the answer, growing the hold ahead of them. docs/integration.md, "Streamed
    answers"."""
    first_chunk = min(request.max_tokens, settings.stream_chunk_tokens)
    context = billing.reserve(
        request.tenant_id,
        request.user_id,
        request.model,
        input_tokens=count_tokens(request.prompt),
        max_tokens=first_chunk,
        ttl_s=settings.hold_ttl_s,
    )
    hold = context.__enter__()

    def words() -> Iterator[str]:
        failure: tuple[type[BaseException], BaseException, TracebackType | None] | None = None
        stream = model.stream(request.model, request.prompt, request.max_tokens)

        def commit() -> None:
            # The provider's input count and the words that reached the caller.
            hold.commit(input_tokens=stream.input_tokens, output_tokens=hold.streamed_output_tokens)

        try:
            # Each extension also moves the hold's expire time: ttl_s from now.
            yield from hold.stream(
                stream.chunks,
                chunk_tokens=settings.stream_chunk_tokens,
                commit=False,
                ttl_s=settings.hold_ttl_s,
            )
            denied = hold.denied_extension
            if denied is not None:
                # The hold stops here: end the answer cleanly and say why.
                yield f"\n[answer cut: {denied.decision.message}]\n"
            commit()
        except GeneratorExit:
            # The caller went away: what it was sent was generated, and is billed.
            commit()
            raise
        except (ModelError, BillingError) as error:
            # The status line is sent already: end the answer saying so. The hold is left by
            # the hold rules (released, nothing charged; never after a commit of unknown outcome).
            failure = (type(error), error, error.__traceback__)
            logger.error("streamed chat failed: reservation=%s: %s", hold.reservation_id, error)
            yield "\n[answer failed: try again]\n"
        except BaseException as error:
            failure = (type(error), error, error.__traceback__)
            raise
        finally:
            context.__exit__(*(failure or (None, None, None)))

    return words()


def unbilled_chat(model: ChatModel, request: ChatRequest) -> ChatResponse:
    """Fail open: billing is down and the model is one the operator chose to serve anyway."""
    completion = model.complete(request.model, request.prompt, request.max_tokens)
    logger.warning(
        "served without billing (billing unavailable): tenant=%s user=%s model=%s input=%d "
        "output=%d",
        request.tenant_id,
        request.user_id,
        request.model,
        completion.input_tokens,
        completion.output_tokens,
    )
    return response(completion, BillingOutcome(committed=False))


def response(completion: Completion, outcome: BillingOutcome) -> ChatResponse:
    usage = TokenCounts(
        input_tokens=completion.input_tokens, output_tokens=completion.output_tokens
    )
    return ChatResponse(text=completion.text, usage=usage, billing=outcome)


def error_response(
    status: int, reason: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"reason": reason, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)
