"""What the report says about the checkpoint decompose read: its published format, and what its errors mean.

Every error in the report is measured against the *dequantized source* (the weights the checkpoint decodes
to), not against the original full-precision model, which a quantized release does not contain. For a 4-bit
source (bitsandbytes, GPTQ, AWQ, MXFP4, compressed-tensors w4a16) the source's own quantization error is
therefore unknown here; what can be compared is QPiSSA on the dequantized source against re-quantizing that
source to NF4 (QLoRA's start from it), which the report's QLoRA baseline already is.
"""
from __future__ import annotations

from typing import Any

from qpissa.sources.base import SourceFormat

UNKNOWN = "unknown: it needs the original full-precision weights, which a quantized release does not include"


def source_summary(fmt: SourceFormat, overall: dict) -> dict[str, Any]:
    """The report's ``source`` entry: format, block size, and the error comparison a 4-bit source allows."""
    out: dict[str, Any] = fmt.record()
    if fmt.name == "plain":
        return out
    out["errors_against"] = "the dequantized source weights"
    out["source_error"] = UNKNOWN
    method, qlora = (overall.get("method") or {}).get("frobenius"), (overall.get("qlora") or {}).get("frobenius")
    if method is not None and qlora is not None:
        out["qpissa_error_fro"] = method
        out["nf4_requant_error_fro"] = qlora  # QLoRA: NF4(dequantized source)
    return out


def source_markdown(report: dict) -> list[str]:
    """Lines for report.md (none for a plain bf16/fp16/fp32 source)."""
    src = report.get("source") or {}
    if not src or src.get("format") == "plain":
        return []
    lines = [f"Source: {src['format']} ({src['detail']}), {src['quantized_tensors']} tensors stored quantized. "
             "Errors below are measured against the dequantized source weights. "
             f"The source's own quantization error is {UNKNOWN}."]
    if src.get("qpissa_error_fro") is not None and src.get("bits", 16) <= 4.5:
        lines.append(f"On the dequantized source: QPiSSA error {src['qpissa_error_fro']:.4g} vs re-quantizing it to "
                     f"NF4 (QLoRA) {src['nf4_requant_error_fro']:.4g} (summed Frobenius norms).")
    if src.get("nf4_requant_error_fro") == 0:
        lines.append("The source is already NF4 on these blocks: re-quantizing it is exact, so QLoRA starts from it "
                     "with no error and the reductions vs QLoRA below say nothing; decompose it to move principal "
                     "components into the adapter, not to lower the error.")
    return [f"{line}  " for line in lines] + [""]
