"""Run every benchmark once, print the results table and write benchmarks/RESULTS.md.

    bash benchmarks/run.sh [--quick] [--only saturation,tuning,write,memory,model,index,long_text,weather,ceiling]
        [--no-pgai] [--profile]

Every figure is a ratio of two things measured in this same run. PostgreSQL is the project's embedded
server in a fresh data dir under /tmp, started here and stopped at the end; the Ollama-protocol server
runs in its own process. Sizes are scaled down 10x by --quick.

The long_text, weather and ceiling sections (bench_long_text.py, bench_weather.py, bench_ceiling.py) each have their
own block in RESULTS.md: `--only weather` (or `--only long_text`, `--only ceiling`) rewrites that block and keeps the
rest of the file as it was; a run without one of them keeps its block.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import (
    bench_ceiling,
    bench_index,
    bench_long_text,
    bench_memory,
    bench_model,
    bench_saturation,
    bench_tuning,
    bench_weather,
    bench_write,
)
from benchmarks.common import (
    REPO_ROOT,
    Bench,
    Result,
    fmt,
    log,
    machine_info,
    read_block,
    run_backfill,
    start_postgres,
    stop_postgres,
    wait_for_quiet,
    write_block,
)
from wiki_embeddings.settings import Settings

SECTIONS = ("saturation", "tuning", "write", "memory", "model", "index", "long_text", "weather", "ceiling")
# The sections of the main results table (long_text, weather and ceiling keep blocks of their own in RESULTS.md).
MAIN = tuple(s for s in SECTIONS if s not in ("weather", "long_text", "ceiling"))
OWN_BLOCKS = (bench_weather.SECTION, bench_ceiling.SECTION)  # sections whose results are not in the main table

METHOD = """\
## How each figure is measured

- **saturation**: the project's Ollama-protocol server (hash backend, own process, vector cache warmed
  first so it costs little CPU) answers every `/api/embed` after a fixed 40 ms while holding one of K
  slots. *Capacity* = the same server driven alone by a bare async client (prebuilt bodies, answers read
  but not parsed) with K requests in flight; *backfill* = `Backfill.run()` (batch 64, `--sleep-ms 0`,
  concurrency K) on a fresh table of real wiki paragraphs, chunks/s from its report. Best of 2 each.
  The *runbook loop* is the old shell-script behaviour: `SELECT … WHERE embedding IS NULL ORDER BY id
  LIMIT 64`, POST, one `UPDATE` per row, commit, sleep 150 ms, sequential, against the same server with
  1 slot. *pgai* is PyPI `pgai`'s vectorizer worker (`pgai vectorizer worker --once -c 1`, batch 64,
  `ai.destination_column`) on the same server and texts, chunks/s from its first committed batch to its
  last (start-up excluded); pgai is installed once into a throwaway venv (`/tmp/wiki-bench-pgai-venv`,
  ~5 minutes the first time; `--no-pgai` skips it).
