"""Checkpoints of an ``--fsdp`` run: the usual RUN/checkpoint-STEP plus the sharded state in ``dcp/``.

    adapter_config.json, adapter_model.safetensors   the whole adapter (rank 0, plain-PEFT loadable)
    trainer_state.pt    scheduler, RNG, step, data position, config (as single-process; no optimizer)
    dcp/                adapter + AdamW states as DTensors, written by every rank with
                        ``torch.distributed.checkpoint``; loads onto any number of ranks

Every rank calls these functions at the same point (they are collective). The directory is
assembled in a temporary sibling and renamed by rank 0 after all ranks finished writing, so a
killed run never leaves a half checkpoint that ``--resume`` would pick up. All ranks must see the
same RUN directory (one machine, or a shared filesystem across nodes).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpissa.data import DataPosition
from qpissa.distributed import Dist
from qpissa.errors import UserError
from qpissa.train import checkpoint as ckpt_lib
from qpissa.train.fsdp import barrier, full_adapter_state

DCP_DIR = "dcp"


def save_checkpoint(run: Path, model: nn.Module, optimizer, scheduler, state: ckpt_lib.TrainState,
                    config: dict[str, Any], keep_last: int, d: Dist) -> Path:
    """Write RUN/checkpoint-STEP (collective), then prune all but the newest ``keep_last``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    final = run / f"checkpoint-{state.step}"
    tmp = run / f".checkpoint-{state.step}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    adapter = full_adapter_state(model)
    if d.is_main:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=adapter)
        torch.save({"scheduler": scheduler.state_dict(), "rng": ckpt_lib.rng_state(),
                    "state": {**asdict(state), "pos": asdict(state.pos)}, "config": config, "full": False,
                    "fsdp": True}, tmp / ckpt_lib.STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in ckpt_lib.list_checkpoints(run)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer, scheduler) -> ckpt_lib.TrainState:
    """Restore the sharded adapter + optimizer (resharded onto this run's ranks), scheduler and RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    blob = torch.load(ckpt / ckpt_lib.STATE_FILE, map_location="cpu", weights_only=False)
    if not blob.get("fsdp", False) or not (ckpt / DCP_DIR).is_dir():
        raise UserError(f"{ckpt} was written by a run without --fsdp; resume it without --fsdp")
    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR))
    # not strict: the frozen residual is not in the checkpoint (dcp.load already failed on a missing adapter key)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    scheduler.load_state_dict(blob["scheduler"])
    ckpt_lib.set_rng_state(blob["rng"])
    s = blob["state"]
    return ckpt_lib.TrainState(step=s["step"], pos=DataPosition(**s["pos"]), tokens=s["tokens"],
                               elapsed_s=s["elapsed_s"])


def save_final(run: Path, model: nn.Module, save_dtype: str, d: Dist) -> Path:
    """RUN/adapter in exactly the single-process format (gathered on every rank, written by rank 0)."""
    adapter = full_adapter_state(model)
    final = run / "adapter"
    if d.is_main:
        final = ckpt_lib.save_final(run, model, save_dtype, full=False, state_dict=adapter)
    barrier(d)
    return final
