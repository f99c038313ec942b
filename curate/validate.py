"""A recipe checked as a whole before any work: inputs readable, scorers known (named as the user typed them),
columns named in thresholds/fusion written by the chosen scorers, run folder and cache writable.

Apart from `curate/config.py` (which every stage imports) because it reaches into the scorers, readers and
selection code: a stage's cache key follows its imports, and no stage should depend on the checks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from curate.config import Recipe, RecipeError

#: pool columns a threshold, fusion weight or quality score may name besides the scorers' own columns
POOL_COLUMNS = ("n_tokens", "n_tokens_model", "n_chars", "instruction_chars", "response_chars", "n_turns", "row",
                "cluster", "distance")


def validate_recipe(recipe: Recipe, *, outputs: bool = True, selection: bool = True) -> None:
    """Everything about a recipe that can be checked before any work; raises RecipeError (or InputError).

    Inputs exist and are readable regular files/folders; scorers exist (named as the user typed them) and
    their parameters are valid; thresholds parse and, like fusion weights and quality columns, name columns
    the chosen scorers write; the strategy has what it needs; the run folder and the cache are writable.
    selection=False (`curate ingest`) skips what only scoring and selection use (and the scorers' imports).
    """
    from curate.io.readers import detect_container, expand_inputs

    if recipe.inputs:
        sources = expand_inputs(recipe.inputs, recipe.ingest.split)
        if recipe.ingest.container is None:  # an unknown file type is known now, not after Prefect and a run start
            for source in sources:
                detect_container(source)
    if selection:
        _check_selection(recipe)
    if outputs:
        check_writable_dir(Path(recipe.out), "--out (run folder)")
        from curate.run import cache_dir

        try:
            cache = cache_dir()
        except OSError as e:
            raise RecipeError(f"cache folder {os.environ.get('CURATE_CACHE_DIR', '.curate')}: cannot be created "
                              f"({e.strerror or e}); set CURATE_CACHE_DIR to a writable folder") from None
        check_writable_dir(cache, "cache folder (CURATE_CACHE_DIR)")


def watch_recipe(watch: str | Path, out: str | Path, config: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe `curate serve` schedules: `config` (optional YAML) + overrides, inputs = [watch], out = out.

    Checked as a whole like `curate select`'s (validate_recipe) before any Prefect work, so a bad recipe is one
    line at start-up, not a failed run at every tick; only the folder's files are not checked: it may be empty
    until data lands, and each run reports what it cannot read.
    """
    from curate.config import load_recipe
    from curate.io.readers import InputError

    folder = Path(watch).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"{folder}: watched folder not found (create it; new data files land there)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InputError(f"{folder}: permission denied (the watched folder must be readable)")
    recipe = load_recipe(config, overrides)
    recipe.inputs = [str(folder.resolve())]
    recipe.out = str(Path(out).expanduser().resolve())
    validate_recipe(recipe.model_copy(update={"inputs": []}))
    return recipe


def _check_selection(recipe: Recipe) -> None:
    from curate.embed import EmbedError, check_safe_weights

    for field, model in (("embed.model", recipe.embed.enabled and recipe.embed.model),
                         ("score.model", recipe.score.model)):
        if model and Path(model).is_dir():  # safetensors only, said before any work
            try:
                check_safe_weights(model, field)
            except EmbedError as e:
                raise RecipeError(str(e)) from None
    columns = _check_scorers(recipe)
    _check_columns(recipe, columns)
    _check_strategy(recipe)
    _check_engine(recipe)


def _check_scorers(recipe: Recipe) -> set[str]:
    """The columns the recipe's scorers write; RecipeError naming the scorer as the user typed it."""
    from curate.scoring import ScorerError, available, get_scorer

    names = available()
    cols: set[str] = set()
    for name in recipe.score.scorers:
        try:
            scorer = get_scorer(name, **recipe.score.params.get(name, {}))
        except ScorerError as e:
            msg = str(e)
            if "unknown scorer" in msg:
                msg = f"unknown scorer {name!r}; available: {', '.join(names)}"
            raise RecipeError(f"score.scorers: {msg}") from None
        cols.update(scorer.columns)
    typos = sorted(set(recipe.score.params) - set(names))  # a misspelt name's parameters were silently ignored
    if typos:
        raise RecipeError(f"score.params: {', '.join(map(repr, typos))} is no scorer; available: {', '.join(names)}")
    for name in sorted(set(recipe.score.params) - set(recipe.score.scorers)):  # off now, checked for when it is on
        try:
            get_scorer(name, **recipe.score.params[name])
        except ScorerError as e:
            raise RecipeError(f"score.params: {e}") from None
    return cols


def _check_strategy(recipe: Recipe) -> None:
    """What a strategy needs beyond columns; each of these failed only at the select stage, after scoring."""
    sel = recipe.select
    if sel.cluster_min and sel.strategy not in ("kmq", "iterative"):
        raise RecipeError(f"select.cluster_min: needs select.strategy kmq or iterative; {sel.strategy} walks one "
                          "global order, where only cluster_max and source_weights apply")
    if sel.strategy == "deita" and not recipe.embed.enabled:
        raise RecipeError("select.strategy deita: its redundancy filter compares embeddings, and embed.enabled is "
                          "false")
    if sel.strategy == "fusion" and sel.fusion and not any(sel.fusion.values()):
        raise RecipeError("select.fusion: every weight is 0; give at least one column a weight (negative = lower is "
                          "better)")


def _check_engine(recipe: Recipe) -> None:
    """score.engine vllm without servers starts one: its interpreter (never named by a recipe) must exist."""
    from curate.scoring import scorer_class

    if recipe.score.engine != "vllm" or recipe.score.vllm_urls:
        return
    if not any(scorer_class(n).needs.engine for n in recipe.score.scorers):
        return
    from curate.lm.vllm import default_vllm_python

    py = default_vllm_python()
    if not (os.path.isfile(py) and os.access(py, os.X_OK)):
        raise RecipeError(f"score.engine vllm: no vLLM interpreter at {py}; build it (bash "
                          "curate/lm/setup_vllm_env.sh), pass --vllm-python / CURATE_VLLM_PYTHON, or give "
                          "score.vllm_urls")


def _check_columns(recipe: Recipe, scorer_columns: set[str]) -> None:
    known = scorer_columns | set(POOL_COLUMNS)
    chosen = ", ".join(recipe.score.scorers) or "none"

    def need(column: str, where: str) -> None:
        if column not in known:
            raise RecipeError(f"{where}: column {column!r} is not written by the chosen scorers ({chosen}); "
                              f"available: {', '.join(sorted(known))}")

    sel = recipe.select
    if sel.thresholds:  # curate.select imports its strategies: only when there is something to parse
        from curate.select.budget import SelectionError
        from curate.select.threshold import Threshold
    for text in sel.thresholds:
        try:
            t = Threshold.parse(text)
        except SelectionError as e:
            raise RecipeError(f"select.thresholds: {e}") from None
        need(t.column, f"select.thresholds {text!r}")
    for col in sel.fusion:
        need(col, "select.fusion")
    if sel.strategy == "fusion" and not sel.fusion:
        raise RecipeError("select.fusion: the fusion strategy needs {column: weight} (negative = lower is better)")
    if sel.score:
        need(sel.score, "select.score")
    elif sel.strategy == "deita":
        from curate.select.recipe import QUALITY_PRIORITY

        if not any(c in known for c in QUALITY_PRIORITY):
            raise RecipeError(f"select.score: the deita strategy ranks by a score, and the chosen scorers ({chosen}) "
                              f"write none of {', '.join(QUALITY_PRIORITY)}; add a scorer or set select.score")
    if sel.cluster_max is not None and sel.cluster_max < sel.cluster_min:
        raise RecipeError(f"select.cluster_max ({sel.cluster_max}) is below select.cluster_min ({sel.cluster_min})")
    if any(w < 0 for w in sel.source_weights.values()):
        raise RecipeError("select.source_weights: weights must be >= 0")
    sd = recipe.semdedup
    if sd.enabled and recipe.embed.enabled and sd.keep == "score":
        if not sd.keep_score:
            raise RecipeError("semdedup.keep_score: semdedup.keep = 'score' needs a score column")
        need(sd.keep_score, "semdedup.keep_score")


def check_writable_dir(path: Path, what: str) -> None:
    """`path` is (or can be made) a folder we can write in: not a file, not read-only. Creates it.

    A '[' in it is refused: polars reads a Parquet path as a glob, so every stage after ingest failed on such a
    folder with an internal error ("expanded paths were empty").
    """
    if "[" in str(path):
        raise RecipeError(f"{what} {path}: a '[' in the path is read as a file pattern by the Parquet reader; "
                          "choose a folder without '['")
    if path.exists() and not path.is_dir():
        raise RecipeError(f"{what} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".curate-write-test-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RecipeError(f"{what} {e.filename or path}: not writable ({e.strerror or e})") from None
    manifest = path / "manifest.json"
    if manifest.exists():
        import json

        try:
            json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise RecipeError(f"{manifest}: corrupt manifest ({e}); delete it or use another run folder") from None
