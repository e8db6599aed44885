"""Entry point of `billingctl` and of `python -m billing.ctl`."""

from __future__ import annotations

import sys

from billing.ctl.cli import run


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
