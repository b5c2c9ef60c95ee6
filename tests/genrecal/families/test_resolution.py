"""Image resolution per family: each knob, applied through the real processor of a tiny checkpoint, changes the
image tokens of a real photo (scikit-image's 512 x 512 astronaut) as documented, and the model runs on them."""

from __future__ import annotations

import json

import pytest
import skimage.data
from PIL import Image

from genrecal.families import load_vlm
from genrecal.families.resolution import (
    check_image_options,
    current_image_settings,
    format_image_options,
    parse_image_options,
    vllm_image_arguments,
)
from genrecal.sample import Sample, Turn

# family -> (options, image tokens of the 512-px photo at the tiny recipe's settings, with the options). The tiny
# recipes pin small processors (genrecal/families/*.py, tiny_recipe); the arithmetic is the families' own:
CASES = {
    # 14-px patches merged 2 x 2: max_pixels 112^2 -> 112 x 112 px -> 4 x 4 tokens; 224^2 -> 8 x 8
    "qwen2_vl": ("max_pixels=50176", 16, 64),
    "qwen2_5_vl": ({"max_pixels": 50176, "min_pixels": 3136}, 16, 64),
    # 56-px tiles of 4 tokens: max 2 tiles -> a square photo is 1 tile; max 4 -> 2 x 2 tiles + thumbnail = 5 tiles
    "internvl": ("max_patches=4", 4, 20),
    # 28-px tiles of 2 x 2 features: base 4 + 1-tile grid 4 + 2 newlines = 10; a 2 x 2 grid: 4 + 16 + 4 newlines
    "llava_onevision": ('{"image_grid_pinpoints": [[28, 28], [56, 56]]}', 10, 24),
    # 56-px tiles of 4 tokens: one squashed tile; split at longest edge 112: 2 x 2 tiles + the global one = 5 tiles
    "idefics3": ("do_image_splitting=true,longest_edge=112", 4, 20),
}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())  # 512 x 512 RGB, ships with scikit-image (offline)


def image_tokens(vlm, photo) -> int:
    sample = Sample("photo", [Turn("user", "<image>\nWho is this?"), Turn("assistant", "An astronaut.")], [photo])
    batch = vlm.encode([sample])
    config = vlm.model.config
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = config.image_token_index
    hidden = vlm.body_hidden_states(batch)  # the model accepts what the processor wrote (features == tokens)
    assert hidden.shape[1] == batch.input_ids.shape[1]
    return int((batch.input_ids == image_token).sum())


@pytest.mark.parametrize("family", sorted(CASES))
def test_knobs_change_image_tokens_as_documented(family, tiny_checkpoint, photo):
    options, default_tokens, tokens = CASES[family]
    path = tiny_checkpoint(family)
    default = load_vlm(path)
    assert image_tokens(default, photo) == default_tokens
    changed = load_vlm(path, image_options=options)
    assert image_tokens(changed, photo) == tokens
    # Info-style report: every knob, with the new values where given and the checkpoint's own elsewhere
    settings = current_image_settings(changed.adapter, changed.processor, changed.model.config)
    assert set(settings) == {knob.name for knob in changed.adapter.resolution_knobs}
    for name, value in parse_image_options(options).items():
        assert settings[name] == value


