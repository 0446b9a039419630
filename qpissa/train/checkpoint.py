"""Training checkpoints: RUN/checkpoint-STEP/ = PEFT adapter (plain-peft loadable) + trainer state.

Layout of one checkpoint directory (written to a temporary sibling, then renamed, so a kill
never leaves a half checkpoint that ``--resume`` would pick up):

    adapter_config.json, adapter_model.safetensors   PEFT adapter in the training dtype (fp32)
      (or model.safetensors + config.json for full fine-tuning)
    trainer_state.pt    optimizer, LR scheduler, RNG states (torch, cuda, python, numpy),
                        step, data position (epoch, index), tokens seen, the run's config
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from qpissa.data import DataPosition
from qpissa.errors import UserError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue identically."""

    step: int = 0
    pos: DataPosition = field(default_factory=DataPosition)
    tokens: int = 0
    elapsed_s: float = 0.0


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir`` sorted by step."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, config: dict[str, Any],
                    keep_last: int, full: bool) -> Path:
    """Write RUN/checkpoint-STEP atomically, then delete all but the newest ``keep_last`` checkpoints."""
    final = run_dir / f"checkpoint-{state.step}"
    tmp = run_dir / f".checkpoint-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        with open(tmp / STATE_FILE, "wb") as fh:  # a file object: a full disk surfaces as ENOSPC, not "unexpected pos"
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                        "state": {**asdict(state), "pos": asdict(state.pos)}, "config": config, "full": full}, fh)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, full: bool) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; return the saved TrainState."""
    blob = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    if blob.get("fsdp", False):
        raise UserError(f"{ckpt} was written by an --fsdp run (its optimizer is sharded in dcp/); resume it with "
                        "--fsdp (any number of ranks)")
    if blob.get("full", False) != full:
        raise UserError(f"{ckpt} was written by a {'full' if blob.get('full') else 'adapter'} fine-tuning run; "
                        "resume it with the same --method")
    if full:
        weights = load_file(str(ckpt / "model.safetensors"))
        missing, _ = model.load_state_dict(weights, strict=False)
        if [k for k in missing if "lm_head" not in k]:
            raise UserError(f"{ckpt}/model.safetensors lacks {missing[0]}; it belongs to another model")
    else:
        from peft import set_peft_model_state_dict

        weights = load_file(str(ckpt / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise UserError(f"{ckpt}: adapter tensor {result.unexpected_keys[0]} does not fit this model; "
                            "resume with the same OUT directory")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    s = blob["state"]
    return TrainState(step=s["step"], pos=DataPosition(**s["pos"]), tokens=s["tokens"], elapsed_s=s["elapsed_s"])


def save_final(run: Path, model, save_dtype: str, full: bool,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """RUN/adapter (PEFT dir, plain-peft loadable) or RUN/model (full fine-tuning), written atomically.

    ``state_dict``: the weights to write instead of the model's own (``--fsdp`` gathers its shards)."""
    import os
    import shutil

    final = run / ("model" if full else "adapter")
    tmp = run / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    if save_dtype == "bfloat16" and not full:
        from safetensors.torch import load_file, save_file

        f = tmp / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def check_output(cfg) -> dict[str, Any] | None:
    """Before any weights are read: an earlier run in ``cfg.output`` needs ``--resume`` (never overwritten); a
    finished one resumed with no checkpoint left returns its summary (nothing to do)."""
    run = Path(cfg.output)
    existing = list_checkpoints(run)
    done = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    if (existing or "adapter" in done) and not cfg.resume:
        held = existing[-1][1].name if existing else "a finished run (summary.json)"
        raise UserError(f"{cfg.output} already holds {held}; pass --resume to continue or a new --output")
    return done if cfg.resume and "adapter" in done and not existing else None


def kept(run: Path) -> str | None:
    """What a failed or interrupted run leaves worth keeping in ``run`` (None: nothing; the folder may go)."""
    if (run / "summary.json").is_file() and "adapter" in json.loads((run / "summary.json").read_text()):
        return "the finished run"
    existing = list_checkpoints(run)
    if existing:
        return f"{existing[-1][1].name} (--resume continues from step {existing[-1][0]})"
    steps = len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").is_file() else 0
    return (f"metrics.jsonl ({steps} row{'s' * (steps != 1)}) but no checkpoint yet (a rerun starts at step 0)"
            if steps else None)


def bytes_needed(cfg) -> int | None:
    """About what the rest of a run writes: one more checkpoint (written before the older one is deleted) and the
    final adapter; from the newest checkpoint, else from OUT/adapter's size (fp32 factors + AdamW's two states)."""
    from qpissa.atomic import size_of
    from qpissa.formats import read_header

    existing = list_checkpoints(Path(cfg.output))
    if existing:
        weights = next((p for p in existing[-1][1].glob("*.safetensors")), None)
        return size_of(existing[-1][1]) + (size_of(weights) if weights else 0)
    init = Path(cfg.model) / "adapter" / "adapter_model.safetensors"
    if cfg.method != "from-out" or not init.is_file():
        return None
    numel = sum(int(np.prod(v["shape"])) for k, v in read_header(init).items() if k != "__metadata__")
    return 4 * numel * 4
