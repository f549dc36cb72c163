"""The outside tester's settings findings (issues 21 and 23), fixed: a keep-alive Ollama cannot parse is refused up
front by Ollama's own rule, a start probe refused because of our own setting is a bad setting naming it, other
scripts' digits are refused in every number, every choice is read in any case, and the pre-flight line says what
`--long-text pool` does. Pure: no database, no server."""

from __future__ import annotations

import dagster as dg
import pytest

from wiki_embeddings.checks import choice_word, keep_alive_problem, parse_number
from wiki_embeddings.cli import main
from wiki_embeddings.core.backfill.prepare import refused_setting
from wiki_embeddings.core.context import TokenEstimator, Window, format_preflight, preflight
from wiki_embeddings.core.embedders import AmbiguousFailure, ContextExceeded, InputRejected, RunnerCrashed
from wiki_embeddings.core.pooling import piece_counter
from wiki_embeddings.core.readiness import ReadinessSettings
from wiki_embeddings.core.window import parse_until
from wiki_embeddings.defs.config import RangeRunConfig
from wiki_embeddings.defs.resources import OllamaResource, WikiDatabaseResource, run_settings
from wiki_embeddings.defs.state import sensor_interval
from wiki_embeddings.settings import Settings, from_env

DEAD_DB = "postgresql://nobody@127.0.0.1:1/none"

# ------------------------------------------------------------------------------ keep-alive, as Ollama parses it
#: api/types.go Duration.UnmarshalJSON: a JSON number (seconds; negative = forever) or a string through Go's
#: time.ParseDuration. The client sends a whole number as a number, anything else as a string.
OLLAMA_TAKES = ["30m", "5m", "1h30m", "-1", "0", "300", "+60", "-1m", "1.5h", ".5s", "90s", "100ms", "1µs", "0s"]
OLLAMA_REFUSES = ["forever", "1.5", "1e3", "", " ", "1h 30m", "m", "30 m", "1d", "inf", "٣", "300000000000h"]


@pytest.mark.parametrize("value", OLLAMA_TAKES)
def test_a_keep_alive_ollama_takes_is_accepted(value):
    assert keep_alive_problem(value) is None
    assert from_env({"WIKI_EMBED_KEEP_ALIVE": value} if value else {}).validate().keep_alive == value


@pytest.mark.parametrize("value", OLLAMA_REFUSES)
def test_a_keep_alive_ollama_cannot_parse_is_refused_naming_it(value):
    assert keep_alive_problem(value)
    with pytest.raises(ValueError, match="WIKI_EMBED_KEEP_ALIVE") as refused:
        Settings(keep_alive=value).validate()
    assert "Go duration" in str(refused.value) or "292 years" in str(refused.value)


