"""report.html: the pass table and plots from passes.json (and kernels.json), for a person.

One self-contained HTML file: the plots are matplotlib figures inlined as SVG (no scripts, no
network fetches, opens anywhere). What is plotted:
- parameter bytes and FLOPs after each pass, and each pass's time;
- for each pass that reports layers: Quantize's weight error, sensitivity and precision,
  Sparsify's sparsity, ShareKV's KV cache bytes per token (and its search: the KV reduction
  each step reached against the perplexity ratio it cost), EarlyExit's exit rates and each
  exit's agreement with the full model; for a decoder LM compiled with speculative= or
  token_exit=, the import's calibration by layer (draft acceptance; per-token exit rate and
  agreement at each layer's threshold);
- the kernel time breakdown of each compiled function, when the compile profiled it.
"""

from __future__ import annotations

import html
import io
import itertools

PRECISION_COLORS = {"int4": "#d9534f", "int8": "#f0ad4e", "w8a8": "#5bc0de", "fp16": "#9b59b6",
                    "bf16": "#8e44ad", "fp32": "#5cb85c"}
NO_PRECISION = "#607d8b"
LAYER_METRICS = ("weight_error", "sensitivity", "sparsity", "kv_bytes_per_token", "exit_rate",
                 "exit_agreement", "draft_acceptance")
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}"
         "tr.failed{background:#fdd}figure{margin:0.5em 0}.note{color:#555;font-size:13px}")


def render(records: list[dict], kernel_times: dict | None = None) -> str:
    """The report for the dump's pass records; `kernel_times` as in kernels.json."""
    salts = itertools.count()
    parts = ["<!doctype html><meta charset=utf-8><title>graft report</title>",
             f"<style>{STYLE}</style><h1>graft compile report</h1>",
             "<h2>Passes</h2>", _pass_table(records)]
    done = [r for r in records if not r.get("failed")]
    if len(done) > 1:
        parts.append(_figure(_pass_figure(done), next(salts), "parameter bytes, FLOPs and time "
                                                               "after each pass"))
    for record in done:
        layers = record.get("did", {}).get("layers") if isinstance(record.get("did"), dict) \
            else None
        if isinstance(layers, dict) and layers:
            parts.append(_layer_section(record, layers, salts))
    if kernel_times:
        parts.append(_kernel_section(kernel_times, salts))
    return "".join(parts)


def _pass_table(records: list[dict]) -> str:
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
    return ("<table><tr><th>#</th><th>pass</th><th>seconds</th><th>param MB</th><th>GFLOPs</th>"
            "<th>what it did</th></tr>" + "".join(rows) + "</table>")


def _summary(did) -> str:
    if not isinstance(did, dict):
        return ""
    parts = [f"{k}: {v}" for k, v in did.items()
             if (k not in ("layers", "kept_float32") and not isinstance(v, (dict, list)))
             or k in ("precisions", "rules")]
    return "; ".join(parts)[:400]


def _pass_figure(records: list[dict]):
    names = [f"{r['index']:03d} {r['pass']}" for r in records]
    series = [("parameter MB", [r.get("param_bytes", 0) / 1e6 for r in records], "#337ab7"),
              ("GFLOPs", [r.get("flops", 0) / 1e9 for r in records], "#f0ad4e"),
              ("seconds", [r.get("seconds", 0) for r in records], "#5cb85c")]
    fig = _new_figure(9, 0.6 + 0.22 * len(names) * 1.0 + 0.6)
    for column, (title, values, color) in enumerate(series):
        ax = fig.add_subplot(1, 3, column + 1)
        ax.barh(range(len(names)), values, color=color)
        ax.set_yticks(range(len(names)), names if column == 0 else [""] * len(names))
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    return fig


def _layer_section(record: dict, layers: dict, salts) -> str:
    metrics = [m for m in LAYER_METRICS if any(isinstance(v, dict) and m in v
                                               for v in layers.values())]
    title = f"{record['pass']} (pass {record['index']:03d}): per layer"
    parts = [f"<h2>{_e(title)}</h2>"]
    precisions = [v.get("precision") if isinstance(v, dict) else None for v in layers.values()]
    if any(precisions):
        counts = {p: precisions.count(p) for p in dict.fromkeys(precisions) if p}
        parts.append("<p class=note>bar color: precision chosen &mdash; " + ", ".join(
            f"<span style='color:{PRECISION_COLORS.get(p, NO_PRECISION)}'>&#9632;</span> {_e(p)} "
            f"({n} layer{'s' if n != 1 else ''})" for p, n in counts.items()) + "</p>")
    for metric in metrics:
        label = metric.replace("_", " ")
        parts.append(f"<h3>{label} by layer</h3>")
        parts.append(_figure(_layer_figure(layers, metric, precisions), next(salts),
                             f"{label} by layer"))
    curve = _share_curve(record)
    if curve:
        parts.append(curve[0])
        parts.append(_figure(curve[1], next(salts), "ShareKV search"))
        parts.append(curve[2])
    return "".join(parts)


