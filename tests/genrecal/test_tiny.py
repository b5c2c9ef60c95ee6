"""`python -m genrecal.tiny` writes genuine checkpoint folders that load through the ordinary HF path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from genrecal.families import load_vlm
from genrecal.tiny import TinySizes, base_tokenizer


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "genrecal.tiny", "--family", "qwen2_vl", "--out", str(out), "--tokenizer", "llama2",
         "--hidden-size", "48", "--num-heads", "4", "--num-kv-heads", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (out / name).is_file(), name
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["Qwen2VLForConditionalGeneration"]
    assert config.text_config.hidden_size == 48
    processor = AutoProcessor.from_pretrained(out)
    assert len(processor.tokenizer) >= 32000 and config.text_config.vocab_size >= len(processor.tokenizer)
    assert json.loads((out / "genrecal_tiny.json").read_text())["tokenizer"] == "llama2"
    assert load_vlm(out).head.weight.shape[1] == 48


def test_cli_sets_a_real_vocabulary_and_tied_embeddings(tmp_path):
    """One command gives a real-width test model: Qwen2-VL's 151,936 rows, the head tied to the embeddings."""
    out = tmp_path / "qwen2_vl"
    result = subprocess.run(
        [sys.executable, "-m", "genrecal.tiny", "--family", "qwen2_vl", "--out", str(out), "--vocab-size", "151936",
         "--tie-word-embeddings"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    vlm = load_vlm(out)
    assert vlm.model.config.get_text_config().vocab_size == 151936
    assert vlm.head.weight.shape[0] == 151936
    assert vlm.head.weight.data_ptr() == vlm.model.get_input_embeddings().weight.data_ptr()  # tied, after loading
    recorded = json.loads((out / "genrecal_tiny.json").read_text())
    assert (recorded["vocab_size"], recorded["tie_word_embeddings"]) == (151936, True)


def test_cli_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    result = subprocess.run([sys.executable, "-m", "genrecal.tiny", "--family", "qwen2_vl", "--out", str(tmp_path),
                             "--vocab-size", "1000"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "smaller than the tokenizer" in result.stderr


def test_cli_rejects_unknown_family(tmp_path):
    result = subprocess.run([sys.executable, "-m", "genrecal.tiny", "--family", "bert", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "invalid choice" in result.stderr


def test_offline_tokenizers_differ():
    gpt2, llama2 = base_tokenizer("gpt2"), base_tokenizer("llama2")
    assert (len(gpt2), len(llama2)) == (50257, 32000)
    text = "What colour is the large circle?"
    assert gpt2(text).input_ids != llama2(text).input_ids
    with pytest.raises(ValueError, match="choose one of"):
        base_tokenizer("bert")


def test_sizes_are_validated():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TinySizes(hidden_size=50, num_heads=4)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_llava_family_vision_weights_have_published_names_and_load(tiny_checkpoint, family):
    """Published llava-hf checkpoints (and vLLM) name the tower `vision_tower.vision_model.*`; transformers 5.20
    saves `vision_tower.*`. The tiny writer renames, and transformers still loads every tensor strictly."""
    import torch
    from safetensors.torch import load_file

    path = tiny_checkpoint(family, num_heads=2)
    saved = load_file(path / "model.safetensors")
    vision = [name for name in saved if name.startswith("vision_tower.")]
    assert vision and all(name.startswith("vision_tower.vision_model.") for name in vision)
    model = load_vlm(path).model
    name = next(n for n in vision if n.endswith("patch_embedding.weight"))
    # transformers 5.20's own name for the same tensor drops `vision_model.` (its towers are flat modules)
    loaded = dict(model.named_parameters())["model." + name.replace("vision_model.", "", 1)]
    assert torch.equal(loaded, saved[name])


def test_internvl_tile_follows_image_size(tmp_path):
    """InternVL tiles are 2 x image_size px: the default 56 px gives 4 image tokens, 84 px gives 9."""
    from genrecal.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint("internvl", tmp_path / "m", sizes=TinySizes(image_size=42), tokenizer="llama2")
    config = AutoConfig.from_pretrained(path)
    assert config.image_seq_length == 9 and config.vision_config.image_size == [84, 84]
    with pytest.raises(ValueError, match="multiple of 28 px"):
        write_tiny_checkpoint("internvl", tmp_path / "bad", sizes=TinySizes(image_size=35), tokenizer="llama2")


def test_internvl_patch_size_and_pixel_shuffle_ratio_set_the_image_tokens(tmp_path):
    """56 px in 7-px patches = 8x8 patches; shuffled by 0.25, 2x2 = 4 image tokens of 16 patches each; it runs."""
    from genrecal.sample import Sample, Turn
    from genrecal.tiny import write_tiny_checkpoint

    sizes = TinySizes(vision_patch_size=7, pixel_shuffle_ratio=0.25)
    path = write_tiny_checkpoint("internvl", tmp_path / "m", sizes=sizes, tokenizer="llama2")
    config = AutoConfig.from_pretrained(path)
    assert config.image_seq_length == 4 and config.downsample_ratio == 0.25
    assert config.vision_config.patch_size == [7, 7]
    vlm = load_vlm(path)
    batch = vlm.encode([Sample("s", [Turn("user", "<image>\nwhat?"), Turn("assistant", "red")],
                               [Image.new("RGB", (64, 64), "red")])])
    assert int((batch.input_ids == config.image_token_id).sum()) == 4
    assert torch.isfinite(vlm.body_hidden_states(batch)).all()
    with pytest.raises(ValueError, match="multiple of 28 px"):  # 56 px is no whole number of 4x4 groups of 7 px
        write_tiny_checkpoint("internvl", tmp_path / "bad", sizes=TinySizes(image_size=21, vision_patch_size=7,
                                                                            pixel_shuffle_ratio=0.25))
    with pytest.raises(ValueError, match="internvl tiny recipe only"):
        write_tiny_checkpoint("qwen2_vl", tmp_path / "q", sizes=TinySizes(vision_patch_size=7))
    with pytest.raises(ValueError, match="pixel_shuffle_ratio must be in"):
        TinySizes(pixel_shuffle_ratio=2.0)
