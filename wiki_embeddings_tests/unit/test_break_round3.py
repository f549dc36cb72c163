"""Outside tester, round three (issues 21 and 23): what the env-file writer, redaction and settings promise, broken
as production would. Each test states the promise; a defect not fixed here is `xfail(strict=True)` naming its cause.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wiki_embeddings.core import readiness
from wiki_embeddings.core.readiness import ReadinessError, read_flag, set_flag, set_value

pytestmark = pytest.mark.unit

K = b"WIKI_EMBEDDINGS_READY"


def _source(path: Path) -> tuple[str, str]:
    """(value, stderr) of the flag after bash sources the file in its own directory (a command shows as a file)."""
    script = f'. "{path}"; printf %s "${{{K.decode()}-unset}}"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, check=False, cwd=path.parent)
    return done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


# Statements that open on the flag's line and go on past it, in bash: rewriting that one line would leave the rest
# of the statement (the body of a quote, a substitution, a here-document, a compound command) to run as commands.
GOES_ON = [
    K + b"=$'no\\'\ntouch RAN\n'\n",  # ANSI-C quoting: \' escapes the quote, the string goes on
    K + b"=false <<EOF\ntouch RAN\nEOF\n",  # a here-document's body
    K + b"=false; cat <<'E' >/dev/null\ntouch RAN\nE\n",
    K + b"=$(: '\ntouch RAN\n')\n",  # a command substitution over lines
    K + b"=`: '\ntouch RAN\n'`\n",
    K + b"=$(: # '\n)\n",  # a comment inside a substitution hides the quote
    K + b"=$((1+\n2))\n",
    K + b"=(a\nb)\n",  # an array
    K + b"=false && {\ntouch RAN\n}\n",  # a compound command
    K + b"=false; if true; then\ntouch RAN\nfi\n",
    K + b"=false &&\ntouch RAN\n",  # a trailing operator
    K + b"=false |\ncat\n",
]


@pytest.mark.parametrize("text", GOES_ON)
def test_a_statement_going_on_past_the_flag_line_is_refused_and_nothing_runs(tmp_path, text):
    """Issue 21 / readiness.set_value: a value that goes on past its line is refused (nothing written), since
    rewriting one line would leave the rest to run. Fixed: `shellword._continues` (the scanner knew quotes only)."""
    env = tmp_path / "env"
    env.write_bytes(text)
    with pytest.raises(ReadinessError, match="goes on past"):
        set_flag(env, True)
    assert env.read_bytes() == text
    assert read_flag(env) is not True


@pytest.mark.parametrize(
    ("line", "after"),
    [
        (K + b"=$(echo a)\n", K + b"=true\n"),
        (K + b"=false <<< x\n", K + b"=true\n"),
        (K + b"=false | cat # a comment with ( and '\n", K + b"=true\n"),
        (K + b"=\"$(echo ')')\"\n", K + b"=true\n"),
        (K + b"=${X:-a}b\n", K + b"=true\n"),
    ],
)
def test_a_one_line_statement_is_still_rewritten_whole(tmp_path, line, after):
    """The refusal above is no wider than needed: a one-line non-plain statement is rewritten whole, as before."""
    env = tmp_path / "env"
    env.write_bytes(line + b"B=1\n")
    set_flag(env, True)
    assert env.read_bytes() == after + b"B=1\n"
    assert _source(env)[0] == "true"


def test_a_flag_behind_a_bom_is_what_bash_reads(tmp_path):
    env = tmp_path / "env"
    env.write_bytes(b"\xef\xbb\xbf" + K + b"=false\n")
    set_flag(env, True)
    assert read_flag(env) is True
    assert _source(env)[0] == "true", env.read_bytes()


def test_a_readonly_flag_is_not_reported_true_when_bash_keeps_it_false(tmp_path):
    env = tmp_path / "env"
    env.write_bytes(b"readonly " + K + b"=false\n")
    set_flag(env, True)
    assert read_flag(env) is (_source(env)[0] == "true")


_OTHER_WRITER = """
import sys
from wiki_embeddings.core.readiness import set_value
print("ready", flush=True)
sys.stdin.readline()
set_value(sys.argv[1], "WIKI_EMBEDDINGS_MODEL", "m2")
"""


def test_two_writers_at_once_lose_no_write(tmp_path, monkeypatch):
    """Two processes set two keys at once (the readiness sensor and the after-swap sensor): both lines survive.
    Fixed: set_value read, changed and replaced the file with no lock, so the later replace dropped the other's line."""
    env = tmp_path / "env"
    env.write_bytes(b"A=1\n")
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_WRITER, str(env)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert other.stdout is not None and other.stdin is not None
    assert other.stdout.readline().strip() == "ready"
    real = readiness._atomic_write

    def write_late(path, data, st):
        """Between our read and our replace the other process writes (or waits for our lock)."""
        other.stdin.write("go\n")
        other.stdin.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):  # it waits for the lock we hold
            other.wait(timeout=1.5)
        real(path, data, st)

    monkeypatch.setattr(readiness, "_atomic_write", write_late)
    set_flag(env, True)
    monkeypatch.setattr(readiness, "_atomic_write", real)
    assert other.wait(timeout=20) == 0
    text = env.read_bytes()
    assert b"WIKI_EMBEDDINGS_READY=true\n" in text and b"WIKI_EMBEDDINGS_MODEL=m2\n" in text, text


