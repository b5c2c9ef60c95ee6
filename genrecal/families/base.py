"""The one small interface every model family implements, and the plain functions behind it.

Since transformers 5 the supported VLMs share one layout — ``model.model`` (vision tower, projector, language
model) and ``model.lm_head`` — so a family is mostly data: which module prefixes are the vision encoder and
the projector, which token ends an assistant turn, how the Recalibrator's rotary embedding takes position ids,
and a recipe for a tiny real-format checkpoint. The behaviour lives here, written once.

Answer positions are found by rendering the conversation with the model's own chat template, rendering the
prefix before each answer (``add_generation_prompt=True``) and the text through the answer's end-of-turn
token: the answer span is the token range between the two prefixes. Both prefixes must tokenise to a prefix of
the full sequence; otherwise the answer boundary does not fall on a token boundary and the sample is refused
(never silently misaligned).

**One processor call per batch.** The processor (its image processor is the cost: 2-3 s per photo with
SmolVLM's image splitting) runs once, over the whole batch, in :meth:`FamilyAdapter.encode`. It expands each
image placeholder of the text into the image's tokens and reports where (``return_text_replacement_offsets``,
transformers 5), so each sample's *expanded* text is known; a prefix of it is what the processor would have
tokenised for the prefix with the images before it, so the boundary checks are text-only tokenizer calls
(milliseconds). The expanded text must tokenise to exactly the processor's ids, or the sample falls back to one
processor call per boundary (the old way, same result).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from genrecal.errors import SampleError
from genrecal.families.resolution import ResolutionKnob, apply_image_options
from genrecal.families.special_text import forbidden_sample_text
from genrecal.recalibrator import RecalibratorSpec, identity_position_ids, mrope_position_ids  # noqa: F401
from genrecal.sample import Sample

PARAMETER_GROUPS = ("vision_encoder", "projector", "body", "head")


@dataclass
class EncodedBatch:
    """A batch formatted by one model's processor, right-padded, with each sample's answer spans."""

    sample_ids: list[str]
    inputs: dict[str, torch.Tensor]  # model kwargs: input_ids (B, L), attention_mask (B, L), pixel_values, ...
    answer_spans: list[list[tuple[int, int]]]  # per sample, [start, end) token positions of every answer
    # What the processor was given, per sample: the formatted chat text (with every answer) and the images.
    # A body that runs outside transformers (the teacher's vLLM backend) starts from these.
    texts: list[str] = field(default_factory=list)
    images: list[list] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EncodedBatch:
        moved = {}
        for key, value in self.inputs.items():
            value = value.to(device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            moved[key] = value
        return EncodedBatch(self.sample_ids, moved, self.answer_spans, self.texts, self.images)

    def labels(self, ignore_index: int = -100) -> torch.Tensor:
        """HF-convention labels (B, L): the token id at answer positions, ``ignore_index`` elsewhere."""
        labels = torch.full_like(self.input_ids, ignore_index)
        for i, spans in enumerate(self.answer_spans):
            for start, end in spans:
                labels[i, start:end] = self.input_ids[i, start:end]
        return labels

    def answer_token_ids(self, i: int) -> torch.Tensor:
        """(La,) the answer tokens of sample ``i``, all answers concatenated."""
        return torch.cat([self.input_ids[i, s:e] for s, e in self.answer_spans[i]])

    def answer_mask(self, i: int) -> torch.Tensor:
        """(L,) bool, True at answer-token positions of sample ``i``."""
        mask = torch.zeros(self.input_ids.shape[1], dtype=torch.bool, device=self.input_ids.device)
        for s, e in self.answer_spans[i]:
            mask[s:e] = True
        return mask

    def prediction_positions(self, i: int) -> torch.Tensor:
        """(La,) positions whose hidden state predicts each answer token (the causal shift: ``start-1 .. end-2``)."""
        return torch.cat([torch.arange(s - 1, e - 1) for s, e in self.answer_spans[i]]).to(self.input_ids.device)

    def question_segments(self, i: int) -> list[tuple[int, int]]:
        """[start, end) ranges of the non-answer tokens before each answer (q_0, q_1, ... of the Recalibrator)."""
        segments, cursor = [], 0
        for s, e in self.answer_spans[i]:
            segments.append((cursor, s))
            cursor = e
        return segments


@dataclass
class LoadedVLM:
    """A model, its processor and the family adapter that knows how to use them."""

    model: nn.Module
    processor: object
    adapter: FamilyAdapter

    def encode(self, samples: Sequence[Sample], max_length: int | None = None) -> EncodedBatch:
        return self.adapter.encode(self.processor, samples, max_length=max_length)

    def body_hidden_states(self, batch: EncodedBatch) -> torch.Tensor:
        return self.adapter.body_hidden_states(self.model, batch)

    @property
    def head(self) -> nn.Linear:
        return self.adapter.head(self.model)


@dataclass(frozen=True)
class FamilyAdapter:
    """Everything family-specific about one VLM family. Behaviour is shared (methods below)."""

    model_type: str  # HF config.model_type, also the `genrecal.tiny --family` name
    architectures: tuple[str, ...]  # config.architectures[0] values served by this adapter
    vision_encoder_prefixes: tuple[str, ...]
    projector_prefixes: tuple[str, ...]  # checked before the vision prefixes (a projector may live inside them)
    body_prefixes: tuple[str, ...]
    end_of_turn: str | None  # the token that closes an assistant turn; None -> the tokenizer's eos token
    tiny_recipe: Callable[..., tuple[object, object]]  # (sizes, tokenizer) -> (config, processor)
    rotary_position_ids: Callable[[torch.Tensor], torch.Tensor] = identity_position_ids
    head_prefixes: tuple[str, ...] = ("lm_head",)
    processor_kwargs: dict = field(default_factory=dict)
    text_model_attr: str = "language_model"  # the text decoder's attribute on ``model.model`` (Idefics3: text_model)
    # (old prefix, new prefix) renames `genrecal.tiny` applies to the saved weight names, where transformers'
    # save_pretrained writes other names than the family's published checkpoints hold (and vLLM expects).
    tiny_weight_renames: tuple[tuple[str, str], ...] = ()
    # Image-resolution knobs users may set per side (genrecal.families.resolution); none: resolution_note says why.
    resolution_knobs: tuple[ResolutionKnob, ...] = ()
    resolution_note: str = ""

    # ---- loading -------------------------------------------------------------------------------------
    def load(self, path: str | Path, *, dtype: torch.dtype | None = None, device_map=None,
             image_options: dict | str | None = None) -> LoadedVLM:
        """Load strictly; ``image_options`` sets the family's resolution knobs (default: the checkpoint's own)."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        # The options are checked and applied before the weights load, so a bad one fails in seconds; the model
        # is built from the same config object (a knob the model reads too, e.g. anyres pinpoints, reaches it).
        config = AutoConfig.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "right"
        apply_image_options(self, processor, config, image_options)
        model, info = AutoModelForImageTextToText.from_pretrained(
            path, config=config, dtype=dtype, device_map=device_map, output_loading_info=True
        )
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(f"checkpoint {str(path)!r} does not match its architecture: {problems}")
        model.eval()
        return LoadedVLM(model=model, processor=processor, adapter=self)

    # ---- formatting ----------------------------------------------------------------------------------
    def end_of_turn_token(self, processor) -> str:
        token = self.end_of_turn or processor.tokenizer.eos_token
        if token is None:
            raise ValueError(f"{self.model_type}: the tokenizer has no eos token and the family names no end-of-turn token")
        return token

    def encode(self, processor, samples: Sequence[Sample], *, max_length: int | None = None) -> EncodedBatch:
        """Format samples with this model's chat template and processor; find every answer span."""
        if not samples:
            raise ValueError("encode() needs at least one sample")
        for sample in samples:  # before the template and the processor see it
            reason = forbidden_sample_text(processor, sample)
            if reason is not None:
                raise SampleError(sample.sample_id, reason)
        rendered = [_render(self, processor, sample) for sample in samples]  # text only: no processor call
        texts = [r.text for r in rendered]
        images = [list(s.images) for s in samples]
        inputs = dict(_run_processor(processor, texts, images, self.processor_kwargs))  # the one processor call
        replacements = inputs.pop(REPLACEMENT_OFFSETS, None)  # per sample: where each image was expanded
        if isinstance(replacements, torch.Tensor) or (replacements is not None and len(replacements) != len(samples)):
            # a text-only batch: nothing expanded (a list of empty lists may come back as an empty tensor)
            replacements = [[] for _ in samples] if not any(images) else None
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        spans_per_sample = []
        for i, (sample, formatted, length) in enumerate(zip(samples, rendered, lengths, strict=True)):
            ids = inputs["input_ids"][i, :length].tolist()  # right-padded
            expanded = None if replacements is None else _expanded_text(formatted.text, replacements[i])
            spans = _locate_answers(processor, sample, formatted, ids, expanded)
            if max_length is not None and length > max_length:
                raise SampleError(
                    sample.sample_id,
                    f"{length} tokens exceed max_length={max_length}: the answer would be truncated away; "
                    "raise max_length, shorten the sample or filter it out",
                )
            if spans[-1][1] > length:
                raise SampleError(sample.sample_id, "the answer lies beyond the processed sequence (truncated)")
            spans_per_sample.append(spans)
        return EncodedBatch([s.sample_id for s in samples], inputs, spans_per_sample, texts, images)

    # ---- model parts ---------------------------------------------------------------------------------
    def body_hidden_states(self, model: nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """(B, L, D) the body's output, after its final norm: the exact input of the LM head."""
        outputs = model.model(**batch.inputs, use_cache=False)
        return outputs.last_hidden_state

    def head(self, model: nn.Module) -> nn.Linear:
        return model.get_output_embeddings()

    def text_model(self, model: nn.Module) -> nn.Module:
        return getattr(model.model, self.text_model_attr)

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters by paper part. A tied head appears in both "body" (embeddings) and "head"."""
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in PARAMETER_GROUPS}
        order = (
            ("projector", self.projector_prefixes),
            ("vision_encoder", self.vision_encoder_prefixes),
            ("body", self.body_prefixes),
            ("head", self.head_prefixes),
        )
        for name, param in model.named_parameters(remove_duplicate=False):
            group = next((g for g, prefixes in order if name.startswith(prefixes)), None)
            if group is None:
                raise ValueError(f"{self.model_type}: parameter {name!r} belongs to no parameter group")
            if not any(p is param for p in groups[group]):
                groups[group].append(param)
        head_weight = self.head(model).weight
        if not any(p is head_weight for p in groups["head"]):
            groups["head"].append(head_weight)  # tied embeddings: named once, under the embedding
        return groups

    def recalibrator_spec(self, model: nn.Module):
        """What the Recalibrator is built from: the student's own decoder-layer class, config, rotary and norm."""
        text_model = self.text_model(model)
        return RecalibratorSpec(
            decoder_layer_cls=type(text_model.layers[0]),
            text_config=model.config.get_text_config(),
            rotary_embedding_cls=type(text_model.rotary_emb),
            norm_cls=type(text_model.norm),
            rotary_position_ids=self.rotary_position_ids,
        )


# The processor output that says where each image placeholder was expanded (not a model input).
REPLACEMENT_OFFSETS = "text_replacement_offsets"


def _run_processor(processor, texts: list[str], images: list[list], extra: dict) -> dict:
    kwargs = dict(text=texts, return_tensors="pt", padding=True, **extra)
    if any(images):
        kwargs["images"] = images
    if not _reports_replacements():
        return processor(**kwargs)
    if any(images) and not images[0]:
        # The offsets of a batch led by a text-only sample ([[], [{...}], ...]) look like an array to
        # BatchFeature, and the InternVL and Idefics3 processors convert their output without skipping them:
        # take Python objects and convert here, the offsets left out (the same tensors: tests/genrecal/families).
        from transformers.feature_extraction_utils import BatchFeature

        raw = processor(**{**kwargs, "return_tensors": None}, return_text_replacement_offsets=True)
        return BatchFeature(dict(raw), tensor_type="pt", skip_tensor_conversion=[REPLACEMENT_OFFSETS])
    try:
        return processor(**kwargs, return_text_replacement_offsets=True)
    except ValueError as exc:  # a processor whose output conversion chokes on the offsets: without them
        if REPLACEMENT_OFFSETS not in str(exc):
            raise
        return processor(**kwargs)


def _reports_replacements() -> bool:
    """Whether this transformers' processors take ``return_text_replacement_offsets`` (5.x; not every 5.0)."""
    from transformers.processing_utils import TextKwargs

    return "return_text_replacement_offsets" in TextKwargs.__annotations__


@dataclass(frozen=True)
class _Rendered:
    """A sample rendered by the chat template (text only), with its answers' character boundaries."""

    text: str  # the formatted conversation, end-of-turn tokens inserted where the template leaves them out
    boundaries: list[tuple[int, int]]  # per answer, [start, end) characters in `text`
    image_counts: list[int]  # per answer, the images placed before it


def _render(adapter: FamilyAdapter, processor, sample: Sample) -> _Rendered:
    """Render ``sample`` with the chat template; find each answer's character span in the text."""
    messages = sample.messages()
    eot = adapter.end_of_turn_token(processor)
    rendered = processor.apply_chat_template(messages, tokenize=False)
    # Character boundaries in `rendered`: where each answer starts (right after its generation prompt) and
    # ends (after its end-of-turn token). Templates that leave the end-of-turn token to the tokenizer (e.g.
    # LLaVA-1.5 relies on eos) get it inserted right after the answer, so the model learns to stop.
    boundaries: list[tuple[int, int]] = []
    insertions: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        through = processor.apply_chat_template(messages[: k + 1], tokenize=False)
        if not rendered.startswith(prompt) or not through.startswith(prompt):
            raise SampleError(
                sample.sample_id,
                f"the chat template renders turn {k}'s generation prompt differently from the full conversation; "
                "this template cannot be split into question and answer",
            )
        answer = message["content"][0]["text"].strip()
        found = rendered.find(answer, len(prompt))
        if found < 0 or found >= len(through):
            raise SampleError(sample.sample_id, f"answer of turn {k} is not in the rendered conversation")
        after = found + len(answer)
        eot_at = rendered.find(eot, after)
        if eot_at >= 0 and not rendered[after:eot_at].strip() and eot_at + len(eot) <= len(through):
            boundaries.append((len(prompt), eot_at + len(eot)))
        else:
            insertions.append(after)
            boundaries.append((len(prompt), after))

    def shifted(pos: int) -> int:  # position in the text after the end-of-turn insertions before `pos`
        return pos + len(eot) * sum(1 for at in insertions if at < pos)

    full = rendered
    for at in sorted(insertions, reverse=True):
        full = full[:at] + eot + full[at:]
    boundaries = [
        (shifted(start), shifted(end) + (len(eot) if end in insertions else 0)) for start, end in boundaries
    ]

    images_seen = 0
    image_counts = []  # images rendered before each boundary
    for message in messages:
        images_seen += sum(1 for c in message["content"] if c.get("type") == "image")
        if message["role"] == "assistant":
            image_counts.append(images_seen)
    return _Rendered(full, boundaries, image_counts)


@dataclass(frozen=True)
class _Expanded:
    """A formatted text with its image placeholders replaced as the processor replaced them."""

    text: str
    replaced: list[tuple[int, int, int]]  # (start, end) of each placeholder in the formatted text, its growth

    def position(self, char: int) -> int:
        """Where character ``char`` of the formatted text (not inside a placeholder) is in the expanded text."""
        return char + sum(growth for _, end, growth in self.replaced if end <= char)


def _expanded_text(text: str, replacements: list[dict]) -> _Expanded:
    """``text`` with each placeholder ``span`` replaced by its ``replacement`` (the processor's offsets)."""
    pieces, cursor, replaced = [], 0, []
    for item in sorted(replacements, key=lambda r: r["span"][0]):
        start, end = item["span"]
        pieces += [text[cursor:start], item["replacement"]]
        replaced.append((start, end, len(item["replacement"]) - (end - start)))
        cursor = end
    pieces.append(text[cursor:])
    return _Expanded("".join(pieces), replaced)


def _locate_answers(processor, sample: Sample, rendered: _Rendered, ids: list[int],
                    expanded: _Expanded | None) -> list[tuple[int, int]]:
    """Token spans of ``rendered``'s answers in ``ids`` (the processor's ids for ``rendered.text``).

    With ``expanded`` (the processor reported its image expansions) the boundaries are found with text-only
    tokenizer calls on prefixes of the expanded text; without it, or if the expanded text does not tokenise to
    ``ids``, with one processor call per boundary (prefix text and the images before it).
    """
    tokenizer = processor.tokenizer
    if expanded is not None and tokenizer(expanded.text)["input_ids"] != ids:
        expanded = None  # the processor did more than expand placeholders: take the slow, sure way
    spans = []
    for (start_char, end_char), n_images in zip(rendered.boundaries, rendered.image_counts, strict=True):
        if expanded is not None:
            start, end = (
                _prefix_length(ids, len(expanded.text), expanded.position(char), sample.sample_id,
                               lambda pos: tokenizer(expanded.text[:pos])["input_ids"])
                for char in (start_char, end_char)
            )
        else:
            images = sample.images[:n_images]
            start, end = (
                _prefix_length(ids, len(rendered.text), char, sample.sample_id,
                               lambda pos, images=images: _token_ids(processor, rendered.text[:pos], images))
                for char in (start_char, end_char)
            )
        if end <= start:
            raise SampleError(sample.sample_id, "an answer tokenises to no tokens")
        if start == 0:
            raise SampleError(sample.sample_id, "an answer starts at position 0: nothing predicts its first token")
        spans.append((start, end))
    return spans


def _token_ids(processor, text: str, images: list) -> list[int]:
    kwargs = dict(text=[text], return_tensors="pt")
    if images:
        kwargs["images"] = [list(images)]
    return processor(**kwargs)["input_ids"][0].tolist()


def _prefix_length(full_ids: list[int], full_chars: int, char_end: int, sample_id: str,
                   tokenize: Callable[[int], list[int]]) -> int:
    """Number of tokens of the text's first ``char_end`` characters (``tokenize(char_end)``, ``full_chars`` the
    whole text's length); they must be a prefix of ``full_ids``."""
    if char_end == full_chars:
        return len(full_ids)
    ids = tokenize(char_end)
    if full_ids[: len(ids)] != ids:
        raise SampleError(
            sample_id,
            "an answer boundary does not fall on a token boundary of the formatted conversation "
            f"(prefix of {len(ids)} tokens differs from the full sequence)",
        )
    return len(ids)
