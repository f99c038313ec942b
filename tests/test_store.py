"""Score store and runner: compute once, survive concurrent writers and a killed run.

The engine is the real transformers engine on a tiny model; the counting wrapper only forwards calls.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import sample_rows
from polars.testing import assert_frame_equal

from curate.io.formats import to_messages
from curate.lm import load_engine
from curate.lm.base import LMConfig
from curate.lm.tiny import make_tiny_model
from curate.schema import make_record
from curate.scoring import Scorer, ScorerError, ScorerParams, get_scorer
from curate.scoring.runner import score_pool
from curate.scoring.store import ScoreStore, make_key

ROOT = Path(__file__).resolve().parent.parent
N = 24


def same_scores(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Equal ids, flags and counts; floats to 1e-6 relative: a different batch (other padding) sums in another
    order, which moves IFD by ~1e-9 (measured with transformers 5.24), so exact equality is the wrong test."""
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-6, abs_tol=1e-9)


def sample_pool(n: int) -> pl.DataFrame:
    """The first n rows of the bundled sample as records (real text of varied length: padding matters)."""
    recs = []
    for i, row in enumerate(sample_rows(n)):
        fmt, msgs = to_messages(row)
        recs.append(make_record(msgs, source="sample", row=i, fmt=fmt))
    return pl.DataFrame(recs)


class CountingEngine:
    """Forwards everything to a real engine; counts the scoring calls and the sequences they carry."""

    def __init__(self, engine):
        self._engine = engine
        self.calls = 0
        self.sequences = 0

    def response_logprobs(self, prompts, responses, **kw):
        self.calls += 1
        self.sequences += len(prompts)
        return self._engine.response_logprobs(prompts, responses, **kw)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden_size=64, layers=1)


@pytest.fixture(scope="module")
def engine(tiny):
    return load_engine(LMConfig(tiny, max_length=256))


@pytest.fixture(scope="module")
def pool() -> pl.DataFrame:
    return sample_pool(N)


@pytest.fixture(scope="module")
def reference(engine, pool, tmp_path_factory) -> pl.DataFrame:
    """IFD of the pool scored in one go, in a store of its own."""
    return score_pool(pool, get_scorer("ifd"), engine=engine, store=ScoreStore(tmp_path_factory.mktemp("ref"))).df