def test_no_options_leave_the_checkpoint_untouched(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_vl")
    a, b = load_vlm(path), load_vlm(path, image_options=None)
    assert a.processor.image_processor.to_dict() == b.processor.image_processor.to_dict()
    assert load_vlm(path, image_options="").processor.image_processor.size == a.processor.image_processor.size


def test_onevision_pinpoints_reach_the_model_config_and_the_saved_export(tiny_checkpoint, tmp_path, photo):
    """The model packs features with config.image_grid_pinpoints: it must change with the processor's."""
    vlm = load_vlm(tiny_checkpoint("llava_onevision"), image_options='{"image_grid_pinpoints": [[28, 28], [56, 56]]}')
    assert vlm.model.config.image_grid_pinpoints == [[28, 28], [56, 56]]
    vlm.model.save_pretrained(tmp_path)  # what a stage export writes
    vlm.processor.save_pretrained(tmp_path)
    assert image_tokens(load_vlm(tmp_path), photo) == 24  # the export keeps the resolution it trained at


def test_unknown_knob_lists_the_familys_knobs(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"qwen2_vl: unknown image option\(s\) \['max_patches'\].*min_pixels.*max_pixels"):
        load_vlm(tiny_checkpoint("qwen2_vl"), image_options="max_patches=4")
    with pytest.raises(ValueError, match=r"unknown image option.*max_patches \(int\)"):
        check_image_options(tiny_checkpoint("internvl"), {"max_pixels": 1})


def test_llava_resolution_is_fixed_and_says_why(tiny_checkpoint):
    with pytest.raises(ValueError, match="no image-resolution options: .*position embeddings.*336 px"):
        load_vlm(tiny_checkpoint("llava"), image_options="size=448")


@pytest.mark.parametrize(("family", "options", "message"), [
    ("qwen2_vl", "max_pixels=100", "below one image token .* use at least 784"),
    ("qwen2_vl", "min_pixels=50176", r"min_pixels=50176: 50176 is above max_pixels=12544; lower it .* or raise"),
    ("internvl", "min_patches=3", "above max_patches=2"),
    ("internvl", "max_patches=many", "is not an integer"),
    ("internvl", "max_patches=0", "must be a positive integer"),
    ("idefics3", "longest_edge=100", "not a whole number of 56-px tiles .* e.g. 112"),
    ("idefics3", "do_image_splitting=maybe", "not a boolean: write true or false"),
    ("llava_onevision", '{"image_grid_pinpoints": [[30, 30]]}', "multiple of the 28-px tile"),
    ("llava_onevision", "image_grid_pinpoints=28", "is not a list: give the options as a JSON object"),
    ("llava_onevision", "vision_aspect_ratio=anyres", "write anyres_max_N"),
])
def test_bad_values_say_how_to_fix_them(family, options, message, tiny_checkpoint):
    with pytest.raises(ValueError, match=message):
        load_vlm(tiny_checkpoint(family), image_options=options)


def test_option_text_forms():
    assert parse_image_options("max_pixels=802816, min_pixels=3136") == {"max_pixels": 802816, "min_pixels": 3136}
    assert parse_image_options("vision_aspect_ratio=anyres_max_4,do_image_splitting=false") == {
        "vision_aspect_ratio": "anyres_max_4", "do_image_splitting": False}
    assert parse_image_options('{"image_grid_pinpoints": [[384, 768]]}') == {"image_grid_pinpoints": [[384, 768]]}
    assert parse_image_options(None) is None and parse_image_options(" ") is None
    assert parse_image_options(format_image_options({"max_patches": 6})) == {"max_patches": 6}
    with pytest.raises(ValueError, match="is not KNOB=VALUE"):
        parse_image_options("max_pixels")
    with pytest.raises(ValueError, match="not a valid JSON object"):
        parse_image_options("{max_pixels: 1}")


def test_vllm_arguments_carry_the_same_settings(tiny_checkpoint):
    qwen = load_vlm(tiny_checkpoint("qwen2_vl"), image_options="max_pixels=50176")
    assert vllm_image_arguments(qwen.adapter, qwen.processor, {"max_pixels": 50176}) == {
        "mm_processor_kwargs": {"size": {"shortest_edge": 3136, "longest_edge": 50176}}}
    pinpoints = [[28, 28], [56, 56]]
    onevision = load_vlm(tiny_checkpoint("llava_onevision"), image_options=json.dumps({"image_grid_pinpoints": pinpoints}))
    assert vllm_image_arguments(onevision.adapter, onevision.processor, {"image_grid_pinpoints": pinpoints}) == {
        "mm_processor_kwargs": {"image_grid_pinpoints": pinpoints}, "hf_overrides": {"image_grid_pinpoints": pinpoints}}
    assert vllm_image_arguments(qwen.adapter, qwen.processor, None) == {}
    with pytest.raises(ValueError, match="vLLM backend cannot apply image option.*vision_aspect_ratio.*anyres_max_9"):
        vllm_image_arguments(onevision.adapter, onevision.processor, {"vision_aspect_ratio": "anyres_max_4"})
