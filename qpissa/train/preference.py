"""Preference objectives (``--objective dpo|simpo``) on the one loop: the losses and :class:`PreferenceTask`.

With log π(y) = Σ_completion-tokens log p_θ(y_t | x, y_<t) (the prompt is context only) and the reference π_ref
= the STARTING policy (residual + the starting adapter, frozen):

  DPO (Rafailov et al. 2023)  Δ = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)]
      sigmoid   loss = −log σ(β·Δ)                     (log 2 at step 0, where π = π_ref)
      ipo       loss = (Δ̄ − 1/(2β))²  (Azar et al. 2023; Δ̄ uses per-token means of the log-ratios, as TRL)
      rewards   r(y) = β·(log π(y) − log π_ref(y))    (0 at step 0)
  SimPO (Meng et al. 2024)     loss = −log σ(β·(log π(c)/|c| − log π(r)/|r|) − γ)
      rewards   r(y) = β·log π(y)/|y|  (no reference)

Reference-free SimPO was chosen over ORPO because it is a pure pairwise loss on the same two forwards (ORPO adds
an SFT term whose units — tokens — differ from the pairs DPO averages over) and needs nothing from the start, so it
is immune to the PiSSA pitfall by construction: for a PiSSA/QPiSSA adapter "adapter disabled" is the residual
(the principal part removed), not π_ref. ``--reference precompute`` (default) computes log π_ref of every train
and held-out pair once before step 1 (RUN/reference_logps.safetensors, reused by ``--resume``);
``--reference adapter`` keeps a frozen copy of the starting trainable weights and swaps it in for a no-grad
forward per micro-batch (twice the adapter memory, no pass over the data).

Per step the loop logs the loss and rewards_chosen / rewards_rejected / rewards_margin (their difference) /
rewards_accuracy (share of pairs with r(c) > r(r)), means over the step's pairs; ``--eval-data`` the same as eval_*.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from qpissa.data import DataPosition, shuffled_batches
from qpissa.preference import Pair, collate_pairs

REFERENCE_FILE = "reference_logps.safetensors"
STAT_KEYS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ log p of each completion (B, 2), its token count (B, 2), the logits) for a :func:`collate_pairs` batch."""
    B, _, T = batch["input_ids"].shape
    out = model(input_ids=batch["input_ids"].view(2 * B, T), attention_mask=batch["attention_mask"].view(2 * B, T))
    logits = out.logits[:, :-1].float()  # (2B, T-1, V): position t predicts token t+1
    labels = batch["labels"].view(2 * B, T)[:, 1:]  # (2B, T-1)
    valid = labels != -100
    picked = logits.gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
    token = (picked - torch.logsumexp(logits, dim=-1)) * valid  # log p of each completion token, 0 elsewhere
    return token.sum(-1).view(B, 2), valid.sum(-1).view(B, 2), out.logits


