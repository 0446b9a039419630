"""The model a run trains (the only thing that differs between methods), ready for the loop.

from-out: OUT/residual (frozen) + OUT/adapter as trainable PEFT factors; lora: a fresh PEFT LoRA on the
original checkpoint; full: every parameter (a published FP8/MXFP4/4-bit checkpoint is dequantized first,
:mod:`qpissa.sources.load`). Then the bitsandbytes trap is disarmed
(:func:`qpissa.quant.keep_4bit_layout_trainable`: bnb repacks 4-bit weights in eval mode on
AVX512-BF16 CPUs), and optional fp32 compute, gradient checkpointing and fused kernels are applied.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qpissa import distributed
from qpissa.errors import UserError
from qpissa.quant import compute_in_fp32, keep_4bit_layout_trainable
from qpissa.train.config import TrainConfig
from qpissa.usage import require_causal_lm


def _check_adapter_fits(model, adapter_dir: Path) -> None:
    """Every adapter tensor must name a module of the residual model with matching in/out features."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            shape = f.get_slice(key).get_shape()
            owner = name
            while owner.endswith(".base_layer"):  # PEFT nests one wrapper per targeted parameter of a module
                owner = owner.removesuffix(".base_layer")
            mod = modules.get(owner)
            if mod is not None and not hasattr(mod, "in_features") and any(p.ndim == 3 for p in mod.parameters()):
                continue  # MoE experts: PEFT target_parameters on the fused 3-D parameters
            if mod is None:
                raise UserError(f"{adapter_dir}: adapter tensor {key} targets module {name}, which the residual "
                                "model does not have; use the adapter/ and residual/ of the same decompose run")
            want = mod.in_features if ".lora_A." in key else mod.out_features
            have = shape[1] if ".lora_A." in key else shape[0]
            if want != have:
                raise UserError(f"{adapter_dir}: adapter tensor {key} has shape {shape} but {name} has "
                                f"{mod.in_features} in / {mod.out_features} out features; adapter and residual "
                                "come from different models")


def start_dirs(root: Path) -> tuple[Path, Path]:
    """(residual, starting adapter) of a decompose OUT, or of a finished ``--method from-out`` run RUN (its
    RUN/adapter on the OUT/residual it trained on: e.g. DPO after SFT)."""
    saved = root / "config.json"
    if not (root / "residual").is_dir() and (root / "adapter" / "adapter_config.json").is_file() and saved.is_file():
        try:
            run = json.loads(saved.read_text())
        except json.JSONDecodeError:
            run = {}
        if run.get("method") == "from-out" and run.get("model"):
            return Path(run["model"]) / "residual", root / "adapter"
    return root / "residual", root / "adapter"


def load_model(cfg: TrainConfig):
    """Build (model, tokenizer, description) for cfg.method; only trainable params require grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cfg.model)
    # --fsdp: load into CPU memory; qpissa.train.fsdp.shard moves each block's shard to the device
    device_map = {"": "cpu" if cfg.fsdp else distributed.rank_device(cfg.device, distributed.detect())}
    if cfg.method == "from-out":
        residual, adapter = start_dirs(root)
        if not (residual / "config.json").exists():
            raise UserError(f"{residual}/config.json not found: pass the output directory of `qpissa decompose` "
                            "(or a finished train run on one), or --method lora|full with an HF checkpoint")
        if not (adapter / "adapter_config.json").exists() or not (adapter / "adapter_model.safetensors").exists():
            raise UserError(f"{adapter} is missing adapter_config.json/adapter_model.safetensors: rerun "
                            f"`qpissa decompose` into {root} (or --resume it)")
        from qpissa.adapters import load_peft

        require_causal_lm(residual, "train")
        from qpissa.moe import load_residual  # plain from_pretrained, plus NF4 MoE experts when OUT has them

        base = load_residual(residual, device_map=device_map)
        _check_adapter_fits(base, adapter)
        model = load_peft(base, adapter, is_trainable=True)
        tok_dir = residual
    else:
        from qpissa.hub import resolve_model

        root = resolve_model(cfg.model, cfg.revision)  # a local folder, else the Hub snapshot of org/name
        if not (root / "config.json").exists():
            raise UserError(f"{root}/config.json not found: --method {cfg.method} needs an HF model directory")
        require_causal_lm(root, "train")
        dtype = torch.float32 if cfg.method == "full" else "auto"
        if "quantization_config" in json.loads((root / "config.json").read_text()):
            from qpissa.sources.load import load_decoded  # FP8, MXFP4, 4-bit, …: the weights, dequantized

            model = load_decoded(root, dtype, device_map=device_map)
        else:
            model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, device_map=device_map)
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            from qpissa.adapters import native_targets
            from qpissa.decompose.targets import moe_lora_targets

            torch.manual_seed(cfg.seed)
            moe = moe_lora_targets(root)  # MoE: QPiSSA's targets (experts in, routers out), not PEFT's all-linear
            targets = {"target_modules": "all-linear"} if moe is None else \
                {"target_modules": moe[0], "target_parameters": moe[1]}
            lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, lora_dropout=0.0,
                              init_lora_weights=True, task_type="CAUSAL_LM", **targets)
            with native_targets():  # PEFT 0.21 would move DeepSeek-type dense/shared targets to the experts
                model = get_peft_model(model, lcfg)
            if root != Path(cfg.model):  # a Hub id: adapter_config.json names it, as PEFT does for org/name
                model.peft_config["default"].base_model_name_or_path = cfg.model
                model.peft_config["default"].revision = cfg.revision
        tok_dir = root
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    keep_4bit_layout_trainable(model)
    if cfg.precision == "fp32":
        compute_in_fp32(model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.kernels == "triton":
        from qpissa.train.kernel_backend import apply_kernel_backend  # lazy: only when asked

        apply_kernel_backend(model, "triton")
    return model, tokenizer
