"""Write a tiny LLaVA-style data set of solid-colour pictures ("What colour is the picture?") for smoke runs.

    python examples/colours.py OUT_DIR [--count 48] [--seed 0]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write data.json and images/ into")
    parser.add_argument("--count", type=int, default=48, help="number of samples")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(args.count):
        name = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out / "images" / f"{i}.png")
        records.append({"id": f"colour-{i}", "image": f"images/{i}.png", "type": "colour", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": name}]})
    (out / "data.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {len(records)} samples to {out / 'data.json'}")


if __name__ == "__main__":
    main()
