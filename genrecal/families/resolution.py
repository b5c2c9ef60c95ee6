"""Image resolution per family: the family's own processor knobs, set per side (teacher, student) at load time.

Each family declares its knobs as data (``FamilyAdapter.resolution_knobs``), named as its Hugging Face image
processor names them: Qwen2-VL's ``min_pixels`` / ``max_pixels``, InternVL's ``max_patches``, Idefics3's
``do_image_splitting`` / ``longest_edge``, and so on (docs/student_trainer.md, "Image resolution"). One function
applies them, :func:`apply_image_options`, to the loaded processor and, where the model reads the same setting
when it packs image features (LLaVA-OneVision's ``image_grid_pinpoints``), to the model config as well, so the
number of image tokens the processor writes always equals the number of features the model produces.

No options leaves the checkpoint's own settings untouched. An unknown knob for the family is a ``ValueError``
that lists the family's knobs; a bad value is a ``ValueError`` that says how to fix it. Every value is checked
before anything is changed. A family whose vision tower fixes the input size (LLaVA-1.5: CLIP's position
embeddings are learned for 336 x 336) has no knobs and says why.

Options are given as a dict or as text: ``max_pixels=802816,min_pixels=3136`` (values parsed as JSON where they
parse, else kept as strings) or a JSON object (``{"image_grid_pinpoints": [[384, 384], [384, 768]]}``, the form
list values need).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# (value, settings, processor, config) -> None; raises ValueError with a fix. ``settings`` is every knob's value
# once the options are applied (the checkpoint's own where not given), for checks across knobs (min <= max).
Check = Callable[[Any, dict, object, object], None]


@dataclass(frozen=True)
class ResolutionKnob:
    """One resolution setting of a family, as its processor names it, and where the value is written."""

    name: str  # what users write: the HF image processor's (or processor's) own name for the setting
    kind: type  # int, bool, str or list
    # where the value goes: "image_processor.ATTR", "image_processor.ATTR.KEY" (a size dict's key),
    # "processor.ATTR" or "config.ATTR" (the model config, for settings the model reads too). The first target
    # is where the current value is read from.
    targets: tuple[str, ...]
    help: str  # what the knob changes, with the published checkpoint's value
    check: Check | None = None
    # None: vLLM applies it (vllm_image_arguments); else why the vLLM backend cannot, and the option is refused
    vllm_unsupported: str | None = None


# ---- parsing ---------------------------------------------------------------------------------------------------

def parse_image_options(options: str | Mapping | None) -> dict | None:
    """``"k=v,k=v"`` or a JSON object (or a mapping) -> ``{knob: value}``; None or empty -> None (no change)."""
    if options is None:
        return None
    if isinstance(options, Mapping):
        parsed = dict(options)
    elif isinstance(options, str):
        text = options.strip()
        if not text:
            return None
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"image options {text!r} are not a valid JSON object ({exc})") from exc
        else:
            parsed = {}
            for part in text.split(","):
                key, sep, value = part.partition("=")
                if not sep or not key.strip():
                    raise ValueError(
                        f"image options {text!r}: {part!r} is not KNOB=VALUE; write e.g. "
                        "'max_pixels=802816,min_pixels=3136', or a JSON object for list values"
                    )
                parsed[key.strip()] = _scalar(value.strip())
    else:
        raise ValueError(f"image options must be 'k=v,...', a JSON object or a dict, got {type(options).__name__}")
    if not isinstance(parsed, dict) or not all(isinstance(k, str) for k in parsed):
        raise ValueError(f"image options must be a mapping of knob names to values, got {parsed!r}")
    return parsed or None


def format_image_options(options: Mapping | None) -> str:
    """The inverse of :func:`parse_image_options` (JSON), for logs and command lines."""
    return json.dumps(dict(options or {}), sort_keys=True)


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---- applying --------------------------------------------------------------------------------------------------

def apply_image_options(adapter, processor, config, options: Mapping | str | None) -> dict:
    """Validate ``options`` for ``adapter``'s family and write them into ``processor`` (and ``config``).

    Returns the options as applied (values coerced to the knob's type); ``{}`` when there were none, in which
    case nothing is touched. Raises ``ValueError`` for an unknown knob (listing the family's) or a bad value
    (saying how to fix it), before anything changes.
    """
    options = parse_image_options(options)
    if not options:
        return {}
    values = _coerced(adapter, options)
    knobs = {knob.name: knob for knob in adapter.resolution_knobs}
    settings = {**current_image_settings(adapter, processor, config), **values}
    for name, value in values.items():
        if knobs[name].check is not None:
            try:
                knobs[name].check(value, settings, processor, config)
            except ValueError as exc:
                raise ValueError(f"{adapter.model_type}: image option {name}={value!r}: {exc}") from None
    roots = {"processor": processor, "image_processor": processor.image_processor, "config": config}
    for name, value in values.items():
        for target in knobs[name].targets:
            _write(roots, target, value)
    return values


def check_image_options(checkpoint, options: Mapping | str | None, *, vllm: bool = False) -> dict | None:
    """Parse ``options`` and check the knob names and types for the family of the checkpoint folder.

    Reads only its config.json (milliseconds): a configuration can refuse an unknown knob before anything loads.
    The values' checks against the processor (tile multiples, min <= max) run when the checkpoint loads.
    ``vllm``: also refuse knobs the vLLM backend cannot apply.
    """
    from pathlib import Path

    from genrecal.families import adapter_for_architecture

    options = parse_image_options(options)
    if not options:
        return None
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    adapter = adapter_for_architecture(config.get("architectures"))
    values = _coerced(adapter, options)
    if vllm:
        _refuse_for_vllm(adapter, values)
    return values


def current_image_settings(adapter, processor, config) -> dict:
    """Every knob of the family with its value now (the checkpoint's own, or as options set it)."""
    roots = {"processor": processor, "image_processor": processor.image_processor, "config": config}
    return {knob.name: _read(roots, knob.targets[0]) for knob in adapter.resolution_knobs}



def vllm_image_arguments(adapter, processor, options: Mapping | None) -> dict:
    """``vllm.LLM`` keyword arguments that give vLLM's own copy of the processor the same ``options``.

    vLLM builds its processor from the checkpoint folder: image-processor settings travel as
    ``mm_processor_kwargs`` (passed to every HF processor call, so ``size`` goes whole, with the checkpoint's other
    keys), processor attributes as ``mm_processor_kwargs`` too (vLLM hands them to the processor's constructor),
    and model-config settings as ``hf_overrides``. Call after :func:`apply_image_options` on ``processor``. The
    vLLM backend checks at start-up and on every forward that vLLM's token ids equal the adapter's, so a knob vLLM
    ignored would be refused, never silently misaligned.
    """
    if not options:
        return {}
    _refuse_for_vllm(adapter, options)
    knobs = {knob.name: knob for knob in adapter.resolution_knobs}
    mm_kwargs: dict = {}
    overrides: dict = {}
    for name in options:
        for target in knobs[name].targets:
            root, attr, key = _split(target)
            if root == "config":
                overrides[attr] = options[name]
            elif key is None:  # vLLM caches processors by these kwargs: nested lists must hash
                mm_kwargs[attr] = _hashable(options[name])
            else:  # a size dict: vLLM replaces it whole in the call, so send all of its (now updated) keys
                current = getattr(processor.image_processor, attr)
                items = dataclasses.asdict(current) if dataclasses.is_dataclass(current) else dict(current)
                mm_kwargs[attr] = {k: v for k, v in items.items() if v is not None}
    out = {"mm_processor_kwargs": mm_kwargs}
    if overrides:
        out["hf_overrides"] = overrides
    return out

def describe_knobs(adapter) -> str:
    """'valid image options: NAME (TYPE): HELP; ...', or why the family has none."""
    if not adapter.resolution_knobs:
        return f"this family has no image-resolution options: {adapter.resolution_note}"
    return "valid image options: " + "; ".join(
        f"{k.name} ({k.kind.__name__}): {k.help}" for k in adapter.resolution_knobs
    )


def _coerced(adapter, options: Mapping) -> dict:
    """Unknown knobs refused (listing the family's), values coerced to each knob's type."""
    knobs = {knob.name: knob for knob in adapter.resolution_knobs}
    unknown = sorted(set(options) - set(knobs))
    if unknown:
        raise ValueError(f"{adapter.model_type}: unknown image option(s) {unknown}; {describe_knobs(adapter)}")
    return {name: _coerce(adapter, knobs[name], value) for name, value in options.items()}


def _refuse_for_vllm(adapter, options: Mapping) -> None:
    knobs = {knob.name: knob for knob in adapter.resolution_knobs}
    refused = {name: knobs[name].vllm_unsupported for name in options if knobs[name].vllm_unsupported}
    if refused:
        raise ValueError(f"{adapter.model_type}: the vLLM backend cannot apply image option(s) "
                         + "; ".join(f"{name}: {why}" for name, why in refused.items())
                         + "; drop them or serve with --backend transformers")


def _coerce(adapter, knob: ResolutionKnob, value: Any) -> Any:
    def bad(why: str) -> ValueError:
        return ValueError(f"{adapter.model_type}: image option {knob.name}={value!r} {why}; {knob.help}")

    if knob.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad("is not a boolean: write true or false")
    if knob.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("is not an integer")
        if value < 1:
            raise bad("must be a positive integer")
        return value
    if knob.kind is list:
        if not isinstance(value, list | tuple):
            raise bad("is not a list: give the options as a JSON object, e.g. "
                      f"'{{\"{knob.name}\": [[384, 384], [384, 768]]}}'")
        return [list(v) if isinstance(v, list | tuple) else v for v in value]
    if not isinstance(value, knob.kind):
        raise bad(f"is not a {knob.kind.__name__}")
    return value


class _HashableList(list):
    """A list (what transformers' strict config and kwargs checks want) that vLLM's processor cache can hash."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self))


def _hashable(value: Any) -> Any:
    return _HashableList(_hashable(v) for v in value) if isinstance(value, list | tuple) else value


def _split(target: str) -> tuple[str, str, str | None]:
    root, attr, *key = target.split(".")
    return root, attr, (key[0] if key else None)


def _read(roots: dict, target: str) -> Any:
    root, attr, key = _split(target)
    value = getattr(roots[root], attr)
    if key is None:
        return value
    return value[key] if isinstance(value, Mapping) else getattr(value, key)


def _write(roots: dict, target: str, value: Any) -> None:
    root, attr, key = _split(target)
    obj = roots[root]
    if key is None:
        setattr(obj, attr, value)
        return
    current = getattr(obj, attr)
    if dataclasses.is_dataclass(current):  # transformers 5's SizeDict
        setattr(obj, attr, dataclasses.replace(current, **{key: value}))
    else:
        setattr(obj, attr, {**(current or {}), key: value})


# ---- checks shared by families ---------------------------------------------------------------------------------

def at_least(other: str) -> Check:
    """The value must be >= the knob ``other`` (e.g. max_pixels >= min_pixels)."""

    def check(value, settings, processor, config) -> None:
        if settings[other] is not None and value < settings[other]:
            raise ValueError(f"{value} is below {other}={settings[other]}; raise it to at least "
                             f"{settings[other]} or lower {other}")

    return check


def at_most(other: str) -> Check:
    """The value must be <= the knob ``other`` (e.g. min_pixels <= max_pixels)."""

    def check(value, settings, processor, config) -> None:
        if settings[other] is not None and value > settings[other]:
            raise ValueError(f"{value} is above {other}={settings[other]}; lower it to at most "
                             f"{settings[other]} or raise {other}")

    return check


def all_of(*checks: Check) -> Check:
    def check(value, settings, processor, config) -> None:
        for one in checks:
            one(value, settings, processor, config)

    return check


__all__ = [
    "ResolutionKnob",
    "apply_image_options",
    "check_image_options",
    "current_image_settings",
    "describe_knobs",
    "format_image_options",
    "parse_image_options",
    "vllm_image_arguments",
]
