"""Device correctness: every method, baseline, SVD and metric keeps its tensors on the weight's device.

CPU-only half: a fake CUDA weight under ``FakeTensorMode`` (tensors report ``cuda:0`` and any op that
mixes devices raises ``FakeTensorDeviceMismatchError``). bitsandbytes cannot run on fake tensors, so its
``quantize_4bit``/``dequantize_4bit`` get shape-only stand-ins that compute on the INPUT's device; our
quant.py, methods, SVDs, metrics and ``decompose_tensor`` run unchanged. Two further shims make a
CPU-only torch build usable at all (both keep the device checks, neither does arithmetic):

* Python-bound ``t[...]``, ``t[...] = v``, ``.contiguous()`` and ``.copy_`` open a CUDA DeviceGuard that a
  CPU build lacks ("not linked with support for cuda devices"); :class:`_AtenIndexing` reroutes them to the
  aten ops (select/slice/index/where/copy_/clone) that FakeTensorMode checks like any other.
* ``t.to("cuda")`` (no index) asks the CUDA runtime for the current device; it becomes ``cuda:0``.
* Fake tensors have no values, so ``float(t)``/``bool(t)``/``t.item()`` return 1 (the same bindings need the guard).

linalg ops (svd, qr, svdvals) have meta kernels and run under FakeTensorMode as they are.
The real-CUDA half is tests/test_cuda.py (runs whenever a GPU is present).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qpissa.decompose import DecomposeConfig, decompose_tensor
from qpissa.formats import TensorInfo
from qpissa.decompose.linalg import error_norms, exact_svd, low_rank_factors, randomized_svd
from qpissa.decompose.methods import SvdOptions, loftq
from qpissa.decompose.initialize import initialize
from qpissa.quant import NF4Spec, nf4_roundtrip
from qpissa.decompose.targets import Target

aten = torch.ops.aten


# ----------------------------------------------------------------------------- fake-CUDA harness
def _as_index(idx) -> tuple:
    return idx if isinstance(idx, tuple) else (idx,)


def _getitem(t: torch.Tensor, idx) -> torch.Tensor:
    """``t[idx]`` for ints, slices, None, Ellipsis and integer/bool tensors, via aten ops only."""
    idx = _as_index(idx)
    if len(idx) == 1 and isinstance(idx[0], torch.Tensor) and idx[0].dtype == torch.bool:
        return aten.index.Tensor(t, [idx[0]])
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, dim, advanced = t, 0, {}
    for i in idx:
        if i is Ellipsis:
            dim += t.dim() - used
        elif i is None:
            out = aten.unsqueeze.default(out, dim)
            dim += 1
        elif isinstance(i, int):
            out = aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            out = aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1)
            dim += 1
        elif isinstance(i, torch.Tensor):
            advanced[dim] = i
            dim += 1
        else:
            raise NotImplementedError(f"index {i!r}")
    if advanced:
        out = aten.index.Tensor(out, [advanced.get(d) for d in range(max(advanced) + 1)])
    return out


def _setitem(t: torch.Tensor, idx, value) -> None:
    idx = _as_index(idx)
    if len(idx) == 1 and isinstance(idx[0], torch.Tensor) and idx[0].dtype == torch.bool:  # t[mask] = v
        v = value if isinstance(value, torch.Tensor) else torch.full_like(t, value)
        aten.copy_.default(t, aten.where.self(idx[0], v, t))
        return
    view = _getitem(t, idx)
    if isinstance(value, torch.Tensor):
        aten.copy_.default(view, value)
    else:
        aten.fill_.Scalar(view, value)


def _indexed(device):
    if isinstance(device, (str, torch.device)) and str(device) == "cuda":
        return torch.device("cuda", 0)
    return device


_SCALARS = (torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__index__,
            torch.Tensor.item)


class _AtenIndexing(TorchFunctionMode):
    """Route the Python bindings that need a real CUDA DeviceGuard through aten, and give value reads a
    unit value (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALARS:  # fake tensors have no values
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.dtype.is_floating_point else 1)
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            return _setitem(*args)
        if func is torch.Tensor.contiguous:
            t = args[0]
            return t if t.is_contiguous() else aten.clone.default(t, memory_format=torch.contiguous_format)
        if func is torch.Tensor.copy_:
            return aten.copy_.default(args[0], args[1])
        if func is torch.Tensor.to:  # "cuda" without an index asks the (absent) CUDA runtime for the current device
            args = tuple(_indexed(a) for a in args)
            kwargs = {k: _indexed(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _fake_quantize_4bit(a, absmax=None, out=None, blocksize=64, compress_statistics=False, quant_type="nf4",
                        quant_storage=torch.uint8):
    """Shape-only bitsandbytes stand-in: packed bytes and per-block absmax computed on ``a``'s device."""
    from bitsandbytes.functional import QuantState

    assert not compress_statistics, "stand-in covers plain NF4 only"
    packed = torch.empty((a.numel() + 1) // 2, 1, dtype=quant_storage, device=a.device)  # (m*n/2, 1)
    absmax = a.reshape(-1, blocksize).abs().amax(dim=1)  # (m*n/blocksize,) on a's device
    code = torch.empty(16, dtype=torch.float32, device=a.device)
    return packed, QuantState(absmax=absmax, shape=a.shape, code=code, blocksize=blocksize, quant_type=quant_type,
                              dtype=a.dtype)


def _fake_dequantize_4bit(a, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="nf4"):
    """Shape-only stand-in: real bitsandbytes needs packed bytes, absmax and code on one device; so does this."""
    for name, t in (("absmax", quant_state.absmax), ("code", quant_state.code)):
        if t.device != a.device:
            raise RuntimeError(f"dequantize_4bit: packed on {a.device}, {name} on {t.device}")
    return torch.empty(tuple(quant_state.shape), dtype=quant_state.dtype, device=a.device)  # (m, n)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Enter FakeTensorMode (+ the shims) with bitsandbytes' 4-bit entry points replaced by stand-ins."""
    import bitsandbytes.functional as bnbf
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(bnbf, "quantize_4bit", _fake_quantize_4bit)
    monkeypatch.setattr(bnbf, "dequantize_4bit", _fake_dequantize_4bit)
    with FakeTensorMode(), _AtenIndexing():
        yield


def _cuda_weight(m: int = 96, n: int = 64, dtype=torch.float32) -> torch.Tensor:
    w = torch.empty(m, n, dtype=dtype, device="cuda")
    assert w.device.type == "cuda", "FakeTensorMode should report the fake device"
    return w


def _on(t: torch.Tensor, device: str = "cuda") -> bool:
    return t.device.type == device


# ----------------------------------------------------------------------------- CPU tests on a fake CUDA weight
SVDS = [SvdOptions("randomized", oversample=4, power_iters=1), SvdOptions("exact")]


@pytest.mark.parametrize("svd", SVDS, ids=["randomized", "exact"])
@pytest.mark.parametrize("method,iters", [("lora", 1), ("qlora", 1), ("pissa", 1), ("qpissa", 2), ("loftq", 2)])
def test_device_every_method_stays_on_the_weights_device(fake_cuda, method, iters, svd):
    w = _cuda_weight()
    init = initialize(method, w, 8, 1.0, iters=iters, svd=svd, seed=3)
    assert _on(init.a) and _on(init.b) and init.a.dtype == init.b.dtype == torch.bfloat16
    assert tuple(init.a.shape) == (8, 64) and tuple(init.b.shape) == (96, 8)
    if init.quantized is not None:
        assert _on(init.quantized.packed) and _on(init.quantized.state.absmax)
    else:
        assert _on(init.residual)
    rec = init.reconstruction()  # (m, n) base + s·B·A
    assert _on(rec) and tuple(rec.shape) == (96, 64)
    norms = error_norms(w - rec)
    assert set(norms) == {"nuclear", "frobenius", "spectral"}


def test_device_baselines_svds_and_norms_on_fake_cuda(fake_cuda):
    w = _cuda_weight(dtype=torch.float64)
    q, deq = nf4_roundtrip(w, NF4Spec())  # QLoRA error
    assert _on(q.packed) and _on(deq) and deq.dtype == torch.float64
    error_norms(w - deq), error_norms(w - deq, spectrum=False)
    base = loftq(w, 8, 2.0, iters=2, svd=SvdOptions("randomized", 4, 1))  # the LoftQ baseline
    assert _on(base.reconstruction())
    for u, s, vh in (exact_svd(w, 8), randomized_svd(w, 8, 4, 2, seed=1),
                     randomized_svd(w, 8, 4, 2, seed=1, start=torch.empty(8, 64, dtype=torch.bfloat16, device="cuda"))):
        assert all(_on(t) for t in (u, s, vh)) and tuple(u.shape) == (96, 8) and tuple(vh.shape) == (8, 64)
    a, b = low_rank_factors(w, 8, 1.0, method="randomized", oversample=4, power_iters=1)
    assert _on(a) and _on(b)


@pytest.mark.parametrize("method", ["lora", "qlora", "pissa", "qpissa", "loftq"])
@pytest.mark.parametrize("transposed", [False, True])
def test_device_decompose_tensor_with_baselines_on_fake_cuda(fake_cuda, method, transposed):
    """The driver's per-tensor step: CPU weight in, method + QLoRA + LoftQ baselines on CUDA, CPU part out."""
    shape = (64, 96) if transposed else (96, 64)
    info = TensorInfo("h.0.w.weight", Path("model.safetensors"), shape, "F32")
    target = Target("h.0.w", info, transposed)
    cfg = DecomposeConfig(method=method, rank=8, iters=2, svd="randomized", oversample=4, power_iters=1,
                          device="cuda", progress=False)
    tensors, metrics = decompose_tensor(target, torch.empty(*shape), cfg)  # loaded on CPU, as load_tensor does
    assert all(_on(t, "cpu") for t in tensors.values())
    assert tuple(tensors["__lora_A__"].shape) == (8, 64) and tuple(tensors["__lora_B__"].shape) == (96, 8)
    assert {"method", "qlora", "loftq"} <= set(metrics)


# ----------------------------------------------------------------------------- CPU reproducibility of the seeded draws
def test_device_seeded_draws_match_the_cpu_generator_stream():
    """A (LoRA) and Ω (randomized SVD) come from a CPU generator whatever the device: today's bytes."""
    from qpissa.decompose.methods import kaiming_a

    gen = torch.Generator().manual_seed(7)
    ref = ((torch.rand(4, 50, generator=gen) * 2 - 1) * (1 / math.sqrt(50))).to(torch.bfloat16)
    assert torch.equal(kaiming_a(4, 50, 7, torch.bfloat16), ref)
    assert torch.equal(kaiming_a(4, 50, 7, torch.bfloat16, "cpu"), ref)


def test_device_cuda_without_a_gpu_is_one_user_error():
    from qpissa.devices import resolve_device
    from qpissa.errors import UserError

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="choose one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
