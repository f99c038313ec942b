"""Test environment: offline, quiet, and every store in a temporary folder (never the user's .curate)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CURATE_SHARED_DATA", ROOT.parent / "shared" / "data"))
CORPUS = Path(__file__).parent / "corpus"
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """One cache (embeddings, scores) per test session, isolated from the user's.

    Models (the distilled static embedder, trained proxies) are deterministic and slow to build, so they
    are shared across sessions in $CURATE_TEST_MODELS (default /tmp/curate-test-models).
    """
    path = tmp_path_factory.mktemp("curate-cache")
    models = Path(os.environ.get("CURATE_TEST_MODELS", "/tmp/curate-test-models"))
    models.mkdir(parents=True, exist_ok=True)
    (path / "models").symlink_to(models, target_is_directory=True)
    os.environ["CURATE_CACHE_DIR"] = str(path)
    yield path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared datasets not found at {SHARED}")
    return SHARED