def _layer_figure(layers: dict, metric: str, precisions: list):
    names = list(layers)
    values = [float((layers[n] or {}).get(metric) or 0.0) for n in names]
    colors = [PRECISION_COLORS.get(p, NO_PRECISION) for p in precisions]
    fig = _new_figure(9, 0.5 + 0.16 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(names)), values, color=colors, height=0.8)
    ax.set_yticks(range(len(names)), [n[-48:] for n in names])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel(metric.replace("_", " "), fontsize=9)
    ax.margins(y=0.01)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _share_curve(record: dict):
    """ShareKV's search: the share of KV bytes saved after each layer tried against the
    perplexity ratio measured; kept layers filled, rejected ones hollow. Returns the heading,
    the figure and a table of the steps, or None."""
    trials = record["did"].get("search") if record["pass"] == "share_kv" else None
    if not trials:
        return None
    layers = len(record["did"]["layers"])
    saved, kept = [], 0
    for trial in trials:
        saved.append(100 * (kept + 1) / layers)  # what this trial would have reached
        kept += bool(trial["kept"])
    ratios = [t["perplexity_ratio"] for t in trials]
    fig = _new_figure(6, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(saved, ratios, color="#ccc", zorder=1)
    for flag, face in ((True, "#337ab7"), (False, "none")):
        xs = [x for x, t in zip(saved, trials) if bool(t["kept"]) == flag]
        ys = [y for y, t in zip(ratios, trials) if bool(t["kept"]) == flag]
        ax.scatter(xs, ys, facecolors=face, edgecolors="#337ab7", zorder=2,
                   label="kept" if flag else "rejected")
    ax.set_xlabel("KV bytes saved (% of layers reading another's)", fontsize=9)
    ax.set_ylabel("perplexity ratio", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    rows = "".join(f"<tr class=share-step><td>{_e(t['layer'])}</td><td>{x:.1f}%</td>"
                   f"<td>{t['perplexity_ratio']:.4f}</td><td>{'kept' if t['kept'] else 'rejected'}"
                   f"</td></tr>" for t, x in zip(trials, saved))
    table = ("<table><tr><th>layer tried</th><th>KV saved</th><th>perplexity ratio</th>"
             "<th></th></tr>" + rows + "</table>")
    return (f"<h3>ShareKV search (budget {_e(record['did'].get('budget', ''))})</h3>", fig, table)


def _kernel_section(kernel_times: dict, salts, top: int = 20) -> str:
    parts = ["<h2>Kernel time</h2>"]
    for function, data in kernel_times.items():
        if "skipped" in data:
            parts.append(f"<p class=note>{_e(function)}: not profiled ({_e(data['skipped'])})</p>")
            continue
        kernels = sorted(data["kernels"], key=lambda k: -k["ms"])
        in_kernels = sum(k["ms"] for k in kernels)
        shown, rest = kernels[:top], kernels[top:]
        names = [f"{k['name'][:56]} ({k['calls']}x)" for k in shown]
        values = [k["ms"] for k in shown]
        if rest:
            names.append(f"{len(rest)} other kernels")
            values.append(sum(k["ms"] for k in rest))
        dims = ", ".join(f"{k}={v}" for k, v in data.get("dims", {}).items())
        caption = (f"{function}: {in_kernels:.3f} ms in kernels of {data['run_ms']:.3f} ms a run"
                   f"{f' at {dims}' if dims else ''} (mean of {data.get('repeat', '?')} runs, "
                   "random inputs, profiler on)")
        parts.append(f"<h3>{_e(function)}: kernel time breakdown</h3><p class=note>"
                     f"{_e(caption)}</p>")
        fig = _new_figure(9, 0.6 + 0.2 * len(names))
        ax = fig.add_subplot(1, 1, 1)
        ax.barh(range(len(names)), values, color="#337ab7")
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.3f} ms ({100 * value / max(in_kernels, 1e-9):.0f}%)",
                    va="center", fontsize=7)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("ms per run", fontsize=9)
        ax.set_xlim(0, max(values or [1]) * 1.25)
        parts.append(_figure(fig, next(salts), f"{function} kernel time"))
    return "".join(parts)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, min(max(height, 1.6), 60)), layout="constrained")


def _figure(fig, salt: int, label: str) -> str:
    """The figure as inline SVG; text stays text, ids are unique within the page."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"graft{salt}"}):
        fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    if "<metadata>" in svg:  # the creation date and tool: makes reports differ for nothing
        svg = svg[:svg.index("<metadata>")] + svg[svg.index("</metadata>") + len("</metadata>"):]
    return f"<figure aria-label='{_e(label)}'>{svg}</figure>"


def _e(text) -> str:
    return html.escape(str(text))
