"""The demo's default models, standing in for the paper's pretrained VLMs: a teacher that sees, and base students.

| name | family, tokenizer | sizes | image tokens | pre-trained on |
|---|---|---|---|---|
| ``teacher`` | Qwen2-VL, GPT-2 (50,257) | hidden 96, 3 layers, ViT 128 x 2 | 16 (112 px) | easy-VQA train, clean, type-balanced |
| ``student`` | InternVL, Llama-2 (32,000) | hidden 64, 6 layers, InternViT 64 x 2, 7-px patches | 4 (one 56-px tile) | drawn pictures (vision), then the warm-up pool with 50 colour and 50 shape questions |
| ``student_same_tok`` | Qwen2-VL, GPT-2 | hidden 64, 6 layers, ViT 64 x 2 | 4 (56 px) | the warm-up pool with 50 colour and 50 shape questions |

Each is a real-format tiny checkpoint (:func:`genrecal.tiny.write_tiny_checkpoint`, tied embeddings) pre-trained
with every part trainable, the vision tower included (:mod:`demo.pretrain`). The base students' warm-up pool is
the questions about every 4th training picture (:mod:`demo.splits`), which the distillation never sees.
Rec-body (2 blocks of the student's own decoder layer) is 1/3 of the student's decoder.

``teacher`` and ``student`` ship as trained weights (``demo/weights/NAME.safetensors``, bf16, the parameters
only; tokenizer, processor and config come from the tiny recipe), and so does ``student_same_tok``, the
distillation benchmark's positive-control student (``BENCHMARK_ONLY``: the demo never loads it; shipped because
pre-training from scratch does not reproduce across CPUs, and the control must measure one fixed model). :func:`prepare_models` rebuilds the checkpoint
folders from them in seconds; a model without shipped weights (or whose recipe changed) is pre-trained and
cached. The shipped files are reproduced, from easy-VQA, by::

    python -m demo.models build --out demo/weights
    python -m demo.models build --out demo/weights --only student_same_tok

(run by the tests at toy size only; the shipped teacher came from an experiment script with the same recipe, one
torch thread, 7 min; the student from :func:`build` with its recipe, 11 min on one core of this 2-core VM; ``student_same_tok``
likewise, 3 min).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from demo.easy_vqa import SHAPES
from demo.pretrain import PictureLabels, PretrainConfig, pretrain
from demo.splits import COLOURS, picture_labels, sample_per_type
from genrecal.head_scoring import IGNORE_INDEX
from genrecal.tiny import TinySizes, write_tiny_checkpoint

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
DONE = "DONE"
MODEL = "model"


@dataclass(frozen=True)
class ModelRecipe:
    family: str
    tokenizer: str
    sizes: TinySizes
    data: str  # "train" (the clean training split) or "warmup" (demo.splits' warm-up pool); both type-balanced
    pretraining: PretrainConfig
    image_side: int | None = None  # Qwen2-VL family: scale pictures to side x side px ((side / 28)^2 tokens)
    per_type: int | None = None  # at most this many (seeded-random) questions of each type
    type_limits: tuple[tuple[str, int], ...] = ()  # (type, n): then keep only the first n of that type
    seed: int = 0

    def fingerprint(self) -> str:
        fields = asdict(self)
        if not fields["type_limits"]:  # added later: recipes without limits keep their fingerprints
            del fields["type_limits"]
        for later in ("vision_patch_size", "pixel_shuffle_ratio"):  # likewise the later TinySizes options
            if fields["sizes"][later] is None:
                del fields["sizes"][later]
        if not fields["pretraining"]["vision_steps"]:  # and the vision encoder's own pre-training
            for later in ("vision_steps", "vision_batch_size"):
                del fields["pretraining"][later]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


RECIPES: dict[str, ModelRecipe] = {
    "teacher": ModelRecipe(
        "qwen2_vl", "gpt2", TinySizes(hidden_size=96, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=192,
                                      vision_hidden_size=128, vision_layers=2, vision_heads=4),
        data="train", per_type=5000, image_side=112,
        pretraining=PretrainConfig(steps=800, batch_size=32, lr=3e-3, lr_end=1e-4, warmup_steps=50)),
    "student": ModelRecipe(
        "internvl", "llama2", TinySizes(hidden_size=64, num_layers=6, num_heads=2, num_kv_heads=1,
                                        intermediate_size=128, vision_hidden_size=64, vision_layers=2, vision_heads=2,
                                        vision_patch_size=7, pixel_shuffle_ratio=0.25),
        data="warmup", per_type=1300, type_limits=(("colour", 50), ("shape", 50)),
        pretraining=PretrainConfig(steps=600, batch_size=32, lr=3e-3, lr_end=1e-4, warmup_steps=50,
                                   vision_steps=1500, vision_batch_size=64)),
    "student_same_tok": ModelRecipe(
        "qwen2_vl", "gpt2", TinySizes(hidden_size=64, num_layers=6, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                      vision_hidden_size=64, vision_layers=2, vision_heads=2),
        data="warmup", per_type=1300, image_side=56, type_limits=(("colour", 50), ("shape", 50)),
        pretraining=PretrainConfig(steps=600, batch_size=32, lr=3e-3, lr_end=1e-4, warmup_steps=50)),
}
SHIPPED = ("teacher", "student")  # the demo's models
BENCHMARK_ONLY = ("student_same_tok",)  # shipped too, for benchmarks/distillation.py


def set_min_image_side(checkpoint: Path, side: int) -> None:
    """Make a Qwen2-VL-style processor scale pictures up to at least ``side`` x ``side`` pixels (saved in place).

    Its ``size`` is a pixel-count range (``shortest_edge`` = min_pixels, ``longest_edge`` = max_pixels); a 64x64
    picture then becomes ``side / 14`` x ``side / 14`` patches, ``(side / 28)^2`` image tokens after the 2x2 merge.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    image_processor = processor.image_processor
    pixels = side * side
    image_processor.size = {"shortest_edge": pixels, "longest_edge": max(pixels, image_processor.size["longest_edge"])}
    processor.save_pretrained(checkpoint)


