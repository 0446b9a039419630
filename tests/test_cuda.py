"""Real-CUDA checks (one module, skipped as one when torch sees no GPU): each method, decompose, merge and
training on the card agree with the CPU run. The CPU-only device checks (fake CUDA) are in test_device.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

from qpissa.data import build_examples  # noqa: E402
from qpissa.decompose.methods import SvdOptions  # noqa: E402
from qpissa.decompose.initialize import initialize  # noqa: E402
from qpissa.train import fit, load_model  # noqa: E402
from test_train import decomposed, frozen_state, make_cfg  # noqa: E402,F401  (decomposed: a fixture)


@pytest.mark.parametrize("method", ["lora", "qlora", "pissa", "qpissa", "loftq"])
def test_cuda_methods_match_cpu(method):
    torch.manual_seed(0)
    w = torch.randn(256, 128) @ torch.diag(torch.logspace(0, -2, 128))  # decaying spectrum
    svd = SvdOptions("randomized", 8, 2, seed=1)
    cpu = initialize(method, w, 8, 1.0, iters=2, svd=svd, seed=5)
    gpu = initialize(method, w.cuda(), 8, 1.0, iters=2, svd=svd, seed=5)
    assert gpu.a.is_cuda and gpu.b.is_cuda
    err_cpu = float(torch.linalg.vector_norm(w - cpu.reconstruction()))
    err_gpu = float(torch.linalg.vector_norm(w.cuda() - gpu.reconstruction()))
    assert err_gpu == pytest.approx(err_cpu, rel=2e-2, abs=1e-6)
    if method in ("lora", "qlora"):  # seeded A is device-independent
        assert torch.equal(gpu.a.cpu(), cpu.a)


def test_cuda_decompose_matches_cpu(smollm2_dir, tmp_path):
    """decompose on a real model on CUDA: same files, metrics within float tolerance of the CPU run."""
    import json

    from safetensors.torch import load_file

    from qpissa.decompose import decompose

    kw = dict(method="qpissa", rank=8, iters=2, svd="randomized", targets=[r"model\.layers\.0\.self_attn\.(q|v)_proj",
                                                                         r"model\.layers\.0\.mlp\.down_proj"],
              progress=False)
    rep_cpu = decompose(smollm2_dir, tmp_path / "cpu", device="cpu", **kw)
    rep_gpu = decompose(smollm2_dir, tmp_path / "gpu", device="cuda", **kw)
    assert json.loads((tmp_path / "gpu" / "manifest.json").read_text())["status"] == "complete"
    for mc, mg in zip(rep_cpu["modules"], rep_gpu["modules"]):
        for base in ("method", "qlora", "loftq"):
            assert mg[base]["frobenius"] == pytest.approx(mc[base]["frobenius"], rel=2e-2)
    a_cpu = load_file(str(tmp_path / "cpu" / "adapter" / "adapter_model.safetensors"))
    a_gpu = load_file(str(tmp_path / "gpu" / "adapter" / "adapter_model.safetensors"))
    assert a_cpu.keys() == a_gpu.keys()
    for k in a_cpu:
        assert a_gpu[k].dtype == a_cpu[k].dtype and a_gpu[k].shape == a_cpu[k].shape



def test_cuda_merge_matches_cpu(smollm2_decomposed, tmp_path):
    """merge on CUDA (NF4 dequantized on the card) writes the same fp32 model as on CPU, up to float rounding."""
    from safetensors.torch import load_file

    from qpissa.use.merge import MergeConfig, merge

    run = smollm2_decomposed["qpissa"]
    merge(run["residual"], run["trained"], tmp_path / "cpu", MergeConfig(dtype="float32", device="cpu"))
    merge(run["residual"], run["trained"], tmp_path / "gpu", MergeConfig(dtype="float32", device="cuda"))
    cpu, gpu = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", "gpu"))
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-5)


def test_cuda_training_keeps_nf4_on_gpu(decomposed: Path, tiny_data: Path, tmp_path: Path) -> None:
    cfg = make_cfg(decomposed, tiny_data, tmp_path / "cuda", device="cuda", steps=3, save_every=0)
    model, tok = load_model(cfg)
    import bitsandbytes as bnb

    nf4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert nf4 and all(m.weight.device.type == "cuda" and m.weight.dtype == torch.uint8 for m in nf4)
    before = frozen_state(model)
    from qpissa.data import load_records

    summary = fit(cfg, model, tok, build_examples(load_records(tiny_data), tok, cfg.data_cfg), [])
    assert summary["steps"] == 3 and all(torch.equal(before[k], v) for k, v in frozen_state(model).items())
