"""The asyncio client: `AsyncBillingClient` with `await` and `async with`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc
import grpc.aio

from billing.client._channel import connect_aio_channel
from billing.client._errors import BillingError, error_from_rpc
from billing.client._hold import (
    HoldBase,
    commit_failure,
    log_release_failure,
    release_failure,
)
from billing.client._model import (
    AccessDecision,
    Extension,
    OnExit,
    check_access_request,
    commit_request,
    exit_reason,
    extend_request,
    new_request_id,
    refund_request,
    release_request,
    reserve_request,
)
from billing.client._retry import OnRetry, RetryPolicy
from billing.v1 import (
    account_pb2_grpc,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    budget_pb2_grpc,
    types_pb2,
    usage_pb2_grpc,
)

if TYPE_CHECKING:
    from billing.v1.account_pb2_grpc import AccountServiceAsyncStub
    from billing.v1.admin_pb2_grpc import AdminServiceAsyncStub
    from billing.v1.billing_pb2_grpc import BillingServiceAsyncStub
    from billing.v1.budget_pb2_grpc import BudgetServiceAsyncStub
    from billing.v1.usage_pb2_grpc import UsageServiceAsyncStub

__all__ = ["AsyncBillingClient", "AsyncHold", "AsyncHoldContext"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Chunk = TypeVar("_Chunk")


def _one_token(chunk: object) -> int:
    return 1


async def _aiter(chunks: AsyncIterable[_Chunk] | Iterable[_Chunk]) -> AsyncIterator[_Chunk]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


class AsyncBillingClient:
    """An asyncio client of BillingService; use it from one event loop.

    Every call has its own deadline (`timeout_s` per attempt) and is retried on UNAVAILABLE and
    DEADLINE_EXCEEDED only, up to `max_attempts` attempts, with the same request id. Retries
    wait for the channel to be ready (a restarting server) within their deadline; the first
    attempt fails fast. `billing`, `admin`, `account` and `usage` are the generated stubs on the
    same channel, for anything else (no retries or request ids are added to those).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        tls: bool | None = None,
        timeout_s: float = 2.0,
        max_attempts: int = 4,
        total_timeout_s: float | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        channel = connect_aio_channel(
            target,
            token=token,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            tls=tls,
        )
        policy = RetryPolicy(timeout_s, max_attempts, total_timeout_s, on_retry=on_retry)
        self._setup(channel, policy, owned=True)

    @classmethod
    def from_channel(
        cls,
        channel: grpc.aio.Channel,
        *,
        timeout_s: float = 2.0,
        max_attempts: int = 4,
        total_timeout_s: float | None = None,
        on_retry: OnRetry | None = None,
    ) -> AsyncBillingClient:
        """A client over a channel the caller made (and closes)."""
        client = cls.__new__(cls)
        policy = RetryPolicy(timeout_s, max_attempts, total_timeout_s, on_retry=on_retry)
        client._setup(channel, policy, owned=False)
        return client

    def _setup(self, channel: grpc.aio.Channel, retry: RetryPolicy, *, owned: bool) -> None:
        self.channel = channel
        self.retry = retry
        self._owned = owned
        self.billing: BillingServiceAsyncStub = billing_pb2_grpc.BillingServiceStub(channel)
        self.admin: AdminServiceAsyncStub = admin_pb2_grpc.AdminServiceStub(channel)
        self.account: AccountServiceAsyncStub = account_pb2_grpc.AccountServiceStub(channel)
        self.usage: UsageServiceAsyncStub = usage_pb2_grpc.UsageServiceStub(channel)
        self.budgets: BudgetServiceAsyncStub = budget_pb2_grpc.BudgetServiceStub(channel)

    async def close(self) -> None:
        if self._owned:
            await self.channel.close(None)

    async def __aenter__(self) -> AsyncBillingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        *,
        name: str,
        request_id: str = "",
    ) -> _Response:
        """Calls `method` with this client's deadline and retries; raises a `BillingError`."""
        deadline = self.retry.deadline()
        try:
            async for attempt in self.retry.aio(name, request_id):
                with attempt:
                    return await method(
                        request,
                        timeout=self.retry.attempt_timeout(deadline),
                        wait_for_ready=attempt.retry_state.attempt_number > 1,
                    )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        raise AssertionError("tenacity returned without an outcome")

    async def check_access(
        self,
        tenant_id: str,
        model: str,
        *,
        input_tokens: int = 0,
        max_tokens: int = 0,
        user_id: str = "",
        api_key_id: str = "",
    ) -> AccessDecision:
        """May `tenant_id` run `model` now? Read-only advice: it holds nothing. Without a size,
        whether the smallest query would fit."""
        request = check_access_request(
            tenant_id, model, input_tokens, max_tokens, user_id, api_key_id
        )
        response = await self.call(self.billing.CheckAccess, request, name="CheckAccess")
        return AccessDecision.from_proto(response.decision)

    def reserve(
        self,
        tenant_id: str,
        user_id: str,
        model: str,
        *,
        input_tokens: int,
        max_tokens: int,
        ttl_s: float | None = None,
        on_exit: OnExit = "release",
        request_id: str | None = None,
        api_key_id: str = "",
    ) -> AsyncHoldContext:
        """`async with client.reserve(...) as hold:` holds the most the query can cost.

        Entering raises `Denied` if the hold is not granted. Leaving the block by an exception
        releases the hold; leaving it without `hold.commit(...)` releases it too, or with
        `on_exit="commit"` commits the estimate: `input_tokens` uncached input tokens and
        `max_tokens` output tokens, which costs exactly the amount held. A hold whose commit
        was sent but got no answer (`CommitOutcomeUnknown`, or the call was interrupted) is
        never released: it is left to its commit's retry or to its expiry.
        """
        if on_exit not in ("release", "commit"):
            raise ValueError('on_exit must be "release" or "commit"')
        request = reserve_request(
            request_id or new_request_id(),
            tenant_id,
            user_id,
            model,
            input_tokens,
            max_tokens,
            ttl_s,
            api_key_id,
        )
        return AsyncHoldContext(self, request, on_exit)

    async def commit(
        self,
        reservation_id: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        request_id: str | None = None,
    ) -> types_pb2.UsageRecord:
        """Settles a hold at the real token counts, outside a `with` block; returns the usage
        record. Pass the `request_id` (and the same counts) of a commit whose outcome was
        unknown (`CommitOutcomeUnknown`) to learn its answer instead of committing twice.
        Raises `CommitOutcomeUnknown` when this call's outcome is unknown."""
        request = commit_request(
            request_id or new_request_id(),
            reservation_id,
            input_tokens,
            output_tokens,
            cached_input_tokens,
        )
        try:
            response = await self.call(
                self.billing.Commit, request, name="Commit", request_id=request.request_id
            )
        except BillingError as error:
            raise commit_failure(error, request) from error
        return response.usage_record

    async def release(
        self, reservation_id: str, *, reason: str = "", request_id: str | None = None
    ) -> billing_pb2.ReleaseResponse:
        """Gives an open hold back; nothing is charged. It never refunds: a hold already
        committed raises `HoldAlreadyCommitted` and nothing changes; one past its expire time
        raises `HoldExpired` (it is expired, its amount is back in available credit). Raises
        `ReleaseOutcomeUnknown` when the outcome is unknown."""
        request = release_request(request_id or new_request_id(), reservation_id, reason)
        try:
            return await self.call(
                self.billing.Release, request, name="Release", request_id=request.request_id
            )
        except BillingError as error:
            raise release_failure(error, request) from error

    async def extend_hold(
        self,
        reservation_id: str,
        *,
        additional_output_tokens: int,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_input_tokens: int = 0,
        ttl_s: float | None = None,
        request_id: str | None = None,
    ) -> Extension:
        """Grows an open hold by the price of `additional_output_tokens` more output tokens,
        decided like a reservation of that amount; a granted one also moves its expire time to
        `ttl_s` (default: the server's) from now. A denial is an `Extension` with
        `allowed=False`, not an error; its `covered_output_tokens` says how many output tokens
        past the counts sent here the hold still pays for. A settled hold raises
        `HoldAlreadyCommitted`, `HoldReleased` or `HoldExpired`. Outside a `with` block; inside
        one, `hold.extend()` or `hold.stream()`."""
        request = extend_request(
            request_id or new_request_id(),
            reservation_id,
            additional_output_tokens,
            input_tokens,
            output_tokens,
            cached_input_tokens,
            ttl_s,
        )
        response = await self.call(
            self.billing.ExtendHold, request, name="ExtendHold", request_id=request.request_id
        )
        return Extension.from_proto(response)

    async def refund(
        self,
        reservation_id: str,
        *,
        amount_micros: int | None = None,
        refund_all: bool = False,
        reason: str = "",
        request_id: str | None = None,
    ) -> billing_pb2.RefundResponse:
        """Refunds `amount_micros` of a committed charge, or all that is left of it with
        `refund_all=True` (exactly one of the two). It never releases a hold: an open one
        raises `HoldNotCommitted` (or `FailedPrecondition` PARTIAL_RELEASE_NOT_ALLOWED for an
        amount). Pass your own `request_id` (e.g. a support ticket's) to make a refund
        idempotent across processes."""
        rid = request_id or new_request_id()
        request = refund_request(rid, reservation_id, amount_micros, refund_all, reason)
        return await self.call(self.billing.Refund, request, name="Refund", request_id=rid)


