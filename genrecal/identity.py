"""What a teacher is: content fingerprints of a checkpoint and its tokenizer, and the identity a run records.

The teacher service reports these in ``Info``; the in-process teacher computes the same, so a run started
against one is recognised (or refused) against the other.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

# Files whose content decides how a sample is formatted and tokenised (besides config.json and the weights).
_TOKENIZER_GLOBS = (
    "tokenizer*.json",
    "tokenizer.model",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
)
_WEIGHT_SAMPLES = 8  # windows of the weight data hashed per safetensors file
_WEIGHT_SAMPLE_BYTES = 4096


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over config.json, the tokenizer/processor files and the weights' safetensors headers.

    A safetensors header (names, dtypes, shapes, offsets) does not change when only the weights' values do
    (two fine-tunes of one base), so a few fixed windows of each file's data are hashed as well; the weights
    themselves are never read in full (a 72B checkpoint is ~150 GB). Cheap: a few KiB per file.
    """
    path = Path(path)
    digest = hashlib.sha256()

    def add(name: str, data: bytes) -> None:
        digest.update(name.encode() + b"\0" + struct.pack("<Q", len(data)) + data)

    add("config.json", (path / "config.json").read_bytes())
    tokenizer_files = sorted({p for pattern in _TOKENIZER_GLOBS for p in path.glob(pattern) if p.is_file()})
    for file in tokenizer_files:
        add(file.name, file.read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        header, samples = _safetensors_header_and_samples(file)
        add(file.name + ":header", header)
        add(file.name + ":samples", samples)
    return "sha256:" + digest.hexdigest()


def _safetensors_header_and_samples(file: Path) -> tuple[bytes, bytes]:
    """The JSON header of a safetensors file and ``_WEIGHT_SAMPLES`` evenly spaced windows of its data."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{str(file)!r} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise ValueError(f"{str(file)!r} is not a safetensors file (header length {header_len} > file size)")
        header = f.read(header_len)
        try:
            json.loads(header)
        except ValueError as exc:
            raise ValueError(f"{str(file)!r} has a corrupt safetensors header ({exc})") from exc
        data_start, data_len = 8 + header_len, size - 8 - header_len
        samples = []
        for k in range(_WEIGHT_SAMPLES):
            f.seek(data_start + (data_len * k) // _WEIGHT_SAMPLES)
            samples.append(f.read(_WEIGHT_SAMPLE_BYTES))
    return header, b"".join(samples)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, sorted by id) and its special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    special = {
        "map": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "all": sorted(str(token) for token in tokenizer.all_special_tokens),
    }
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def teacher_identity(*, model_name: str, revision: str | None, architecture: str, model_type: str, hidden_size: int,
                     vocab_size: int, tokenizer_size: int, tokenizer_fingerprint: str) -> dict:
    """The JSON-able identity a run manifest records (same keys for in-process and remote teachers)."""
    return {
        "model_name": model_name, "revision": revision, "architecture": architecture, "model_type": model_type,
        "hidden_size": int(hidden_size), "vocab_size": int(vocab_size), "tokenizer_size": int(tokenizer_size),
        "tokenizer_fingerprint": tokenizer_fingerprint,
    }
