"""Outside tester: the env file as `set_flag` leaves it must read, in bash, as `read_flag` says (issue 21).

The writer ends a value where bash ends its word (`core/shellword.py`): backslash escapes, quotes and adjoining
words included; a line bash does not read as a plain assignment is rewritten whole; a value that goes on past its
line is refused. Every case is sourced by a real bash (in the test's own directory, so a command the line would run
shows as a file there).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from wiki_embeddings.core.readiness import ReadinessError, read_flag, set_flag
from wiki_embeddings.core.shellword import scan
from wiki_embeddings.settings import is_true

KEY = "WIKI_EMBEDDINGS_READY"


def _bash_value(path: Path) -> str:
    script = f'set -a; . "{path}" >/dev/null 2>&1; printf %s "${KEY}"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, check=False, cwd=path.parent)
    return done.stdout.decode("utf-8", "replace")  # bytes: text mode would turn a kept CR into a newline


@pytest.mark.parametrize("line", [b"WIKI_EMBEDDINGS_READY=false\\ x\n", b'WIKI_EMBEDDINGS_READY="a"b\n'])
def test_bash_reads_what_set_flag_wrote(tmp_path, line):
    env = tmp_path / "env"
    env.write_bytes(line)
    set_flag(env, True)
    assert read_flag(env) is True
    assert _bash_value(env) == "true", env.read_bytes()
    assert env.read_bytes() == b"WIKI_EMBEDDINGS_READY=true\n", "the whole word is replaced, nothing of it is left"


K = b"WIKI_EMBEDDINGS_READY"
CASES = [
    # (before, after): plain assignments keep everything but the word
    (K + b"=false # note\n", K + b"=true # note\n"),
    (K + b"=false\\ x # note\n", K + b"=true # note\n"),
    (K + b"='a'\"b\"c\t# mixed words\n", K + b"=true\t# mixed words\n"),
    (K + b'="fa\\"lse" # escaped quote\n', K + b'="true" # escaped quote\n'),
    (K + b"='false'   \n", K + b"='true'   \n"),
    (K + b"=false   \n", K + b"=true   \n"),
    (b"export " + K + b"=false\\ x #c\n", b"export " + K + b"=true #c\n"),
    (b"  export\t" + K + b'="false"\n', b"  export\t" + K + b'="true"\n'),
    (K + b"=false\\ x\r\nA=1\r\n", K + b"=true\r\nA=1\r\n"),
    (K + b'="a"b # c\r\n', K + b"=true # c\r\n"),
    (K + b"=a#b\n", K + b"=true\n"),
    (K + b"=  # empty, a comment\n", K + b"=true  # empty, a comment\n"),
    # not plain assignments in bash: rewritten whole (export and CR kept), nothing of them runs afterwards
    (K + b"= touch RAN\n", K + b"=true\n"),
    (K + b"=false touch RAN # c\n", K + b"=true\n"),
    (K + b"=false;touch RAN\n", K + b"=true\n"),
    (K + b"=false&&touch RAN\r\n", K + b"=true\r\n"),
    (K + b"=$(touch RAN)\n", K + b"=true\n"),
    (K + b'="`touch RAN`"\n', K + b"=true\n"),
    (K + b"=~\n", K + b"=true\n"),
    (b"export " + K + b" =false\n", b"export " + K + b"=true\n"),
    (K + b"=$X\nB=2\n", K + b"=true\nB=2\n"),
]


@pytest.mark.parametrize(("before", "after"), CASES)
def test_set_flag_leaves_a_line_bash_reads_as_read_flag_says(tmp_path, before, after):
    env = tmp_path / "env"
    env.write_bytes(b"A=0\n" + before)
    set_flag(env, True)
    assert env.read_bytes() == b"A=0\n" + after
    assert read_flag(env) is True
    assert _bash_value(env).rstrip("\r") == "true", "bash keeps a CRLF line's CR in a bare value; nothing else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env"], "sourcing the file ran nothing"
    set_flag(env, False)
    assert read_flag(env) is False and _bash_value(env).rstrip("\r") == "false"


PLAIN = [
    b"=true",
    b"=false\\ x",
    b"='tr'ue",
    b'="tr\\ue"',
    b'="t"r"u"e',
    b"=tr\\ue",
    b"=\\true",
    b"= # c",
    b"='true # x'",
    b"=yes\t#c",
]


@pytest.mark.parametrize("value", PLAIN)
def test_read_flag_reads_a_plain_line_as_bash_does(tmp_path, value):
    env = tmp_path / "env"
    env.write_bytes(K + value + b"\n")
    assert scan(value[1:]).plain
    assert read_flag(env) is is_true(_bash_value(env))


@pytest.mark.parametrize("value", [b"=true;", b"=true x", b"= true", b"=$T", b"=~"])
def test_a_line_bash_would_have_to_run_is_never_read_as_true(tmp_path, value):
    env = tmp_path / "env"
    env.write_bytes(b"T=true\n" + K + value + b"\n")
    assert read_flag(env) is False


@pytest.mark.parametrize("line", [K + b"='false\nx'\n", K + b'="fa\nlse"\n', K + b"=false\\\nx\n"])
def test_a_value_that_goes_on_past_its_line_is_refused_and_the_file_kept(tmp_path, line):
    env = tmp_path / "env"
    env.write_bytes(line)
    with pytest.raises(ReadinessError, match="goes on past the line") as refused:
        set_flag(env, True)
    assert env.read_bytes() == line and "\n" not in str(refused.value)
