"""A study's tables and plot, computed from its stored runs only (so ``qpissa compare --report`` regenerates them).

Per run (results.json / results.csv): the init's weight error (Σ‖W − Ŵ‖_F and its reduction vs QLoRA, from
the decompose report), init KL if measured, held-out loss of the initialization (step 0) and after training,
the train-loss curve summarized (first step, mean of the last 10 steps), GSM8K accuracy if evaluated,
tokens/s and peak memory. Per method and lr (summary.md): mean ± 95% CI over seeds (Student t), the paired
difference to QLoRA over the same seeds, and with several lrs the best lr per method. curves.png: held-out
loss vs step (mean and CI band per method) and, with a sweep, final held-out loss vs lr.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from qpissa.atomic import atomic_path, write_json, write_text
from qpissa.compare.stats import Estimate, estimate, paired

LAST_STEPS = 10  # train loss: mean over the last this many steps (single-batch losses are noisy)
COLUMNS = ("method", "seed", "lr", "status", "steps", "init_frobenius", "init_reduction_vs_qlora", "init_kl",
           "init_eval_loss", "eval_loss", "train_loss_first", "train_loss_last", "accuracy", "tokens_per_s",
           "peak_memory_mb", "train_s")
BASELINE = "qlora"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _init(decomposed: Path) -> dict[str, Any]:
    """The init's weight error (Frobenius, summed over modules) and KL, from the decompose output."""
    report = _read_json(decomposed / "report.json") or {}
    overall = report.get("overall", {})
    kl = (_read_json(decomposed / "init_kl.json") or {}).get("kl")
    return {"init_frobenius": (overall.get("method") or {}).get("frobenius"),
            "init_reduction_vs_qlora": (overall.get("reduction_vs_qlora") or {}).get("frobenius"),
            "init_kl": kl}


def collect(study: Path) -> list[dict[str, Any]]:
    """One row per cell of the stored grid, complete or not (status says which)."""
    from qpissa.compare.config import LEGACY_DEFAULTS, TRAIN_ONLY, CompareConfig
    from qpissa.compare.grid import cells, decompose_dir, run_dir

    known = {f.name for f in fields(CompareConfig)}  # a newer version's options are not ours to read
    identity = {**LEGACY_DEFAULTS, **json.loads((study / "study.json").read_text())["identity"]}
    cfg = CompareConfig(**{k: v for k, v in identity.items() if k in known})
    init_loss: dict[str, float] = {}  # the init is the same for every seed and lr of a method (LoRA: B = 0)
    metric: str | None = None  # classification: the task's headline metric
    rows = []
    for cell in cells(cfg):
        run = run_dir(study, cell)
        metrics = _read_jsonl(run / "metrics.jsonl")
        summary = _read_json(run / "summary.json") or {}
        steps = [m for m in metrics if "loss" in m]
        evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
        if evals and evals[0][0] == 0:
            init_loss.setdefault(cell.spec.key, evals[0][1])
        gsm8k = _read_json(run / "eval" / "gsm8k_summary.json") or {}
        classified = _read_json(run / "eval" / "classification_summary.json")
        if classified:  # the task's headline metric (accuracy, or GLUE's: matthews, pearson, f1) in that column
            gsm8k = {"accuracy": classified["value"]}
            metric = metric or classified["metric"]
        preference = [m for m in metrics if "eval_rewards_accuracy" in m]  # --objective dpo|simpo
        if preference:  # held-out preference accuracy and reward margin, as a classification's metric
            gsm8k = {"accuracy": preference[-1]["eval_rewards_accuracy"]} if "adapter" in summary else {}
            metric = "preference accuracy"
        row: dict[str, Any] = {
            "method": cell.spec.label, "seed": cell.seed, "lr": cell.lr,
            "status": "complete" if "adapter" in summary else ("running" if steps else "missing"),
            "steps": steps[-1]["step"] if steps else 0,
            **(_init(decompose_dir(study, cell.spec)) if cell.spec.name not in TRAIN_ONLY else
               {"init_frobenius": None, "init_reduction_vs_qlora": None, "init_kl": 0.0}),
            "eval_loss": evals[-1][1] if evals and evals[-1][0] > 0 and "adapter" in summary else None,
            "train_loss_first": steps[0]["loss"] if steps else None,
            "train_loss_last": (sum(m["loss"] for m in steps[-LAST_STEPS:]) / len(steps[-LAST_STEPS:])
                                if steps else None),
            "accuracy": gsm8k.get("accuracy"),
            "tokens_per_s": summary["tokens"] / summary["elapsed_s"] if summary.get("elapsed_s") else None,
            "peak_memory_mb": max((m.get("memory_mb", 0.0) for m in steps), default=None),
            "train_s": summary.get("elapsed_s"),
            "eval_curve": [[s, v] for s, v in evals if s > 0]}
        if preference:  # the held-out reward margin (its own column: studies without it keep their files)
            row["margin"] = preference[-1]["eval_rewards_margin"] if "adapter" in summary else None
        if classified or preference:  # the held-out task metric by step (train logs eval_<metric>)
            key = "eval_rewards_accuracy" if preference else f"eval_{classified['metric']}"
            row["task_curve"] = [[m["step"], m[key]] for m in metrics if key in m]
        rows.append(row)
    for row, cell in zip(rows, cells(cfg)):
        row["init_eval_loss"] = init_loss.get(cell.spec.key)
        if metric:
            row["metric"] = metric
    return rows


