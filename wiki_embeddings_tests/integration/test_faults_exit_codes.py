"""One exit-code table for every command (issue 21, item 4): each command meets each failure class - the model
server down, the model missing, the database down, a bad setting, nothing to do - and ends with the README's code
and at most one `error:` line, never a traceback. Run as real subprocesses through the CLI, several at once."""

from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from wiki_embeddings.cli.exits import TABLE
from wiki_embeddings.devtools.ollama_server import OllamaServer
from wiki_embeddings_tests.integration.test_faults_support import cli_env, run_cli

README = Path(__file__).resolve().parents[2] / "README.md"
COMMANDS = ["backfill", "status", "stop", "resume", "import", "failures", "migrate-model", "verify", "config", "runs"]

# command -> the code of each class (server_down, model_missing, database_down, bad_setting, nothing_to_do):
# the README's "Exit codes" table, by command.
EXPECTED = {
    "backfill": (3, 4, 5, 2, 0),
    "status": (0, 0, 5, 2, 0),  # status never asks the model server
    "stop": (0, 0, 5, 2, 0),
    "resume": (3, 4, 5, 2, 0),  # resume runs a backfill
    "import": (3, 4, 5, 2, 0),  # a new table asks the server for its vector length
    "failures": (0, 0, 5, 2, 0),
    "migrate-model": (3, 4, 5, 2, 0),
    "verify": (3, 4, 5, 2, 0),
    "config": (0, 0, 0, 2, 0),  # config prints the settings: no database, no server
    "runs": (0, 0, 5, 2, 0),
}
CLASSES = ["server_down", "model_missing", "database_down", "bad_setting", "nothing_to_do"]


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _args(command: str, klass: str, schema: str) -> list[str]:
    """The command as an operator would run it in that situation."""
    if command == "import":
        if klass == "nothing_to_do":
            return ["import", "--limit", "12"]  # the same chunks again: nothing new
        lacking = "all-minilm" if klass == "model_missing" else "tiny"  # a model the server lacks, not a known one
        return ["import", "--limit", "5", "--table", f"{schema}.fresh_chunks", "--model", lacking]
    if command == "migrate-model":
        if klass == "nothing_to_do":
            return ["migrate-model", "--abort"]  # no migration in progress
        return ["migrate-model", "--to", "nosuch" if klass == "model_missing" else "m2"]
    return [command]


@pytest.fixture(scope="module")
def without_models():
    """A model server that has none of the tables' models (`nomic-embed-text` only)."""
    with OllamaServer(backend="hash", models=["nomic-embed-text:768"]) as srv:
        yield srv


@pytest.mark.parametrize("klass", CLASSES)
def test_every_command_maps_every_failure_class_to_its_documented_code_in_one_line(make_table, without_models, klass):
    table = make_table()
    table.load_wiki(12)
    assert table.backfill().state == "completed"
    schema = table.settings.table.split(".")[0]
    if klass != "nothing_to_do":
        table.sql(
            f"UPDATE {table.settings.table} SET embedding = NULL WHERE id IN (SELECT id FROM"
            f" {table.settings.table} ORDER BY id LIMIT 3)"
        )
    env, flags = cli_env(table), []
    env.pop("OLLAMA_MODEL")  # each command takes the table's recorded model (all-minilm), as the runbook's do
    if klass == "server_down":
        flags = ["--ollama-url", f"http://127.0.0.1:{_dead_port()}"]
    elif klass == "model_missing":
        flags = ["--ollama-url", without_models.url]
    elif klass == "database_down":
        flags = ["--database-url", f"postgresql://postgres@127.0.0.1:{_dead_port()}/wiki_test"]
    elif klass == "bad_setting":
        env["WIKI_EMBED_RETRIES"] = "-1"

    def run(command: str):
        argv = _args(command, klass, schema) + flags
        return command, argv, run_cli(table, *argv, env=env, timeout=90)

    at_once = [c for c in COMMANDS if c not in ("stop", "resume")]  # stop, then resume, change the stop request
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, at_once))
    results += [run("stop"), run("resume")]

    wrong = []
    for command, argv, done in results:
        want = EXPECTED[command][CLASSES.index(klass)]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        if done.returncode != want or "Traceback" in done.stderr + done.stdout or len(errors) > (1 if want else 0):
            wrong.append(f"{' '.join(argv)}: exit {done.returncode} (want {want}): {done.stderr.strip()[-400:]}")
    assert wrong == [], "\n".join(wrong)


def test_the_issues_tracebacks_are_one_line_and_a_code(make_table, without_models):
    """`migrate-model --to m2` with the server unreachable, `--to nosuch`, `import` into a new table whose model
    the server lacks, `backfill --max-minutes inf`: each was a traceback."""
    table = make_table()
    table.load_wiki(6)
    schema = table.settings.table.split(".")[0]
    dead = f"http://127.0.0.1:{_dead_port()}"
    cases = [
        (["migrate-model", "--to", "m2", "--ollama-url", dead], 3, "OLLAMA_URL"),
        (["migrate-model", "--to", "nosuch"], 4, "nosuch"),
        (["import", "--table", f"{schema}.new_one", "--limit", "3", "--ollama-url", without_models.url], 4, "pull"),
        (["backfill", "--max-minutes", "inf"], 2, "--max-minutes"),
    ]
    for argv, code, says in cases:
        done = run_cli(table, *argv, timeout=90)
        assert (done.returncode, "Traceback" in done.stderr) == (code, False), (argv, done.stderr)
        assert says in done.stderr + done.stdout, (argv, done.stderr)


def test_the_readme_has_one_exit_code_table_for_every_command_matching_the_code():
    text = README.read_text()
    section = text[text.index("### Exit codes") :]
    section = section[: section.index("\n#", 1)]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M))
    assert {int(code) for code in rows} == set(TABLE), "every code once, no other"
    for command in COMMANDS:
        assert f"`{command}`" in section, f"{command} is in the table"
    header = section[section.index("| command |") :]
    for command, codes in EXPECTED.items():
        row = re.search(rf"^\| `{re.escape(command)}` \|(.+)\|$", header, re.M)
        assert row, command
        cells = [c.strip() for c in row.group(1).split("|")]
        assert [int(re.match(r"\d+", c).group()) for c in cells[:5]] == list(codes), command
