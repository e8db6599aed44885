"""The shell sessions of a Markdown file, as tests/test_readme.py runs them.

A session is a fenced block whose info string is `console tested` (GitHub highlights it as a
console session and ignores the second word), optionally followed by the name of what it needs
running besides the billing service (`console tested example`):

    ```console tested
    # A comment line: not run, not output.
    $ grpcurl -plaintext -d '{"tenant_id": "acme",
        "model": "gpt-4o"}' localhost:50051 billing.v1.BillingService/CheckAccess
    {
      "decision": { ... }
    }
    $ billingctl tenants create globex     (no output shown: only its success is checked)
    ```

A command starts at `$ ` and goes on over the next lines while a quote is open or a line ends
with a backslash, as in a shell. Its shown output is every line after it up to the next command
or comment line; an empty output means the output is not shown, and the command must succeed.
A shown output is compared with what the command printed (stdout, then stderr), line by line
without trailing spaces, once the volatile parts are made to agree (see `Masks`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "tested"
_FENCE = re.compile(r"^```(\S*)(.*)$")


@dataclass(frozen=True)
class Command:
    line: int  # 1-based, in the Markdown file
    text: str  # as a shell reads it: continuation lines joined by newlines
    output: str  # as shown; "" when the session does not show it


@dataclass(frozen=True)
class Session:
    line: int
    needs: tuple[str, ...]
    commands: tuple[Command, ...]


def sessions(path: Path) -> list[Session]:
    """The tested sessions of `path`, in order."""
    found = []
    for start, info, body in _fenced_blocks(path.read_text()):
        words = info.split()
        if words[:2] == ["console", MARKER]:
            found.append(Session(start, tuple(words[2:]), tuple(_commands(start, body))))
    return found


def untested_sessions(path: Path) -> list[int]:
    """Lines of the blocks that look like shell sessions (a `$ ` prompt) but are not tested."""
    return [
        start
        for start, info, body in _fenced_blocks(path.read_text())
        if info.split()[:2] != ["console", MARKER] and any(line.startswith("$ ") for line in body)
    ]


def _fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line of the opening fence, info string, lines inside) of every fenced block."""
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index].strip()) if lines[index].startswith("```") else None
        if opening is None:
            index += 1
            continue
        start, info, body = index + 1, (opening.group(1) + opening.group(2)).strip(), []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        blocks.append((start, info, body))
        index += 1
    return blocks


def _commands(start: int, body: list[str]) -> list[Command]:
    commands: list[Command] = []
    index = 0
    while index < len(body):
        line = body[index]
        if not line.startswith("$ "):
            if line.strip() and not line.startswith("#"):
                raise ValueError(f"line {start + index + 1}: output before any command: {line!r}")
            index += 1
            continue
        first = start + index + 1
        text = line.removeprefix("$ ")
        while _continues(text):
            index += 1
            if index == len(body):
                raise ValueError(f"line {first}: the command never ends")
            text += "\n" + body[index]
        index += 1
        output = []
        while index < len(body) and not body[index].startswith(("$ ", "# ")):
            output.append(body[index].rstrip())
            index += 1
        commands.append(Command(first, text, "\n".join(output).strip("\n")))
    return commands


def _continues(text: str) -> bool:
    if text.endswith("\\"):
        return True
    try:
        shlex.split(text, comments=True)
    except ValueError:  # "No closing quotation"
        return True
    return False


@dataclass
class Masks:
    """Makes a shown output and a real one agree on what changes from run to run.

    Reservation ids are mapped: the n-th id shown is the n-th id printed, and the shown id is
    replaced by the real one in the commands that follow (a Commit of the reservation above).
    Times and dates are masked.
    """

    ids: dict[str, str] = field(default_factory=dict)

    MAPPED = re.compile(r"rsv_[0-9a-f]{32}")
    MASKED = (
        (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"), "<time>"),
        (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), "<time>"),
        (re.compile(r"\d{4}-\d\d-\d\d"), "<date>"),
    )

    def command(self, text: str) -> str:
        """The command with the ids learnt so far replaced by the real ones."""
        return self.MAPPED.sub(lambda m: self.ids.get(m.group(0), m.group(0)), text)

    def agree(self, shown: str, printed: str) -> tuple[str, str]:
        """Both outputs, masked; learns the ids `shown` names for the next commands."""
        for shown_id, printed_id in zip(
            self.MAPPED.findall(shown), self.MAPPED.findall(printed), strict=False
        ):
            self.ids.setdefault(shown_id, printed_id)
        shown = self.command(shown)
        for pattern, mask in self.MASKED:
            shown, printed = pattern.sub(mask, shown), pattern.sub(mask, printed)
        return shown, printed
