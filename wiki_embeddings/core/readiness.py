"""The runbook's "Done when" step: set `WIKI_EMBEDDINGS_READY=true` in the backend's env file, then restart it.

Plain Python (no Dagster import) so the rule is testable on its own and any front end can use it:

- `assess(figures)`: THE readiness decision, from the database's figures alone (status runs under a read-only
  role; no HTTP): missing=0, coverage_pct=100.00, stale_model=0, and no blocking drift verdict (`model_changed`
  or `mismatch` from the last `verify` or drift check, cleared by a later `match`, a re-embed or a swap:
  `core/verify.py`, `drift_figures`). `status --check`, the Dagster check `missing_is_zero` and the readiness
  sensor all call it; the reason it gives is what they print.
- `decide(...)`: given the latest *completed* evaluation of the coverage check, the latest coverage
  materialization, what was handled already and the flag's current value, say what to do. It never flips
  the flag on a failed, missing or stale evaluation (stale: older than the latest coverage materialization,
  or aimed at an older one), and acts once per evaluation.
- `set_flag(...)`: rewrite one `KEY=value` line atomically (temp file in the same directory, fsync,
  `os.replace`), keeping every other byte (lines split on b"\n" only, as the shell does: comments, line
  endings, a BOM, undecodable bytes), the file's mode (and owner when root), and refusing a symlink at the
  path. A file that cannot be written is a `ReadinessError` naming the path and the reason.
- `run_restart(...)`: the operator's optional backend-restart command, bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import stat
import subprocess
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from wiki_embeddings.checks import POSITIVE_SECONDS, UNPRINTABLE, check_number, choice_word, one_line, parse_number
from wiki_embeddings.core.shellword import ShellWord, scan
from wiki_embeddings.settings import is_true

READY_KEY = "WIKI_EMBEDDINGS_READY"
#: Written next to the flag after a model swap: the model the backend must embed queries with.
MODEL_KEY = "WIKI_EMBEDDINGS_MODEL"
DEFAULT_ENV_FILE = ".env.beta"
POLICIES = ("keep", "unset")
NEW_FILE_MODE = 0o600  # an env file may hold secrets

ENV_VARS = {
    "env_file": "WIKI_EMBEDDINGS_ENV_FILE",
    "restart_cmd": "WIKI_EMBEDDINGS_RESTART_CMD",
    "on_regression": "WIKI_EMBEDDINGS_READY_ON_REGRESSION",
    "restart_timeout_sec": "WIKI_EMBEDDINGS_RESTART_TIMEOUT_SEC",
}


class ReadinessError(RuntimeError):
    """The env file cannot be changed safely (a symlink, not a regular file, unreadable...)."""


@dataclass(frozen=True)
class ReadinessSettings:
    env_file: str = DEFAULT_ENV_FILE
    restart_cmd: str = ""
    on_regression: str = "keep"  # keep | unset
    restart_timeout_sec: float = 45.0  # a sensor tick has about 60 s in all

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ReadinessSettings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[name] = _restart_timeout(var, raw) if name == "restart_timeout_sec" else raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()  # type: ignore[arg-type]

    def __post_init__(self) -> None:  # a choice is read in any case, from the environment or Dagster alike
        object.__setattr__(self, "on_regression", choice_word(self.on_regression))

    def validate(self) -> ReadinessSettings:
        if self.on_regression not in POLICIES:
            raise ValueError(
                f"{ENV_VARS['on_regression']} must be one of {', '.join(POLICIES)}, got {self.on_regression!r}"
            )
        check_number(ENV_VARS["restart_timeout_sec"], self.restart_timeout_sec, POSITIVE_SECONDS)
        if not self.env_file:
            raise ValueError(f"{ENV_VARS['env_file']} is empty")
        return self

    @property
    def env_path(self) -> Path:
        """Absolute path (a relative one is taken from the current directory: say which in every log line)."""
        return Path(os.path.abspath(os.path.expanduser(self.env_file)))


def _restart_timeout(var: str, raw: str) -> float:
    try:
        return float(parse_number(float, raw))  # ASCII digits only
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a number of seconds") from None


# ---------------------------------------------------------------------------- readiness of the vectors
#: Drift verdicts that keep the vectors from being called ready until cleared.
BLOCKING_DRIFT = ("model_changed", "mismatch")


@dataclass(frozen=True)
class Readiness:
    """`ready` and why (one line); `blocker` names the first condition that failed ("" when ready)."""

    ready: bool
    reason: str
    blocker: str = ""  # empty_table | missing | coverage | stale_model | drift


def assess(figures: Mapping[str, object]) -> Readiness:
    """The one readiness rule. `figures`: total, missing, coverage_pct, stale_model (as `status` reports them) and
    drift_verdict (the standing drift verdict, "" when none; drift_at and drift_detail say when and what)."""
    total, missing, coverage = int(str(figures["total"])), int(str(figures["missing"])), figures["coverage_pct"]
    coverage = f"{coverage:.2f}" if isinstance(coverage, float) else str(coverage)  # Dagster metadata: a float
    stale = int(str(figures.get("stale_model") or 0))
    drift = str(figures.get("drift_verdict") or "")
    if total == 0:
        return Readiness(False, "the chunk table is empty: nothing to call ready", "empty_table")
    if missing:
        return Readiness(False, f"missing={missing}: chunks without a vector (coverage_pct={coverage})", "missing")
    if coverage != "100.00":
        return Readiness(False, f"coverage_pct={coverage}, not 100.00", "coverage")
    if stale:
        return Readiness(
            False,
            f"stale_model={stale}: embeddings made by another model than the live one; re-embed them through "
            "`wiki-embeddings migrate-model`",
            "stale_model",
        )
    if drift in BLOCKING_DRIFT:
        at = f" at {figures['drift_at']}" if figures.get("drift_at") else ""
        detail = f": {figures['drift_detail']}" if figures.get("drift_detail") else ""
        return Readiness(
            False,
            f"drift: the last `verify` or drift check (vectors_match_model){at} said {drift}{detail} (cleared by a "
            "later match, a re-embed or a swap)",
            "drift",
        )
    return Readiness(True, "missing=0, coverage_pct=100.00, stale_model=0, no blocking drift verdict")


# ---------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Evaluation:
    """One completed evaluation of the coverage check."""

    id: int  # storage id: increases with every evaluation
    passed: bool
    timestamp: float
    target_storage_id: int | None  # the coverage materialization it looked at
    missing: int | None = None
    blocked_by: str = ""  # another readiness condition that failed (the drift check, defs/trust.py)


@dataclass(frozen=True)
class Materialization:
    storage_id: int
    timestamp: float


@dataclass(frozen=True)
class Decision:
    """`action`: none | set_true | set_false | keep_on_regression; `handled`: evaluation id to remember."""

    action: str
    reason: str
    handled: int | None = None

    @property
    def writes(self) -> bool:
        return self.action in ("set_true", "set_false")


def decide(
    evaluation: Evaluation | None,
    latest: Materialization | None,
    handled: int | None,
    flag: bool | None,
    policy: str = "keep",
) -> Decision:
    """What the readiness sensor does now. Pure: no I/O."""
    if evaluation is None:
        return Decision("none", "the coverage check has not been evaluated yet")
    if handled is not None and evaluation.id <= handled:
        return Decision("none", f"evaluation {evaluation.id} was handled already")
    if latest is None:
        return Decision("none", "embedding_coverage has never been materialized", evaluation.id)
    if evaluation.target_storage_id is None or evaluation.target_storage_id != latest.storage_id:
        return Decision(
            "none",
            f"evaluation {evaluation.id} is stale: it checked materialization {evaluation.target_storage_id}, "
            f"the latest is {latest.storage_id}",
            evaluation.id,
        )
    if evaluation.timestamp < latest.timestamp:
        return Decision("none", f"evaluation {evaluation.id} is stale: older than the latest coverage", evaluation.id)
    if evaluation.passed and (evaluation.missing in (None, 0)):
        if flag is True:
            return Decision("none", f"{READY_KEY} is already true", evaluation.id)
        return Decision("set_true", f"evaluation {evaluation.id} passed: missing=0, coverage 100.00", evaluation.id)
    # A fresh failing evaluation.
    why = evaluation.blocked_by or f"missing={evaluation.missing}"
    again = evaluation.blocked_by or f"missing rose again (missing={evaluation.missing})"
    if flag is not True:
        return Decision("none", f"evaluation {evaluation.id} failed ({why})", evaluation.id)
    if policy == "unset":
        return Decision("set_false", f"{again} and the policy is 'unset'", evaluation.id)
    return Decision("keep_on_regression", f"{again}; {READY_KEY} stays true (policy 'keep')", evaluation.id)


# ---------------------------------------------------------------------------- the env file
#: One `KEY=value` line (bytes, without its b"\n"): blanks are space and tab only, as in the shell; a UTF-8
#: byte order mark may open the file's first line (`_BOM`, allowed there only). Blanks before `=` (`gap`) make the
#: line a command, not an assignment, in bash: such a line is rewritten whole, and never read as true.
_LINE = re.compile(
    rb"(?P<prefix>[ \t]*(?:(?:export|readonly|(?:declare|typeset)(?:[ \t]+-[A-Za-z]+)*)[ \t]+)?)"
    rb"(?P<key>[A-Za-z_][A-Za-z0-9_]*)(?P<gap>[ \t]*)=(?P<value>.*)$"
)
_BOM = b"\xef\xbb\xbf"


def _word(m: re.Match[bytes]) -> ShellWord:
    """The line's value as bash reads it (`core/shellword.py`); a line with blanks before `=` is not plain."""
    word = scan(m.group("value"))
    if m.group("gap") and word.verdict == "plain":
        return ShellWord("unsafe", word.end, None, b"", word.rest)
    return word


