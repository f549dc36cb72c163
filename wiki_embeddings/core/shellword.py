"""Where bash ends the value of a `KEY=value` line, and what it assigns: the env-file writer's parser.

The readiness env file is `source`d by the backend's start script, so the flag's writer (`readiness.set_value`)
and reader (`readiness.read_flag`) must see a value exactly where bash sees it, or the writer can leave a line that
bash reads otherwise (`KEY=false\\ x` rewritten at the blank became `KEY=true x`: bash ran `x`). This module scans
the bytes after `KEY=` as bash scans one word of an assignment:

- unquoted bytes, a backslash escaping the next byte, `'...'` (literal) and `"..."` (backslash escapes only
  `$`, backquote, `"`, backslash) adjoin into one word, which ends at an unquoted blank or at one of bash's
  metacharacters `;&|()<>`;
- `$` or a backquote outside single quotes, or an unquoted `~` opening the value or following a `:`, is an
  expansion: the value cannot be known without running it;
- after the word, only blanks and a `# comment` may follow; anything else (`KEY=a b` runs `b`, `KEY= x` runs
  `x` with KEY set for it alone, `KEY=a; b`) makes the line something other than a plain assignment.

The verdict is `plain` (the value and where it ends are known), `unsafe` (a one-line statement that is not a plain
assignment: the writer replaces the whole line, the reader does not call it true) or `multiline` (a quote or a
trailing backslash goes on past the line: the writer refuses, since rewriting one line would leave the rest of
the quoted text to run as commands). Lines are split on b"\\n" only; a CR before it (a CRLF file) is kept as
the line's ending, outside the word, as dotenv readers do.
"""

from __future__ import annotations

from dataclasses import dataclass

_BLANKS = b" \t"
_METACHARACTERS = b";&|()<>"
#: What a backslash escapes inside double quotes (before anything else it is a literal backslash).
_DOUBLE_QUOTE_ESCAPES = b'$`"\\'


@dataclass(frozen=True)
class ShellWord:
    """The value of one `KEY=` line as bash reads it.

    `verdict`: plain | unsafe | multiline. `end`: where the word ends in the bytes after `=` (the CR of a CRLF line
    excluded). `value`: what bash assigns (None unless plain). `quote`: b"'" or b'"' when the word is exactly one
    quoted string (the line's quoting style, kept by the writer), else b"". `rest`: every byte after the word.
    """

    verdict: str
    end: int
    value: bytes | None
    quote: bytes
    rest: bytes

    @property
    def plain(self) -> bool:
        return self.verdict == "plain"


def _single(body: bytes, i: int) -> tuple[int, bytes] | None:
    """`'...'` opening at `i`: (index after its close, its bytes), None when it is not closed on the line."""
    close = body.find(b"'", i + 1)
    return None if close < 0 else (close + 1, body[i + 1 : close])


def _double(body: bytes, i: int) -> tuple[int, bytes, bool] | None:
    """`"..."` opening at `i`: (index after its close, its bytes, whether it expands anything), None if unclosed."""
    out, expands, j = bytearray(), False, i + 1
    while j < len(body):
        c = body[j : j + 1]
        if c == b'"':
            return j + 1, bytes(out), expands
        if c == b"\\":
            if j + 1 >= len(body):
                return None  # a backslash-newline goes on to the next line
            nxt = body[j + 1 : j + 2]
            out += nxt if nxt in _DOUBLE_QUOTE_ESCAPES else c + nxt
            j += 2
            continue
        expands = expands or c in (b"$", b"`")
        out += c
        j += 1
    return None


#: Words that open (or go on with) a compound command: bash reads on past the line for them.
_COMPOUND_WORDS = {
    b"if",
    b"then",
    b"elif",
    b"else",
    b"while",
    b"until",
    b"for",
    b"do",
    b"case",
    b"select",
    b"function",
    b"{",
    b"[[",
}


def _ansi_c(body: bytes, i: int) -> int | None:
    """`$'...'` whose `'` is at `i`: the index after its close (a backslash escapes any byte), None if unclosed."""
    j = i + 1
    while j < len(body):
        if body[j : j + 1] == b"\\":
            j += 2
        elif body[j : j + 1] == b"'":
            return j + 1
        else:
            j += 1
    return None