def balanced_training_records(records: list[dict], per_type: int, seed: int) -> list[dict]:
    """Up to ``per_type`` seeded-random records of each question type (records without a type form one group).

    easy-VQA's training split is 74% yes/no questions, which a blind model answers 82% right from the wording
    alone; balancing gives the colour and shape questions — no such shortcut — a third of the steps each.
    """
    # the seed's name stays: it seeds the shipped models' subsets
    return sample_per_type(records, per_type, random.Random(f"demo-teacher/{seed}"))


def write_init(recipe: ModelRecipe, out: Path) -> Path:
    """The recipe's random-weight checkpoint (tokenizer, processor, config), before pre-training."""
    write_tiny_checkpoint(recipe.family, out, sizes=recipe.sizes, tokenizer=recipe.tokenizer, seed=recipe.seed,
                          tie_word_embeddings=True)
    if recipe.image_side is not None:
        set_min_image_side(out, recipe.image_side)
    return out


def training_records(recipe: ModelRecipe, train: list[dict]) -> list[dict]:
    """The recipe's pre-training questions, drawn from the training split's records ``train``."""
    from demo.splits import warmup_and_distillation

    pool = warmup_and_distillation(train)[0] if recipe.data == "warmup" else train
    records = balanced_training_records(pool, recipe.per_type or 10**9, recipe.seed)
    for kind, limit in recipe.type_limits:
        of_kind = [r for r in records if r.get("type") == kind]
        records = [r for r in records if r.get("type") != kind] + of_kind[:limit]
    return records


def vision_probe_labels(records: list[dict], train: list[dict]) -> list[PictureLabels]:
    """Per record, its picture's colour and shape (class indices), read off the clean training split's colour and
    shape questions about that picture (:func:`demo.splits.picture_labels`); unknown -> ignored."""
    known = picture_labels(train)
    labels = []
    for record in records:
        colour, shape = known.get(record["image"], (None, None))
        labels.append(PictureLabels(COLOURS.index(colour) if colour else IGNORE_INDEX,
                                    SHAPES.index(shape) if shape else IGNORE_INDEX))
    return labels


def build(name: str, data_dir: str | Path, out: str | Path, *, recipe: ModelRecipe | None = None) -> Path:
    """Pre-train model ``name`` from its random init on easy-VQA in ``data_dir``; the checkpoint goes to ``out``."""
    from student_trainer.data import load_dataset_samples

    recipe = recipe or RECIPES[name]
    data_dir, out = Path(data_dir), Path(out)
    if out.exists():
        shutil.rmtree(out)
    work = out.parent / f"{out.name}.work"
    init = write_init(recipe, work / "init")
    train = json.loads((data_dir / "train.json").read_text(encoding="utf-8"))
    records = training_records(recipe, train)
    subset = work / "records.json"
    subset.write_text(json.dumps(records))
    samples, _ = load_dataset_samples(subset, image_folder=data_dir)
    if len(samples) != len(records):
        raise ValueError(f"{subset}: {len(records) - len(samples)} records could not be read")
    labels = vision_probe_labels(records, train)
    logger.info("pre-training %s (%s, %s tokenizer) on %d questions, %d steps of %d", name, recipe.family,
                recipe.tokenizer, len(samples), recipe.pretraining.steps, recipe.pretraining.batch_size)
    started = time.perf_counter()
    losses = pretrain(init, samples, out, recipe.pretraining, picture_labels=labels,
                      classes=(len(COLOURS), len(SHAPES)))
    (out / "genrecal_pretraining.json").write_text(json.dumps({
        "name": name, "recipe": asdict(recipe), "fingerprint": recipe.fingerprint(), "samples": len(samples),
        "seconds": round(time.perf_counter() - started), "loss_first": losses[0],
        "loss_last20": sum(losses[-20:]) / len(losses[-20:])}, indent=2) + "\n")
    shutil.rmtree(work)
    return out


