"""``qpissa train --report-to``: TensorBoard event files and W&B offline runs hold the numbers of RUN/metrics.jsonl,
and a resumed run shows every step once. Read back with each tool's own reader (EventAccumulator, wandb's protobuf
records), not through qpissa."""
from __future__ import annotations

import json
import shutil
import struct
import time
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from qpissa.data import DataConfig
from qpissa.errors import UserError
from qpissa.train import TrainConfig, train
from qpissa.train import trackers


def test_unknown_or_missing_tracker_is_one_line(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="--report-to"):
        TrainConfig(model="out", data="d.jsonl", output="run", report_to="mlflow")
    for kind in ("tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, kind, None)  # import fails as if not installed
        cfg = TrainConfig(model=str(tmp_path / "no-out"), data=str(tmp_path / "no.jsonl"), output=str(tmp_path / "run"),
                          report_to=kind)
        with pytest.raises(UserError, match=f"^{kind} is not installed: pip install {kind} "):
            train(cfg)  # before the data (missing here) and the model are looked at


@pytest.mark.slow
def test_tensorboard_matches_metrics_and_resume_purges(smollm2_decomposed, tiny_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    cfg = TrainConfig(model=str(smollm2_decomposed["qpissa"]["out"]), data=str(tiny_data), output=str(run), steps=4,
                      batch_size=2, lr=5e-4, warmup_ratio=0.0, save_every=2, stop_after=3, progress=False,
                      report_to="tensorboard", data_cfg=DataConfig(max_length=128, skip_long_prompts=True))
    train(cfg)
    shutil.rmtree(run / "checkpoint-3")  # as if killed after logging step 3, before its checkpoint was written
    train(replace(cfg, stop_after=None, resume=True))  # from checkpoint-2: logs steps 3 and 4 (again)

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per process
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens", "tokens")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4], tag  # the first run's step 3 is purged, not doubled
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), tag  # float32 events
    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lr"].number_value == 5e-4 and hparams["data_cfg.max_length"].number_value == 128
    assert hparams["report_to"].string_value == "tensorboard"


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: LevelDB log format (32 KiB blocks; 7-byte chunk headers: crc32,
    length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after a 7-byte ':W&B' file header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(chunks)
            chunks = b""


def test_wandb_offline_run_and_resume(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's stdout capture alone
    run = tmp_path / "run"
    run.mkdir()
    hparams = {"lr": 5e-4, "data_cfg": {"max_length": 128}, "eval_data": None}
    rows = [{"step": 0, "eval_loss": 2.5, "tokens": 0}] + [
        {"step": s, "loss": 2.0 / s, "lr": 5e-4, "tokens": 100 * s} for s in (1, 2, 3)]
    with trackers.start("wandb", run, hparams) as tracker:
        for row in rows:
            tracker.log(row, row["step"])
    with trackers.start("wandb", run, hparams, resume_step=2) as tracker:  # resumed from checkpoint-2
        tracker.log({"step": 3, "loss": 2.0 / 3, "lr": 5e-4, "tokens": 300}, 3)
        tracker.log({"step": 4, "loss": 0.5, "lr": 5e-4, "tokens": 400}, 4)

    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # two processes, one W&B run id
    first = [r for r in _wandb_records(files[0])]
    history = {r.history.step.num: {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                    for i in r.history.item if not (i.key or "/".join(i.nested_key)).startswith("_")}
               for r in first if r.WhichOneof("record_type") == "history"}  # "train/loss" is a nested key
    assert history == {0: {"eval/loss": 2.5, "train/tokens": 0},
                       **{s: {"train/loss": 2.0 / s, "train/lr": 5e-4, "train/tokens": 100 * s} for s in (1, 2, 3)}}
    config = {i.key: json.loads(i.value_json) for r in first if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    assert config["lr"] == 5e-4 and config["data_cfg"] == {"max_length": 128}
    resumed, deadline = [], time.monotonic() + 30
    while not resumed and time.monotonic() < deadline:  # W&B's service may still be flushing on a loaded machine
        resumed = [r.history.step.num for r in _wandb_records(files[1]) if r.WhichOneof("record_type") == "history"]
        time.sleep(0.0 if resumed else 0.5)
    assert resumed and resumed[-1] == 4


def test_wandb_without_login_is_one_line(tmp_path: Path) -> None:
    """Online mode without an API key: a UserError naming WANDB_MODE=offline (in a fresh process: wandb keeps its
    settings process-wide once a run started)."""
    pytest.importorskip("wandb")
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")  # no ~/.netrc: not logged in
    script = ("from pathlib import Path; from qpissa.errors import UserError; from qpissa.train import trackers\n"
              "try:\n    trackers.start('wandb', Path('run'), {'lr': 1e-4})\n"
              "except UserError as err:\n    print(err)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("--report-to wandb: ") and "WANDB_MODE=offline" in proc.stdout, proc.stdout
