"""report.html: the pass table and per-layer plots from passes.json, for a person to read.

Plain HTML with inline SVG bar charts: no scripts, no network, opens anywhere. Plots appear
for what passes report per layer: Quantize's weight error, sensitivity and precision, and
Sparsify's sparsity.
"""

from __future__ import annotations

import html

PRECISION_COLORS = {"int4": "#d9534f", "int8": "#f0ad4e", "w8a8": "#5bc0de", "fp32": "#5cb85c"}


def render(records: list[dict]) -> str:
    rows = []
    for r in records:
        if r.get("failed"):
            rows.append(f"<tr class=failed><td>{r['index']:03d}</td><td>{_e(r['pass'])}</td>"
                        f"<td colspan=4>failed: {_e(r.get('error', ''))}</td></tr>")
            continue
        rows.append(f"<tr><td>{r['index']:03d}</td><td>{_e(r['pass'])}</td>"
                    f"<td>{r.get('seconds', 0):.3f}</td><td>{r.get('param_bytes', 0) / 1e6:.2f}</td>"
                    f"<td>{r.get('flops', 0) / 1e9:.3f}</td><td>{_e(_summary(r.get('did')))}</td>"
                    f"</tr>")
    plots = [_layer_plot(r) for r in records if isinstance(r.get("did"), dict)
             and isinstance(r["did"].get("layers"), dict) and r["did"]["layers"]]
    return ("<!doctype html><meta charset=utf-8><title>graft report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}"
            "tr.failed{background:#fdd}svg text{font-size:11px}</style>"
            "<h1>graft compile report</h1><h2>Passes</h2><table><tr><th>#</th><th>pass</th>"
            "<th>seconds</th><th>param MB</th><th>GFLOPs</th><th>what it did</th></tr>"
            + "".join(rows) + "</table>" + "".join(plots))


def _summary(did) -> str:
    if not isinstance(did, dict):
        return ""
    parts = [f"{k}: {v}" for k, v in did.items()
             if (k not in ("layers", "kept_float32") and not isinstance(v, (dict, list)))
             or k in ("precisions", "rules")]
    return "; ".join(parts)[:400]


def _layer_plot(record: dict) -> str:
    layers = record["did"]["layers"]
    names = list(layers)
    metrics = [m for m in ("weight_error", "sensitivity", "sparsity")
               if any(m in v for v in layers.values())]
    charts = []
    width, bar = 900, 10
    for metric in metrics:
        values = [float(layers[n].get(metric, 0.0)) for n in names]
        top = max(values) or 1.0
        bars = []
        for i, (name, value) in enumerate(zip(names, values)):
            color = PRECISION_COLORS.get(layers[name].get("precision"), "#999")
            length = value / top * (width - 420)
            y = i * (bar + 2)
            bars.append(f"<text x=0 y={y + bar - 1}>{_e(name[-60:])}</text>"
                        f"<rect x=400 y={y} width={length:.1f} height={bar} fill={color}>"
                        f"<title>{_e(name)}: {value:.4g} ({layers[name].get('precision')})"
                        f"</title></rect><text x={405 + length:.1f} y={y + bar - 1}>"
                        f"{value:.3g}</text>")
        height = len(names) * (bar + 2)
        charts.append(f"<h3>{metric.replace('_', ' ')} by layer</h3><svg width={width} "
                      f"height={height}>{''.join(bars)}</svg>")
    legend = ""
    if any("precision" in v for v in layers.values()):
        legend = "<p>bar color: precision chosen &mdash; " + " ".join(
            f"<span style='color:{c}'>&#9632; {p}</span>" for p, c in PRECISION_COLORS.items()
        ) + "</p>"
    return (f"<h2>{_e(record['pass'])} (pass {record['index']:03d}): per layer</h2>"
            + legend + "".join(charts))


def _e(text) -> str:
    return html.escape(str(text))
