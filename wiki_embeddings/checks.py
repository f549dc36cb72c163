"""How text from outside (a flag, an environment variable, a Dagster config value) becomes a setting's value, and the
range it must fall in: one place, so the CLI, the environment and Dagster accept and refuse the same values.

- Numbers are finite (`nan`, `inf` refused everywhere) and inside their `Range` (kept on the setting's `Option`).
- Numbers are written in ASCII (`parse_number`): Python's int() and float() also read other scripts' digits
  (Arabic-Indic '٣' is 3, fullwidth '５' is 5), which a setting refuses, naming it.
- Booleans are one of `BOOL_WORDS` (1/0, true/false, yes/no, on/off, any case; empty means the default);
  anything else is refused instead of being read as "no".
- A choice among words (WIKI_EMBED_API, WIKI_EMBED_LONG_TEXT, --concurrency auto,
  WIKI_EMBEDDINGS_READY_ON_REGRESSION) is read like a boolean: any case, blanks around it ignored (`choice_word`).
- Ollama's keep-alive is what Ollama itself parses (`keep_alive_problem`).
- `one_line` shows any value (a model name recorded by an old version, a server's message) as exactly one line.

A leaf: no project imports.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
BOOL_WORDS = "1/0, true/false, yes/no, on/off (any case; empty: the default)"
#: The largest id, count or chunk cap a statement can take (PostgreSQL's bigint).
BIGINT_MAX = 2**63 - 1
DAY_SEC = 86_400.0


def parse_number(kind: Callable[[str], Any], raw: str) -> Any:
    """`kind(raw)` (int or float) for text in ASCII only: ValueError for another script's digits, which Python
    would read as numbers (`int("٣")` is 3)."""
    if not raw.isascii() or "_" in raw:  # Python also reads "5_000" as 5000 and "6_4" as 64
        raise ValueError(f"{raw!r} is not a number: write it with ASCII digits 0-9")
    return kind(raw)


def choice_word(raw: str) -> str:
    """A word among choices (an API, a long-text mode, a policy) as compared: any case, blanks around it ignored."""
    return raw.strip().lower()


def parse_bool(raw: str) -> bool | None:
    """A boolean from text: True, False, or None for an empty value (the default applies); ValueError otherwise."""
    word = raw.strip().lower()
    if word == "":
        return None
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{raw!r} is not a boolean: write {BOOL_WORDS}")


@dataclass(frozen=True)
class Range:
    """The values a number may take: finite, and within [low, high] (`low_open`: strictly above low)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_show(self.low)}")
        if self.high is not None:
            parts.append(f"<= {_show(self.high)}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")

    def problem(self, value: float) -> str | None:
        """Why `value` is refused, or None when it is in range."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {self.describe()}, got {value}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        return f"must be {self.describe()}, got {_show(value)}" if too_low or too_high else None


def _show(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


#: Ranges used by several settings and flags.
POSITIVE_SECONDS = Range(0, DAY_SEC, low_open=True)  # a timeout or a wait that must end: > 0, at most a day
SECONDS = Range(0, DAY_SEC)  # a wait that may be zero
AT_LEAST_ONE = Range(1, BIGINT_MAX)
NOT_NEGATIVE = Range(0, BIGINT_MAX)
BIGINT = Range(-BIGINT_MAX - 1, BIGINT_MAX)


def check_number(label: str, value: float | None, allowed: Range) -> None:
    """ValueError naming `label` (the flag, variable or field) when `value` is out of `allowed`; None passes."""
    if value is None or isinstance(value, bool):
        return
    problem = allowed.problem(value)
    if problem:
        raise ValueError(f"{label} {problem}")


def number_type(kind: type, allowed: Range) -> Callable[[str], Any]:
    """An argparse `type` that parses `kind` and refuses what `allowed` refuses (argparse names the flag)."""
    import argparse

    def parse(raw: str) -> Any:
        try:
            value = parse_number(kind, raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {raw!r}") from None
        problem = allowed.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid <name> value" message
    return parse


# ---------------------------------------------------------------------------- one line per value
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
#: Unicode categories never shown raw: controls, format characters (bidi overrides, zero-width), line and
#: paragraph separators.
UNPRINTABLE = ("Cc", "Cf", "Zl", "Zp")


def one_line(text: str) -> str:
    """`text` as one printable line: a backslash, a newline, a tab and every other control, format or separator
    character written as an escape (\\n, \\t, \\x1b, \\u202e), so a value can never fake another line."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif unicodedata.category(char) in UNPRINTABLE:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


# ---------------------------------------------------------------------------- Ollama's keep-alive
#: Go's `time.ParseDuration`, which Ollama's `api.Duration` applies to a string (api/types.go UnmarshalJSON): an
#: optional sign, then "0" or one or more decimal numbers each with a unit.
_GO_DURATION = re.compile(r"[-+]?(?:0|(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)")
_GO_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT_SEC = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION_MAX_SEC = (2**63 - 1) / 1e9  # a time.Duration is int64 nanoseconds (about 292 years)
KEEP_ALIVE_FORMS = (
    'a whole number of seconds ("300"; "0" unloads at once, "-1" keeps the model loaded for good) or a Go '
    'duration ("30m", "1h30m", "90s", "-1m")'
)


_TOO_LONG = "{value!r} is longer than Go's longest duration (about 292 years): use -1 to keep the model loaded"


def keep_alive_problem(value: str) -> str | None:
    """Why Ollama would refuse `value` as `keep_alive` (HTTP 400 "time: invalid duration"), or None.

    The client sends a whole number of seconds as a JSON number (Ollama takes any number: negative = forever) and
    anything else as a string, which Ollama parses with Go's time.ParseDuration ("5m", "1h30m", "0"; a bare
    "1.5" lacks a unit, "forever" is no duration; past about 292 years it overflows)."""
    text = value.strip()
    if re.fullmatch(r"[-+]?[0-9]+", text):  # Ollama multiplies seconds into an int64 of nanoseconds too
        return None if int(text) <= _GO_DURATION_MAX_SEC else _TOO_LONG.format(value=value)
    if not _GO_DURATION.fullmatch(text):
        return f"{value!r} is not {KEEP_ALIVE_FORMS}"
    seconds = sum(float(number) * _UNIT_SEC[unit] for number, unit in _GO_DURATION_PART.findall(text))
    if seconds > _GO_DURATION_MAX_SEC:
        return _TOO_LONG.format(value=value)
    return None


def check_header_secret(name: str, value: str) -> None:
    """A secret sent in an HTTP header (a bearer key) must be printable ASCII with no blank at either end: anything
    else cannot be sent, and the HTTP library's refusal quotes the whole header - the secret with it. Refused here,
    naming where the character is, never the value (a trailing newline from a secret file is the usual cause)."""
    for position, char in enumerate(value):
        if not " " <= char <= "~":
            newline = char in "\r\n"
            what = "a line break" if newline else f"the character U+{ord(char):04X}"
            hint = " (a key read from a file with its trailing newline?)" if newline else ""
            raise ValueError(
                f"{name} holds {what} at position {position + 1} of {len(value)}: an HTTP header cannot carry "
                f"it{hint}; give the key alone"
            )
    if value != value.strip():
        raise ValueError(f"{name} begins or ends with a blank: an HTTP header cannot carry it; give the key alone")
