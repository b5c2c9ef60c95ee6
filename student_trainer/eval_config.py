"""What one evaluation run needs: :class:`EvalConfig`, validated on construction, importable without torch.

``python -m student_trainer eval`` and ``genrecal-eval`` build their flags from these fields (each field's
``metadata["help"]`` is the flag's help text) and call :func:`student_trainer.evaluate.run_eval` with the result.
Image options are parsed and checked against the checkpoint's family when the model loads (that check needs the
family adapter, hence torch); everything else is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from student_trainer.sources import is_hub_id

Metric = Literal["exact_match", "f1", "rouge_l"]
HeadlineMetric = Literal["auto", "exact_match", "f1", "rouge_l"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]  # torch's names, as the trainer's --dtype
METRICS: tuple[str, ...] = get_args(Metric)  # every report holds all three (student_trainer/evaluate.py)
HEADLINE_METRICS: tuple[str, ...] = get_args(HeadlineMetric)
DTYPES: tuple[str, ...] = get_args(Dtype)
SHORT_ANSWER_WORDS = 3  # metric "auto": exact match when every reference has at most this many words


@dataclass
class EvalConfig:
    """One evaluation of a checkpoint on a VQA-style set. Each message says how to fix a bad value."""

    model: str = field(metadata={"help": "checkpoint folder to evaluate (any supported family), e.g. OUTPUT/final"})
    data: str = field(metadata={"help": (
        "evaluation data in any format of student_trainer/records.py: a .json/.jsonl file (LLaVA / ShareGPT or "
        "OpenAI-style messages), .parquet/.arrow, a datasets save_to_disk folder or a Hub dataset id "
        "(owner/name[:split], from the cache offline); the last assistant turn of each record is the reference")})
    image_folder: str | None = field(default=None, metadata={
        "help": "folder image names are relative to (default: the data's folder)"})
    split: str = field(default="train", metadata={"help": "split of a saved DatasetDict or a Hub dataset"})
    data_config: str | None = field(default=None, metadata={"help": (
        "configuration (subset) of a Hub dataset that has several (datasets.load_dataset's name)")})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N usable samples"})
    batch_size: int = field(default=8, metadata={"help": "samples per generate call, left-padded"})
    max_new_tokens: int = field(default=256, metadata={
        "help": "generation budget per answer; generation stops earlier at the end of the answer (the model's "
                "end-of-turn or EOS token), so a large budget costs only on answers that run on"})
    metric: HeadlineMetric = field(default="auto", metadata={"help": (
        "headline metric of the table and the JSON's 'score': exact_match, f1 (SQuAD-style token F1) or rouge_l "
        "(LCS F-measure); 'auto' = exact_match when every reference has at most "
        f"{SHORT_ANSWER_WORDS} words, else rouge_l. All three are always computed and reported")})
    output: str | None = field(default=None, metadata={
        "help": "also write the JSON report (scores, per-type scores, every prediction) to this file"})
    image_options: str | dict | None = field(default=None, metadata={"help": (
        "the model's image resolution in its family's processor knobs, 'KNOB=VALUE,...' or JSON, e.g. "
        "'max_pixels=802816' (docs/student_trainer.md, 'Image resolution'; default: the checkpoint's own "
        "settings, which a training run's exports already hold)")})
    device: str | None = field(default=None, metadata={
        "help": "torch device to run on, e.g. cuda, cuda:1 or cpu (default: cuda when available, else cpu)"})
    dtype: Dtype = field(default="auto", metadata={
        "help": "model dtype: auto (the checkpoint's own), bfloat16, float16 or float32"})

    def __post_init__(self) -> None:
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required: pass --{name}")
        self.model, self.data = str(self.model), str(self.data)
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(
                f"model {self.model!r} is not a checkpoint folder (no config.json); pass the folder that holds the "
                "model's config.json and *.safetensors, e.g. OUTPUT/final of a training run"
            )
        if not Path(self.data).exists() and not is_hub_id(self.data):
            raise ValueError(
                f"data {self.data!r} does not exist; pass a data file or dataset folder, or a Hub dataset id "
                "owner/name[:split] that is in the local cache"
            )
        if self.image_folder is not None:
            self.image_folder = str(self.image_folder)
            if not Path(self.image_folder).is_dir():
                raise ValueError(f"image_folder {self.image_folder!r} is not a folder; pass the folder image "
                                 "names in the data are relative to, or leave it out (default: the data's folder)")
        if not self.split:
            raise ValueError("split must name a split of the dataset, e.g. --split test")
        for name in ("limit", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.metric not in HEADLINE_METRICS:
            raise ValueError(f"metric must be one of {', '.join(HEADLINE_METRICS)}, got {self.metric!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.output is not None:
            self.output = str(self.output)
            if Path(self.output).is_dir():
                raise ValueError(f"output {self.output!r} is a folder; pass the JSON file to write, "
                                 f"e.g. {Path(self.output) / 'eval.json'}")
        if self.image_options is not None and not isinstance(self.image_options, (str, dict)):
            raise ValueError(
                f"image_options must be 'KNOB=VALUE,...', a JSON object or a mapping, got {self.image_options!r}"
            )
        if self.device is not None and not self.device:
            raise ValueError("device must name a torch device (cuda, cuda:1, cpu) or be left out")
