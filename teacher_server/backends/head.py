"""The teacher's LM head alone, read from the checkpoint's safetensors (no body weights are loaded).

A body that runs outside transformers (vLLM) still needs the head as a torch tensor: Score multiplies the
Recalibrator's outputs and the kept prediction states by it (``genrecal.head_scoring``). transformers builds the
model on the meta device (no memory), which says the head's shape, whether it is tied to the input embedding,
and whether it has a bias; the weight is then read from the one safetensors entry that holds it.

Published checkpoints name the head differently (``lm_head.weight``, ``language_model.lm_head.weight``; a tied
one lives at ``model.embed_tokens.weight``, ``language_model.model.embed_tokens.weight``,
``model.text_model.embed_tokens.weight``...), so the entry is found by its last two name parts and its shape;
none or several candidates is an error that lists them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def load_head(model_path: str | Path, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Linear:
    """The frozen LM head ``(V_l, D_l)`` of the checkpoint at ``model_path``, in ``dtype`` on ``device``."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(model_path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    skeleton.tie_weights()
    meta_head = skeleton.get_output_embeddings()
    tied = meta_head.weight is skeleton.get_input_embeddings().weight
    shape = tuple(meta_head.weight.shape)  # (V_l, D_l)
    suffix = "embed_tokens.weight" if tied else "lm_head.weight"

    locations = _weight_locations(path)
    candidates = [name for name in locations if name == suffix or name.endswith("." + suffix)]
    shapes = {}
    for name in candidates:
        with safe_open(str(path / locations[name]), framework="pt") as f:
            shapes[name] = tuple(f.get_slice(name).get_shape())
    matching = [name for name in candidates if shapes[name] == shape]
    if len(matching) != 1:
        raise ValueError(
            f"checkpoint {str(path)!r}: cannot tell which weight is the LM head ({'tied to the input embedding, ' if tied else ''}"
            f"expected one '*{suffix}' of shape {shape}); candidates and shapes: {shapes or 'none'}"
        )
    name = matching[0]
    head = nn.Linear(shape[1], shape[0], bias=meta_head.bias is not None, device="meta")
    head.weight = nn.Parameter(_read(path / locations[name], name, dtype, device), requires_grad=False)
    if meta_head.bias is not None:
        bias_name = name.removesuffix("weight") + "bias"
        if bias_name not in locations:
            raise ValueError(f"checkpoint {str(path)!r}: the LM head has a bias but {bias_name!r} is not in it")
        head.bias = nn.Parameter(_read(path / locations[bias_name], bias_name, dtype, device), requires_grad=False)
    return head.eval()


def _weight_locations(path: Path) -> dict[str, str]:
    """weight name -> safetensors file (relative to ``path``), from the index if sharded."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    locations = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            locations.update(dict.fromkeys(f.keys(), file.name))
    if not locations:
        raise ValueError(f"checkpoint {str(path)!r} holds no *.safetensors weights")
    return locations


def _read(file: Path, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name).to(device=device, dtype=dtype)
