"""One training run: :class:`TrainConfig`, the single declaration of every ``qpissa train`` option."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qpissa.choices import check_choices
from qpissa.data import DataConfig
from qpissa.errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """One training run. Field metadata is the CLI help text."""

    model: str = field(metadata={"help": "decompose OUT dir (residual/ + adapter/), or an HF checkpoint for "
                                         "--method lora|full"})
    data: str = field(metadata={"help": "training data: .jsonl/.json/.parquet/.csv or a save_to_disk dir"})
    output: str = field(metadata={"help": "run directory RUN"})
    method: Literal["from-out", "lora", "full"] = field(default="from-out", metadata={
        "help": "from-out: train OUT/adapter on OUT/residual; lora/full: baselines on an unquantized checkpoint"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out data for eval loss"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides --epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "epochs when --steps is not given"})
    batch_size: int = field(default=4, metadata={"help": "micro-batch size"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate η_max"})
    schedule: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={"help": "LR decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    optim: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = field(default="adamw", metadata={
        "help": "torch AdamW or bitsandbytes 8-bit AdamW (paged: CUDA unified memory)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    sorsa_gamma: float = field(default=0.0, metadata={"help": "SORSA regularizer strength γ (4e-4 in the paper)"})
    lora_rank: int = field(default=16, metadata={"help": "rank for --method lora"})
    lora_alpha: float | None = field(default=None, metadata={"help": "alpha for --method lora (default: rank)"})
    data_cfg: DataConfig = field(default_factory=DataConfig)
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_examples: int = field(default=200, metadata={"help": "at most this many held-out examples"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "keep the newest K checkpoints"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest RUN/checkpoint-*"})
    stop_after: int | None = field(default=None, metadata={"help": "stop (with a checkpoint) after this step; "
                                                                    "the schedule still spans --steps"})
    seed: int = field(default=0, metadata={"help": "seed for data order and initialization"})
    device: Literal["auto", "cpu", "cuda"] = field(default="cpu", metadata={
        "help": "where to train: auto | cpu | cuda (auto: cuda when available)"})
    precision: Literal["bf16", "fp32"] = field(default="bf16", metadata={"help": "autocast dtype for compute"})
    save_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "dtype of RUN/adapter (checkpoints are always fp32)"})
    kernels: Literal["none", "triton"] = field(default="none", metadata={"help": "fused NF4 kernels (CUDA)"})
    progress: bool = field(default=True, metadata={"help": "show a rich progress bar"})

    def __post_init__(self) -> None:
        check_choices(self)
