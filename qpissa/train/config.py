"""One training run: :class:`TrainConfig`, the single declaration of every ``qpissa train`` option."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qpissa.choices import check_choices
from qpissa.data import DataConfig
from qpissa.errors import UserError
from qpissa.hub import REVISION_HELP


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """One training run. Field metadata is the CLI help text."""

    model: str = field(metadata={"help": "decompose OUT dir (residual/ + adapter/), or an HF checkpoint (folder or "
                                         "Hub id org/name) for --method lora|full"})
    data: str = field(metadata={"help": "training data: .jsonl/.json/.parquet/.csv, a save_to_disk dir or a Hub "
                                        "dataset id org/name"})
    output: str = field(metadata={"help": "run directory RUN"})
    task: Literal["causal-lm", "classification"] = field(default="causal-lm", metadata={
        "help": "causal-lm: next-token fine-tuning of the response; classification: a sequence-classification head "
                "(AutoModelForSequenceClassification; encoders such as BERT/MiniLM too) trained in full with the "
                "adapter, --num-labels 1 = regression"})
    text_field: str | None = field(default=None, metadata={
        "help": "classification: the text column (default: GLUE's, e.g. sentence or sentence1/sentence2, or text)"})
    text_pair_field: str | None = field(default=None, metadata={
        "help": "classification: a second text column, tokenized as the pair [CLS] a [SEP] b [SEP]"})
    label_field: str = field(default="label", metadata={"help": "classification: the label column"})
    num_labels: int | None = field(default=None, metadata={
        "help": "classification: number of classes (default: from the data); 1 = regression (MSE)"})
    objective: Literal["sft", "dpo", "simpo"] = field(default="sft", metadata={
        "help": "causal-lm: sft (next-token CE on the response), dpo (preference pairs vs the starting policy as "
                "reference) or simpo (reference-free, length-normalized); dpo/simpo read prompt/chosen/rejected rows "
                "(text or chat turns), see docs/dpo.md"})
    beta: float | None = field(default=None, metadata={
        "help": "dpo/simpo: β, the reward scale (default 0.1 for dpo, 2.0 for simpo)"})
    dpo_loss: Literal["sigmoid", "ipo"] = field(default="sigmoid", metadata={
        "help": "dpo: sigmoid (−log σ(βΔ), Rafailov et al.) or ipo ((Δ̄ − 1/2β)², Azar et al.; per-token means)"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "simpo: the target reward margin γ"})
    reference: Literal["precompute", "adapter"] = field(default="precompute", metadata={
        "help": "dpo: the reference (the starting policy) as log-probs computed once before training "
                "(RUN/reference_logps.safetensors) or as a frozen copy of the starting adapter (no pass over the data, "
                "twice the adapter memory)"})
    prompt_field: str = field(default="prompt", metadata={"help": "dpo/simpo: the prompt column"})
    chosen_field: str = field(default="chosen", metadata={"help": "dpo/simpo: the preferred completion column"})
    rejected_field: str = field(default="rejected", metadata={"help": "dpo/simpo: the dispreferred completion column"})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "dpo/simpo: keep only the last N prompt tokens (before --max-length cuts the completions' ends)"})
    method: Literal["from-out", "lora", "full"] = field(default="from-out", metadata={
        "help": "from-out: train OUT/adapter on OUT/residual; lora/full: baselines on the original checkpoint (a quantized release is dequantized)"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out data for eval loss (file, dir or Hub id)"})
    data_split: str = field(default="train", metadata={"help": "split of a Hub dataset (or save_to_disk dir) for "
                                                                "--data"})
    eval_split: str = field(default="test", metadata={"help": "split of a Hub dataset (or save_to_disk dir) for "
                                                               "--eval-data"})
    data_config: str | None = field(default=None, metadata={"help": "subset (config name) of the Hub dataset(s), "
                                                                     "e.g. main for openai/gsm8k"})
    data_limit: int | None = field(default=None, metadata={"help": "train on the first N rows of --data only"})
    revision: str | None = field(default=None, metadata={"help": REVISION_HELP + "; --method lora|full"})
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
    eval_at_start: bool = field(default=False, metadata={"help": "held-out loss of the initialization too "
                                                                    "(logged as step 0)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "keep the newest K checkpoints"})
    report_to: Literal["none", "tensorboard", "wandb"] = field(default="none", metadata={
        "help": "also send the metrics to TensorBoard (RUN/tensorboard) or Weights & Biases (RUN/wandb; "
                "WANDB_MODE=offline keeps it local); RUN/metrics.jsonl and loss.png are always written"})
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
    fsdp: bool = field(default=False, metadata={
        "help": "shard the NF4 residual, adapters, gradients and AdamW states over the ranks of torchrun "
                "(FSDP2, one unit per transformer block); --optim adamw"})
    fsdp_offload: bool = field(default=False, metadata={"help": "with --fsdp: keep the sharded parameters, "
                                                                "gradients and optimizer states in CPU memory"})
    progress: bool = field(default=True, metadata={"help": "show a rich progress bar"})

    def __post_init__(self) -> None:
        check_choices(self)
        if self.revision is not None and self.method == "from-out":
            raise UserError("--revision picks a Hub checkpoint for --method lora|full; a decompose OUT dir is local")
        if self.fsdp_offload and not self.fsdp:
            raise UserError("--fsdp-offload offloads the shards of --fsdp: pass --fsdp too")
        if self.fsdp:
            unsupported = {"--method full": self.method == "full",
                           f"--optim {self.optim}": self.optim != "adamw",
                           "--sorsa-gamma": self.sorsa_gamma > 0, "--kernels triton": self.kernels == "triton"}
            bad = [flag for flag, on in unsupported.items() if on]
            if bad:
                why = (" (bitsandbytes' 8-bit AdamW takes whole tensors, not FSDP's sharded DTensors)"
                       if self.optim != "adamw" else "")
                raise UserError(f"--fsdp does not support {bad[0]}{why}; use --optim adamw and --method from-out|lora "
                                "without --sorsa-gamma/--kernels")
        if self.objective != "sft":
            if self.task != "causal-lm" or self.sorsa_gamma > 0 or self.data_cfg.packing:
                raise UserError(f"--objective {self.objective} trains a causal LM on pairs: it does not take "
                                "--task classification, --sorsa-gamma or --packing")
            if self.beta is None:
                self.beta = 2.0 if self.objective == "simpo" else 0.1
            if not self.beta > 0:
                raise UserError(f"--beta {self.beta}: pass a positive number (0.1 is DPO's usual value)")
        if self.data_limit is not None and self.data_limit < 1:
            raise UserError(f"--data-limit {self.data_limit}: pass a positive number of rows")
