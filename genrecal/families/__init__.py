"""Model-family registry, keyed by ``config.architectures[0]`` (never by path substrings).

Adding a family = one module here that defines ``ADAPTER`` + one line in ``_FAMILY_MODULES`` + its tests.
Modules are imported lazily, on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from genrecal.errors import UnsupportedArchitectureError
from genrecal.families.base import EncodedBatch, FamilyAdapter, LoadedVLM

__all__ = [
    "EncodedBatch",
    "FamilyAdapter",
    "LoadedVLM",
    "adapter_for_architecture",
    "adapter_for_model_type",
    "load_vlm",
    "supported_architectures",
    "supported_model_types",
]

# model_type -> (module, architectures it serves)
_FAMILY_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "qwen2_vl": ("genrecal.families.qwen2_vl", ("Qwen2VLForConditionalGeneration",)),
    "qwen2_5_vl": ("genrecal.families.qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",)),
    "internvl": ("genrecal.families.internvl", ("InternVLForConditionalGeneration",)),
    "llava_onevision": ("genrecal.families.llava_onevision", ("LlavaOnevisionForConditionalGeneration",)),
    "llava": ("genrecal.families.llava", ("LlavaForConditionalGeneration",)),
    "idefics3": ("genrecal.families.idefics3", ("Idefics3ForConditionalGeneration",)),
}
_ARCHITECTURES = {arch: model_type for model_type, (_, archs) in _FAMILY_MODULES.items() for arch in archs}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def supported_model_types() -> list[str]:
    return list(_FAMILY_MODULES)


def adapter_for_model_type(model_type: str) -> FamilyAdapter:
    if model_type not in _FAMILY_MODULES:
        raise UnsupportedArchitectureError(
            f"unknown model family {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return importlib.import_module(_FAMILY_MODULES[model_type][0]).ADAPTER


def adapter_for_architecture(architectures: list[str] | None) -> FamilyAdapter:
    """The adapter for ``config.architectures``; an unsupported one lists what is supported."""
    arch = (architectures or [None])[0]
    if arch not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; supported architectures: {', '.join(supported_architectures())}"
        )
    return adapter_for_model_type(_ARCHITECTURES[arch])


def load_vlm(path: str | Path, **kwargs) -> LoadedVLM:
    """Load a checkpoint folder with the adapter its ``config.architectures`` names."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return adapter_for_architecture(config.architectures).load(path, **kwargs)