def _match(line: bytes, first: bool, *, past_bom: bool = False) -> re.Match[bytes] | None:
    """The `KEY=value` match of a line. Bash does not strip a byte order mark: a first line that opens with one is
    a command to bash, not an assignment, and is read as none; the writer (`past_bom`) finds the key behind it and
    drops the mark, so that bash reads the line it wrote."""
    if first and line.startswith(_BOM):
        return _LINE.match(line, len(_BOM)) if past_bom else None
    return _LINE.match(line)


def _assignments(data: bytes, key: str) -> list[bytes]:
    """The values bash assigns to `key`, in file order (b"" for a line whose value bash would have to run)."""
    found: list[bytes] = []
    for number, line in enumerate(data.split(b"\n")):
        m = _match(line, number == 0)
        if m and m.group("key") == key.encode("ascii"):
            word = _word(m)
            found.append(word.value if word.value is not None else b"")  # unknown without running it: not true
    return found


def _read_no_follow(path: Path) -> tuple[bytes | None, os.stat_result | None]:
    """The file's bytes (never decoded: an env file may hold any byte) and its stat; (None, None) if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise ReadinessError(f"cannot read the readiness env file {path}: {_reason(exc)}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise ReadinessError(f"refusing {path}: it is a symbolic link (write the real file's path instead)")
    if not stat.S_ISREG(st.st_mode):
        raise ReadinessError(f"refusing {path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            return fh.read(), st
    except OSError as exc:
        raise ReadinessError(f"cannot read the readiness env file {path}: {_reason(exc)}") from exc


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def read_flag(path: str | os.PathLike[str], key: str = READY_KEY) -> bool | None:
    """The flag's value (the last assignment wins, as in a shell), or None when the file or key is absent."""
    data, _ = _read_no_follow(Path(path))
    values = _assignments(data, key) if data is not None else []
    if not values:
        return None
    return is_true(values[-1].decode("utf-8", "replace"))


