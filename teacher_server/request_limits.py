"""How much work one request may ask for: the per-request limits, each a flag, all reported by Info.

One request must not buy seconds of every other client's time: formatting (chat template + tokenizer) runs under
the engine's shared format lock, and Score runs on the one device thread. Measured on the 2-core CI machine
(tiny teacher): 4 MB of turn text tokenized for 34 s; a Score of thousands of paths over one small tensor ran
for 34 s. So, before any formatting or device work:

- ``max_encode_samples`` samples per Encode, ``max_score_items`` items and ``max_score_paths`` distinct paths
  per Score: RESOURCE_EXHAUSTED (split the request);
- ``max_text_bytes`` of turn text (UTF-8, all turns) and ``max_turns`` turns per sample: INVALID_ARGUMENT naming
  the sample (it cannot be split: shorten it or skip it). The text limit also bounds tokenization: the default
  (64 KiB, ~16k English tokens, the default ``max_batch_tokens``) formats in well under a second.

Every check is linear in the request's size (duplicate sample ids: a set, not ``list.count``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from genrecal.errors import SampleError
from genrecal.rpc.convert import clip
from teacher_server.errors import ResourceExhausted

KIB = 1 << 10


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits (``python -m teacher_server --help``: "limits per request")."""

    max_encode_samples: int = 256  # samples in one Encode request
    max_text_bytes: int = 64 * KIB  # UTF-8 bytes of one sample's turn text, all turns together
    max_turns: int = 64  # turns of one sample (user + assistant + system)
    max_score_items: int = 4096  # (handle, path, outputs) items in one Score request
    max_score_paths: int = 8  # distinct Recalibrator paths ("L1", "L2", ...) in one Score request

    def __post_init__(self) -> None:
        for name in ("max_encode_samples", "max_text_bytes", "max_turns", "max_score_items", "max_score_paths"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def check_encode(self, samples: Sequence) -> None:
        """ResourceExhausted for too many samples; SampleError for a sample with too much text or too many turns."""
        if len(samples) > self.max_encode_samples:
            raise ResourceExhausted(
                f"this Encode has {len(samples)} samples, more than this teacher's limit of {self.max_encode_samples} "
                "per request (--max-encode-samples, in Info); split it"
            )
        for sample in samples:
            turns = getattr(sample, "turns", None)
            if turns is None:
                continue  # not a Sample: the engine refuses it with its own message
            if len(turns) > self.max_turns:
                raise SampleError(sample.sample_id, f"{len(turns)} turns, more than this teacher's limit of "
                                                    f"{self.max_turns} per sample (--max-turns); shorten or skip it")
            nbytes = sum(len(turn.text.encode()) for turn in turns)
            if nbytes > self.max_text_bytes:
                raise SampleError(sample.sample_id, f"{nbytes} bytes of turn text, more than this teacher's limit of "
                                                    f"{self.max_text_bytes} per sample (--max-text-bytes); shorten "
                                                    "or skip it")

    def check_score(self, items: Sequence) -> None:
        """ResourceExhausted for too many items or distinct paths (items are (handle, path, outputs))."""
        if len(items) > self.max_score_items:
            raise ResourceExhausted(
                f"this Score has {len(items)} items, more than this teacher's limit of {self.max_score_items} per "
                "request (--max-score-items, in Info); split it"
            )
        paths = set()
        for item in items:
            path = item[1] if isinstance(item, tuple | list) and len(item) == 3 else None
            paths.add(path if isinstance(path, str) else None)
            if len(paths) > self.max_score_paths:
                raise ResourceExhausted(
                    f"this Score has more than {self.max_score_paths} distinct paths (the limit, --max-score-paths, "
                    f"in Info; e.g. {clip(str(path))!r}); score at most that many Recalibrator paths per request"
                )
