"""report.html: the pass table and per-layer plots from passes.json, for a person to read.

Plain HTML with inline SVG bar charts: no scripts, no network, opens anywhere. Plots appear
for what passes report per layer: Quantize's weight error, sensitivity and precision,
Sparsify's sparsity, ShareKV's KV cache bytes per token (and its search: the KV reduction each
accepted step reached against the perplexity ratio it cost), EarlyExit's exit rates and each
exit's agreement with the full model (held-out calibration samples).
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
    metrics = [m for m in ("weight_error", "sensitivity", "sparsity", "kv_bytes_per_token",
                           "exit_rate", "exit_agreement")
               if any(m in v for v in layers.values())]
    charts = []
    width, bar = 900, 10
    for metric in metrics:
        values = [float(layers[n].get(metric) or 0.0) for n in names]
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
            + legend + "".join(charts) + _share_curve(record))


def _share_curve(record: dict) -> str:
    """ShareKV's search as points: KV bytes saved after each layer tried (x) against the
    perplexity ratio measured (y); kept layers filled, rejected ones hollow."""
    trials = record["did"].get("search") if record["pass"] == "share_kv" else None
    if not trials:
        return ""
    layers = len(record["did"]["layers"])
    width, height, pad = 600, 300, 40
    top = max(max(t["perplexity_ratio"] for t in trials), 1.01)
    points, kept = [], 0
    for t in trials:
        readers = kept + 1  # what this trial would have reached
        x = pad + readers / layers * (width - 2 * pad)
        y = height - pad - (min(t["perplexity_ratio"], top) - 1) / (top - 1) * (height - 2 * pad)
        fill = "#337ab7" if t["kept"] else "none"
        points.append(f"<circle cx={x:.1f} cy={y:.1f} r=4 fill={fill} stroke=#337ab7>"
                      f"<title>layer {t['layer']}: ratio {t['perplexity_ratio']:.4f}, "
                      f"{'kept' if t['kept'] else 'rejected'}</title></circle>")
        kept += bool(t["kept"])
    axes = (f"<line x1={pad} y1={height - pad} x2={width - pad} y2={height - pad} "
            f"stroke=#000 /><line x1={pad} y1={pad} x2={pad} y2={height - pad} stroke=#000 />"
            f"<text x={pad} y={height - 10}>KV bytes saved: 0</text>"
            f"<text x={width - pad - 60} y={height - 10}>100%</text>"
            f"<text x=0 y={pad - 5}>perplexity ratio {top:.3g}</text>"
            f"<text x=0 y={height - pad}>1.0</text>")
    return (f"<h3>ShareKV search (budget {_e(record['did'].get('budget', ''))})</h3>"
            f"<svg width={width} height={height}>{axes}{''.join(points)}</svg>")


def _e(text) -> str:
    return html.escape(str(text))