@dataclass(frozen=True)
class FlagChange:
    path: Path
    changed: bool
    previous: bool | None
    created: bool


def set_flag(path: str | os.PathLike[str], value: bool, key: str = READY_KEY) -> FlagChange:
    """Set `key=true|false` in the env file atomically; every other byte stays as it was."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    previous = read_flag(p, key)
    changed, created = set_value(p, key, "true" if value else "false")
    return FlagChange(p, changed, previous, created)


def set_value(path: str | os.PathLike[str], key: str, wanted: str) -> tuple[bool, bool]:
    """Set `key=wanted` in the env file atomically; returns (changed, created).

    The file is handled as the shell reads it: bytes, lines split on b"\n" only. In each line assigning
    `key` only the value's bytes change, up to where bash ends the value's word (`core/shellword.py`: backslash
    escapes, quotes and adjoining words included), so bash reads exactly what was written; its quotes when the value
    was one quoted string, an `export `/`readonly `/`declare -x ` prefix, an inline comment and a CRLF ending stay (a
    BOM opening the key's line is dropped: bash reads it as part of a command). A line bash does not
    read as a plain assignment (an expansion `$...`, a command after the value, blanks before `=`) is rewritten
    whole (`export ` and the CR kept); a statement that goes on past its line (an open quote or `$'...'`, `$(`, a
    backquote, a here-document, a compound command, a trailing backslash or `|`/`&&`) is refused, since rewriting
    one line would leave the rest to run. Two writers take turns (a `flock` on the directory), and a file changed
    between the read and the replace (an operator's editor) is read again, so no write is lost. Every other byte of
    the file is kept exactly, undecodable ones too. The value is written so that sourcing the file can never run it
    (`shell_value`). When no line assigns `key`, one is appended (CRLF if the file uses CRLF). A missing file is
    created with mode 0600. Raises `ReadinessError` (one line naming the path and the reason) when the file cannot
    be written.
    """
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    with _directory_lock(p.parent):
        for _ in range(_EDIT_RETRIES):
            data, st = _read_no_follow(p)
            new = _with_value(p, data, key, wanted)
            if data is not None and new == data:
                return False, False
            if _same_file(p, st):  # nobody (an operator's editor) changed it since we read it
                _atomic_write(p, new, st)
                return True, data is None
        raise ReadinessError(f"refusing to change {key} in {p}: the file keeps changing while it is written")


#: How often a file changed under the writer (an operator's editor) is read again before giving up.
_EDIT_RETRIES = 5


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive `flock` on the env file's directory for one read-change-replace: two writers (the readiness
    sensor and the after-swap sensor, two processes) never both read the old file and the later one's replace
    drops the other's line. No lock (the directory cannot be opened or locked): one writer is assumed."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the flock


def _same_file(path: Path, st: os.stat_result | None) -> bool:
    """Whether the file is still the one read as `st` (None: still absent)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return st is None
    except OSError:
        return True  # _atomic_write says what is wrong
    if st is None:
        return False
    return (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def _with_value(p: Path, data: bytes | None, key: str, wanted: str) -> bytes:
    """The file's bytes with `key=wanted` set as `set_value` says (ReadinessError when it cannot be)."""
    raw_key = key.encode("ascii")
    lines = (data or b"").split(b"\n")
    replaced = False
    for number, line in enumerate(lines):
        m = _match(line, number == 0, past_bom=True)
        if m and m.group("key") == raw_key:
            if m.start() > 0:  # behind a BOM, which bash does not strip: dropped, or bash never sets the key
                line = lines[number] = line[m.start() :]
                m = _match(line, False)
                assert m is not None
            word = _word(m)
            if word.verdict == "multiline":
                raise ReadinessError(
                    f"refusing to change {key} in {p}: on line {number + 1} its value opens a quote, a substitution, a "
                    "here-document or a compound command, or ends in a backslash or an operator, that goes on past "
                    "the line; fix that line by hand (nothing was written)"
                )
            if word.plain:  # only the word changes: what follows it (blanks, a comment, the CR) stays
                lines[number] = line[: m.start("value")] + shell_value(p, key, wanted, word.quote) + word.rest
            else:  # not a plain assignment: the whole line is rewritten, so nothing of it runs
                cr = b"\r" if line.endswith(b"\r") else b""
                new_line = m.group("prefix") + raw_key + b"=" + shell_value(p, key, wanted, b"") + cr
                lines[number] = line[: m.start("prefix")] + new_line
            replaced = True
    new = b"\n".join(lines)
    if not replaced:
        newline = b"\r\n" if b"\r\n" in new else b"\n"
        if new.endswith(b"\r") and newline == b"\r\n":
            new += b"\n"
        elif new and not new.endswith(b"\n"):
            new += newline
        new += raw_key + b"=" + shell_value(p, key, wanted, b"") + newline
    return new


#: A value written without quotes: nothing in it means anything to a shell.
BARE_VALUE = re.compile(r"[A-Za-z0-9._:/@-]*")
#: What a double-quoted shell value interprets (or ends on): refused there rather than escaped.
_DOUBLE_QUOTE_SPECIAL = '"$`\\'


def shell_value(path: Path, key: str, value: str, quote: bytes) -> bytes:
    """`value` as `KEY=` writes it in the line's own quoting style (`quote`: b"'", b'"' or b"" for none), so that
    `source`-ing the file sets it and never runs anything: bare only when it is `BARE_VALUE`; in single quotes when
    it holds no `'`; in double quotes when it holds none of `"`, `$`, a backquote, a backslash. Anything else - and
    any control, newline or format character, in any style - is refused (ReadinessError naming the key)."""
    refused = None
    if any(unicodedata.category(c) in UNPRINTABLE for c in value):
        refused = "a control, newline or format character"
    elif quote == b'"' and any(c in _DOUBLE_QUOTE_SPECIAL for c in value):
        refused = 'a character a double-quoted shell value interprets (", $, `, \\)'
    elif quote != b'"' and "'" in value:
        refused = "a single quote"
    if refused:
        raise ReadinessError(
            f"refusing to write {key}={one_line(value)} into {path}: the value holds {refused}, which sourcing the "
            "file could run or split; nothing was written"
        )
    if not quote and BARE_VALUE.fullmatch(value):
        return value.encode("utf-8")
    quote = quote or b"'"
    return quote + value.encode("utf-8") + quote


def _atomic_write(path: Path, data: bytes, st: os.stat_result | None) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = f"directory {path.parent} is not writable ({_reason(exc)})"
        elif exc.errno == errno.ENOENT:
            why = f"directory {path.parent} does not exist"
        else:
            why = f"cannot create a temporary file in {path.parent} ({_reason(exc)})"
        raise ReadinessError(f"cannot write the readiness env file {path}: {why}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), stat.S_IMODE(st.st_mode) if st else NEW_FILE_MODE)
            if st is not None and os.geteuid() == 0:
                with contextlib.suppress(OSError):
                    os.fchown(fh.fileno(), st.st_uid, st.st_gid)
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # replaces a link planted meanwhile, never writes through it
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ReadinessError(
                f"cannot write the readiness env file {path}: {_reason(exc)} (the file is unchanged)"
            ) from exc
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------- the restart
@dataclass(frozen=True)
class RestartResult:
    command: str
    returncode: int | None  # None: timed out (killed)
    seconds: float
    output_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_restart(command: str, timeout_sec: float = 45.0, cwd: str | None = None) -> RestartResult:
    """Run the operator's restart command with /bin/sh (it is a command line they wrote, like a cron entry).

    It runs in its own process group, so on timeout the whole group is killed (a child holding the output
    pipe open cannot keep us waiting).
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rc: int | None
    try:
        out, _ = proc.communicate(timeout=timeout_sec)
        rc = proc.returncode
        output = out.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
        output = out.decode("utf-8", "replace") + f"\n(killed after {timeout_sec:.0f} s)"
    return RestartResult(command, rc, time.monotonic() - started, output[-2000:])


def restart_backend(
    settings: ReadinessSettings, info: Callable[[str], None], error: Callable[[str], None], why: str
) -> RestartResult | None:
    """Run WIKI_EMBEDDINGS_RESTART_CMD (if set) so the backend picks up `why`; log how it went. None: not set."""
    if not settings.restart_cmd:
        info(f"no WIKI_EMBEDDINGS_RESTART_CMD set; restart the backend so it {why}")
        return None
    restart = run_restart(settings.restart_cmd, settings.restart_timeout_sec)
    if restart.ok:
        info(f"backend restarted in {restart.seconds:.1f} s ({restart.command!r})")
    else:
        error(
            f"the restart command {restart.command!r} failed (exit {restart.returncode}); restart the backend by "
            f"hand so it {why}. Output: {restart.output_tail[-500:]}"
        )
    return restart