def _by(rows: list[dict[str, Any]], key: str, method: str, lr: float) -> dict[int, float]:
    """seed → value of ``key`` over the complete runs of (method, lr)."""
    return {r["seed"]: r[key] for r in rows
            if r["method"] == method and r["lr"] == lr and r["status"] == "complete" and r.get(key) is not None}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, lr): mean ± CI of the outcomes, and the paired difference to QLoRA's same-lr runs."""
    groups = list(dict.fromkeys((r["method"], r["lr"]) for r in rows))
    base = next((m for m, _ in groups if m == BASELINE), None)
    out = []
    for method, lr in groups:
        g = {"method": method, "lr": lr, "seeds": len(_by(rows, "eval_loss", method, lr))}
        margin = ("margin",) if any("margin" in r for r in rows) else ()  # --objective dpo|simpo
        for key in ("eval_loss", "train_loss_last", "accuracy", *margin, "tokens_per_s", "peak_memory_mb"):
            g[key] = estimate(list(_by(rows, key, method, lr).values()))
        first = next(r for r in rows if r["method"] == method and r["lr"] == lr)
        for key in ("init_eval_loss", "init_reduction_vs_qlora", "init_frobenius", "init_kl"):
            g[key] = first[key]
        if base is not None and method != base:
            for key in ("eval_loss", "accuracy", *margin):
                g[f"{key}_vs_{base}"] = paired(_by(rows, key, method, lr), _by(rows, key, base, lr))
        out.append(g)
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, Estimate):
        return value.text(digits)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(study: Path, rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    ident = json.loads((study / "study.json").read_text())["identity"]
    ref = _read_json(study / "reference.json")
    lrs = sorted({g["lr"] for g in groups})
    done = sum(r["status"] == "complete" for r in rows)
    lines = [f"# Study {study.name}", "",
             f"Model `{ident['model']}`, data `{ident['data']}`, held-out `{ident['eval_data']}` "
             f"(first {ident['eval_examples']} examples); r={ident['rank']}, {ident['steps']} steps × batch "
             f"{ident['batch_size']}×{ident['grad_accum']} × ≤{ident['max_length']} tokens, {ident['schedule']} "
             f"schedule, warmup {ident['warmup_ratio']}; seeds {ident['seeds']}. {done}/{len(rows)} runs complete.", "",
             *([f"Original model (no adapter, no quantization): held-out loss {ref['eval_loss']:.4f}.", ""]
               if ref else []),
             "Mean ± 95% CI over seeds (Student t); Δ vs QLoRA is the paired difference over the same seeds "
             "(same data order), negative = lower loss than QLoRA.", ""]
    acc = any(g["accuracy"] for g in groups)
    kl = any(g["init_kl"] for g in groups)  # measured only with --init-kl
    head = ["method", "lr", "seeds", "init Σ‖W−Ŵ‖_F reduction vs QLoRA", *(["init KL"] if kl else []),
            "init held-out loss", "held-out loss", "Δ vs QLoRA", "train loss (last 10)"]
    metric = rows[0].get("metric", "accuracy") if rows else "accuracy"
    head += [metric, f"Δ {'acc' if metric == 'accuracy' else metric} vs QLoRA"] if acc else []
    margin = any(g.get("margin") for g in groups)  # --objective dpo|simpo: held-out reward margin
    head += ["reward margin", "Δ margin vs QLoRA"] if margin else []
    head += ["tokens/s", "peak MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        red = g["init_reduction_vs_qlora"]
        cells = [g["method"], f"{g['lr']:g}", str(g["seeds"]), "—" if red is None else f"{100 * red:.1f}%",
                 *([_fmt(g["init_kl"], 5)] if kl else []), _fmt(g["init_eval_loss"]), _fmt(g["eval_loss"]),
                 _fmt(g.get(f"eval_loss_vs_{BASELINE}")), _fmt(g["train_loss_last"])]
        cells += [_fmt(g["accuracy"], 3), _fmt(g.get(f"accuracy_vs_{BASELINE}"), 3)] if acc else []
        cells += [_fmt(g["margin"], 3), _fmt(g.get(f"margin_vs_{BASELINE}"), 3)] if margin else []
        cells += [_fmt(g["tokens_per_s"], 0), _fmt(g["peak_memory_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(lrs) > 1:
        methods = list(dict.fromkeys(g["method"] for g in groups))
        lines += ["", "Held-out loss by learning rate (best per method in bold):", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |", "|" + "---|" * (len(lrs) + 2)]
        for m in methods:
            est = {g["lr"]: g["eval_loss"] for g in groups if g["method"] == m}
            scored = {lr: e.mean for lr, e in est.items() if e is not None}
            best = min(scored, key=scored.get) if scored else None
            cells = [f"**{_fmt(est.get(lr))}**" if lr == best else _fmt(est.get(lr)) for lr in lrs]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {'—' if best is None else f'{best:g}'} |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = COLUMNS + (("margin",) if any("margin" in r for r in rows) else ())
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r[c] for c in columns])
    return buf.getvalue()


def plot(study: Path, rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Held-out loss vs step (mean, CI band) per method at its best lr; final loss vs lr when swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({g["lr"] for g in groups})
    methods = list(dict.fromkeys(g["method"] for g in groups))
    task = any(r.get("task_curve") for r in rows)  # classification: the held-out metric by step beside the loss
    panels = 1 + (len(lrs) > 1) + task
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels if panels > 1 else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    if task:
        _task_panel(axes[0][-1], rows, groups, methods)
    for m in methods:
        scored = {g["lr"]: g["eval_loss"].mean for g in groups if g["method"] == m and g["eval_loss"]}
        lr = min(scored, key=scored.get) if scored else lrs[0]
        runs = [r for r in rows if r["method"] == m and r["lr"] == lr and r["status"] == "complete"]
        init = next((r["init_eval_loss"] for r in runs if r["init_eval_loss"] is not None), None)
        steps = sorted({s for r in runs for s, _ in r["eval_curve"]})
        xs, mean, lo, hi = [], [], [], []
        for s in ([0] if init is not None else []) + steps:
            vals = [init] if s == 0 else [v for r in runs for t, v in r["eval_curve"] if t == s]
            e = estimate(vals)
            if e is None:
                continue
            xs.append(s), mean.append(e.mean)
            lo.append(e.mean - (e.half_width or 0)), hi.append(e.mean + (e.half_width or 0))
        if not xs:
            continue
        line, = ax.plot(xs, mean, "o-", ms=3, label=f"{m}" + (f" (lr {lr:g})" if len(lrs) > 1 else ""))
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (mean, 95% CI band over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if len(lrs) > 1:
        ax2 = axes[0][1]
        for m in methods:
            pts = [(g["lr"], g["eval_loss"]) for g in groups if g["method"] == m and g["eval_loss"]]
            if pts:
                ax2.errorbar([p[0] for p in pts], [p[1].mean for p in pts],
                             yerr=[p[1].half_width or 0 for p in pts], marker="o", capsize=3, label=m)
        ax2.set_xscale("log")
        ax2.set_xlabel("learning rate")
        ax2.set_ylabel("final held-out loss")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    with atomic_path(study / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _task_panel(ax, rows: list[dict[str, Any]], groups: list[dict[str, Any]], methods: list[str]) -> None:
    """Held-out task metric (accuracy, or GLUE's) vs step, mean and 95% CI band over seeds, per method at its first lr."""
    metric = rows[0].get("metric", "accuracy")
    for m in methods:
        lr = next(g["lr"] for g in groups if g["method"] == m)
        runs = [r for r in rows if r["method"] == m and r["lr"] == lr and r["status"] == "complete"]
        steps = sorted({s for r in runs for s, _ in r.get("task_curve") or []})
        pts = [(s, estimate([v for r in runs for t, v in r.get("task_curve") or [] if t == s])) for s in steps]
        pts = [(s, e) for s, e in pts if e is not None]
        if not pts:
            continue
        xs, mean = [s for s, _ in pts], [e.mean for _, e in pts]
        hw = [e.half_width or 0 for _, e in pts]
        line, = ax.plot(xs, mean, "o-", ms=3, label=m)
        ax.fill_between(xs, [a - b for a, b in zip(mean, hw)], [a + b for a, b in zip(mean, hw)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"held-out {metric} (mean, 95% CI band over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plain(g: dict[str, Any]) -> dict[str, Any]:
    """An aggregate with its estimates as {mean, ci95, n} for JSON."""
    return {k: ({"mean": v.mean, "ci95": v.half_width, "n": v.n} if isinstance(v, Estimate) else v)
            for k, v in g.items()}


def write_outputs(study: Path) -> dict[str, Any]:
    """results.json, results.csv, summary.md and curves.png of STUDY, from its stored runs."""
    rows = collect(study)
    groups = aggregate(rows)
    result = {"runs": rows, "summary": [_plain(g) for g in groups]}
    write_json(study / "results.json", result)
    write_text(study / "results.csv", _csv(rows))
    write_text(study / "summary.md", summary_markdown(study, rows, groups))
    plot(study, rows, groups)
    return result
