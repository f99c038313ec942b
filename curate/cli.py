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

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from curate.progress import make_console

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


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Budgeted, diversity-balanced data selection for LLM instruction tuning."""

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"

OutOpt = typer.Option(None, "--out", "-o", help="Run folder (default: `runs/<name>`).")
ConfigOpt = typer.Option(None, "--config", "-c", help="Recipe YAML with any option; flags override it.")
SeedOpt = typer.Option(None, "--seed", help="Random seed (clustering, sampling).")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _guard(fn, *args: Any, **kwargs: Any) -> Any:
    """Run fn; user-facing errors become one clear line and a non-zero exit, never a traceback."""
    from curate.config import RecipeError
    from curate.io.readers import InputError
    from curate.run import ConservationError

    try:
        return fn(*args, **kwargs)
    except (InputError, RecipeError) as e:
        _fail(str(e))
    except ConservationError as e:
        _fail(f"row counts do not add up: {e}", 3)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("CURATE_DEBUG"):
            raise
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; finished stages and stored scores are kept, re-run to resume", 130)


def _recipe(inputs: list[str] | None, config: Path | None, overrides: dict[str, Any]):
    from curate.config import load_recipe

    recipe = load_recipe(config, {**overrides, "inputs": list(inputs) if inputs else None})
    if not recipe.inputs:  # the bundled sample, named relative to here when it is below (it ends up in `source`)
        here = Path.cwd().resolve()
        recipe.inputs = [os.path.relpath(SAMPLE, here) if SAMPLE.is_relative_to(here) else str(SAMPLE)]
    if overrides.get("out") is None and (config is None or "out" not in (recipe.model_fields_set or set())):
        recipe.out = str(Path("runs") / recipe.name) if recipe.out == "runs/run" else recipe.out
    return recipe


@app.command()
def ingest(
    inputs: list[str] = typer.Argument(..., help="Files, folders, HF datasets folders or hub names."),
    out_dir: Path = OutOpt,
    config: Path = ConfigOpt,
    fmt: str = typer.Option(None, "--format", help="Force an instruction format (default: auto per row)."),
    container: str = typer.Option(None, "--container", help="Force a file container (jsonl, csv, ...)."),
) -> None:
    """Normalise inputs into the canonical schema and drop exact duplicates (records.parquet)."""
    from curate.context import RunContext
    from curate.pipeline import open_run, stage_ingest

    recipe = _guard(_recipe, inputs, config, {"out": str(out_dir) if out_dir else None,
                                              "ingest.format": fmt, "ingest.container": container})
    run = open_run(recipe)
    _guard(stage_ingest, RunContext(run, recipe))
    run.save()
    _print_inputs(run.manifest)
    out.print(f"records: [bold]{run.file('records.parquet')}[/]")


def _print_inputs(manifest: dict) -> None:
    from curate.inspect import input_table

    out.print(input_table(manifest, "ingest"))


@app.command()
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
) -> None:
    """Ingest, dedup, embed, cluster, score and select a subset into RUN/selected.parquet."""
    overrides = {"out": str(out_dir) if out_dir else None, "seed": seed, "select.budget": budget,
                 "select.fraction": fraction, "select.budget_tokens": budget_tokens,
                 "select.strategy": strategy, "score.model": model, "embed.model": embed_model,
                 "score.scorers": [s for s in scorers.split(",") if s] if scorers is not None else None}
    recipe = _guard(_recipe, inputs, config, overrides)
    if no_prefect:
        from curate.pipeline import run_local

        run = _guard(run_local, recipe)
    else:
        from flows.pipeline import run_flow

        run = _guard(run_flow, recipe)
    _summary(run)


def _summary(run) -> None:
    m = run.manifest
    from curate.inspect import stage_table

    _print_inputs(m)
    out.print(stage_table(m))
    out.print(f"selected: [bold]{run.file('selected.parquet')}[/]  decisions: {run.file('decisions.parquet')}")
    if run.file("report.html").exists():
        out.print(f"report: {run.file('report.html')}")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A dataset file/folder or a run folder.")) -> None:
    """Counts, formats, length distributions and rejects by reason, for a dataset or a run."""
    from curate.inspect import inspect_path

    _guard(inspect_path, path, out)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder with selected.parquet."),
    fmt: str = typer.Option("sharegpt", "--format", help="alpaca | sharegpt"),
    dest: Path = typer.Option(None, "--dest", help="Output JSONL (default: `RUN/selected.<format>.jsonl`)."),
    license: str = typer.Option(None, "--license", help="License id for the dataset card (e.g. cc-by-4.0)."),
    license_note: str = typer.Option(None, "--license-note", help="Attribution / terms sentence for the card."),
) -> None:
    """Export the selected subset to Alpaca or ShareGPT JSONL, with a LLaMA-Factory `dataset_info.json` and a
    dataset card (`README.md`) beside it."""
    from curate.io.writers import export as do_export
    from curate.io.writers import write_handoff

    src = run_dir / "selected.parquet"
    if not src.exists():
        _fail(f"{src}: no selected.parquet in this run (run `curate select` first)")
    path = _guard(do_export, src, fmt, dest or run_dir / f"selected.{fmt}.jsonl", handoff=False)
    files, notes = _guard(write_handoff, src, path.parent, exports={fmt: path}, license=license,
                          license_note=license_note)
    out.print(f"wrote {path}", *files, sep="\n  ", highlight=False)
    for note in notes:
        err.print(f"note: {note}", highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Write RUN/report.html: pool vs subset, score distributions, a 2-D map, diversity."""
    from curate.report import write_report

    if not (run_dir / "manifest.json").exists():
        _fail(f"{run_dir}: not a run folder (no manifest.json)")
    out.print(f"wrote {_guard(write_report, run_dir)}")