def test_an_operators_edit_between_read_and_replace_is_kept(tmp_path, monkeypatch):
    """An operator saves the file while the sensor writes: their line stays and the flag is set."""
    env = tmp_path / "env"
    env.write_bytes(b"A=1\n" + K + b"=false\n")
    real = readiness._with_value
    calls = []

    def edit_meanwhile(p, data, key, wanted):
        if not calls:
            env.write_bytes(b"A=1\n" + K + b"=false\nOPERATOR=added\n")  # in place, as many editors save
        calls.append(1)
        return real(p, data, key, wanted)

    monkeypatch.setattr(readiness, "_with_value", edit_meanwhile)
    set_flag(env, True)
    assert env.read_bytes() == b"A=1\n" + K + b"=true\nOPERATOR=added\n"


def test_set_value_keeps_a_very_long_line_and_binary_bytes(tmp_path):
    """Every other byte kept: a 2 MB line of odd bytes and a NUL survive a write, quickly."""
    env = tmp_path / "env"
    junk = b"X='" + bytes(range(1, 39)) * 50_000 + b"'\n"  # no quote (39) inside
    env.write_bytes(junk + b"B=\x00\xff\n" + K + b"=false\n")
    set_value(env, "WIKI_EMBEDDINGS_READY", "true")
    assert env.read_bytes() == junk + b"B=\x00\xff\n" + K + b"=true\n"


# ---------------------------------------------------------------------------- secrets (README "Secrets in messages")
SECRET = "Sekr3tPw9x"
LEAKY_URLS = [
    # a password with an unescaped / ? # (it should be percent-encoded): a URL parser ends the authority early
    ("DATABASE_URL", f"postgresql://u:{SECRET[:6]}/{SECRET[6:]}@127.0.0.1:1/db"),
    ("DATABASE_URL", f"postgresql://u:{SECRET[:6]}#{SECRET[6:]}@127.0.0.1:1/db"),
    ("DATABASE_URL", f"postgresql://u:{SECRET[:6]}?{SECRET[6:]}@127.0.0.1:1/db"),
    ("DATABASE_URL", f"host=127.0.0.1 port=1 user=u password={SECRET}"),  # libpq's key=value form
    ("DATABASE_URL", f"host=127.0.0.1 port=1 user=u password = '{SECRET[:6]} {SECRET[6:]}'"),
    ("OLLAMA_URL", f"http://u:{SECRET[:6]}/{SECRET[6:]}@127.0.0.1:11434"),
    ("OLLAMA_URL", f"http://u:{SECRET[:6]}#{SECRET[6:]}@127.0.0.1:11434"),
]


@pytest.mark.parametrize(("var", "url"), LEAKY_URLS)
def test_config_and_errors_never_show_a_password_written_oddly(var, url):
    """`config` prints the effective settings "secrets masked", and an error is one redacted line: no part of the
    password shows. Fixed: mask_url handled URLs whose authority a parser could read (a key=value DSN and a
    password holding / ? # were printed whole), and check_http_url quoted the parser's reason (the password as a
    port); url_secrets also reads the user-info up to the last `@`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OLLAMA_URL")}
    env.update({"DATABASE_URL": "postgresql://x@127.0.0.1:1/db", "OLLAMA_URL": "http://127.0.0.1:9", var: url})
    for args in (["config"], ["backfill", "--dry-run"]):
        done = subprocess.run(
            [sys.executable, "-m", "wiki_embeddings.cli", *args], capture_output=True, text=True, env=env, timeout=60
        )
        out = done.stdout + done.stderr
        assert SECRET[:6] not in out and SECRET[6:] not in out, out
        assert "Traceback" not in out


@pytest.mark.parametrize("url", [url for _, url in LEAKY_URLS])
def test_url_secrets_name_the_whole_password(url):
    """What redact() is given holds the password as written, so a message quoting it whole is redacted."""
    from wiki_embeddings.settings import redact, url_secrets

    if "password = '" in url:
        whole = f"{SECRET[:6]} {SECRET[6:]}"
    else:
        whole = SECRET if "password=" in url else url.split("u:", 1)[1].rsplit("@", 1)[0]
    assert redact(f'error near "{whole}" here', url_secrets(url)) == 'error near "***" here'


@pytest.mark.parametrize("value", ["99999999999999999999", "9223372037", "+9300000000"])
def test_keep_alive_seconds_past_gos_longest_duration_are_refused(value):
    """Keep-alive is checked as Ollama parses it: Ollama turns a number of seconds into an int64 of nanoseconds,
    as it does a duration string, which is refused past about 292 years. Fixed: a whole number was never bounded
    (checks.keep_alive_problem returned None for any digits)."""
    from wiki_embeddings.checks import keep_alive_problem

    assert keep_alive_problem(value) is not None
    assert keep_alive_problem("9223372036") is None and keep_alive_problem("-99999999999999999999") is None


@pytest.mark.parametrize(
    ("var", "raw"), [("WIKI_EMBED_NUM_CTX", "6_4"), ("WIKI_EMBED_DB_STATEMENT_TIMEOUT_SEC", "1_0.5")]
)
def test_a_number_with_underscores_is_refused_naming_the_variable(var, raw):
    """Settings: numbers in ASCII digits only. Fixed: Python's int()/float() read `6_4` as 64 (checks.parse_number
    checked the script, not the underscores)."""
    from wiki_embeddings.settings import from_env

    with pytest.raises(ValueError, match=var):
        from_env({var: raw})
