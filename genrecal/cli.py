"""Command lines generated from configuration dataclasses, and the ``--config FILE`` both applications take.

Each field of a config dataclass carries its help (``field(metadata={"help": ...})``, or :func:`option`, which
adds a help group and the rest); :func:`add_arguments` turns every field into one ``--flag`` of the same name
(``grad_accum`` -> ``--grad-accum``), typed from the annotation:

- ``int`` / ``float`` / ``str``: one value; ``X | None``: also ``none`` (or ``null``) to unset it;
- ``bool``: ``--flag`` / ``--no-flag``;
- ``Literal["a", "b"]``: one of the choices; ``list[...]``: one or more values (``--report-to tensorboard wandb``);
- anything else (``dict | None``, ...): the text as given, which the dataclass parses in ``__post_init__``.

Precedence: the field defaults < ``--config FILE`` (YAML or JSON; keys are the field names, ``-`` or ``_``) <
flags on the command line. Flags have no argparse defaults (``argparse.SUPPRESS``), so a flag that was not given
leaves the file's value in place; :func:`config_from_args` merges the three and builds the dataclass, whose
``__post_init__`` validates the result. An unknown key in a file is refused, naming the closest option.

Why not transformers' ``HfArgumentParser`` (it reads the same ``metadata={"help": ...}``): it gives every flag
its field's default, so a flag left out cannot be told from one given, which is what lets a config file sit below
the flags; it makes fields without a default ``required=True``, so ``--config`` could not supply them; it groups
by dataclass, not by topic within one; and importing it (transformers) costs about a second more. This module
is argparse and under 300 lines, and imports neither torch nor transformers, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

CONFIG_HELP = ("YAML (.yaml/.yml) or JSON file of options, keyed by option name (with '_' or '-'); "
               "flags given on the command line override its values")
_UNSET_WORDS = ("none", "null")
_METAVARS = {"int": "N", "float": "X"}  # argparse's default is the option's name in capitals
USAGE = "%(prog)s [-h] [--config FILE] [OPTION ...]"  # the generated flags are listed by group below it


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str | None = None,
    hidden: bool = False,
    metavar: str | None = None,
    default_text: str | None = None,
    old_names: Sequence[str] = (),
    old_values: Mapping[Any, Any] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default / default_factory: as :func:`dataclasses.field`; neither = required (on the command line or in
            ``--config``).
        help: the flag's help; ``(default: ...)`` is appended from the default.
        group: the ``--help`` section the flag is listed in (in order of first use).
        hidden: a flag for tests and tools: still accepted, but not listed by ``--help``.
        metavar: the value's name in ``--help`` (default: the option name in capitals).
        default_text: what ``--help`` shows as the default instead of the value (e.g. a long path).
        old_names / old_values: earlier spellings of this option's key and of its values, still read from a
            config file or a saved run config (``precision: bf16`` -> ``dtype: bfloat16``); the command line takes
            only the current ones.
    """
    metadata = {"help": help, "group": group, "hidden": hidden, "metavar": metavar, "default_text": default_text,
                "old_names": tuple(old_names), "old_values": dict(old_values or {})}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one field's text is read: ``convert`` is argparse's ``type``."""

    convert: Callable[[str], Any] | None
    choices: tuple | None = None
    boolean: bool = False
    many: bool = False


def _kind(annotation: Any) -> _Kind:
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0] if len(members) == 1 else str  # e.g. `dict | str`: the dataclass parses the text
    many = typing.get_origin(annotation) is list
    if many:
        (annotation,) = typing.get_args(annotation)
    choices = None
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        annotation = type(choices[0])
    if annotation is bool and not many:
        return _Kind(convert=None, boolean=True)
    base = annotation if annotation in (int, float, str) else str
    return _Kind(convert=_converter(base, optional and not many), choices=choices, many=many)


def _converter(base: type, optional: bool) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if optional and text.strip().lower() in _UNSET_WORDS:
            return None
        return base(text)

    convert.__name__ = base.__name__  # argparse's message: "invalid int value: 'x'"
    return convert


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default appended, or put where the help says ``%(default)s``."""
    meta = f.metadata
    text = meta["help"]
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if meta.get("default_text"):
        value = meta["default_text"]
    elif required or f.default is None:
        value = None  # the help says what unset means
    else:
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, list | tuple):
            value = " ".join(map(str, value))
    if "%(default)s" in text:  # the help places the default itself
        text = text.replace("%(default)s", str(value))
    elif required:
        text = f"{text} (required, here or in --config)"
    elif value is not None:
        text = f"{text} (default: {value})"
    return text.replace("%", "%%")  # argparse %-formats help texts


