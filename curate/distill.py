"""Sample-then-distill scoring: score a stratified sample with the LM, predict the rest with a cheap model.

Why: a real scoring LM (SmolLM2-135M: ~5 IFD rows/s on 2 CPU cores) needs hours for a 52k pool. The LM scores
a sample stratified by cluster; one scikit-learn model per score column, trained on that sample over features
the pipeline already has (embeddings of two text views, lengths, heuristic flags), predicts every other row.
Every row says whether its value was computed or predicted, and the predictor's agreement is measured on
sampled rows it did not train on, so a user can see how far to trust the predicted part.

API (pure functions; the pipeline stage wires them to the run folder and the stores):

    n = sample_size(n_pool, sample=None, minutes=None, rows_per_second=None, engine_is_gpu=False)
    ids = choose_sample(ids, clusters, n, seed, computed=None)      # -> list[str], in input order
    feats = features(records, model="minilm-static", flags=None)   # -> Features(ids, matrix, names)
    table, report = distill(feats, computed, all_ids=None, seed=0)  # computed: DataFrame id + score columns

- `sample_size`: the whole pool for small pools (<= SMALL_POOL rows), on a GPU, when nothing is asked, or when
  `minutes` allows it; else `sample` (rows, or a fraction of the pool) or minutes x rows/s. Never below
  MIN_SAMPLE rows (a predictor needs something to learn from).
- `choose_sample`: a cluster-proportional quota (at least one row per non-empty cluster when n allows), filled in
  each cluster by the order of a hash of (seed, id). A row's rank does not depend on the rest of the pool, so a
  grown pool keeps the earlier rows wherever its quota allows; `computed` (ids the score store already holds)
  are always in the sample and count toward their cluster's quota, so an incremental run computes only the
  shortfall.
- `features`: the "user" view embedding (what clustering uses) and the "instruction_response" view (what
  SemDeDup uses), both read from the embedding store, so in a pipeline run they cost nothing; log lengths;
  heuristic flags (computed here if not given: they are cheap rules).
- `distill`: per numeric column, Ridge (all features), HistGradientBoosting (32 PCA directions per view + the
  scalar features) and Ridge on the scalar features alone (lengths, flags: small samples overfit 768 embedding
  dimensions) are fitted on (1 - holdout) of the computed rows; the one with the higher Spearman on the held-out
  rest wins and is refitted on all computed rows. Positive
  columns are modelled in log space. Columns with a rule (`DERIVED`: `ifd_gt1 = ifd > 1`, IFD's losses and
  Superfiltering's ratio from ifd and L(A)) are computed from their predicted parents so a predicted row obeys the
  identities a computed one does; other booleans are classified; text columns
  (`*_error`) stay null for predicted rows. Computed values are never changed. The output has one row per
  id of `all_ids`, every score column, and a boolean `score_predicted`.

The report (JSON-ready dict) gives per column: the model chosen, Spearman and top-10% overlap on the held-out
computed rows (chance: 0 and 0.1), and the counts computed / predicted.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

#: pools at most this large are scored whole: the LM cost is small and a predictor would learn from too little
SMALL_POOL = 2_000
#: a sample is never smaller than this (or the pool)
MIN_SAMPLE = 200
#: embedding views used as features; both are in the store after embed (user) and semdedup (instruction_response)
FEATURE_VIEWS = ("user", "instruction_response")
LENGTH_COLUMNS = ("n_tokens", "instruction_chars", "response_chars", "n_turns")
#: columns recomputed on predicted rows from predicted parent columns, so that a predicted row obeys the identities
#: a computed one does: column -> (parents, rule). IFD's four numbers come from two losses, L(A|Q) and L(A):
#: Cherry's ifd = L(A|Q) / L(A), Superfiltering's ifd_ppl = exp(L(A|Q) - L(A)); predicted one by one, ifd and
#: ifd_ppl disagreed about > 1 on 127 of 48,907 predicted Alpaca rows. Predicting ifd (the ranked column) and
#: L(A) and deriving the rest keeps ifd > 1 <=> ifd_ppl > 1 <=> ifd_cond_loss > ifd_uncond_loss, as computed.
DERIVED: dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]] = {
    "ifd_gt1": (("ifd",), lambda ifd: ifd > 1.0),
    "ifd_cond_loss": (("ifd", "ifd_uncond_loss"), lambda ifd, lu: ifd * lu),
    "ifd_ppl": (("ifd", "ifd_uncond_loss"), lambda ifd, lu: np.exp(lu * (ifd - 1.0))),
}
HOLDOUT = 0.2
TOP = 0.1  # top-10% overlap
MIN_TRAIN = 20  # fewer usable computed values than this: predict their median
TREE_COMPONENTS = 32  # principal directions per embedding view given to the tree models
PREDICT_CHUNK = 65_536  # rows predicted at a time (~200 MB of features with two 384-d views)


class DistillError(ValueError):
    """Inputs that cannot be distilled (ids missing from the features, no computed rows); says which."""


# ------------------------------------------------------------------------------------------ sample size


def sample_size(
    n_pool: int,
    sample: int | float | None = None,
    minutes: float | None = None,
    rows_per_second: float | None = None,
    engine_is_gpu: bool = False,
    small_pool: int = SMALL_POOL,
) -> int:
    """Rows the LM should score: the whole pool unless the pool is large and `sample` or `minutes` limit it.

    `sample` is a row count (int >= 1) or a fraction of the pool (float in (0, 1]); it wins over `minutes` and
    also applies on a GPU (the user asked for it). `minutes` with `rows_per_second` (measured or assumed for
    the scoring model and scorers) gives the rows that fit; on a GPU the whole pool is scored.
    """
    if n_pool <= 0:
        return 0
    if n_pool <= small_pool:
        return n_pool
    floor = min(n_pool, MIN_SAMPLE)
    if sample is not None:
        if isinstance(sample, bool) or sample <= 0:
            raise ValueError(f"score.sample must be a row count >= 1 or a fraction in (0, 1], got {sample!r}")
        if isinstance(sample, float):
            if sample > 1:
                raise ValueError(f"score.sample {sample} is a float above 1; give a row count as an integer")
            n = math.ceil(sample * n_pool)
        else:
            n = int(sample)
        return min(n_pool, max(floor, n))
    if minutes is None or engine_is_gpu:
        return n_pool
    if minutes <= 0:
        raise ValueError(f"score.minutes must be positive, got {minutes}")
    if not rows_per_second or rows_per_second <= 0:
        raise ValueError("score.minutes needs a positive rows_per_second (measured or assumed)")
    n = int(minutes * 60 * rows_per_second)
    return min(n_pool, max(floor, n))


# --------------------------------------------------------------------------------------------- sampling


def hash_rank(ids: Iterable[str], seed: int) -> np.ndarray:
    """uint64 per id from blake2b(seed, id): a rank that does not depend on the rest of the pool."""
    prefix = f"{int(seed)}\x00".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + i.encode(), digest_size=8).digest(), "big") for i in ids),
        dtype=np.uint64,
    )


def _quotas(sizes: np.ndarray, n: int, order_key: np.ndarray) -> np.ndarray:
    """Rows per cluster: n split in proportion to size, >= 1 per non-empty cluster when n allows, <= size.

    Largest remainders; ties broken by `order_key` (a hash per cluster) so the split is deterministic.
    """
    k = len(sizes)
    quota = np.zeros(k, np.int64)
    nonempty = np.flatnonzero(sizes > 0)
    if n <= 0 or len(nonempty) == 0:
        return quota
    n = min(n, int(sizes.sum()))
    if n < len(nonempty):  # one row each for the n largest clusters
        pick = sorted(nonempty, key=lambda c: (-int(sizes[c]), int(order_key[c])))[:n]
        quota[pick] = 1
        return quota
    quota[nonempty] = 1
    rest = n - len(nonempty)
    spare = (sizes - quota).astype(np.float64)
    if rest > 0:
        share = rest * spare / spare.sum()
        base = np.minimum(np.floor(share).astype(np.int64), spare.astype(np.int64))
        quota += base
        left = rest - int(base.sum())
        frac = share - base
        # largest remainder first, among clusters with room; ties by the cluster hash
        room = np.flatnonzero(quota < sizes)
        order = sorted(room, key=lambda c: (-frac[c], int(order_key[c])))
        for c in order[:left]:
            quota[c] += 1
    return quota


def choose_sample(
    ids: Sequence[str] | pl.Series,
    clusters: Sequence[int] | np.ndarray | pl.Series | None,
    n: int,
    seed: int = 0,
    computed: Iterable[str] | None = None,
) -> list[str]:
    """A cluster-stratified sample of about n ids (input order), deterministic per seed, stable as the pool grows.

    Each cluster's quota is proportional to its size (at least one per non-empty cluster when n allows); inside a
    cluster the ids with the lowest hash_rank(seed, id) are taken. Ids in `computed` that are in the pool are
    always returned and fill their cluster's quota first, so the sample can exceed n by the computed rows
    beyond their clusters' quotas (they are free).
    """
    id_list = ids.to_list() if isinstance(ids, pl.Series) else list(ids)
    if len(set(id_list)) != len(id_list):
        raise DistillError("choose_sample: ids must be unique")
    if clusters is None:
        cl = np.zeros(len(id_list), np.int64)
    else:
        s = clusters if isinstance(clusters, pl.Series) else pl.Series(np.asarray(clusters).tolist())
        if len(s) != len(id_list):
            raise DistillError(f"choose_sample: {len(id_list)} ids but {len(s)} cluster labels")
        cl = s.cast(pl.Int64).fill_null(-1).to_numpy()  # unclustered rows form one stratum
    if not id_list or n <= 0:
        return []
    labels, inverse = np.unique(cl, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(labels))
    label_key = hash_rank([str(int(x)) for x in labels], seed)
    quota = _quotas(sizes, n, label_key)
    rank = hash_rank(id_list, seed)
    done = set(computed or ()) & set(id_list)
    is_done = np.fromiter((i in done for i in id_list), bool, len(id_list))
    take = is_done.copy()
    have = np.bincount(inverse[is_done], minlength=len(labels))
    need = np.maximum(quota - have, 0)
    # rows not yet computed, by cluster then hash rank; take the first need[c] of each cluster
    cand = np.flatnonzero(~is_done)
    order = cand[np.lexsort((rank[cand], inverse[cand]))]
    if len(order):
        grp = inverse[order]
        starts = np.searchsorted(grp, np.arange(len(labels)))
        pos_in_grp = np.arange(len(order)) - starts[grp]
        take[order[pos_in_grp < need[grp]]] = True
    return [i for i, t in zip(id_list, take, strict=True) if t]


# --------------------------------------------------------------------------------------------- features


@dataclass
class Features:
    """Features with one row per id (float32) and a name per column, kept as column blocks (one per embedding
    view, lengths, flags): a pool's embeddings are most of its memory, and joining the blocks into one matrix
    would hold them twice. `rows` / `take` assemble just the rows asked for."""

    ids: list[str]
    blocks: list[np.ndarray]
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.blocks, np.ndarray):  # one matrix
            self.blocks = [self.blocks]
        if any(b.ndim != 2 or b.shape[0] != len(self.ids) for b in self.blocks):
            raise DistillError(f"features: {len(self.ids)} ids but blocks of shapes {[b.shape for b in self.blocks]}")
        self._pos = {i: p for p, i in enumerate(self.ids)}
        if len(self._pos) != len(self.ids):
            raise DistillError("features: ids must be unique")

    @property
    def width(self) -> int:
        return sum(b.shape[1] for b in self.blocks)

    @property
    def matrix(self) -> np.ndarray:
        """Every row (a new array: for small pools and tests)."""
        return self.take(np.arange(len(self.ids)))

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """Row positions of ids; DistillError naming one that has no features."""
        try:
            return np.fromiter((self._pos[i] for i in ids), np.int64, len(ids))
        except KeyError as e:
            raise DistillError(f"id {e.args[0]!r} has no features (features cover {len(self.ids)} ids)") from None

    def take(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.width), np.float32)
        j = 0
        for b in self.blocks:
            out[:, j:j + b.shape[1]] = b[positions]
            j += b.shape[1]
        return out

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        return self.take(self.positions(ids))


def heuristic_flags(records: pl.DataFrame) -> pl.DataFrame:
    """id + heur_* columns from the rule scorer (no model; thousands of rows a second)."""
    from curate.scoring import get_scorer
    from curate.scoring.contract import ScoreContext

    out = get_scorer("heuristics").score(records.select("id", "messages"), ScoreContext())
    return out.insert_column(0, records["id"])


def features(
    records: pl.DataFrame,
    *,
    model: str = "minilm-static",
    views: Sequence[str] = FEATURE_VIEWS,
    flags: pl.DataFrame | None = None,
    embeddings: dict[str, np.ndarray] | None = None,
    batch_size: int = 64,
    max_seq_length: int = 256,
) -> Features:
    """Features per record: embeddings of each view (from the store), log lengths, heuristic flags.

    `records` is records.parquet (id, messages, instruction, response and the length columns). `embeddings`
    passes vectors the caller already holds (view -> array in records order); other views come from
    curate.embed (the store: only ids it lacks are embedded). `flags` is id + heur_* columns (e.g. from the
    score store); when None they are computed here.
    """
    from curate.embed import embed

    ids = records["id"].to_list()
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for view in views:
        vec = (embeddings or {}).get(view)
        if vec is None:
            vec = embed(records, model=model, view=view, batch_size=batch_size,
                        max_seq_length=max_seq_length).vectors
        if len(vec) != len(ids):
            raise DistillError(f"embeddings of view {view!r} have {len(vec)} rows, records {len(ids)}")
        blocks.append(np.asarray(vec, np.float32))
        names += [f"emb_{view}_{j}" for j in range(vec.shape[1])]
    lengths = [c for c in LENGTH_COLUMNS if c in records.columns]
    if lengths:
        L = records.select(pl.col(c).cast(pl.Float64).fill_null(0) for c in lengths).to_numpy()
        L = np.where(np.isin(np.array(lengths), ["n_turns"]), L, np.log1p(np.maximum(L, 0)))
        blocks.append(L.astype(np.float32))
        names += [f"log_{c}" if c != "n_turns" else c for c in lengths]
        if {"instruction_chars", "response_chars"} <= set(lengths):  # answer length relative to the prompt
            ratio = L[:, lengths.index("response_chars")] - L[:, lengths.index("instruction_chars")]
            blocks.append(ratio[:, None].astype(np.float32))
            names.append("log_response_over_instruction")
    if flags is None and "messages" in records.columns:
        flags = heuristic_flags(records)
    if flags is not None:
        fcols = [c for c in flags.columns if c.startswith("heur_")]
        aligned = records.select("id").join(flags.unique("id", keep="first"), on="id", how="left",
                                             maintain_order="left")
        F = aligned.select(pl.col(c).cast(pl.Float64).fill_null(0) for c in fcols).to_numpy()
        blocks.append(F.astype(np.float32))
        names += fcols
    if not blocks:
        raise DistillError("features: nothing to build features from (no views, lengths or flags)")
    return Features(ids, blocks, names)


# --------------------------------------------------------------------------------------------- distill


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (None when undefined: fewer than 3 rows or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def top_overlap(true: np.ndarray, pred: np.ndarray, top: float = TOP, higher: bool = True) -> float | None:
    """|top-k by true ∩ top-k by pred| / k with k = ceil(top * n); chance is `top`."""
    n = len(true)
    if n == 0:
        return None
    k = max(1, math.ceil(top * n))
    sign = -1.0 if higher else 1.0
    a = np.argsort(sign * true, kind="stable")[:k]
    b = np.argsort(sign * pred, kind="stable")[:k]
    return len(set(a.tolist()) & set(b.tolist())) / k


def _higher_is_better(column: str) -> bool:
    """The direction selection reads a column in (from the scorer that writes it; default higher)."""
    try:
        from curate.scoring import available, scorer_class
    except ImportError:  # pragma: no cover
        return True
    for name in available():
        hib = getattr(scorer_class(name), "higher_is_better", {}) or {}
        if column in hib:
            return bool(hib[column])
    return True


def _regressor(kind: str, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind in ("ridge", "ridge_scalar"):
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 4, 11), gcv_mode="svd"))
    return HistGradientBoostingRegressor(max_iter=150, learning_rate=0.1, max_leaf_nodes=15,
                                         l2_regularization=1.0, early_stopping=False, random_state=seed)


def _classifier(seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=100, max_leaf_nodes=15, early_stopping=False,
                                          random_state=seed)


def _tree_view(feats: Features, X_comp: np.ndarray, seed: int,
               n_components: int = TREE_COMPONENTS) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The tree models' features: each embedding view reduced by PCA (fitted on the computed rows), the rest as is.
    Returns them for the computed rows and the function that makes them from any rows of the full features.

    Why: gradient boosting bins every feature; on 768 embedding dimensions it is 20x slower than Ridge for no
    gain, while a few dozen principal directions per view keep what it can use.
    """
    from sklearn.decomposition import PCA

    groups: dict[str, list[int]] = {}
    other: list[int] = []
    for j, name in enumerate(feats.names):
        if name.startswith("emb_"):
            groups.setdefault(name.rsplit("_", 1)[0], []).append(j)
        else:
            other.append(j)
    pcas = []
    for cols in groups.values():
        k = min(n_components, len(cols), max(1, X_comp.shape[0] - 1))
        pcas.append((cols, PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(X_comp[:, cols])))

    def view(X: np.ndarray) -> np.ndarray:
        return np.hstack([X[:, other]] + [pca.transform(X[:, cols]) for cols, pca in pcas]).astype(np.float32)

    return view(X_comp), view


