"""A run is a config file: ``--config run.yaml`` (keys = the config dataclass fields), flags override it, every run
writes the file that repeats it (OUT/config.yaml, RUN/config.yaml), bad files are one error line."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qpissa.cli.decompose import decompose as decompose_command
from qpissa.cli.entry import app, main
from qpissa.cli.plan import plan_cmd
from qpissa.cli.train import train_command
from qpissa.data import DataConfig
from qpissa.decompose.config import DecomposeConfig
from qpissa.errors import UserError
from qpissa.plan.memory import PlanConfig, parse_size
from qpissa.train.config import TrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMANDS = {"decompose": decompose_command, "train": train_command, "plan": plan_cmd}


def _qpissa(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``qpissa ARGS`` in this process through the real entry point (user errors: one stderr line, exit 2)."""
    monkeypatch.setattr(sys, "argv", ["qpissa", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_train_round_trip_through_run_config_yaml(smollm2_decomposed, tiny_data: Path, tmp_path: Path) -> None:
    """3 steps with flags; then ``--config RUN/config.yaml -o RUN2`` (a flag overriding the file's output) gives the
    same losses, and writes the same config but for the output."""
    out, run, run2 = smollm2_decomposed["qpissa"]["out"], tmp_path / "run", tmp_path / "run2"
    flags = ["train", str(out), "--data", str(tiny_data), "--steps", "3", "--batch-size", "1", "--max-length", "128",
             "--skip-long-prompts", "--lr", "5e-4", "--warmup-ratio", "0", "--device", "cpu", "--no-progress",
             "--save-every", "0", "-o", str(run)]
    res = CliRunner().invoke(app, flags)
    assert res.exit_code == 0, (res.output, res.exception)
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["model"] == str(out) and written["output"] == str(run) and written["steps"] == 3
    assert written["max_length"] == 128 and written["skip_long_prompts"] is True and written["lr"] == 5e-4
    assert "resume" not in written and set(written) == set(train_command.config_schema.keys) - {"resume"}
    assert (run / "config.json").exists()  # the library's own record stays beside it

    res = CliRunner().invoke(app, ["train", "--config", str(run / "config.yaml"), "-o", str(run2)])
    assert res.exit_code == 0, (res.output, res.exception)
    first, again = _losses(run), _losses(run2)
    assert len(first) == 3 and again == pytest.approx(first, rel=1e-6, abs=1e-7)
    assert yaml.safe_load((run2 / "config.yaml").read_text()) == {**written, "output": str(run2)}

    # RUN/config.json (the API's record: data_cfg nested, progress, no CLI-only keys) is a config file too
    run3 = tmp_path / "run3"
    res = CliRunner().invoke(app, ["train", "--config", str(run / "config.json"), "-o", str(run3)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert _losses(run3) == pytest.approx(first, rel=1e-6, abs=1e-7)
    assert yaml.safe_load((run3 / "config.yaml").read_text()) == {**written, "output": str(run3)}


@pytest.mark.slow
def test_run_config_records_the_template_detected_from_chat_data(smollm2_decomposed, tmp_path: Path) -> None:
    """messages data left at the default --template is trained as chat; RUN/config.yaml says chat, not gsm8k, so
    passing it back trains the same way."""
    out, run = smollm2_decomposed["qpissa"]["out"], tmp_path / "run"
    data = Path(__file__).parent / "fixtures" / "chat" / "train.jsonl"
    res = CliRunner().invoke(app, ["train", str(out), "--data", str(data), "--data-limit", "2", "--steps", "1",
                                   "--batch-size", "1", "--max-length", "96", "--device", "cpu", "--no-progress",
                                   "-o", str(run)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert yaml.safe_load((run / "config.yaml").read_text())["template"] == "chat"
    assert json.loads((run / "config.json").read_text())["data_cfg"]["template"] == "chat"


def test_a_flag_overrides_the_file_and_json_works(minilm_dir: Path, tmp_path: Path) -> None:
    """plan (config.json only, fast): the file's rank loses to --rank; its other keys, dashed or not, are used."""
    cfg = tmp_path / "plan.json"
    cfg.write_text(json.dumps({"model": str(minilm_dir), "rank": 8, "batch-size": 3, "seq_len": 128,
                               "device": "cpu", "decompose": False}))
    res = CliRunner().invoke(app, ["plan", "--config", str(cfg), "--rank", "4", "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, (res.output, res.exception)
    planned = json.loads((tmp_path / "p.json").read_text())["config"]
    assert (planned["rank"], planned["batch_size"], planned["seq_len"], planned["device"]) == (4, 3, 128, "cpu")


def test_decompose_writes_out_config_yaml_that_repeats_it(minilm_dir: Path, tmp_path: Path) -> None:
    out, out2 = tmp_path / "out", tmp_path / "out2"
    res = CliRunner().invoke(app, ["decompose", str(minilm_dir), "-o", str(out), "--rank", "4", "--targets",
                                   r"encoder\.layer\.0\.attention\.self\.query", "--no-loftq-baseline",
                                   "--no-spectral-norms", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, (res.output, res.exception)
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["model"] == str(minilm_dir) and written["output"] == str(out) and written["rank"] == 4
    assert written["targets"] == [r"encoder\.layer\.0\.attention\.self\.query"] and "overwrite" not in written
    values = decompose_command.config_schema.read(out / "config.yaml", section="decompose")
    assert values["model"] == str(minilm_dir) and values["targets"] == written["targets"]

    res = CliRunner().invoke(app, ["decompose", "--config", str(out / "config.yaml"), "-o", str(out2)])
    assert res.exit_code == 0, (res.output, res.exception)
    name = "adapter/adapter_model.safetensors"
    assert (out2 / name).read_bytes() == (out / name).read_bytes()


def test_unknown_key_is_one_line_naming_the_closest(monkeypatch, capsys, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: out\ndata: train.jsonl\noutput: run\nbatch_szie: 2\n")
    code, err = _qpissa(monkeypatch, capsys, "train", "--config", cfg)
    assert code == 2 and err.splitlines() == [f"error: {cfg}: unknown key 'batch_szie'; did you mean 'batch_size'?"]


@pytest.mark.parametrize("text,where,expected", [
    ("steps: three", "steps", "an integer, got str 'three'"),
    ("rank: '8'", "rank", "an integer, got str '8'"),
    ("packing: 'yes'", "packing", "true or false, got str 'yes'"),
    ("lr: fast", "lr", "a number, got str 'fast'"),
    ("data: null", "data", "a string, got null"),
])
def test_wrong_type_is_one_line_naming_the_key(monkeypatch, capsys, tmp_path: Path, text, where, expected) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: out\noutput: run\n{text}\n")
    code, err = _qpissa(monkeypatch, capsys, "decompose" if where == "rank" else "train", "--config", cfg)
    assert code == 2 and err.splitlines() == [f"error: {cfg}: {where}: expected {expected}"]


def test_file_values_convert_like_flags(tmp_path: Path) -> None:
    """Dashes, a flag's own name, YAML 1.1's ``2e-5`` (a string there) for a float, one target as a string."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 2e-5\nwarmup-ratio: 0\nmax_length: 64\n")
    assert train_command.config_schema.read(cfg) == {"lr": 2e-5, "warmup_ratio": 0.0, "max_length": 64}
    cfg.write_text("targets: q_proj\noutput: o\n")
    assert decompose_command.config_schema.read(cfg) == {"targets": ["q_proj"], "out": "o"}


def test_a_missing_positional_or_section_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: train.jsonl\noutput: run\n")
    res = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    assert res.exit_code == 2 and "Missing argument 'model'" in res.output
    cfg.write_text("train:\n  steps: 1\ndecompose:\n  rank: 4\n")
    with pytest.raises(UserError, match=r"no `plan:` section \(it has train, decompose\)"):
        plan_cmd.config_schema.read(cfg, section="plan")
    cfg.write_text("- rank\n")
    with pytest.raises(UserError, match="expected a mapping of option names to values, got a list"):
        plan_cmd.config_schema.read(cfg)
    with pytest.raises(UserError, match=r"unknown suffix '\.toml'"):
        plan_cmd.config_schema.read(tmp_path / "run.toml")


def _dataclasses_of(command: str, values: dict) -> list:
    """The config dataclasses a command builds from ``values`` (parameter → value), as far as they are given."""
    def pick(cls: type) -> dict:
        return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}

    if command == "decompose":
        return [DecomposeConfig(**pick(DecomposeConfig))]
    if command == "plan":  # the command parses sizes itself
        return [PlanConfig(**{**pick(PlanConfig), "gpu_memory": parse_size(values.get("gpu_memory", "80GB"))})]
    data_cfg = DataConfig(**pick(DataConfig))
    return [TrainConfig(**{**pick(TrainConfig), "data_cfg": data_cfg}), data_cfg]


# accelerate-*.yaml are `accelerate launch --config_file` files (FSDP launch settings), not qpissa run configs
@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("accelerate-")))
def test_example_configs_are_valid(example: str) -> None:
    """Every key of every section is an option of that command, of the right type; the dataclasses accept them."""
    sections = yaml.safe_load((EXAMPLES / example).read_text())
    assert set(sections) <= set(COMMANDS) and {"decompose", "train"} <= set(sections), example
    for command in sections:
        values = COMMANDS[command].config_schema.read(EXAMPLES / example, section=command)
        assert len(values) == len(sections[command])
        assert _dataclasses_of(command, values)
