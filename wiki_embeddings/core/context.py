"""The model's context window, counted in tokens: estimate, learn, cut to fit. No HTTP, no SQL.

Why this exists: since Ollama 0.13.5 `/api/embed` answers 400 "the input length exceeds the context length"
for any input over the model's context, whatever `truncate` says (ollama/ollama#14186), and where a server
does truncate it does so silently, the only trace being `prompt_eval_count` (#14259). Context is counted in
tokens per model, and characters are a poor proxy: with all-MiniLM-L6-v2's tokenizer, Korean Wikipedia text
runs at about 1.3 tokens per character (uncased BERT splits Hangul syllables into jamo) and English at about
0.28. So the tool cuts texts itself, from a per-text token estimate it refines from the server's own counts,
and when the server still refuses one text, it searches for the longest prefix that fits (`fit_prefix`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

# Features of a text that predict its token count across tokenizers (WordPiece, BPE, SentencePiece):
# Hangul syllables, other non-ASCII characters, ASCII words, ASCII word characters, ASCII punctuation.
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_OTHER_NON_ASCII = re.compile(r"[^\x00-\x7f\uac00-\ud7a3\s]")
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")
_ASCII_PUNCT = re.compile(r"[!-/:-@\[-`{-~]")

# Prior coefficients (tokens per feature unit), fitted on 3,000 pieces of the project's Korean and English
# Wikipedia sample against all-MiniLM-L6-v2's real tokenizer (±30 % per text at the 5th/95th percentile);
# they are refined from `prompt_eval_count` as a run goes, so another model's tokenizer is learned too.
PRIOR = np.array([1.76, 1.50, 0.54, 0.045, 1.0, 2.0])  # hangul, other, words, word chars, punct, per input
PRIOR_WEIGHT = 300.0  # how many observed tokens the prior is worth
SAFETY = 0.92  # pre-cut to this share of the window: the estimate errs both ways
AIM = 0.97  # a refused text's prefix search aims at this share of the window (from the server's own counts)
FULL = 0.95  # an accepted prefix using this share of the window is as long as the window allows (to ~10 %)
MAX_TOKENS_PER_CHAR = 2.5  # no text below budget / this many characters can be over the window


def features(text: str) -> np.ndarray:
    words = _ASCII_WORD.findall(text)
    return np.array(
        [
            len(_HANGUL.findall(text)),
            len(_OTHER_NON_ASCII.findall(text)),
            len(words),
            sum(map(len, words)),
            len(_ASCII_PUNCT.findall(text)),
            1.0,
        ]
    )


class TokenEstimator:
    """Tokens of a text ≈ coefficients · features(text); coefficients learned from the server's counts.

    Each answer of `/api/embed` carries `prompt_eval_count`, the tokens evaluated over all inputs of the
    request: one linear equation in the coefficients. A ridge regression towards the prior over all such
    equations of the run keeps the estimate honest for the model actually served.
    """

    def __init__(self, prior: np.ndarray = PRIOR, prior_weight: float = PRIOR_WEIGHT):
        self._prior = prior.astype(float)
        # Ridge: the prior acts as pseudo-observations of weight prior_weight / |prior|.
        scale = prior_weight / max(float(np.abs(prior).sum()), 1.0)
        self._xtx = np.eye(len(prior)) * scale
        self._xty = self._prior * scale
        self.coef = self._prior.copy()
        self.observations = 0

    def estimate(self, text: str) -> float:
        return float(features(text) @ self.coef)

    def observe(self, texts: list[str], prompt_eval_count: int) -> None:
        """One request's texts and the server's token count for them."""
        if not texts or prompt_eval_count <= 0:
            return
        x = np.sum([features(t) for t in texts], axis=0)
        # Normalise each equation by its size so one long batch does not outweigh many short ones.
        w = 1.0 / max(float(x.sum()), 1.0)
        self._xtx += w * np.outer(x, x)
        self._xty += w * x * prompt_eval_count
        self.coef = np.maximum(np.linalg.solve(self._xtx, self._xty), 0.0)
        self.observations += 1

    def fit_chars(self, text: str, budget_tokens: float) -> int:
        """The longest prefix length (characters) estimated to stay within `budget_tokens`."""
        if len(text) * MAX_TOKENS_PER_CHAR <= budget_tokens or self.estimate(text) <= budget_tokens:
            return len(text)
        lo, hi = 0, len(text)
        while hi - lo > max(8, len(text) // 200):  # estimate is monotone in the prefix: bisect on it
            mid = (lo + hi) // 2
            if self.estimate(text[:mid]) <= budget_tokens:
                lo = mid
            else:
                hi = mid
        return lo


@dataclass
class Window:
    """The model's context as the server describes it (`/api/show`), and what this run sends."""

    context_length: int | None = None  # `<arch>.context_length`: what the model was trained for
    modelfile_num_ctx: int | None = None  # `num_ctx` in the model's parameters, when the modelfile sets one
    num_ctx: int | None = None  # the operator's `--num-ctx`, sent as options.num_ctx
    architecture: str = ""
    learned: int | None = None  # what the server showed it really takes, when less than it said (or unknown)

    @property
    def tokens(self) -> int | None:
        """The window an input must fit: num_ctx (the operator's, else the modelfile's), capped by the model."""
        wanted = self.num_ctx or self.modelfile_num_ctx
        said = min(wanted, self.context_length) if wanted and self.context_length else wanted or self.context_length
        if self.learned:
            return min(said, self.learned) if said else self.learned
        return said

    def learn(self, tokens: int) -> None:
        """The server evaluated at most `tokens` of an input it cut or refused beyond: its real window."""
        if tokens > 0 and (self.learned is None or tokens < self.learned):
            self.learned = tokens

    def describe(self) -> str:
        if self.tokens is None:
            return "unknown (the server did not describe the model; refusals are handled as they come)"
        parts = []
        if self.context_length:
            parts.append(f"{self.architecture or 'model'}.context_length {self.context_length}")
        if self.num_ctx:
            parts.append(f"--num-ctx {self.num_ctx}")
        elif self.modelfile_num_ctx:
            parts.append(f"modelfile num_ctx {self.modelfile_num_ctx}")
        if self.learned and self.learned == self.tokens:
            parts.append(f"learned from the server's answers: {self.learned}")
        return f"{self.tokens} tokens ({', '.join(parts)})"


