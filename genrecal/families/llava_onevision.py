"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, 2-layer MLP projector, Qwen2 LM,
AnyRes tiling (a base view plus grid tiles, unpadded, with a learned ``image_newline`` after each feature row)."""

from __future__ import annotations

import re

from genrecal.families.base import FamilyAdapter
from genrecal.families.resolution import ResolutionKnob
from genrecal.tiny import TinySizes, add_family_tokens, text_config_kwargs

# The template the llava-hf/llava-onevision-qwen2-*-hf checkpoints ship, verbatim from huggingface/transformers
# src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py (no default system prompt;
# images, then videos, then text in each turn; the assistant text wrapped in {% generation %}).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]



def _pinpoints(value, settings, processor, config) -> None:
    tile = processor.image_processor.size["height"]
    if not value or any(
        len(p) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < tile or x % tile for x in p)
        for p in value
    ):
        raise ValueError(
            f"LLaVA-OneVision image_grid_pinpoints={value!r}: give a non-empty list of [height, width] pairs, each a "
            f"positive multiple of the {tile}-px tile (the vision tower's input), e.g. [[{tile}, {tile}], "
            f"[{tile}, {2 * tile}], [{2 * tile}, {tile}], [{2 * tile}, {2 * tile}]] for grids up to 2 x 2 tiles"
        )


def _aspect_ratio(value, settings, processor, config) -> None:
    if not re.fullmatch(r"anyres_max_[1-9][0-9]*", value):
        raise ValueError(f"LLaVA-OneVision vision_aspect_ratio={value!r}: write anyres_max_N, N the most tiles' worth "
                         "of grid features kept (the published checkpoints: anyres_max_9)")


# AnyRes: the image is fitted to the best grid among image_grid_pinpoints (each [height, width] a multiple of the
# 384-px tile), cut into its tiles, plus the whole image as a base tile: 729 features per tile (27 x 27 SigLIP
# patches), the grid's features unpadded to the image's aspect ratio, one image_newline per feature row, and
# downsampled when they exceed vision_aspect_ratio's anyres_max_N tiles' worth. The model reads both settings
# from its config when it packs the features, so both are written to the processor and to the model config.
RESOLUTION_KNOBS = (
    ResolutionKnob(
        "image_grid_pinpoints", list, ("image_processor.image_grid_pinpoints", "config.image_grid_pinpoints"),
        "the [height, width] grids an image may be fitted to, multiples of the 384-px tile (llava-onevision-*-hf: "
        "every grid from 1 x 1 to 6 x 6 tiles, up to 2304 x 2304 px); fewer/smaller grids = fewer tokens",
        _pinpoints,
    ),
    ResolutionKnob(
        "vision_aspect_ratio", str, ("processor.vision_aspect_ratio", "config.vision_aspect_ratio"),
        "anyres_max_N: grid features beyond N tiles' worth (N x 729) are downsampled (llava-onevision-*-hf: "
        "anyres_max_9)",
        _aspect_ratio,
        vllm_unsupported="vLLM 0.32's LLaVA-OneVision packs features with anyres_max_9 fixed in its code, whatever "
                         "the config says",
    ),
)

def tiny_recipe(sizes: TinySizes, tokenizer):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = add_family_tokens(tokenizer, SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")
    side, patch = sizes.image_size, 14  # tiles of `side` px (the SigLIP input), `(side/patch)^2` features each
    tile = {"height": side, "width": side}
    # One grid pinpoint (the real ones go up to 6x6 tiles of 384 px): every image becomes the base view plus one
    # tile; with 28-px tiles a 64x64 image is 4 base + 2x2 tile + 2 newline = 10 image tokens.
    pinpoints = [[side, side]]
    image_processor = LlavaOnevisionImageProcessor(size=tile, image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size=tile)
    # SigLIP has no CLS token, so the real checkpoints keep every patch feature ("full").
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, num_image_tokens=(side // patch) ** 2,
                                        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)
    text_config = text_config_kwargs(
        sizes, tokenizer, bos="<|endoftext|>", eos="<|im_end|>", model_type="qwen2",
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    vision_config = dict(
        model_type="siglip_vision_model", hidden_size=sizes.vision_hidden_size,
        intermediate_size=2 * sizes.vision_hidden_size, num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads, image_size=side, patch_size=patch, vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )
    return config, processor


ADAPTER = FamilyAdapter(
    model_type="llava_onevision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    vision_encoder_prefixes=("model.vision_tower.",),
    # image_newline is a learned text-space embedding appended by the AnyRes packing: it trains with the projector.
    projector_prefixes=("model.multi_modal_projector.", "model.image_newline"),
    body_prefixes=("model.language_model.",),
    end_of_turn="<|im_end|>",
    tiny_recipe=tiny_recipe,
    # Published checkpoints (llava-hf/*) keep the vision model's own prefix: `vision_tower.vision_model.*`;
    # transformers 5.20 saves `vision_tower.*` and vLLM 0.32 loads only the former.
    tiny_weight_renames=(("vision_tower.", "vision_tower.vision_model."),),
    resolution_knobs=RESOLUTION_KNOBS,
)
