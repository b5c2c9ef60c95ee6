"""Real shapes: the shipped server and trainer at real hidden sizes and vocabularies, on photos at native resolution
with long answers, from records in every accepted format; what a sample costs in tokens, bytes and memory.

``python benchmarks/real_shapes.py`` (about 15-25 minutes on 2 cores) builds, with ``python -m genrecal.tiny``:

- a teacher at **Qwen2-VL-2B-Instruct**'s widths: hidden 1536, 12 heads (2 KV), FFN 8960, vocabulary 151,936, tied
  embeddings, vision tower 1280 wide (its ViT's width) — but 1 decoder layer instead of 28 and 1 vision layer
  instead of 32, with the GPT-2 tokenizer (Qwen's does not install offline) in 151,936 rows;
- a student at **SmolVLM-256M-Instruct**'s widths: hidden 576, 9 heads (3 KV), FFN 1536, vocabulary 49,280, tied,
  vision tower 768 wide, 512-px tiles with image splitting — 1 decoder layer instead of 30, 1 vision layer instead
  of 12, the Llama-2 tokenizer.

Pictures are scikit-image's sample photos at their own size (512 x 512 to 1000 x 872), saved as JPEG; answers are
100-250 words. One JSONL file mixes every record format the trainer reads (LLaVA, ShareGPT with a system turn,
OpenAI-style messages with an ``images`` list, inline image parts, a text-only record, two images in one record).

For each precision it starts the real teacher server (``python -m teacher_server``) and runs the real trainer
(``python -m student_trainer``) for ``--steps`` optimizer steps of stages 1 and 2 against it, then prints and writes
(``benchmarks/results/real_shapes.json``): image and answer tokens per sample on each side; bytes on the wire per
sample against the minimum the enabled losses need (Encode: ``La x D_l`` answer features, plus ``Lq x D_l``
question features with the regularisation path; Score: ``La x D_l`` outputs and as many gradients per path, all at
the wire dtype's bytes); peak RSS of the server and the trainer against their weights' bytes; seconds per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from teacher_server.launch import TeacherProcess  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "real_shapes.json"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
TEACHER = dict(family="qwen2_vl", tokenizer="gpt2", vocab_size=151936, mirrors="Qwen2-VL-2B-Instruct",
               sizes=dict(hidden_size=1536, num_layers=1, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                          vision_hidden_size=1280, vision_layers=1, vision_heads=16))
STUDENT = dict(family="idefics3", tokenizer="llama2", vocab_size=49280, mirrors="SmolVLM-256M-Instruct",
               sizes=dict(hidden_size=576, num_layers=1, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                          vision_hidden_size=768, vision_layers=1, vision_heads=12, image_size=256))
# Resolution, set by flags on both sides (the image-token table in docs/ gives other budgets).
TEACHER_IMAGE_OPTIONS = "max_pixels=401408"  # Qwen-VL: at most 512 image tokens per photo
STUDENT_IMAGE_OPTIONS = "do_image_splitting=true,longest_edge=1024"  # SmolVLM: 2 x 2 tiles of 512 px + a global view
WIRE_BYTES = {"bf16": 2, "fp32": 4}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}  # this benchmark's labels -> the applications' --dtype

# Long answers: sentences about the photo, varied by sample, 100-250 words.
_SENTENCES = (
    "The picture shows {subject} in considerable detail, with the main subject placed near the centre of the frame.",
    "Light falls from the upper left, which leaves soft shadows on the right side and gives the scene some depth.",
    "The colours are natural rather than saturated, and the background is less sharp than the foreground.",
    "Several smaller details are visible on closer inspection, such as textures, edges and reflections.",
    "Nothing in the image suggests that it was edited heavily; the grain and noise look like those of a camera.",
    "If the question is about the overall mood, the answer would be calm and documentary rather than dramatic.",
    "A viewer would probably describe the composition as balanced, although the subject is slightly off centre.",
    "The photograph is at its original resolution, so fine structure is preserved and no upscaling artefacts appear.",
    "Counting distinct objects is possible for the prominent ones, while the small ones blend into the background.",
    "In summary, {subject} is the clear focus, and the rest of the frame supports it without distracting from it.",
)
SUBJECTS = {"astronaut": "an astronaut in a white suit", "coffee": "a cup of coffee on a saucer",
            "chelsea": "a tabby cat", "rocket": "a rocket on its launch pad",
            "hubble_deep_field": "a field of distant galaxies", "immunohistochemistry": "a stained tissue sample"}


def long_answer(photo: str, k: int, words: int) -> str:
    text, i = [], k
    while len(" ".join(text).split()) < words:
        text.append(_SENTENCES[i % len(_SENTENCES)].format(subject=SUBJECTS.get(photo, "the scene")))
        i += 3
    return " ".join(text)


def write_photos(folder: Path) -> list[str]:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for photo in PHOTOS:
        Image.fromarray(getattr(skimage.data, photo)()).convert("RGB").save(folder / f"{photo}.jpg", quality=90)
        names.append(photo)
    return names


def write_records(root: Path, count: int) -> Path:
    """``count`` records cycling through every accepted format, in one JSONL file (images under ``root/images``)."""
    photos = write_photos(root / "images")
    records = []
    for k in range(count):
        photo, other = photos[k % len(photos)], photos[(k + 1) % len(photos)]
        image, answer = f"images/{photo}.jpg", long_answer(photo, k, 100 + 30 * (k % 5))
        question = f"Describe this photograph in detail (sample {k})."
        kind = k % 6
        if kind == 0:  # LLaVA
            records.append({"id": f"llava-{k}", "image": image, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        elif kind == 1:  # ShareGPT with a system turn
            records.append({"id": f"sharegpt-{k}", "image": image, "conversations": [
                {"from": "system", "value": "You are a careful assistant that describes photographs."},
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        elif kind == 2:  # OpenAI / TRL messages with an images list
            records.append({"id": f"messages-{k}", "images": [image], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
        elif kind == 3:  # inline image parts, string content for the answer
            records.append({"id": f"inline-{k}", "messages": [
                {"role": "system", "content": "Answer in full sentences."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]})
        elif kind == 4:  # text only
            records.append({"id": f"text-{k}", "messages": [
                {"role": "user", "content": f"Write about {SUBJECTS[photo]} without a picture (sample {k})."},
                {"role": "assistant", "content": answer}]})
        else:  # two images in one turn
            records.append({"id": f"two-{k}", "image": [image, f"images/{other}.jpg"], "conversations": [
                {"from": "human", "value": f"<image>\n<image>\nCompare these two photographs (sample {k})."},
                {"from": "gpt", "value": answer}]})
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_checkpoint(spec: dict, out: Path, env: dict) -> Path:
    """The product CLI: ``python -m genrecal.tiny`` with the real widths and vocabulary."""
    command = [sys.executable, "-m", "genrecal.tiny", "--family", spec["family"], "--out", str(out),
               "--tokenizer", spec["tokenizer"], "--vocab-size", str(spec["vocab_size"]), "--tie-word-embeddings"]
    for name, value in spec["sizes"].items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True, text=True)
    return out


def token_counts(checkpoint: Path, image_options: str, data: Path) -> dict:
    """Per sample: image tokens, answer tokens, question tokens and the hidden size, as this side formats it."""
    from genrecal.families import load_vlm
    from genrecal.families.resolution import parse_image_options
    from student_trainer.data import load_dataset_samples

    vlm = load_vlm(checkpoint, image_options=parse_image_options(image_options))
    samples, _ = load_dataset_samples(data)
    tokenizer = vlm.processor.tokenizer
    image_token_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|image_pad|>")} - {None}
    rows = []
    for sample in samples:
        batch = vlm.encode([sample])
        ids = batch.input_ids[0]
        answer = sum(e - s for s, e in batch.answer_spans[0])
        rows.append({"sample_id": sample.sample_id, "images": len(sample.images),
                     "image_tokens": int(sum(int((ids == t).sum()) for t in image_token_ids)),
                     "answer_tokens": answer, "question_tokens": int(batch.answer_spans[0][-1][1]) - answer,
                     "tokens": int(ids.numel())})
    hidden = vlm.model.config.get_text_config().hidden_size
    return {"hidden_size": hidden, "samples": rows}


class PeakRss:
    """Peak resident memory of a process (``VmHWM``, the kernel's high-water mark), read until it exits."""

    def __init__(self, pid: int):
        self.pid, self.peak_kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024**2  # GiB


def run_precision(name: str, *, teacher: Path, student: Path, data: Path, work: Path, args, env: dict,
                  regularisation: bool = True) -> dict:
    """One real server + one real trainer (stages 1-2) at ``name`` precision; the run's measurements."""
    server = TeacherProcess(teacher, "--dtype", DTYPE_NAMES[name], "--image-options", TEACHER_IMAGE_OPTIONS,
                            "--max-batch-tokens", "65536", timeout_s=1800)
    server_rss = PeakRss(server.proc.pid)
    output = work / f"run-{name}{'' if regularisation else '-noreg'}"
    command = [sys.executable, "-m", "student_trainer", "--teacher-addr", server.address, "--student", str(student),
               "--data", str(data), "--output", str(output), "--stages", "1,2", "--steps-per-stage", str(args.steps),
               "--grad-accum", str(args.grad_accum), "--micro-batch-size", "1", "--dtype", DTYPE_NAMES[name],
               "--teacher-wire-dtype", DTYPE_NAMES[args.wire_dtype], "--image-options", STUDENT_IMAGE_OPTIONS,
               "--teacher-timeout-s", "1800", "--data-workers", "0", "--no-tensorboard", "--save-every", "1000000",
               "--log-sample-ids",
               *([] if regularisation else ["--no-regularisation"])]
    started = time.perf_counter()
    try:
        trainer = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        trainer_rss = PeakRss(trainer.pid)
        log, _ = trainer.communicate()
        trainer_peak = trainer_rss.stop()
        if trainer.returncode != 0:
            raise SystemExit(f"{name} trainer failed ({trainer.returncode}):\n{log[-6000:]}\nserver:\n{server.log[-3000:]}")
    finally:
        server.kill()
        server_peak = server_rss.stop()
    rows = {stage: [json.loads(line) for line in (output / "metrics" / f"stage{stage}.jsonl").read_text().splitlines()]
            for stage in (1, 2)}
    samples_per_step = args.grad_accum
    wire = {}
    for key in ("encode_sent", "encode_received", "score_sent", "score_received"):
        total = sum(r.get(f"wire_{key}_bytes", 0) for stage in rows.values() for r in stage)
        wire[key] = total / (samples_per_step * sum(len(stage) for stage in rows.values()))
    step_times = [r["step_time_s"] for stage in rows.values() for r in stage]
    return {
        "precision": name, "regularisation": regularisation, "wall_s": round(time.perf_counter() - started, 1),
        "server_peak_rss_gib": round(server_peak, 3), "trainer_peak_rss_gib": round(trainer_peak, 3),
        "wire_bytes_per_sample": {k: round(v) for k, v in wire.items()},
        "seconds_per_sample": round(sum(step_times) / (samples_per_step * len(step_times)), 2),
        "sample_ids": [i for stage in rows.values() for r in stage for i in r["sample_ids"]],
        "losses": {f"stage{s}": {k: v for k, v in stage[-1].items() if k.endswith(("_ce", "_kl")) or k == "loss"}
                   for s, stage in rows.items()},
    }


def minimum_bytes(teacher_tokens: dict, *, regularisation: bool, wire_bytes: int, sample_ids: list[str]) -> dict:
    """What the enabled losses need per sample, for the samples a run trained on (mean)."""
    d = teacher_tokens["hidden_size"]
    by_id = {r["sample_id"]: r for r in teacher_tokens["samples"]}
    rows = [by_id[i] for i in sample_ids]
    la = sum(r["answer_tokens"] for r in rows) / len(rows)
    lq = sum(r["question_tokens"] for r in rows) / len(rows)
    paths = 2 if regularisation else 1
    encode = (la + (lq if regularisation else 0)) * d * wire_bytes
    score = paths * la * d * wire_bytes
    return {"encode_received": round(encode), "score_sent": round(score), "score_received": round(score)}


def weights_gib(checkpoint: Path) -> float:
    return sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per stage (default 1)")
    parser.add_argument("--grad-accum", type=int, default=6,
                        help="samples per optimizer step (default 6: with 6 records, every format in every stage)")
    parser.add_argument("--records", type=int, default=6, help="records written, cycling the formats (default 6)")
    parser.add_argument("--precisions", default="fp32,bf16", help="runs to make (default fp32,bf16)")
    parser.add_argument("--wire-dtype", default="bf16", choices=sorted(DTYPE_NAMES),
                        help="the trainer's --teacher-wire-dtype (default bf16)")
    parser.add_argument("--no-regularisation-run", action=argparse.BooleanOptionalAction, default=True,
                        help="also one bf16 run without the regularisation path, to measure its wire volume")
    parser.add_argument("--work", help="keep checkpoints, data and runs here (default: a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON results (default %(default)s)")
    args = parser.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("building checkpoints and data ...", flush=True)
        teacher = build_checkpoint(TEACHER, work / "teacher", env)
        student = build_checkpoint(STUDENT, work / "student", env)
        data = write_records(work / "data", args.records)
        tokens = {"teacher": token_counts(teacher, TEACHER_IMAGE_OPTIONS, data),
                  "student": token_counts(student, STUDENT_IMAGE_OPTIONS, data)}
        runs = []
        for name in args.precisions.split(","):
            print(f"run: {name} ...", flush=True)
            runs.append(run_precision(name, teacher=teacher, student=student, data=data, work=work, args=args,
                                      env=env))
        if args.no_regularisation_run:
            print("run: bf16 without the regularisation path ...", flush=True)
            runs.append(run_precision("bf16", teacher=teacher, student=student, data=data, work=work, args=args,
                                      env=env, regularisation=False))
        weights = {"teacher_fp32_gib": round(weights_gib(teacher), 3), "student_fp32_gib": round(weights_gib(student), 3)}

    wire_bytes = WIRE_BYTES[args.wire_dtype]
    for run in runs:
        need = minimum_bytes(tokens["teacher"], regularisation=run["regularisation"], wire_bytes=wire_bytes,
                             sample_ids=run["sample_ids"])
        got = run["wire_bytes_per_sample"]
        features = sum(got[k] for k in need)
        run["minimum_bytes_per_sample"] = need
        run["features_over_minimum"] = round(features / sum(need.values()), 3)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"teacher mirrors {TEACHER['mirrors']} (1 layer), student mirrors {STUDENT['mirrors']} (1 layer); "
          f"teacher --image-options {TEACHER_IMAGE_OPTIONS}, student --image-options {STUDENT_IMAGE_OPTIONS}")
    print(f"{'side':8}{'image tok':>10}{'answer tok':>11}{'question tok':>13}  (mean per sample; max image tok)")
    for side, counts in tokens.items():
        rows = counts["samples"]
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("image_tokens", "answer_tokens",
                                                                        "question_tokens")}
        print(f"{side:8}{mean['image_tokens']:10.0f}{mean['answer_tokens']:11.0f}{mean['question_tokens']:13.0f}"
              f"  max image tokens {max(r['image_tokens'] for r in rows)}")
    print(f"weights (fp32): teacher {weights['teacher_fp32_gib']:.2f} GiB, student {weights['student_fp32_gib']:.2f} GiB")
    header = f"{'run':14}{'s/sample':>9}{'server GiB':>11}{'trainer GiB':>12}{'Encode MB':>10}{'Score MB':>9}"
    print(header + f"{'x minimum':>10}{'images MB':>10}")
    for run in runs:
        got = run["wire_bytes_per_sample"]
        label = run["precision"] + ("" if run["regularisation"] else " no L2")
        print(f"{label:14}{run['seconds_per_sample']:9.1f}{run['server_peak_rss_gib']:11.2f}"
              f"{run['trainer_peak_rss_gib']:12.2f}{got['encode_received'] / 1e6:10.2f}"
              f"{(got['score_sent'] + got['score_received']) / 1e6:9.2f}{run['features_over_minimum']:10.3f}"
              f"{got['encode_sent'] / 1e6:10.2f}")
    result = {"benchmark": "real_shapes", "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "command": "python benchmarks/real_shapes.py " + " ".join(sys.argv[1:]),
              "teacher": {k: v for k, v in TEACHER.items()}, "student": {k: v for k, v in STUDENT.items()},
              "teacher_image_options": TEACHER_IMAGE_OPTIONS, "student_image_options": STUDENT_IMAGE_OPTIONS,
              "wire_dtype": args.wire_dtype, "steps_per_stage": args.steps, "samples_per_step": args.grad_accum,
              "weights": weights, "tokens": tokens, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