class ContextRefused(Exception):
    """Raised by an `embed_one` callable when the server refused the input as over its context."""


@dataclass
class FitResult:
    vector: np.ndarray
    chars: int  # characters of the text actually embedded
    tokens: int | None  # the server's count for them
    requests: int  # requests the search sent (all of them, the refused ones included)
    refused_at: int = 0  # the shortest prefix the server refused (characters)


EmbedOne = Callable[[str], Awaitable[tuple[np.ndarray, int | None]]]


async def fit_prefix(
    text: str,
    embed_one: EmbedOne,
    *,
    window_tokens: int | None,
    estimator: TokenEstimator,
    refused_at: int | None = None,
    good_share: float = 0.9,
    max_requests: int = 8,
) -> FitResult | None:
    """Embed the longest prefix of `text` the server accepts, to within `good_share` of the best, in few requests.

    Keeps a bracket: `lo` characters were accepted (the server counted `t` tokens), `hi` refused. Tries aim just
    under the window, extrapolated from the token count of the last accepted prefix (tokens grow about linearly
    along one text). It stops when lo >= good_share * hi (proven within that share of the longest prefix that
    fits), or when the accepted prefix already uses nearly the whole window (what is left of the window cannot
    hold a tenth more of the same text). None when nothing fits within `max_requests`.
    """
    hi = refused_at if refused_at is not None else len(text) + 1
    aim = window_tokens * AIM if window_tokens else None
    best: FitResult | None = None
    lo = 0
    guess = estimator.fit_chars(text[: hi - 1], aim) if aim else (hi - 1) // 2
    requests = 0
    while requests < max_requests:
        guess = max(min(guess, hi - 1), lo + 1)
        if guess >= hi or guess <= lo:
            break
        requests += 1
        try:
            vector, tokens = await embed_one(text[:guess])
        except ContextRefused:
            hi = guess
            if lo >= good_share * hi:
                break
            guess = (lo + hi) // 2 if lo else guess // 2
            continue
        lo = guess
        best = FitResult(vector, lo, tokens, requests)
        if tokens:
            estimator.observe([text[:lo]], tokens)
        full = bool(window_tokens and tokens and tokens >= FULL * window_tokens)
        if full or lo >= good_share * hi or lo >= len(text):
            break
        guess = int(lo * aim / tokens) if aim and tokens else (lo + hi) // 2
        if guess >= hi:  # the extrapolation overshoots a known refusal: split the bracket near its top
            guess = int(lo + (hi - lo) * 0.8)
    if best is not None:
        best.requests = requests
        best.refused_at = hi
    return best


# --------------------------------------------------------------------------------------------- the window


def window_from_show(info: dict[str, object], num_ctx: int | None) -> Window:
    """The model's window from an `/api/show` answer: `<arch>.context_length` and a `num_ctx` parameter."""
    model_info = info.get("model_info")
    model_info = model_info if isinstance(model_info, dict) else {}
    arch = str(model_info.get("general.architecture") or "")
    length = model_info.get(f"{arch}.context_length") if arch else None
    if length is None:
        length = next((v for k, v in model_info.items() if str(k).endswith(".context_length")), None)
    params = info.get("parameters")
    found = re.search(r"^\s*num_ctx\s+(\d+)", params, re.MULTILINE) if isinstance(params, str) else None
    return Window(
        context_length=int(length) if isinstance(length, int | float) and length > 0 else None,
        modelfile_num_ctx=int(found.group(1)) if found else None,
        num_ctx=num_ctx,
        architecture=arch,
    )


