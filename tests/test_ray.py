"""The Prefect flow on Ray: a real local Ray cluster (2 worker CPUs) gives what the thread runner gives.

Mirrors the Dask test in test_flows.py: the same recipe through the thread runner and through
CURATE_TASK_RUNNER=ray with CURATE_RAY_ADDRESS pointing at a running cluster, fresh stores for each, and the
shard tasks must have run in Ray's worker processes (store part names carry the writer's pid).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from test_flows import _fresh_cache, _pool, _recipe, _same_output, prefect_api  # noqa: F401  (prefect_api is a fixture)

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")
pytest.importorskip("prefect_ray", reason="prefect-ray is not installed (pip install 'curate[ray]')")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_ray_local_cluster_matches_thread_runner(prefect_api, tmp_path, monkeypatch):  # noqa: F811
    from flows.pipeline import run_flow

    pool = _pool(tmp_path / "pool" / "gsm8k.jsonl", "gsm8k_train.jsonl", 200, 100)
    recipe = _recipe([str(pool)], tmp_path / "threads", embed={"enabled": True, "model": "minilm-static"},
                     score={"shards": 2})
    monkeypatch.setenv("CURATE_CACHE_DIR", str(_fresh_cache(tmp_path / "cache-threads")))
    run_flow(recipe)

    # fresh stores: Ray computes all. Set before the cluster starts, so its workers inherit it (and the API URL).
    monkeypatch.setenv("CURATE_CACHE_DIR", str(_fresh_cache(tmp_path / "cache-ray")))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token written to ~/.ray
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
                   _temp_dir=temp)
    try:
        monkeypatch.setenv("CURATE_TASK_RUNNER", "ray")
        monkeypatch.setenv("CURATE_RAY_ADDRESS", ctx.address_info["address"])
        run = run_flow(recipe.model_copy(update={"out": str(tmp_path / "ray-run")}))
        parts = list((tmp_path / "cache-ray").glob("embeddings/*/user/part-*.npy"))  # the sharded view
        parts += list((tmp_path / "cache-ray").glob("scores/heuristics/*/part-*.parquet"))
        pids = {int(p.name.split("-")[2]) for p in parts}
        # the shard tasks ran in Ray worker processes (alive while the cluster is), not in this driver
        assert pids and os.getpid() not in pids, pids
        assert all(_cmdline(pid).startswith("ray::") for pid in pids), {pid: _cmdline(pid) for pid in pids}
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert run.manifest["executor"]["cached"] == 0
    _same_output(tmp_path / "threads", tmp_path / "ray-run")
    for name in ("clusters.parquet", "scores.parquet"):
        assert_frame_equal(pl.read_parquet(tmp_path / "threads" / name),
                           pl.read_parquet(tmp_path / "ray-run" / name))


def test_ray_runner_settings(monkeypatch):
    from prefect_ray import RayTaskRunner

    from flows.pipeline import task_runner

    monkeypatch.setenv("CURATE_TASK_RUNNER", "ray")
    monkeypatch.setenv("CURATE_RAY_ADDRESS", "ray://head:10001")
    runner = task_runner()
    assert isinstance(runner, RayTaskRunner) and runner.address == "ray://head:10001"
    monkeypatch.delenv("CURATE_RAY_ADDRESS")
    assert task_runner().address is None  # no address: the runner starts (and stops) a local Ray instance
