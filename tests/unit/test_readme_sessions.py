"""How tests/test_readme.py reads a README session: commands over several lines, outputs,
comments, untested sessions, and the masks that make two runs agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.readme_sessions import Masks, sessions, untested_sessions

README = """# Title

```console tested
# a comment
$ grpcurl -d '{"a": 1,
    "b": 2}' \\
    localhost:50051 x.Y/Z
{
  "id": "rsv_00000000000000000000000000000001"
}

$ billingctl tenants create globex
$ echo "a # not a comment"
a # not a comment
```

```sh
./scripts/serve
```

```console tested example
$ curl -s localhost:8000/chat
{"ok": true}
```

```sh
$ grpcurl list
```
"""


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(README)
    return path


def test_commands_outputs_and_comments(readme: Path) -> None:
    first, second = sessions(readme)
    assert (first.line, first.needs, second.needs) == (3, (), ("example",))
    grpcurl, create, echo = first.commands
    assert grpcurl.line == 5
    assert grpcurl.text.splitlines() == [
        """grpcurl -d '{"a": 1,""",
        """    "b": 2}' \\""",
        "    localhost:50051 x.Y/Z",
    ]
    assert grpcurl.output == '{\n  "id": "rsv_00000000000000000000000000000001"\n}'
    assert (create.text, create.output) == ("billingctl tenants create globex", "")
    assert echo.output == "a # not a comment"
    assert second.commands[0].output == '{"ok": true}'


def test_a_session_that_is_not_marked_tested_is_found(readme: Path) -> None:
    assert untested_sessions(readme) == [26]


def test_ids_shown_are_mapped_to_the_ids_printed_and_times_masked() -> None:
    masks = Masks()
    shown_id, real_id = "rsv_" + "a" * 32, "rsv_" + "b" * 32
    shown, printed = masks.agree(
        f'"{shown_id}" at 2026-11-24T15:02:18.749849Z, 2026-11-24 15:02:18 on 2026-11-24',
        f'"{real_id}" at 2027-01-05T00:00:00Z, 2027-01-05 00:00:00 on 2027-01-05',
    )
    assert shown == printed == f'"{real_id}" at <time>, <time> on <date>'
    assert masks.command(f"billingctl refund {shown_id}") == f"billingctl refund {real_id}"
    different, printed = masks.agree('"allowed": true', '"allowed": false')
    assert different != printed