def fit_text(text: str, prefix: str, window_tokens: int | None, estimator: TokenEstimator) -> str:
    """`text` cut (if needed) so that prefix + text is estimated to fit the window with a safety margin."""
    if not window_tokens:
        return text
    budget = window_tokens * SAFETY
    if (len(prefix) + len(text)) * MAX_TOKENS_PER_CHAR <= budget:
        return text
    keep = estimator.fit_chars(prefix + text, budget) - len(prefix)
    return text[: max(keep, 1)]


# --------------------------------------------------------------------------------------------- pre-flight

PREFLIGHT_SAMPLE = 300
_KOREAN_SHARE = 0.3  # a text whose letters are at least this share Hangul counts as Korean


_LETTER = re.compile(r"[^\W\d_]")


def _is_korean(text: str) -> bool:
    letters = len(_LETTER.findall(text))
    return letters > 0 and len(_HANGUL.findall(text)) >= _KOREAN_SHARE * letters


def preflight(
    sample: list[str],
    window: Window,
    estimator: TokenEstimator,
    max_chars: int,
    prefix: str = "",
    pieces: Callable[[str], int] | None = None,
) -> dict[str, object]:
    """From a sample of chunk texts (cut to --max-chars): the share that will not fit the window, with a hint when
    it is large. Under `--long-text cut` (`pieces` None): how much of a typical Korean and English chunk survives
    the cut. Under `pool` (`pieces`: a text's piece count, core/pooling.py): nothing is cut; how many pieces a
    long chunk is embedded as, and the extra model inputs that costs per 1,000 chunks."""
    out: dict[str, object] = {"context": window.describe(), "context_tokens": window.tokens, "sample": len(sample)}
    if not sample or not window.tokens:
        out["hint"] = "" if sample else "no missing chunks to sample"
        return out
    if pieces is not None:
        out["long_text"] = "pool"
    over = 0
    kept: dict[str, list[float]] = {"ko": [], "en": []}
    kept_chars: dict[str, list[int]] = {"ko": [], "en": []}
    counts: list[int] = []
    for text in sample:
        cut = fit_text(text, prefix, window.tokens, estimator)
        over += len(cut) < len(text)
        if pieces is not None:
            if len(cut) < len(text):
                counts.append(pieces(text))
            continue
        lang = "ko" if _is_korean(text) else "en"
        kept[lang].append(len(cut) / len(text))
        kept_chars[lang].append(len(cut))
    share = over / len(sample)
    out["over_context_pct"] = round(100 * share, 1)
    if counts:
        out["pieces_median"] = int(np.median(counts))
        out["extra_inputs_per_1000"] = round(1000 * (sum(counts) - len(counts)) / len(sample))
    for lang in ("ko", "en"):
        if kept[lang]:
            out[f"{lang}_sample"] = len(kept[lang])
            out[f"{lang}_kept_pct"] = round(100 * float(np.median(kept[lang])), 1)
            out[f"{lang}_kept_chars"] = int(np.median(kept_chars[lang]))
    out["hint"] = _hint(window, max_chars, pooled=pieces is not None) if share >= 0.05 else ""
    return out


def _hint(window: Window, max_chars: int, pooled: bool) -> str:
    """What makes fewer chunks too long for the window: a larger --num-ctx, a longer-context model, shorter chunks."""
    effect = "need pieces (extra model calls)" if pooled else "are cut"
    whole = "in one call each" if pooled else "whole"
    if window.context_length and window.tokens and window.tokens < window.context_length:
        return (
            f"raise --num-ctx (WIKI_EMBED_NUM_CTX) up to {window.context_length}, the model's own maximum, "
            f"so fewer chunks {effect}"
        )
    return (
        f"the model's window ({window.tokens} tokens) is shorter than many chunks at --max-chars {max_chars}: "
        "a model with a longer context (e.g. nomic-embed-text, 8192 tokens with --num-ctx 8192) embeds "
        f"chunks {whole}; or re-chunk the text shorter"
    )


def format_preflight(figures: dict[str, object]) -> str:
    parts = [f"pre-flight: model context {figures['context']}"]
    if "over_context_pct" in figures and figures.get("long_text") == "pool":
        parts.append(
            f"{figures['over_context_pct']}% of a sample of {figures['sample']} chunks are longer than the window and "
            "are pooled (--long-text pool: embedded whole as window-sized pieces, nothing cut)"
        )
        if "pieces_median" in figures:
            parts.append(
                f"a typical long chunk is {figures['pieces_median']} pieces, about "
                f"{figures['extra_inputs_per_1000']} extra model inputs per 1,000 chunks"
            )
    elif "over_context_pct" in figures:
        parts.append(
            f"{figures['over_context_pct']}% of a sample of {figures['sample']} chunks will not fit and are cut to fit"
        )
        for lang, name in (("ko", "Korean"), ("en", "English/other")):
            if f"{lang}_kept_pct" in figures:
                parts.append(
                    f"a typical {name} chunk keeps {figures[f'{lang}_kept_pct']}% "
                    f"(~{figures[f'{lang}_kept_chars']} characters; {figures[f'{lang}_sample']} sampled)"
                )
    if figures.get("hint"):
        parts.append(f"hint: {figures['hint']}")
    return "; ".join(parts)
