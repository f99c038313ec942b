"""`curate eval RUN`: does this subset train a better model than a random subset of the same size?

Why: most published selection methods do no better than random once the token count is held equal (Ivison et
al. 2503.01807; MIG 2504.13835), and much of the gain reported at equal row counts is length. So the product
fine-tunes a student on the run's `selected.parquet` and on baselines drawn from the same pool, and says
whether the subset is better, no different or worse than random at equal tokens, with error bars.

Arms (each trained with several seeds unless noted):
- `selected`:       RUN/selected.parquet (the seed changes only the fine-tune's data order)
- `random_rows`:    uniform draw of the same number of rows
- `random_tokens`:  uniform draw whose total student tokens is within one row's tokens of `selected`'s
- `random_length`:  uniform draw inside token-length bins, with `selected`'s length histogram
- `base`:           the untuned student (one unit: nothing random about it)

The pool the baselines draw from is the run's candidates: records.parquet (after rejects and exact
duplicates) minus semdedup.parquet, minus the held-out reference slice and any reference row found in it.

Each (arm, seed) is one unit (`run_unit`): it fine-tunes with TRL's `SFTTrainer` through `curate.lm.finetune` (the
one fine-tune path; loss on assistant tokens only: the student's chat template with `{% generation %}` markers),
measures every reference row's summed response NLL and token count (the same span `curate.lm` scores: content +
end-of-turn), and optionally greedy exact-match accuracy on Q/A sets with a checkable final answer
(GSM8K `#### n`). It writes RUN/eval/<arm>-seed<k>.json; a re-run skips units whose file carries the same key.
Two executors run the units: `run_eval` in this process (`--no-prefect`) and `flows.eval` as Prefect tasks (the
default); the unit files are the cache of both.

`summarize` turns the units into RUN/eval.json: per arm, the mean over seeds with a bootstrap interval (rows and
seeds resampled), and the paired difference to each random baseline: a bootstrap over the reference rows (the same
rows for both arms) widened by a Welch t-interval over the arms' seeds, since resampling 2-3 seeds cannot reach past
their extremes and understates how much one random draw differs from the next (`_diff_ci`). The verdict only says
"better"/"worse" when the whole 95% interval of the difference to random at equal tokens lies on one side of zero.

Cost: a 135M student fine-tunes at a few hundred tokens/s on an idle 2-core CPU (much less on a shared one:
bench/results/eval.md), so `--dry-run` calibrates on this machine (a 2-step fine-tune, a forward pass and a
short greedy decode) and prints the estimate before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.lm.base import GENERATION_CUT

# the one fine-tune path (also `curate proxy finetune` and the iterative feedback); re-exported under these names
from curate.lm.finetune import (
    PROMPT_CUT,
    FinetuneConfig,
    _set_threads,
    finetune,
    loss_kind,
    micro_batch,
    prompt_overflow,
    training_chat_template,
)

EVAL_VERSION = 2  # bump when a unit's numbers would change for the same inputs
ARMS = ("selected", "random_rows", "random_tokens", "random_length", "base")
RANDOM_ARMS = ("random_rows", "random_tokens", "random_length")
DEFAULT_STUDENT = "smollm2-135m"

Message = dict[str, str]
_ANSWER_RE = re.compile(r"####\s*([^\n]*)")  # the first marker's line: a student that goes on after it is not wrong
_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
ANSWER_PARSE = 2  # bump when final_answer / predicted_answer read an answer differently (in Q/A units' keys)


@dataclass(frozen=True)
class EvalConfig:
    """Everything that changes an eval's numbers (all of it goes into each unit's key)."""

    student: str = DEFAULT_STUDENT  # a named packaged model, an HF folder, or a name in the offline HF cache
    seeds: int = 3
    arms: tuple[str, ...] = ARMS
    epochs: float = 1.0
    max_steps: int | None = None  # caps optimizer steps per fine-tune (None: epochs decide)
    lr: float = 1e-4
    batch_size: int = 8  # rows per optimizer step
    micro_batch: int | None = None  # rows per forward pass (None: curate.lm.finetune.micro_batch decides)
    max_length: int = 512  # tokens per training and evaluation sequence (longer ones are truncated)
    lora: bool = False
    lora_r: int = 16
    dtype: str = "auto"  # auto | float32 | bfloat16: bf16 autocast where the scoring engine's auto picks bf16
    loss: str = "auto"  # auto | model | trl: curate.lm.finetune.loss_kind (auto: the model's own on a CPU)
    threads: int = 2  # CPU threads for torch
    heldout_rows: int = 200  # default reference: this many pool rows no arm trains on
    reference_rows: int | None = 500  # cap per reference set (seeded sample); None = all
    accuracy_rows: int = 50  # Q/A rows per reference set for greedy exact match (0 = off)
    gen_tokens: int = 256  # new tokens per greedy answer
    length_bins: int = 10
    bootstrap: int = 2000
    seed: int = 0  # held-out slice, reference samples, bootstrap

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; arms are {', '.join(ARMS)}")
        if not self.arms:  # an eval of no unit got as far as the summary and failed there (IndexError)
            raise ValueError(f"--arms is empty; arms are {', '.join(ARMS)}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        # each of these was accepted and then failed after the calibration (--lr -1, --gen-tokens -3), trained
        # nothing (--epochs 0), was read another way (--accuracy-rows -1: all Q/A rows but the last; --max-steps 0:
        # no cap) or blamed the pool (--heldout 0): checked here, before any work
        if not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs:g}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr:g}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.heldout_rows < 1:
            raise ValueError(f"--heldout must be >= 1, got {self.heldout_rows}")
        if self.reference_rows is not None and self.reference_rows < 1:
            raise ValueError(f"--reference-rows must be >= 1 (0: all rows), got {self.reference_rows}")
        if self.accuracy_rows < 0:
            raise ValueError(f"--accuracy-rows must be >= 0 (0: off), got {self.accuracy_rows}")
        if self.accuracy_rows and self.gen_tokens < 1:
            raise ValueError(f"--gen-tokens must be >= 1 (or --accuracy-rows 0), got {self.gen_tokens}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        self.finetune_config()  # checks the fine-tune settings (the loss) before any work
        if self.max_length < 16:
            raise ValueError(f"max_length must be >= 16, got {self.max_length}")
        if self.batch_size < 1 or (self.micro_batch is not None and self.micro_batch < 1):
            raise ValueError(f"--batch-size and --micro-batch must be >= 1, got {self.batch_size}, {self.micro_batch}")
        if self.accuracy_rows and self.gen_tokens >= self.max_length:
            raise ValueError(f"gen_tokens ({self.gen_tokens}) must be below max_length ({self.max_length})")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalConfig:
        """Back from `asdict` after a JSON round trip (the Prefect flow's parameter): lists become tuples."""
        return cls(**{**d, "arms": tuple(d.get("arms", ARMS))})

    def units(self) -> list[tuple[str, int]]:
        """Every (arm, seed) in run order: `seeds` per arm, one for `base` (nothing random about it)."""
        return [(arm, s) for arm in self.arms for s in range(1 if arm == "base" else self.seeds)]

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tune settings of each unit (`curate.lm.finetune`)."""
        return FinetuneConfig.of(self)

    def training_key(self) -> dict[str, Any]:
        keys = ("epochs", "max_steps", "lr", "batch_size", "max_length", "lora", "lora_r", "dtype")
        # the resolved micro-batch and loss: the same training, but bf16 sums in another order (differences ~1e-4)
        ft = self.finetune_config()
        return {**{k: getattr(self, k) for k in keys}, "micro_batch": micro_batch(ft), "loss": loss_kind(ft)}


@dataclass
class Reference:
    """One reference set: conversations, and gold final answers where the set has them (else None)."""

    name: str
    convs: list[list[Message]]
    ids: list[str]
    answers: list[str | None] = field(default_factory=list)
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # rows that are not a conversation with an answer, by reason
    skipped_example: str = ""  # the first of them: "file:row: why" (row = line for JSONL)

    @property
    def qa_rows(self) -> list[int]:
        return [i for i, a in enumerate(self.answers) if a is not None]


@dataclass
class EvalPlan:
    """What an eval will train and measure; built without touching the student's weights."""

    run_dir: Path
    config: EvalConfig
    student: str
    pool: pl.DataFrame  # id, messages, tokens (student tokens, truncated at max_length; null: never tokenized)
    selected: pl.DataFrame  # the same columns (every row tokenized)
    references: list[Reference]
    arms: dict[tuple[str, int], list[str]]  # (arm, seed) -> training ids ([] for base)
    arm_info: dict[tuple[str, int], dict[str, Any]]
    dtype: str  # resolved
    fitted: dict[str, Any] | None = None  # `fit_to_minutes`: the budget and what it left out (into eval.json)
    long_qa_prompts: int = 0  # Q/A prompts longer than max_length - gen_tokens (generation cuts their middle)

    def units(self) -> list[tuple[str, int]]:
        return list(self.arms)

    def rows(self, arm: str, seed: int) -> pl.DataFrame:
        ids = self.arms[(arm, seed)]
        src = self.selected if arm == "selected" else self.pool
        return src.join(pl.DataFrame({"id": ids}, schema={"id": pl.String}), on="id", how="semi")

    def unit_path(self, arm: str, seed: int) -> Path:
        return self.run_dir / "eval" / f"{arm}-seed{seed}.json"

    def unit_key(self, arm: str, seed: int) -> str:
        ref = [(r.name, r.ids, r.answers) for r in self.references]
        payload = {"version": EVAL_VERSION, "student": self.student, "student_id": _student_id(self.student),
                   "train": self.config.training_key(), "dtype": self.dtype, "arm": arm, "seed": seed,
                   "ids": sorted(self.arms[(arm, seed)]), "references": ref,
                   "accuracy_rows": self.config.accuracy_rows, "gen_tokens": self.config.gen_tokens}
        if self.arm_info.get((arm, seed), {}).get("long_prompt_rows"):
            payload["prompt_cut"] = PROMPT_CUT  # these rows trained differently before keep_responses: run again
        if self.config.accuracy_rows and any(r.qa_rows for r in self.references):
            payload["answer_parse"] = ANSWER_PARSE  # exact match read another way: that unit runs again
        if self.long_qa_prompts:
            payload["generation_cut"] = GENERATION_CUT  # these prompts were generated from another cut
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# -- student and dtype --------------------------------------------------------------------------------------
def resolve_student(name: str) -> str:
    """A local HF folder for `name`: a path as is, a packaged model name through `curate.lm.models`."""
    from curate.lm.base import LMError, check_model_folder
    from curate.lm.models import model_path

    try:
        check_model_folder(name)  # a mistyped path said "Repo id must be in the form ..."
        if Path(name).exists():
            return str(Path(name))
        return str(model_path(name))  # packaged names (smollm2-135m) are converted once into the model cache
    except LMError as e:
        raise ValueError(f"student {name!r}: {e}") from None


def _student_id(path: str) -> str:
    from curate.lm.base import weights_fingerprint

    return weights_fingerprint(path) if Path(path).exists() else path


# -- data: pool, selected, references -----------------------------------------------------------------------
def _read(run_dir: Path, name: str, columns: list[str]) -> pl.DataFrame:
    path = run_dir / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (is {run_dir} a finished `curate select` run?)")
    return pl.read_parquet(path, columns=columns)


def _plain(messages: Any) -> list[Message]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_pool(run_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(candidates, selected): records.parquet minus semdedup.parquet, and selected.parquet; id + messages."""
    recs = _read(run_dir, "records.parquet", ["id", "messages"])
    if (run_dir / "semdedup.parquet").exists():
        recs = recs.join(pl.read_parquet(run_dir / "semdedup.parquet", columns=["id"]), on="id", how="anti")
    sel = _read(run_dir, "selected.parquet", ["id", "messages"])
    if sel.height == 0:
        raise ValueError(f"{run_dir / 'selected.parquet'}: the subset is empty, nothing to evaluate")
    return recs, sel


def final_answer(text: str) -> str | None:
    """The checkable final answer of a GSM8K-style response (`#### 72`), normalised; None if it has none.

    The number that opens the first `####` line (else that line): a generation that goes on after its answer
    ("#### 72\n\nQuestion: ...", "#### 72 clips", "#### 72<|im_end|>") still answers 72, as lm-eval's GSM8K
    strict match reads it; the whole rest of the text was compared before, so such answers counted as wrong."""
    m = _ANSWER_RE.search(text)
    line = m.group(1).strip() if m else ""
    if not line:
        return None
    num = _NUMBER_RE.match(line)
    return _norm_number(num.group(0) if num else line)


def _norm_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return s
    if not np.isfinite(x):  # "nan", "inf", "1e999": int() raised and a generated "#### nan" ended the eval
        return s
    return str(int(x)) if x == int(x) else str(x)


def predicted_answer(text: str) -> str | None:
    """What a generated answer claims: the text after `####`, else its last number."""
    ans = final_answer(text)
    if ans is not None:
        return ans
    nums = _NUMBER_RE.findall(text)
    return _norm_number(nums[-1]) if nums else None


def reference_names(paths: Sequence[str]) -> list[str]:
    """One distinct name per reference path: its file stem (`gsm8k_test.jsonl` -> gsm8k_test), and where stems
    collide (lima/test.jsonl and gsm8k/test.jsonl; ref.jsonl and ref.parquet) the first longer form that tells the
    group apart. Why: units and eval.json key each set's numbers by name, so a second `test` silently replaced
    the first, and the eval reported one set of two."""
    stems = [Path(p).name.split(".")[0] or str(p) for p in paths]
    names = list(stems)
    for stem in {s for s in stems if stems.count(s) > 1}:
        group = [i for i, s in enumerate(stems) if s == stem]
        for form in (lambda q: f"{q.parent.name}/{q.name.split('.')[0]}", lambda q: q.name,
                     lambda q: f"{q.parent.name}/{q.name}"):
            cand = [form(Path(paths[i]).resolve()) for i in group]
            if len(set(cand)) == len(cand):
                break
        else:  # the same file twice
            cand = [f"{stem}-{k + 1}" for k in range(len(group))]
        for i, c in zip(group, cand, strict=True):
            names[i] = c
    return names


def _one_split(sources: Sequence[str]) -> None:
    """Refuse a dataset with several splits (a DatasetDict folder, a JSON dict of splits) as one reference set: it
    was read as all its splits together, so GSM8K's train rows went into its test set without a word (and were
    taken out of the pool)."""
    from curate.io.readers import split_source

    groups: dict[str, list[tuple[str, str]]] = {}
    for src in sources:
        base, split = split_source(src)
        if split is None and (Path(src).parent / "dataset_dict.json").is_file():
            base, split = str(Path(src).parent), Path(src).name
        if split is not None:
            groups.setdefault(base, []).append((src, split))
    for base, group in groups.items():
        if len(group) > 1:
            raise ValueError(f"{base}: holds the splits {', '.join(s for _, s in group)}; a reference set is one "
                             f"of them: give e.g. {group[-1][0]}")


def load_reference(path: str, *, name: str | None = None) -> Reference:
    """Any file or folder `curate ingest` reads, normalised the same way (ids comparable with the pool's)."""
    from curate.ingest import row_record
    from curate.io.readers import expand_inputs, iter_rows
    from curate.schema import RowError

    sources = expand_inputs([path])
    _one_split(sources)
    convs, ids = [], []
    skipped: dict[str, int] = {}
    example = ""
    for f in sources:
        for raw in iter_rows(f):
            try:
                _, rec = row_record(raw, f)
            except RowError as e:  # counted and shown, as ingest's rejects are: a reference never shrinks silently
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                example = example or f"{Path(f).name}:{raw.row}: {e.detail}"
                continue
            convs.append(rec["messages"])
            ids.append(rec["id"])
    if not convs:
        raise ValueError(f"{path}: no conversation with an answer found (reference sets need responses)"
                         + (f"; {example}" if example else ""))
    ref = Reference(name or Path(path).name.split(".")[0], convs, ids, source=str(path), skipped=skipped,
                    skipped_example=example)
    _attach_answers(ref)
    return ref


def _attach_answers(ref: Reference) -> None:
    answers = [final_answer(c[-1]["content"]) for c in ref.convs]
    # a Q/A set: most rows carry a checkable final answer (a stray "####" in free text does not make one)
    ref.answers = answers if sum(a is not None for a in answers) >= 0.5 * len(answers) else [None] * len(answers)


def _sample(ref: Reference, n: int | None, seed: int) -> Reference:
    if n is None or len(ref.convs) <= n:
        return ref
    idx = sorted(np.random.default_rng(seed).choice(len(ref.convs), n, replace=False).tolist())
    return replace(ref, convs=[ref.convs[i] for i in idx], ids=[ref.ids[i] for i in idx],
                   answers=[ref.answers[i] for i in idx])


def token_lengths(tokenizer: Any, convs: Sequence[Sequence[Message]], max_length: int) -> list[int]:
    """Tokens the fine-tune sees per conversation: the chat-rendered length, truncated at max_length."""
    texts = [tokenizer.apply_chat_template(list(c), tokenize=False) for c in convs]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [min(len(x), max_length) for x in ids]


class PoolLengths:
    """The pool's token lengths, tokenized on first use: an arm draw walks a shuffle of the pool and asks only for
    the rows it visits, so planning costs the subset's size, not the pool's (a 1M-row pool is never tokenized
    whole). `lengths[idx]` (an int array of pool positions) returns their lengths, as a numpy array would."""

    def __init__(self, tokenizer: Any, messages: pl.Series, max_length: int) -> None:
        self.tokenizer, self.messages, self.max_length = tokenizer, messages, max_length
        self.known = np.full(len(messages), -1, dtype=np.int64)  # -1: not tokenized yet

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        todo = np.unique(idx[self.known[idx] < 0])
        if len(todo):
            convs = [_plain(m) for m in self.messages.gather(todo).to_list()]
            self.known[todo] = token_lengths(self.tokenizer, convs, self.max_length)
        return self.known[idx]

    @property
    def tokenized(self) -> int:
        """How many pool rows were tokenized so far."""
        return int((self.known >= 0).sum())


def _walk(order: np.ndarray, size: int = 512) -> Iterator[tuple[int, np.ndarray]]:
    """(start, chunk) over `order`, `size` rows at a time: a draw tokenizes at most `size` rows beyond the ones
    it needs."""
    for start in range(0, len(order), size):
        yield start, order[start:start + size]


def _lengths(tokens: Sequence[int] | np.ndarray | PoolLengths) -> np.ndarray | PoolLengths:
    return tokens if isinstance(tokens, PoolLengths) else np.asarray(tokens, dtype=np.int64)


# -- arms ---------------------------------------------------------------------------------------------------
def draw_random_rows(pool_ids: Sequence[str], n: int, seed: int) -> list[str]:
    """n rows uniformly without replacement."""
    if n > len(pool_ids):
        raise ValueError(f"random_rows needs {n} rows but the pool has {len(pool_ids)}")
    idx = np.random.default_rng(seed).permutation(len(pool_ids))[:n]
    return [pool_ids[i] for i in sorted(idx)]


def draw_random_tokens(pool_ids: Sequence[str], tokens: Sequence[int] | PoolLengths, target: int,
                       seed: int) -> list[str]:
    """A uniform shuffle's prefix whose token total is closest to `target`: |total - target| <= the boundary row's
    tokens / 2, so within one row's tokens (no scan for short rows, which would bias the draw to short ones).
    Only the prefix's rows are tokenized (`PoolLengths`); the draw is the one the whole pool's lengths give."""
    lengths = _lengths(tokens)
    order = np.random.default_rng(seed).permutation(len(pool_ids))
    total = 0
    for start, chunk in _walk(order):
        cum = total + np.cumsum(lengths[chunk])
        if cum[-1] >= target:
            k = int(np.searchsorted(cum, target))  # first prefix reaching the target: rows order[:start+k+1]
            below = int(cum[k - 1]) if k > 0 else total
            take = start + (k if target - below <= int(cum[k]) - target else k + 1)
            return [pool_ids[i] for i in sorted(order[:max(1, take)])]
        total = int(cum[-1])
    raise ValueError(f"random_tokens needs {target} tokens but the pool has {total}")


def length_bin_edges(lengths: Sequence[int], bins: int) -> np.ndarray:
    """Interior bin edges: quantiles of the subset's token lengths (unique), so every bin holds subset rows."""
    q = np.quantile(np.asarray(lengths, dtype=float), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(np.ceil(q))


def draw_length_matched(pool_ids: Sequence[str], pool_tokens: Sequence[int] | PoolLengths,
                        target_tokens: Sequence[int], bins: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    """Uniform draws inside length bins, as many per bin as the subset has: the same length histogram. It walks a
    shuffle of the pool until every bin is full (each bin's rows in shuffle order are a uniform draw from that bin),
    so only the visited rows are tokenized. A bin the pool cannot fill takes all it has and the shortfall comes
    from the nearest bins (reported)."""
    edges = length_bin_edges(target_tokens, bins)
    want = np.bincount(np.searchsorted(edges, target_tokens, side="right"), minlength=len(edges) + 1)
    lengths = _lengths(pool_tokens)
    members: list[list[int]] = [[] for _ in want]
    for _, chunk in _walk(np.random.default_rng(seed).permutation(len(pool_ids))):
        for i, b in zip(chunk.tolist(), np.searchsorted(edges, lengths[chunk], side="right").tolist(), strict=True):
            members[b].append(i)
        if all(len(m) >= n for m, n in zip(members, want, strict=True)):
            break
    chosen: list[int] = []
    moved = 0
    for b, n in enumerate(want):
        take = members[b][:n]
        members[b] = members[b][n:]
        chosen += take
        for nb in sorted(range(len(want)), key=lambda x: (abs(x - b), x)):  # shortfall: nearest bins first
            while len(take) < n and members[nb]:
                take.append(members[nb].pop(0))
                chosen.append(take[-1])
                moved += 1
    short = int(want.sum()) - len(chosen)
    if short:
        raise ValueError(f"random_length: the pool has {len(pool_ids)} rows, fewer than the subset's "
                         f"{int(want.sum())}")
    return [pool_ids[i] for i in sorted(chosen)], {"bin_edges": edges.astype(int).tolist(),
                                                    "subset_histogram": want.tolist(), "moved_rows": moved}


def plan_eval(run_dir: str | Path, config: EvalConfig | None = None,
              references: Sequence[str] | None = None) -> EvalPlan:
    """Load the run, the reference sets and the student's tokenizer; draw every (arm, seed)'s training rows."""
    from transformers import AutoTokenizer

    from curate.lm.hf import resolve_dtype  # the scoring engine's decider: `auto` scores and trains alike

    cfg = config or EvalConfig()
    run_dir = Path(run_dir)
    student = resolve_student(cfg.student)
    try:
        tok = _plain_if_no_template(AutoTokenizer.from_pretrained(student))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the student {cfg.student!r}: {e}") from None
    pool, sel = load_pool(run_dir)
    refs = [_sample(load_reference(p, name=n), cfg.reference_rows, cfg.seed)
            for p, n in zip(references or [], reference_names(references or []), strict=True)]
    ref_ids = {i for r in refs for i in r.ids}
    if not refs:  # default: a held-out slice of the pool that no arm trains on
        rest = pool.join(sel.select("id"), on="id", how="anti").sort("id")
        n = min(cfg.heldout_rows, rest.height // 4)
        if n < 1:
            raise ValueError(f"{run_dir}: the pool has no rows outside the subset to hold out; give --reference")
        held = rest.sample(n, seed=cfg.seed, shuffle=True).sort("id")
        ref = Reference("heldout", [_plain(m) for m in held["messages"].to_list()], held["id"].to_list(),
                        source=f"{run_dir}/records.parquet (held out)")
        _attach_answers(ref)
        refs = [ref]
        ref_ids = set(ref.ids)
    pool = pool.filter(~pl.col("id").is_in(list(ref_ids))).sort("id")
    lengths = PoolLengths(tok, pool["messages"], cfg.max_length)  # tokenized as the draws visit rows
    sel = sel.sort("id")
    smsgs = [_plain(m) for m in sel["messages"].to_list()]
    sel = sel.with_columns(tokens=pl.Series(token_lengths(tok, smsgs, cfg.max_length), dtype=pl.Int64))
    overlap = sel.filter(pl.col("id").is_in(list(ref_ids))).height
    target_tokens = int(sel["tokens"].sum())
    arms: dict[tuple[str, int], list[str]] = {}
    info: dict[tuple[str, int], dict[str, Any]] = {}
    ids = pool["id"].to_list()
    for arm, s in cfg.units():
        extra: dict[str, Any] = {}
        if arm == "selected":
            chosen = sel["id"].to_list()
            extra["reference_overlap"] = overlap
        elif arm == "random_rows":
            chosen = draw_random_rows(ids, sel.height, 1000 + s)
        elif arm == "random_tokens":
            chosen = draw_random_tokens(ids, lengths, target_tokens, 2000 + s)
        elif arm == "random_length":
            chosen, extra = draw_length_matched(ids, lengths, sel["tokens"].to_list(), cfg.length_bins,
                                                3000 + s)
        else:
            chosen = []
        arms[(arm, s)] = chosen
        info[(arm, s)] = extra
    lengths[_calibration_sample(len(ids), cfg.seed)]  # the rows `calibrate` picks from: tokenized with the rest
    for key, chosen in arms.items():  # every training row's length (random_rows visits no lengths while drawing)
        if key[0] != "selected" and chosen:
            lengths[np.flatnonzero(pool["id"].is_in(chosen).to_numpy())]
    known = pl.Series("tokens", lengths.known)
    pool = pool.with_columns(tokens=pl.when(known >= 0).then(known))  # null: a row no draw visited
    plan = EvalPlan(run_dir, cfg, student, pool, sel, refs, arms, info, resolve_dtype(cfg.dtype),
                    long_qa_prompts=_long_qa_prompts(tok, refs, cfg))
    cut: dict[str, bool] = {}  # id -> whether the fine-tune cuts the start of its prompt (keep_responses)
    for key in arms:
        rows = plan.rows(*key)
        info[key].update(rows=rows.height, tokens=int(rows["tokens"].sum()) if rows.height else 0)
        todo = rows.filter(~pl.col("id").is_in(list(cut)))
        convs = [_plain(m) for m in todo["messages"].to_list()]
        cut.update(zip(todo["id"].to_list(), [x > 0 for x in prompt_overflow(tok, convs, cfg.max_length)],
                       strict=True))
        n_cut = sum(cut[i] for i in rows["id"].to_list())
        if n_cut:
            info[key]["long_prompt_rows"] = n_cut
    return plan


def long_prompt_note(plan: EvalPlan) -> str:
    """One line naming the units whose fine-tune cuts the start of long prompts (`keep_responses`), "" when none."""
    per_arm: dict[str, list[str]] = {}
    for (arm, _), i in plan.arm_info.items():
        if i.get("long_prompt_rows"):
            per_arm.setdefault(arm, []).append(f"{i['long_prompt_rows']:,} of {i['rows']:,}")
    if not per_arm:
        return ""
    units = "; ".join(f"{arm} {', '.join(v)}" for arm, v in per_arm.items())
    return (f"rows whose prompt leaves their answer too little of --max-length ({plan.config.max_length}) tokens "
            f"train with the prompt's start cut, as the loss measurement cuts it: {units}; a larger --max-length "
            "trains on them whole")


# -- measure ------------------------------------------------------------------------------------------------
def _engine(student: str, model: Any, tok: Any, config: EvalConfig, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curate.lm.base import LMConfig
    from curate.lm.hf import HFEngine

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(student)
    model = model.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    return HFEngine(LMConfig(student, max_length=config.max_length, dtype=dtype), model=model, tokenizer=tok,
                    threads=config.threads)


def measure(engine: Any, ref: Reference, config: EvalConfig) -> tuple[dict[str, Any], dict[str, float]]:
    """Per-row summed response NLL and token counts; greedy exact match on the first Q/A rows. Returns
    (numbers, seconds): the numbers are deterministic, the seconds are not, so they are kept apart."""
    from curate.lm.evaluate import response_losses

    t0 = time.perf_counter()
    nll, toks = response_losses(engine, ref.convs)
    out: dict[str, Any] = {"nll": nll.tolist(), "tokens": toks.astype(int).tolist()}
    secs = {"loss": round(time.perf_counter() - t0, 2)}
    qa = ref.qa_rows[: config.accuracy_rows]
    if qa:
        t0 = time.perf_counter()
        prompts = [ref.convs[i][:-1] for i in qa]
        texts = [g[0] for g in engine.generate(prompts, temperature=0.0, max_tokens=config.gen_tokens)]
        out["qa_rows"] = qa
        out["correct"] = [int(predicted_answer(t) == ref.answers[i]) for t, i in zip(texts, qa, strict=True)]
        out["generated"] = [t[-200:] for t in texts[:5]]
        secs["generate"] = round(time.perf_counter() - t0, 2)
    return out, secs


def unit_done(plan: EvalPlan, arm: str, seed: int) -> dict[str, Any] | None:
    """The unit's stored result when RUN/eval/<arm>-seed<k>.json carries this plan's key (else None): the unit
    files are the eval's cache, as stage results are for `curate select`."""
    path = plan.unit_path(arm, seed)
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text())
    except ValueError:  # not written by atomic_path: recompute
        return None
    return done if done.get("key") == plan.unit_key(arm, seed) else None


def unit_state(plan: EvalPlan, arm: str, seed: int) -> str:
    """"done" (its file carries this plan's key: read back, not run), "stale" (a file written with other settings,
    e.g. another student, reference sample or learning rate: run again and overwritten) or "todo"."""
    if not plan.unit_path(arm, seed).exists():
        return "todo"
    return "done" if unit_done(plan, arm, seed) is not None else "stale"


def run_unit(plan: EvalPlan, arm: str, seed: int, *, force: bool = False) -> dict[str, Any]:
    """One (arm, seed): fine-tune (not for `base`), measure every reference set, write RUN/eval/<arm>-seed<k>.json.

    Skips the work when that file exists with the same key (a resumed eval), so this is the unit both
    executors run (`run_eval` in process, `flows.eval` as a Prefect task). Returns the unit's result dict.
    """
    path, key = plan.unit_path(arm, seed), plan.unit_key(arm, seed)
    done = None if force else unit_done(plan, arm, seed)
    if done is not None:
        return done
    t0 = time.perf_counter()
    cfg = plan.config
    _set_threads(cfg.threads)
    model = tok = None
    train: dict[str, Any] = {}
    if arm != "base":
        convs = [_plain(m) for m in plan.rows(arm, seed)["messages"].to_list()]
        model, tok, train = finetune(plan.student, convs, cfg, seed, dtype=plan.dtype,
                                     label=f"fine-tune {arm} seed {seed}")
    engine = _engine(plan.student, model, tok, cfg, plan.dtype)
    measured = {r.name: measure(engine, r, cfg) for r in plan.references}
    result = {"key": key, "arm": arm, "seed": seed, **plan.arm_info[(arm, seed)], "train": train,
              "references": {k: v[0] for k, v in measured.items()},
              "measure_seconds": {k: v[1] for k, v in measured.items()}, "seconds": round(time.perf_counter() - t0, 2)}
    from curate.run import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result) + "\n")
    return result


# -- statistics ---------------------------------------------------------------------------------------------
def _ratio(nll: np.ndarray, tok: np.ndarray) -> float:
    return float(nll.sum() / max(1.0, tok.sum()))


def summarize(plan: EvalPlan, results: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """Per reference set and arm: mean loss over seeds + bootstrap CI; paired differences to the random arms.

    An arm's interval: each bootstrap replicate resamples the reference rows and, per arm, its seeds (with
    replacement). A difference's interval (`_diff_ci`): the paired row bootstrap (every seed kept, the same rows
    for both arms) widened by the Welch t-interval of the two arms' per-seed values, so it covers the reference
    sample and the spread between fine-tunes and random draws even with 2-3 seeds.
    Loss is token-weighted (sum NLL / sum tokens); accuracy is the mean of per-row exact matches.
    """
    cfg = plan.config
    rng = np.random.default_rng(cfg.seed)
    arms = sorted({a for a, _ in results}, key=ARMS.index)
    seeds = {a: sorted(s for b, s in results if b == a) for a in arms}
    out: dict[str, Any] = {}
    # (diff entry, row bootstrap of the difference, per-seed values of both arms, sign, digits)
    family: list[tuple[dict[str, Any], np.ndarray, tuple[np.ndarray, np.ndarray], int, int]] = []
    for ref in plan.references:
        n = len(ref.convs)
        nll = {a: np.array([results[(a, s)]["references"][ref.name]["nll"] for s in seeds[a]]) for a in arms}
        tok = np.array(results[(arms[0], seeds[arms[0]][0])]["references"][ref.name]["tokens"], dtype=float)
        rows = rng.integers(0, n, size=(cfg.bootstrap, n))
        seed_draw = {a: rng.integers(0, len(seeds[a]), size=(cfg.bootstrap, len(seeds[a]))) for a in arms}
        # per replicate, per arm: mean over the drawn seeds of sum(nll[rows]) / sum(tok[rows])
        tok_b = tok[rows].sum(1)
        boot, rows_only = {}, {}
        for a in arms:
            per_seed = np.stack([nll[a][k][rows].sum(1) for k in range(len(seeds[a]))], 1) / np.maximum(tok_b, 1)[:,
                                                                                                                None]
            boot[a] = np.take_along_axis(per_seed, seed_draw[a], 1).mean(1)
            rows_only[a] = per_seed.mean(1)  # every seed kept: the difference's row part
        entry: dict[str, Any] = {"rows": n, "tokens": int(tok.sum()), "source": ref.source, "loss": {}, "diff": {}}
        if ref.skipped:
            entry["skipped"] = {"rows": ref.skipped, "example": ref.skipped_example}
        vals = {a: np.array([_ratio(nll[a][k], tok) for k in range(len(seeds[a]))]) for a in arms}
        for a in arms:
            entry["loss"][a] = {"mean": round(float(vals[a].mean()), 5), "ci": _ci(boot[a]),
                                "seeds": [round(float(x), 5) for x in vals[a]]}
        for b in [x for x in RANDOM_ARMS + ("base",) if x in arms]:
            for a in [x for x in arms if x != b and x != "base"]:
                d = rows_only[a] - rows_only[b]
                mean = entry["loss"][a]["mean"] - entry["loss"][b]["mean"]
                xs = (vals[a], vals[b])
                ci = _diff_ci(d, mean, *xs, 5)
                entry["diff"][f"{a} - {b}"] = {"mean": round(mean, 5), "ci": ci, "verdict": _verdict(ci, -1)}
                if (a, b) == ("selected", "random_tokens"):
                    family.append((entry["diff"][f"{a} - {b}"], d, xs, -1, 5))
        qa = results[(arms[0], seeds[arms[0]][0])]["references"][ref.name].get("qa_rows")
        if qa:
            acc = {a: np.array([results[(a, s)]["references"][ref.name]["correct"] for s in seeds[a]], float)
                   for a in arms}
            m = len(qa)
            rows = rng.integers(0, m, size=(cfg.bootstrap, m))
            per_seed_acc = {a: np.stack([acc[a][k][rows].mean(1) for k in range(len(seeds[a]))], 1) for a in arms}
            bootacc = {a: np.take_along_axis(v, seed_draw[a], 1).mean(1) for a, v in per_seed_acc.items()}
            entry["accuracy"] = {"rows": m, "arms": {a: {"mean": round(float(acc[a].mean()), 4),
                                                         "ci": _ci(bootacc[a], 4)} for a in arms}, "diff": {}}
            for b in [x for x in RANDOM_ARMS if x in arms]:
                for a in [x for x in arms if x not in RANDOM_ARMS and x != "base"]:
                    d = per_seed_acc[a].mean(1) - per_seed_acc[b].mean(1)
                    mean = float(acc[a].mean() - acc[b].mean())
                    xs = (acc[a].mean(1), acc[b].mean(1))
                    ci = _proportion_diff(_diff_ci(d, mean, *xs, 4))
                    entry["accuracy"]["diff"][f"{a} - {b}"] = {"mean": round(mean, 4), "ci": ci,
                                                               "verdict": _verdict(ci, 1)}
                    if (a, b) == ("selected", "random_tokens"):
                        family.append((entry["accuracy"]["diff"][f"{a} - {b}"], d, xs, 1, 4))
        out[ref.name] = entry
    # the overall verdict weighs m comparisons (every reference's loss, and exact match where measured): each
    # gets a (1 - 0.05/m) interval (Bonferroni), so one lucky set out of several does not make a "better"
    for d, boot, xs, sign, digits in family:
        ci = _diff_ci(boot, d["mean"], *xs, digits, alpha=0.05 / len(family))
        ci = _proportion_diff(ci) if sign > 0 else ci  # sign > 0: exact match, a difference of proportions
        d["family"] = {"comparisons": len(family), "ci": ci, "verdict": _verdict(ci, sign)}
    return out


def _proportion_diff(ci: list[float]) -> list[float]:
    """An exact-match difference's interval inside [-1, 1]: with 2 seeds the Welch part (t ~12.7) widened it to
    [-1.468, +1.733], bounds no difference of two accuracies can take. The verdict is unchanged (same signs)."""
    return [max(-1.0, ci[0]), min(1.0, ci[1])]


def _ci(x: np.ndarray, digits: int = 5, alpha: float = 0.05) -> list[float]:
    lo, hi = np.percentile(x, [50 * alpha, 100 - 50 * alpha])
    return [round(float(lo), digits), round(float(hi), digits)]


def seed_halfwidth(*xs: np.ndarray, alpha: float = 0.05) -> float:
    """Half-width of the Welch t-interval of mean(xa) - mean(xb) (or any signed sum of the `xs` means) over
    per-seed values: 0 where no arm has two seeds (one seed cannot show its spread; the verdict line says so) or
    they do not differ (`base`)."""
    from scipy.stats import t

    terms = [(float(np.var(x, ddof=1)) / len(x), len(x)) for x in xs if len(x) > 1]
    se2 = sum(v for v, _ in terms)
    if se2 <= 0:
        return 0.0
    df = se2 ** 2 / sum(v ** 2 / (n - 1) for v, n in terms if v > 0)
    return float(t.ppf(1 - alpha / 2, df) * np.sqrt(se2))


def _diff_ci(rows_boot: np.ndarray, mean: float, xa: np.ndarray, xb: np.ndarray, digits: int,
             alpha: float = 0.05) -> list[float]:
    """The interval of a difference between arms: the percentile interval of its paired row bootstrap, each side
    widened in quadrature by `seed_halfwidth`. Why: resampling 3 seeds with replacement never goes past the
    extreme seeds, so three random draws that happen to agree (LIMA loss 2.7549-2.7563 at 1,000 rows; the default
    eval's three spanned 2.7491-2.7558) made a narrow interval and a "better" the next draws could undo."""
    lo, hi = np.percentile(rows_boot, [50 * alpha, 100 - 50 * alpha])
    return widen(mean, float(lo), float(hi), seed_halfwidth(xa, xb, alpha=alpha), digits)


def widen(mean: float, lo: float, hi: float, h: float, digits: int = 5) -> list[float]:
    """[lo, hi] around `mean` with each side's distance to the mean widened in quadrature by `h`."""
    return [round(mean - float(np.hypot(max(mean - lo, 0.0), h)), digits),
            round(mean + float(np.hypot(max(hi - mean, 0.0), h)), digits)]


def _verdict(ci: list[float], better_sign: int) -> str:
    """'better' when the whole 95% interval lies on the good side of zero, 'worse' on the bad side."""
    lo, hi = ci
    if (hi < 0 and better_sign < 0) or (lo > 0 and better_sign > 0):
        return "better"
    if (lo > 0 and better_sign < 0) or (hi < 0 and better_sign > 0):
        return "worse"
    return "no different"


def verdict_line(summary: dict[str, Any]) -> tuple[str, str]:
    """(overall, line): the subset against random at equal tokens, over every reference set's loss (and
    accuracy where measured). Each set's own verdict uses its 95% interval; the overall one uses the
    Bonferroni-widened intervals (`family`): better / worse when some set says so and none says the opposite,
    no different when all agree on that, else mixed; a set whose two words differ is named with both. Where the
    subset beats equal-token random on a set but not length-matched random, the line says the gain there is length
    when less than half of it remains against length-matched random, and that length is not yet ruled out when it
    remains but the interval crosses zero."""
    parts, words, length_only, unsure = [], [], [], []

    def add(d: dict[str, Any], what: str, unit: str, digits: int) -> None:
        # named with the set's 95% word, and the Bonferroni word where it differs: else "worse on X" under an
        # overall "better" reads as a contradiction (fusion at 1,000 rows: bench/results/eval.md)
        fam = d.get("family", d)["verdict"]
        words.append(fam)
        also = "" if fam == d["verdict"] else f" at 95% only, {fam} after the correction"
        lo, hi = d["ci"]
        parts.append(f"{d['verdict']} on {what}{also} ({unit}{d['mean']:+.{digits}f} [{lo:+.{digits}f}, "
                     f"{hi:+.{digits}f}])")

    for name, e in summary.items():
        d = e["diff"].get("selected - random_tokens")
        if d:
            add(d, name, "loss ", 4)
            same_lengths = e["diff"].get("selected - random_length")
            if d["verdict"] == "better" and same_lengths and same_lengths["verdict"] != "better":
                # most of the gain gone against length-matched random: length; else only the interval is wider
                # (iterative at 1,000 rows: -0.0067 vs equal tokens, -0.0085 vs length-matched, across zero)
                if same_lengths["mean"] > d["mean"] / 2:
                    length_only.append(name)
                else:
                    lo, hi = same_lengths["ci"]
                    unsure.append(f"{name} ({same_lengths['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}])")
        a = e.get("accuracy", {}).get("diff", {}).get("selected - random_tokens")
        if a:
            add(a, f"{name} exact match", "", 3)
    if not words:
        return "n/a", "no verdict: the eval needs the selected and random_tokens arms"
    s = set(words)
    overall = ("better" if "better" in s and "worse" not in s else "worse" if "worse" in s and "better" not in s
               else "no different" if s == {"no different"} else "mixed")
    how = f" (over {len(words)} comparisons, Bonferroni)" if len(words) > 1 else ""
    line = f"selected vs random at equal tokens: {overall}{how} — " + "; ".join(parts)
    # a subset of long rows beats random at equal tokens by its lengths alone (deita at 1,000 rows of Alpaca-52k:
    # better on two sets, no different from length-matched random on all three, bench/results/eval.md): say so
    if length_only:
        line += (f". But no better than random rows with the same lengths on {', '.join(length_only)} "
                 "(selected - random_length): there the gain is the rows' length, not the selection")
    if unsure:
        line += (f". Against random rows with the same lengths the gain holds but its interval crosses zero on "
                 f"{', '.join(unsure)}: not yet shown not to be length; more seeds would tell")
    return overall, line


# -- cost ---------------------------------------------------------------------------------------------------
def unit_rates(student: str, convs: list[list[Message]], tokens: Sequence[int], config: EvalConfig, dtype: str, *,
               steps: int = 2) -> tuple[dict[str, float], Any]:
    """(rates, engine): fixed seconds per unit (load + trainer set-up + engine), fine-tune tokens/s and forward
    (loss) tokens/s of `student` on `convs` (`tokens`: their token counts), from a fine-tune of `steps` optimizer
    steps and one loss pass. `calibrate` and `curate plan --measure` (curate.measure) both measure with it."""
    import trl.trainer.sft_trainer  # noqa: F401  (a one-off import cost, not a per-unit one)

    from curate.lm.evaluate import response_losses

    t0 = time.perf_counter()
    model, tok, st = finetune(student, convs, replace(config, max_steps=steps, epochs=1.0), 0, dtype=dtype,
                              label="calibration fine-tune")
    engine = _engine(student, model, tok, config, dtype)
    total = time.perf_counter() - t0
    mean = sum(tokens) / max(len(tokens), 1)
    train_tps = st["rows"] and min(steps * config.batch_size, len(convs)) * mean / st["train_seconds"]
    t1 = time.perf_counter()
    response_losses(engine, convs)
    fwd_tps = float(sum(tokens)) / max(time.perf_counter() - t1, 1e-6)
    return {"setup_seconds": round(total - st["train_seconds"], 2), "train_tps": round(train_tps, 1),
            "forward_tps": round(fwd_tps, 1)}, engine


def _calibration_sample(n: int, seed: int, size: int = 512) -> np.ndarray:
    """Pool positions `calibrate` times a fine-tune on (the middle of them by length): a seeded sample, so the
    planner tokenizes 512 rows for it instead of the whole pool."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def calibrate(plan: EvalPlan, *, steps: int = 2) -> dict[str, float]:
    """Measure this machine: fixed seconds per unit (load + trainer set-up + engine), fine-tune tokens/s,
    forward (loss) tokens/s, greedy generation tokens/s. Cached in RUN/eval/calibration.json per set-up."""
    cfg = plan.config
    # the training key, not a list of its parts: a new training setting (the loss) re-measures by itself
    key = hashlib.sha256(json.dumps([plan.student, _student_id(plan.student), plan.dtype, cfg.training_key(),
                                     cfg.threads, steps, EVAL_VERSION], sort_keys=True).encode()).hexdigest()[:16]
    path = plan.run_dir / "eval" / "calibration.json"
    try:  # a file cut short by a kill (or edited) is measured again: every later eval of the run failed on it
        c = json.loads(path.read_text())
        if isinstance(c, dict) and c.get("key") == key:
            return c
    except (OSError, ValueError):
        pass
    sample = plan.pool[_calibration_sample(plan.pool.height, cfg.seed)].sort("tokens")  # typical rows: the middle
    rows = sample.slice(max(0, sample.height // 2 - cfg.batch_size), 2 * cfg.batch_size)
    convs = [_plain(m) for m in rows["messages"].to_list()]
    import trl.trainer.sft_trainer  # noqa: F401  (a one-off import cost, not a per-unit one)

    try:  # before our own threads add to it
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # no load average on this OS
        load = 0.0
    t0 = time.perf_counter()
    rates, engine = unit_rates(plan.student, convs, rows["tokens"].to_list(), cfg, plan.dtype, steps=steps)
    gen_tps = 0.0
    if cfg.accuracy_rows and any(r.qa_rows for r in plan.references):
        ref = next(r for r in plan.references if r.qa_rows)
        prompts = [ref.convs[i][:-1] for i in ref.qa_rows[: min(8, cfg.accuracy_rows)]]
        new = 16
        t2 = time.perf_counter()
        engine.generate(prompts, temperature=0.0, max_tokens=new)
        gen_tps = len(prompts) * new / max(time.perf_counter() - t2, 1e-6)
    c = {"key": key, **rates, "generate_tps": round(gen_tps, 1),
         "calibration_seconds": round(time.perf_counter() - t0, 2), "dtype": plan.dtype, "threads": cfg.threads,
         "load": load, "cpus": os.cpu_count() or 1}  # how busy the machine was: a busy one prices units high
    path.parent.mkdir(parents=True, exist_ok=True)
    from curate.run import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(c, indent=2) + "\n")
    return c


def unit_cost(config: EvalConfig, arm: str, rows: int, tokens: float, reference_tokens: float,
              generated_tokens: float, rates: dict[str, float]) -> tuple[float, float]:
    """(training tokens, seconds) of one unit: its training tokens (x epochs, or capped by max_steps), the
    reference tokens it scores and the answers it generates, at `rates` (setup_seconds, train_tps, forward_tps,
    generate_tps: a calibration, or `curate plan`'s assumed rates). The one formula behind both estimates."""
    train_tokens = 0.0
    if arm != "base":
        train_tokens = tokens * config.epochs
        if config.max_steps:
            per_row = tokens / max(1, rows)
            train_tokens = min(train_tokens, config.max_steps * config.batch_size * per_row)
    secs = (rates["setup_seconds"] + train_tokens / max(rates["train_tps"], 1e-6)
            + reference_tokens / max(rates["forward_tps"], 1e-6)
            + (generated_tokens / rates["generate_tps"] if generated_tokens and rates["generate_tps"] else 0.0))
    return train_tokens, secs


def estimate(plan: EvalPlan, calib: dict[str, float]) -> dict[str, Any]:
    """Seconds per unit (`unit_cost`) at the calibrated rates, and each unit's `unit_state`; generated answers are
    assumed full length (an upper bound). "seconds" is what is left to run: finished units are read back, so a
    resumed eval is priced at its remaining units ("seconds_all": every unit).

    Once units have finished, their real times correct the calibration: every unit's price is scaled by the median
    of (real / calibrated) over them ("scale"). A calibration is a few steps, taken once and cached; one taken
    while the machine was busy priced the rest of an eval at 6x its real time (bench/results/eval.md)."""
    cfg = plan.config
    tok = _tokenizer(plan.student)
    ref_tokens = sum(sum(token_lengths(tok, r.convs, cfg.max_length)) for r in plan.references)
    gen_tokens = sum(min(len(r.qa_rows), cfg.accuracy_rows) for r in plan.references) * cfg.gen_tokens
    units, ratios = {}, []
    for (arm, seed), info in plan.arm_info.items():
        train_tokens, secs = unit_cost(cfg, arm, info["rows"], info["tokens"], ref_tokens, gen_tokens, calib)
        done = unit_done(plan, arm, seed)  # read once: the state and the real time both come from it
        units[f"{arm}-seed{seed}"] = {"train_tokens": int(train_tokens), "calibrated_seconds": round(secs, 1),
                                      "state": "done" if done is not None else unit_state(plan, arm, seed)}
        if done is not None and done.get("seconds") and secs > 0:
            ratios.append(done["seconds"] / secs)
    scale = float(np.median(ratios)) if ratios else 1.0
    for u in units.values():
        u["seconds"] = round(u["calibrated_seconds"] * scale, 1)
    return {"units": units, "reference_tokens": int(ref_tokens), "generated_tokens": gen_tokens,
            "seconds": round(sum(u["seconds"] for u in units.values() if u["state"] != "done"), 1),
            "seconds_all": round(sum(u["seconds"] for u in units.values()), 1), "calibration": calib,
            "scale": {"factor": round(scale, 3), "from_units": len(ratios)}}


def fit_to_minutes(plan: EvalPlan, est: dict[str, Any], minutes: float) -> EvalPlan:
    """The largest eval of `plan` whose units left to run fit in `minutes` at `est`'s per-unit seconds
    (`estimate`: calibrated on this machine). It gives up, in this order (`tries`): the equal-rows arm (the
    comparison that length flatters most), then seeds down to one, then the length-matched arm, then the untuned
    student; `selected` and `random_tokens`, the verdict's pair, always stay. Finished units cost nothing, so a
    second call with the same budget adds seeds to the first one's. Raises ValueError, before any work, when even
    one seed of the arms that must stay does not fit."""
    cfg = plan.config

    def cost(arms: list[str], seeds: int) -> float:
        return sum(u["seconds"] for (a, s), u in ((k, est["units"][f"{k[0]}-seed{k[1]}"]) for k in plan.arms)
                   if a in arms and s < seeds and u["state"] != "done")

    def without(*drop: str) -> list[str]:
        return [a for a in cfg.arms if a not in drop]

    tries = [(list(cfg.arms), cfg.seeds)] + [(without("random_rows"), s) for s in range(cfg.seeds, 0, -1)]
    tries += [(without("random_rows", "random_length"), 1), (without("random_rows", "random_length", "base"), 1)]
    # `--arms random_rows,base`: the last tries keep no arm, which always "fits" and ran an eval of nothing
    tries = [(arms, seeds) for arms, seeds in tries if arms]
    budget = minutes * 60
    for arms, seeds in tries:
        if cost(arms, seeds) <= budget:
            break
    else:
        what = "that gives a verdict" if {"selected", "random_tokens"} <= set(arms) else "of these arms"
        raise ValueError(f"--minutes {minutes:g}: the smallest eval {what} ({', '.join(arms)}, one "
                         f"seed) needs about {cost(arms, seeds) / 60:.0f} min on this machine; give more minutes "
                         "(or run it where the student trains faster)")
    left = [a for a in cfg.arms if a not in arms] + ([f"seeds {cfg.seeds} -> {seeds}"] if seeds < cfg.seeds else [])
    keep = {k: v for k, v in plan.arms.items() if k[0] in arms and k[1] < seeds}
    return replace(plan, config=replace(cfg, arms=tuple(arms), seeds=seeds), arms=keep,
                   arm_info={k: plan.arm_info[k] for k in keep},
                   fitted={"minutes": minutes, "left_out": left, "seconds": round(cost(arms, seeds), 1)})


_TOKENIZERS: dict[str, Any] = {}


def _long_qa_prompts(tok: Any, refs: Sequence[Reference], cfg: EvalConfig) -> int:
    """How many of the Q/A prompts the eval generates from are longer than max_length - gen_tokens."""
    if not cfg.accuracy_rows:
        return 0
    limit = cfg.max_length - cfg.gen_tokens
    n = 0
    for r in refs:
        for i in r.qa_rows[: cfg.accuracy_rows]:
            text = tok.apply_chat_template(r.convs[i][:-1], tokenize=False, add_generation_prompt=True)
            n += len(tok(text, add_special_tokens=False)["input_ids"]) > limit
    return n


def _plain_if_no_template(tok: Any) -> Any:
    """A student without a chat template (a base model) is trained and scored on curate's plain rendering
    (`curate.lm.finetune.PLAIN_TRAINING_TEMPLATE`, `curate.lm.base.render_plain`): count its tokens on the same
    text. Planning called `apply_chat_template` on the bare tokenizer and failed on every such student."""
    if not getattr(tok, "chat_template", None):
        tok.chat_template = training_chat_template(tok)
    return tok


def _tokenizer(student: str) -> Any:
    from transformers import AutoTokenizer

    if student not in _TOKENIZERS:
        _TOKENIZERS[student] = _plain_if_no_template(AutoTokenizer.from_pretrained(student))
    return _TOKENIZERS[student]


# -- the whole eval -----------------------------------------------------------------------------------------
def run_eval(run_dir: str | Path, config: EvalConfig | None = None, references: Sequence[str] | None = None, *,
             on_unit: Callable[[str, int, dict[str, Any]], None] | None = None,
             plan: EvalPlan | None = None) -> dict[str, Any]:
    """The in-process executor (`curate eval --no-prefect`): every unit in order (finished ones are read back),
    then the summary in RUN/eval.json; returns that dict. `flows.eval` runs the same units as Prefect tasks."""
    plan = plan or plan_eval(run_dir, config, references)
    t0 = time.perf_counter()
    results, states = {}, {}
    for arm, seed in plan.units():
        cached = unit_done(plan, arm, seed) is not None
        results[(arm, seed)] = run_unit(plan, arm, seed)
        states[f"{arm}-seed{seed}"] = "Cached" if cached else "Completed"
        if on_unit:
            on_unit(arm, seed, results[(arm, seed)])
    return write_eval(plan, results, time.perf_counter() - t0, executor={"kind": "local", "units": states})


def overlap_note(plan: EvalPlan) -> str:
    """A warning when the subset holds reference rows ("" when not): the selected arm trains on them and the random
    arms never do (the pool leaves them out), so a "better" there is memorisation. Recorded before only as a number
    in eval.json's arms (`reference_overlap`), which neither the verdict nor the CLI mentioned."""
    if "selected" not in plan.config.arms:
        return ""
    n = int(plan.arm_info.get(("selected", 0), {}).get("reference_overlap", 0))
    if not n:
        return ""
    return (f"Warning: {n:,} of the subset's {plan.selected.height:,} rows are reference rows: the selected arm "
            "trains on them and no random arm does, so its loss on those sets is not a fair comparison (give "
            "reference sets from outside the pool)")


def write_eval(plan: EvalPlan, results: dict[tuple[str, int], dict[str, Any]], seconds: float, *,
               executor: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarize the units' results into RUN/eval.json (written atomically); returns that dict. `executor`
    records how the units ran (which were read back from their files: "Cached")."""
    summary = summarize(plan, results)
    overall, line = verdict_line(summary)
    cfg = plan.config
    if cfg.seeds == 1 and overall != "n/a":  # fusion at 1,000 rows: a second seed moved two verdicts (eval.md)
        line += (". One seed per arm: the intervals leave out the spread between fine-tunes; run more seeds before "
                 "trusting a better or worse")
    elif cfg.seeds == 2 and overall != "n/a":  # the Welch part then has ~1 degree of freedom (t ~12.7)
        line += (". Two seeds per arm: the intervals' seed part rests on one degree of freedom and is very wide; a "
                 "third seed narrows it most")
    leak = overlap_note(plan)
    if leak:
        line += ". " + leak
    doc = {
        "verdict": overall, "verdict_line": line, "student": cfg.student, "student_path": plan.student,
        "dtype": plan.dtype, "config": asdict(cfg), "references": summary,
        "arms": {f"{a}-seed{s}": {k: v for k, v in r.items() if k not in ("references", "key")}
                 for (a, s), r in results.items()},
        "seconds": round(seconds, 1),
        "unit_seconds": round(sum(r["seconds"] for r in results.values()), 1),
    }
    if executor is not None:
        doc["executor"] = executor
    if plan.fitted:
        doc["fitted"] = plan.fitted
    from curate.run import atomic_path

    with atomic_path(plan.run_dir / "eval.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


__all__ = ["ARMS", "EvalConfig", "EvalPlan", "PoolLengths", "Reference", "calibrate", "draw_length_matched",
           "draw_random_rows", "draw_random_tokens", "estimate", "final_answer", "finetune", "fit_to_minutes",
           "load_reference", "long_prompt_note", "overlap_note", "plan_eval", "predicted_answer",
           "reference_names", "resolve_student", "run_eval", "run_unit", "summarize", "token_lengths",
           "training_chat_template", "unit_cost", "unit_done", "unit_state", "verdict_line", "write_eval"]
