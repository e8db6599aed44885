"""The app's settings, from the environment (CHAT_*)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatSettings:
    billing_target: str = "localhost:50051"
    """host:port of the billing service."""
    billing_token: str | None = None
    """Bearer token of the chat-service role, when the billing service requires one."""
    billing_timeout_s: float = 2.0
    """Deadline of one billing call attempt; the client tries up to `billing_attempts` times."""
    billing_attempts: int = 3
    check_access_first: bool = True
    """Ask CheckAccess before reserving: a denied user gets a 402 without a hold being taken.
    The reservation decides in any case; this only answers denials a little cheaper."""
    fail_open_models: frozenset[str] = field(default_factory=frozenset)
    """Models served without billing while the billing service is unreachable. Empty (the
    default): every model fails closed with 503. List only models you do not charge for
    (included ones): their usage while billing is down is logged, not recorded."""
    hold_ttl_s: float = 120.0
    """How long a hold lives if this process dies before committing: the model call's
    longest duration plus margin."""
    stream_chunk_tokens: int = 256
    """POST /chat/stream: the output tokens its first hold covers, and each extension adds
    while the answer streams (instead of holding `max_tokens` up front)."""
    billing_page_token: str | None = None
    """Bearer token of the product-backend role, for the billing page's reads and card
    changes (the chat-service role may not call them); unset: `billing_token`."""
    stripe_publishable_key: str = ""
    """Stripe's publishable key (`pk_...`) for the card form; empty: the billing page shows
    the card on file but offers no form."""
    stripe_js_url: str = "https://js.stripe.com/v3/"
    """Where the page loads Stripe.js from; a localstripe serves a test one at
    `http://127.0.0.1:8420/js.stripe.com/v3/`."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ChatSettings:
        models = env.get("CHAT_FAIL_OPEN_MODELS", "")
        return cls(
            billing_target=env.get("CHAT_BILLING_TARGET", cls.billing_target),
            billing_token=env.get("CHAT_BILLING_TOKEN") or None,
            billing_timeout_s=float(env.get("CHAT_BILLING_TIMEOUT_S", cls.billing_timeout_s)),
            billing_attempts=int(env.get("CHAT_BILLING_ATTEMPTS", cls.billing_attempts)),
            check_access_first=env.get("CHAT_CHECK_ACCESS_FIRST", "true").lower() != "false",
            fail_open_models=frozenset(m.strip() for m in models.split(",") if m.strip()),
            hold_ttl_s=float(env.get("CHAT_HOLD_TTL_S", cls.hold_ttl_s)),
            stream_chunk_tokens=int(env.get("CHAT_STREAM_CHUNK_TOKENS", cls.stream_chunk_tokens)),
            billing_page_token=env.get("CHAT_BILLING_PAGE_TOKEN") or None,
            stripe_publishable_key=env.get("CHAT_STRIPE_PUBLISHABLE_KEY", ""),
            stripe_js_url=env.get("CHAT_STRIPE_JS_URL") or cls.stripe_js_url,
        )
