"""Serving the trainer's result: ``OUTPUT/final`` loads in vLLM and answers greedily as transformers does.

A tiny student is trained for two stage-3 steps by the trainer CLI, so ``final`` is exactly what a run writes;
head size 32, the smallest vLLM's CPU attention runs. Two families: InternVL with the Llama-2 tokenizer (the demo
student's family and tokenizer: its tokenizer adds a BOS token that its ChatML template does not write, see below;
with tied embeddings, a tiny model repeats tokens) and Qwen2-VL with the GPT-2 tokenizer (untied head: varied
answers). vLLM (in its own venv, ``$GENRECAL_VLLM_PYTHON``; this test skips without it, like the other vLLM tests)
answers a few questions about pictures with ``LLM.chat``, greedy, EOS ignored; transformers answers the same
messages with ``generate`` and through the ``pipeline("image-text-to-text")`` call docs/evaluate.md shows.

BOS: training and ``student_trainer eval`` tokenise the rendered chat with the tokenizer's special tokens (the
Llama-2 tokenizer prepends ``<s>``), and so does transformers' ``apply_chat_template(tokenize=True)``; vLLM's chat
tokenises the rendered template *without* them unless asked (``add_special_tokens``), so the prompt ids are
compared, and the vLLM side asks.

Token-for-token, with one principled allowance: fp32 kernels differ in summation order (features agree to ~2e-6,
tests/teacher_server/test_vllm_backend.py), so where transformers' top-2 logit margin is below ``NEAR_TIE`` the two
may pick different argmaxes, and the answers may diverge from there. The comparison runs up to each answer's first
near-tie step; the test checks that those steps are rare, so that the comparison covers most tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import random_image

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 8
NEAR_TIE = 1e-3  # logits; fp32 differences between the two stacks are ~1e-5 here
QUESTIONS = ("What colour is the picture?", "Describe the picture.", "Is it red?", "What is shown?")

VLLM_SCRIPT = """
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams

request = json.load(open(sys.argv[1]))
llm = LLM(model=request["model"], dtype="float32", enforce_eager=True, max_model_len=512,
          limit_mm_per_prompt={"image": 1})
conversations = [
    [{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.open(q["image"]).convert("RGB")},
                                  {"type": "text", "text": q["text"]}]}]
    for q in request["questions"]
]
params = SamplingParams(temperature=0, max_tokens=request["max_tokens"], ignore_eos=True)
outputs = llm.chat(conversations, params, tokenization_kwargs={"add_special_tokens": True})
json.dump([{"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
            "text": o.outputs[0].text} for o in outputs], open(sys.argv[2], "w"))
"""


def train_final_student(student, vqa_data, env, output, *, steps: int = 2, lr: float = 2e-3) -> Path:
    """``OUTPUT/final`` of a short stage-3 run of the trainer CLI (no teacher needed)."""
    flags = ["--stages", "3", "--student", student, "--data", vqa_data, "--output", output, "--steps-per-stage", steps,
             "--grad-accum", "1", "--micro-batch-size", "2", "--lr", lr, "--lr-end", lr, "--seed", "0",
             "--no-tensorboard", "--data-workers", "0"]
    result = subprocess.run([sys.executable, "-m", "student_trainer", *map(str, flags)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    return output / "final"


@pytest.mark.parametrize("family,tokenizer", [("internvl", "llama2"), ("qwen2_vl", "gpt2")])
def test_final_student_answers_alike_in_vllm_and_transformers(family, tokenizer, tiny_checkpoint, vqa_data,
                                                               vllm_python, subprocess_env, rng, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    student = tiny_checkpoint(family, tokenizer=tokenizer, num_heads=2)  # head size 64 / 2 = 32
    final_student = train_final_student(student, vqa_data, subprocess_env, tmp_path / "run")
    questions = []
    for i, text in enumerate(QUESTIONS):
        random_image(rng, size=64).save(tmp_path / f"{i}.png")
        questions.append({"image": str(tmp_path / f"{i}.png"), "text": text})
    (tmp_path / "request.json").write_text(json.dumps(
        {"model": str(final_student), "questions": questions, "max_tokens": NEW_TOKENS}))
    (tmp_path / "serve.py").write_text(VLLM_SCRIPT)
    env = subprocess_env | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                            "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    vllm = subprocess.Popen([vllm_python, tmp_path / "serve.py", tmp_path / "request.json", tmp_path / "vllm.json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Meanwhile, transformers: the same chat messages, greedy, EOS ignored (as vLLM's ignore_eos) for 8 tokens.
    processor = AutoProcessor.from_pretrained(final_student)
    model = AutoModelForImageTextToText.from_pretrained(final_student, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    expected = []
    for q in questions:
        messages = [{"role": "user", "content": [{"type": "image", "path": q["image"]},
                                                 {"type": "text", "text": q["text"]}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        top2 = torch.stack(out.logits).float()[:, 0].topk(2, dim=-1).values  # (NEW_TOKENS, 2)
        expected.append({"prompt_token_ids": inputs["input_ids"][0].tolist(),
                         "token_ids": out.sequences[0, inputs["input_ids"].shape[1]:].tolist(),
                         "margins": (top2[:, 0] - top2[:, 1]).tolist(), "messages": messages})

    log, _ = vllm.communicate(timeout=600)
    assert vllm.returncode == 0, log[-4000:]
    served = json.loads((tmp_path / "vllm.json").read_text())

    compared = 0
    for got, want in zip(served, expected, strict=True):
        assert got["prompt_token_ids"] == want["prompt_token_ids"]  # same chat template, same image tokens
        assert len(got["token_ids"]) == len(want["token_ids"]) == NEW_TOKENS
        sure = next((k for k, margin in enumerate(want["margins"]) if margin < NEAR_TIE), NEW_TOKENS)
        assert got["token_ids"][:sure] == want["token_ids"][:sure], (got, want)
        compared += sure
    assert compared >= 0.75 * NEW_TOKENS * len(QUESTIONS), f"only {compared} tokens compared: too many near-ties"

    # The transformers pipeline docs/evaluate.md shows gives generate's answers (EOS ignored here too).
    pipe = pipeline("image-text-to-text", model=str(final_student), dtype=torch.float32)
    pipe.model.generation_config.eos_token_id = None
    for want in expected:
        answer = pipe(text=want["messages"], max_new_tokens=NEW_TOKENS, generate_kwargs={"do_sample": False},
                      return_full_text=False)
        text = processor.tokenizer.decode(want["token_ids"], skip_special_tokens=True)
        assert answer[0]["generated_text"].strip() == text.strip()  # SentencePiece: a leading space or not
