"""What one study compares: :class:`CompareConfig`, the single declaration of every ``qpissa compare`` option.

Options that mean the same as a ``decompose`` or ``train`` option take that option's default and help from
its own declaration (:func:`same_as`), so the study cannot drift from the stages it runs.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from qpissa.data import DataConfig
from qpissa.decompose.config import DecomposeConfig
from qpissa.decompose.methods import METHODS
from qpissa.errors import UserError
from qpissa.train.config import TrainConfig

CALIBRATED_SUFFIX = "-cal"  # qpissa-cal, loftq-cal: the calibrated variants (decompose with --calib-data)
ALLOC_SUFFIX = "-alloc"  # qpissa-alloc, qpissa-cal-alloc: --rank-allocation error on the same budget
BALANCE_SUFFIX = "-bal"  # qpissa-cal-bal, …: --balance-factors (B·A unchanged, ‖B_:,i‖ ≈ ‖A_i,:‖); in every label
NO_BALANCE_SUFFIX = "-nobal"  # qpissa-cal-nobal, cloq-nobal: a calibrated init unbalanced (its label has no suffix)
ITERATED = ("qpissa", "loftq")  # methods whose T is a study option (name:T overrides it)
CALIBRATED_ONLY = ("cloq", "corda")  # methods that always read the calibration data
TRAIN_ONLY = ("lora", "full")  # trained from the original checkpoint (train --method lora|full), nothing to decompose
# identity: the fields that define a study's results; the others may change on --resume / --report
RUN_ONLY_FIELDS = ("output", "resume", "report", "device", "progress", "task_batch_size")
# what a study stored before an option existed was computed with, where that is not the option's default now:
# calibrated inits were unbalanced until balancing became the default (docs/study/main's qpissa-cal and cloq)
LEGACY_DEFAULTS = {"no_balance_factors": True}


def same_as(cls: type, name: str, **changes: Any) -> Any:
    """A dataclass field with the default and help of ``cls.name`` (declared once, there)."""
    src = next(f for f in dataclasses.fields(cls) if f.name == name)
    kwargs: dict[str, Any] = {"metadata": {"help": src.metadata.get("help", "")}}
    if src.default is not dataclasses.MISSING:
        kwargs["default"] = src.default
    elif src.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        kwargs["default_factory"] = src.default_factory  # type: ignore[misc]
    kwargs.update(changes)
    return field(**kwargs)


@dataclass(frozen=True)
class MethodSpec:
    """One column of the study: a decompose method (or LoRA), its T, and whether it is calibrated."""

    name: str  # decompose method, or "lora"
    iters: int = 1
    calibrated: bool = False
    allocation: str = "uniform"  # decompose --rank-allocation
    balance: bool = False  # decompose --balance-factors

    @property
    def label(self) -> str:
        """``qpissa(5)``, ``qpissa-cal-bal(5)``, ``qpissa-alloc(5)``, ``cloq-bal``: what tables and plots call it
        (``-bal``: balanced factors; a calibrated init without it is unbalanced, e.g. ``qpissa-cal(5)``)."""
        base = self.name + (CALIBRATED_SUFFIX if self.calibrated and self.name in ITERATED else "")
        base += (ALLOC_SUFFIX if self.allocation == "error" else "") + (BALANCE_SUFFIX if self.balance else "")
        return f"{base}({self.iters})" if self.name in ITERATED else base

    @property
    def key(self) -> str:
        """The folder name: the label without parentheses (``qpissa-cal-T5``)."""
        return re.sub(r"\((\d+)\)", r"-T\1", self.label)


def parse_methods(text: str, iters: int, balance: bool = True) -> list[MethodSpec]:
    """``qlora,loftq,qpissa:5,qpissa-cal,cloq`` → specs; ``name:T`` overrides ``--iters`` for qpissa/loftq.
    Variants (in this order): ``-cal`` calibrated, ``-alloc`` error-based rank allocation (qpissa), ``-bal``
    balanced factors, e.g. ``qpissa-cal-bal:5``, ``qpissa-alloc:5``. Calibrated inits are balanced when ``balance``
    (decompose's default), ``-nobal`` unbalances one: ``qpissa-cal`` = ``qpissa-cal-bal``, ``qpissa-cal-nobal``."""
    known = [*TRAIN_ONLY, *METHODS, *(m + CALIBRATED_SUFFIX for m in ITERATED)]
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, t = item.partition(":")
        suffix = next((x for x in (BALANCE_SUFFIX, NO_BALANCE_SUFFIX) if name.endswith(x)), "")
        bare = name.removesuffix(suffix)
        if suffix and (bare.split("-")[0] in ITERATED and (suffix == BALANCE_SUFFIX or CALIBRATED_SUFFIX in bare)
                       or bare in CALIBRATED_ONLY):
            name = bare
        else:
            suffix = ""
        alloc = name.endswith(ALLOC_SUFFIX) and name.startswith("qpissa")
        name = name.removesuffix(ALLOC_SUFFIX) if alloc else name
        if name not in known:
            raise UserError(f"--methods: unknown method {name!r}; choose from {', '.join(known)}")
        calibrated = name.endswith(CALIBRATED_SUFFIX) or name in CALIBRATED_ONLY
        balanced = suffix == BALANCE_SUFFIX or (not suffix and balance and calibrated)
        base = name.removesuffix(CALIBRATED_SUFFIX)
        if t and base not in ITERATED:
            raise UserError(f"--methods: {item!r}: only {' and '.join(ITERATED)} take a number of iterations")
        try:
            n = int(t) if t else iters
        except ValueError:
            raise UserError(f"--methods: {item!r}: iterations must be an integer, e.g. qpissa:5") from None
        if n < 1:
            raise UserError(f"--methods: {item!r}: iterations must be at least 1")
        specs.append(MethodSpec(base, n if base in ITERATED else 1, calibrated, "error" if alloc else "uniform",
                                balanced))
    if not specs:
        raise UserError("--methods: name at least one method, e.g. qlora,qpissa")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"--methods: {sorted({x for x in labels if labels.count(x) > 1})[0]} is listed twice")
    return specs