def preference_loss(logps: torch.Tensor, ref: torch.Tensor | None, lengths: torch.Tensor, objective: str,
                    beta: float, dpo_loss: str = "sigmoid", simpo_gamma: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Per-pair losses (B,) and the rewards (see the module docstring); logps/ref/lengths are (B, 2)."""
    if objective == "simpo":
        avg = logps / lengths.clamp(min=1)  # (B, 2)
        losses = -F.logsigmoid(beta * (avg[:, 0] - avg[:, 1]) - simpo_gamma)
        rewards = beta * avg.detach()
    else:
        ratio = logps - ref  # (B, 2): log π − log π_ref
        if dpo_loss == "ipo":
            avg = ratio / lengths.clamp(min=1)
            losses = (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * (ratio[:, 0] - ratio[:, 1]))
        rewards = beta * ratio.detach()
    return losses, {"rewards_chosen": rewards[:, 0], "rewards_rejected": rewards[:, 1],
                    "rewards_margin": rewards[:, 0] - rewards[:, 1],
                    "rewards_accuracy": (rewards[:, 0] > rewards[:, 1]).float()}


@contextmanager
def swapped(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """The trainable weights temporarily replaced by ``values`` (the frozen starting copy), restored after."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


@dataclass
class PreferenceTask:
    """``--objective dpo|simpo``: batches of pairs, loss units = pairs, held-out loss and reward metrics."""

    pairs: list[Pair]
    held: list[Pair]
    pad_id: int
    batch_size: int
    precision: str
    objective: str
    beta: float
    dpo_loss: str = "sigmoid"
    simpo_gamma: float = 0.5
    reference: str = "precompute"
    ref: dict[str, torch.Tensor] = field(default_factory=dict)  # "train"/"eval" → (rows, 2) log π_ref by source row
    snapshot: list[torch.Tensor] | None = None  # --reference adapter: the starting trainable weights
    params: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.objective

    @property
    def config_extra(self) -> dict[str, Any]:
        return {}

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"

    def __len__(self) -> int:
        return len(self.pairs)

    def fingerprint(self) -> str:
        """What the stored reference log-probs were computed on: the token ids of every pair (train and eval)."""
        import hashlib

        h = hashlib.sha256()
        for p in [*self.pairs, None, *self.held]:
            h.update(repr(None if p is None else (p.index, p.prompt, p.chosen, p.rejected)).encode())
        return h.hexdigest()

    def stream(self, batch_size: int, seed: int, pos: DataPosition):
        return shuffled_batches(self.pairs, batch_size, seed, pos, lambda chunk: collate_pairs(chunk, self.pad_id))

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])  # pairs: the loss is a mean over them

    def has_eval(self) -> bool:
        return bool(self.held)

    def prepare(self, model, run: Path, device: str, is_main: bool) -> None:
        """Before any checkpoint is loaded (the model holds the STARTING adapter): snapshot it (``adapter``) or
        compute log π_ref of every pair once, or read what an earlier start of this run stored."""
        if not self.needs_reference:
            return
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.reference == "adapter":
            self.snapshot = [p.detach().clone() for p in self.params]
            return
        from safetensors.torch import load_file

        from qpissa.formats import save_tensors

        from safetensors import safe_open

        path, fingerprint = run / REFERENCE_FILE, self.fingerprint()
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("pairs")
            if stored == fingerprint:  # --resume (or a restart of a killed run) on the same pairs
                self.ref = load_file(str(path))
                return
        self.ref = {"train": self._logps(model, self.pairs, device)}
        if self.held:
            self.ref["eval"] = self._logps(model, self.held, device)
        if is_main:
            run.mkdir(parents=True, exist_ok=True)
            save_tensors(path, self.ref, {"pairs": fingerprint})

    @torch.no_grad()
    def _logps(self, model, pairs: list[Pair], device: str) -> torch.Tensor:
        """(rows, 2) float64 Σ log p of chosen / rejected for every pair, by source row (NaN for dropped rows)."""
        was_training = model.training
        model.eval()
        out = torch.full((max(p.index for p in pairs) + 1, 2), math.nan, dtype=torch.float64)
        for i in range(0, len(pairs), self.batch_size):
            batch = collate_pairs(pairs[i:i + self.batch_size], self.pad_id)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logps, _, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
            out[batch["index"]] = logps.double().cpu()
        model.train(was_training)
        return out

    def _reference(self, model, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor | None:
        if not self.needs_reference:
            return None
        if self.snapshot is not None:
            with swapped(self.params, self.snapshot), torch.no_grad():
                return sequence_logps(model, batch)[0].detach()
        return self.ref[split][batch["index"].cpu()].to(batch["input_ids"].device, torch.float32)  # (B, 2)

    def forward(self, model, batch: dict[str, torch.Tensor], split: str = "train") -> SimpleNamespace:
        """The loop's ``out``: ``loss`` (mean over the micro-batch's pairs), ``logits``, ``stats`` (means)."""
        ref = self._reference(model, batch, split)
        logps, lengths, logits = sequence_logps(model, batch)
        losses, rewards = preference_loss(logps, ref, lengths, self.objective, self.beta, self.dpo_loss,
                                          self.simpo_gamma)
        return SimpleNamespace(loss=losses.mean(), logits=logits,
                               stats={k: float(v.float().mean()) for k, v in rewards.items()})

    @torch.no_grad()
    def evaluate(self, model, device: str) -> dict[str, float]:
        """Held-out pairs in file order: mean loss and reward metrics over all of them."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        for i in range(0, len(self.held), self.batch_size):
            chunk = self.held[i:i + self.batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, self.pad_id).items()}
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out = self.forward(model, batch, "eval")
            for k, v in {"loss": float(out.loss), **out.stats}.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
        model.train(was_training)
        return {f"eval_{k}": v / len(self.held) for k, v in sums.items()}