def test_a_bad_keep_alive_is_refused_by_the_cli_and_by_dagster(capsys, monkeypatch):
    assert main(["backfill", "--keep-alive", "forever", "--database-url", DEAD_DB]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --keep-alive / WIKI_EMBED_KEEP_ALIVE:") and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("WIKI_EMBED_KEEP_ALIVE", "forever")  # Dagster reads it from the environment
    with pytest.raises(dg.Failure, match="WIKI_EMBED_KEEP_ALIVE"):
        run_settings(WikiDatabaseResource(database_url=DEAD_DB), OllamaResource())


# ------------------------------------------------------------------------------ the start probe's refusals
CONTEXT = ContextExceeded("HTTP 400: the input length exceeds the context length", http_status=400)
MALFORMED = InputRejected('HTTP 400: time: invalid duration "x"', http_status=400, kind="http_400")


def test_a_probe_refused_as_too_long_under_a_text_prefix_names_the_prefix():
    why = refused_setting(CONTEXT, Settings(), "p " * 125, "m")
    assert why and why.startswith("WIKI_EMBED_TEXT_PREFIX (--text-prefix):") and "250-character" in why
    assert refused_setting(CONTEXT, Settings(), "", "m") is None, "no prefix: the server's window, not our setting"


def test_a_probe_refused_as_malformed_names_what_every_request_carries():
    why = refused_setting(MALFORMED, Settings(num_ctx=512), "q: ", "all-minilm")
    assert why and "(OLLAMA_MODEL='all-minilm', WIKI_EMBED_KEEP_ALIVE='30m', WIKI_EMBED_TEXT_PREFIX='q: '" in why
    assert "WIKI_EMBED_NUM_CTX=512" in why and "nothing was written" in why
    openai = refused_setting(MALFORMED, Settings(api="openai"), "", "m")
    assert openai and "(OLLAMA_MODEL='m')" in openai, "keep-alive is not sent under --api openai"


@pytest.mark.parametrize(
    "exc",
    [
        RunnerCrashed("HTTP 400: EOF", http_status=400),
        InputRejected("HTTP 403: forbidden", http_status=403),
        AmbiguousFailure("HTTP 500: oops", http_status=500),
    ],
)
def test_other_probe_failures_stay_the_servers(exc):
    assert refused_setting(exc, Settings(), "prefix: ", "m") is None


# ------------------------------------------------------------------------------ numbers in ASCII only
FOREIGN_DIGITS = ["٣", "３", "१०", "٠٦"]  # Arabic-Indic, fullwidth, Devanagari: Python's int() reads them all


@pytest.mark.parametrize("raw", FOREIGN_DIGITS)
def test_other_scripts_digits_are_refused_in_every_number(raw, capsys, monkeypatch):
    assert int(raw) >= 0, "the trap: Python reads them"
    with pytest.raises(ValueError, match="ASCII digits"):
        parse_number(int, raw)
    for var in ("WIKI_EMBED_RETRIES", "WIKI_EMBED_NUM_CTX", "WIKI_EMBED_CONCURRENCY", "WIKI_EMBED_BUSY_WAIT_SEC"):
        with pytest.raises(ValueError, match=var):
            from_env({var: raw})
    with pytest.raises(SystemExit) as exited:
        main(["backfill", "--retries", raw, "--database-url", DEAD_DB])
    assert exited.value.code == 2 and "--retries" in capsys.readouterr().err
    with pytest.raises(ValueError, match="WIKI_EMBEDDINGS_RESTART_TIMEOUT_SEC"):
        ReadinessSettings.from_env({"WIKI_EMBEDDINGS_RESTART_TIMEOUT_SEC": raw})
    monkeypatch.setenv("WIKI_EMBED_SENSOR_INTERVAL_SEC", raw)
    with pytest.raises(ValueError, match="WIKI_EMBED_SENSOR_INTERVAL_SEC"):
        sensor_interval(30)


def test_until_takes_ascii_digits_only():
    with pytest.raises(ValueError):
        parse_until("٠٦:٠٠")
    assert parse_until("06:00") is not None


# ------------------------------------------------------------------------------ choices in any case
@pytest.mark.parametrize(
    ("var", "raw", "field", "value"),
    [
        ("WIKI_EMBED_API", " OpenAI ", "api", "openai"),
        ("WIKI_EMBED_LONG_TEXT", "CUT", "long_text", "cut"),
        ("WIKI_EMBED_LONG_TEXT", " Pool\t", "long_text", "pool"),
        ("WIKI_EMBED_CONCURRENCY", "AUTO", "concurrency", 0),
    ],
)
def test_every_choice_is_read_in_any_case_from_the_environment(var, raw, field, value):
    assert getattr(from_env({var: raw}).validate(), field) == value


def test_every_choice_is_read_in_any_case_from_flags_dagster_and_code(capsys):
    from wiki_embeddings.cli.parser import build_parser

    args = build_parser().parse_args(["backfill", "--long-text", "CUT", "--api", "OLLAMA"])
    assert (args.long_text, args.api) == ("cut", "ollama")
    assert Settings(long_text="Cut", api="OpenAI").validate().long_text == "cut"
    config = RangeRunConfig(long_text="POOL").engine_settings()
    assert run_settings(WikiDatabaseResource(database_url=DEAD_DB), OllamaResource(), **config).long_text == "pool"
    assert ReadinessSettings.from_env({"WIKI_EMBEDDINGS_READY_ON_REGRESSION": "Unset"}).on_regression == "unset"
    assert ReadinessSettings.from_env({}, on_regression="KEEP").on_regression == "keep"
    assert choice_word(" Auto ") == "auto"
    with pytest.raises(ValueError, match="WIKI_EMBED_LONG_TEXT"):
        Settings(long_text="chop").validate()


# ------------------------------------------------------------------------------ the pre-flight under pool
LONG = " ".join(f"word{k} sentence number {k}." for k in range(400))


def test_the_preflight_line_says_pooled_under_pool_and_cut_under_cut():
    estimator, window = TokenEstimator(), Window(context_length=256)
    sample = [LONG, "a short chunk"] * 5
    pooled = preflight(sample, window, estimator, 2000, "", piece_counter("", 256, estimator))
    line = format_preflight(pooled)
    assert "50.0% of a sample of 10 chunks are longer than the window and are pooled" in line, line
    assert "cut" not in line.replace("nothing cut", ""), line
    assert pooled["pieces_median"] > 1 and pooled["extra_inputs_per_1000"] == 500 * (pooled["pieces_median"] - 1)
    cut = format_preflight(preflight(sample, window, estimator, 2000, ""))
    assert "will not fit and are cut to fit" in cut and "keeps" in cut
