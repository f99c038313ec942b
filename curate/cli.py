"""`curate` command line. Options that recur keep one meaning everywhere:
--out (the run folder), --config (a recipe YAML holding every option), --seed.

Examples:
  curate select                                   # the bundled sample, default recipe
  curate select data/alpaca.jsonl --out runs/a --budget 5000
  curate select pool/ --config recipe.yaml --fraction 0.1 --strategy deita
  curate ingest a.jsonl b.parquet --out runs/x     # normalise + exact dedup only
  curate inspect runs/x                            # counts, formats, lengths, rejects by reason
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import typer
from rich.markup import escape
from rich.table import Table

from curate.progress import STOP, Interrupted, catches, make_console

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Budgeted, diversity-balanced data selection for LLM instruction tuning.")
proxy_app = typer.Typer(no_args_is_help=True, help="Train, fine-tune and evaluate a small proxy LM.")
im_app = typer.Typer(no_args_is_help=True, help="InstructMining: fit the linear rule to your own results.")
app.add_typer(proxy_app, name="proxy")
app.add_typer(im_app, name="instructmining")
out = make_console()
err = make_console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"curate {version('curate')}", highlight=False)
        raise typer.Exit()


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """A warning as one `warning: ...` line on stderr: Python's default adds the file and the source line that
    raised it, which reads like a crash in a CI log (a damaged cache part set aside is not one)."""
    err.print(escape(f"warning: {_one_line(str(message))}"), highlight=False, soft_wrap=True)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Budgeted, diversity-balanced data selection for LLM instruction tuning."""
    import warnings

    warnings.showwarning = _one_line_warning

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"

OutOpt = typer.Option(None, "--out", "-o", help="Run folder (default: `runs/<name>`).")
ConfigOpt = typer.Option(None, "--config", "-c", help="Recipe YAML with any option; flags override it.")
SeedOpt = typer.Option(None, "--seed", help="Random seed (clustering, sampling).")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # one line, unwrapped
    raise typer.Exit(code)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _log_traceback(exc: BaseException) -> Path | None:
    """Write exc's traceback to a log file (cache folder, else the temp folder); return its path."""
    import tempfile

    text = "".join(traceback.format_exception(exc))
    name = f"curate-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (lambda: Path(os.environ.get("CURATE_CACHE_DIR", ".curate")) / "logs",
                   lambda: Path(tempfile.gettempdir()) / "curate-logs"):
        try:
            d = folder().resolve()
            d.mkdir(parents=True, exist_ok=True)
            path = d / name
            path.write_text(f"curate {' '.join(sys.argv[1:])}\n\n{text}")
            return path
        except OSError:
            continue
    return None


def _report(e: BaseException) -> None:
    """The error boundary: a user error -> one line naming the file/field, exit 2; a bug -> a short message and
    the log file holding its traceback, exit 1. Never a traceback on the terminal (CURATE_DEBUG=1 re-raises)."""
    from curate.config import RecipeError
    from curate.io.readers import InputError
    from curate.run import ConservationError

    if isinstance(e, typer.Exit | click.exceptions.ClickException | click.exceptions.Abort | SystemExit):
        raise e
    if os.environ.get("CURATE_DEBUG"):
        raise e
    if isinstance(e, KeyboardInterrupt | Interrupted):  # Interrupted: a worker stopped by the same Ctrl-C
        _fail("interrupted; finished stages and stored scores are kept, re-run to resume", 130)
    lm = sys.modules.get("curate.lm.base")  # loaded only if a model was used: then LMError may be raised
    if isinstance(e, InputError | RecipeError) or (lm is not None and isinstance(e, lm.LMError)):
        _fail(_one_line(str(e)))  # LMError: a model that cannot load, a vLLM server that does not start
    if isinstance(e, ConservationError):
        _fail(_one_line(f"row counts do not add up: {e}"), 3)
    if isinstance(e, OSError) and e.filename is not None:  # the environment: permissions, a full disk, ...
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        _fail(_one_line(f"{where}: {e.strerror or type(e).__name__}"))
    if isinstance(e, ValueError | FileNotFoundError) and str(e):
        _fail(_one_line(str(e)))
    log = _log_traceback(e)
    where = f"; the traceback is in {log}" if log else ""
    _fail(_one_line(f"internal error ({type(e).__name__}: {e}). This is a bug{where}"), 1)


