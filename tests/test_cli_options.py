"""CLI options are derived from the config dataclasses: same names, same defaults, choices checked once."""
from __future__ import annotations

import dataclasses

import pytest
import typer

from qpissa.cli.app import app
from qpissa.cli.entry import main  # noqa: F401  (registers the commands)
from qpissa.cli.options import Options, with_options
from qpissa.compare.config import CompareConfig
from qpissa.data import DataConfig
from qpissa.decompose.config import DecomposeConfig
from qpissa.errors import UserError
from qpissa.plan.memory import PlanConfig
from qpissa.train.config import TrainConfig
from qpissa.use.convert import ConvertConfig
from qpissa.use.evaluate import Gsm8kConfig, PerplexityConfig
from qpissa.use.merge import MergeConfig

# command → (config, fields the command does not expose or exposes differently, CLI defaults that differ)
EXPOSED = {
    "decompose": [(DecomposeConfig, {"compute_dtype", "progress"}, {"device": "auto"})],
    "train": [(TrainConfig, {"model", "data_cfg", "progress"}, {"device": "auto"}),
              (DataConfig, set(), {})],
    "plan": [(PlanConfig, {"gpu_memory", "overhead", "device"}, {})],
    "convert": [(ConvertConfig, set(), {})],
    "merge": [(MergeConfig, {"shard_size"}, {"device": "auto"})],
    "eval": [(Gsm8kConfig, set(), {}), (PerplexityConfig, {"limit", "batch_size"}, {})],
    "compare": [(CompareConfig, {"model", "output", "progress"}, {})],
}


def _params(name: str) -> dict:
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("command", sorted(EXPOSED))
def test_every_field_is_an_option_with_its_default(command):
    params = _params(command)
    for cls, skip, cli_defaults in EXPOSED[command]:
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            assert f.name in params, f"{command}: {cls.__name__}.{f.name} is not an option"
            want = cli_defaults.get(f.name, f.default)
            if want is dataclasses.MISSING:
                assert params[f.name].required
            else:
                assert params[f.name].default == want, (command, f.name)
            assert f.metadata.get("help", "") in (params[f.name].help or ""), (command, f.name)


def test_an_option_declared_twice_is_refused():
    @dataclasses.dataclass
    class A:
        rank: int = dataclasses.field(default=1, metadata={"help": "r"})

    with pytest.raises(TypeError, match="declared twice"):
        with_options(a=Options(A), b=Options(A))(lambda a=None, b=None: None)


@pytest.mark.parametrize("cls,kwargs,flag", [
    (TrainConfig, dict(model="m", data="d", output="o", optim="sgd"), "--optim"),
    (PlanConfig, dict(dtype="int8"), "--dtype"),
    (ConvertConfig, dict(dtype="int8"), "--dtype"),
    (MergeConfig, dict(quantize="int4"), "--quantize"),
    (Gsm8kConfig, dict(prompt_style="emoji"), "--prompt-style"),
])
def test_choices_come_from_the_literal_types(cls, kwargs, flag):
    with pytest.raises(UserError, match=f"^{flag} '"):
        cls(**kwargs)


def test_one_blocksize_rule_for_decompose_and_plan():
    for make in (lambda: DecomposeConfig(blocksize=32), lambda: PlanConfig(blocksize=32)):
        with pytest.raises(UserError, match="--blocksize: blocksize 32 unsupported"):
            make()
    assert DecomposeConfig(blocksize=128).blocksize == PlanConfig(blocksize=128).blocksize == 128
