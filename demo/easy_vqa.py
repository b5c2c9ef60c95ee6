"""easy-VQA as LLaVA-style JSON: the demo's real data set, installed offline from PyPI.

    python -m demo.easy_vqa --out DIR [--train-limit N] [--test-limit N] [--seed S]

The ``easy-vqa`` package (MIT; https://github.com/vzhou842/easy-VQA) ships 64x64 PNG pictures of one coloured
shape on a white background and questions about them: 4,000 train pictures with 38,575 questions, 1,000 test
pictures with 9,673 questions, 13 answers (3 shapes, 8 colours, yes / no). The conversion writes::

    DIR/train.json, DIR/test.json     LLaVA records {"id", "image", "type", "conversations"}
    DIR/images/{train,test}/ID.png    the package's pictures (hard-linked where possible, else copied)
    DIR/manifest.json                 options and counts, written last

``type`` is the kind of answer — ``shape``, ``colour`` or ``yes_no`` (the package gives no question types) —
so ``python -m student_trainer eval`` reports its scores per type. Record ids are ``{split}-{index}``, the
question's index in the package's list. ``--*-limit`` keeps a seeded random subset, stratified by type (every
type keeps its share, and at least one question when the limit allows), in the package's order. Converting
again with the same options and package version returns the manifest without touching anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from collections import Counter
from importlib.metadata import version
from pathlib import Path

SPLITS = ("train", "test")
FULL_COUNTS = {"train": 38_575, "test": 9_673}  # questions per split in easy-vqa 1.0
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
QUESTION_TYPES = ("colour", "shape", "yes_no")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the records' layout changes, so old conversions are redone


def answer_type(answer: str) -> str:
    """The question type of an easy-VQA answer: ``shape``, ``yes_no`` or ``colour``."""
    if answer in SHAPES:
        return "shape"
    if answer in YES_NO:
        return "yes_no"
    return "colour"


def _package():
    try:
        import easy_vqa
    except ImportError as exc:
        raise ImportError(
            "the demo data needs the easy-vqa package: pip install 'easy-vqa>=1.0' (or pip install -e '.[demo]')"
        ) from exc
    return easy_vqa


def _questions(split: str) -> tuple[list[str], list[str], list[int]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    easy_vqa = _package()
    return easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()


def image_paths(split: str) -> dict[int, str]:
    """``{image id: the package's PNG path}`` of one split."""
    easy_vqa = _package()
    return easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()


def stratified_subset(types: list[str], limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset of ``limit`` items, in increasing order, stratified by ``types``.

    Each type gets its proportional share (largest remainder), but at least one item while ``limit`` covers
    every type. ``limit=None`` (or one at least the number of items) keeps everything.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"a limit must be a positive number of questions or None, got {limit}")
    if limit is None or limit >= len(types):
        return list(range(len(types)))
    by_type: dict[str, list[int]] = {}
    for index, question_type in enumerate(types):
        by_type.setdefault(question_type, []).append(index)
    names = sorted(by_type)
    shares = {t: limit * len(by_type[t]) / len(types) for t in names}
    quota = {t: int(shares[t]) for t in names}
    for t in sorted(names, key=lambda t: (quota[t] - shares[t], t))[: limit - sum(quota.values())]:
        quota[t] += 1  # largest remainders first
    if limit >= len(names):  # move one item to every empty type from the largest quota
        for t in names:
            if quota[t] == 0:
                quota[max(names, key=lambda n: quota[n])] -= 1
                quota[t] = 1
    rng = random.Random(f"easy-vqa/{seed}")  # str seeds hash deterministically (not PYTHONHASHSEED-dependent)
    chosen = []
    for t in names:
        chosen += rng.sample(by_type[t], quota[t])
    return sorted(chosen)


def easy_vqa_records(split: str, *, limit: int | None = None, seed: int = 0) -> list[dict]:
    """The LLaVA records of one split, as :func:`convert_easy_vqa` writes them, without writing anything.

    Image names are relative to the output folder (``images/{split}/{image id}.png``).
    """
    texts, answers, image_ids = _questions(split)
    types = [answer_type(a) for a in answers]
    return [
        {
            "id": f"{split}-{index}",
            "image": f"images/{split}/{image_ids[index]}.png",
            "type": types[index],
            "conversations": [
                {"from": "human", "value": f"<image>\n{texts[index]}"},
                {"from": "gpt", "value": answers[index]},
            ],
        }
        for index in stratified_subset(types, limit, seed)
    ]


def _options(train_limit: int | None, test_limit: int | None, seed: int) -> dict:
    return {"train_limit": train_limit, "test_limit": test_limit, "seed": seed,
            "easy_vqa_version": version("easy-vqa"), "format": FORMAT_VERSION}


def _result(out: Path, manifest: dict) -> dict:
    return {**manifest, "out": str(out), **{f"{split}_json": str(out / f"{split}.json") for split in SPLITS}}


def _place(source: str, target: Path) -> None:
    """Hard-link (or, across filesystems, copy) ``source`` to ``target``, atomically."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, target)


def _write_json(path: Path, content) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)


def convert_easy_vqa(
    out: str | Path, *, train_limit: int | None = None, test_limit: int | None = None, seed: int = 0
) -> dict:
    """Write easy-VQA (or a stratified subset) to ``out`` in LLaVA format; see the module docstring.

    Returns the manifest — ``options``, ``counts`` (questions per split), ``types`` (questions per type and
    split), ``images`` (pictures per split) — plus ``out``, ``train_json`` and ``test_json`` (paths). When
    ``out/manifest.json`` already records the same options, returns at once without converting again.
    """
    out = Path(out)
    options = _options(train_limit, test_limit, seed)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("options") == options and all((out / f"{s}.json").is_file() for s in SPLITS):
            return _result(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # an interrupted conversion must not look finished
    manifest = {"source": "easy-vqa (MIT), https://github.com/vzhou842/easy-VQA", "options": options,
                "counts": {}, "types": {}, "images": {}}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        records = easy_vqa_records(split, limit=limit, seed=seed)
        sources = image_paths(split)
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted({record["image"] for record in records})
        for name in names:
            image_id = int(Path(name).stem)
            if image_id not in sources:
                raise FileNotFoundError(f"easy-vqa's {split} split has no image {image_id}; reinstall easy-vqa")
            _place(sources[image_id], out / name)
        _write_json(out / f"{split}.json", records)
        manifest["counts"][split] = len(records)
        manifest["types"][split] = dict(sorted(Counter(r["type"] for r in records).items()))
        manifest["images"][split] = len(names)
    _write_json(manifest_path, manifest)
    return _result(out, manifest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.easy_vqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write train.json, test.json and images/ into")
    parser.add_argument("--train-limit", type=int, help="keep this many training questions (default: all 38,575)")
    parser.add_argument("--test-limit", type=int, help="keep this many test questions (default: all 9,673)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified subsets (default 0)")
    args = parser.parse_args(argv)
    result = convert_easy_vqa(args.out, train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed)
    for split in SPLITS:
        types = ", ".join(f"{t} {n}" for t, n in result["types"][split].items())
        print(f"{split}: {result['counts'][split]} questions ({types}) on {result['images'][split]} images "
              f"-> {result[f'{split}_json']}")


if __name__ == "__main__":
    main()
