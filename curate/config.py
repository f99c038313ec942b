"""The recipe: every option of a run in one validated object, loadable from YAML so a run can be repeated.

CLI flags override recipe fields; the final recipe is written into the run's manifest. Field names are the
same in the YAML file, the CLI (`--budget` -> select.budget) and the Prefect flow parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(_Section):
    format: str = "auto"  # instruction format (auto-detected per row) or one of curate.io.formats.FORMAT_NAMES
    container: str | None = None  # file container override (jsonl, json, parquet, csv, tsv, hf_disk, hf_hub)
    split: str | None = None  # one split of DatasetDict folders / dict-of-splits JSON (default: every split)


class EmbedConfig(_Section):
    enabled: bool = True
    # "minilm-static": a model2vec model distilled locally from MiniLM (fast CPU default); "minilm": the
    # packaged all-MiniLM-L6-v2; or any sentence-transformers name/path.
    model: str = "minilm-static"
    view: Literal["user", "instruction_response", "conversation"] = "user"
    max_seq_length: int = 256
    batch_size: int = 64


class ClusterConfig(_Section):
    k: int | None = None  # None: curate.cluster.default_k(n)
    niter: int = 20


class SemDedupConfig(_Section):
    enabled: bool = True
    eps: float = 0.05  # drop a row whose cosine similarity to a kept row exceeds 1 - eps
    keep: Literal["farthest", "closest", "random", "score"] = "farthest"
    keep_score: str | None = None  # score column when keep == "score"
    view: Literal["user", "instruction_response", "conversation"] = "instruction_response"


class ScoreConfig(_Section):
    scorers: list[str] = Field(default_factory=lambda: ["heuristics", "ifd"])
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-scorer parameters
    # causal LM for model-based scorers: "proxy" = a small LM curate trains on the pool itself (offline CPU
    # default), or any HF name / local path
    model: str = "proxy"
    engine: Literal["hf", "vllm"] = "hf"
    vllm_urls: list[str] = Field(default_factory=list)  # running vLLM servers; empty = start one locally
    vllm_python: str = ".venv-vllm/bin/python"
    max_length: int = 512
    batch_size: int = 512
    shards: int = 4  # scoring is split in this many shard tasks (resume granularity)


class SelectConfig(_Section):
    strategy: Literal["kmq", "iterative", "deita", "fusion", "threshold", "random"] = "kmq"
    budget: int | None = None  # rows
    fraction: float | None = None
    budget_tokens: int | None = None
    tokenizer: str | None = None  # model whose tokenizer counts tokens for budget_tokens (None: n_tokens)
    score: str | None = None  # quality column for kmq/deita (None: strategy default)
    fusion: dict[str, float] = Field(default_factory=dict)  # column -> signed weight (negative = lower is better)
    thresholds: list[str] = Field(default_factory=list)  # e.g. ["heur_flags < 1", "ifd < 1"]
    tau: float = 0.9  # deita redundancy threshold
    # iterative (Diversify-and-Conquer): rounds, softmax temperature over per-cluster feedback, and the probe
    # rows per cluster on which the proxy fine-tuned after each round measures its loss
    rounds: int = Field(default=3, ge=1)
    feedback_temperature: float = Field(default=1.0, gt=0)
    probe_per_cluster: int = Field(default=8, ge=1)
    proportional: bool = True
    cluster_min: int = 0
    cluster_max: int | None = None
    source_weights: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_budget(self) -> SelectConfig:
        given = [x for x in (self.budget, self.fraction, self.budget_tokens) if x is not None]
        if len(given) > 1:
            raise ValueError("give at most one of budget, fraction, budget_tokens")
        return self


class Recipe(_Section):
    name: str = "run"
    inputs: list[str] = Field(default_factory=list)
    out: str = "runs/run"
    seed: int = 0
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    semdedup: SemDedupConfig = Field(default_factory=SemDedupConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    export: list[Literal["alpaca", "sharegpt"]] = Field(default_factory=list)
    report: bool = True


class RecipeError(ValueError):
    """A recipe file or option that is not valid; the message says which field and why."""


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Recipe from a YAML file (optional) with dotted-key overrides (`{"select.budget": 500}`)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise RecipeError(f"{p}: recipe file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a recipe must be a mapping of options")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise RecipeError(f"{where}invalid recipe: {msgs}") from None
