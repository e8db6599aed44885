"""Starts the billing service (SQLite, as a child process), sets up a demo tenant, and serves
the chat app on top of it until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
import uvicorn

from billing.client import BillingClient
from billing.v1 import admin_pb2
from examples.chat_app.app import create_app
from examples.chat_app.settings import ChatSettings
from examples.chat_app.stripe_emulator import start_localstripe

_READY_TIMEOUT_S = 60.0

_TRY = """
The chat app is on http://{host}:{port} (billing on {billing}). Try:

  # acme has a card on file and $1 of credit: gpt-4o is metered, gpt-4o-mini included.
  curl -s localhost:{port}/chat -H 'content-type: application/json' \\
    -d '{{"tenant_id": "acme", "user_id": "alice", "model": "gpt-4o", "prompt": "hello there"}}'
  # An unknown tenant is created without a card: a metered model is a 402.
  curl -s localhost:{port}/chat -H 'content-type: application/json' \\
    -d '{{"tenant_id": "newco", "user_id": "bob", "model": "gpt-4o", "prompt": "hi"}}'
  # A prompt starting with /fail makes the model fail: 502, and the hold is released.
  .venv/bin/billingctl --target {billing} summary acme

The billing page of acme, as its admin sees it: http://{host}:{port}/billing/acme
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the chat app's HTTP port")
    parser.add_argument("--billing-port", type=int, default=50051)
    parser.add_argument(
        "--data-dir", type=Path, help="where the SQLite file goes (default: a new temporary one)"
    )
    parser.add_argument(
        "--localstripe",
        action="store_true",
        help="card payments through localstripe, a local Stripe emulator: the billing page's "
        "card form then works offline (test card 4242424242424242)",
    )
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="chat-example-"))
    target = f"127.0.0.1:{args.billing_port}"
    stripe = start_localstripe() if args.localstripe else None
    try:
        billing = start_billing(data_dir, target, stripe.billing_env if stripe else {})
        try:
            set_up_demo_tenant(target)
            app_env = {"CHAT_BILLING_TARGET": target, **(stripe.app_env if stripe else {})}
            settings = ChatSettings.from_env({**os.environ, **app_env})
            print(_TRY.format(host=args.host, port=args.port, billing=target), file=sys.stderr)
            uvicorn.run(create_app(settings), host=args.host, port=args.port)
        finally:
            billing.terminate()
            billing.wait(30)
    finally:
        if stripe is not None:
            stripe.stop()


def start_billing(
    data_dir: Path, target: str, stripe_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(stripe_env)
    env["BILLING_DATABASE_URL"] = f"sqlite+aiosqlite:///{data_dir / 'billing.db'}"
    env["BILLING_LISTEN_ADDRESS"] = target
    process = subprocess.Popen(
        [sys.executable, "-m", "billing_service.cli", "serve"], env=env, stdin=subprocess.DEVNULL
    )
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=_READY_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            process.kill()
            raise SystemExit(f"the billing service did not start on {target}") from None
    return process


def set_up_demo_tenant(target: str) -> None:
    with BillingClient(target) as client:
        try:
            client.admin.CreateTenant(
                admin_pb2.CreateTenantRequest(
                    request_id="demo-acme", tenant_id="acme", payment_method_on_file=True
                ),
                timeout=10,
            )
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return  # an earlier run set it up (--data-dir)
        client.admin.GrantCredit(
            admin_pb2.GrantCreditRequest(
                request_id=str(uuid.uuid4()),
                tenant_id="acme",
                amount_micros=1_000_000,
                reason="example credit",
            ),
            timeout=10,
        )


if __name__ == "__main__":
    main()
