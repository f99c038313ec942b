"""Embedding stage on real text (the bundled sample): views, the id-keyed store, caching, MiniLM vs bare encode,
near-dups."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")

from conftest import sample_rows  # noqa: E402

from curate.cluster import default_k, kmeans, semdedup  # noqa: E402
from curate.embed import (  # noqa: E402
    TEXT_VIEWS,
    EmbeddingStore,
    EmbedError,
    embed,
    load_embedder,
    resolve_model,
    view_texts,
)
from curate.ingest import ingest  # noqa: E402
from curate.run import Run  # noqa: E402

N_BASE = 300
KINDS = ("case", "punct", "word", "typo")
DISTINCT = ("gsm8k_train", "self_instruct_seed")


def _records(tmp: Path, rows: list[dict]) -> pl.DataFrame:
    """Real ingest of rows (no exact dedup, so case-only copies survive to reach semantic dedup)."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = Run(tmp / "run")
    ingest(run, [str(path)])
    return pl.read_parquet(run.file("records_all.parquet"))


def _edit(row: dict, kind: str) -> dict:
    """A paraphrase-free near-duplicate: case change, punctuation, one word added, or one typo."""
    r = dict(row)
    words = r["output"].split(" ")
    filled = [i for i, w in enumerate(words) if w]  # code indents with runs of spaces: skip the empty words
    m = filled[len(filled) // 2]
    if kind == "case":
        r["instruction"], r["output"] = r["instruction"].lower(), r["output"].upper()
    elif kind == "punct":
        r["instruction"] = r["instruction"].rstrip(".?!") + "?"
        # commas dropped and full stops made semicolons, but not inside numbers ("{12,2}", "0.2"): that is content
        r["output"] = re.sub(r"\.(?!\d)", ";", re.sub(r",(?!\d)", "", r["output"]))
    elif kind == "word":
        words[m] = "really " + words[m]
        r["output"] = " ".join(words)
    else:
        w = words[m]
        words[m] = w[0] + w[2] + w[1] + w[3:] if len(w) > 3 else w + w[-1]
        r["output"] = " ".join(words)
    return r


@pytest.fixture(scope="module")
def static_embedder():
    """The distilled static model; conftest keeps cache_dir()/models across sessions (distilling takes ~15 s)."""
    return load_embedder("minilm-static", max_seq_length=128)


@pytest.fixture(scope="module")
def minilm():
    return load_embedder("minilm", max_seq_length=128)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """300 real rows + one edited copy of every 5th row; returns (df, [(orig_pos, copy_pos, kind)]).

    GSM8K and Self-Instruct rows of the bundled sample, alternating: no two of them are near-duplicates (closest
    pair: cosine 0.79 MiniLM, 0.89 static), unlike the sample's GPTeacher rows, which share long tool preambles."""
    base = sample_rows(N_BASE, sources=DISTINCT)
    idx = list(range(0, N_BASE, 5))
    copies = [_edit(base[i], KINDS[k % 4]) for k, i in enumerate(idx)]
    df = _records(tmp_path_factory.mktemp("planted"), base + copies)
    pos = {r: i for i, r in enumerate(df["row"].to_list())}  # 1-based line -> position
    pairs = [(pos[i + 1], pos[N_BASE + k + 1], KINDS[k % 4]) for k, i in enumerate(idx)
             if i + 1 in pos and N_BASE + k + 1 in pos]
    assert len(pairs) == len(idx)  # every row and copy survives ingest
    return df, pairs


def test_view_texts(tmp_path):
    rows = [{"system": "Be brief.", "instruction": "Name a colour.", "input": "", "output": "Blue."}]
    df = _records(tmp_path, rows)
    assert view_texts(df, "user") == ["Be brief.\nName a colour."]  # system + user, no response
    assert view_texts(df, "instruction_response") == ["Name a colour.\n\nBlue."]
    conv = view_texts(df, "conversation")[0]
    assert "assistant: Blue." in conv and "user: Name a colour." in conv
    assert set(TEXT_VIEWS) == {"user", "instruction_response", "conversation"}
    with pytest.raises(EmbedError, match="unknown text view"):
        view_texts(df, "responses")


def _append_parts(root: str, worker: int, barrier) -> None:
    store = EmbeddingStore(root)
    rng = np.random.default_rng(worker)
    barrier.wait()
    for part in range(4):
        ids = [f"w{worker}-{part}-{i}" for i in range(50)]
        store.append(ids, rng.standard_normal((50, 8)).astype(np.float32))


def test_store_concurrent_appends_and_memmap(tmp_path):
    root = tmp_path / "store"
    ctx = mp.get_context("spawn")  # fork after polars' thread pool started can deadlock
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_parts, args=(str(root), w, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # debris of a crashed writer: a temp file and a vector file whose ids file never landed
    (root / ".part-x.npy.tmp").write_bytes(b"junk")
    np.save(root / "part-99999999999999999999-1-dead.npy", np.zeros((3, 8), np.float16))
    store = EmbeddingStore(root)
    assert len(store) == 400
    for w in range(2):
        rng = np.random.default_rng(w)
        for part in range(4):
            ids = [f"w{w}-{part}-{i}" for i in range(50)]
            want = rng.standard_normal((50, 8)).astype(np.float32)
            want /= np.linalg.norm(want, axis=1, keepdims=True)
            np.testing.assert_allclose(store.get(ids), want, atol=2e-3)
    assert store.missing(["w0-0-0", "nope", "nope"]) == ["nope"]
    with pytest.raises(KeyError):
        store.get(["w0-0-0", "nope"])
    assert isinstance(store._arrays[0], np.memmap)


def test_embed_caches_by_id(tmp_path, static_embedder):
    df = _records(tmp_path / "a", sample_rows(200))
    store = EmbeddingStore(tmp_path / "store")
    first = embed(df, model=static_embedder, view="instruction_response", store=store)
    assert (first.n_new, first.n_cached) == (df.height, 0)
    assert first.vectors.shape == (df.height, 384) and first.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first.vectors, axis=1), 1.0, atol=1e-5)

    again = embed(df, model=static_embedder, view="instruction_response", store=EmbeddingStore(store.root))
    assert again.n_new == 0 and again.n_cached == df.height
    assert np.array_equal(again.vectors, first.vectors)  # bit-identical, not just close

    more = _records(tmp_path / "b", sample_rows(250))  # the same 200 rows plus 50 new ones
    grown = embed(more, model=static_embedder, view="instruction_response", store=store)
    assert grown.n_new == more.height - df.height and grown.n_cached == df.height
    old = more["id"].is_in(df["id"].implode()).to_numpy()
    assert np.array_equal(grown.vectors[old], first.vectors)  # rows in the same order, same vectors

    rev = embed(more.reverse(), model=static_embedder, view="instruction_response", store=store)
    assert rev.n_new == 0 and np.array_equal(rev.vectors, grown.vectors[::-1])
    # a different view is a different key: nothing cached for it yet
    assert embed(df, model=static_embedder, view="user", store=False).n_new == df.height


