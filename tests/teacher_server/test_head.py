"""The LM head alone, read from a checkpoint's safetensors (what the vLLM backend scores with)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from genrecal.families import load_vlm, supported_model_types
from teacher_server.backends.head import load_head


@pytest.mark.parametrize("family", supported_model_types())
def test_head_equals_the_transformers_models_head(tiny_checkpoint, family):
    path = tiny_checkpoint(family, num_heads=2)
    head = load_head(path, dtype=torch.float32)
    reference = load_vlm(path).head
    assert torch.equal(head.weight, reference.weight)
    assert head.bias is None and reference.bias is None
    assert not head.weight.requires_grad


def test_tied_head_is_the_input_embedding(tiny_checkpoint):
    path = tiny_checkpoint("internvl", num_heads=2)  # the tiny InternVL ties its head
    saved = load_file(path / "model.safetensors")
    assert not any(name.endswith("lm_head.weight") for name in saved)
    head = load_head(path, dtype=torch.bfloat16)
    assert head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(head.weight, saved["language_model.model.embed_tokens.weight"].bfloat16())


def test_missing_head_is_an_error_that_lists_candidates(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen2_vl", num_heads=2)
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    weights = load_file(source / "model.safetensors")
    weights.pop("lm_head.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"expected one '\*lm_head.weight'.*none"):
        load_head(tmp_path, dtype=torch.float32)
    weights["lm_head.weight"] = torch.zeros(3, 3)  # the wrong shape is no head either
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'lm_head.weight': \(3, 3\)"):
        load_head(tmp_path, dtype=torch.float32)


def test_sharded_checkpoint_is_read_through_its_index(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen2_vl", num_heads=2)
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    weights = load_file(source / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.testing.assert_close(load_head(tmp_path, dtype=torch.float32).weight, weights["lm_head.weight"])
