"""What a start without Stripe loads: the service imports the Stripe SDK and aiohttp (a third
of its start-up imports) only when a Stripe key or the webhook port asks for them."""

from __future__ import annotations

import subprocess
import sys


def test_serving_without_stripe_imports_neither_the_stripe_sdk_nor_aiohttp() -> None:
    probe = (
        "import sys, billing_service.app, billing_service.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'stripe', 'aiohttp'}))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert loaded.stdout.strip() == "[]"