- **tuning** (self-tuning depth and batch size, core/tuning.py): *default flags* = `Backfill.run()` with no
  `--concurrency` and no `--batch-size` (depth starts at 1 and tunes itself per server; batch up to 64).
  *Ceiling* = a bare async client (prebuilt bodies, answers read, not parsed) at the depth that keeps the
  server(s) busiest: the better of K and K+1 requests in flight per server, in the same run; medians of 3
  (2 with --quick). Servers: the hash server (own process, cache warmed), 40 ms per request, K slots.
  *2 servers*: two such processes (1 slot each) in `OLLAMA_URL`; the joint ceiling drives both at once.
  *4 workers*: four `Backfill` processes (`python -m benchmarks.bench_tuning --child`) started together on one
  table of twice the rows (the template's paragraphs over again) over both servers; chunks/s over the wall time
  from the common start to the last end (each worker's start-up included: probe, pre-flight, connections);
  its joint ceiling is measured on the same texts; double work = texts the servers embedded − chunks − one
  start-up probe per worker.
  *Client CPU*: `process_time` of a default-flags run vs a minimal script doing only the unavoidable work on
  the same chunks (keyset `SELECT … WHERE embedding IS NULL AND id > last LIMIT 64`, httpx POST, orjson parse +
  float32 matrix + finiteness/length check, binary `UPDATE … FROM unnest(%b, %b)`), zero-latency server; five
  interleaved rounds, medians. The same script with `httpx.AsyncClient` is a second, informative baseline: it
  shows what the async HTTP stack alone costs (the pipeline needs it to keep several requests in flight).
  *Politeness*: the server made CPU-model-like (5 ms + 42 ms per text, 1 slot: ~2.7 s per 64); a "user"
  thread sends one single-text embed a second while a capped run (`--max-minutes`) embeds; p95 of the user's
  request latency (its own ~47 ms service included) per mode, and each mode's chunks/s.
  *Growth*: median time of one `Store.claim` + `write_vectors` + `release` of 64 rows (vector(8), short texts)
  at the start and near the end of a 100,000-row and a 5,000,000-row table (500,000 with --quick),
  `Store.status()` on the large one, and the peak RSS (child process VmHWM) of a default-flags run capped at
  50,000 chunks (`--max-chunks`) on each table: memory must not grow with the table.
- **client CPU**: `time.process_time()` of the benchmark process around `Backfill.run()` (all its
  threads), server in another process with 0 ms latency; baseline = the runbook loop (sleep 0) in this
  process on the same server.
- **write path**: precomputed 384-d vectors written into the first 20,000 rows of a fresh 100,000-row
  table (the project's DDL, with the partial index on missing embeddings) in transactions of 64 (or
  256) rows on one autocommit connection, as the engine's writer does; rows/s and client CPU
  (`process_time`) per row, best of 2. The database's limit is one binary COPY of all 20,000 rows into a
  temp table + one `UPDATE … FROM` in one transaction. The two slow methods write a quarter of the rows.
- **memory**: the engine (`Backfill`) in a child process against the hash server's `tiny:32` at 0 ms,
  table `vector(32)` filled by `generate_series`; batch 64 / concurrency 1, unless the 100,000-chunk run
  predicts more than 120 s for 1,000,000 (then both runs use batch 256 / concurrency 2, as the table
  says); peak RSS = the child's `VmHWM`.
  `Store.status()` timed on the 1,000,000-row table before and after the backfill (the slower counts).
- **real model**: the real all-MiniLM-L6-v2 (`--backend minilm`, vector cache off, own process) on
  960 real wiki paragraphs that it takes whole (estimated at most 70 % of its 256-token window: the dev server,
  like Ollama, refuses a longer text, and the bare client must send what the pipeline sends); backfill with
  default flags / a bare client with 1 request in flight on the same texts, best of 2 each (15 requests of 64 a
  run: the model does ~40 such paragraphs/s on 2 cores).
- **index**: first one 384-d cosine distance is computed in its own connection (if that crashes the
  backend, the section is reported as not measurable); then the write rate of `Store.write_vectors`
  (batch 64) into a table with an HNSW index (`vector_cosine_ops`, defaults m=16, ef_construction=64)
  vs the same writes without it, and the time to build the index over the written rows afterwards
  (`Store.create_index`, maintenance_work_mem 512MB).
- **long text**: retrieval of head and tail sentences of long chunks with the real all-MiniLM-L6-v2, chunks cut to
  the window (today) vs pooled over window-sized pieces (core/pooling.py), per language; its own section below
  ("Long texts"), which `python -m benchmarks.bench_long_text` also rewrites alone. How the queries are made and
  the default chosen: that module's docstring.
"""


def profile_pipeline(settings: Settings) -> None:
    """cProfile one pipeline run (zero-latency server); top functions go to benchmarks/profile-pipeline.txt."""
    prof = cProfile.Profile()

    def under_profile(fn: Any) -> Any:
        prof.enable()
        try:
            return fn()
        finally:
            prof.disable()

    report, cpu = run_backfill(settings, profile=under_profile)
    out = io.StringIO()
    out.write(f"pipeline run: {report.embedded} chunks, {report.chunks_per_s:.0f} chunks/s, CPU {cpu:.2f} s\n\n")
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(35)
    path = REPO_ROOT / "benchmarks" / "profile-pipeline.txt"
    path.write_text(out.getvalue())
    log(f"  profile written to {path}")


def table_lines(results: list[Result]) -> list[str]:
    lines = [
        "| section | metric | measured | baseline | unit | ratio | target | met? |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for r in results:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        target = r.target
        if target and r.target_on == "measured":
            target = f"{target} (measured)"
        base = fmt(r.baseline)
        if r.baseline_name and r.baseline is not None:
            base = f"{base} ({r.baseline_name})"
        metric = r.metric + (f" — {r.note}" if r.note else "")
        lines.append(
            f"| {r.section} | {metric} | {fmt(r.measured)} | {base} | {r.unit} | {ratio} | {target} | {r.met} |"
        )
    return lines


def print_table(results: list[Result]) -> None:
    rows = [("section", "metric", "measured", "baseline", "unit", "ratio", "target", "met?")]
    for r in results:
        rows.append(
            (
                r.section,
                r.metric[:70],
                fmt(r.measured),
                fmt(r.baseline),
                r.unit,
                f"{r.ratio:.2f}" if r.ratio is not None else "-",
                r.target + (" (m)" if r.target and r.target_on == "measured" else ""),
                r.met,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_results(
    path: Path,
    bench: Bench,
    info: dict[str, str],
    argv: list[str],
    seconds: float,
    errors: list[str],
    ran: list[str],
    weather_notes: list[str],
) -> None:
    """The main part (the sections of MAIN) and the weather block, each rewritten only when its sections ran:
    `--only weather` keeps the main part's figures, a run of the other sections keeps the weather block. (The
    long_text block is put back by bench_long_text.write_section after this.)"""
    cmd = "bash benchmarks/run.sh" + (" " + " ".join(argv) if argv else "")
    old_main, old_block = bench_weather.split_results(path.read_text() if path.exists() else "")
    main = old_main or "# Benchmark results\n"
    if any(s in ran for s in MAIN):
        main = main_part(bench, info, cmd, seconds, [e for e in errors if not e.startswith("weather:")])
    block = old_block
    if "weather" in ran:
        weather = [r for r in bench.results if r.section == bench_weather.SECTION]
        notes = weather_notes + [f"error: {e}" for e in errors if e.startswith("weather:")]
        block = bench_weather.block(weather, info, cmd, bench.quick, notes)
    path.write_text(main.rstrip("\n") + "\n" + ("\n" + block if block else ""))


def main_part(bench: Bench, info: dict[str, str], cmd: str, seconds: float, errors: list[str]) -> str:
    results = [r for r in bench.results if r.section not in OWN_BLOCKS]
    out = [
        "# Benchmark results",
        "",
        f"Written by `{cmd}` on {info['date']} in {seconds / 60:.1f} min"
        + (" (**--quick**: sizes scaled down 10x)" if bench.quick else "")
        + ". Every ratio is measured / baseline, both measured in that same run.",
        "",
        "## Machine",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += ["", "## Results", ""]
    out += table_lines(results)
    missed = [r for r in results if r.met == "NO"]
    out += ["", "## Targets not met", ""]
    out += [
        f"- {r.section}: {r.metric} — {fmt(r.ratio if r.target_on == 'ratio' else r.measured)} vs {r.target}"
        for r in missed
    ] or ["- none"]
    notes = [n for n in bench.notes if not n.startswith("ceiling:")]
    if notes or errors:
        out += ["", "## Notes", ""]
        out += [f"- {n}" for n in notes]
        out += [f"- error: {e}" for e in errors]
    out += ["", METHOD]
    return "\n".join(out) + "\n"


def ceiling_section(
    bench: Bench, info: dict[str, str], argv: list[str], took: float, foreign: float, before: float, got: dict[str, Any]
) -> str:
    """The ceiling block of RESULTS.md (printed too): its table, met / not met, the sweep, its notes and the load."""
    results = [r for r in bench.results if r.section == bench_ceiling.SECTION]
    print()
    print("\n".join(bench_weather.table_lines(results)))
    notes = [n.removeprefix("ceiling: ") for n in bench.notes if n.startswith("ceiling:")]
    notes.append(
        f"The section ran {took / 60:.1f} min; other processes used {foreign:.2f} cores on average meanwhile (the "
        f"machine has {os.cpu_count()}; {before:.2f} just before it started)."
    )
    cmd = "bash benchmarks/run.sh" + (" " + " ".join(argv) if argv else "")
    return bench_ceiling.block(results, info, cmd, bench.quick, notes, bench_ceiling.detail_lines(got))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="scale every size down 10x")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument(
        "--no-pgai", action="store_true", help="skip the pgai baseline (it installs pgai in a /tmp venv)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile one pipeline run (benchmarks/profile-pipeline.txt)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=300,
        metavar="S",
        help="before each section, wait up to S seconds for other processes to stop using the CPU (300)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the /tmp data dir after the run")
    parser.add_argument("--results", type=Path, default=None, help="results file (default benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    results_path = args.results or REPO_ROOT / "benchmarks" / "RESULTS.md"
    long_text = bench_long_text.read_section(results_path)  # kept when this run does not measure it
    ceiling_block = read_block(results_path, bench_ceiling.BEGIN, bench_ceiling.END)  # likewise
    ceiling: dict[str, Any] = {}

    started = time.perf_counter()
    bench = start_postgres(args.quick, args.keep)
    log(f"embedded PostgreSQL in {bench.base} ({'quick' if args.quick else 'full'} run)")
    errors: list[str] = []
    load: dict[str, float] = {}
    foreign: dict[str, float] = {}
    took: dict[str, float] = {}
    waited = 0.0
    try:
        info = machine_info(bench.url)
        log(f"loaded {bench.load_template(bench.n(30_000, minimum=6000))} wiki paragraphs into the template table")
        runners = {
            "saturation": lambda: bench_saturation.run(
                bench, pgai=not args.no_pgai, profile=profile_pipeline if args.profile else None
            ),
            "tuning": lambda: bench_tuning.run(bench),
            "write": lambda: bench_write.run(bench),
            "memory": lambda: bench_memory.run(bench),
            "model": lambda: bench_model.run(bench),
            "index": lambda: bench_index.run(bench),
            "long_text": lambda: bench_long_text.run(bench),
            "weather": lambda: bench_weather.run(bench),
            "ceiling": lambda: ceiling.update(bench_ceiling.run(bench)),
        }
        for name in SECTIONS:
            if name not in only:
                continue
            w0 = time.perf_counter()
            busy = wait_for_quiet(args.wait_quiet)
            waited += time.perf_counter() - w0
            load[name] = busy
            t0 = time.perf_counter()
            log(f"== {name} (other processes were using {busy:.2f} cores just before)")
            monitor = bench.monitor()
            try:
                block = runners[name]()
                if name == "long_text":
                    long_text = block
            except Exception as exc:  # one failing section must not lose the others' figures
                traceback.print_exc()
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
            foreign[name] = monitor.foreign_cores()
            took[name] = time.perf_counter() - t0
            log(
                f"== {name} took {time.perf_counter() - t0:.0f} s; other processes used "
                f"{foreign[name]:.2f} cores on average meanwhile"
            )
    finally:
        stop_postgres(bench)
    seconds = time.perf_counter() - started
    print()
    print_table([r for r in bench.results if r.section not in OWN_BLOCKS])
    weather_notes: list[str] = []
    if "weather" in took:
        print()
        print("\n".join(bench_weather.table_lines([r for r in bench.results if r.section == bench_weather.SECTION])))
        weather_notes.append(
            f"The weather section ran {took['weather'] / 60:.1f} min; other processes used {foreign['weather']:.2f} "
            f"cores on average meanwhile (the machine has {os.cpu_count()}; {load['weather']:.2f} just before it "
            "started)."
        )
        print(weather_notes[-1])
    if "ceiling" in took:
        ceiling_block = ceiling_section(
            bench, info, argv, took["ceiling"], foreign["ceiling"], load["ceiling"], ceiling
        )
    for note in bench.notes:
        print(note)
    for err in errors:
        print(f"error: {err}")
    during = ", ".join(f"{k} {v:.2f}" for k, v in foreign.items() if k not in ("weather", "ceiling"))
    bench.notes.append(
        f"Other processes' CPU use during each section (cores, average; the machine has {os.cpu_count()}): "
        f"{during}. Before each section the benchmark waited (up to {args.wait_quiet:g} s) for the machine to "
        f"be quiet: {waited:.0f} s in all, so the benchmark itself ran {(seconds - waited) / 60:.1f} min. Other "
        "work during a section lowers its figures; the two sides of each ratio are measured back to back."
    )
    noisy = [k for k, v in foreign.items() if v > 0.25]
    if noisy:
        bench.notes.append(
            f"WARNING: other processes used more than 0.25 cores during: {', '.join(noisy)}; "
            "those figures are less reliable (rerun them with --only when the machine is quiet)."
        )
    write_results(results_path, bench, info, argv, seconds, errors, list(took), weather_notes)
    if long_text:
        bench_long_text.write_section(results_path, long_text)
    if ceiling_block:
        write_block(results_path, bench_ceiling.BEGIN, bench_ceiling.END, ceiling_block)
    log(f"wrote {results_path} ({seconds / 60:.1f} min)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