def _guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run fn; user-facing errors become one clear line and a non-zero exit, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - classified by _report
        _report(e)


def _ctrl_c(signum: int, frame: Any) -> None:
    """The first Ctrl-C sets `curate.progress.STOP`, so stages running in worker threads (Prefect's thread runner)
    stop at their next batch and queued ones do not start, and unwinds the main thread (KeyboardInterrupt); a
    second one quits at once (stored results stay: every store write is atomic)."""
    if STOP.is_set():
        os._exit(130)
    STOP.set()
    sys.stderr.write("interrupted: stopping at the next batch (Ctrl-C again quits at once)\n")
    raise KeyboardInterrupt


def _boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so that nothing it raises (imports, run folders, Prefect) escapes as a traceback, and
    Ctrl-C stops it within a batch."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ours = catches(signal.SIGINT)
        STOP.clear()
        previous = signal.signal(signal.SIGINT, _ctrl_c) if ours else None
        try:
            return fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - classified by _report
            _report(e)
        finally:
            if ours:
                signal.signal(signal.SIGINT, previous)
    return wrapper


def _corrupt_parquet(folder: Path) -> tuple[Path, str] | None:
    """The first Parquet file in a run folder that does not read back, with the reason (None: all read)."""
    import pyarrow.parquet as pq

    for f in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        try:
            pq.read_table(f)
        except Exception as e:  # noqa: BLE001 - any failure to read means the file is damaged
            return f, _one_line(str(e))[:200]
    return None


def _on_run(run_dir: Path, fn: Callable[..., Any], *args: Any) -> Any:
    """_guard for commands that read a run folder: a damaged Parquet file in it is named as the cause."""
    try:
        return fn(*args)
    except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort, SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001
        bad = _corrupt_parquet(Path(run_dir))
        if bad is not None:
            _fail(f"{bad[0]}: corrupt Parquet file ({bad[1]}); re-run the command that wrote it")
        _report(e)


class _NoErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_prefect() -> Iterator[None]:
    """Keep Prefect's own ERROR records (a ~70-line traceback per failed task) off the terminal: the boundary
    reports the same exception in one line (user error) or with a log file (bug). The API still gets them."""
    from prefect.logging.configuration import setup_logging

    setup_logging()  # configure now, so the handlers filtered here are the ones the flow uses
    quiet = _NoErrors()
    handlers = set()
    for lg in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
                                      if n.split(".")[0] in ("prefect", "uvicorn", "fastapi", "httpx"))]:
        handlers.update(h for h in lg.handlers if isinstance(h, logging.StreamHandler))
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def _recipe(inputs: list[str] | None, config: Path | None, overrides: dict[str, Any], *, outputs: bool = True,
            selection: bool = True):
    """The recipe from --config + flags, validated as a whole before any work (validate_recipe)."""
    from curate.config import load_recipe
    from curate.validate import validate_recipe

    recipe = load_recipe(config, {**overrides, "inputs": list(inputs) if inputs else None})
    if not recipe.inputs:  # the bundled sample, named relative to here when it is below (it ends up in `source`)
        here = Path.cwd().resolve()
        recipe.inputs = [os.path.relpath(SAMPLE, here) if SAMPLE.is_relative_to(here) else str(SAMPLE)]
    if overrides.get("out") is None and (config is None or "out" not in (recipe.model_fields_set or set())):
        recipe.out = str(Path("runs") / recipe.name) if recipe.out == "runs/run" else recipe.out
    validate_recipe(recipe, outputs=outputs, selection=selection)
    return recipe