def export_weights(checkpoint: Path, name: str, weights_dir: Path = WEIGHTS_DIR, *,
                   recipe: ModelRecipe | None = None) -> Path:
    """Save a pre-trained checkpoint's parameters as ``weights_dir/NAME.safetensors`` (bf16, tied tensors once),
    stamped with the fingerprint of the recipe that made them (``from_shipped`` uses only matching files)."""
    recipe = recipe or RECIPES[name]
    import torch
    from safetensors.torch import save_file

    from genrecal.families import load_vlm

    vlm = load_vlm(checkpoint)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in vlm.model.state_dict().items()
               if not _is_tied_duplicate(vlm.model, k)}
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / f"{name}.safetensors"
    save_file(tensors, path, metadata={"recipe_fingerprint": recipe.fingerprint(), "name": name})
    return path


def _is_tied_duplicate(model, key: str) -> bool:
    return key == "lm_head.weight" and model.config.get_text_config().tie_word_embeddings


def from_shipped(name: str, out: Path, weights_dir: Path = WEIGHTS_DIR) -> Path | None:
    """Rebuild ``name``'s checkpoint folder from its shipped weights; None when none match its recipe."""
    import torch
    from safetensors import safe_open

    from genrecal.families import load_vlm

    path = weights_dir / f"{name}.safetensors"
    if not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        if (f.metadata() or {}).get("recipe_fingerprint") != RECIPES[name].fingerprint():
            logger.warning("%s does not match the %s recipe any more; pre-training instead", path, name)
            return None
        tensors = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    work = out.parent / f"{out.name}.work"
    vlm = load_vlm(write_init(RECIPES[name], work))
    expected = {k for k in vlm.model.state_dict() if not _is_tied_duplicate(vlm.model, k)}
    if set(tensors) != expected:
        raise ValueError(f"{path}: parameters do not match the {name} recipe (missing "
                         f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]})")
    vlm.model.load_state_dict(tensors, strict=not vlm.model.config.get_text_config().tie_word_embeddings)
    vlm.model.tie_weights()
    vlm.model.save_pretrained(out, safe_serialization=True)
    vlm.processor.save_pretrained(out)
    shutil.rmtree(work)
    return out


def prepare_models(cache_dir: str | Path, data_dir: str | Path, *, kinds=SHIPPED) -> dict[str, Path]:
    """Checkpoint folders of the demo models ``kinds``: from shipped weights, else pre-trained; cached."""
    cache_dir = Path(cache_dir)
    paths = {}
    for name in kinds:
        root = cache_dir / name
        fingerprint = RECIPES[name].fingerprint()
        done = root / DONE
        if done.is_file() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
            paths[name] = root / MODEL
            continue
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        source = "shipped weights"
        if from_shipped(name, root / MODEL) is None:
            source = "pre-trained here"
            build(name, data_dir, root / MODEL)
        done.write_text(json.dumps({"fingerprint": fingerprint, "source": source}) + "\n")  # written last
        logger.info("demo model %s: %s (%s)", name, root / MODEL, source)
        paths[name] = root / MODEL
    return paths


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(prog="python -m demo.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pre-train the shipped models from easy-VQA and write their weights")
    b.add_argument("--out", default=str(WEIGHTS_DIR), help=f"folder for NAME.safetensors (default {WEIGHTS_DIR})")
    b.add_argument("--work", default="runs/demo_models", help="folder for the data and the checkpoints")
    b.add_argument("--only", default=",".join(SHIPPED), help="comma-separated model names (default: the demo's, " + ",".join(SHIPPED) + ")")
    b.add_argument("--steps", type=int,
                   help="override every model's pre-training steps, vision phase included (tests: a short run)")
    b.add_argument("--evaluate", type=int, default=1000, metavar="N", help="then evaluate on N test questions")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from demo.easy_vqa import convert_easy_vqa

    work = Path(args.work)
    convert_easy_vqa(work / "data", test_limit=args.evaluate or None, seed=0)
    for name in [n for n in args.only.split(",") if n]:
        recipe = RECIPES[name]
        if args.steps is not None:
            pretraining = replace(recipe.pretraining, steps=args.steps,
                                  warmup_steps=min(recipe.pretraining.warmup_steps, args.steps // 2),
                                  vision_steps=min(recipe.pretraining.vision_steps, args.steps))
            recipe = replace(recipe, pretraining=pretraining)
        checkpoint = build(name, work / "data", work / name, recipe=recipe)
        path = export_weights(checkpoint, name, Path(args.out), recipe=recipe)
        if args.evaluate:
            from student_trainer.evaluate import evaluate

            report = evaluate(checkpoint, work / "data" / "test.json", limit=args.evaluate, batch_size=32,
                              max_new_tokens=6)
            print(f"{name}: {checkpoint} -> {path}")
            print(report.table())


if __name__ == "__main__":
    main()
