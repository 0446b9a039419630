"""Experiment trackers for ``qpissa train --report-to``: the metrics rows, also sent to TensorBoard or W&B.

RUN/metrics.jsonl and RUN/loss.png are written whatever the tracker. One interface: :func:`start` with the run's
resolved config (the hyperparameters), :meth:`Tracker.log` once per optimizer step with the row of metrics.jsonl,
:meth:`Tracker.finish` at the end (also a ``with`` block: finish on exit, marked failed on an exception). Only rank
0 tracks. Tags follow transformers' Trainer: ``train/loss``, ``train/lr``, … and ``eval/loss``.

Resume (from RUN/checkpoint-S, after a run that may have logged steps past S before it stopped):
  tensorboard  RUN/tensorboard/, opened with ``purge_step=S+1``: TensorBoard hides the old events from step S+1 on,
               so every step shows once (the resumed run logs them again, with the same losses). A fresh run in
               a RUN without checkpoints (an attempt that died before its first one) hides them all.
  wandb        the same W&B run id (kept in RUN/wandb/qpissa-run-id), ``resume="allow"``; W&B ignores steps below
               its last one (those duplicates carry the same losses, since a resumed run reproduces them).
               The mode is W&B's own: ``WANDB_MODE=offline`` keeps everything in RUN/wandb/ (``wandb sync`` later).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from qpissa.errors import UserError

def require(kind: str) -> None:
    """One line (exit 2) when the tracker's package is missing: call before loading any weights."""
    if kind == "none":
        return
    import importlib

    try:
        importlib.import_module(kind)  # the package is named as the tracker
    except ImportError:
        raise UserError(f"{kind} is not installed: pip install {kind} (or pip install \"qpissa[{kind}]\"), "
                        "or drop --report-to") from None


def tags(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row → tracker tags (``step`` is the x axis, not a value)."""
    return {("eval/loss" if k == "eval_loss" else f"train/{k}"): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float))}


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → {"data_cfg.max_length": 512, …}: numbers and strings, None dropped, anything else str."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{prefix}{k}."))
        elif v is not None:
            out[prefix + k] = v if isinstance(v, (int, float, str)) else str(v)
    return out


class Tracker:
    """No tracker (``--report-to none``); the base of the others."""

    def log(self, row: dict[str, Any], step: int) -> None:
        pass

    def finish(self, ok: bool = True) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(ok=exc_type is None)


class TensorBoard(Tracker):
    def __init__(self, run: Path, hparams: dict[str, Any], resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # a fresh run (step 0) hides all events of an earlier attempt in RUN, a resumed one those after its checkpoint
        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1 if resume_step else 0)
        exp, ssi, self._end = hparams_summary(flat_hparams(hparams), {"train/loss": None, "eval/loss": None})
        writer = self.writer._get_file_writer()
        writer.add_summary(exp)
        writer.add_summary(ssi)

    def log(self, row: dict[str, Any], step: int) -> None:
        for tag, value in tags(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps its events; one flush per optimizer step is cheap

    def finish(self, ok: bool = True) -> None:
        if ok:
            self.writer._get_file_writer().add_summary(self._end)
        self.writer.close()


class Wandb(Tracker):
    def __init__(self, run: Path, hparams: dict[str, Any], resume_step: int) -> None:
        import wandb

        id_file = run / "wandb" / "qpissa-run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if resume_step > 0 and id_file.exists() else None
        if run_id is None:
            run_id = secrets.token_hex(4)  # W&B's id format: 8 lowercase letters/digits
            id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "qpissa"), name=run.name, dir=str(run),
                                  config=hparams, id=run_id, resume="allow")
        except wandb.errors.Error as err:  # e.g. "No API key configured"
            raise UserError(f"--report-to wandb: {err} (or set WANDB_MODE=offline to log into {run}/wandb only)"
                            ) from None

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(tags(row), step=step)

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def start(kind: str, run: Path, hparams: dict[str, Any], resume_step: int = 0) -> Tracker:
    """Open the ``--report-to`` tracker of ``run``; ``resume_step``: the step of the checkpoint resumed from."""
    require(kind)
    if kind == "tensorboard":
        return TensorBoard(run, hparams, resume_step)
    if kind == "wandb":
        return Wandb(run, hparams, resume_step)
    return Tracker()
