"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, 2-layer MLP projector, Qwen2 LM,
AnyRes tiling (a base view plus grid tiles, unpadded, with a learned ``image_newline`` after each feature row)."""

from __future__ import annotations

from genrecal.families.base import FamilyAdapter
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
)