def parse_numbers(text: str, what: str, kind: type) -> list:
    """``0,1,2`` → [0, 1, 2] (``kind`` int or float); one line naming the flag when it does not parse."""
    try:
        values = [kind(s) for s in (x.strip() for x in text.split(",")) if s]
    except ValueError:
        raise UserError(f"{what} {text!r}: give comma-separated {'integers' if kind is int else 'numbers'}, "
                        f"e.g. {'0,1,2' if kind is int else '5e-5,2e-4'}") from None
    if not values:
        raise UserError(f"{what}: give at least one value")
    if len(set(values)) != len(values):
        raise UserError(f"{what} {text!r}: a value is listed twice")
    return values


@dataclass
class CompareConfig:
    """One study: methods × seeds × learning rates on the same data. Field metadata is the CLI help text."""

    model: str = field(metadata={"help": "original HF causal LM: a local folder or a hub id org/name"})
    data: str = field(default="", metadata={"help": "training data (as in train)"})
    eval_data: str = field(default="", metadata={"help": "held-out data: loss during training, and --task gsm8k"})
    data_config: str | None = same_as(TrainConfig, "data_config")
    data_limit: int | None = same_as(TrainConfig, "data_limit")
    output: str = field(default="", metadata={"help": "study directory STUDY"})
    methods: str = field(default="qlora,loftq,qpissa,cloq", metadata={
        "help": "comma-separated: lora, full (every weight, fp32), a decompose method (qlora, loftq, qpissa, pissa, "
                "cloq, corda, milora, olora) or qpissa-cal / loftq-cal (calibrated); name:T sets T, e.g. qpissa:5; "
                "suffix -alloc (qpissa: --rank-allocation error) and/or -bal (--balance-factors, the default of "
                "calibrated inits; -nobal turns it off for one), e.g. qpissa-alloc:5, qpissa-cal-nobal:5"})
    seeds: str = field(default="0,1,2", metadata={"help": "comma-separated training seeds (data order, LoRA init)"})
    lr: float = same_as(TrainConfig, "lr", default=2e-4)
    lr_sweep: str | None = field(default=None, metadata={
        "help": "comma-separated learning rates to sweep instead of --lr, e.g. 5e-5,2e-4,5e-4"})
    steps: int = field(default=200, metadata={"help": "optimizer steps per run"})
    rank: int = same_as(DecomposeConfig, "rank")
    iters: int = same_as(DecomposeConfig, "iters", default=5, metadata={"help": "T for qpissa and loftq (name:T overrides)"})
    targets: list[str] | None = same_as(DecomposeConfig, "targets")
    calib_data: str | None = field(default=None, metadata={
        "help": "calibration data for cloq, corda, qpissa-cal, loftq-cal and --init-kl (default: --data)"})
    calib_samples: int = same_as(DecomposeConfig, "calib_samples")
    calib_seq_len: int = same_as(DecomposeConfig, "calib_seq_len")
    init_kl: int = field(default=0, metadata={
        "help": "mean token KL(original ‖ initialized) of each init on N held-out calibration sequences"})
    batch_size: int = same_as(TrainConfig, "batch_size")
    grad_accum: int = same_as(TrainConfig, "grad_accum")
    max_length: int = same_as(DataConfig, "max_length")
    template: str = same_as(DataConfig, "template")
    skip_long_prompts: bool = same_as(DataConfig, "skip_long_prompts")
    warmup_ratio: float = same_as(TrainConfig, "warmup_ratio")
    schedule: Literal["cosine", "linear", "constant"] = same_as(TrainConfig, "schedule")
    precision: Literal["bf16", "fp32"] = same_as(TrainConfig, "precision")
    eval_every: int = field(default=50, metadata={"help": "held-out loss every N steps (and before step 1)"})
    eval_examples: int = field(default=100, metadata={"help": "held-out examples for the loss"})
    task: Literal["none", "gsm8k", "classification"] = field(default="none", metadata={
        "help": "none | gsm8k (after training: answer accuracy on --eval-data, greedy) | classification (train a "
                "sequence-classification head, e.g. on an encoder, and score it on --eval-data: accuracy, or GLUE's "
                "metric for --data-config)"})
    objective: Literal["sft", "dpo", "simpo"] = same_as(TrainConfig, "objective")
    beta: float | None = same_as(TrainConfig, "beta")
    dpo_loss: Literal["sigmoid", "ipo"] = same_as(TrainConfig, "dpo_loss")
    reference: Literal["precompute", "adapter"] = same_as(TrainConfig, "reference")
    max_prompt_length: int | None = same_as(TrainConfig, "max_prompt_length")
    text_field: str | None = same_as(TrainConfig, "text_field")
    text_pair_field: str | None = same_as(TrainConfig, "text_pair_field")
    label_field: str = same_as(TrainConfig, "label_field")
    num_labels: int | None = same_as(TrainConfig, "num_labels")
    task_limit: int | None = field(default=None, metadata={"help": "gsm8k, classification: first N held-out rows"})
    task_batch_size: int = field(default=8, metadata={"help": "gsm8k: prompts per generate call; classification: "
                                                              "rows per forward"})
    max_new_tokens: int = field(default=256, metadata={"help": "gsm8k: generation budget"})
    device: Literal["auto", "cpu", "cuda"] = same_as(TrainConfig, "device", default="auto")
    no_balance_factors: bool = field(default=False, metadata={
        "help": "calibrated inits (qpissa-cal, loftq-cal, cloq, corda) unbalanced, as before balancing became "
                "decompose's default; a method's -bal suffix still balances it"})
    resume: bool = field(default=False, metadata={"help": "finish an interrupted study (only what is missing)"})
    report: bool = field(default=False, metadata={"help": "only regenerate results/summary/curves from STUDY"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr"})

    def __post_init__(self) -> None:
        from qpissa.choices import check_choices

        check_choices(self)
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.eval_every < 0 or self.eval_examples < 1:
            raise UserError("--eval-every must be ≥ 0 and --eval-examples ≥ 1")
        if self.objective != "sft" and self.task != "none":
            raise UserError(f"--objective {self.objective} scores held-out preference pairs (accuracy, margin); "
                            "it takes --task none")
        if self.objective != "sft" and not self.calib_data and any(s.calibrated for s in self.specs()):
            raise UserError(f"--objective {self.objective}: calibrated methods read prompt/response text; pass "
                            "--calib-data (e.g. the SFT data the pairs came from, with its --template)")
        self.specs(), self.seed_list(), self.lrs()  # parse now: a bad list is one line before any work

    def specs(self) -> list[MethodSpec]:
        return parse_methods(self.methods, self.iters, balance=not self.no_balance_factors)

    def seed_list(self) -> list[int]:
        return parse_numbers(self.seeds, "--seeds", int)

    def lrs(self) -> list[float]:
        return parse_numbers(self.lr_sweep, "--lr-sweep", float) if self.lr_sweep else [self.lr]

    def calibration(self) -> str:
        return self.calib_data or self.data

    def identity(self) -> dict[str, Any]:
        """What defines the study's results: a study folder holding another identity is refused."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_ONLY_FIELDS}
