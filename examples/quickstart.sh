#!/usr/bin/env bash
# Set up a venv, build a tiny teacher (Qwen2-VL, GPT-2 tokenizer) and a tiny student (InternVL, Llama-2
# tokenizer), write a small colour-VQA data set, and run GenRecal's three stages in one process on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/quickstart}
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -c .ci/constraints.txt -e ".[demo]"
export HF_HUB_OFFLINE=1
python -m genrecal.tiny --family qwen2_vl --tokenizer gpt2 --hidden-size 96 --intermediate-size 192 --out "$RUN/teacher"
python -m genrecal.tiny --family internvl --tokenizer llama2 --out "$RUN/student"
python examples/colours.py "$RUN/data"
python -m genrecal.inprocess --teacher "$RUN/teacher" --student "$RUN/student" --data "$RUN/data/data.json" \
  --output "$RUN/out" --steps-per-stage 6 --batch-size 4 --grad-accum 2 --lr 2e-3 --lr-end 2e-4