def _continues(body: bytes) -> bool:
    """Whether bash may read this line's statement on past its end: an open quote (`$'...'` included), an unclosed
    `$(`, `(`, `${` or backquote, a here-document, a compound command or a trailing `|`, `&&`, `||` or backslash.
    Conservative (True when unsure): a line that is True here is refused, not rewritten, since rewriting one line
    would leave the rest of its statement to run as commands."""
    stack: list[bytes] = []  # open contexts: b"(" b"{" b"`" b'"'
    word, last, i = bytearray(), b"", 0
    while i < len(body):
        c, two = body[i : i + 1], body[i : i + 2]
        top = stack[-1] if stack else b""
        if c == b"\\":
            if i + 1 >= len(body):
                return True
            word += b"x"
            i += 2
            continue
        if top == b'"':
            if c == b'"':
                stack.pop()
            elif two in (b"$(", b"${"):
                stack.append(two[1:2])
                i += 1
            elif c == b"`":
                stack.append(c)
            i += 1
            continue
        if two in (b"&&", b"||"):
            if bytes(word) in _COMPOUND_WORDS and top != b"{":
                return True
            word, last = bytearray(), two
            i += 2
            continue
        if c in _BLANKS or c in b";&|()<>`" or (c == b"}" and top == b"{"):
            if bytes(word) in _COMPOUND_WORDS and top != b"{":
                return True
            word = bytearray()
        if c == b"#" and (i == 0 or body[i - 1 : i] in _BLANKS + b";&|(") and top != b"{":
            break  # a comment: the rest of the line is not read
        if two == b"$'":
            end = _ansi_c(body, i + 1)
            if end is None:
                return True
            word += b"x"
            i = end
            continue
        if c == b"'":
            close = body.find(b"'", i + 1)
            if close < 0:
                return True
            word += b"x"
            i = close + 1
            continue
        if two in (b"$(", b"${"):
            stack.append(two[1:2])
            i += 2
            continue
        if c == b'"' or c == b"(":
            stack.append(c)
        elif (c == b")" and top == b"(") or (c == b"}" and top == b"{") or (c == b"`" and top == b"`"):
            stack.pop()
        elif c == b"`":
            stack.append(c)
        elif two == b"<<" and body[i + 2 : i + 3] != b"<":
            return True  # a here-document: its body is the next lines
        elif two == b"<<":
            i += 3  # a here-string: one line
            continue
        elif c not in _BLANKS and c not in b";&|<>":
            word += c
        if c not in _BLANKS:
            last = c
        i += 1
    if bytes(word) in _COMPOUND_WORDS:
        return True
    return bool(stack) or last in (b"|", b"&&", b"||")


def scan(raw: bytes) -> ShellWord:
    """Scan `raw`, the bytes after `KEY=` up to (not including) the line's b"\\n"."""
    cr = b"\r" if raw.endswith(b"\r") else b""
    body = raw[: len(raw) - len(cr)]
    out, expands, segments, i = bytearray(), False, [], 0
    while i < len(body):
        c = body[i : i + 1]
        if c in _BLANKS or c in _METACHARACTERS:
            break
        if c == b"\\":
            if i + 1 >= len(body):  # escapes the newline (a continuation) or the CR: not one plain line
                return ShellWord("unsafe" if cr else "multiline", i, None, b"", body[i:] + cr)
            out += body[i + 1 : i + 2]
            segments.append(b"")
            i += 2
        elif c == b"'":
            single = _single(body, i)
            if single is None:
                return ShellWord("multiline", i, None, b"", body[i:] + cr)
            i, text = single
            out += text
            segments.append(c)
        elif c == b'"':
            double = _double(body, i)
            if double is None:
                return ShellWord("multiline", i, None, b"", body[i:] + cr)
            i, text, expanded = double
            out += text
            expands = expands or expanded
            segments.append(c)
        else:
            tilde = c == b"~" and (i == 0 or body[i - 1 : i] == b":")  # an assignment's tilde expansion
            expands = expands or tilde or c in (b"$", b"`")
            out += c
            segments.append(b"")
            i += 1
    rest = body[i:] + cr
    after = body[i:].lstrip(_BLANKS)
    if expands or (after and not after.startswith(b"#")):  # a `#` here follows a blank: a comment
        return ShellWord("multiline" if _continues(body) else "unsafe", i, None, b"", rest)
    quote = segments[0] if len(segments) == 1 else b""
    return ShellWord("plain", i, bytes(out), quote, rest)