def _split(n: int, holdout: float, seed: int, salt: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) positions of n rows; the held-out part is empty when n is too small to spare it."""
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=4).digest())])
    perm = rng.permutation(n)
    n_hold = int(round(holdout * n)) if n >= 2 * MIN_TRAIN else 0
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


#: a fitted column: its model kind (the features it reads) and rows of those features -> predicted values
Predictor = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _fit_numeric(views: dict[str, np.ndarray], ok: np.ndarray, y: np.ndarray, *, seed: int,
                 holdout: float, column: str, models: Sequence[str], higher: bool) -> tuple[Predictor, dict]:
    """The model with the best held-out Spearman, refitted on every usable row, as a predictor for the rest.

    views: model kind -> features of the computed rows; ok: computed rows whose value is usable (finite); y:
    those values.
    """
    info: dict[str, Any] = {"kind": "regression", "n_train": int(len(y))}
    if len(y) < MIN_TRAIN:
        info.update(model="median", spearman=None, top10_overlap=None, n_holdout=0)
        med = float(np.median(y)) if len(y) else np.nan
        return (models[0], lambda X: np.full(len(X), med)), info
    log = bool(np.all(y > 0))
    t = np.log(y) if log else y
    tr, ho = _split(len(y), holdout, seed, column)
    cands: dict[str, dict[str, Any]] = {}
    for kind in models:
        t0 = time.perf_counter()
        X = views[kind][ok]
        if len(ho):
            m = _regressor(kind, seed).fit(X[tr], t[tr])
            p = m.predict(X[ho])
            cands[kind] = {"spearman": spearman(y[ho], p), "top10_overlap": top_overlap(y[ho], p, higher=higher),
                           "seconds": round(time.perf_counter() - t0, 3)}
        else:
            cands[kind] = {"spearman": None, "top10_overlap": None, "seconds": 0.0}
    best = max(models, key=lambda k: (cands[k]["spearman"] if cands[k]["spearman"] is not None else -2.0,
                                      -models.index(k)))
    final = _regressor(best, seed).fit(views[best][ok], t)
    info.update(model=best, log_target=log, n_holdout=int(len(ho)), spearman=cands[best]["spearman"],
                top10_overlap=cands[best]["top10_overlap"], candidates=cands)
    return (best, lambda X: np.exp(final.predict(X)) if log else final.predict(X)), info


def _fit_boolean(kind: str, X: np.ndarray, y: np.ndarray, *, seed: int, holdout: float,
                 column: str) -> tuple[Predictor, dict[str, Any]]:
    info: dict[str, Any] = {"kind": "classification", "n_train": int(len(y)), "positive_rate": float(y.mean())
                            if len(y) else None}
    if len(y) < MIN_TRAIN or y.min() == y.max():
        majority = bool(y.mean() >= 0.5) if len(y) else False
        info.update(model="constant", accuracy=None, n_holdout=0)
        return (kind, lambda X: np.full(len(X), majority)), info
    tr, ho = _split(len(y), holdout, seed, column)
    acc = None
    if len(ho) and y[tr].min() != y[tr].max():
        acc = float((_classifier(seed).fit(X[tr], y[tr]).predict(X[ho]) == y[ho]).mean())
    final = _classifier(seed).fit(X, y)
    info.update(model="hgb", accuracy=acc, n_holdout=int(len(ho)))
    return (kind, lambda X: final.predict(X).astype(bool)), info


def distill(
    feats: Features,
    computed: pl.DataFrame,
    all_ids: Sequence[str] | pl.Series | None = None,
    seed: int = 0,
    *,
    holdout: float = HOLDOUT,
    models: Sequence[str] = ("ridge", "hgb", "ridge_scalar"),
    threads: int | None = 1,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Every score column for every id of all_ids: computed values kept, the rest predicted.

    `computed` is id + score columns for the rows the LM scored (ids outside all_ids are ignored). Returns the
    table (id, the score columns in computed's order with their dtypes, score_predicted) in all_ids order and
    a JSON-ready report: per column the model, Spearman and top-10% overlap on held-out computed rows, counts.
    `threads` caps BLAS/OpenMP threads while fitting (None: library default): the fits are small, and
    HistGradientBoosting's OpenMP threads on 2 busy cores cost 30x the CPU time of one thread (measured).
    """
    # threadpool_limits caps only the libraries already loaded: scikit-learn's OpenMP, scipy's BLAS and the
    # scorers' modules (torch's OpenMP) are loaded first, or a process's first distill fitted on every core and
    # predicted other values (up to 0.13 of IFD on Alpaca-52k) than a later call: the same run, other scores
    import sklearn.decomposition  # noqa: F401
    import sklearn.ensemble  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    higher = {c: _higher_is_better(c) for c in computed.columns if c != "id"}
    with threadpool_limits(limits=threads):
        return _distill(feats, computed, all_ids, seed, holdout=holdout, models=tuple(models), higher=higher)


