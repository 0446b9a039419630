"""What one decomposition is asked to do: :class:`DecomposeConfig`, the single declaration of every
``qpissa decompose`` option (the CLI derives its flags, defaults and help from these fields)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from qpissa.devices import DEVICE_HELP
from qpissa.errors import UserError
from qpissa.hub import REVISION_HELP
from qpissa.decompose.methods import CALIBRATED_METHODS, DEFAULT_DAMP, METHODS, Method, SvdOptions
from qpissa.quant import NF4Spec

# may differ on --resume (revision: the model's resolved snapshot path, commit included, is checked instead)
RUN_ONLY_FIELDS = ("resume", "overwrite", "progress", "device", "workers", "eval_kl", "revision")
# "auto" metrics (None): LoftQ baseline and full-spectrum norms only while the targets hold at most this many
# weights: all-MiniLM-L6-v2 (10.6M) gets them, SmolLM2-135M (106M) and larger models get Frobenius + QLoRA only
AUTO_FULL_METRICS_MAX_WEIGHTS = 32_000_000
USES_CALIBRATION = ("qpissa", "loftq", "cloq", "corda")  # inits fit in the output-error norm with --calib-data
AUTO_PARALLEL_MAX_WEIGHTS = 16 * 2**20  # auto workers: two tensors at a time while the largest is this small


@dataclass
class DecomposeConfig:
    """Arguments of one decomposition (also what ``--resume`` must match)."""

    method: Method = field(default="qpissa", metadata={
        "help": "lora | qlora | pissa | qpissa | loftq | cloq | corda | milora | olora (cloq, corda need --calib-data)"})
    rank: int = field(default=16, metadata={"help": "adapter rank r"})
    rank_allocation: Literal["uniform", "error"] = field(default="uniform", metadata={
        "help": "uniform: rank r everywhere | error: per-module ranks from each module's measured NF4 error curve "
                "(output error with --calib-data) on the same parameter budget (qpissa only; stored as PEFT "
                "rank_pattern)"})
    adapter_params: int | None = field(default=None, metadata={
        "help": "--rank-allocation error: adapter parameter budget (default: what uniform rank r costs)"})
    alpha: float | None = field(default=None, metadata={"help": "lora_alpha (default r)"})
    rslora: bool = field(default=False, metadata={"help": "scale α/√r"})
    iters: int = field(default=1, metadata={"help": "T iterations (qpissa, loftq)"})
    targets: list[str] | None = field(default=None, metadata={"help": "module names or regexes (repeatable)"})
    blocksize: int = field(default=NF4Spec.blocksize, metadata={"help": "NF4 block size"})
    double_quant: bool = field(default=NF4Spec.double_quant, metadata={"help": "NF4 double quantization"})
    compute_dtype: str = field(default=NF4Spec.compute_dtype, metadata={"help": "bnb_4bit_compute_dtype in config"})
    svd: Literal["randomized", "exact"] = field(default="randomized", metadata={
        "help": "randomized (default: p=16, q=4, seeded) | exact (LAPACK, slow)"})
    oversample: int = field(default=SvdOptions.oversample, metadata={"help": "randomized SVD oversampling"})
    power_iters: int = field(default=SvdOptions.power_iters, metadata={"help": "randomized SVD power iterations"})
    seed: int = field(default=SvdOptions.seed, metadata={"help": "seed"})
    dtype: Literal["float32", "float64"] = field(default="float32", metadata={"help": "SVD precision: float32 | float64"})
    adapter_dtype: Literal["bfloat16", "float16", "float32"] = field(default="bfloat16", metadata={
        "help": "stored adapter dtype"})
    balance_factors: bool | None = field(default=None, metadata={
        "help": "rescale each rank-1 pair of B, A by a power of two so ‖B_:,i‖ ≈ ‖A_i,:‖ (B·A unchanged bit for bit); "
                "default: on for calibrated inits (qpissa/loftq with --calib-data, cloq, corda), whose A carries "
                "H^-1/2 and trains worse unbalanced, off otherwise"})
    refit: bool = field(default=True, metadata={"help": "qpissa: refit A,B on the stored Q"})
    loftq_baseline: bool | None = field(default=None, metadata={
        "help": "measure LoftQ(T) too (default: auto, on when the targets hold ≤ 32M weights)"})
    spectral_norms: bool | None = field(default=None, metadata={
        "help": "nuclear/spectral norms too, one svdvals each (default: auto, on when the targets hold ≤ 32M weights)"})
    device: str = field(default="cpu", metadata={"help": DEVICE_HELP})
    workers: int | None = field(default=None, metadata={
        "help": "tensors decomposed at once (default: auto, 2 on a multi-core CPU while every target ≤ 16M weights)"})
    revision: str | None = field(default=None, metadata={"help": REVISION_HELP})
    experts_dtype: Literal["nf4", "bfloat16"] = field(default="nf4", metadata={
        "help": "MoE experts' residual: nf4 (default; load with qpissa.load) | bfloat16 (PiSSA residual, plain "
                "transformers + peft load it)"})
    expert_rank: int | None = field(default=None, metadata={
        "help": "MoE experts' adapter rank (default: --rank); 0: experts NF4 with no adapter, as QLoRA leaves them"})
    expert_batch: bool = field(default=True, metadata={
        "help": "decompose a block's experts of one kind as one batch (batched randomized SVD with a bf16 sketch, "
                "batched NF4); off: one matrix at a time"})
    calib_data: str | None = field(default=None, metadata={
        "help": "calibration data (.jsonl/.json/.parquet/.csv records, .txt lines or a Hub dataset id org/name): fit "
                "in the output-error norm ‖(W − Ŵ)·H^½‖ (qpissa/loftq become calibrated; cloq/corda require it)"})
    calib_split: str = field(default="train", metadata={"help": "split of a Hub --calib-data dataset"})
    calib_config: str | None = field(default=None, metadata={"help": "subset (config name) of a Hub --calib-data "
                                                                      "dataset, e.g. main for openai/gsm8k"})
    calib_samples: int = field(default=128, metadata={"help": "calibration sequences for H"})
    calib_holdout: int = field(default=32, metadata={"help": "held-out sequences after them (output-error report, KL)"})
    calib_seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence (truncated)"})
    calib_template: str = field(default="gsm8k", metadata={
        "help": "how records become text, as in train: gsm8k | alpaca | a format string, e.g. '{question}'"})
    calib_expert_tokens: int = field(default=32, metadata={
        "help": "MoE: an expert routed fewer calibration tokens than this keeps the uncalibrated method (counted "
                "in the report)"})
    damp: float = field(default=DEFAULT_DAMP, metadata={"help": "H damping λ: H + λ·mean(diag H)·I"})
    eval_kl: int = field(default=0, metadata={
        "help": "mean token KL(original ‖ initialized) on N held-out sequences (encoders: mean-pooled cosine)"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})
    progress: bool = field(default=True, metadata={"help": "progress bar on stderr (CLI: --quiet turns it off)"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Values alone (run at construction); whether the device exists is checked by :func:`decompose`."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.rank <= 0:
            raise UserError(f"--rank must be positive, got {self.rank}")
        if self.iters < 1:
            raise UserError(f"--iters must be at least 1, got {self.iters}")
        if self.rank_allocation not in ("uniform", "error"):
            raise UserError(f"--rank-allocation must be uniform or error, got {self.rank_allocation!r}")
        if self.rank_allocation == "error" and self.method != "qpissa":
            raise UserError(f"--rank-allocation error measures qpissa's error curves; --method {self.method} "
                            "takes --rank-allocation uniform")
        if self.adapter_params is not None and (self.rank_allocation != "error" or self.adapter_params <= 0):
            raise UserError("--adapter-params N needs --rank-allocation error and N > 0")
        if self.svd not in ("exact", "randomized"):
            raise UserError(f"--svd must be exact or randomized, got {self.svd!r}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.experts_dtype not in ("nf4", "bfloat16"):
            raise UserError(f"--experts-dtype must be nf4 or bfloat16, got {self.experts_dtype!r}")
        if self.expert_rank is not None and self.expert_rank < 0:
            raise UserError(f"--expert-rank must be 0 (no expert adapter) or positive, got {self.expert_rank}")
        if self.adapter_dtype not in ("bfloat16", "float16", "float32"):
            raise UserError(f"--adapter-dtype must be bfloat16, float16 or float32, got {self.adapter_dtype!r}")
        try:
            self.spec()
        except ValueError as err:
            raise UserError(f"--blocksize: {err}") from None
        if self.method in CALIBRATED_METHODS and not self.calib_data:
            raise UserError(f"--method {self.method} needs calibration data: pass --calib-data FILE")
        if self.calib_expert_tokens < 1:
            raise UserError(f"--calib-expert-tokens must be at least 1, got {self.calib_expert_tokens}")
        if self.eval_kl and not self.calib_data:
            raise UserError("--eval-kl N reads held-out calibration sequences: pass --calib-data FILE too")
        if self.eval_kl > self.calib_holdout:
            raise UserError(f"--eval-kl {self.eval_kl} exceeds --calib-holdout {self.calib_holdout}; raise the latter")

    def spec(self) -> NF4Spec:
        return NF4Spec(self.blocksize, self.double_quant, self.compute_dtype)

    def svd_options(self) -> SvdOptions:
        return SvdOptions(self.svd, self.oversample, self.power_iters, self.seed)

    def balances(self, calibrated: bool = True) -> bool:
        """``--balance-factors`` as given, else its default: on for a calibrated init (``calibrated``: this weight
        was fit with calibration statistics; an MoE expert with too few tokens was not)."""
        if self.balance_factors is not None:
            return self.balance_factors
        return calibrated and self.calib_data is not None and self.method in USES_CALIBRATION

    def identity(self) -> dict[str, Any]:
        """The fields that define the output (a resume must match them); the default balance_factors resolved."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_ONLY_FIELDS}
        return {**out, "balance_factors": self.balances()}

    def resolved(self, target_weights: int) -> "DecomposeConfig":
        """``loftq_baseline`` / ``spectral_norms`` left at auto (None) become True for targets holding at
        most :data:`AUTO_FULL_METRICS_MAX_WEIGHTS` weights in all, else False."""
        small = target_weights <= AUTO_FULL_METRICS_MAX_WEIGHTS
        return dataclasses.replace(self, loftq_baseline=small if self.loftq_baseline is None else self.loftq_baseline,
                                   spectral_norms=small if self.spectral_norms is None else self.spectral_norms)

    def metrics_computed(self, target_weights: int) -> dict[str, str]:
        """What the report measured and how (for report.json/csv/md and the console)."""
        r = self.resolved(target_weights)
        auto = [n for n, v in (("loftq_baseline", self.loftq_baseline), ("spectral_norms", self.spectral_norms))
                if v is None]
        how = "exact (svdvals)" if r.spectral_norms else "skipped"
        loftq = "exact" if (r.loftq_baseline or self.method == "loftq") else "skipped"
        out = {"frobenius": "exact", "nuclear": how, "spectral": how, "qlora_baseline": "exact",
               "loftq_baseline": loftq, "svd": self.svd}
        if self.calib_data:
            out["output_error"] = "exact: ‖(W − Ŵ)·H^½‖_F on the held-out sequences' H"
        if auto:
            out["auto"] = (f"{', '.join(auto)} auto: targets hold {target_weights:,} weights "
                           f"{'≤' if target_weights <= AUTO_FULL_METRICS_MAX_WEIGHTS else '>'} "
                           f"{AUTO_FULL_METRICS_MAX_WEIGHTS:,}; pass --loftq-baseline / --spectral-norms to force them")
        return out

