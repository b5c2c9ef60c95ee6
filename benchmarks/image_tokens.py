"""Image tokens per photo for every family, at its published checkpoint's processor settings and at a suggested budget.

    python benchmarks/image_tokens.py [--out benchmarks/results/image_tokens.json]

No hub access: each family's real transformers processor class (the family's own ``Processor`` with its real image
processor) is built with the published checkpoint's settings, written out below from its
``preprocessor_config.json`` / ``processor_config.json``; the tokenizer and chat template are the family's tiny
recipe's (``genrecal.tiny``: GPT-2's vocabulary plus the family's special tokens), which do not change how many
tokens an image becomes. The budget column applies the suggested ``--image-options`` through
:func:`genrecal.families.resolution.apply_image_options`, exactly as the trainer and the teacher do.

Photos: scikit-image's astronaut (512 x 512), its rocket (640 x 427, a photo at its own size) and a 1920 x 1080
frame (the astronaut resized: the count depends on the size only, and 1080p is a phone or camera photo's size).
For each it counts ``image`` = the image placeholder tokens (one per feature the LM sees) and ``sequence`` = all
tokens the image adds to the prompt (markers, tile-position tokens and newlines included). Prints a Markdown
table and writes JSON with the machine, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genrecal.families import adapter_for_model_type  # noqa: E402
from genrecal.families.resolution import apply_image_options, current_image_settings  # noqa: E402
from genrecal.tiny import TinySizes, base_tokenizer  # noqa: E402

# model_type -> the published checkpoint, its image processor (class name, kwargs), the processor attributes
# that count image tokens, and a suggested budget (--image-options).
FAMILIES = {
    "qwen2_vl": dict(
        checkpoint="Qwen/Qwen2-VL-2B-Instruct",
        image_processor=("Qwen2VLImageProcessor", dict(min_pixels=3136, max_pixels=12845056)),
        processor={},
        budget={"max_pixels": 200704},  # <= 256 tokens per image (448 x 448 px)
    ),
    "qwen2_5_vl": dict(
        checkpoint="Qwen/Qwen2.5-VL-3B-Instruct",
        image_processor=("Qwen2VLImageProcessor", dict(min_pixels=3136, max_pixels=12845056)),
        processor={},
        budget={"max_pixels": 200704},
    ),
    "internvl": dict(
        checkpoint="OpenGVLab/InternVL3-1B-hf",
        image_processor=("GotOcr2ImageProcessor", dict(
            size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
        processor=dict(image_seq_length=256),
        budget={"max_patches": 4},  # <= 4 tiles + thumbnail = 1280 tokens
    ),
    "llava_onevision": dict(
        checkpoint="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        image_processor=("LlavaOnevisionImageProcessor", dict(size={"height": 384, "width": 384})),  # 36 pinpoints
        processor=dict(num_image_tokens=729, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9"),
        budget={"image_grid_pinpoints": [[384, 384], [384, 768], [768, 384]]},  # grids of 1 or 2 tiles
    ),
    "idefics3": dict(
        checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct",
        image_processor=("Idefics3ImageProcessor", dict(
            do_image_splitting=True, size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})),
        processor=dict(image_seq_len=64),
        budget={"longest_edge": 1024},  # <= 2 x 2 tiles + the global one = 320 tokens
    ),
    "llava": dict(
        checkpoint="llava-hf/llava-1.5-7b-hf",
        image_processor=("CLIPImageProcessor", dict(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
        processor=dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1),
        budget=None,  # fixed by the CLIP tower's position embeddings
    ),
}


def photos() -> dict[str, Image.Image]:
    import skimage.data

    astronaut = Image.fromarray(skimage.data.astronaut())
    return {
        "astronaut 512x512": astronaut,
        "rocket 640x427": Image.fromarray(skimage.data.rocket()),
        "1920x1080": astronaut.resize((1920, 1080), Image.BICUBIC),
    }


def published_processor(model_type: str):
    """The family's processor class with the published checkpoint's image settings (tiny tokenizer)."""
    import transformers

    spec = FAMILIES[model_type]
    adapter = adapter_for_model_type(model_type)
    config, processor = adapter.tiny_recipe(TinySizes(), base_tokenizer("gpt2"))
    name, kwargs = spec["image_processor"]
    processor.image_processor = getattr(transformers, name)(**kwargs)
    for attr, value in spec["processor"].items():
        setattr(processor, attr, value)
    if model_type == "llava_onevision":  # the model config holds the pinpoints too (what apply_image_options edits)
        config.image_grid_pinpoints = processor.image_processor.image_grid_pinpoints
    return adapter, config, processor


def count(adapter, processor, image: Image.Image) -> dict:
    """Image placeholder tokens, and all tokens the image adds (the same prompt without it, same processor)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_token = processor.image_token
    ids = processor(text=[text], images=[[image]], return_tensors="pt", **adapter.processor_kwargs)["input_ids"][0]
    bare = processor(text=[text.replace(image_token, "")], return_tensors="pt", **adapter.processor_kwargs)["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    return {"image": int((ids == image_id).sum()), "sequence": int(len(ids) - len(bare))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/image_tokens.json"), help="JSON to write")
    args = parser.parse_args(argv)
    pictures = photos()
    rows = []
    for model_type, spec in FAMILIES.items():
        for setting in ("published", "budget"):
            if setting == "budget" and spec["budget"] is None:
                continue
            adapter, config, processor = published_processor(model_type)
            options = apply_image_options(adapter, processor, config, spec["budget"]) if setting == "budget" else {}
            row = {
                "family": model_type, "checkpoint": spec["checkpoint"], "setting": setting, "image_options": options,
                "knobs": current_image_settings(adapter, processor, config),
                "tokens": {name: count(adapter, processor, image) for name, image in pictures.items()},
            }
            rows.append(row)
            print(f"{model_type:16s} {setting:9s} {json.dumps(row['tokens'])}", flush=True)
    machine = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    import transformers

    result = {
        "command": "python benchmarks/image_tokens.py",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "photos": {name: list(image.size) for name, image in pictures.items()},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print()
    print(markdown(result))
    print(f"\nwritten to {out}")


def markdown(result: dict) -> str:
    names = list(result["photos"])
    lines = ["| family (checkpoint) | setting | " + " | ".join(f"{n}: image / sequence" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in result["rows"]:
        setting = "published" if row["setting"] == "published" else "`" + ",".join(
            f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in row["image_options"].items()) + "`"
        cells = " | ".join(f"{row['tokens'][n]['image']} / {row['tokens'][n]['sequence']}" for n in names)
        lines.append(f"| {row['family']} ({row['checkpoint']}) | {setting} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