@app.command()
def plan(
    inputs: list[str] = typer.Argument(None, help="Inputs (default: the bundled sample)."),
    config: Path = ConfigOpt,
    scorers: str = typer.Option(None, "--scorers", help="Comma-separated scorers."),
    strategy: str = typer.Option(None, "--strategy", help="kmq | iterative | deita | fusion | threshold | random"),
    budget: int = typer.Option(None, "--budget", help="Rows to select."),
) -> None:
    """Estimate rows, tokens, engine calls, time and memory per stage, without running anything."""
    from curate.plan import plan as make_plan

    recipe = _guard(_recipe, inputs, config, {
        "score.scorers": [s for s in scorers.split(",") if s] if scorers is not None else None,
        "select.strategy": strategy, "select.budget": budget})
    stages = _guard(make_plan, recipe)
    t = Table("stage", "rows", "engine calls", "time (2-core CPU)", "peak memory", title="plan")
    for s in stages:
        mins = f"{s.seconds / 60:.1f} min" if s.seconds >= 60 else f"{s.seconds:.0f} s"
        t.add_row(s.stage, f"{s.rows:,}", f"{s.calls:,}" if s.calls else "-",
                  mins if s.seconds else "-", f"{s.memory_mb:,.0f} MB" if s.memory_mb else "-")
    out.print(t)
    total = sum(s.seconds for s in stages)
    out.print(f"total: about {total / 60:.1f} min on 2 CPU cores (GPU: embed and score stages are far faster)")


@proxy_app.command("train")
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
def proxy_finetune(
    base: Path = typer.Argument(..., help="A proxy (or any small HF causal LM) folder."),
    data: str = typer.Argument(..., help="The subset to fine-tune on, e.g. RUN/selected.parquet."),
    out_dir: Path = typer.Option(..., "--out", "-o"),
    epochs: float = typer.Option(1.0, "--epochs"),
) -> None:
    """Supervised fine-tuning on a subset (prompt tokens masked): the feedback signal for selection."""
    from curate.lm.proxy import finetune_proxy

    out.print(f"wrote {_guard(finetune_proxy, base, data, out_dir, epochs=epochs)}")


@proxy_app.command("eval")
def proxy_eval(
    model_dir: Path = typer.Argument(..., help="A model folder."),
    reference: str = typer.Argument(..., help="Reference set with answers (e.g. LIMA, MT-Bench references)."),
) -> None:
    """Mean response loss (nats/token) of MODEL on REFERENCE: lower is better."""
    from curate.lm.proxy import eval_proxy

    out.print(f"loss {_guard(eval_proxy, model_dir, reference):.4f}")


@im_app.command("fit")
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
def serve(
    watch: Path = typer.Option(..., "--watch", help="Folder where new data lands."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder, re-selected on every run."),
    cron: str = typer.Option("0 * * * *", "--cron", help="Schedule (cron, UTC)."),
    config: Path = ConfigOpt,
) -> None:
    """Serve the scheduled flow: on each tick, embed/score only new rows and re-select over the whole pool."""
    from flows.serve import serve_command

    _guard(serve_command, watch, out_dir, cron=cron, config=config)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
