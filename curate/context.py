"""What every stage works on: one run folder, its recipe, and the things derived from them once.

`RunContext` sits below scoring and selection, so neither imports the pipeline (or each other) to get the
records, the embedding vectors, the candidate pool or the scoring engine. Engines are kept one per process
(loading a model is the expensive part), keyed by everything that changes their output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.config import Recipe
from curate.run import Run

_ENGINES: dict[tuple, Any] = {}


class RunContext:
    """A run folder plus its recipe: records, vectors, pool, scoring model and engine for the stages."""

    def __init__(self, run: Run, recipe: Recipe) -> None:
        self.run = run
        self.recipe = recipe

    # ------------------------------------------------------------------------------------- records, vectors

    def records(self, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(self.run.file("records.parquet"), columns=columns)

    def vectors(self, view: str | None = None) -> np.ndarray:
        """All records' embeddings in records.parquet order, from the store (embedding anything missing)."""
        from curate.embed import embed

        cfg = self.recipe.embed
        df = self.records(["id", "messages", "instruction", "response"])
        return embed(df, model=cfg.model, view=view or cfg.view, batch_size=cfg.batch_size,
                     max_seq_length=cfg.max_seq_length).vectors

    def vectors_of(self, ids: pl.Series, view: str | None = None) -> np.ndarray:
        """Embeddings of the records `ids`, in that order."""
        pos = (pl.DataFrame({"id": ids}).join(self.records(["id"]).with_row_index("_p"), on="id", how="left",
                                              maintain_order="left")["_p"].to_numpy())
        return self.vectors(view)[pos]

    def pool(self) -> pl.DataFrame:
        """The candidates for selection: records minus semantic duplicates, with clusters and scores joined."""
        f = self.run.file
        df = self.records(["id", "source", "row", "n_tokens", "messages"])
        if f("semdedup.parquet").exists():
            df = df.join(pl.read_parquet(f("semdedup.parquet"), columns=["id"]), on="id", how="anti")
        if f("clusters.parquet").exists():
            df = df.join(pl.read_parquet(f("clusters.parquet")), on="id", how="left")
        else:
            df = df.with_columns(cluster=pl.lit(-1, pl.Int32), distance=pl.lit(None, pl.Float32))
        if f("scores.parquet").exists():
            df = df.join(pl.read_parquet(f("scores.parquet")), on="id", how="left")
        return df

    # ------------------------------------------------------------------------------------------ the LM

    def model(self) -> str:
        """`score.model` as a name/path an engine loads; what pins it and the dtype go to the manifest.

        Packaged names (`smollm2-135m`) become a local folder converted once (`curate.lm.models`); the
        manifest's `score_model` records the package, GGUF sha256 and the dtype choice (`score.dtype: auto`).
        """
        from curate.lm.models import model_pin

        path = self._model_path()
        info = {"name": self.recipe.score.model, "path": path, "pin": model_pin(self.recipe.score.model),
                "dtype": self.dtype_choice()}
        if self.run.manifest.get("score_model") != info:
            self.run.set("score_model", info)
        return path

    def dtype_choice(self) -> dict[str, Any]:
        """score.dtype made concrete (`auto`: measured once per machine); vLLM servers given by URL keep theirs."""
        cfg = self.recipe.score
        if cfg.engine == "vllm" and cfg.vllm_urls:
            return {"requested": cfg.dtype, "dtype": cfg.dtype, "note": "the vLLM servers' own"}
        from curate.lm.hf import dtype_choice

        return dtype_choice(cfg.dtype)

    def _model_path(self) -> str:
        """"proxy" is a small LM trained on this pool (trained once, then pinned in the manifest and reused on
        later runs over the same folder, so rescoring stays incremental); other names via curate.lm.models."""
        name = self.recipe.score.model
        if name != "proxy":
            from curate.lm.models import model_path

            return model_path(name)
        pinned = self.run.manifest.get("proxy_model")
        if pinned and Path(pinned).exists():
            return pinned
        from curate.lm.proxy import ensure_default_proxy

        # training steps scale with the pool (about 1.5 epochs of a small pool), capped at the proxy default
        # (1000), so the bundled sample trains its proxy in a few CPU minutes and a 52k pool gets the full schedule
        n = pl.scan_parquet(self.run.file("records.parquet")).select(pl.len()).collect().item()
        steps = int(min(1000, max(150, n // 10)))
        path = str(ensure_default_proxy(self.run.file("records.parquet"), seed=self.recipe.seed, steps=steps))
        self.run.set("proxy_model", path)
        return path

    def engine(self) -> Any:
        """One engine per (model, engine kind, settings) per process."""
        from curate.lm import load_engine
        from curate.lm.base import LMConfig

        cfg = self.recipe.score
        model = self.model()
        dtype = self.dtype_choice()["dtype"]
        key = (model, cfg.engine, cfg.max_length, tuple(cfg.vllm_urls), dtype)
        if key not in _ENGINES:
            config = LMConfig(model=model, max_length=cfg.max_length, dtype=dtype)
            kw: dict[str, Any] = {}
            if cfg.engine == "vllm":
                kw = {"urls": cfg.vllm_urls} if cfg.vllm_urls else {}  # interpreter: CURATE_VLLM_PYTHON / --vllm-python
            _ENGINES[key] = load_engine(config, kind=cfg.engine, **kw)
        return _ENGINES[key]
