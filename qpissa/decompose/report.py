"""Quantization-error report: per module, per layer type and whole model; JSON, CSV, Markdown, plot.

Reduction (PiSSA paper, §5): 1 − ‖W − deq(Q) − s·B·A‖ / ‖W − deq(NF4(W))‖, for the nuclear
(headline), Frobenius and spectral norms; model totals are sums of per-module norms. The
same ratio against LoftQ(T) says how much the method beats LoftQ's initialization.

Calibrated runs (``--calib-data``) add per module the output error ‖(W − Ŵ)·H^½‖_F on the held-out
activations (H = Σ xᵀx of the held-out split) for the method and the QLoRA, LoftQ(T) and uncalibrated
QPiSSA(T) baselines (``output``), and ``--eval-kl`` a model-level ``model_fidelity`` (mean token KL).
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from pathlib import Path

from qpissa.atomic import atomic_path, write_json, write_text
from qpissa.errors import UserError

NORMS = ("nuclear", "frobenius", "spectral")
OUTPUT_KINDS = ("method", "qlora", "loftq", "qpissa")  # output errors: the method and its baselines


def reduction(err: float | None, baseline: float | None) -> float | None:
    """1 − err / baseline (0 when the baseline is 0; None when a norm was not measured)."""
    if err is None or baseline is None:
        return None
    return 1.0 - err / baseline if baseline > 0 else 0.0


def _total(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def layer_type(module: str) -> str:
    """The module name with its block index removed: ``encoder.layer.3.output.dense`` → ``output.dense``; an MoE
    expert's index too: ``model.layers.0.mlp.experts.7.down_proj`` → ``mlp.experts.down_proj``."""
    parts = re.split(r"\.\d+\.", module, maxsplit=1)
    return re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.", parts[-1])


