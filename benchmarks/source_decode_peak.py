"""Peak memory of each source-format decoder above its inputs, per decoded weight (``plan``'s constants).

Each format runs in a fresh process: the packed parts of one m×n weight (random codes, realistic scales)
are built, then the decoder that ``qpissa.formats.load_tensor`` runs for that format is called once; the
peak RSS growth during the call (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before;
the inputs exist before) ÷ m·n is printed (Linux only).
The fp32 result itself (4 bytes a weight) is included: decompose holds it next.

    python benchmarks/source_decode_peak.py [--rows 4096 --cols 4096]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

FORMATS = ("fp8", "mxfp4", "bitsandbytes", "gptq", "awq", "compressed-tensors")


def _parts(fmt: str, m: int, n: int):
    import functools

    import torch

    from qpissa.sources import bnb, compressed, fp8, gptq, mxfp4

    g = torch.Generator().manual_seed(0)
    words = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=g)  # noqa: E731
    if fmt == "fp8":
        q = (torch.randn(m, n, generator=g) * 100).to(torch.float8_e4m3fn)
        return functools.partial(fp8.block_dequantize, block=(128, 128)), [q, torch.rand(m // 128, n // 128)]
    if fmt == "mxfp4":
        blocks = torch.randint(0, 256, (1, m, n // 32, 16), dtype=torch.uint8, generator=g)
        return mxfp4.dequantize, [blocks, torch.randint(120, 130, (1, m, n // 32), dtype=torch.uint8, generator=g)]
    if fmt == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(torch.randn(m, n, generator=g), blocksize=64, quant_type="nf4")
        d = state.as_dict(packed=True)
        keys = tuple(d)
        return functools.partial(bnb.dequantize_4bit, keys=keys), [packed, *d.values()]
    if fmt in ("gptq", "awq"):
        scales = torch.rand(n // 128, m).half()
        if fmt == "gptq":
            return (functools.partial(gptq.dequantize_gptq, group_size=128, zero_offset=1),
                    [words(n // 8, m), words(n // 128, m // 8), scales, torch.randperm(n).int() // 128])
        return functools.partial(gptq.dequantize_awq, group_size=128), [words(n, m // 8), words(n // 128, m // 8), scales]
    return (functools.partial(compressed.dequantize_packed, group_size=128, has_zero=False, has_g_idx=False),
            [words(m, n // 8), torch.rand(m, n // 128).bfloat16()])


def measure(fmt: str, m: int, n: int) -> float:
    import torch

    torch.set_num_threads(1)
    decode, parts = _parts(fmt, m, n)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current RSS
    out = decode(*parts)
    after = _status("VmHWM")
    assert out.numel() == m * n and out.dtype == torch.float32
    return (after - before) / (m * n)


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--one", default=None)
    a = ap.parse_args()
    if a.one:
        print(json.dumps({a.one: measure(a.one, a.rows, a.cols)}))
        return
    result = {}
    for fmt in FORMATS:
        out = subprocess.run([sys.executable, __file__, "--one", fmt, "--rows", str(a.rows), "--cols", str(a.cols)],
                             capture_output=True, text=True, check=True)
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"rows": a.rows, "cols": a.cols, "bytes_per_weight": result}, indent=1))


if __name__ == "__main__":
    main()