class AsyncHold(HoldBase):
    """A granted hold inside `async with client.reserve(...) as hold:`."""

    def __init__(
        self,
        client: AsyncBillingClient,
        reservation: types_pb2.Reservation,
        decision: AccessDecision,
        *,
        input_tokens: int,
        max_tokens: int,
        on_exit: OnExit,
    ) -> None:
        super().__init__(
            reservation, decision, input_tokens=input_tokens, max_tokens=max_tokens, on_exit=on_exit
        )
        self._client = client

    async def commit(
        self, *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> types_pb2.UsageRecord:
        """Settles the hold at the real token counts; returns the usage record. Raises
        `HoldExpired` if the hold expired first (nothing was charged), and
        `CommitOutcomeUnknown` if no attempt got an answer: the hold is then never released;
        calling `commit()` again with the same counts retries the same commit."""
        try:
            record = await self._client.commit(
                self.reservation_id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cached_input_tokens=cached_input_tokens,
                request_id=self._commit_request_id,
            )
        except BillingError as error:
            self._note_failure(error)
            raise
        except BaseException:
            self._interrupted()
            raise
        self.record = record
        self.state = "committed"
        return record

    async def release(self, reason: str = "") -> billing_pb2.ReleaseResponse:
        """Gives the hold back; nothing is charged. It never refunds: if the hold was
        committed meanwhile it raises `HoldAlreadyCommitted` and changes nothing. Raises
        `ReleaseOutcomeUnknown` if no attempt got an answer."""
        try:
            response = await self._client.release(
                self.reservation_id, reason=reason, request_id=self._release_request_id
            )
        except BillingError as error:
            self._note_failure(error)
            raise
        except BaseException:
            self._interrupted()
            raise
        self.state = "released"
        return response

    async def extend(
        self,
        additional_output_tokens: int,
        *,
        output_tokens: int | None = None,
        ttl_s: float | None = None,
    ) -> Extension:
        """Grows the hold by `additional_output_tokens` more output tokens (see
        `AsyncBillingClient.extend_hold`); `output_tokens` is the count streamed so far
        (default: what `stream()` passed through). A granted extension updates `reservation`;
        a denial is returned, not raised."""
        streamed = self.streamed_output_tokens if output_tokens is None else output_tokens
        request = self._extend_request(additional_output_tokens, streamed, ttl_s)
        client = self._client
        try:
            response = await client.call(
                client.billing.ExtendHold,
                request,
                name="ExtendHold",
                request_id=request.request_id,
            )
        except BillingError as error:
            self._note_failure(error)
            raise
        return self._extended(Extension.from_proto(response), streamed)

    async def stream(
        self,
        chunks: AsyncIterable[_Chunk] | Iterable[_Chunk],
        *,
        chunk_tokens: int = 256,
        tokens_of: Callable[[_Chunk], int] | None = None,
        commit: bool = True,
        ttl_s: float | None = None,
    ) -> AsyncIterator[_Chunk]:
        """`Hold.stream` for asyncio: `async for chunk in hold.stream(model_stream): ...`
        over an async (or plain) iterable of chunks; the same extensions, stop and commit."""
        count = tokens_of or _one_token
        failed = True
        try:
            async for chunk in _aiter(chunks):
                tokens = count(chunk)
                if self._needs_extension(tokens) and self.denied_extension is None:
                    extension = await self.extend(max(chunk_tokens, tokens), ttl_s=ttl_s)
                    if not extension.allowed:
                        self.denied_extension = extension
                if self._needs_extension(tokens):
                    break
                self.streamed_output_tokens += tokens
                yield chunk
            failed = False
        except GeneratorExit:
            failed = False
            raise
        finally:
            if commit and not failed and self.state == "open":
                await self.commit(**self._stream_commit_counts())

    async def _leave(self, exc_type: type[BaseException] | None) -> None:
        if self.state != "open":
            return
        if exc_type is None and self._on_exit == "commit":
            input_tokens, max_tokens = self._estimate
            await self.commit(input_tokens=input_tokens, output_tokens=max_tokens)
            return
        try:
            # Shielded: a second cancellation of a cancelled task must not leave the hold open.
            await asyncio.shield(self.release(exit_reason(exc_type)))
        except BillingError as error:
            log_release_failure(self, error)


class AsyncHoldContext:
    """What `AsyncBillingClient.reserve` returns: reserves on entering, settles on leaving."""

    def __init__(
        self, client: AsyncBillingClient, request: billing_pb2.ReserveCreditRequest, on_exit: OnExit
    ) -> None:
        self._client = client
        self.request = request
        self._on_exit = on_exit
        self._hold: AsyncHold | None = None

    async def __aenter__(self) -> AsyncHold:
        client = self._client
        response = await client.call(
            client.billing.ReserveCredit,
            self.request,
            name="ReserveCredit",
            request_id=self.request.request_id,
        )
        decision = AccessDecision.from_proto(response.decision)
        decision.raise_if_denied()
        self._hold = AsyncHold(
            client,
            response.reservation,
            decision,
            input_tokens=self.request.estimate.input_tokens,
            max_tokens=self.request.estimate.max_output_tokens,
            on_exit=self._on_exit,
        )
        return self._hold

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hold is not None:
            await self._hold._leave(exc_type)
