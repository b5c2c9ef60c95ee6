#!/usr/bin/env bash
# The embedded default on a fresh machine: install into .venv, then run `python -m demo.run` (see its --help):
# easy-VQA data, a cached tiny teacher served over gRPC, a student of another family and tokenizer distilled
# through GenRecal's three stages with DeepSpeed, and a before/after accuracy table. CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -c .ci/constraints.txt -e ".[demo]"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m demo.run "$@"