def program_name(default: str) -> str:
    """The name ``--help`` shows: the console script's (``genrecal-train``) when run as one, ``default`` (e.g.
    ``python -m student_trainer``) when run with ``-m`` or ``-c``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return default if name in ("", "__main__.py", "-c") else name


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are options (``init`` fields): its own first, then those it inherits from a
    shared set of options (so ``--help`` lists a command's main options, e.g. ``--student``, at the top)."""
    own = set(vars(cls).get("__annotations__", {}))
    fields = [f for f in dataclasses.fields(cls) if f.init]
    return sorted(fields, key=lambda f: f.name not in own)  # stable: declaration order within each part


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, config_flag: bool = True) -> None:
    """``--config FILE`` (unless ``config_flag`` is False) and one flag per field of the dataclass ``cls``,
    listed under each field's ``group``. Flags have no defaults of their own (see the module docstring)."""
    if config_flag:
        parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields(cls):
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with field(metadata={{'help': ...}})")
        group = f.metadata.get("group")
        target = parser if group is None else groups.setdefault(group, parser.add_argument_group(group))
        kind = _kind(hints[f.name])
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
        kwargs["help"] = argparse.SUPPRESS if f.metadata.get("hidden") else _help(f)
        if kind.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            metavar = f.metadata.get("metavar") or (None if kind.choices else _METAVARS.get(kind.convert.__name__))
            kwargs.update(type=kind.convert, choices=kind.choices, metavar=metavar)
            if kind.many:
                kwargs["nargs"] = "+"
        target.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls(**values)`` from: the field defaults < ``args.config`` (a file, if given) < the flags in ``args``.
    A field without a default that neither gives is a ValueError naming its flag."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config, cls))
    names = [f.name for f in cli_fields(cls)]
    values.update({name: getattr(args, name) for name in names if hasattr(args, name)})
    required = [f.name for f in cli_fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if values.get(name) in (None, "")]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        them = "it" if len(missing) == 1 else "them"
        raise ValueError(f"missing {flags}: give {them} on the command line or in the --config file")
    return cls(**values)


def load_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON config file as ``{field: value}`` for the dataclass ``cls``.

    Keys may use ``-`` or ``_``; old spellings are renamed (:func:`upgrade_old_names`); keys listed in
    ``cls.saved_only_keys`` (derived values a saved run config carries) are dropped; an unknown key is a ValueError
    naming the closest option. Numbers written as text (PyYAML reads ``1e-4`` as a string) are converted.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); name a YAML file .yaml or .yml") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, got {type(data).__name__}")
    data = upgrade_old_names(cls, data)
    for key in getattr(cls, "saved_only_keys", ()):
        data.pop(key, None)
    by_name = {f.name: f for f in cli_fields(cls)}
    for key in data:
        if key not in by_name:
            close = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(sorted(by_name))}"
            raise ValueError(f"{path}: unknown option {key!r}; {hint}")
    hints = typing.get_type_hints(cls)
    return {key: _from_file(path, key, value, _kind(hints[key])) for key, value in data.items()}


def _from_file(path: Path, key: str, value: Any, kind: _Kind) -> Any:
    if kind.many and isinstance(value, str):
        return [value]
    if isinstance(value, str) and kind.convert is not None and not kind.many:
        try:
            return kind.convert(value)
        except ValueError as exc:
            raise ValueError(f"{path}: option {key!r}: {exc}") from exc
    return value


def upgrade_old_names(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with dashes in keys made underscores and each field's ``old_names`` / ``old_values`` (see
    :func:`option`) replaced by the current ones; other keys are kept as they are (a saved run config may hold
    fields this version dropped)."""
    renamed: dict[str, str] = {}
    old_values: dict[str, Mapping] = {}
    for f in cli_fields(cls):
        renamed.update({old: f.name for old in f.metadata.get("old_names", ())})
        if f.metadata.get("old_values"):
            old_values[f.name] = f.metadata["old_values"]
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        name = renamed.get(key, key)
        if name in out:
            raise ValueError(f"option {name!r} is given twice (once as its old name {key!r}); keep one")
        mapping = old_values.get(name, {})
        if isinstance(value, list):
            value = [mapping.get(v, v) if isinstance(v, str) else v for v in value]
        elif isinstance(value, str):
            value = mapping.get(value, value)
        out[name] = value
    return out


def hidden_flags(cls: type) -> Iterable[str]:
    """The flags of ``cls`` that ``--help`` does not list."""
    return ["--" + f.name.replace("_", "-") for f in cli_fields(cls) if f.metadata.get("hidden")]


__all__ = ["CONFIG_HELP", "USAGE", "add_arguments", "cli_fields", "config_from_args", "hidden_flags", "load_config_file", "program_name",
           "option", "upgrade_old_names"]
