"""The Stripe fault proxy against the real localstripe: Stripe's idempotent replay, and each
fault doing what the payment tests rely on it doing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import stripe

from tests.support.localstripe import API_KEY, LocalStripe
from tests.support.stripe_proxy import StripeFaultProxy

_WAIT_S = 10.0
_CUSTOMERS = "/v1/customers"
_INTENTS = "/v1/payment_intents"


@pytest.fixture
def proxy(localstripe: LocalStripe) -> Iterator[StripeFaultProxy]:
    with StripeFaultProxy(localstripe.url) as proxy:
        yield proxy


@pytest.fixture
def http(proxy: StripeFaultProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, auth=(API_KEY, ""), timeout=_WAIT_S) as client:
        yield client


def _sdk(url: str, retries: int = 0) -> stripe.StripeClient:
    return stripe.StripeClient(API_KEY, base_addresses={"api": url}, max_network_retries=retries)


def _customers_with_email(localstripe: LocalStripe, email: str) -> list[str]:
    customers = _sdk(localstripe.url).v1.customers.list({"limit": 100})
    return [c.id for c in customers.auto_paging_iter() if c.email == email]


def _email() -> str:
    return f"{uuid.uuid4().hex}@example.com"


def _key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def test_a_repeated_key_replays_the_first_answer_and_creates_nothing_upstream(
    proxy: StripeFaultProxy, http: httpx.Client, localstripe: LocalStripe
) -> None:
    email, key = _email(), _key()

    first = http.post(_CUSTOMERS, data={"email": email}, headers=key)
    again = http.post(_CUSTOMERS, data={"email": email}, headers=key)

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert _customers_with_email(localstripe, email) == [first.json()["id"]]
    assert proxy.forwarded(_CUSTOMERS) == 1
    assert proxy.replayed(_CUSTOMERS) == 1


def test_an_upstream_error_answer_is_replayed_too(
    proxy: StripeFaultProxy, http: httpx.Client
) -> None:
    key, body = _key(), {"email": _email()}
    first = http.post(f"{_CUSTOMERS}/cus_missing", data=body, headers=key)
    again = http.post(f"{_CUSTOMERS}/cus_missing", data=body, headers=key)

    assert first.status_code == again.status_code == 404
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert proxy.forwarded(_CUSTOMERS) == 1


def test_the_same_key_with_another_body_is_an_idempotency_error(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    client, key, other_email = _sdk(proxy.url), uuid.uuid4().hex, _email()
    client.v1.customers.create({"email": _email()}, {"idempotency_key": key})

    with pytest.raises(stripe.IdempotencyError) as raised:
        client.v1.customers.create({"email": other_email}, {"idempotency_key": key})

    assert raised.value.http_status == 400
    assert _customers_with_email(localstripe, other_email) == []
    assert proxy.forwarded(_CUSTOMERS) == 1


def test_requests_without_a_key_pass_through(
    proxy: StripeFaultProxy, http: httpx.Client, localstripe: LocalStripe
) -> None:
    email = _email()
    first = http.post(_CUSTOMERS, data={"email": email})
    second = http.post(_CUSTOMERS, data={"email": email})

    assert first.json()["id"] != second.json()["id"]
    assert sorted(_customers_with_email(localstripe, email)) == sorted(
        [first.json()["id"], second.json()["id"]]
    )
    assert proxy.forwarded(_CUSTOMERS, "POST") == 2
    assert proxy.replayed(_CUSTOMERS) == 0


def test_a_dropped_response_was_processed_and_its_retry_is_replayed(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    email = _email()
    proxy.drop_response_after_forwarding("POST", _CUSTOMERS)

    customer = _sdk(proxy.url, retries=2).v1.customers.create({"email": email})

    assert _customers_with_email(localstripe, email) == [customer.id]
    assert proxy.forwarded(_CUSTOMERS) == 1
    assert proxy.replayed(_CUSTOMERS) == 1


def test_a_dropped_response_ends_the_connection_without_an_answer(
    proxy: StripeFaultProxy, http: httpx.Client, localstripe: LocalStripe
) -> None:
    email = _email()
    proxy.drop_response_after_forwarding("POST", _CUSTOMERS)

    with pytest.raises(httpx.RemoteProtocolError):
        http.post(_CUSTOMERS, data={"email": email}, headers=_key())

    assert len(_customers_with_email(localstripe, email)) == 1


@pytest.mark.parametrize(
    ("inject", "error", "status", "error_type"),
    [
        ("status_500", stripe.APIError, 500, "api_error"),
        ("status_429", stripe.RateLimitError, 429, "invalid_request_error"),
    ],
)
def test_status_faults_answer_stripes_error_without_forwarding(
    proxy: StripeFaultProxy,
    localstripe: LocalStripe,
    inject: str,
    error: type[stripe.StripeError],
    status: int,
    error_type: str,
) -> None:
    email = _email()
    getattr(proxy, inject)("POST", _CUSTOMERS, times=2)
    client = _sdk(proxy.url)

    for _ in range(2):
        with pytest.raises(error) as raised:
            client.v1.customers.create({"email": email})
        assert raised.value.http_status == status
        body = raised.value.json_body
        assert isinstance(body, dict)
        assert body["error"]["type"] == error_type
    assert proxy.forwarded(_CUSTOMERS) == 0
    assert _customers_with_email(localstripe, email) == []

    customer = client.v1.customers.create({"email": email})
    assert _customers_with_email(localstripe, email) == [customer.id]
    assert proxy.forwarded(_CUSTOMERS) == 1


def test_faults_match_method_and_path_prefix_only(
    proxy: StripeFaultProxy, http: httpx.Client
) -> None:
    proxy.status_500("POST", "/v1/payment_intents")

    assert http.post(_CUSTOMERS, data={"email": _email()}).status_code == 200
    assert http.get("/v1/payment_intents").status_code == 200
    assert http.post("/v1/payment_intents", data={"amount": "1"}).status_code == 500
    assert http.post("/v1/payment_intents", data={"amount": "1"}).status_code != 500


def test_a_delayed_answer_times_the_caller_out_and_its_retry_is_replayed(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    email, key = _email(), _key()
    proxy.delay(2.0, "POST", _CUSTOMERS)

    with (
        httpx.Client(base_url=proxy.url, auth=(API_KEY, ""), timeout=0.2) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post(_CUSTOMERS, data={"email": email}, headers=key)

    # The SDK retries the 409 it gets while the first request is still in flight, then
    # receives the replay of the first answer.
    customer = _sdk(proxy.url, retries=5).v1.customers.create(
        {"email": email}, {"idempotency_key": key["Idempotency-Key"]}
    )

    assert _customers_with_email(localstripe, email) == [customer.id]
    assert proxy.forwarded(_CUSTOMERS) == 1
    assert proxy.replayed(_CUSTOMERS) == 1


def test_a_held_request_is_processed_upstream_and_answers_on_release(
    proxy: StripeFaultProxy, http: httpx.Client, localstripe: LocalStripe
) -> None:
    email, key = _email(), _key()
    proxy.hold("POST", _CUSTOMERS)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, _CUSTOMERS, data={"email": email}, headers=key)
        proxy.wait_until_held(_WAIT_S)

        assert len(_customers_with_email(localstripe, email)) == 1
        assert not pending.done()
        proxy.release()
        answer = pending.result(_WAIT_S)

    assert answer.status_code == 200
    assert _customers_with_email(localstripe, email) == [answer.json()["id"]]


def test_a_key_still_in_flight_gets_409_and_then_the_replay(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    email, key = _email(), _key()
    # A second proxy in front holds its request in flight while this one holds the answer.
    with (
        StripeFaultProxy(proxy.url) as front,
        httpx.Client(base_url=front.url, auth=(API_KEY, ""), timeout=_WAIT_S) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        proxy.hold("POST", _CUSTOMERS)
        pending = pool.submit(http.post, _CUSTOMERS, data={"email": email}, headers=key)
        proxy.wait_until_held(_WAIT_S)

        conflict = http.post(_CUSTOMERS, data={"email": email}, headers=key)
        assert conflict.status_code == 409
        assert conflict.json()["error"]["code"] == "idempotency_key_in_use"

        proxy.release()
        first = pending.result(_WAIT_S)
        again = http.post(_CUSTOMERS, data={"email": email}, headers=key)

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert _customers_with_email(localstripe, email) == [first.json()["id"]]
    assert front.forwarded(_CUSTOMERS) == 1


async def test_the_async_wait_lets_the_callers_event_loop_run(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    email = _email()
    proxy.hold("POST", _CUSTOMERS)
    async with httpx.AsyncClient(base_url=proxy.url, auth=(API_KEY, ""), timeout=_WAIT_S) as http:
        pending = asyncio.create_task(http.post(_CUSTOMERS, data={"email": email}, headers=_key()))
        await proxy.async_wait_until_held(_WAIT_S)
        assert len(_customers_with_email(localstripe, email)) == 1
        proxy.release()
        assert (await pending).status_code == 200


def test_wait_until_held_times_out_when_nothing_is_held(proxy: StripeFaultProxy) -> None:
    proxy.hold("POST", _CUSTOMERS)
    with pytest.raises(TimeoutError):
        proxy.wait_until_held(0.05)


def _customer(client: httpx.Client) -> str:
    created = client.post(_CUSTOMERS, data={"email": _email()})
    assert created.status_code == 200
    customer_id: str = created.json()["id"]
    return customer_id


def test_a_fault_for_one_customer_leaves_the_others_alone(
    proxy: StripeFaultProxy, http: httpx.Client
) -> None:
    troubled, other = _customer(http), _customer(http)
    proxy.status_500("POST", _CUSTOMERS, times=5, customer=troubled)

    path = f"{_CUSTOMERS}/{other}"
    assert http.post(path, data={"description": "x"}).status_code == 200
    assert http.post(_CUSTOMERS, data={"customer": other}).status_code == 400  # not a fault
    assert http.post(_CUSTOMERS, data={"customer": troubled}).status_code == 500


def test_a_500_after_forwarding_took_effect_and_its_retry_is_replayed(
    proxy: StripeFaultProxy, http: httpx.Client, localstripe: LocalStripe
) -> None:
    email, key = _email(), _key()
    proxy.status_500_after_forwarding("POST", _CUSTOMERS)

    failed = http.post(_CUSTOMERS, data={"email": email}, headers=key)
    again = http.post(_CUSTOMERS, data={"email": email}, headers=key)

    assert failed.status_code == 500
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert _customers_with_email(localstripe, email) == [again.json()["id"]]


def test_a_hang_outlasts_the_caller_and_never_answers(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    email, key = _email(), _key()
    proxy.hang(1.0, "POST", _CUSTOMERS)

    with httpx.Client(base_url=proxy.url, auth=(API_KEY, ""), timeout=0.2) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post(_CUSTOMERS, data={"email": email}, headers=key)
        proxy.wait_until_forwarded(_CUSTOMERS, "POST", 1, _WAIT_S)
    proxy.hang(0.2, "POST", _CUSTOMERS)
    with (
        httpx.Client(base_url=proxy.url, auth=(API_KEY, ""), timeout=_WAIT_S) as patient,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        patient.post(_CUSTOMERS, data={"email": email}, headers=key)

    assert len(_customers_with_email(localstripe, email)) == 1


def test_forgotten_keys_are_sent_upstream_again(
    proxy: StripeFaultProxy, http: httpx.Client
) -> None:
    customer = _customer(http)
    charge = {"amount": "500", "currency": "usd", "customer": customer}
    signup = {"email": _email()}
    charge_key, signup_key = _key(), _key()
    http.post(_INTENTS, data=charge, headers=charge_key)
    http.post(_CUSTOMERS, data=signup, headers=signup_key)

    proxy.forget_keys(customer=customer)  # only the keys of requests naming the customer
    http.post(_INTENTS, data=charge, headers=charge_key)
    http.post(_CUSTOMERS, data=signup, headers=signup_key)
    assert (proxy.forwarded(_INTENTS, "POST"), proxy.replayed(_CUSTOMERS, "POST")) == (2, 1)

    proxy.forget_keys()
    http.post(_CUSTOMERS, data=signup, headers=signup_key)
    assert proxy.forwarded(_CUSTOMERS, "POST") == 3  # the customer above, and twice this one


def test_payment_intents_are_listed_by_customer_and_creation_time(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    sdk = _sdk(proxy.url)
    mine, theirs = sdk.v1.customers.create({}).id, sdk.v1.customers.create({}).id
    for customer in (mine, theirs, mine):
        sdk.v1.payment_intents.create({"amount": 500, "currency": "usd", "customer": customer})

    listed = sdk.v1.payment_intents.list({"customer": mine, "limit": 1})
    every = list(listed.auto_paging_iter())
    later = sdk.v1.payment_intents.list(
        {"customer": mine, "created": {"gt": every[0].created + 10}}
    )

    assert len(listed.data) == 1
    assert listed.has_more
    assert [intent.customer for intent in every] == [mine, mine]
    assert len({intent.id for intent in every}) == 2
    assert later.data == []
