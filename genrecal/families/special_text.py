"""Text that would forge the chat format: a family's special and control tokens inside a turn's text.

A turn whose text holds ``<|im_end|>`` / ``<|im_start|>`` forges turns in the rendered template, and one holding
an image placeholder or vision-start token (``<|image_pad|>``, ``<|vision_start|>``, ``<IMG_CONTEXT>``, ...)
desynchronises the processor's image expansion (Qwen2-VL's processor then fails with StopIteration). Both the
teacher server (which refuses such a sample with INVALID_ARGUMENT naming the token) and the trainer (which skips
such a record with the same reason: a real data set may hold them by accident) call :func:`forbidden_text`.

The project's own image marker ``<image>`` (``genrecal.sample.IMAGE_PLACEHOLDER``) stays legal in user turns:
``Sample`` checks that their count matches the images, and the adapters replace them before the template runs.

Cost: one compiled alternation of the tokenizer's special strings per tokenizer (cached), one regex scan per
text: linear in the text's length (the teacher bounds it with ``--max-text-bytes``).
"""

from __future__ import annotations

import re
import weakref

from genrecal.sample import IMAGE_PLACEHOLDER, Sample

# processor attributes that name special strings on some families (most are also added tokens)
PROCESSOR_TOKEN_ATTRIBUTES = ("image_token", "video_token", "fake_image_token", "global_image_token",
                              "image_start_token", "image_end_token", "start_image_token", "end_image_token")

_patterns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def special_strings(processor) -> set[str]:
    """Every special or control string of ``processor``'s tokenizer and processor, except ``<image>``.

    Added tokens count when they are special or look like markup (``<...>``); plain added words do not."""
    tokenizer = getattr(processor, "tokenizer", processor)
    strings = {t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str)}
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        content = getattr(token, "content", str(token))
        if getattr(token, "special", False) or (content.startswith("<") and content.endswith(">")):
            strings.add(content)
    for name in PROCESSOR_TOKEN_ATTRIBUTES:
        value = getattr(processor, name, None)
        if isinstance(value, str):
            strings.add(value)
    strings.discard(IMAGE_PLACEHOLDER)
    return {s for s in strings if s.strip()}


def _pattern(processor) -> re.Pattern | None:
    try:
        return _patterns[processor]
    except (KeyError, TypeError):
        pass
    strings = sorted(special_strings(processor), key=len, reverse=True)  # longest first: name the whole token
    pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
    try:
        _patterns[processor] = pattern
    except TypeError:  # not weak-referenceable: no cache
        pass
    return pattern


def forbidden_text(processor, text: str) -> str | None:
    """The first special / control token of ``processor``'s family found in ``text``, or None if there is none."""
    pattern = _pattern(processor)
    if pattern is None:
        return None
    found = pattern.search(text)
    return found.group(0) if found is not None else None


def forbidden_sample_text(processor, sample: Sample) -> str | None:
    """Why ``sample`` cannot be formatted for this family (a turn holds a special token), or None.

    The reason names the turn and the token, e.g. ``turn 0 (user) contains the special token '<|im_end|>'``."""
    for i, turn in enumerate(sample.turns):
        token = forbidden_text(processor, turn.text)
        if token is not None:
            return (f"turn {i} ({turn.role}) contains the special token {token!r} of this model's chat format "
                    "(it would forge turns or image slots); remove it from the text or skip the record")
    return None
