"""Entry point of `billingctl` and of `python -m billing.ctl`."""

from __future__ import annotations

import os
import signal
import sys

from billing.ctl.cli import run


def main() -> None:
    # A reader that went away (`billingctl ... | head -1`) ends the command as it ends any Unix
    # tool: by SIGPIPE, silently (Python ignores the signal and raises BrokenPipeError instead).
    # gRPC sends on its sockets with MSG_NOSIGNAL, so only writes to stdout / stderr raise it.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # Where there is no SIGPIPE: the same, by hand. Python would report the failed flush of
        # stdout at exit, so stdout is pointed at the null device first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