@app.command()
@_boundary
def ingest(
    inputs: list[str] = typer.Argument(..., help="Files, folders, HF datasets folders or hub names."),
    out_dir: Path = OutOpt,
    config: Path = ConfigOpt,
    fmt: str = typer.Option(None, "--format", help="Force an instruction format (default: auto per row)."),
    container: str = typer.Option(None, "--container", help="Force a file container (jsonl, csv, ...)."),
    split: str = typer.Option(None, "--split", help="One split of DatasetDict folders / dict-of-splits JSON."),
) -> None:
    """Normalise inputs into the canonical schema and drop exact duplicates (records.parquet)."""
    from curate.context import RunContext
    from curate.pipeline import open_run, stage_ingest

    recipe = _guard(_recipe, inputs, config, {"out": str(out_dir) if out_dir else None,
                                              "ingest.format": fmt, "ingest.container": container,
                                              "ingest.split": split}, selection=False)
    run = open_run(recipe)
    try:
        _guard(stage_ingest, RunContext(run, recipe))
    finally:
        run.save()  # also when ingest stops (an empty pool): the counts behind decisions.parquet stay on record
    _print_inputs(run.manifest)
    out.print(f"records: [bold]{escape(str(run.file('records.parquet')))}[/]")


def _print_inputs(manifest: dict) -> None:
    from curate.inspect import input_table

    out.print(input_table(manifest, "ingest"))


