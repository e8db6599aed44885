"""The example's billing page without a browser: what it computes from the service's answers,
and what it serves against a billing service without Stripe (an operator-set card flag, exact
money, unknown tenants, billing down, refused actions)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from billing.v1 import account_pb2, admin_pb2, admin_pb2_grpc, types_pb2
from examples.chat_app.app import create_app
from examples.chat_app.billing_view import credit_bar, standing
from examples.chat_app.settings import ChatSettings
from tests.examples.test_chat_app import settings_for
from tests.support.ports import free_port
from tests.support.server_process import ServerProcess

INT32_MAX = 2**31 - 1


@given(
    basis_points=st.integers(0, INT32_MAX),
    exposure=st.integers(0, 10**12),
    limit=st.integers(0, 10**12),
)
def test_the_credit_bar_is_the_services_share_drawn_at_most_full(
    basis_points: int, exposure: int, limit: int
) -> None:
    balance = admin_pb2.Balance(exposure_micros=exposure, effective_credit_limit_micros=limit)
    bar = credit_bar(balance, basis_points)
    whole, hundredths = bar.width.removesuffix("%").split(".")
    assert len(hundredths) == 2
    assert int(whole) * 100 + int(hundredths) == min(basis_points, 10_000)
    assert (bar.used_micros, bar.limit_micros) == (exposure, limit)
    assert bar.level == (
        "full" if basis_points >= 10_000 else "warn" if basis_points >= 7_500 else "ok"
    )


def _profile(status: int, card: bool = True) -> account_pb2.BillingProfile:
    profile = account_pb2.BillingProfile(
        billing_status=status,  # type: ignore[arg-type]
        billing_status_message="" if status == types_pb2.BILLING_STATUS_GOOD_STANDING else "Why.",
        auto_top_up=types_pb2.AutoTopUpSettings(
            enabled=True, amount_micros=20_000_000, monthly_limit_micros=200_000_000
        ),
    )
    if card:
        profile.payment_method.CopyFrom(types_pb2.PaymentMethod(brand="visa", last4="4242"))
    return profile


@pytest.mark.parametrize(
    ("status", "level", "title", "action"),
    [
        (types_pb2.BILLING_STATUS_GOOD_STANDING, "ok", "Good standing", ""),
        (types_pb2.BILLING_STATUS_PAYMENT_FAILED, "bad", "Payment failed", "Update your card"),
        (
            types_pb2.BILLING_STATUS_ACTION_REQUIRED,
            "bad",
            "Authentication required",
            "Update your card",
        ),
        (types_pb2.BILLING_STATUS_DISPUTED, "bad", "Payment disputed", ""),
    ],
)
def test_each_billing_status_says_what_to_do(
    status: int, level: str, title: str, action: str
) -> None:
    tenant = admin_pb2.Tenant(status=admin_pb2.TENANT_STATUS_ACTIVE, payment_method_on_file=True)
    shown = standing(tenant, _profile(status), can_add_card=True)
    assert (shown.level, shown.title, shown.action) == (level, title, action)
    if status != types_pb2.BILLING_STATUS_GOOD_STANDING:
        assert shown.detail.startswith("Why.")
    # Without a card form the page offers no way out it cannot take.
    assert standing(tenant, _profile(status), can_add_card=False).action == ""


def test_suspension_outranks_a_payment_problem_and_the_top_up_ceiling_is_flagged() -> None:
    suspended = admin_pb2.Tenant(status=admin_pb2.TENANT_STATUS_SUSPENDED)
    failed = _profile(types_pb2.BILLING_STATUS_PAYMENT_FAILED)
    assert standing(suspended, failed, can_add_card=True).title == "Account suspended"
    tenant = admin_pb2.Tenant(status=admin_pb2.TENANT_STATUS_ACTIVE, payment_method_on_file=True)
    profile = _profile(types_pb2.BILLING_STATUS_GOOD_STANDING)
    profile.automatic_top_ups_this_month_micros = 180_000_000  # one more $20 would pass $200
    assert standing(tenant, profile, can_add_card=True).title == "Good standing"
    profile.automatic_top_ups_this_month_micros = 180_000_001
    assert standing(tenant, profile, can_add_card=True).title == "Top-up ceiling reached"


@pytest.fixture(scope="module")
def billing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(settings_for(tmp_path_factory.mktemp("page-billing"))) as server:
        yield server


@pytest.fixture
def page(billing: ServerProcess) -> Iterator[TestClient]:
    with TestClient(create_app(ChatSettings(billing_target=billing.address))) as client:
        yield client


def create_tenant(target: str, *, card: bool, grant_micros: int = 0) -> str:
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    with grpc.insecure_channel(target) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id=str(uuid.uuid4()), tenant_id=tenant_id, payment_method_on_file=card
            ),
            timeout=10,
        )
        if grant_micros:
            admin.GrantCredit(
                admin_pb2.GrantCreditRequest(
                    request_id=str(uuid.uuid4()),
                    tenant_id=tenant_id,
                    amount_micros=grant_micros,
                    reason="r",
                ),
                timeout=10,
            )
    return tenant_id


def test_money_is_shown_to_the_micro_without_stripe(
    billing: ServerProcess, page: TestClient
) -> None:
    tenant_id = create_tenant(billing.address, card=True, grant_micros=1_234_567)
    body = {"tenant_id": tenant_id, "user_id": "alice", "model": "unit-priced", "prompt": "hi"}
    chat = page.post("/chat", json={**body, "max_tokens": 5})
    assert chat.status_code == 200
    cost = chat.json()["billing"]["charged_micros"]
    assert cost == (1 + 3) + 3  # "hi" plus the model's system prompt in, "You said: hi" out

    html = page.get(f"/billing/{tenant_id}")
    assert html.status_code == 200
    assert html.headers["cache-control"] == "no-store"
    text = html.text
    # $25 of credit limit on top of the grant, less the one call: 26,234,560 micros.
    assert '<p class="big" id="available-credit">$26.23456</p>' in text
    assert '<dd id="balance">$1.23456</dd>' in text
    assert '<td class="num">$0.000007</td>' in text
    assert "A payment method is on file (recorded by an operator)." in text
    assert 'id="card-form"' not in text
    assert "Card payments are not set up for this app" in text


def test_a_tenant_without_card_is_told_to_add_one(billing: ServerProcess, page: TestClient) -> None:
    tenant_id = create_tenant(billing.address, card=False)
    text = page.get(f"/billing/{tenant_id}").text
    assert '<p id="no-card">No card on file.</p>' in text
    assert 'class="pill warn">No card on file</span>' in text
    assert "Metered models need a card on file" in text
    assert "(with a card: $25.00)" in text


def test_an_unknown_tenant_is_a_404_page_naming_it_as_text(page: TestClient) -> None:
    response = page.get("/billing/%3Cscript%3Ex%3C%2Fscript%3E")
    assert response.status_code == 404
    assert "The billing service knows no &lt;script&gt;x&lt;/script&gt;." in response.text
    assert "<script>" not in response.text


def test_billing_down_is_a_503_page() -> None:
    down = ChatSettings(
        billing_target=f"127.0.0.1:{free_port()}", billing_timeout_s=0.5, billing_attempts=2
    )
    with TestClient(create_app(down)) as client:
        response = client.get("/billing/acme")
    assert response.status_code == 503
    assert "Billing is unavailable" in response.text


def test_a_refused_action_carries_the_services_reason_and_no_internals(
    billing: ServerProcess, page: TestClient
) -> None:
    tenant_id = create_tenant(billing.address, card=True)
    started = page.post("/billing/setup-intent", json={"tenant_id": tenant_id})
    assert started.status_code == 409
    error = started.json()["error"]
    assert error["reason"] == "STRIPE_NOT_CONFIGURED"
    assert error["message"]
    bad = {"tenant_id": tenant_id, "enabled": True, "threshold": "5", "monthly_limit": "100"}
    answer = page.post("/billing/auto-top-up", json={**bad, "amount": "1e3"})
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "reason": "INVALID_AMOUNT",
        "message": "Enter an amount in dollars, e.g. 20 or 12.50.",
        "field": "amount",
    }
    malformed = page.post("/billing/card", json={"tenant_id": tenant_id, "setup_intent_id": "x"})
    assert malformed.status_code == 400
    assert malformed.json()["error"] == {
        "reason": "FIELD_INVALID",
        "message": "setup_intent_id: must start with 'seti_'",
        "field": "setup_intent_id",
    }


def test_a_refused_action_while_billing_is_down_says_to_reload(tmp_path: Path) -> None:
    down = ChatSettings(
        billing_target=f"127.0.0.1:{free_port()}", billing_timeout_s=0.5, billing_attempts=2
    )
    with TestClient(create_app(down)) as client:
        answer = client.post("/billing/setup-intent", json={"tenant_id": "acme"})
    assert answer.status_code == 503
    assert answer.json()["error"]["message"].startswith("Billing did not answer in time.")
    assert "127.0.0.1" not in answer.text


def test_actions_take_json_only_which_a_cross_site_form_cannot_send(
    billing: ServerProcess, page: TestClient
) -> None:
    tenant_id = create_tenant(billing.address, card=True)
    body = json.dumps({"tenant_id": tenant_id})
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        answer = page.post(
            "/billing/setup-intent", content=body, headers={"content-type": content_type}
        )
        assert answer.status_code == 422
