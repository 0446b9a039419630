"""Memory planner: config.json → bytes per component of (Q)PiSSA / (Q)LoRA / full fine-tuning, no weights needed.

Weights (bitsandbytes NF4, Dettmers et al. 2023, "QLoRA", arXiv:2305.14314), for a quantized m×n linear:
    packed   = ⌈mn/2⌉ bytes (two 4-bit codes per byte)
    absmax   = 4·⌈mn/bs⌉ bytes (fp32 per block), or with double quant
               ⌈mn/bs⌉ (uint8) + 4·⌈⌈mn/bs⌉/256⌉ (fp32 per 256 blocks) + 4·256 (nested code) + 4 (offset)
    quant map= 4·16 bytes (the NF4 code)
Adapters (Hu et al. 2021, "LoRA"; Meng et al. 2024, "PiSSA", arXiv:2404.02948): r·(m+n) params per target,
stored in ``adapter_dtype`` (PEFT's default ``autocast_adapter_dtype=True`` makes them fp32), gradients in
the same dtype, an fp32 master copy when they are 16-bit, AdamW m and v in fp32 (8 B/param); bitsandbytes
8-bit Adam: 2 B/param + fp32 absmax per 256 values per state + two 256-entry maps per tensor.

Activations saved for backward, per token per Llama block (c = compute bytes, a_d = adapter bytes,
h hidden, q = heads·head_dim, k = kv_heads·head_dim, i intermediate, H heads, r rank):
    8h                      two RMSNorm inputs kept in fp32 (HF upcasts before the variance)
    + c·(q + 2k)            q, k after RoPE and v, saved by SDPA (GQA native, no repeat_kv)
    + c·q + 4H              SDPA output + fp32 log-sum-exp (flash kernels: no L×L matrix)
    + 3c·i                  gate out (SiLU input), SiLU out and up out (both saved by the product)
    + Σ_targets a_d·r       each LoRA A output, saved by lora_B
    + LoRA inputs           c·n once per distinct input tensor (norm outs h, attention out q, product i),
                            or a_d·n per target when adapters are cast (fp32 adapters on a bf16 model)
  e.g. SmolLM2-135M, bf16, fp32 adapters on all 7, r=16: 8·576 + 2·(576+384) + 2·576 + 36 + 6·1536
       + 7·64 + 4·(3·576 + 576 + 2·576 + 1536) = 37,348 B per token per layer — exactly the sum of
       the tensors autograd saves (checked with ``torch.autograd.graph.saved_tensors_hooks``).
Loss of a causal LM (B·L·V logits): bf16 logits, their fp32 copy and the fp32 log-softmax kept for
backward, then two fp32 gradient buffers: peak = B·L·V·max(c + 8, 12) bytes (3 GiB for SmolLM2 at B·L=16k!).
With gradient checkpointing each block keeps only its input (c·h per token) and one block is recomputed
in backward. BERT blocks (post-LN, GELU, biased linears) are derived the same way in
:func:`bert_layer_bytes`; with attention dropout SDPA falls back to the math kernel that keeps the
H×L×L probabilities, their dropout mask and the dropped copy (c bytes each, on CPU).
Transients: one dequantized weight (largest quantized linear, in the base dtype) and a few activation
gradients of the widest layer (3c·i per token). CUDA context + cuBLAS workspace: ``overhead``.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from qpissa.choices import check_choices
from qpissa.errors import UserError
from qpissa.quant import NF4Spec
from qpissa.plan.component import Component
from qpissa.plan.fsdp_memory import fsdp_components
from qpissa.plan.model_shapes import ModelShapes, ParamGroup

Method = Literal["qpissa", "qlora", "loftq", "pissa", "lora", "full"]
Optim = Literal["adamw", "adamw8bit", "paged_adamw8bit", "sgd"]
DType = Literal["bf16", "fp16", "fp32"]
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
QUANTIZED: tuple[str, ...] = ("qpissa", "qlora", "loftq")
DECOMPOSED: tuple[str, ...] = (*QUANTIZED, "pissa")  # the model comes from `qpissa decompose`
GiB = 1024 ** 3


@dataclass(frozen=True)
class PlanConfig:
    """Training setup; the metadata is the CLI help text."""

    method: Method = field(default="qpissa", metadata={"help": "qpissa|qlora|loftq (NF4 base), pissa|lora, full"})
    rank: int = field(default=128, metadata={"help": "adapter rank r"})
    targets: str = field(default="all", metadata={"help": "all|attn|mlp or comma names (q_proj,v_proj)"})
    batch_size: int = field(default=1, metadata={"help": "micro-batch size B"})
    seq_len: int = field(default=2048, metadata={"help": "tokens per sequence L"})
    optim: Optim = field(default="adamw", metadata={"help": "adamw (fp32 m,v), adamw8bit, paged_adamw8bit, sgd"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    gpu_memory: int = field(default=80 * 10 ** 9, metadata={"help": "device memory in bytes"})
    blocksize: int = field(default=NF4Spec.blocksize, metadata={"help": "NF4 block size"})
    double_quant: bool = field(default=NF4Spec.double_quant, metadata={"help": "quantize the absmax too (bnb nested)"})
    dtype: DType = field(default="bf16", metadata={"help": "compute dtype and dtype of unquantized tensors"})
    adapter_dtype: DType = field(default="fp32", metadata={"help": "PEFT upcasts adapters to fp32 by default"})
    overhead: int = field(default=GiB, metadata={"help": "CUDA context + workspace bytes (0 on CPU)"})
    experts_dtype: Literal["nf4", "bfloat16"] = field(default="nf4", metadata={
        "help": "MoE experts as decompose --experts-dtype stores them: nf4 (default) or bfloat16 (plain residual)"})
    expert_rank: int | None = field(default=None, metadata={
        "help": "MoE experts' adapter rank as decompose --expert-rank (default: --rank; 0: no expert adapter)"})
    gpus: int = field(default=1, metadata={"help": "devices (ranks) training together; per-rank memory is shown"})
    fsdp: bool = field(default=False, metadata={"help": "FSDP (train --fsdp): weights, adapters, grads, optimizer /N"})
    fsdp_offload: bool = field(default=False, metadata={"help": "with --fsdp: sharded state in CPU RAM, not on the "
                                                                "device (train --fsdp-offload)"})
    device: Literal["cuda", "cpu"] = field(default="cuda", metadata={
        "help": "cuda: fused dropout (bool masks) and flash SDPA with dropout; cpu: masks in the compute dtype "
                "and the math SDPA kernel when attention dropout is on"})

    def __post_init__(self) -> None:
        check_choices(self)
        try:
            NF4Spec(self.blocksize)
        except ValueError as err:
            raise UserError(f"--blocksize: {err}") from None
        if self.expert_rank is not None and self.expert_rank < 0:
            raise UserError(f"--expert-rank must be 0 (no expert adapter) or positive, got {self.expert_rank}")
        if self.gpus < 1 or (self.fsdp_offload and not self.fsdp):
            raise UserError("--gpus must be at least 1, and --fsdp-offload needs --fsdp")


@dataclass
class Plan:
    model_type: str
    n_params: int
    trainable: int
    config: PlanConfig
    components: list[Component]

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def fits(self) -> bool:
        return self.total <= self.config.gpu_memory

    def get(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    def to_dict(self) -> dict:
        cfg = asdict(self.config)
        return {"model_type": self.model_type, "n_params": self.n_params, "trainable_params": self.trainable,
                "config": cfg, "components": [asdict(c) for c in self.components],
                "total_bytes": self.total, "fits": self.fits}


# ---------------------------------------------------------------- weights

def nf4_bytes(numel: int, blocksize: int = NF4Spec.blocksize, double_quant: bool = False) -> dict[str, int]:
    """Bytes bitsandbytes stores for one NF4 tensor: packed codes, absmax (nested with double quant), code."""
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        absmax = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
    else:
        absmax = 4 * blocks
    return {"packed": math.ceil(numel / 2), "absmax": absmax, "quant_map": 4 * 16}


def select_targets(shapes: ModelShapes, targets: str) -> list[ParamGroup]:
    """PEFT-style target selection: ``all`` = every linear but the LM head (PEFT's "all-linear"),
    ``attn``/``mlp`` = that group of each block, else comma-separated module names matched on the last
    name component (so BERT's ``dense`` also matches the pooler, as in PEFT)."""
    lin = [p for p in shapes.params if p.kind == "linear"]
    if targets == "all":
        return lin
    if targets in ("attn", "mlp"):
        return [p for p in lin if p.group == targets]
    names = [t.strip() for t in targets.split(",") if t.strip()]
    chosen = [p for p in lin if p.short in names]
    unknown = sorted(set(names) - {p.short for p in lin})
    if unknown or not chosen:
        raise UserError(f"--targets: no linear named {', '.join(unknown) or targets!r} in this {shapes.model_type} "
                        f"model; choose all|attn|mlp or some of {', '.join(sorted({p.short for p in lin}))}")
    return chosen


def decompose_targets(shapes: ModelShapes, targets: str) -> list[ParamGroup]:
    """What ``qpissa decompose`` adapts (and NF4-quantizes): ``all`` = the linears inside blocks, its
    default, so a BERT pooler stays as it is; other selections as :func:`select_targets`."""
    chosen = select_targets(shapes, targets)
    return [p for p in chosen if p.group != "other"] if targets == "all" else chosen


def quantized_linears(s: ModelShapes, cfg: PlanConfig) -> list[ParamGroup]:
    """The linears ``qpissa decompose --targets`` stores in NF4 for a quantized method: exactly the targets
    (every other linear stays full precision, listed in ``llm_int8_skip_modules``)."""
    quant = decompose_targets(s, cfg.targets) if cfg.method in QUANTIZED else []
    return [p for p in quant if ".experts." not in p.name] if cfg.experts_dtype == "bfloat16" else quant


def adapter_params(targets: list[ParamGroup], rank: int, expert_rank: int | None = None) -> int:
    """r·(in + out) per target module (lora_A: r×in, lora_B: out×r); experts at ``expert_rank`` when given."""
    return sum(target_rank(p, rank, expert_rank) * (p.shape[0] + p.shape[1]) * p.count for p in targets)


def target_rank(p: ParamGroup, rank: int, expert_rank: int | None) -> int:
    """The adapter rank of target row ``p``: ``expert_rank`` for MoE experts when set (0: no adapter)."""
    return expert_rank if expert_rank is not None and ".experts." in p.name else rank


def optimizer_bytes(params: list[int], optim: Optim) -> int:
    """State bytes for parameter tensors of the given sizes: AdamW fp32 m, v (8 B/param); bnb 8-bit Adam
    (block 256, tensors under 4096 elements stay 32-bit); SGD without momentum keeps nothing."""
    if optim == "sgd":
        return 0
    if optim == "adamw":
        return 8 * sum(params)
    total = 0
    for n in params:
        total += 8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 256 * 4
    return total


# ---------------------------------------------------------------- activations

# which tensor feeds each block linear (linears sharing an input save it once when nothing casts it)
LLAMA_INPUTS = {"q_proj": "ln1", "k_proj": "ln1", "v_proj": "ln1", "o_proj": "attn",
                "gate_proj": "ln2", "up_proj": "ln2", "down_proj": "act"}
BERT_INPUTS = {"query": "x", "key": "x", "value": "x"}


def llama_layer_bytes(s: ModelShapes, cfg: PlanConfig, targets: list[ParamGroup]) -> int:
    """Bytes saved for backward per token by one Llama block (formula in the module docstring)."""
    c, ad = BYTES[cfg.dtype], BYTES[cfg.adapter_dtype]
    q, k, h, i, H = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate, s.heads
    fixed = 8 * h + c * (q + 2 * k) + c * q + 4 * H + 3 * c * i
    return fixed + _lora_saved(targets, s.layers, c, ad, cfg.rank, LLAMA_INPUTS)


def bert_layer_bytes(s: ModelShapes, cfg: PlanConfig, targets: list[ParamGroup], seq_len: int) -> int:
    """Bytes saved per token by one BERT block: q, k, v (3c·h, SDPA inputs); attention: on CUDA flash/
    efficient kernels (dropout fused) keep their output c·h + 4H, on CPU with attention dropout the math
    kernel keeps the H×L×L softmax, dropout mask and dropped copy (3c·H·L); two hidden-dropout masks (1 byte
    on CUDA, c on CPU where dropout is ``x * mask``), two LayerNorm inputs (2c·h), the GELU input c·i,
    plus the LoRA inputs (block input, attention context, LN1 output, GELU output) and intermediates."""
    c, ad, h, i, H = BYTES[cfg.dtype], BYTES[cfg.adapter_dtype], s.hidden, s.intermediate, s.heads
    cuda, drop = cfg.device == "cuda", s.attention_dropout > 0
    attn = 3 * c * H * seq_len if (drop and not cuda) else c * h + 4 * H
    mask = (1 if cuda else c) * h
    fixed = 3 * c * h + attn + 2 * mask + 2 * c * h + c * i
    block = [p for p in targets if p.count == s.layers]           # the pooler sees one token per sequence
    return fixed + _lora_saved(block, s.layers, c, ad, cfg.rank, BERT_INPUTS, bert_dense=True)


def _lora_saved(targets: list[ParamGroup], layers: int, c: int, ad: int, rank: int, source: dict[str, str],
                bert_dense: bool = False) -> int:
    """LoRA's saved tensors per token per block: A's input (shared in compute dtype, or one cast copy per
    target) and A's output (a_d·r)."""
    total, inputs = 0, {}
    for p in targets:
        if p.count != layers:
            continue
        src = source.get(p.short) or (p.name if bert_dense else p.short)
        n = p.shape[1]
        total += ad * rank
        if ad != c:
            total += ad * n
        else:
            inputs[src] = c * n
    return total + sum(inputs.values())


def activation_components(s: ModelShapes, cfg: PlanConfig, targets: list[ParamGroup]) -> list[Component]:
    """Saved activations, loss buffers and backward transients for one micro-batch."""
    T, c = cfg.batch_size * cfg.seq_len, BYTES[cfg.dtype]
    if cfg.method == "full":
        targets = []           # full fine-tuning: the base linears save their inputs instead of LoRA
    per_layer = (llama_layer_bytes(s, cfg, targets) if s.family == "llama"
                 else bert_layer_bytes(s, cfg, targets, cfg.seq_len))
    if cfg.method == "full":   # trainable base weights: every linear keeps its (shared) input
        block = [p for p in s.params if p.kind == "linear" and p.count == s.layers]
        per_layer += _lora_saved(block, s.layers, c, c, 0, LLAMA_INPUTS if s.family == "llama" else BERT_INPUTS,
                                 bert_dense=s.family == "bert")
    edge = 4 * s.hidden if s.family == "llama" else (c + 1) * s.hidden   # final norm / embedding LN+dropout
    logits = T * s.vocab * max(c + 8, 12) if s.causal_lm else 0
    widest = 3 * c * s.intermediate
    if s.family == "bert" and s.attention_dropout > 0 and cfg.device == "cpu":
        widest = max(widest, 2 * c * s.heads * cfg.seq_len)
    quant = quantized_linears(s, cfg)
    dequant = max((p.numel for p in quant), default=0) * BYTES.get(s.dtype, 2)
    experts = sum(p.numel * p.count for p in quant if ".experts." in p.name) // s.layers  # one block's experts
    copies = 1 if cfg.expert_rank == 0 else 2  # qpissa.moe: the stack, then PEFT's W + s·B·A (none at rank 0)
    dequant = max(dequant, copies * experts * BYTES.get(s.dtype, 2))
    if cfg.experts_dtype == "bfloat16":  # stored dense: only PEFT's W + s·B·A of one block's experts
        dense = sum(p.numel * p.count for p in s.params if ".experts." in p.name) // max(s.layers, 1)
        dequant = max(dequant, dense * BYTES.get(s.dtype, 2))
    if cfg.grad_checkpointing:
        saved = T * (s.layers * c * s.hidden + edge)
        recompute = T * per_layer
        peak_extra = max(logits, recompute + T * widest)
        block = f"one block {per_layer:,} B/token + grads"
        return [Component("activations", saved, f"checkpointed block inputs {s.layers}×{c}·h B/token"),
                Component("recompute+loss" if s.causal_lm else "recompute", peak_extra,
                          f"max(logits {T}×V×{max(c + 8, 12)} B, {block})" if s.causal_lm else block),
                Component("transient", dequant, "one dequantized base weight in backward")]
    return [Component("activations", T * (s.layers * per_layer + edge),
                      f"{s.layers} blocks × {per_layer:,} B/token × {T} tokens"),
            *([Component("loss (logits)", logits, f"{T} tokens × vocab {s.vocab} × {max(c + 8, 12)} B")]
              if s.causal_lm else []),  # an encoder without LM head has no logits
            Component("transient", dequant + (0 if logits else T * widest),
                      "one dequantized base weight + activation grads of the widest layer")]


# ---------------------------------------------------------------- the plan

def plan(s: ModelShapes, cfg: PlanConfig) -> Plan:
    """Bytes per component for one training step of micro-batch ``batch_size``."""
    if cfg.rank < 1 or cfg.batch_size < 1 or cfg.seq_len < 1:
        raise UserError("--rank, --batch-size and --seq-len must be positive integers")
    if s.max_positions and s.family == "bert" and cfg.seq_len > s.max_positions:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds max_position_embeddings {s.max_positions} of this "
                        f"{s.model_type} model (absolute positions); use --seq-len {s.max_positions} or less")
    c, ad = BYTES[cfg.dtype], BYTES[cfg.adapter_dtype]
    quantized = cfg.method in QUANTIZED
    pick = decompose_targets if cfg.method in DECOMPOSED else select_targets
    targets = pick(s, cfg.targets) if cfg.method != "full" else []
    lin = [p for p in s.params if p.kind == "linear"]
    quant = quantized_linears(s, cfg)
    comps: list[Component] = []
    if quantized:
        nf = {"packed": 0, "absmax": 0, "quant_map": 0}
        for p in quant:
            for key, val in nf4_bytes(p.numel, cfg.blocksize, cfg.double_quant).items():
                nf[key] += val * p.count
        dq = "double-quant " if cfg.double_quant else ""
        comps += [Component("nf4 weights", nf["packed"], f"{sum(p.numel * p.count for p in quant):,} params / 2 "
                                                         f"(the {len(quant)} target kinds, as decompose writes)"),
                  Component("nf4 absmax+maps", nf["absmax"] + nf["quant_map"], f"{dq}block {cfg.blocksize}")]
    rest = sum(p.total for p in s.params if p.kind != "linear")
    biases = sum(p.bias * p.count for p in lin)
    base_lin = sum(p.numel * p.count for p in lin if p not in quant)
    dense_experts = sum(p.numel * p.count for p in lin if p not in quant and ".experts." in p.name) if quantized else 0
    comps.append(Component("unquantized weights", c * (rest + biases + base_lin),
                           f"embeddings, norms, biases{', head' if not s.tied else ''}"
                           f"{', bf16-residual experts' if dense_experts else ''}"
                           f"{', non-target linears' if base_lin > dense_experts and quantized else ''}"
                           f"{', base linears' if base_lin and not quantized else ''}"
                           f" in {cfg.dtype}"))
    if cfg.method == "full":
        sizes = [p.numel + p.bias for p in s.params for _ in range(p.count)]
        trainable = sum(sizes)
        comps += [Component("gradients", c * trainable, f"{trainable:,} params × {c} B"),
                  Component("fp32 master copy", 4 * trainable if c < 4 else 0, "mixed precision")]
    else:
        sizes = [n for p in targets if (r := target_rank(p, cfg.rank, cfg.expert_rank))
                 for _ in range(p.count) for n in (r * p.shape[1], r * p.shape[0])]
        trainable = sum(sizes)
        comps += [Component("adapters", ad * trainable, f"{trainable:,} params × {ad} B ({cfg.adapter_dtype})"),
                  Component("adapter gradients", ad * trainable, f"{cfg.adapter_dtype}"),
                  Component("fp32 master copy", 4 * trainable if ad < 4 else 0,
                            "16-bit adapters" if ad < 4 else "none: the adapters are fp32")]
    comps.append(Component("optimizer states", optimizer_bytes(sizes, cfg.optim), cfg.optim))
    comps += activation_components(s, cfg, targets)
    if cfg.fsdp:  # per rank: the state /N, plus the all-gathered units (qpissa.plan.fsdp_memory)
        nf4 = lambda p: sum(nf4_bytes(p.numel, cfg.blocksize, cfg.double_quant).values())  # noqa: E731
        ranks = lambda p: target_rank(p, cfg.rank, cfg.expert_rank)  # noqa: E731
        comps = fsdp_components(comps, s, cfg.gpus, cfg.fsdp_offload, c, ad, ranks, targets, quant, nf4)
    comps.append(Component("overhead", cfg.overhead, "CUDA context, cuBLAS workspace"))
    return Plan(s.model_type, s.n_params, trainable, cfg, comps)


def _largest(fits, lo: int, hi: int) -> int:
    """Largest integer x in [lo, hi] with fits(x), for a monotone predicate; lo - 1 when none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def largest_batch(s: ModelShapes, cfg: PlanConfig, limit: int = 1 << 16) -> int:
    """Largest micro-batch that fits (0: not even B=1)."""
    return _largest(lambda b: plan(s, replace(cfg, batch_size=b)).fits, 1, limit)


def largest_rank(s: ModelShapes, cfg: PlanConfig) -> int:
    """Largest adapter rank that fits, up to the smallest target dimension (0: not even r=1)."""
    if cfg.method == "full":
        return 0
    cap = min(min(p.shape) for p in select_targets(s, cfg.targets))
    return _largest(lambda r: plan(s, replace(cfg, rank=r)).fits, 1, cap)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'80GB' → 80e9 bytes, '80GiB' → 80·2³⁰, '24000MB', '512MiB'; a bare number means GB."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"memory size {text!r}: write it like 80GB, 79.6GiB or 24000MB")
    num, unit = float(m.group(1)), (m.group(2) or "gb").lower()
    power = "kmgt".index(unit[0]) + 1 if unit[0] in "kmgt" else 0
    base = 1024 if "i" in unit else 1000
    return int(num * base ** power)


# ---------------------------------------------------------------- decomposition stage

def decompose_estimate(s: ModelShapes, rank: int = 128, iterations: int = 1, targets: str = "all",
                       rates: dict | None = None, baseline: int = 512 * 2**20) -> dict:
    """Streaming ``qpissa decompose`` (default settings: QPiSSA T=``iterations``, randomized SVD) of a checkpoint.

    Time and peak memory come from :mod:`qpissa.plan.decompose_cost`, whose rates were fit to timings of the shipped
    driver (``benchmarks/decompose_rehearsal.py``; packaged in ``qpissa/plan/decompose_rates.json``, measured on the
    CPU named there: a GPU is far faster; pass ``rates=`` for another machine). Targets as :func:`select_targets`.
    """
    from qpissa.plan.decompose_cost import estimate_peak_bytes, estimate_seconds, load_rates

    rates = rates or load_rates()
    shapes = [tuple(p.shape) for p in decompose_targets(s, targets) for _ in range(p.count)]
    m, n = max(shapes, key=lambda sh: sh[0] * sh[1])
    checkpoint_bytes = s.n_params * BYTES.get(s.dtype, 2)
    return {"peak_bytes": estimate_peak_bytes(rates, shapes, baseline),
            "seconds": estimate_seconds(rates, shapes, rank, iterations, checkpoint_bytes),
            "largest": [m, n], "tensors": len(shapes), "rates": rates, "rank": rank, "iterations": iterations}
