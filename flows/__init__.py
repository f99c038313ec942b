"""Prefect orchestration of the curate pipeline.

- `flows.pipeline`: `curate_flow(recipe_json)` (the flow), `run_flow(recipe)` (what `curate select` calls),
  `task_runner()` (thread / Dask / Ray by CURATE_TASK_RUNNER). Importing it sets Prefect's offline environment
  before prefect is imported, so import it before anything that imports prefect.
- `flows.eval`: `eval_flow(...)`, `run_eval_flow(plan)` (what `curate eval` calls): one task per (arm, seed) unit.
- `flows.serve`: `serve_command(recipe, cron)` (`curate serve`): the flow on a cron schedule over a watched
  folder; the recipe comes from `curate.validate.watch_recipe`, checked before Prefect is imported.
- `flows/prefect.yaml`: the same deployment for `prefect deploy` + a process worker.

Nothing is imported here on purpose: the package may be loaded as a namespace package by an old editable
install, and importing prefect too early would freeze its settings.
"""
