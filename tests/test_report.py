"""Report arithmetic on hand-made metrics: reductions, totals, per layer type, skipped norms."""
from __future__ import annotations

import csv
import io

import pytest

from qpissa.decompose.report import build_report, layer_index, layer_type, to_csv, to_markdown, write_report


def metric(module: str, method: float, qlora: float, loftq: float, spectrum: bool = True) -> dict:
    def norms(x: float) -> dict:
        return {"nuclear": 10 * x if spectrum else None, "frobenius": x, "spectral": x / 2 if spectrum else None}

    return {"module": module, "tensor": module + ".weight", "shape": [8, 4], "method": norms(method),
            "qlora": norms(qlora), "loftq": norms(loftq), "info": {}}


ARGS = {"method": "qpissa", "rank": 2, "iters": 1}


def test_names():
    assert layer_type("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("pooler.dense") is None and layer_type("pooler.dense") == "pooler.dense"


def test_totals_and_reductions():
    rows = [metric("l.0.q", 1.0, 2.0, 1.5), metric("l.1.q", 3.0, 4.0, 3.5), metric("l.0.k", 1.0, 4.0, 2.0)]
    rep = build_report(rows, ARGS, "m")
    overall = rep["overall"]
    assert overall["modules"] == 3
    assert overall["method"]["frobenius"] == pytest.approx(5.0)
    assert overall["reduction_vs_qlora"]["frobenius"] == pytest.approx(1 - 5 / 10)
    assert overall["reduction_vs_loftq"]["nuclear"] == pytest.approx(1 - 50 / 70)
    assert rep["by_layer_type"]["q"]["reduction_vs_qlora"]["frobenius"] == pytest.approx(1 - 4 / 6)
    assert rep["modules"][2]["reduction_vs_qlora"]["spectral"] == pytest.approx(0.75)
    table = list(csv.reader(io.StringIO(to_csv(rep))))
    assert table[0][0] == "module" and len(table) == 4
    assert float(table[1][table[0].index("reduction_vs_qlora_frobenius")]) == pytest.approx(0.5)
    assert "| overall | 3 | 50.00% | 50.00% |" in to_markdown(rep)


def test_frobenius_only_reports_leave_other_norms_empty(tmp_path):
    rep = build_report([metric("l.0.q", 1.0, 2.0, 1.5, spectrum=False)], ARGS, "m")
    assert rep["overall"]["reduction_vs_qlora"]["nuclear"] is None
    assert rep["overall"]["reduction_vs_qlora"]["frobenius"] == pytest.approx(0.5)
    assert "| overall | 1 | — | 50.00% | — |" in to_markdown(rep)
    write_report(rep, tmp_path)
    assert (tmp_path / "error_by_layer.png").stat().st_size > 1000


def test_error_plot_starts_at_zero_and_names_t():
    import matplotlib.pyplot as plt

    from qpissa.decompose.report import error_figure

    rows = [metric(f"layers.{i}.q", 14.0 + i, 16.0 + i, 15.0 + i) for i in range(3)]
    fig = error_figure(build_report(rows, {"method": "qpissa", "rank": 2, "iters": 5}, "m"))
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 18
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["LoftQ T=5", "QLoRA (NF4 of W)", "qpissa T=5"]
    plt.close(fig)
