"""Page tokens: a position round-trips; a token is refused with other filters or when forged."""

from __future__ import annotations

import pytest

from billing_service.domain.errors import InvalidArgument
from billing_service.domain.page_tokens import (
    filters_fingerprint,
    make_page_token,
    read_page_token,
)


def test_a_position_round_trips_with_the_same_filters() -> None:
    filters = filters_fingerprint(tenant_id="acme", scope="user")
    token = make_page_token(filters, ["user", "ann"])
    assert read_page_token(token, filters_fingerprint(scope="user", tenant_id="acme")) == [
        "user",
        "ann",
    ]
    assert read_page_token("", filters) is None


def test_a_token_made_for_other_filters_is_refused() -> None:
    token = make_page_token(filters_fingerprint(tenant_id="acme"), ["x"])
    with pytest.raises(InvalidArgument, match="other filters") as raised:
        read_page_token(token, filters_fingerprint(tenant_id="globex"))
    assert raised.value.field == "page_token"


@pytest.mark.parametrize("token", ["not-a-token!", "eyJmIjoxfQ", "W10"])
def test_a_token_this_service_did_not_make_is_refused(token: str) -> None:
    with pytest.raises(InvalidArgument, match="not a token") as raised:
        read_page_token(token, filters_fingerprint())
    assert raised.value.field == "page_token"