def _distill(feats: Features, computed: pl.DataFrame, all_ids: Sequence[str] | pl.Series | None, seed: int, *,
             holdout: float, models: tuple[str, ...], higher: dict[str, bool]) -> tuple[pl.DataFrame, dict[str, Any]]:
    t_start = time.perf_counter()
    if "id" not in computed.columns:
        raise DistillError("distill: the computed scores need an 'id' column")
    if not 0 <= holdout < 1:
        raise DistillError(f"distill: holdout must be in [0, 1), got {holdout}")
    ids = list(feats.ids) if all_ids is None else (
        all_ids.to_list() if isinstance(all_ids, pl.Series) else list(all_ids))
    if len(set(ids)) != len(ids):
        raise DistillError("distill: all_ids must be unique")
    pool = pl.DataFrame({"id": pl.Series(ids, dtype=pl.String)})
    comp = computed.unique("id", keep="first", maintain_order=True).join(pool, on="id", how="semi")
    if comp.height == 0 and ids:
        raise DistillError("distill: none of the pool's rows has computed scores; score a sample first")
    cols = [c for c in computed.columns if c != "id"]
    is_comp = pool["id"].is_in(comp["id"].implode()).to_numpy()
    rest_ids = [i for i, c in zip(ids, is_comp, strict=True) if not c]
    rest_pos = feats.positions(rest_ids)
    X_comp = feats.rows(comp["id"].to_list())
    # model kind -> (features of the computed rows, the same features from rows of the full features)
    views: dict[str, tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]] = {"ridge": (X_comp, lambda X: X)}
    if any(m != "ridge" for m in models) and comp.height > 1:
        views["hgb"] = _tree_view(feats, X_comp, seed)
    if "ridge_scalar" in models:  # lengths and flags only: what a small sample can fit without overfitting
        scalar = [j for j, name in enumerate(feats.names) if not name.startswith("emb_")] or [0]
        views["ridge_scalar"] = (X_comp[:, scalar], lambda X: X[:, scalar])
    views = {m: views.get(m, views["ridge"]) for m in models} or views
    comp_views = {k: v[0] for k, v in views.items()}
    fitted: dict[str, Predictor] = {}
    report: dict[str, Any] = {}
    derived = [c for c in cols if c in DERIVED and all(p in cols and p not in DERIVED for p in DERIVED[c][0])]
    for c in cols:
        if c in derived:
            continue
        s = comp[c]
        dt = s.dtype
        if dt.is_numeric():
            v = s.cast(pl.Float64).to_numpy()
            ok = np.isfinite(v)
            fitted[c], info = _fit_numeric(comp_views, ok, v[ok], seed=seed, holdout=holdout, column=c,
                                           models=tuple(models), higher=higher[c])
        elif dt == pl.Boolean:
            v = s.to_numpy()
            ok = s.is_not_null().to_numpy()
            kind = "hgb" if "hgb" in views else models[0]
            fitted[c], info = _fit_boolean(kind, comp_views[kind][ok], v[ok].astype(bool), seed=seed,
                                           holdout=holdout, column=c)
        else:  # text (error messages) and anything else: not predicted
            info = {"kind": "not predicted"}
        info.update(n_computed=int(comp.height), n_predicted=len(rest_ids))
        report[c] = info
    # the rest, a chunk of rows at a time: never a copy of the pool's features, whatever its size
    predicted: dict[str, np.ndarray] = {c: np.full(len(rest_ids), None, dtype=object) for c in cols}
    predicted.update({c: np.empty(len(rest_ids)) for c in fitted})
    for start in range(0, len(rest_ids), PREDICT_CHUNK):
        X = feats.take(rest_pos[start:start + PREDICT_CHUNK])
        chunk = {kind: views[kind][1](X) for kind in {k for k, _ in fitted.values()}}
        for c, (kind, predict) in fitted.items():
            predicted[c][start:start + len(X)] = predict(chunk[kind])
    for c in fitted:
        if comp.schema[c].is_integer() and len(rest_ids):
            predicted[c] = np.round(predicted[c])
        elif comp.schema[c] == pl.Boolean:
            predicted[c] = predicted[c].astype(bool)
    for c in derived:
        parents, rule = DERIVED[c]
        pv = [np.asarray(predicted[p], np.float64) for p in parents]
        ok = np.logical_and.reduce([np.isfinite(v) for v in pv])
        with np.errstate(all="ignore"):
            predicted[c] = np.where(ok, rule(*pv), None)  # a parent without a value: no rule value either
        report[c] = {"kind": "derived", "rule": f"from predicted {', '.join(parents)}",
                     "n_computed": int(comp.height), "n_predicted": len(rest_ids)}
    for c in cols:  # a column with nothing to learn from is null, not NaN
        if computed.schema[c].is_numeric() and len(predicted[c]):
            p = np.asarray(predicted[c], np.float64)
            predicted[c] = np.where(np.isfinite(p), p, None)
    rest = pl.DataFrame({"id": pl.Series(rest_ids, dtype=pl.String),
                         **{c: pl.Series(c, predicted[c].tolist() if len(rest_ids) else [],
                                         dtype=computed.schema[c], strict=False) for c in cols}})
    out = pl.concat([comp.with_columns(score_predicted=pl.lit(False)),
                     rest.with_columns(score_predicted=pl.lit(True))], how="vertical_relaxed")
    out = pool.join(out, on="id", how="left", maintain_order="left")
    summary = {"seed": seed, "holdout": holdout, "n_pool": len(ids), "n_computed": int(comp.height),
               "n_predicted": len(rest_ids), "n_features": feats.width,
               "seconds": round(time.perf_counter() - t_start, 3), "columns": report}
    return out, summary
