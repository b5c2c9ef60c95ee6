"""InternVL2.5 / InternVL3 ``-hf`` (``InternVLForConditionalGeneration``): InternViT, pixel-shuffle MLP, Qwen2.

Images are cut into fixed-size tiles (GotOcr2 "crop to patches", plus a thumbnail when there are several);
each tile becomes ``<img>`` + ``image_seq_length`` ``<IMG_CONTEXT>`` tokens + ``</img>``.
"""

from __future__ import annotations

from genrecal.families.base import FamilyAdapter
from genrecal.families.resolution import ResolutionKnob, at_least, at_most
from genrecal.tiny import TinySizes, add_family_tokens, text_config_kwargs

# The chat template of the InternVL3 -hf checkpoints (chat_template.jinja, 481 bytes, e.g. OpenGVLab/InternVL3-14B-hf),
# as written by huggingface/transformers src/transformers/models/internvl/convert_internvl_weights_to_hf.py.
# No default system prompt; images render as <IMG_CONTEXT>, which the processor expands to <img>...</img>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5's chat markers, then InternVL3-hf's added tokens in their order (<video> last, after </box>).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]
# Named tokens InternVLProcessor reads from the tokenizer (saved in tokenizer_config.json).
PROCESSOR_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                    "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
# A tile is 2 x TinySizes.image_size px: the default 28 -> 56 px, 14-px patches -> 4x4, pixel-shuffled by 0.5 ->
# 2x2 = 4 <IMG_CONTEXT> tokens per tile; 42 -> 84 px -> 9 tokens. (Real InternVL3 tiles are 448 px, 14-px patches,
# ratio 0.5.) TinySizes.vision_patch_size / pixel_shuffle_ratio override the two: 56 px, 7-px patches -> 8x8,
# shuffled by 0.25 -> 2x2 = 4 tokens, each merging 16 patches.
PATCH = 14
DOWNSAMPLE_RATIO = 0.5

# The tile grid is GotOcr2ImageProcessor's: the grid (cols x rows, min_patches <= cols x rows <= max_patches)
# closest to the image's aspect ratio, each tile `size` px (448 for InternVL2.5/3, the vision tower's fixed input),
# plus a thumbnail of the whole image when there is more than one tile; every tile is image_seq_length tokens
# (256 for InternVL3). The tile size itself is the vision tower's and is not a knob. Nor is the image
# processor's crop_to_patches: InternVLProcessor passes crop_to_patches=True with every call, whatever the image
# processor holds; max_patches=1 is what crop_to_patches=False would be (the whole image squashed into one tile).
RESOLUTION_KNOBS = (
    ResolutionKnob(
        "max_patches", int, ("image_processor.max_patches",),
        "most tiles an image is cut into, plus a thumbnail when it is more than one; each tile is "
        "image_seq_length tokens (InternVL3-hf: 12 tiles of 448 px, 256 tokens each: up to 3328 tokens; "
        "1 = the whole image in one tile)",
        at_least("min_patches"),
    ),
    ResolutionKnob(
        "min_patches", int, ("image_processor.min_patches",),
        "fewest tiles an image is cut into (InternVL3-hf: 1)", at_most("max_patches"),
    ),
)


def tiny_recipe(sizes: TinySizes, tokenizer):
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
        Qwen2Config,
    )

    tokenizer = add_family_tokens(tokenizer, SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")
    tokenizer._set_model_specific_special_tokens(PROCESSOR_TOKENS)  # no public setter for named extra tokens
    side = 2 * sizes.image_size
    patch = sizes.vision_patch_size or PATCH
    ratio = sizes.pixel_shuffle_ratio or DOWNSAMPLE_RATIO
    group = round(1 / ratio)
    if abs(group * ratio - 1) > 1e-9 or side % (group * patch):
        raise ValueError(f"an InternVL tile (2 x image_size = {side} px) must be a multiple of {group * patch} px "
                         f"(whole {group}x{group} pixel-shuffle groups of {patch}-px patches, pixel_shuffle_ratio = "
                         f"1/{group}); got image_size={sizes.image_size}, pixel_shuffle_ratio={ratio}")
    tile = {"height": side, "width": side}
    mean_std = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    # Up to 2 tiles (+ a thumbnail); a square image is a single tile.
    image_processor = GotOcr2ImageProcessor(size=tile, crop_to_patches=True, min_patches=1, max_patches=2, **mean_std)
    video_processor = InternVLVideoProcessor(size=tile, **mean_std)
    image_seq_length = (side // patch // group) ** 2
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                  image_seq_length=image_seq_length, chat_template=CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    text_config = Qwen2Config(
        **text_config_kwargs(sizes, tokenizer, bos="<|endoftext|>", eos="<|im_end|>", tie_word_embeddings=True)
    )
    vision_config = dict(hidden_size=sizes.vision_hidden_size, num_hidden_layers=sizes.vision_layers,
                         num_attention_heads=sizes.vision_heads, intermediate_size=2 * sizes.vision_hidden_size,
                         image_size=side, patch_size=patch)
    config = InternVLConfig(text_config=text_config, vision_config=vision_config, image_token_id=ids("<IMG_CONTEXT>"),
                            image_seq_length=image_seq_length, downsample_ratio=ratio,
                            architectures=["InternVLForConditionalGeneration"])
    return config, processor


ADAPTER = FamilyAdapter(
    model_type="internvl",
    architectures=("InternVLForConditionalGeneration",),
    vision_encoder_prefixes=("model.vision_tower.",),
    projector_prefixes=("model.multi_modal_projector.",),
    body_prefixes=("model.language_model.",),
    end_of_turn="<|im_end|>",
    tiny_recipe=tiny_recipe,
    processor_kwargs={"padding_side": "right"},  # InternVLProcessor pads left by default; spans assume right
    resolution_knobs=RESOLUTION_KNOBS,
)
