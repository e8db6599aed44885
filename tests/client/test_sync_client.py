"""The blocking client against a real server: holds settle, release or fail exactly as promised."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from billing.client import (
    BillingClient,
    BillingUnavailable,
    Denied,
    HoldAlreadyCommitted,
    HoldExpired,
    HoldNotCommitted,
    HoldReleased,
    InvalidArgument,
    ReleaseOutcomeUnknown,
    RetryEvent,
    Unauthenticated,
)
from billing.v1 import billing_pb2, budget_pb2, types_pb2
from billing_service.app import Application
from billing_service.storage.tables import ledger_entries, usage_records
from tests.client.conftest import (
    CHAT_TOKEN,
    LIMIT,
    OPERATOR_TOKEN,
    ServerThread,
    balance,
    create_tenant,
    start_server,
)
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port


@pytest.fixture
def billing(server: ServerThread) -> Iterator[BillingClient]:
    with BillingClient(server.address, timeout_s=10) as client:
        create_tenant(client, "acme")
        yield client


async def _rows(app: Application, table: str, reservation_id: str) -> int:
    query = {
        "usage": select(func.count()).where(usage_records.c.hold_id == reservation_id),
        "debits": select(func.count()).where(
            ledger_entries.c.hold_id == reservation_id, ledger_entries.c.kind == "debit"
        ),
    }[table]
    async with app.engine.connect() as conn:
        count: int = (await conn.execute(query)).scalar_one()
        return count


def test_check_reserve_commit_moves_exactly_the_priced_amounts(
    billing: BillingClient, server: ServerThread
) -> None:
    decision = billing.check_access("acme", "unit-priced", input_tokens=100, max_tokens=50)
    assert decision.allowed
    assert (decision.reason, decision.message, decision.model_billing) == ("", "", "METERED")
    assert (decision.required_micros, decision.available_credit_micros) == (150, LIMIT)

    with billing.reserve("acme", "user-1", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        assert hold.reservation_id.startswith("rsv_")
        assert hold.amount_micros == hold.reservation.amount_micros == 150
        assert hold.decision.available_credit_micros == LIMIT - 150
        assert balance(billing, "acme").held_micros == 150
        record = hold.commit(input_tokens=100, output_tokens=20, cached_input_tokens=0)
    assert isinstance(record, types_pb2.UsageRecord)
    assert (record.reservation_id, record.user_id) == (hold.reservation_id, "user-1")
    assert (record.cost_micros, record.charged_micros, record.held_micros) == (120, 120, 150)
    assert hold.state == "committed"
    after = balance(billing, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT - 120)
    assert server.calls["Refund"] == 0  # leaving a committed block does nothing


def test_a_denial_raises_denied_before_the_block_and_maps_to_402(
    billing: BillingClient, server: ServerThread
) -> None:
    create_tenant(billing, "small", limit=100)
    entered = False
    with (
        pytest.raises(Denied) as denied,
        billing.reserve("small", "u", "unit-priced", input_tokens=100, max_tokens=50),
    ):
        entered = True
    assert not entered
    assert denied.value.reason == "CREDIT_LIMIT_REACHED"
    assert denied.value.message
    assert denied.value.decision.required_micros == 150
    status, body = denied.value.to_http()
    assert (status, denied.value.http_status) == (402, 402)
    assert body["error"]["reason"] == "CREDIT_LIMIT_REACHED"
    assert body["error"]["available_credit_micros"] == 100
    assert balance(billing, "small").held_micros == 0
    assert server.calls["Refund"] == 0

    create_tenant(billing, "no-card", card=False)
    decision = billing.check_access("no-card", "unit-priced", input_tokens=1, max_tokens=1)
    assert (decision.allowed, decision.reason) == (False, "PAYMENT_METHOD_REQUIRED")
    with pytest.raises(Denied, match="PAYMENT_METHOD_REQUIRED"):
        decision.raise_if_denied()


def test_an_exception_inside_the_block_releases_the_hold(billing: BillingClient) -> None:
    with (
        pytest.raises(ValueError, match="model failed"),
        billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold,
    ):
        raise ValueError("model failed")
    assert hold.state == "released"
    after = balance(billing, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT)
    with pytest.raises(HoldReleased) as raised:
        hold.commit(input_tokens=1, output_tokens=1)
    assert raised.value.reason == "HOLD_RELEASED"
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_leaving_without_commit_releases_the_hold(billing: BillingClient) -> None:
    with billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        assert balance(billing, "acme").held_micros == 150
    assert hold.state == "released"
    assert hold.record is None
    after = balance(billing, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT)


def test_explicit_release_gives_the_hold_back(billing: BillingClient) -> None:
    with billing.reserve("acme", "u", "unit-priced", input_tokens=10, max_tokens=10) as hold:
        released = hold.release(reason="model failed")
        assert released == billing_pb2.ReleaseResponse(
            released_micros=20, available_credit_micros=LIMIT
        )
    assert hold.state == "released"
    assert balance(billing, "acme").held_micros == 0


def test_on_exit_commit_commits_the_estimate_which_costs_the_hold(
    billing: BillingClient,
) -> None:
    with billing.reserve(
        "acme", "u", "unit-priced", input_tokens=100, max_tokens=50, on_exit="commit"
    ) as hold:
        pass
    assert hold.state == "committed"
    assert hold.record is not None
    assert (hold.record.usage.input_tokens, hold.record.usage.output_tokens) == (100, 50)
    assert hold.record.cost_micros == hold.record.charged_micros == hold.amount_micros == 150
    after = balance(billing, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT - 150)


def test_on_exit_commit_still_releases_on_an_exception(billing: BillingClient) -> None:
    with (
        pytest.raises(RuntimeError),
        billing.reserve(
            "acme", "u", "unit-priced", input_tokens=100, max_tokens=50, on_exit="commit"
        ) as hold,
    ):
        raise RuntimeError
    assert hold.state == "released"
    assert balance(billing, "acme").available_credit_micros == LIMIT


def test_a_dropped_commit_response_is_retried_and_settles_once(
    billing: BillingClient, server: ServerThread
) -> None:
    retries: list[RetryEvent] = []
    client = BillingClient(server.address, timeout_s=10, on_retry=retries.append)
    server.calls.drop_next_response("Commit")
    with client.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        record = hold.commit(input_tokens=100, output_tokens=20)
    assert server.calls["Commit"] == 2
    assert [(r.method, r.code, r.attempt) for r in retries] == [
        ("Commit", grpc.StatusCode.UNAVAILABLE, 1)
    ]
    assert record.cost_micros == record.charged_micros == 120
    assert server.run(_rows(server.app, "usage", hold.reservation_id)) == 1
    assert server.run(_rows(server.app, "debits", hold.reservation_id)) == 1
    assert balance(billing, "acme").available_credit_micros == LIMIT - 120
    # Committing again is the same logical commit: the same record, nothing more charged.
    assert hold.commit(input_tokens=100, output_tokens=20) == record
    assert balance(billing, "acme").available_credit_micros == LIMIT - 120


def test_a_dropped_reserve_response_holds_once(
    billing: BillingClient, server: ServerThread
) -> None:
    server.calls.drop_next_response("ReserveCredit")
    with billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        assert server.calls["ReserveCredit"] == 2
        assert balance(billing, "acme").held_micros == hold.amount_micros == 150
    assert balance(billing, "acme").available_credit_micros == LIMIT


def test_invalid_argument_is_raised_typed_and_not_retried(
    billing: BillingClient, server: ServerThread
) -> None:
    with (
        pytest.raises(InvalidArgument) as raised,
        billing.reserve("acme", "u", "unit-priced", input_tokens=1, max_tokens=0),
    ):
        pass
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.reason == "FIELD_INVALID"
    assert [v.field for v in raised.value.field_violations] == ["estimate.max_output_tokens"]
    assert server.calls["ReserveCredit"] == 1
    with pytest.raises(InvalidArgument):
        billing.check_access("", "unit-priced")
    assert server.calls["CheckAccess"] == 1
    assert balance(billing, "acme").held_micros == 0


def test_an_expired_hold_raises_hold_expired_and_is_not_released_again(
    billing: BillingClient, server: ServerThread
) -> None:
    with billing.reserve("acme", "u", "unit-priced", input_tokens=10, max_tokens=10, ttl_s=60) as h:
        server.clock.advance(seconds=61)
        with pytest.raises(HoldExpired) as raised:
            h.commit(input_tokens=10, output_tokens=10)
    assert raised.value.reason == "HOLD_EXPIRED"
    assert h.state == "expired"
    assert (server.calls["Release"], server.calls["Refund"]) == (0, 0)
    server.run(server.app.core.release_expired())  # the sweeper may have been first
    assert balance(billing, "acme").available_credit_micros == LIMIT


def test_refund_of_a_committed_charge(billing: BillingClient) -> None:
    with billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        hold.commit(input_tokens=100, output_tokens=50)
    refunded = billing.refund(hold.reservation_id, amount_micros=50, reason="ticket 4411")
    assert isinstance(refunded, billing_pb2.RefundResponse)
    assert (refunded.kind, refunded.amount_micros) == (billing_pb2.REFUND_KIND_REFUND, 50)
    assert refunded.available_credit_micros == LIMIT - 100
    # A caller-chosen request id makes the refund idempotent across processes.
    again = [
        billing.refund(hold.reservation_id, refund_all=True, request_id="ticket-4412")
        for _ in range(2)
    ]
    assert again[0] == again[1]
    assert again[0].refunded_total_micros == 150
    assert balance(billing, "acme").available_credit_micros == LIMIT


def test_refund_says_what_it_refunds_and_release_never_refunds(
    billing: BillingClient, server: ServerThread
) -> None:
    for amounts in ({}, {"amount_micros": 0}, {"amount_micros": 5, "refund_all": True}):
        with pytest.raises(ValueError, match="release"):
            billing.refund("rsv_" + "0" * 32, **amounts)  # type: ignore[arg-type]
    assert server.calls["Refund"] == 0

    with billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        hold.commit(input_tokens=100, output_tokens=50)
    with pytest.raises(HoldAlreadyCommitted):
        billing.release(hold.reservation_id)
    with pytest.raises(HoldAlreadyCommitted):
        hold.release()
    assert hold.state == "committed"
    assert balance(billing, "acme").available_credit_micros == LIMIT - 150

    with billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as other:
        with pytest.raises(HoldNotCommitted):
            billing.refund(other.reservation_id, refund_all=True)
        released = billing.release(other.reservation_id, reason="by hand")
        assert released.released_micros == 150
    assert other.state == "released"  # released behind its back: leaving finds it so
    assert balance(billing, "acme").available_credit_micros == LIMIT - 150


def test_a_release_whose_answer_is_lost_is_reported_unknown(
    billing: BillingClient, server: ServerThread
) -> None:
    once = BillingClient(server.address, timeout_s=10, max_attempts=1)
    with billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        server.calls.drop_next_response("Release")
        with pytest.raises(ReleaseOutcomeUnknown) as raised:
            once.release(hold.reservation_id)
        unknown = raised.value
        assert unknown.reservation_id == hold.reservation_id
        # It was applied; the same request id learns so, and releases nothing twice.
        again = billing.release(unknown.reservation_id, request_id=unknown.request_id)
        assert again.released_micros == 150
        assert balance(billing, "acme").available_credit_micros == LIMIT
    once.close()


def test_included_models_hold_nothing(billing: BillingClient) -> None:
    with billing.reserve("acme", "u", "unit-included", input_tokens=10, max_tokens=10) as hold:
        assert hold.decision.model_billing == "INCLUDED"
        assert hold.amount_micros == 0
        record = hold.commit(input_tokens=10, output_tokens=5)
    assert (record.cost_micros, record.charged_micros) == (15, 0)
    assert record.payment_source == types_pb2.PAYMENT_SOURCE_INCLUDED


def test_an_unreachable_server_is_retried_then_unavailable() -> None:
    retries: list[RetryEvent] = []
    address = f"127.0.0.1:{free_port()}"
    with (
        BillingClient(address, timeout_s=0.2, max_attempts=3, on_retry=retries.append) as client,
        pytest.raises(BillingUnavailable) as raised,
    ):
        client.check_access("acme", "unit-priced")
    assert raised.value.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert [r.attempt for r in retries] == [1, 2]
    assert {r.method for r in retries} == {"CheckAccess"}


def test_token_auth(token_server: ServerThread) -> None:
    with BillingClient(token_server.address, token=OPERATOR_TOKEN, timeout_s=10) as operator:
        create_tenant(operator, "acme")  # the raw stubs carry the token too
    with BillingClient(token_server.address, token=CHAT_TOKEN, timeout_s=10) as chat:
        with chat.reserve("acme", "u", "unit-priced", input_tokens=1, max_tokens=1) as hold:
            hold.commit(input_tokens=1, output_tokens=1)
        assert hold.state == "committed"
    with BillingClient(token_server.address, timeout_s=10) as anonymous:
        with pytest.raises(Unauthenticated) as raised:
            anonymous.check_access("acme", "unit-priced")
        assert raised.value.reason == "CREDENTIALS_MISSING"
    assert token_server.calls["CheckAccess"] == 1


def test_mutual_tls(database_url: str, prices: Path, tmp_path: Path) -> None:
    authority = CertificateAuthority()
    certificate, key = authority.server().write(tmp_path, "server")
    client_ca = tmp_path / "clients-ca.crt"
    client_ca.write_bytes(authority.certificate_pem)
    running = start_server(
        database_url,
        prices,
        tls_cert_file=certificate,
        tls_key_file=key,
        tls_client_ca_file=client_ca,
        tls_client_roles="operator=ops-alice",
    )
    operator = authority.client("ops-alice")
    try:
        with BillingClient(
            f"localhost:{running.app.port}",
            root_certificates=authority.certificate_pem,
            certificate_chain=operator.certificate_pem,
            private_key=operator.key_pem,
            timeout_s=10,
        ) as client:
            create_tenant(client, "acme")
            with client.reserve("acme", "u", "unit-priced", input_tokens=1, max_tokens=1) as h:
                h.commit(input_tokens=1, output_tokens=1)
            assert balance(client, "acme").available_credit_micros == LIMIT - 2
        with (
            BillingClient(
                f"localhost:{running.app.port}",
                root_certificates=authority.certificate_pem,
                timeout_s=1,
                max_attempts=1,
            ) as no_certificate,
            pytest.raises(BillingUnavailable),  # the TLS handshake fails
        ):
            no_certificate.check_access("acme", "unit-priced")
    finally:
        running.stop()


def test_total_timeout_bounds_the_attempts_of_one_call() -> None:
    retries: list[RetryEvent] = []
    address = f"127.0.0.1:{free_port()}"
    with (
        BillingClient(
            address,
            timeout_s=0.2,
            max_attempts=1000,
            total_timeout_s=0.5,
            on_retry=retries.append,
        ) as client,
        pytest.raises(BillingUnavailable),
    ):
        client.check_access("acme", "unit-priced")
    # Retries wait for the channel until their deadline, so 0.5 s leaves room for a few only.
    assert 1 <= len(retries) < 10


def test_a_budget_on_the_api_key_denies_through_the_client(billing: BillingClient) -> None:
    budget = types_pb2.Budget(
        tenant_id="acme",
        scope=types_pb2.BUDGET_SCOPE_API_KEY,
        scope_id="key-ci",
        limit_micros=200,
        period=types_pb2.BUDGET_PERIOD_DAY,
    )
    billing.budgets.SetBudget(budget_pb2.SetBudgetRequest(request_id="set-key-ci", budget=budget))

    decision = billing.check_access(
        "acme", "unit-priced", input_tokens=100, max_tokens=50, api_key_id="key-ci"
    )
    assert decision.allowed
    with billing.reserve(
        "acme", "u", "unit-priced", input_tokens=100, max_tokens=50, api_key_id="key-ci"
    ) as hold:
        assert [b.remaining_micros for b in hold.decision.budgets] == [50]
        with (
            pytest.raises(Denied) as denied,
            billing.reserve(
                "acme", "u", "unit-priced", input_tokens=100, max_tokens=50, api_key_id="key-ci"
            ),
        ):
            pass
        hold.commit(input_tokens=100, output_tokens=50)
    assert denied.value.reason == "API_KEY_BUDGET_EXHAUSTED"
    assert "resets" in denied.value.message
    exhausted = denied.value.decision.exhausted_budget
    assert exhausted is not None
    assert exhausted.budget.scope_id == "key-ci"
    assert exhausted.HasField("reset_time")
    # Another key, or none, is not held to that budget.
    with billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as other:
        other.commit(input_tokens=100, output_tokens=50)
