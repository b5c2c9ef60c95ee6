"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): dynamic-resolution ViT, 2x2 patch merger, M-RoPE."""

from __future__ import annotations

from genrecal.families.base import FamilyAdapter, mrope_position_ids
from genrecal.families.resolution import ResolutionKnob, all_of, at_least, at_most
from genrecal.tiny import TinySizes, add_family_tokens, text_config_kwargs

# Qwen2-VL-Instruct's chat template (system prompt added when absent; images as vision_start/pad/end).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]



def _whole_blocks(value, settings, processor, config) -> None:
    """A pixel budget below one merged block (28 x 28 px) cannot hold a single image token."""
    image_processor = processor.image_processor
    block = image_processor.patch_size * image_processor.merge_size
    if value < block * block:
        raise ValueError(f"a Qwen-VL pixel budget of {value} is below one image token ({block} x {block} = "
                         f"{block * block} px); use at least {block * block}")


# Qwen2-VL / Qwen2.5-VL resize every image to h x w, multiples of 28 px (14-px patches merged 2 x 2), with
# min_pixels <= h x w <= max_pixels, keeping its aspect ratio; every 28 x 28 block is one image token. The
# processor JSON names them min_pixels / max_pixels; transformers 5 keeps them as size["shortest_edge"] /
# size["longest_edge"] (pixel counts, not edges), which is where they are written.
RESOLUTION_KNOBS = (
    ResolutionKnob(
        "min_pixels", int, ("image_processor.size.shortest_edge",),
        "fewest pixels (h x w) an image is resized to; smaller images are scaled up (Qwen2-VL-2B-Instruct: 3136 "
        "= 4 image tokens)",
        all_of(_whole_blocks, at_most("max_pixels")),
    ),
    ResolutionKnob(
        "max_pixels", int, ("image_processor.size.longest_edge",),
        "most pixels (h x w) an image is resized to; larger images are scaled down; image tokens ~ h x w / 784 "
        "(Qwen2-VL-2B-Instruct: 12845056 = up to 16384 tokens; 802816 caps an image at 1024 tokens)",
        all_of(_whole_blocks, at_least("min_pixels")),
    ),
)

def qwen_vl_tiny_parts(sizes: TinySizes, tokenizer, image_processor_cls, video_processor_cls, processor_cls):
    """Tokenizer, processor and the text/vision config dicts shared by the Qwen2-VL and Qwen2.5-VL recipes."""
    tokenizer = add_family_tokens(tokenizer, SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")
    # 14-px patches merged 2x2: a 56x56 image becomes 2x2 = 4 image tokens.
    pixels = dict(min_pixels=56 * 56, max_pixels=56 * 56 * 4)
    image_processor = image_processor_cls(**pixels, size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 4})
    video_processor = video_processor_cls(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 4})
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    rotary_half = sizes.head_dim // 2
    section = [rotary_half - 2 * (rotary_half // 3), rotary_half // 3, rotary_half // 3]  # t, h, w
    text_config = text_config_kwargs(
        sizes, tokenizer, bos="<|endoftext|>", eos="<|im_end|>",
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return tokenizer, processor, text_config, ids


def tiny_recipe(sizes: TinySizes, tokenizer):
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer, processor, text_config, ids = qwen_vl_tiny_parts(
        sizes, tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen2VLProcessor)
    vision_config = dict(depth=sizes.vision_layers, embed_dim=sizes.vision_hidden_size,
                         hidden_size=sizes.hidden_size, num_heads=sizes.vision_heads, mlp_ratio=2,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **ids,
                           architectures=["Qwen2VLForConditionalGeneration"])
    return config, processor


ADAPTER = FamilyAdapter(
    model_type="qwen2_vl",
    architectures=("Qwen2VLForConditionalGeneration",),
    vision_encoder_prefixes=("model.visual.",),
    projector_prefixes=("model.visual.merger.",),
    body_prefixes=("model.language_model.",),
    end_of_turn="<|im_end|>",
    tiny_recipe=tiny_recipe,
    rotary_position_ids=mrope_position_ids,
    resolution_knobs=RESOLUTION_KNOBS,
)