def layer_index(module: str) -> int | None:
    m = re.search(r"\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def _summarize(rows: list[dict]) -> dict:
    """Sum each error norm over ``rows`` and compute the reductions."""
    out: dict = {"modules": len(rows)}
    for which in ("method", "qlora", "loftq"):
        if all(r.get(which) for r in rows):
            out[which] = {n: _total([r[which].get(n) for r in rows]) for n in NORMS}
    for base in ("qlora", "loftq"):
        if base in out:
            out[f"reduction_vs_{base}"] = {n: reduction(out["method"][n], out[base][n]) for n in NORMS}
    if rows and all(r.get("output") for r in rows):  # sums of per-module output errors
        out["output"] = {k: _total([r["output"].get(k) for r in rows]) for k in OUTPUT_KINDS}
        out["output_reduction"] = {k: reduction(out["output"]["method"], out["output"][k]) for k in OUTPUT_KINDS[1:]}
    return out


def metrics_from_rows(rows: list[dict]) -> dict[str, str]:
    """What was measured, read off the per-module metrics (for reports built without that record)."""
    has = lambda which, norm: bool(rows) and all((r.get(which) or {}).get(norm) is not None for r in rows)  # noqa: E731
    return {"frobenius": "exact", "nuclear": "exact (svdvals)" if has("method", "nuclear") else "skipped",
            "spectral": "exact (svdvals)" if has("method", "spectral") else "skipped",
            "qlora_baseline": "exact" if has("qlora", "frobenius") else "skipped",
            "loftq_baseline": "exact" if has("loftq", "frobenius") else "skipped"}


def metrics_line(report: dict) -> str:
    """One line: which error metrics this report holds and how they were computed."""
    computed = report.get("metrics_computed") or metrics_from_rows(report.get("modules", []))
    line = "metrics: " + ", ".join(f"{k}={v}" for k, v in computed.items() if k not in ("auto", "svd"))
    if "svd" in computed:
        line += f"; adapter SVD {computed['svd']}"
    return line + (f" ({computed['auto']})" if computed.get("auto") else "")


def build_report(metrics: list[dict], arguments: dict, model: str, computed: dict | None = None,
                 source=None) -> dict:
    """Assemble the report dict from per-module metrics (as stored by the decomposition); ``computed`` says
    which metrics were measured and how (see :meth:`qpissa.decompose.DecomposeConfig.metrics_computed`);
    ``source``: the checkpoint's :class:`qpissa.sources.base.SourceFormat` (the report's ``source`` entry)."""
    from qpissa.decompose.source_report import source_summary

    modules = []
    for m in metrics:
        row = dict(m, layer_type=layer_type(m["module"]), layer_index=layer_index(m["module"]))
        for base in ("qlora", "loftq"):
            if m.get(base):
                row[f"reduction_vs_{base}"] = {n: reduction(m["method"].get(n), m[base].get(n)) for n in NORMS}
        modules.append(row)
    by_type = defaultdict(list)
    for row in modules:
        by_type[row["layer_type"]].append(row)
    report = {"model": model, "arguments": arguments, "metrics_computed": computed or metrics_from_rows(modules),
              "overall": _summarize(modules),
              "by_layer_type": {k: _summarize(v) for k, v in by_type.items()}, "modules": modules}
    if source is not None:
        report["source"] = source_summary(source, report["overall"])
    return report


def to_csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["module", "layer_type", "layer_index", "out", "in", "rank"]
    header += [f"{w}_{n}" for w in ("method", "qlora", "loftq") for n in NORMS]
    header += [f"reduction_vs_{b}_{n}" for b in ("qlora", "loftq") for n in NORMS]
    calibrated = any(r.get("output") for r in report["modules"])
    if calibrated:
        header += ["qpissa_frobenius"] + [f"output_{k}" for k in OUTPUT_KINDS]
    header.append("metrics")  # how the norms were computed (empty cells: skipped)
    writer.writerow(header)
    how = metrics_line(report)
    for r in report["modules"]:
        row = [r["module"], r["layer_type"], r["layer_index"], *r["shape"], r.get("rank", report["arguments"]["rank"])]
        row += [_fmt(r.get(w, {}).get(n), ".6g") for w in ("method", "qlora", "loftq") for n in NORMS]
        row += [_fmt(r.get(f"reduction_vs_{b}", {}).get(n), ".6f") for b in ("qlora", "loftq") for n in NORMS]
        if calibrated:
            row += [_fmt((r.get("qpissa") or {}).get("frobenius"), ".6g")]
            row += [_fmt((r.get("output") or {}).get(k), ".6g") for k in OUTPUT_KINDS]
        row.append(how)
        writer.writerow(row)
    return buf.getvalue()


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _pct(summary: dict, base: str, norm: str) -> str:
    value = (summary.get(f"reduction_vs_{base}") or {}).get(norm)
    return "—" if value is None else f"{100 * value:.2f}%"


def summary_rows(report: dict) -> list[list[str]]:
    """Rows (scope, modules, reductions vs QLoRA and LoftQ per norm) for the overall + per-type table."""
    rows = []
    scopes = [("overall", report["overall"])] + sorted(report["by_layer_type"].items())
    for scope, s in scopes:
        rows.append([scope, str(s["modules"])] + [_pct(s, b, n) for b in ("qlora", "loftq") for n in NORMS])
    return rows


SUMMARY_HEADER = ["scope", "modules"] + [f"vs {b} {n[:4]}" for b in ("QLoRA", "LoftQ") for n in NORMS]


def to_markdown(report: dict) -> str:
    args = report["arguments"]
    lines = [f"# Quantization error: {args['method']} r={args['rank']} T={args['iters']}", "",
             f"Model: `{report['model']}`. Reduction = 1 − ‖W − deq(Q) − s·B·A‖ / ‖W − deq(NF4(W))‖ "
             "(vs LoftQ: the same ratio against LoftQ(T)'s error); totals sum per-module norms.", "",
             f"{metrics_line(report)}. A — means not measured.", "", *source_markdown(report), *coverage_markdown(report),
             "| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(report)]
    lines += allocation_markdown(report)
    lines += ["", "## Per module (Frobenius)", "", "| module | shape | rank | error | QLoRA error | vs QLoRA | vs LoftQ |",
              "|---|---|---|---|---|---|---|"]
    for r in report["modules"]:
        lines.append(f"| {r['module']} | {r['shape'][0]}×{r['shape'][1]} | {r.get('rank', args['rank'])} | "
                     f"{r['method']['frobenius']:.4g} | {r['qlora']['frobenius']:.4g} | {_pct(r, 'qlora', 'frobenius')} | "
                     f"{_pct(r, 'loftq', 'frobenius')} |")
    return "\n".join(lines + output_markdown(report)) + "\n"


def source_markdown(report: dict) -> list[str]:
    """The source-format lines (:mod:`qpissa.decompose.source_report`), if the source was quantized."""
    from qpissa.decompose.source_report import source_markdown as lines

    return lines(report)


def coverage_markdown(report: dict) -> list[str]:
    """The weights-quantized lines (:mod:`qpissa.decompose.coverage`), if the report has them."""
    from qpissa.decompose.coverage import lines

    return [f"{line}  " for line in lines(report["coverage"], report.get("experts"))] + [""] if report.get("coverage") else []


def allocation_markdown(report: dict) -> list[str]:
    """``--rank-allocation error``: the budget, the gain over uniform r on the measured curves, and the
    ranks per layer type (one column per block index)."""
    a = report.get("allocation")
    if not a:
        return []
    norm = "output error ‖E·H^½‖_F" if report["arguments"].get("calib_data") else "‖E‖_F"
    lines = ["", "## Rank allocation (error)", "",
             f"Budget {a['budget']:,} adapter parameters, {a['params']:,} used; curves measured in {a['curve_seconds']} s."]
    if a.get("uniform_sum_sq_error"):
        gain = 1 - a["sum_sq_error"] / a["uniform_sum_sq_error"]
        lines.append(f"Σ {norm}² on the measured curves (first iterate): {a['sum_sq_error']:.6g} vs uniform "
                     f"r={a['uniform_rank']} {a['uniform_sum_sq_error']:.6g} ({100 * gain:.2f}% lower)"
                     + (" — uniform kept" if a.get("kept_uniform") else "") + ".")
    by_type: dict[str, dict] = defaultdict(dict)
    for r in report["modules"]:
        by_type[r["layer_type"]][r["layer_index"]] = r.get("rank")
    lines += ["", "| layer type | ranks by block index |", "|---|---|"]
    for kind, ranks in sorted(by_type.items()):
        lines.append(f"| {kind} | {' '.join(str(ranks[i]) for i in sorted(ranks, key=lambda x: -1 if x is None else x))} |")
    return lines


def output_rows(report: dict) -> list[list[str]]:
    """(scope, output error of the method, QLoRA, LoftQ(T), QPiSSA(T), reduction vs each) per scope."""
    rows = []
    for scope, s in [("overall", report["overall"])] + sorted(report["by_layer_type"].items()):
        if "output" in s:
            o, red = s["output"], s["output_reduction"]
            rows.append([scope] + [_fmt(o.get(k), ".4g") or "—" for k in OUTPUT_KINDS]
                        + ["—" if red.get(k) is None else f"{100 * red[k]:.1f}%" for k in OUTPUT_KINDS[1:]])
    return rows


OUTPUT_HEADER = ["scope", "method", "QLoRA", "LoftQ", "QPiSSA", "vs QLoRA", "vs LoftQ", "vs QPiSSA"]


def output_markdown(report: dict) -> list[str]:
    """The output-error section (calibrated runs) and the model-level fidelity line, if measured."""
    rows = output_rows(report)
    if not rows:
        return []
    split = next((r.get("output_split") for r in report["modules"] if r.get("output_split")), "held_out")
    lines = ["", f"## Output error ‖(W − Ŵ)·H^½‖_F on the {split.replace('_', '-')} activations", "",
             "Sums over modules; LoftQ and QPiSSA are the uncalibrated T-iteration baselines; reduction = 1 − "
             "method / baseline.", "", "| " + " | ".join(OUTPUT_HEADER) + " |", "|" + "---|" * len(OUTPUT_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    fid = report.get("model_fidelity") or {}
    if "kl" in fid:
        lines += ["", f"Mean token KL(original ‖ initialized) on {fid['tokens']} held-out tokens: {fid['kl']:.5g}"]
    if "cosine" in fid:
        lines += ["", f"Mean pooled-embedding cosine to the original on {fid['sequences']} held-out sequences: "
                      f"{fid['cosine']:.6f}"]
    return lines


def error_figure(report: dict):
    """The matplotlib figure behind :func:`plot`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for r in report["modules"]:
        idx = r["layer_index"] if r["layer_index"] is not None else -1
        for which in ("method", "qlora", "loftq"):
            if r.get(which):
                series[which][idx] += r[which]["frobenius"]
    outputs: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for r in report["modules"]:
        for which, value in (r.get("output") or {}).items():
            outputs[which][r["layer_index"] if r["layer_index"] is not None else -1] += value
    fig, axes = plt.subplots(1, 2 if outputs else 1, figsize=(13 if outputs else 7, 3.5), dpi=110, squeeze=False)
    labels = plot_labels(report["arguments"])
    panels = [(axes[0][0], series, "Σ ‖W − Ŵ‖_F over the block", "Reconstruction error by layer")]
    if outputs:
        panels.append((axes[0][1], outputs, "Σ ‖(W − Ŵ)·H^½‖_F over the block", "Held-out output error by layer"))
    for ax, data, ylabel, title in panels:
        for which, values in data.items():
            xs = sorted(values)
            ax.plot(xs, [values[x] for x in xs], marker="o", label=labels[which])
        ax.set_xlabel("block index")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} (r={report['arguments']['rank']})")
        ax.set_ylim(bottom=0)  # from 0: a cut axis exaggerates the gaps between methods
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_labels(arguments: dict) -> dict[str, str]:
    """Legend entries; the iterative methods name their T (LoftQ is measured with the same T)."""
    t = f" T={arguments.get('iters', 1)}"
    method = arguments["method"]
    calibrated = " (calibrated)" if arguments.get("calib_data") else ""
    return {"method": method + (t if method in ("qpissa", "loftq") else "") + calibrated, "qlora": "QLoRA (NF4 of W)",
            "loftq": "LoftQ" + t, "qpissa": "QPiSSA" + t + " (uncalibrated)"}


def plot(report: dict, dest: Path) -> None:
    """Frobenius error per block index for the method, QLoRA and LoftQ (sum over modules of a block)."""
    fig = error_figure(report)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> None:
    """Write report.json/csv/md and error_by_layer.png into ``out_dir``."""
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.csv", to_csv(report))
    write_text(out_dir / "report.md", to_markdown(report))
    plot(report, out_dir / "error_by_layer.png")


def load_report(out_dir: Path) -> dict:
    path = Path(out_dir) / "report.json"
    if not path.is_file():
        raise UserError(f"{path} not found; run `qpissa decompose` into {out_dir} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); re-run the decomposition") from None