def test_damaged_store_part_is_set_aside_and_embedded_again(tmp_path, static_embedder):
    """A part truncated on disk between runs (a full disk, a bad copy) must not fail every later run with an
    unreadable-file error: it is set aside and its rows are embedded again, bit-identical."""
    df = _records(tmp_path / "a", sample_rows(30))
    store = EmbeddingStore(tmp_path / "store")
    first = embed(df.head(20), model=static_embedder, view="user", store=store)
    embed(df, model=static_embedder, view="user", store=store)  # a second part: the last 10 rows
    npy = sorted(store.root.glob("part-*.npy"))[0]
    npy.write_bytes(npy.read_bytes()[:200])
    with pytest.warns(UserWarning, match="damaged"):
        again = embed(df, model=static_embedder, view="user", store=EmbeddingStore(store.root))
    assert (again.n_new, again.n_cached) == (20, 10)
    assert np.array_equal(again.vectors[:20], first.vectors)
    assert len(list(store.root.glob("damaged-part-*"))) == 2


def test_embed_default_store_location(tmp_path, monkeypatch, static_embedder):
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))  # a fresh, empty cache
    df = _records(tmp_path / "a", sample_rows(20))
    r = embed(df, model=static_embedder, view="user")
    sig = static_embedder.signature
    assert sig.startswith("minilm-static-") and sig.endswith("-L128")
    assert list((tmp_path / "cache" / "embeddings" / sig / "user").glob("part-*.ids.parquet"))
    assert r.manifest()["revision"] == static_embedder.spec.revision and r.manifest()["n_new"] == 20
    with pytest.raises(EmbedError, match="neither a local folder"):
        resolve_model("no-such-org/no-such-model")


def test_minilm_stage_matches_bare_encode(tmp_path, planted, minilm):
    """The stage (length sorting, chunking, store round trip) returns what SentenceTransformer.encode does."""
    df, _ = planted
    sub = df.head(24)
    model = minilm
    assert model.device == "cpu" and model.dtype == "float32" and model.dim == 384
    r = embed(sub, model=model, view="instruction_response", store=EmbeddingStore(tmp_path / "s"))
    bare = model.model.encode(view_texts(sub, "instruction_response"), batch_size=64, normalize_embeddings=True)
    cos = (r.vectors * bare).sum(axis=1)
    assert cos.min() > 0.9995  # only float16 storage rounding separates them


def _pairs_found(dropped: pl.DataFrame, pairs: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    got = {(i, j) for i, j in zip(dropped["index"].to_list(), dropped["duplicate_of"].to_list(), strict=True)}
    return [p for p in pairs if (p[1], p[0]) in got or (p[0], p[1]) in got]


def test_minilm_semdedup_finds_planted_near_duplicates(tmp_path, planted, minilm):
    df, pairs = planted
    r = embed(df, model=minilm, view="instruction_response", store=EmbeddingStore(tmp_path / "s"))
    X = r.vectors
    # one cluster: every planted copy must be found, and nothing else (the 300 base rows are distinct)
    one = semdedup(X, np.zeros(len(X), np.int32), np.zeros(len(X), np.float32), eps=0.1)
    assert len(_pairs_found(one, pairs)) == len(pairs)
    assert one.height == len(pairs)
    # with k-means first (the real stage), a pair is found whenever both copies share a cluster
    km = kmeans(X, default_k(len(X)), seed=0)
    dropped = semdedup(X, km.assign, km.distance, eps=0.1)
    together = [p for p in pairs if km.assign[p[0]] == km.assign[p[1]]]
    assert len(together) >= 0.9 * len(pairs)
    assert len(_pairs_found(dropped, together)) == len(together)
    assert dropped.height <= len(pairs)
    kept = set(range(len(X))) - set(dropped["index"].to_list())
    assert set(dropped["duplicate_of"].to_list()) <= kept


def test_static_semdedup_finds_planted_near_duplicates(tmp_path, planted, static_embedder):
    df, pairs = planted
    X = embed(df, model=static_embedder, view="instruction_response", store=EmbeddingStore(tmp_path / "s")).vectors
    one = semdedup(X, np.zeros(len(X), np.int32), np.zeros(len(X), np.float32), eps=0.05)
    found = _pairs_found(one, pairs)
    # case, punctuation and an added word are found at eps 0.05; a typo in a one-word answer may not be
    assert {p for p in pairs if p[2] != "typo"} <= set(found)
    assert one.height == len(found)  # no distinct base row is flagged
