"""Model names checked at every entry, values shown as one line, an env file no value can run code from (issue 21,
item 3). Pure: the name rules, `status`'s formatting and the env-file writer. Through the CLI and bash:
integration/test_faults_names.py."""

from __future__ import annotations

import pytest

from wiki_embeddings.checks import one_line
from wiki_embeddings.core import migration, operations
from wiki_embeddings.core.modelname import InvalidModelName, check_model_name, ollama_name_problem
from wiki_embeddings.core.readiness import MODEL_KEY, ReadinessError, read_flag, set_flag, set_value
from wiki_embeddings.core.status import format_status
from wiki_embeddings.settings import Settings

INJECTION = "m3\nmissing=0\ncoverage_pct=100.00"

OLLAMA_NAMES = [
    "all-minilm",
    "nomic-embed-text:latest",
    "All-MiniLM:L6-v2",
    "library/all-minilm",
    "registry.ollama.ai/library/all-minilm:latest",
    "localhost:5000/team/embedder:v1.5",
    "https://registry.example.com/ns/model:q4_K_M",
    "hf.co/nomic-ai/nomic-embed-text-v1.5-GGUF:Q4_K_M",
    "_private",
    "model@sha256-abc",
]
NOT_OLLAMA = [
    ("x:", "tag is nothing"),
    (":latest", "model is nothing"),
    ("/x", "namespace is nothing"),
    ("ns.dot/model", "namespace is 'ns.dot'"),
    ("a/b/c/d", "host is 'a/b'"),
    ("-leading-dash", "model is '-leading-dash'"),
    ("name with space", "model is 'name with space'"),
    ("m;touch FILE", "model is 'm;touch FILE'"),
    ("m$(id)", "model is 'm$(id)'"),
    ("x" * 81, "model is"),
    ("Überbert", "model is 'Überbert'"),
]
ANY_SERVER_REFUSES = [
    INJECTION,
    "m\r",
    "tab\there",
    "bell\x07",
    "bidi\u202eevil",
    "zero\u200bwidth",
    "q'x",
    'q"x',
    "q`x",
]


@pytest.mark.parametrize("name", OLLAMA_NAMES)
def test_names_ollama_accepts_pass(name):
    assert ollama_name_problem(name) is None and check_model_name(name) == name


@pytest.mark.parametrize("name, why", NOT_OLLAMA)
def test_names_outside_ollamas_grammar_are_refused_saying_which_part(name, why):
    with pytest.raises(InvalidModelName, match="not an Ollama model name") as refused:
        check_model_name(name, "ollama", "--model / OLLAMA_MODEL")
    assert why in str(refused.value) and str(refused.value).startswith("--model / OLLAMA_MODEL: ")
    if " " not in name and ";" not in name and "$" not in name:
        assert check_model_name(name, "openai") == name, "other APIs have no name grammar of Ollama's"


@pytest.mark.parametrize("name", ANY_SERVER_REFUSES)
@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_controls_newlines_format_characters_and_quotes_are_refused_for_any_server(name, api):
    with pytest.raises(InvalidModelName) as refused:
        check_model_name(name, api, "--to")
    message = str(refused.value)
    assert message.startswith("--to: ") and len(message.splitlines()) == 1


def test_every_entry_of_a_model_name_checks_it():
    """OLLAMA_MODEL / --model / the Dagster resource (Settings), and `migrate-model --to` / Dagster's to_model
    (`operations.migration_settings`, before the database or the server is asked anything)."""
    with pytest.raises(ValueError, match="--model / OLLAMA_MODEL"):
        Settings(ollama_model=INJECTION).validate()
    with pytest.raises(migration.MigrationError, match=r"the target model \(--to / to_model\)"):
        operations.migration_settings(Settings(database_url="postgresql://nobody@127.0.0.1:1/x"), INJECTION)


def test_status_prints_every_value_as_one_line():
    """A name recorded by an old version, holding a newline, cannot print a second `missing=0`."""
    text = format_status({"missing": 5, "model": INJECTION, "coverage_pct": "99.00", "stop_requested": False})
    assert text.splitlines() == [
        "missing=5",
        "model=m3\\nmissing=0\\ncoverage_pct=100.00",
        "coverage_pct=99.00",
        "stop_requested=false",
    ]
    assert one_line("a\\b\x1b[31m\u202e\u2028") == "a\\\\b\\x1b[31m\\u202e\\u2028"
    assert one_line("모델 名前 ü") == "모델 名前 ü", "printable text of any script stays as it is"


@pytest.mark.parametrize(
    "line, value, written",
    [
        (b"", "nomic-embed-text:v1.5", b"WIKI_EMBEDDINGS_MODEL=nomic-embed-text:v1.5\n"),
        (b"WIKI_EMBEDDINGS_MODEL=old\n", "hf.co/org/m@sha256:ab", b"WIKI_EMBEDDINGS_MODEL=hf.co/org/m@sha256:ab\n"),
        (b"WIKI_EMBEDDINGS_MODEL=old\n", "m;touch FILE", b"WIKI_EMBEDDINGS_MODEL='m;touch FILE'\n"),
        (b"WIKI_EMBEDDINGS_MODEL='old'\n", "all-minilm", b"WIKI_EMBEDDINGS_MODEL='all-minilm'\n"),
        (b'export WIKI_EMBEDDINGS_MODEL="old" # x\n', "a b", b'export WIKI_EMBEDDINGS_MODEL="a b" # x\n'),
    ],
)
def test_the_env_file_keeps_its_quoting_and_writes_a_value_bare_only_when_it_is_plain(tmp_path, line, value, written):
    env = tmp_path / ".env.beta"
    if line:
        env.write_bytes(line)
    set_value(env, MODEL_KEY, value)
    assert env.read_bytes() == written


@pytest.mark.parametrize(
    "line, value",
    [
        (b"WIKI_EMBEDDINGS_MODEL=old\n", "m\ntouch FILE"),
        (b"WIKI_EMBEDDINGS_MODEL=old\n", "it's;touch FILE"),
        (b"WIKI_EMBEDDINGS_MODEL='old'\n", "it's"),
        (b'WIKI_EMBEDDINGS_MODEL="old"\n', "$(touch FILE)"),
        (b'WIKI_EMBEDDINGS_MODEL="old"\n', "`touch FILE`"),
        (b'WIKI_EMBEDDINGS_MODEL="old"\n', 'a"b'),
        (b'WIKI_EMBEDDINGS_MODEL="old"\n', "back\\slash"),
        (b"WIKI_EMBEDDINGS_MODEL=old\n", "cr\rhere"),
    ],
)
def test_a_value_no_quoting_of_the_line_makes_safe_is_refused_and_the_file_unchanged(tmp_path, line, value):
    env = tmp_path / ".env.beta"
    env.write_bytes(b"# the backend's settings\n" + line)
    before = env.read_bytes()
    with pytest.raises(ReadinessError, match="refusing to write WIKI_EMBEDDINGS_MODEL=") as refused:
        set_value(env, MODEL_KEY, value)
    assert env.read_bytes() == before and len(str(refused.value).splitlines()) == 1


def test_the_readiness_flag_writes_as_before(tmp_path):
    env = tmp_path / ".env.beta"
    env.write_bytes(b'WIKI_EMBEDDINGS_READY="false"\n')
    set_flag(env, True)
    assert env.read_bytes() == b'WIKI_EMBEDDINGS_READY="true"\n' and read_flag(env) is True
