"""The runbook's "Done when" step: set `WIKI_EMBEDDINGS_READY=true` in the backend's env file, then restart it.

Plain Python (no Dagster import) so the rule is testable on its own and any front end can use it:

- `decide(...)`: given the latest *completed* evaluation of the coverage check, the latest coverage
  materialization, what was handled already and the flag's current value, say what to do. It never flips
  the flag on a failed, missing or stale evaluation (stale: older than the latest coverage materialization,
  or aimed at an older one), and acts once per evaluation.
- `set_flag(...)`: rewrite one `KEY=value` line atomically (temp file in the same directory, fsync,
  `os.replace`), keeping every other line, comment and line ending, the file's mode (and owner when
  root), and refusing a symlink at the path.
- `run_restart(...)`: the operator's optional backend-restart command, bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

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

_TRUE = {"1", "true", "yes", "on"}


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
                values[name] = float(raw) if name == "restart_timeout_sec" else raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()  # type: ignore[arg-type]

    def validate(self) -> ReadinessSettings:
        if self.on_regression not in POLICIES:
            raise ValueError(
                f"{ENV_VARS['on_regression']} must be one of {', '.join(POLICIES)}, got {self.on_regression!r}"
            )
        if self.restart_timeout_sec <= 0:
            raise ValueError(f"restart timeout must be positive, got {self.restart_timeout_sec}")
        if not self.env_file:
            raise ValueError(f"{ENV_VARS['env_file']} is empty")
        return self

    @property
    def env_path(self) -> Path:
        """Absolute path (a relative one is taken from the current directory: say which in every log line)."""
        return Path(os.path.abspath(os.path.expanduser(self.env_file)))


# ---------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Evaluation:
    """One completed evaluation of the coverage check."""

    id: int  # storage id: increases with every evaluation
    passed: bool
    timestamp: float
    target_storage_id: int | None  # the coverage materialization it looked at
    missing: int | None = None


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
    if flag is not True:
        return Decision("none", f"evaluation {evaluation.id} failed (missing={evaluation.missing})", evaluation.id)
    if policy == "unset":
        return Decision(
            "set_false",
            f"missing rose again (missing={evaluation.missing}) and the policy is 'unset'",
            evaluation.id,
        )
    return Decision(
        "keep_on_regression",
        f"missing rose again (missing={evaluation.missing}); {READY_KEY} stays true (policy 'keep')",
        evaluation.id,
    )


# ---------------------------------------------------------------------------- the env file
_LINE = re.compile(r"^(?P<prefix>\s*(?:export\s+)?)(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=(?P<value>.*)$")


def _split_ending(line: str) -> tuple[str, str]:
    for ending in ("\r\n", "\n", "\r"):
        if line.endswith(ending):
            return line[: -len(ending)], ending
    return line, ""


def _value(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw.split(" #", 1)[0].strip()


def _read_no_follow(path: Path) -> tuple[str | None, os.stat_result | None]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, None
    if stat.S_ISLNK(st.st_mode):
        raise ReadinessError(f"refusing {path}: it is a symbolic link (write the real file's path instead)")
    if not stat.S_ISREG(st.st_mode):
        raise ReadinessError(f"refusing {path}: not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    return data.decode("utf-8"), st


def read_flag(path: str | os.PathLike[str], key: str = READY_KEY) -> bool | None:
    """The flag's value (the last assignment wins, as in a shell), or None when the file or key is absent."""
    text, _ = _read_no_follow(Path(path))
    if text is None:
        return None
    found: bool | None = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group("key") == key:
            found = _value(m.group("value")).lower() in _TRUE
    return found


@dataclass(frozen=True)
class FlagChange:
    path: Path
    changed: bool
    previous: bool | None
    created: bool


def set_flag(path: str | os.PathLike[str], value: bool, key: str = READY_KEY) -> FlagChange:
    """Set `key=true|false` in the env file atomically; every other line stays byte for byte."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    previous = read_flag(p, key)
    changed, created = set_value(p, key, "true" if value else "false")
    return FlagChange(p, changed, previous, created)


def read_value(path: str | os.PathLike[str], key: str) -> str | None:
    """The raw value of `key` (the last assignment wins), or None when the file or key is absent."""
    text, _ = _read_no_follow(Path(path))
    found: str | None = None
    for line in (text or "").splitlines():
        m = _LINE.match(line)
        if m and m.group("key") == key:
            found = _value(m.group("value"))
    return found


def set_value(path: str | os.PathLike[str], key: str, wanted: str) -> tuple[bool, bool]:
    """Set `key=wanted` in the env file atomically; returns (changed, created).

    Each line assigning `key` is rewritten in place (keeping an `export ` prefix and its line ending);
    when none does, the line is appended. A missing file is created with mode 0600.
    """
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    text, st = _read_no_follow(p)
    lines = (text or "").splitlines(keepends=True)
    out: list[str] = []
    replaced = False
    for line in lines:
        body, ending = _split_ending(line)
        m = _LINE.match(body)
        if m and m.group("key") == key:
            out.append(f"{m.group('prefix')}{key}={wanted}{ending}")
            replaced = True
        else:
            out.append(line)
    if not replaced:
        newline = "\r\n" if "\r\n" in (text or "") else "\n"
        if out and not out[-1].endswith(("\n", "\r")):
            out[-1] += newline
        out.append(f"{key}={wanted}{newline}")
    new_text = "".join(out)
    if text is not None and new_text == text:
        return False, False
    _atomic_write(p, new_text.encode("utf-8"), st)
    return True, text is None


def _atomic_write(path: Path, data: bytes, st: os.stat_result | None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
