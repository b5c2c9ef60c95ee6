"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT, 2-layer MLP projector, Llama text model.

The template closes no assistant turn itself ("USER: <image>\\nQ ASSISTANT: A USER: ..."): LLaVA-1.5 was
trained with ``</s>`` after each answer, so ``end_of_turn`` is None and the encoder inserts the tokenizer's eos.
"""

from __future__ import annotations

from genrecal.families.base import FamilyAdapter
from genrecal.tiny import TinySizes, add_family_tokens, text_config_kwargs

# llava-hf/llava-1.5-7b-hf's chat template, verbatim, as embedded in huggingface/transformers
# tests/models/llava/test_processor_llava.py (LlavaProcessorTest.prepare_processor_dict).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<image>", "<pad>"]  # llava-hf adds both to the Vicuna tokenizer (ids 32000, 32001)
PATCH_SIZE = 14


def tiny_recipe(sizes: TinySizes, tokenizer):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    tokenizer = add_family_tokens(tokenizer, SPECIAL_TOKENS, pad="<pad>")  # eos stays the base tokenizer's
    side = sizes.image_size  # CLIP resize + centre crop to side x side: (side / 14)^2 image tokens (28 -> 4)
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    # "default" drops CLIP's CLS token: the processor counts it (+1) and then removes it, as llava-hf does.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    text_config = text_config_kwargs(sizes, tokenizer, model_type="llama")
    vision_config = dict(
        model_type="clip_vision_model", hidden_size=sizes.vision_hidden_size,
        intermediate_size=4 * sizes.vision_hidden_size, num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads, image_size=side, patch_size=PATCH_SIZE,
        projection_dim=sizes.vision_hidden_size,
    )
    config = LlavaConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=(side // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        architectures=["LlavaForConditionalGeneration"],
    )
    return config, processor


ADAPTER = FamilyAdapter(
    model_type="llava",
    architectures=("LlavaForConditionalGeneration",),
    vision_encoder_prefixes=("model.vision_tower.",),
    projector_prefixes=("model.multi_modal_projector.",),
    body_prefixes=("model.language_model.",),
    end_of_turn=None,  # the template relies on the tokenizer's eos
    tiny_recipe=tiny_recipe,
    # Published checkpoints (llava-hf/*) keep the vision model's own prefix: `vision_tower.vision_model.*`;
    # transformers 5.20 saves `vision_tower.*` and vLLM 0.32 loads only the former.
    tiny_weight_renames=(("vision_tower.", "vision_tower.vision_model."),),
    resolution_note=(
        "LLaVA-1.5's CLIP tower has position embeddings learned for one input size (vision_config.image_size: "
        "336 px in llava-1.5-*-hf, 24 x 24 = 576 image tokens), and the processor resizes every image's shortest "
        "edge to it and centre-crops a square, so the checkpoint fixes the resolution. A different size/crop_size "
        "would feed the tower inputs its embeddings do not cover (transformers refuses them); for more image "
        "detail use a family with tiling (LLaVA-OneVision, InternVL, Idefics3) or dynamic resolution (Qwen2-VL)"
    ),
)
