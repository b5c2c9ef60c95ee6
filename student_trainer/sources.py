"""Where training records come from: :func:`open_index` gives random access to the records of a source, as
stored, for :func:`student_trainer.records.record_to_sample` to parse.

**Sources** (:func:`open_index`): a ``.json`` array or JSON Lines file (``.jsonl``, or a ``.json`` written one record
a line); a Hugging Face dataset by local path (a ``save_to_disk`` folder, whose ``split`` picks a split of a
``DatasetDict``; a ``.parquet`` / ``.arrow`` file); or by Hub id (``owner/name``, or ``owner/name:split``; a set of
several configurations, such as ``lmms-lab/LLaVA-OneVision-Data``, also needs ``config_name``) through
``datasets.load_dataset``, which reads its cache offline (``HF_HUB_OFFLINE=1``): a set not in the cache is refused
with an error saying so. Start-up cost and memory per rank (N records):

- JSONL: one pass records the byte offset and length of every non-empty line (:class:`JsonlIndex`; 16 bytes a record:
  3.2 MB for 200k records); reading record ``i`` is a seek, one read and one ``json.loads``.
- One JSON array (LLaVA's usual ``.json``): JSON cannot be indexed without parsing it, so the file is parsed once and
  every record re-serialised into one compact byte buffer with an offset array (:class:`JsonBufferIndex`); the parsed
  objects are then freed. Memory ≈ the file's size (LLaVA-665k's 1 GB JSON: ≈ 1 GB) in the rank and again in each
  worker process (they receive a copy), plus the parse's transient peak (several x the file). Convert big arrays to
  JSONL once (``jq -c '.[]' a.json > a.jsonl``) to avoid both.
- datasets (local or Hub): rows are read from the memory-mapped Arrow table by index, undecoded (:class:`ArrowIndex`).

A source whose first :data:`CHECKED_RECORDS` records are all in no known format is refused when it is opened
(:func:`check_formats`), before step 0, with one error that lists the formats.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from student_trainer.records import FORMATS, UnparsableLine, record_format

JSON_SUFFIXES = (".json", ".jsonl")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # suffix -> datasets.load_dataset builder
CHECKED_RECORDS = 8  # a source whose first records are all in no known format is refused when opened
_SCAN_BYTES = 1 << 24  # 16 MiB blocks while indexing a JSONL file
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name


# ---- the index of a source --------------------------------------------------------------------------------


class RecordIndex(Protocol):
    """Random access to a source's records as stored (``record(i)`` may return an :class:`UnparsableLine`)."""

    def __len__(self) -> int: ...

    def record(self, i: int) -> object: ...


class JsonlIndex:
    """Byte offsets of the non-empty lines of a JSON Lines file; record ``i`` is line ``offsets[i]``."""

    def __init__(self, path: Path):
        self.path = path
        starts, lengths = [], []
        position = 0
        with path.open("rb") as f:
            carry = b""
            while block := f.read(_SCAN_BYTES):
                data = carry + block
                base = position - len(carry)
                ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
                begin = 0
                for end in ends.tolist():
                    if data[begin:end].strip():
                        starts.append(base + begin)
                        lengths.append(end - begin)
                    begin = end + 1
                carry = data[begin:]
                position += len(block)
            if carry.strip():
                starts.append(position - len(carry))
                lengths.append(len(carry))
        self.offsets = np.asarray(starts, dtype=np.int64)  # (N,)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # (N,)
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, i: int) -> object:
        if self._file is None or self._pid != os.getpid():  # one handle per (worker) process
            self._file, self._pid = self.path.open("rb"), os.getpid()
        self._file.seek(int(self.offsets[i]))
        line = self._file.read(int(self.lengths[i]))
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            return UnparsableLine(i + 1, f"not valid JSON ({exc})")

    def __getstate__(self) -> dict:  # a spawned worker opens its own file handle
        return {**self.__dict__, "_file": None, "_pid": None}


class JsonBufferIndex:
    """The records of one JSON array, re-serialised compactly into one byte buffer (see the module docstring)."""

    def __init__(self, records: list):
        pieces = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() for r in records]
        self.ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)  # (N,)
        self.buffer = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def record(self, i: int) -> object:
        start = int(self.ends[i - 1]) if i else 0
        return json.loads(self.buffer[start : int(self.ends[i])].tobytes())


class ArrowIndex:
    """Rows of a Hugging Face dataset, as stored (an ``Image`` feature stays ``{"bytes", "path"}``, so that a
    corrupt image becomes a :class:`SampleError` of its record instead of failing the read)."""

    def __init__(self, dataset, columns: tuple[str, ...] | None = None):
        if columns is not None:
            dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
        self.column_names = list(dataset.column_names)
        self.table = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.table)

    def record(self, i: int) -> object:
        return self.table[i : i + 1].to_pylist()[0]


