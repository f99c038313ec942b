"""Scoring in one place: the scorer contract, the registry, the runner with its store, and the recipe glue.

- `contract.py`: what every method declares (`Scorer`, `Needs`, `ScoreContext`, `ScorerParams`).
- `registry.py`: `get_scorer(name, **params)`, `available()`: scorers registered as `curate.scorers` entry
  points (the built-in ones live in the top-level `scorers/` folder).
- `runner.py`: `score_pool(records, scorer, ...)`: one scorer over a pool, computing only what the store lacks.
- `store.py`: `ScoreStore`: stored per (record id, scorer signature, model signature).
- `recipe.py`: the pipeline's glue (scorer params, engine, embeddings and other scores from a `RunContext`).
"""

from curate.scoring.contract import Needs, ScoreContext, Scorer, ScorerError, ScorerParams
from curate.scoring.registry import available, get_scorer, scorer_class

__all__ = ["Needs", "ScoreContext", "Scorer", "ScorerError", "ScorerParams", "available", "get_scorer",
           "scorer_class"]
