"""Idefics3 / SmolVLM (``Idefics3ForConditionalGeneration``): SigLIP-style ViT, pixel-shuffle connector, Llama text model.

Each image becomes ``<fake_token_around_image><global-img><image>*image_seq_len<fake_token_around_image>``
(image splitting off: no ``<row_i_col_j>`` tiles); ``<end_of_utterance>`` closes every turn.
"""

from __future__ import annotations

from genrecal.families.base import FamilyAdapter
from genrecal.families.resolution import ResolutionKnob
from genrecal.tiny import TinySizes, add_family_tokens, text_config_kwargs

# HuggingFaceTB/SmolVLM-Instruct's chat template (Idefics3 architecture), verbatim, as embedded in
# huggingface/transformers tests/models/smolvlm/test_processor_smolvlm.py (prepare_processor_dict). It writes the
# bos token <|im_start|> itself; the tokenizer adds none. (Idefics3-8B-Llama3 ships the same template with
# <|begin_of_text|> in its place.)
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
                  "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
PATCH_SIZE = 14
SCALE_FACTOR = 2  # the connector's pixel shuffle folds SCALE_FACTOR^2 patches into one image token



def _whole_tiles(value, settings, processor, config) -> None:
    """With splitting, the image is resized up to whole tiles anyway: say the tile so the edge is chosen knowingly."""
    tile = processor.image_processor.max_image_size["longest_edge"]
    if value % tile:
        raise ValueError(f"Idefics3 longest_edge={value} is not a whole number of {tile}-px tiles (max_image_size, "
                         f"the vision tower's input); use a multiple of {tile}, e.g. {tile * max(1, round(value / tile))}")


# With do_image_splitting the image is resized so its longest edge is size["longest_edge"], rounded up to whole
# tiles of max_image_size px, cut into rows x cols tiles, plus the whole image as one more tile; each tile is
# image_seq_len tokens (SmolVLM-256M: 512-px tiles of 64 tokens, longest_edge 2048: up to 4 x 4 + 1 tiles).
# Without splitting every image is squashed into one tile. max_image_size (the tile) is the vision tower's
# input size and image_seq_len follows from it: neither is a knob.
RESOLUTION_KNOBS = (
    ResolutionKnob(
        "do_image_splitting", bool, ("image_processor.do_image_splitting",),
        "cut images into tiles of max_image_size px plus a global view (true) or squash each into one tile "
        "(false) (SmolVLM / Idefics3 checkpoints: true)",
    ),
    ResolutionKnob(
        "longest_edge", int, ("image_processor.size.longest_edge",),
        "with splitting, the longest edge images are resized to before tiling, a multiple of the tile "
        "(SmolVLM-256M: 2048 = up to 4 x 4 tiles of 512 px; Idefics3-8B: 1456 = 4 x 364)",
        _whole_tiles,
    ),
)

def tiny_recipe(sizes: TinySizes, tokenizer):
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    tokenizer = add_family_tokens(tokenizer, SPECIAL_TOKENS, eos="<end_of_utterance>", pad="<|im_end|>")
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.add_bos_token = False  # the template writes the bos token, as with SmolVLM's tokenizer
    # Images are squashed to side x side (no splitting): (side / 14 / 2)^2 image tokens (56 -> 4).
    side = sizes.image_size * SCALE_FACTOR
    image_seq_len = (side // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": side},
                                             max_image_size={"longest_edge": side})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                  chat_template=CHAT_TEMPLATE)
    text_config = text_config_kwargs(sizes, tokenizer, model_type="llama")
    vision_config = dict(hidden_size=sizes.vision_hidden_size, intermediate_size=4 * sizes.vision_hidden_size,
                         num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                         image_size=side, patch_size=PATCH_SIZE)
    config = Idefics3Config(
        text_config=text_config, vision_config=vision_config, scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        architectures=["Idefics3ForConditionalGeneration"],
    )
    return config, processor


ADAPTER = FamilyAdapter(
    model_type="idefics3",
    architectures=("Idefics3ForConditionalGeneration",),
    vision_encoder_prefixes=("model.vision_model.",),
    projector_prefixes=("model.connector.",),
    body_prefixes=("model.text_model.",),
    end_of_turn="<end_of_utterance>",
    tiny_recipe=tiny_recipe,
    text_model_attr="text_model",
    resolution_knobs=RESOLUTION_KNOBS,
)
