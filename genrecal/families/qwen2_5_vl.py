"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout with a windowed-attention SwiGLU ViT.

The chat template, special tokens, processors and text config are Qwen2-VL's (Qwen2.5-VL-Instruct ships the same
template: huggingface/transformers ``tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py``), so the recipe reuses
``qwen_vl_tiny_parts``; only the vision config differs.
"""

from __future__ import annotations

from genrecal.families.base import FamilyAdapter, mrope_position_ids
from genrecal.families.qwen2_vl import RESOLUTION_KNOBS, qwen_vl_tiny_parts
from genrecal.tiny import TinySizes


def tiny_recipe(sizes: TinySizes, tokenizer):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer, processor, text_config, ids = qwen_vl_tiny_parts(
        sizes, tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen2_5_VLProcessor)
    # Windowed attention in every block but the last, which attends fully (the 7B has 7, 15, 23, 31 of 32);
    # a 112-px window covers the whole 56x56 tiny image, as it would a small crop of a real one.
    vision_config = dict(depth=sizes.vision_layers, hidden_size=sizes.vision_hidden_size,
                         intermediate_size=2 * sizes.vision_hidden_size, num_heads=sizes.vision_heads,
                         out_hidden_size=sizes.hidden_size, fullatt_block_indexes=[sizes.vision_layers - 1],
                         window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **ids,
                              architectures=["Qwen2_5_VLForConditionalGeneration"])
    return config, processor


ADAPTER = FamilyAdapter(
    model_type="qwen2_5_vl",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    vision_encoder_prefixes=("model.visual.",),
    projector_prefixes=("model.visual.merger.",),
    body_prefixes=("model.language_model.",),
    end_of_turn="<|im_end|>",
    tiny_recipe=tiny_recipe,
    rotary_position_ids=mrope_position_ids,
    resolution_knobs=RESOLUTION_KNOBS,  # Qwen2-VL's image processor and knobs
)
