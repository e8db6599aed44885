"""The example's billing page in a real headless Chromium: the billing service with localstripe
as Stripe, the chat app serving the page, and localstripe's test Stripe.js in the page.

A tenant admin adds a card, users run metered queries through the chat endpoint, and the page,
reloaded, shows them: the credit bar, usage by model and by user, and the records.

BILLING_PAGE_SCREENSHOT=docs/billing-page.png also saves the page there (the README's picture).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from billing.ctl.money import format_dollars
from billing.v1 import account_pb2, account_pb2_grpc, admin_pb2, admin_pb2_grpc
from examples.chat_app.app import create_app
from examples.chat_app.settings import ChatSettings
from tests.support.browser import WAIT_MS, chromium
from tests.support.localstripe import API_KEY, PUBLISHABLE_KEY, LocalStripe
from tests.support.server_process import ServerProcess
from tests.support.web_app import serving

pytestmark = pytest.mark.slow

CARD_OK = "4242424242424242"
CARD_DECLINED = "4000000000000002"
CARD_DECLINED_OFF_SESSION = "4000000000000341"
CREDIT_LIMIT = 25_000_000
# 20,000 words: the app estimates 20,000 input tokens, the model reports 20,003.
LONG_PROMPT = " ".join(["a"] * 20_000)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("billing-page")
    with LocalStripe() as stripe:
        settings = {
            "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'billing.db'}",
            "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
            "BILLING_LOG_FORMAT": "text",
            "BILLING_STRIPE_API_KEY": API_KEY,
            "BILLING_STRIPE_API_BASE": stripe.url,
        }
        with ServerProcess(settings) as billing:
            app = create_app(
                ChatSettings(
                    billing_target=billing.address,
                    billing_timeout_s=10.0,
                    stripe_publishable_key=PUBLISHABLE_KEY,
                    stripe_js_url=f"{stripe.url}/js.stripe.com/v3/",
                )
            )
            with serving(app) as url, chromium(directory / "chromium-profile") as browser:
                yield Stack(billing.address, url, browser)


class Stack:
    def __init__(self, billing: str, app_url: str, browser: BrowserContext) -> None:
        self.billing = billing
        self.app_url = app_url
        self.browser = browser

    def create_tenant(self, tenant_id: str) -> str:
        with grpc.insecure_channel(self.billing) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).CreateTenant(
                admin_pb2.CreateTenantRequest(request_id=str(uuid.uuid4()), tenant_id=tenant_id),
                timeout=10,
            )
        return tenant_id

    def top_up_now(self, tenant_id: str, amount_micros: int) -> account_pb2.Charge:
        with grpc.insecure_channel(self.billing) as channel:
            return (
                account_pb2_grpc.AccountServiceStub(channel)
                .TopUpNow(
                    account_pb2.TopUpNowRequest(
                        request_id=str(uuid.uuid4()),
                        tenant_id=tenant_id,
                        amount_micros=amount_micros,
                    ),
                    timeout=30,
                )
                .charge
            )

    def chat(
        self, tenant_id: str, user_id: str, model: str, prompt: str, max_tokens: int = 256
    ) -> httpx.Response:
        body = {
            "tenant_id": tenant_id,
            "user_id": user_id,
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
        }
        return httpx.post(f"{self.app_url}/chat", json=body, timeout=30)

    def open(self, tenant_id: str) -> Page:
        page = self.browser.new_page()
        page.goto(f"{self.app_url}/billing/{quote(tenant_id, safe='')}")
        return page


@pytest.fixture(autouse=True)
def _bounded_waits() -> None:
    expect.set_options(timeout=WAIT_MS)


def save_card(page: Page, number: str) -> None:
    """Types a test card into the form and saves it. localstripe's Stripe.js mounts plain
    inputs where real Stripe.js mounts its iframe; it takes the 16 digits without spaces."""
    card = page.locator("#card-element")
    card.get_by_placeholder("number").fill(number)
    card.get_by_placeholder("exp_month").fill("12")
    card.get_by_placeholder("exp_year").fill("34")
    card.get_by_placeholder("cvc").fill("123")
    card.get_by_placeholder("postal_code").fill("10001")
    page.locator("#save-card").click()


def billed(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text[:500]
    billing: dict[str, Any] = response.json()["billing"]
    assert billing["committed"] is True
    return billing


def test_a_card_added_in_the_browser_and_the_queries_after_it_show_on_the_page(
    stack: Stack, tmp_path: Path
) -> None:
    tenant_id = stack.create_tenant("acme")  # the module's billing database is its own
    page = stack.open(tenant_id)
    expect(page.locator("#tenant-id")).to_have_text(tenant_id)
    expect(page.locator("#no-card")).to_have_text("No card on file.")
    expect(page.locator("#status-pill")).to_have_text("No card on file")
    expect(page.locator("#available-credit")).to_have_text("$0.00")
    refused = stack.chat(tenant_id, "alice", "gpt-4o", "hello there")
    assert refused.status_code == 402
    assert refused.json()["error"]["reason"] == "PAYMENT_METHOD_REQUIRED"

    save_card(page, CARD_OK)
    # Saving reloads the page: the card, the limit it brings and good standing.
    expect(page.locator("#card-on-file")).to_contain_text("•••• 4242")
    expect(page.locator("#card-on-file .brand")).to_have_text("Visa")
    expect(page.locator("#status-pill")).to_have_text("Good standing")
    expect(page.locator("#standing")).to_have_count(0)
    expect(page.locator("#available-credit")).to_have_text(format_dollars(CREDIT_LIMIT))
    expect(page.locator("#auto-top-up-summary")).to_contain_text("the card is charged $20.00")

    queries = [
        ("alice", "claude-opus-4-1", LONG_PROMPT, 20_000),
        ("bob", "gpt-4o-premium", "summarise the meeting notes", 256),
        ("alice", "gpt-4o", "hello there", 256),
        ("carol", "gpt-4o-mini", "draft a reply", 256),
    ]
    outcomes = [
        (user, model, billed(stack.chat(tenant_id, user, model, prompt, max_tokens)))
        for user, model, prompt, max_tokens in queries
    ]
    charged = sum(outcome["charged_micros"] for _, _, outcome in outcomes)
    assert outcomes[-1][2]["charged_micros"] == 0  # an included model
    assert charged > 2_000_000

    page.reload()
    expect(page.locator("#available-credit")).to_have_text(format_dollars(CREDIT_LIMIT - charged))
    used = f"{format_dollars(charged)} of {format_dollars(CREDIT_LIMIT)} credit limit used"
    expect(page.locator("#credit-used")).to_contain_text(used)
    bar = page.get_by_role("progressbar", name="Credit limit used")
    basis_points = charged * 10_000 // CREDIT_LIMIT
    expect(bar).to_have_attribute("aria-valuenow", str(basis_points))
    fill = bar.locator(".fill")
    width = f"{basis_points // 100}.{basis_points % 100:02d}%"
    expect(fill).to_have_attribute("style", f"width: {width}")
    box = fill.bounding_box()
    assert box is not None
    assert box["width"] > 0
    expect(page.locator("#total-calls")).to_have_text("4")
    expect(page.locator("#total-charged")).to_have_text(format_dollars(charged))

    by_model = {model: 0 for _, model, _ in outcomes}
    by_user = {user: 0 for user, _, _ in outcomes}
    for user, model, outcome in outcomes:
        by_model[model] += outcome["charged_micros"]
        by_user[user] += outcome["charged_micros"]
    for table, totals in (("#by-model", by_model), ("#by-user", by_user)):
        rows = page.locator(f"{table} tbody tr")
        expect(rows).to_have_count(len(totals))
        for name, micros in totals.items():
            row = rows.filter(has=page.get_by_role("cell", name=name, exact=True))
            expect(row.locator("td").last).to_have_text(format_dollars(micros))

    records = page.locator("#records tbody tr")
    expect(records).to_have_count(len(outcomes))
    for user, model, outcome in outcomes:
        row = page.locator(f'#records tr[data-reservation-id="{outcome["reservation_id"]}"]')
        expect(row.locator("td").nth(1)).to_have_text(user)
        expect(row.locator("td").nth(2)).to_have_text(model)
        expect(row.locator("td").nth(6)).to_have_text(format_dollars(outcome["charged_micros"]))
    # Newest first: the included query came last.
    expect(records.first.locator("td").nth(7)).to_have_text("included")

    page.screenshot(path=tmp_path / "billing-page.png", full_page=True)
    if target := os.environ.get("BILLING_PAGE_SCREENSHOT"):
        page.screenshot(path=target, full_page=True)


def test_ids_from_callers_are_shown_as_text_never_markup(stack: Stack) -> None:
    hostile = "<img/src=x/onerror=document.title='owned'>"
    tenant_id = stack.create_tenant(f'"><b>{uuid.uuid4().hex[:6]}</b>')
    billed(stack.chat(tenant_id, hostile, "gpt-4o-mini", "hi"))
    page = stack.open(tenant_id)
    expect(page.locator("#tenant-id")).to_have_text(tenant_id)
    expect(page.locator("#by-user tbody td").first).to_have_text(hostile)
    expect(page.locator("#records tbody td").nth(1)).to_have_text(hostile)
    assert page.locator("main b, main img").count() == 0
    assert page.title() == f"Billing · {tenant_id}"
    # The card form posts the tenant id the page was rendered for, unchanged.
    assert page.locator("#billing").get_attribute("data-tenant-id") == tenant_id


def test_a_declined_card_is_reported_in_the_form_and_nothing_is_saved(stack: Stack) -> None:
    tenant_id = stack.create_tenant(f"acme-{uuid.uuid4().hex[:6]}")
    page = stack.open(tenant_id)
    save_card(page, CARD_DECLINED)
    expect(page.locator("#card-status")).to_have_text(re.compile("declined"))
    expect(page.locator("#save-card")).to_be_enabled()
    page.reload()
    expect(page.locator("#no-card")).to_have_text("No card on file.")


def test_a_declined_charge_asks_to_update_the_card_and_a_new_card_clears_it(stack: Stack) -> None:
    tenant_id = stack.create_tenant(f"acme-{uuid.uuid4().hex[:6]}")
    page = stack.open(tenant_id)
    save_card(page, CARD_DECLINED_OFF_SESSION)  # saved; its off-session charges are declined
    expect(page.locator("#status-pill")).to_have_text("Good standing")
    charge = stack.top_up_now(tenant_id, 10_000_000)
    assert charge.status == account_pb2.CHARGE_STATUS_FAILED
    refused = stack.chat(tenant_id, "alice", "gpt-4o", "hello there")
    assert refused.json()["error"]["reason"] == "PAYMENT_FAILED"

    page.reload()
    expect(page.locator("#status-pill")).to_have_text("Payment failed")
    banner = page.locator("#standing")
    expect(banner).to_contain_text("The last card charge was declined.")
    banner.get_by_role("link", name="Update your card").click()
    expect(page.locator("#card-details")).to_have_attribute("open", "")
    save_card(page, CARD_OK)
    expect(page.locator("#status-pill")).to_have_text("Good standing")
    expect(page.locator("#standing")).to_have_count(0)
    billed(stack.chat(tenant_id, "alice", "gpt-4o", "hello there"))


def test_automatic_top_up_settings_are_changed_from_the_page(stack: Stack) -> None:
    tenant_id = stack.create_tenant(f"acme-{uuid.uuid4().hex[:6]}")
    page = stack.open(tenant_id)
    save_card(page, CARD_OK)
    # Saving reloads the page; the form is filled only after that.
    expect(page.locator("#card-on-file")).to_contain_text("•••• 4242")
    expect(page.locator("#auto-top-up-summary")).to_contain_text("the card is charged $20.00")
    form = page.locator("#auto-top-up-form")
    form.get_by_label("charge").fill("12.5")
    form.get_by_label("Below").fill("ten")
    form.get_by_role("button", name="Save").click()
    expect(page.locator("#auto-top-up-status")).to_contain_text("Enter an amount in dollars")
    form.get_by_label("Below").fill("$7.25")
    form.get_by_label("at most a month").fill("100")
    form.get_by_role("button", name="Save").click()
    summary = page.locator("#auto-top-up-summary")
    expect(summary).to_contain_text(
        "When available credit falls below $7.25, the card is charged $12.50, "
        "at most $100.00 a month."
    )
    form.get_by_role("checkbox", name="On").uncheck()
    form.get_by_role("button", name="Save").click()
    expect(summary).to_contain_text("Off: the card is charged only when you top up.")