def test_rerun_is_served_from_the_store(engine, pool, reference, tmp_path):
    store = ScoreStore(tmp_path)
    counting = CountingEngine(engine)
    first = score_pool(pool, get_scorer("ifd"), engine=counting, store=store, batch_size=10)
    assert (first.n_computed, first.n_cached) == (N, 0)
    assert counting.calls == 3 and counting.sequences == 2 * N  # 3 batches, 2 passes per row
    same_scores(first.df, reference)
    counting.calls = counting.sequences = 0
    again = score_pool(pool, get_scorer("ifd"), engine=counting, store=store, batch_size=10)
    assert counting.calls == 0 and (again.n_computed, again.n_cached) == (0, N)
    assert again.df.equals(first.df)
    # a new pool sharing half its rows computes only the new half; a reordered pool nothing
    bigger = pl.concat([pool.slice(N // 2), sample_pool(N + 6).slice(N)])
    grown = score_pool(bigger, get_scorer("ifd"), engine=counting, store=store)
    assert (grown.n_computed, grown.n_cached) == (6, N - N // 2) and counting.sequences == 12
    shuffled = pool.sample(fraction=1.0, shuffle=True, seed=1)
    counting.calls = 0
    out = score_pool(shuffled, get_scorer("ifd"), engine=counting, store=store)
    assert counting.calls == 0 and out.df["id"].to_list() == shuffled["id"].to_list()
    # other parameters or another model are other keys
    assert score_pool(pool, get_scorer("ifd", include_end=True), engine=counting, store=store).n_computed == N


def _score_in_process(tiny: str, root: str, rows: list[int], barrier, out) -> None:
    os.environ["CURATE_PROGRESS"] = "0"
    eng = load_engine(LMConfig(tiny, max_length=256), threads=1)
    pool = sample_pool(N)[rows]
    barrier.wait()  # start scoring together
    run = score_pool(pool, get_scorer("ifd"), engine=eng, store=ScoreStore(root), batch_size=3)
    out.put((run.n_computed, run.n_cached))


def test_two_processes_scoring_into_one_store(tiny, engine, reference, tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    halves = [list(range(0, 16)), list(range(8, N))]  # overlapping: both may write rows 8..15
    procs = [ctx.Process(target=_score_in_process, args=(tiny, str(tmp_path), h, barrier, out)) for h in halves]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    counts = [out.get(timeout=5) for _ in procs]
    assert sum(c for c, _ in counts) >= N  # every row was computed by someone
    store = ScoreStore(tmp_path)
    key = make_key(get_scorer("ifd").signature(), engine.signature())
    parts = sorted(store.folder(key).glob("part-*.parquet"))
    assert len(parts) >= N // 3 and not list(store.folder(key).glob(".*.tmp"))
    for part in parts:  # no part is corrupt
        pl.read_parquet(part)
    same_scores(store.get(key, reference["id"].to_list()), reference)


KILLED_RUN = textwrap.dedent("""
    import os, sys, time
    os.environ["CURATE_PROGRESS"] = "0"
    sys.path.insert(0, {tests!r})
    from test_store import sample_pool
    from curate.lm.base import LMConfig
    from curate.lm import load_engine
    from curate.scoring.runner import score_pool
    from curate.scoring.store import ScoreStore
    from scorers.ifd import IFD

    class LoggingIFD(IFD):  # same name, version and params: the same store key as IFD
        def score(self, batch, ctx):
            with open({log!r}, "a") as fh:
                fh.write(f"start {{self.n}}\\n")
            self.n += 1
            time.sleep(0.3)  # slow enough to be killed mid-run
            return super().score(batch, ctx)

    scorer = LoggingIFD()
    scorer.n = 0
    eng = load_engine(LMConfig({tiny!r}, max_length=256), threads=1)
    score_pool(sample_pool({n}), scorer, engine=eng, store=ScoreStore({root!r}), batch_size=2)
""")


def test_killed_run_keeps_every_finished_batch(tiny, engine, pool, reference, tmp_path):
    log, root = tmp_path / "log", tmp_path / "store"
    code = KILLED_RUN.format(tests=str(ROOT / "tests"), log=str(log), tiny=tiny, n=N, root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.time() + 180
    # batch k starts only after batch k-1 was put in the store: wait for "start 4", then kill
    while time.time() < deadline and "start 4" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, "the scoring subprocess ended early"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    started = log.read_text().split()
    finished_batches = int(started[-1]) if started else 0
    assert finished_batches >= 4
    store = ScoreStore(root)
    key = make_key(get_scorer("ifd").signature(), engine.signature())
    kept = store.ids(key)
    assert len(kept) >= 2 * finished_batches and len(kept) < N
    kept_ids = [i for i in pool["id"].to_list() if i in kept]
    same_scores(store.get(key, kept_ids), reference.filter(pl.col("id").is_in(kept_ids)))
    counting = CountingEngine(engine)
    resumed = score_pool(pool, get_scorer("ifd"), engine=counting, store=store)
    assert resumed.n_cached == len(kept) and counting.sequences == 2 * (N - len(kept))
    same_scores(resumed.df, reference)


# -- the store and runner on their own ----------------------------------------------------------------------


class Chars(Scorer):
    """A real (rule) scorer for runner checks without a model: response length in characters."""

    name = "chars"
    version = "1"
    reads = ("response",)
    writes = ("chars",)
    multi_turn = "last turn"
    higher_is_better = {"chars": True}

    class Params(ScorerParams):
        scale: float = 1.0

    def score(self, batch, ctx):
        return pl.DataFrame({"chars": [len(r) * self.params.scale for r in batch["response"]]})


def test_store_put_get_missing(tmp_path):
    store = ScoreStore(tmp_path)
    key = make_key("x@1:abc", "model", "ctx")
    assert store.missing(key, ["a", "b", "a"]) == ["a", "b"]
    store.put(key, pl.DataFrame({"id": ["a", "c"], "v": [1.0, 3.0]}))
    store.put(key, pl.DataFrame({"id": ["b"], "v": [None]}, schema={"id": pl.String, "v": pl.Float64}))
    store.put(key, pl.DataFrame({"id": ["c"], "v": [3.0]}))  # a second writer's copy of c
    assert store.missing(key, ["d", "a", "b", "d"]) == ["d"]
    got = store.get(key, ["c", "a", "b", "a"])
    assert got["id"].to_list() == ["c", "a", "b", "a"] and got["v"].to_list() == [3.0, 1.0, None, 1.0]
    with pytest.raises(KeyError, match="1 ids"):
        store.get(key, ["a", "zz"])
    assert store.compact(key) == 3 and len(list(store.folder(key).glob("part-*"))) == 1
    assert store.get(key, ["a", "b", "c"])["v"].to_list() == [1.0, None, 3.0]
    assert store.keys() == [key] and store.folder(key).parent.name == "x"
    with pytest.raises(ValueError, match="'id'"):
        store.put(key, pl.DataFrame({"v": [1]}))


def test_runner_keys_validation_and_duplicates(tmp_path):
    store = ScoreStore(tmp_path)
    recs = pl.DataFrame({"id": ["a", "b", "a", "c"], "response": ["x", "yy", "x", "zzz"]})
    run = score_pool(recs, Chars(scale=2), store=store, batch_size=1)
    assert run.df["chars"].to_list() == [2.0, 4.0, 2.0, 6.0] and (run.n_computed, run.n_cached) == (3, 0)
    assert run.key.endswith("|none|")  # no engine used: the model part is "none"
    assert Chars(scale=2).signature() == Chars(scale=2.0).signature() != Chars().signature()
    assert score_pool(recs, Chars(scale=2), store=store, engine=object()).n_cached == 3
    assert score_pool(recs.head(0), Chars(), store=store).df.columns == ["id", "chars"]
    with pytest.raises(ScorerError, match="invalid parameters.*scal"):
        Chars(scal=2)
    with pytest.raises(ScorerError, match="reads columns"):
        score_pool(recs.drop("response"), Chars(), store=store)
    with pytest.raises(ScorerError, match="needs a language model"):
        score_pool(sample_pool(2), get_scorer("ifd"), store=store)

    class Broken(Chars):
        def score(self, batch, ctx):
            return pl.DataFrame({"chars": [1.0]})

    with pytest.raises(ScorerError, match="expected"):
        score_pool(recs, Broken(scale=5), store=store)


def test_contract_is_checked_when_a_scorer_is_defined():
    with pytest.raises(TypeError, match="prefixed"):
        type("Bad", (Scorer,), {"name": "bad", "version": "1", "reads": (), "writes": ("score",),
                                "multi_turn": "", "higher_is_better": {}})


def test_damaged_part_is_set_aside_and_rescored(tmp_path):
    """A part file damaged on disk (here: truncated) between runs must not fail every later run: its rows
    are scored again, the other parts are still served."""
    store = ScoreStore(tmp_path)
    recs = pl.DataFrame({"id": [str(i) for i in range(6)], "response": ["x" * i for i in range(6)]})
    key = score_pool(recs, Chars(), store=store, batch_size=2).key
    parts = sorted(store.folder(key).glob("part-*.parquet"))
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="damaged"):
        run = score_pool(recs, Chars(), store=store, batch_size=2)
    assert (run.n_computed, run.n_cached) == (2, 4)
    assert run.df["chars"].to_list() == [float(i) for i in range(6)]
    assert not parts[1].exists() and (parts[1].parent / ("damaged-" + parts[1].name)).exists()
