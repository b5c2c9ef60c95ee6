"""The command-line generator (genrecal.cli): flags from dataclass fields, --config files below the flags."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from genrecal.cli import add_arguments, config_from_args, load_config_file, option, upgrade_old_names


@dataclass(kw_only=True)
class Toy:
    name: str = option(group="model", help="what to call it")
    steps: int = option(10, group="schedule", help="optimizer steps")
    lr: float = option(1e-4, group="schedule", help="learning rate")
    limit: int | None = option(None, group="schedule", help="at most N; none = no limit")
    dtype: Literal["auto", "bfloat16", "float32"] = option("auto", group="precision", old_names=("precision",),
                                                           old_values={"bf16": "bfloat16", "fp32": "float32"},
                                                           help="compute dtype")
    fused: bool = option(True, group="precision", help="fused kernels")
    report_to: list[Literal["tensorboard", "wandb", "none"]] = option(
        default_factory=lambda: ["tensorboard"], group="output", help="trackers")
    share: float = field(default=0.5, metadata={"help": "a share in % terms: %(default)s of it"})
    stop_after: int | None = option(None, hidden=True, help="testing only")


def parser_for(cls=Toy) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    add_arguments(parser, cls)
    return parser


def parse(argv: list[str]) -> Toy:
    return config_from_args(Toy, parser_for().parse_args(argv))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_defaults_then_config_file_then_flags(tmp_path, suffix):
    values = {"name": "from-file", "steps": 20, "lr": 3e-4, "fused": False, "report-to": ["wandb"]}
    file = tmp_path / f"run{suffix}"
    file.write_text(json.dumps(values))  # JSON is YAML too
    config = parse(["--config", str(file), "--steps", "30", "--report-to", "tensorboard", "wandb"])
    assert config.steps == 30 and config.report_to == ["tensorboard", "wandb"]  # flags win
    assert config.name == "from-file" and config.lr == 3e-4 and config.fused is False  # the file's, not defaults
    assert config.limit is None and config.dtype == "auto"  # neither: the field defaults
    assert parse(["--config", str(file), "--fused"]).fused is True  # --flag over the file's false


def test_flag_types_none_choices_and_yaml_numbers_written_as_text(tmp_path):
    assert parse(["--name", "a", "--limit", "5"]).limit == 5
    assert parse(["--name", "a", "--limit", "none"]).limit is None
    assert parse(["--name", "a", "--no-fused"]).fused is False
    with pytest.raises(argparse.ArgumentError, match="invalid int value: 'x'"):
        parser_for().parse_args(["--steps", "x"])
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'bf16'"):  # old spellings: files only
        parser_for().parse_args(["--dtype", "bf16"])
    file = tmp_path / "run.yaml"
    file.write_text("name: a\nlr: 1e-4\nreport_to: none\n")  # PyYAML reads 1e-4 as the string '1e-4'
    assert load_config_file(file, Toy) == {"name": "a", "lr": 1e-4, "report_to": ["none"]}
    file.write_text("name: a\nsteps: many\n")
    with pytest.raises(ValueError, match="option 'steps': invalid literal for int"):
        load_config_file(file, Toy)


def test_unknown_config_key_names_the_closest_option(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("name: a\nstep: 3\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown option 'step'; did you mean 'steps'\?"):
        parse(["--config", str(file)])
    file.write_text("name: a\nwarp_drive: 3\n")
    with pytest.raises(ValueError, match="unknown option 'warp_drive'; known options: dtype, fused, limit"):
        load_config_file(file, Toy)
    file.write_text("- name\n")
    with pytest.raises(ValueError, match="must hold a mapping of option names to values, got list"):
        load_config_file(file, Toy)


def test_old_names_and_values_are_read_from_files(tmp_path):
    file = tmp_path / "old.json"
    file.write_text(json.dumps({"name": "a", "precision": "bf16"}))
    assert parse(["--config", str(file)]).dtype == "bfloat16"
    assert upgrade_old_names(Toy, {"precision": "fp32", "gone": 1}) == {"dtype": "float32", "gone": 1}
    with pytest.raises(ValueError, match="option 'dtype' is given twice"):
        upgrade_old_names(Toy, {"dtype": "auto", "precision": "fp32"})


def test_help_lists_groups_and_defaults_and_hides_test_flags(capsys):
    with pytest.raises(SystemExit):
        parser_for().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--stop-after" not in text and parse(["--name", "a", "--stop-after", "3"]).stop_after == 3
    for group in ("model:", "schedule:", "precision:", "output:"):
        assert group in text
    assert "(required, here or in --config)" in text and "learning rate (default: 0.0001)" in text
    assert "fused kernels (default: on)" in text and "trackers (default: tensorboard)" in text
    assert "a share in % terms: 0.5 of it" in text  # %(default)s placed, other % signs kept
    assert "{auto,bfloat16,float32}" in text


@dataclass(kw_only=True)
class Connection:  # a set of options two commands share
    host: str = option("localhost", group="model", help="where the server is")
    port: int = option(50051, group="model", help="its port")


@dataclass(kw_only=True)
class Client(Connection):
    model: str = option(group="model", help="the main option")
    retries: int = option(3, group="model", help="how often to retry")


def test_a_commands_own_options_are_listed_before_the_ones_it_shares(capsys):
    with pytest.raises(SystemExit):
        parser_for(Client).parse_args(["--help"])
    text = capsys.readouterr().out
    flags = [text.index(f"--{name} ") for name in ("model", "retries", "host", "port")]
    assert flags == sorted(flags)  # own fields in their order, then the inherited ones in theirs
    args = parser_for(Client).parse_args(["--model", "m", "--port", "1"])
    assert config_from_args(Client, args) == Client(model="m", port=1)


def test_a_required_field_missing_everywhere_names_its_flag(tmp_path):
    with pytest.raises(ValueError, match="missing --name: give it on the command line or in the --config file"):
        parse(["--steps", "3"])


def test_a_field_without_help_is_a_programming_error():
    @dataclass
    class NoHelp:
        size: int = 1

    with pytest.raises(TypeError, match="NoHelp.size has no help"):
        parser_for(NoHelp)
