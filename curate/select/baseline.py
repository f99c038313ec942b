"""A uniformly random subset: the baseline every other strategy is compared against (report, benchmark)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import polars as pl

from curate.select.base import PoolView, walk
from curate.select.budget import Budget, Quotas


@dataclass(frozen=True)
class RandomSubset:
    """Uniform random rows (seeded; draws made in id order). Quotas act as caps; the rest are `outranked`."""

    name: ClassVar[str] = "random"

    def select(
        self,
        pool: pl.DataFrame,
        budget: Budget,
        *,
        seed: int,
        quotas: Quotas | None = None,
        embeddings: np.ndarray | None = None,
    ) -> pl.DataFrame:
        view = PoolView.build(pool, budget)
        order = view.order_by(view.random(seed, kind="uniform"))
        return view.decisions(walk(view, order, quotas), order)