@app.command()
@_boundary
def select(
    inputs: list[str] = typer.Argument(None, help="Inputs (default: the bundled sample in data/sample)."),
    out_dir: Path = OutOpt,
    config: Path = ConfigOpt,
    seed: int = SeedOpt,
    budget: int = typer.Option(None, "--budget", "-n", help="Rows to select."),
    fraction: float = typer.Option(None, "--fraction", help="Fraction of the pool to select."),
    budget_tokens: int = typer.Option(None, "--budget-tokens", help="Token budget for the subset."),
    strategy: str = typer.Option(None, "--strategy", help="kmq | iterative | deita | fusion | threshold | random"),
    scorers: str = typer.Option(None, "--scorers", help="Comma-separated scorers (e.g. heuristics,ifd)."),
    model: str = typer.Option(None, "--model", help="Causal LM for model scorers: 'proxy' or a name/path."),
    embed_model: str = typer.Option(None, "--embed-model", help="minilm-static | minilm | a name/path."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Run the stages directly, without Prefect."),
    split: str = typer.Option(None, "--split", help="One split of DatasetDict folders / dict-of-splits JSON."),
    fmt: str = typer.Option(None, "--format", help="Force an instruction format (default: auto per row)."),
    vllm_python: Path = typer.Option(None, "--vllm-python", envvar="CURATE_VLLM_PYTHON",
                                     help="Interpreter of the vLLM environment (score.engine: vllm)."),
) -> None:
    """Ingest, dedup, embed, cluster, score and select a subset into RUN/selected.parquet."""
    if vllm_python is not None:  # a program to run comes from the command line or environment, never a recipe
        os.environ["CURATE_VLLM_PYTHON"] = str(vllm_python)
    overrides = {"out": str(out_dir) if out_dir else None, "seed": seed, "select.budget": budget,
                 "ingest.split": split, "ingest.format": fmt,
                 "select.fraction": fraction, "select.budget_tokens": budget_tokens,
                 "select.strategy": strategy, "score.model": model, "embed.model": embed_model,
                 "score.scorers": [s for s in scorers.split(",") if s] if scorers is not None else None}
    recipe = _guard(_recipe, inputs, config, overrides)
    if no_prefect:
        from curate.pipeline import run_local

        run = _guard(run_local, recipe)
    else:
        from flows.pipeline import run_flow

        with _quiet_prefect():
            run = _guard(run_flow, recipe)
    _summary(run)
    totals = run.manifest.get("totals") or {}
    if totals.get("selected") == 0 and totals.get("input_rows"):  # an empty subset, said where a CI log shows it
        why = ", ".join(f"{k}: {v:,}" for k, v in sorted((totals.get("reasons") or {}).items(), key=lambda kv: -kv[1]))
        budget = ((run.manifest.get("stages") or {}).get("select") or {}).get("budget")
        err.print(f"warning: no row was selected{f' under a budget of {budget}' if budget else ''} ({why}); each "
                  f"row's reason is in {run.file('decisions.parquet')}", highlight=False, soft_wrap=True)


def _summary(run) -> None:
    m = run.manifest
    from curate.inspect import stage_table

    _print_inputs(m)
    out.print(stage_table(m))
    out.print(f"selected: [bold]{run.file('selected.parquet')}[/]  decisions: {run.file('decisions.parquet')}")
    if run.file("report.html").exists():
        out.print(f"report: {run.file('report.html')}")


@app.command()
@_boundary
def inspect(path: Path = typer.Argument(..., help="A dataset file/folder or a run folder.")) -> None:
    """Counts, formats, length distributions and rejects by reason, for a dataset or a run."""
    from curate.inspect import inspect_path

    if not (path / "manifest.json").exists():  # a dataset: a damaged file in it is the user's input, not a run's
        inspect_path(path, out)
        return
    _on_run(path, inspect_path, path, out)


@app.command()
@_boundary
def export(
    run_dir: Path = typer.Argument(..., help="A run folder with selected.parquet."),
    fmt: str = typer.Option("sharegpt", "--format", help="alpaca | sharegpt"),
    dest: Path = typer.Option(None, "--dest", help="Output JSONL (default: `RUN/selected.<format>.jsonl`)."),
    license: str = typer.Option(None, "--license", help="License id for the dataset card (e.g. cc-by-4.0)."),
    license_note: str = typer.Option(None, "--license-note", help="Attribution / terms sentence for the card."),
) -> None:
    """Export the selected subset to Alpaca or ShareGPT JSONL, with a LLaMA-Factory `dataset_info.json` and a
    dataset card (`README.md`) beside it."""
    import polars as pl

    from curate.io.writers import export as do_export
    from curate.io.writers import write_handoff

    src = run_dir / "selected.parquet"
    if not src.exists():
        _fail(f"{src}: no selected.parquet in this run (run `curate select` first)")
    if _on_run(run_dir, lambda: pl.scan_parquet(src, glob=False).select(pl.len()).collect().item()) == 0:  # empty
        _fail(f"{src}: no row was selected (each row's reason is in decisions.parquet); nothing to export")
    if dest is not None and dest.is_dir():  # a folder: the file goes inside it
        dest = dest / f"selected.{fmt}.jsonl"
    path = _on_run(run_dir, lambda: do_export(src, fmt, dest or run_dir / f"selected.{fmt}.jsonl", handoff=False))
    files, notes = _on_run(run_dir, lambda: write_handoff(src, path.parent, exports={fmt: path}, license=license,
                                                          license_note=license_note))
    out.print(escape(f"wrote {path}"), *(escape(str(f)) for f in files), sep="\n  ", highlight=False)
    for note in notes:
        err.print(escape(f"note: {note}"), highlight=False)


@app.command()
@_boundary
def report(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Write RUN/report.html: pool vs subset, score distributions, a 2-D map, diversity."""
    from curate.report import write_report

    if not (run_dir / "manifest.json").exists():
        _fail(f"{run_dir}: not a run folder (no manifest.json)")
    out.print(f"wrote {_on_run(run_dir, write_report, run_dir)}")


@app.command()
@_boundary
def plan(
    inputs: list[str] = typer.Argument(None, help="Inputs (default: the bundled sample)."),
    config: Path = ConfigOpt,
    scorers: str = typer.Option(None, "--scorers", help="Comma-separated scorers."),
    strategy: str = typer.Option(None, "--strategy", help="kmq | iterative | deita | fusion | threshold | random"),
    budget: int = typer.Option(None, "--budget", help="Rows to select."),
    fraction: float = typer.Option(None, "--fraction", help="Fraction of the pool to select."),
    budget_tokens: int = typer.Option(None, "--budget-tokens", help="Token budget for the subset."),
    model: str = typer.Option(None, "--model", help="Causal LM for model scorers: 'proxy' or a name/path."),
    with_eval: bool = typer.Option(False, "--eval", help="Also price `curate eval` of the subset (default arms "
                                   "and seeds, SmolLM2 student; at assumed rates unless --measure)."),
    measure: bool = typer.Option(False, "--measure", help="Load the scoring LM and time it on 32 pool rows, as "
                                 "a run does, instead of assuming its rate (1-2 min on a CPU); with the iterative "
                                 "strategy or --eval, also two fine-tune steps."),
) -> None:
    """Estimate rows, tokens, engine calls, time and memory per stage, without running anything (with
    --measure: after timing the scoring LM on a few pool rows)."""
    from curate.measure import measure_lm_rate
    from curate.plan import eval_plan, lm_rate_note
    from curate.plan import plan as make_plan

    recipe = _guard(_recipe, inputs, config, {
        "score.scorers": [s for s in scorers.split(",") if s] if scorers is not None else None,
        "select.strategy": strategy, "select.budget": budget, "select.fraction": fraction,
        "select.budget_tokens": budget_tokens, "score.model": model}, outputs=False)
    eval_config = None
    if with_eval:
        from curate.eval import EvalConfig

        eval_config = EvalConfig()
    measured = _guard(measure_lm_rate, recipe, eval_config) if measure else None
    stages = _guard(make_plan, recipe, measured=measured)
    evals = _guard(eval_plan, recipe, measured=measured) if with_eval else []
    t = Table("stage", "rows", "engine calls", "time (2-core CPU)", "peak memory", title="plan")
    for s in stages + evals:
        mins = f"{s.seconds / 60:.1f} min" if s.seconds >= 60 else f"{s.seconds:.0f} s"
        t.add_row(s.stage, f"{s.rows:,}", f"{s.calls:,}" if s.calls else "-",
                  mins if s.seconds else "-", f"{s.memory_mb:,.0f} MB" if s.memory_mb else "-")
    out.print(t)
    total = sum(s.seconds for s in stages)
    out.print(f"total: about {total / 60:.1f} min on 2 CPU cores (GPU: embed and score stages are far faster)")
    out.print("(priced cold: embeddings, scores and feedback rounds already in the cache are read back, not redone)")
    note = lm_rate_note(recipe, measured=measured)
    if note:
        out.print(note)
    if evals:
        secs = sum(s.seconds for s in evals)
        how = ("rates measured here on the scoring rows" if measured and measured.get("eval_rates") else
               "rates assumed: curate/plan.py EVAL_RATES")
        out.print(f"eval: about {secs / 60:.1f} min more (engine calls = units; {how}; `curate eval RUN --dry-run` "
                  "measures on the run's own subset)")


@app.command("eval")
@_boundary
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder with selected.parquet."),
    reference: list[str] = typer.Option(None, "--reference", "-r", help="Reference set(s), any format ingest "
                                        "reads (default: a held-out slice of the pool)."),
    seeds: int = typer.Option(3, "--seeds", help="Fine-tunes per arm."),
    student: str = typer.Option("smollm2-135m", "--student", help="Packaged model name or HF model folder."),
    arms: str = typer.Option(",".join(("selected", "random_rows", "random_tokens", "random_length", "base")),
                             "--arms", help="Comma-separated arms."),
    epochs: float = typer.Option(1.0, "--epochs"),
    max_steps: int = typer.Option(None, "--max-steps", help="Cap on optimizer steps per fine-tune."),
    lr: float = typer.Option(1e-4, "--lr"),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per optimizer step."),
    micro_batch: int = typer.Option(None, "--micro-batch", help="Rows per forward pass, accumulated to --batch-size "
                                    "(default: 2 on a CPU, fewer padded positions; the whole batch on a GPU)."),
    max_length: int = typer.Option(512, "--max-length", help="Tokens per sequence (longer ones are truncated)."),
    lora: bool = typer.Option(False, "--lora", help="LoRA (peft) instead of a full fine-tune."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16"),
    threads: int = typer.Option(2, "--threads", help="CPU threads."),
    heldout: int = typer.Option(200, "--heldout", help="Held-out pool rows (when no --reference)."),
    reference_rows: int = typer.Option(500, "--reference-rows", help="Rows sampled per reference set (0 = all)."),
    accuracy_rows: int = typer.Option(50, "--accuracy-rows", help="Q/A rows answered greedily (0 = off)."),
    gen_tokens: int = typer.Option(256, "--gen-tokens", help="New tokens per greedy answer."),
    minutes: float = typer.Option(None, "--minutes", help="Fit the eval into this many minutes on this machine "
                                  "(calibrated): leaves out random_rows, then seeds, then random_length, then base."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Estimate the time, run nothing."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Run the units directly, without Prefect."),
) -> None:
    """Fine-tune a student on the subset and on random baselines; is the subset better than random?

    Each (arm, seed) is a Prefect task (a killed eval resumes at the unit it was in); `--no-prefect` runs the
    same units in this process. `--minutes` keeps the finished units: run it again to add seeds."""
    from curate.eval import (
        EvalConfig,
        calibrate,
        estimate,
        fit_to_minutes,
        long_prompt_note,
        overlap_note,
        plan_eval,
        run_eval,
    )

    if minutes is not None and not minutes > 0:
        _fail(f"--minutes must be > 0, got {minutes:g}")

    cfg = _guard(EvalConfig, student=student, seeds=seeds, arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
                 epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, micro_batch=micro_batch,
                 max_length=max_length, lora=lora, dtype=dtype, threads=threads, heldout_rows=heldout,
                 reference_rows=reference_rows or None, accuracy_rows=accuracy_rows, gen_tokens=gen_tokens)
    plan = _guard(plan_eval, run_dir, cfg, reference or None)
    calib = _guard(calibrate, plan)
    est = _guard(estimate, plan, calib)
    if minutes is not None:
        full = est["seconds"]
        plan = _guard(fit_to_minutes, plan, est, minutes)
        est = _guard(estimate, plan, calib)
        left = ", ".join(plan.fitted["left_out"]) or "nothing"
        out.print(f"--minutes {minutes:g}: left out {left} (the whole eval: about {full / 60:.1f} min here)",
                  highlight=False)
    t = Table("unit", "rows", "train tokens", "estimate", "state",
              title=f"curate eval ({plan.dtype}, {threads} threads)")
    note = {"done": "finished: read back", "stale": "a file from other settings: run again", "todo": ""}
    for (arm, seed), info in plan.arm_info.items():
        u = est["units"][f"{arm}-seed{seed}"]
        t.add_row(f"{arm} seed {seed}", f"{info['rows']:,}", f"{u['train_tokens']:,}",
                  f"{u['seconds']:.0f} s" if u["state"] != "done" else "-", note[u["state"]])
    out.print(t)
    out.print(f"reference sets: {', '.join(f'{r.name} ({len(r.convs)} rows)' for r in plan.references)}")
    for r in plan.references:
        if r.skipped:
            n = sum(r.skipped.values())
            out.print(f"  {r.name}: {n:,} row{'s' * (n != 1)} skipped "
                      f"({', '.join(f'{k}: {v:,}' for k, v in r.skipped.items())}), e.g. {r.skipped_example}",
                      highlight=False)
    for note in (overlap_note(plan), long_prompt_note(plan)):  # before the units run: the user can still change it
        if note:
            out.print(note, highlight=False)
    done = sum(u["state"] == "done" for u in est["units"].values())
    out.print(f"estimated time: {est['seconds'] / 60:.1f} min for {len(est['units']) - done} of {len(est['units'])} "
              "units" + (f" ({done} finished unit{'s are' if done != 1 else ' is'} read back)" if done else ""))
    if est["scale"]["from_units"]:
        n = est["scale"]["from_units"]
        whose = "unit's" if n == 1 else "units'"
        out.print(f"  priced from {n} finished {whose} real times: x{est['scale']['factor']:.2f} the "
                  "calibration", highlight=False)
    elif calib.get("load", 0) >= calib.get("cpus", 1):
        out.print(f"  calibrated while the machine was busy (load {calib['load']:.1f} on {calib['cpus']} cores): the "
                  "estimate may be high; once a unit finishes, its real time corrects it", highlight=False)
    if dry_run:
        return
    if no_prefect:
        doc = _guard(run_eval, run_dir, plan=plan)
    else:
        from flows.eval import run_eval_flow

        with _quiet_prefect():
            doc = _guard(run_eval_flow, plan, reference or None)
    t = Table("reference", "arm", "loss (95% CI)", "exact match", title="curate eval")
    for name, e in doc["references"].items():
        acc = e.get("accuracy", {}).get("arms", {})
        for arm, v in e["loss"].items():
            a = acc.get(arm)
            t.add_row(name, arm, f"{v['mean']:.4f} [{v['ci'][0]:.4f}, {v['ci'][1]:.4f}]",
                      f"{a['mean']:.3f}" if a else "-")
    out.print(t)
    out.print(doc["verdict_line"], highlight=False)
    out.print(f"wrote {run_dir / 'eval.json'}; `curate report {run_dir}` adds it to report.html", highlight=False)


@proxy_app.command("train")
@_boundary
def proxy_train(
    data: list[str] = typer.Argument(..., help="Data to train on (any format ingest reads)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Model folder (HF format)."),
    size: str = typer.Option("tiny", "--size", help="tiny (CPU default) | small | base"),
    steps: int = typer.Option(None, "--steps", help="Training steps (default: by size)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a small LLaMA-architecture LM and its BPE tokenizer from scratch on DATA."""
    from curate.io.readers import expand_inputs
    from curate.lm.proxy import train_proxy

    files = _guard(expand_inputs, data)
    src = files[0] if len(files) == 1 else files
    out.print(f"wrote {_guard(train_proxy, src, out_dir, size=size, steps=steps, seed=seed)}")


@proxy_app.command("finetune")
@_boundary
def proxy_finetune(
    base: Path = typer.Argument(..., help="A proxy (or any small HF causal LM) folder."),
    data: str = typer.Argument(..., help="The subset to fine-tune on, e.g. RUN/selected.parquet."),
    out_dir: Path = typer.Option(..., "--out", "-o"),
    epochs: float = typer.Option(1.0, "--epochs"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Supervised fine-tuning on a subset (loss on answer tokens only; the fine-tune `curate eval` runs)."""
    from curate.lm.proxy import finetune_proxy

    out.print(f"wrote {_guard(finetune_proxy, base, data, out_dir, epochs=epochs, lr=lr, seed=seed)}")


@proxy_app.command("eval")
@_boundary
def proxy_eval(
    model_dir: Path = typer.Argument(..., help="A model folder."),
    reference: str = typer.Argument(..., help="Reference set with answers (e.g. LIMA, MT-Bench references)."),
) -> None:
    """Mean response loss (nats/token) of MODEL on REFERENCE: lower is better."""
    from curate.lm.evaluate import eval_proxy

    out.print(f"loss {_guard(eval_proxy, model_dir, reference):.4f}")


@im_app.command("fit")
@_boundary
def instructmining_fit(
    results: Path = typer.Argument(..., help="CSV/Parquet: one row per fine-tuned subset, indicator means + loss."),
    loss: str = typer.Option("loss", "--loss", help="Column with the evaluation loss."),
    stepwise: bool = typer.Option(True, "--stepwise/--no-stepwise", help="Backward p-value elimination."),
    save: Path = typer.Option(None, "--save", help="Write the fitted rule as JSON (for the scorer)."),
) -> None:
    """Fit InstructMining's linear rule log(loss) ~ indicators to your own (subset -> eval loss) results."""
    import polars as pl

    from scorers.instructmining import fit_rule

    df = _guard(pl.read_csv if results.suffix == ".csv" else pl.read_parquet, results)
    if loss not in df.columns:
        _fail(f"{results}: no column {loss!r} (columns: {', '.join(df.columns)})")
    rule = _guard(fit_rule, df.drop(loss), df[loss].to_numpy(), stepwise=stepwise)
    t = Table("term", "coefficient", "p-value", title=f"log(loss) rule, R²={rule.r2:.3f}, n={rule.n}")
    t.add_row("intercept", f"{rule.intercept:.6g}", "")
    for k, v in rule.coefs.items():
        t.add_row(k, f"{v:.6g}", f"{rule.pvalues.get(k, float('nan')):.3g}")
    out.print(t)
    if save:
        rule.save(save)
        out.print(f"wrote {save}; use it with score.params.instructmining.fitted_rule: {save}")


@app.command()
@_boundary
def serve(
    watch: Path = typer.Option(..., "--watch", help="Folder where new data lands."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder, re-selected on every run."),
    cron: str = typer.Option("0 * * * *", "--cron", help="Schedule (cron, UTC)."),
    config: Path = ConfigOpt,
) -> None:
    """Serve the scheduled flow: on each tick, embed/score only new rows and re-select over the whole pool."""
    from curate.validate import watch_recipe

    recipe = _guard(watch_recipe, watch, out_dir, config)  # checked as `curate select` checks, before Prefect
    from flows.serve import serve_command

    if signal.getsignal(signal.SIGINT) is _ctrl_c:  # serve stops on Ctrl-C its own way (no stages run here)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _guard(serve_command, recipe, cron=cron)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