def open_index(source: str | Path, split: str = "train", *, config_name: str | None = None,
               columns: tuple[str, ...] | None = None) -> RecordIndex:
    """The record index of ``source`` (see the module docstring), its format checked on the first records.

    ``config_name`` picks a configuration (subset) of a Hub dataset that has several (``load_dataset(id, name)``).
    ``columns`` restricts dataset rows to those columns (when present) and skips the format check.
    Raises ``ValueError`` naming the fix: a missing path, an uncached Hub id offline, an unknown split or
    configuration, a source in no known format.
    """
    path = Path(source)
    if config_name is not None and (path.exists() or not is_hub_id(str(source))):
        raise ValueError(f"a dataset configuration ({config_name!r}) applies to a Hugging Face Hub dataset id "
                         f"only, and {str(source)!r} is not one; leave the configuration out")
    if path.is_file() and path.suffix in JSON_SUFFIXES:
        index = _open_json(path)
    elif path.exists():
        index = ArrowIndex(_open_local_dataset(path, split), columns)
    elif is_hub_id(str(source)):
        index = ArrowIndex(_open_hub_dataset(str(source), split, config_name), columns)
    else:
        raise ValueError(f"data path {str(source)!r} does not exist; pass a .json/.jsonl file, a .parquet/.arrow "
                         "file, a datasets save_to_disk folder or a Hugging Face Hub dataset id (owner/name)")
    if columns is None:
        check_formats(index, source)
    return index


def check_formats(index: RecordIndex, source: str | Path) -> None:
    """Refuse a source whose first :data:`CHECKED_RECORDS` records are all in no known format (one error)."""
    n = min(len(index), CHECKED_RECORDS)
    if isinstance(index, ArrowIndex) and not {"conversations", "messages"} & set(index.column_names):
        found = f"its columns are {index.column_names}"
    elif n == 0 or any(record_format(index.record(i)) for i in range(n)):
        return
    else:
        first = index.record(0)
        found = (f"the first record's keys are {sorted(map(str, first))[:10]}" if isinstance(first, dict)
                 else f"the first record is {getattr(first, 'reason', type(first).__name__)}")
        found = f"none of its first {n} records is in a known format ({found})"
    formats = "\n".join(f"  - {f}" for f in FORMATS)
    raise ValueError(f"{source}: {found}. The formats read, detected per record:\n{formats}\nSee the "
                     "'Data formats' section of docs/student_trainer.md for an example record of each.")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub dataset id ``owner/name`` or ``owner/name:split`` (not a data file's name)."""
    name = text.partition(":")[0]
    return bool(_HUB_ID.fullmatch(name)) and not name.endswith((*JSON_SUFFIXES, *DATA_FILE_BUILDERS))


def default_image_folder(source: str | Path) -> Path:
    """Where relative image names resolve by default: the dataset folder, the data file's folder, or (for a Hub id,
    whose images are usually stored in the rows) the working directory."""
    path = Path(source)
    if path.is_dir():
        return path
    return path.parent if path.exists() else Path.cwd()


def _open_json(path: Path) -> RecordIndex:
    if path.suffix == ".jsonl":
        return JsonlIndex(path)
    with path.open(encoding="utf-8") as f:
        head = f.read(1 << 16)
    if head.lstrip().startswith("["):
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); a .json file holds a list of records") from exc
        del text
        return JsonBufferIndex(records)
    if _looks_like_json_lines(head):
        return JsonlIndex(path)
    raise ValueError(f"{path} holds neither a JSON list of records nor one record per line")


def _looks_like_json_lines(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _open_local_dataset(path: Path, split: str):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder or a parquet/arrow file."""
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise ValueError(
                f"{path} is a folder but not a dataset saved with save_to_disk ({exc}); pass a .json/.jsonl file, a "
                ".parquet/.arrow file, a saved dataset folder or a Hub dataset id"
            ) from exc
    elif path.suffix in DATA_FILE_BUILDERS:
        loaded = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        raise ValueError(
            f"cannot read {str(path)!r}: expected a .json/.jsonl file, a {'/'.join(DATA_FILE_BUILDERS)} file, a "
            "folder saved with datasets' save_to_disk or a Hugging Face Hub dataset id"
        )
    return _pick_split(loaded, split, str(path))


def _open_hub_dataset(source: str, split: str, config_name: str | None):
    """``owner/name[:split]`` through ``datasets.load_dataset`` (its cache when offline), one split of it."""
    import datasets

    name, _, pinned = source.partition(":")
    split = pinned or split
    config = f", {config_name!r}" if config_name else ""
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except OSError as exc:  # ConnectionError (offline, unreachable), FileNotFoundError (no such set), HTTP errors
        if datasets.config.HF_HUB_OFFLINE:
            raise ValueError(
                f"{source!r} is not a local path, and the Hugging Face Hub dataset {name!r}{config} is not in the "
                f"datasets cache ({datasets.config.HF_DATASETS_CACHE}) while this machine is offline "
                f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load it once where the Hub is reachable, with the same "
                f"HF_HOME (python -c \"import datasets; datasets.load_dataset('{name}'{config})\"), or pass a "
                "local path"
            ) from exc
        raise ValueError(f"{source!r} is not a local path, and loading it as a Hugging Face Hub dataset failed "
                         f"({exc}); check the path or the dataset id") from exc
    except ValueError as exc:  # a configuration missing or unknown (several in the set or the cache), a split unknown
        reason = str(exc).rstrip(".")
        raise ValueError(f"Hugging Face Hub dataset {name!r}{config}, split {split!r}: {reason}. Pick the "
                         f"configuration with --data-config NAME and the split with '{name}:SPLIT'") from exc


def _pick_split(loaded, split: str, source: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{source} has no split {split!r}; its splits are {sorted(loaded)}")
        loaded = loaded[split]
    return loaded
