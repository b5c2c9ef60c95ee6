"""Demo pre-training: every part trains, the vision probe reaches the vision tower, and the result reloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from demo.pretrain import (
    PictureLabels,
    PretrainConfig,
    ProjectorTap,
    VisionProbe,
    picture_features,
    pretrain,
    pretrain_vision,
)
from genrecal.families import load_vlm
from genrecal.sample import Sample, Turn

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def samples(rng, n=6):
    out, labels = [], []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        out.append(Sample(f"s{i}", [Turn("user", "<image>\nwhat color is the shape?"), Turn("assistant", name)],
                          [Image.fromarray(pixels)]))
        labels.append(PictureLabels(colour=i % 3, shape=-100))
    return out, labels


@pytest.mark.parametrize(("family", "tokenizer"), [("internvl", "llama2"), ("qwen2_vl", "gpt2")])
def test_every_part_trains_and_the_checkpoint_reloads(tiny_checkpoint, tmp_path, rng, family, tokenizer):
    init = tiny_checkpoint(family, tokenizer=tokenizer)
    data, labels = samples(rng)
    losses = pretrain(init, data, tmp_path / "out", PretrainConfig(steps=3, batch_size=3, warmup_steps=1),
                      picture_labels=labels, classes=(3, 1))
    assert len(losses) == 3 and all(np.isfinite(losses))
    vlm = load_vlm(tmp_path / "out")  # strict load: the probe is not in the checkpoint
    before = dict(load_vlm(init).model.named_parameters())
    vision = vlm.adapter.vision_encoder_prefixes
    changed = {n for n, p in vlm.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith(vision) for n in changed)  # the vision encoder trained (GenRecal's stages never do)
    assert any(n.startswith(vlm.adapter.body_prefixes) for n in changed)
    assert not [k for k in load_file(tmp_path / "out" / "model.safetensors") if "probe" in k]


def test_the_tap_pools_one_row_per_picture(tiny_checkpoint, rng):
    vlm = load_vlm(tiny_checkpoint("qwen2_vl", tokenizer="gpt2"))
    tap = ProjectorTap(vlm)
    data, labels = samples(rng, 4)
    vlm.body_hidden_states(vlm.encode(data))
    pooled = tap.pooled(4)
    assert pooled.shape == (4, vlm.head.weight.shape[1])
    probe = VisionProbe(pooled.shape[1], 3, 1)
    loss = probe.loss(pooled, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    tap.remove()
    assert probe.loss(pooled, [PictureLabels()] * 4) == 0  # nothing known: no loss, no NaN


def test_picture_features_are_the_pooled_projector_output_of_a_full_forward(tiny_checkpoint, rng):
    vlm = load_vlm(tiny_checkpoint("internvl", tokenizer="llama2", vision_patch_size=7, pixel_shuffle_ratio=0.25))
    vlm.model.eval()
    tap = ProjectorTap(vlm)
    data, _ = samples(rng, 3)
    with torch.no_grad():
        vlm.body_hidden_states(vlm.encode(data))
        alone = picture_features(vlm, [s.images[0] for s in data])
    torch.testing.assert_close(alone, tap.pooled(3))
    tap.remove()


def test_the_vision_phase_trains_the_vision_encoder_and_projector_only(tiny_checkpoint):
    vlm = load_vlm(tiny_checkpoint("internvl", tokenizer="llama2", vision_patch_size=7, pixel_shuffle_ratio=0.25))
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    probe = VisionProbe(vlm.head.weight.shape[1], 8, 3)
    config = PretrainConfig(steps=2, warmup_steps=0, vision_steps=3, vision_batch_size=4)
    losses = pretrain_vision(vlm, probe, config)
    assert len(losses) == 3 and all(np.isfinite(losses))
    changed = {n for n, p in vlm.model.named_parameters() if not torch.equal(p, before[n])}
    trained = vlm.adapter.vision_encoder_prefixes + vlm.adapter.projector_prefixes
    assert any(n.startswith(vlm.adapter.vision_encoder_prefixes) for n in changed)
    assert any(n.startswith(vlm.adapter.projector_prefixes) for n in changed)
    assert all(n.startswith(trained) for n in changed)  # the language model waits for the VLM phase
    with pytest.raises(ValueError, match="needs probe_weight > 0"):
        PretrainConfig(vision_steps=3, probe_weight=0)
