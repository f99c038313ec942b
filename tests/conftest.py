"""Test environment: offline, quiet, and every store in a temporary folder (never the user's .curate).

Test data comes from the repository: `sample_rows` reads the bundled sample (data/sample, MIT/Apache, see
data/ATTRIBUTION.md) and tests/corpus holds broken inputs. A test that needs a large real pool takes it from
the `shared_data` fixture ($CURATE_SHARED_DATA, unset by default) and skips, saying
so, when that folder is absent.
"""

import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ["CURATE_SHARED_DATA"]) if os.environ.get("CURATE_SHARED_DATA") else None
CORPUS = Path(__file__).parent / "corpus"
SAMPLE = ROOT / "data" / "sample"
#: the bundled sample's files (stems), in the order `sample_rows` interleaves them
SAMPLE_SOURCES = ("gsm8k_train", "gpteacher_codegen", "gpteacher_toolformer", "self_instruct_seed")
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """One cache (embeddings, scores) per test session, isolated from the user's.

    Models (the distilled static embedder, trained proxies) are deterministic and slow to build, so they
    are shared across sessions in $CURATE_TEST_MODELS (default: curate-test-models in the system temp folder).
    """
    path = tmp_path_factory.mktemp("curate-cache")
    models = Path(os.environ.get("CURATE_TEST_MODELS") or Path(tempfile.gettempdir()) / "curate-test-models")
    models.mkdir(parents=True, exist_ok=True)
    (path / "models").symlink_to(models, target_is_directory=True)
    os.environ["CURATE_CACHE_DIR"] = str(path)
    yield path


@pytest.fixture
def shared_data() -> Path:
    """The large real datasets (e.g. all of Alpaca-52k), which are not in the repository: skip without them."""
    if SHARED is None or not SHARED.exists():
        pytest.skip(f"shared datasets not found at {SHARED} (set CURATE_SHARED_DATA to run this test)")
    return SHARED


def _alpaca_shape(row: dict) -> dict:
    """One bundled row as {instruction, input, output}, whatever its native format (GSM8K question/answer,
    GPTeacher instruction/input/response, Self-Instruct instruction + first instance)."""
    if "question" in row:
        return {"instruction": row["question"], "input": "", "output": row["answer"]}
    if "instances" in row:
        first = row["instances"][0]
        return {"instruction": row["instruction"], "input": first["input"], "output": first["output"]}
    return {"instruction": row["instruction"], "input": row["input"], "output": row["response"]}


def sample_rows(n: int | None = None, *, start: int = 0, sources: tuple[str, ...] = SAMPLE_SOURCES) -> list[dict]:
    """Real instruction rows from the bundled sample, Alpaca-shaped, taking one row from each source in turn
    (so any slice mixes maths, code, tool use and general tasks); a source that runs out drops out of the turn.
    Deterministic: the same arguments give the same rows. Fails if fewer than `start + n` rows exist."""
    files = []
    for name in sources:
        with open(SAMPLE / f"{name}.jsonl", encoding="utf-8") as fh:
            files.append([_alpaca_shape(json.loads(line)) for line in fh if line.strip()])
    mixed = [r for group in itertools.zip_longest(*files) for r in group if r is not None]
    stop = len(mixed) if n is None else start + n
    assert stop <= len(mixed), f"the sample has {len(mixed)} rows from {sources}, asked for {start}:{stop}"
    return mixed[start:stop]
