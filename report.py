"""
The report of a run, or of several on the same axes: one self-contained HTML page of SVG charts.

    report.html     in every run folder, rewritten after each finished round
    python tsalign.py --report runs/A runs/B runs/C -o compare.html  # several runs overlaid
    python tsalign.py --report runs/A runs/B runs/C -o compare.svg   # the main charts as one SVG

Everything is drawn from the run folder's own files (config.json, metrics.jsonl, round_N/
pairs.jsonl and examples.json, round_0/base_eval.json); a metric a folder lacks is no point. No
JavaScript, nothing loaded from elsewhere: each point's value is in an SVG <title>, which browsers
show on hover. All text from the run (prompts, responses, options) is escaped.
"""
import html
import json
import math
import os

# Each chart: a title and its series, (label, metric key, key of its standard error or None).
# Round 0 is the base policy. "calls": cumulative teacher calls (warm-up included); "calls_bound":
# the teacher scoring all K samples of every prompt; "dropped:<reason>" counts dropped prompts.
CHARTS = [
    ("Win rate vs base (greedy)", [("greedy", "win_rate_vs_base", "win_rate_stderr_vs_base")]),
    ("Win rate vs base (sampled)",
     [("sampled", "win_rate_vs_base_sampled", "win_rate_stderr_vs_base_sampled")]),
    ("Student-teacher agreement", [("agreement", "student_teacher_agreement", None)]),
    ("Oracle accuracy", [("mined pairs", "pairs_oracle_accuracy", None),
                         ("teacher", "teacher_oracle_accuracy", None),
                         ("student", "student_oracle_accuracy", None)]),
    ("Teacher calls, cumulative",
     [("teacher calls", "calls", None), ("scoring all K", "calls_bound", None)]),
    ("Length (tokens)", [("policy", "policy_len", None), ("chosen", "chosen_len", None),
                         ("rejected", "rejected_len", None)]),
    ("Pairs kept and dropped",
     [("kept", "pairs", None)]
     + [(r.replace("_", " "), "dropped:" + r, None)
        for r in ("too_few_finished", "identical", "low_margin", "invalid_judge")]),
]
CHARTS_BY_TITLE = dict(CHARTS)
# -o .svg: the first series of these
SVG_CHARTS = ("Win rate vs base (greedy)", "Oracle accuracy", "Teacher calls, cumulative")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DASHES = ("", "6 3", "2 3", "8 3 2 3", "1 2")  # runs on one chart differ in dash too


def number(x):
    """A finite float, or None (absent, null, NaN or not a number)."""
    # NaN: older run folders' metrics.jsonl holds NaN, not null, for a mean over nothing (the
    # agreement, the oracle accuracies, and the pair lengths of a round without pairs).
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def rows_of(metrics):
    """Per round, the metrics with the derived keys of CHARTS added."""
    calls = bound = 0
    out = []
    for m in metrics:
        m = dict(m)
        warm = m.get("teacher_calls_warmup") or 0
        calls += (m.get("teacher_calls") or 0) + warm
        bound += (m.get("teacher_calls_if_scoring_all") or 0) + warm
        m["calls"], m["calls_bound"] = calls, bound
        for reason, n in (m.get("pairs_dropped") or {}).items():
            m["dropped:" + reason] = n
        out.append(m)
    return out


# ---- A line chart, as SVG ------------------------------------------------------------------------

def ticks(lo, hi, most=6):
    """Round values, and their labels, for a y axis over [lo, hi]: the finest step of 1, 2 or
    5 x 10^k that needs at most `most` intervals (0.5, 0.6, 0.7 rather than 0.465, 0.57)."""
    mag = 10 ** math.floor(math.log10((hi - lo) / most))
    for step in (m * mag for m in (1, 2, 5, 10, 20, 50)):
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        if last - first <= most:
            break
    values = [i * step for i in range(first, last + 1)]
    unit, div = ("k", 1000) if step >= 1000 else ("", 1)
    digits = next(d for d in range(9) if abs(round(step / div, d) - step / div) < 1e-6 * step / div)
    return values, [f"{v / div:.{digits}f}{unit}" if v else "0" for v in values]


def line_chart(title, series, width=440, height=270, line_at=None):
    """An <svg>: axes; per series a polyline, error bars, a circle per point (hollow if hollow)
    titled with its value; the legend; a dashed line at line_at (the base's win rate, 0.5).
    series: [(label, color, dash, points[, hollow])], points [(round, value or None, stderr)]."""
    points = [(x, y, e or 0) for _, _, _, pts, *_ in series for x, y, e in pts if y is not None]
    left, right, top = 52, 10, 26
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height + 16 * len(series)}" font-family="sans-serif" font-size="11">'
           f'<text x="{width / 2}" y="16" text-anchor="middle" '
           f'font-size="13">{html.escape(title)}</text>']
    if not points:
        return "\n".join(svg + [f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">'
                                'no data</text></svg>'])
    first, last = min(p[0] for p in points), max(p[0] for p in points)
    x0, x1 = (first, last) if last > first else (first - 1, last + 1)  # one round: centred
    ys = ([y - e for _, y, e in points] + [y + e for _, y, e in points]
          + ([line_at] if line_at is not None else []))
    y0, y1 = min(ys), max(ys)
    if y1 - y0 > 1e-9 * max(1.0, abs(y1)):
        pad = (y1 - y0) * 0.03  # off the frame
    else:
        pad = abs(y1) * 0.1 or 1.0
    y0 = y0 - pad if y0 - pad >= 0 or y0 < 0 else 0.0  # counts and rates do not go below 0
    y1 = y1 + pad
    values, tick_labels = ticks(y0, y1)
    y0, y1 = values[0], values[-1]
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)           # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * (height - top - 40)               # noqa: E731
    svg.append(f'<path d="M{left},{top}V{height - 40}H{width - right}" fill="none" stroke="#444"/>')
    for v, tick in zip(values, tick_labels):  # y grid and labels
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" '
                   f'stroke="#eee"/><text x="{left - 4}" y="{sy(v) + 4:.1f}" '
                   f'text-anchor="end">{tick}</text>')
    if line_at is not None:
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(line_at):.1f}" '
                   f'y2="{sy(line_at):.1f}" stroke="#777" stroke-dasharray="5 4"/>'
                   f'<text x="{width - right - 2}" y="{sy(line_at) - 4:.1f}" text-anchor="end" '
                   f'fill="#777" font-size="10">{line_at:g}: no better than the base</text>')
    for x in range(int(first), int(last) + 1):
        svg.append(f'<text x="{sx(x):.1f}" y="{height - 26}" text-anchor="middle">{x}</text>')
    svg.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" '
               'text-anchor="middle">round</text>')
    for k, (label, color, dash, pts, *hollow) in enumerate(series):
        drawn = [(x, y, e) for x, y, e in pts if y is not None]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in drawn)
        fill = "white" if hollow and hollow[0] else color
        svg.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/>')
        for x, y, e in drawn:
            if e:
                svg.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(y - e):.1f}" '
                           f'y2="{sy(y + e):.1f}" stroke="{color}"/>')
            value = f"{y!r}" + (f" ± {e!r}" if e else "")
            svg.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{fill}" '
                       f'stroke="{color}"><title>{html.escape(label)}, round {x}: {value}'
                       '</title></circle>')
        ly = height + 16 * k - 4
        svg.append(f'<line x1="10" x2="34" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/><circle cx="22" cy="{ly}" r="3" fill="{fill}" '
                   f'stroke="{color}"/><text x="40" y="{ly + 4}" font-size="10">'
                   f'{html.escape(label)}</text>')
    return "\n".join(svg + ["</svg>"])


# ---- Runs, charts, pages -------------------------------------------------------------------------

def read_run(folder):
    """A run folder's options, metrics per round, a few mined pairs per round, held-out examples."""
    def load(*path, lines=False, default=None):
        p = os.path.join(folder, *path)
        if not os.path.exists(p):
            return default
        with open(p) as f:
            return [json.loads(x) for x in f if x.strip()] if lines else json.load(f)
    metrics = load("metrics.jsonl", lines=True, default=[])
    rounds = [m["round"] for m in metrics]
    return {"folder": folder, "config": load("config.json", default={}), "rows": rows_of(metrics),
            "pairs": {r: load(f"round_{r}", "pairs.jsonl", lines=True, default=[])[:3]
                      for r in rounds if r},
            "examples": load(f"round_{max(rounds)}", "examples.json", default=[]) if rounds else [],
            "base": (load("round_0", "base_eval.json", default={}) or {}).get("greedy", [])}


def labels(runs):
    """A legend entry per run: its selection and seed, and every option in which the runs differ (a
    path by its last three parts)."""
    keys = (set.intersection(*(set(r["config"]) for r in runs))
            - {"out", "resume", "rounds", "device", "rebuild_world"})
    differ = sorted(k for k in keys if len({json.dumps(r["config"].get(k)) for r in runs}) > 1)
    short = lambda v: "/".join(str(v).split(os.sep)[-3:])  # noqa: E731
    return [", ".join([str(r["config"].get("selection")), f"seed {r['config'].get('seed')}"]
                      + [f"{k} {short(r['config'][k])}" for k in differ
                         if k not in ("selection", "seed") and r["config"].get(k) is not None])
            for r in runs]


def charts(runs, titles=None, first_only=False):
    """The CHARTS (or those in titles; first_only: their first series) of the runs. One run: a chart
    per title, its metrics told apart by colour and dash. Several: a chart per title and metric, a
    series per run, with its own colour, dash and marker (filled or hollow: not colour alone)."""
    names = labels(runs) if len(runs) > 1 else [""]
    out = []
    for title, specs in CHARTS:
        if titles and title not in titles:
            continue
        specs = specs[:1] if first_only else specs
        for group in [specs] if len(runs) == 1 else [[spec] for spec in specs]:
            series = []
            for i, (run, name) in enumerate(zip(runs, names)):
                for j, (label, key, err) in enumerate(group):
                    points = [(m["round"], number(m.get(key)), number(m.get(err)) if err else None)
                              for m in run["rows"]]
                    if any(y is not None for _, y, _ in points):
                        style = i if len(runs) > 1 else j
                        series.append((name or label, COLORS[style % len(COLORS)],
                                       DASHES[style % len(DASHES)], points,
                                       len(runs) > 1 and i % 2 == 1))
            # one of the title's several metrics: say which
            one = len(group) == 1 and len(CHARTS_BY_TITLE[title]) > 1
            out.append(line_chart(f"{title} ({group[0][0]})" if one else title, series,
                                  line_at=0.5 if title.startswith("Win rate") else None))
    return out


def table(head, rows, digits=None):
    """An HTML table; with digits, floats rounded to that many decimals."""
    def cell(x):
        if isinstance(x, str):
            return html.escape(x)
        if digits is not None and isinstance(x, float):
            return html.escape(f"{x:.{digits}f}")
        return html.escape(json.dumps(x))
    return ("<table><tr>" + "".join(f"<th>{cell(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in row) + "</tr>"
                      for row in rows) + "</table>")


METRIC_COLUMNS = ("round", "pairs", "teacher_calls", "win_rate_vs_base", "win_rate_vs_base_sampled",
                  "student_teacher_agreement", "pairs_oracle_accuracy", "dpo_loss", "policy_len")
STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}"
         "table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:left;"
         "vertical-align:top;white-space:pre-wrap}.charts svg{margin:4px;border:1px solid #eee}"
         ".headline{font-size:16px;font-weight:bold;margin:.3em 0}")


def headline(run):
    """The run in one line: its last round's greedy win rate with its standard error, the teacher
    calls against the teacher scoring all K, and the student-teacher agreement before -> after."""
    rows = [m for m in run["rows"] if number(m.get("win_rate_vs_base")) is not None]
    if not rows:
        return "no finished round yet"
    last, agree = rows[-1], [number(m.get("student_teacher_agreement")) for m in run["rows"]]
    agree = [a for a in agree if a is not None]
    parts = [f"round {last['round']}: greedy win rate vs base {last['win_rate_vs_base']:.3f} ± "
             f"{number(last.get('win_rate_stderr_vs_base')) or 0:.3f}"]
    if last.get("calls_bound"):
        parts.append(f"teacher calls {last['calls']:,} against {last['calls_bound']:,} scoring "
                     f"all K ({last['calls'] / last['calls_bound']:.2f})")
    if agree:
        parts.append(f"student-teacher agreement {agree[0]:.3f} → {agree[-1]:.3f}")
    return "; ".join(parts)


def page(runs):
    """The HTML of one run's report, or of several runs compared."""
    if len(runs) == 1:
        title = "TS-Align run " + runs[0]["folder"]
    else:
        title = f"TS-Align: {len(runs)} runs compared"
    names = labels(runs) if len(runs) > 1 else [None]
    heads = "".join(f"<p class='headline'>"
                    f"{html.escape((name + ': ' if name else '') + headline(run))}</p>"
                    for run, name in zip(runs, names))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{heads}",
             "<div class='charts'>" + "".join(charts(runs)) + "</div>"]
    for run, name in zip(runs, names):
        if name:  # several runs: each one's tables under its name (one run: the title says it)
            parts.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(run['folder'])}</p>")
        parts.append("<h3>Metrics</h3>"
                     + table(METRIC_COLUMNS,
                             [[m.get(c) for c in METRIC_COLUMNS] for m in run["rows"]], 3))
        pairs = [[r, p.get("prompt"), p.get("chosen"), p.get("rejected"), p.get("margin")]
                 for r, ps in run["pairs"].items() for p in ps]
        parts.append("<h3>Mined pairs (the first three of each round)</h3>"
                     + table(["round", "prompt", "chosen", "rejected", "margin"], pairs, 3))
        examples = [[e.get("prompt"), mark(b.get("text"), e.get("base_oracle")),
                     mark(e.get("response"), e.get("oracle"))]
                    for e, b in zip(run["examples"], run["base"])]
        parts.append("<h3>Held-out examples, base -> final</h3>"
                     + table(["prompt", "base", "final"], examples))
        parts.append("<h3>Options</h3>" + table(["option", "value"], sorted(run["config"].items())))
    return "\n".join(parts + ["</body></html>"])


def mark(text, oracle):
    """A response with ✓ or ✗ when the oracle scored it (1.0 is right), as it is otherwise."""
    if oracle is None:
        return text
    return f"{'✓' if oracle == 1.0 else '✗'} {text}"


def write(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_run_report(folder):
    """report.html in the run folder (atomically: written aside, then renamed); returns its path."""
    path = os.path.join(folder, "report.html")
    write(path, page([read_run(folder)]))
    return path


def compare(folders, output):
    """Several runs on the same axes: an HTML page, or with output *.svg the main charts as one."""
    for f in folders:
        if not os.path.exists(os.path.join(f, "metrics.jsonl")):
            raise FileNotFoundError(f"{f} is not a run folder (no metrics.jsonl)")
    runs = [read_run(f) for f in folders]
    if output.endswith(".svg"):
        svgs = charts(runs, SVG_CHARTS, first_only=True)
        width = 440 * len(svgs)
        height = max(int(s.split('height="')[1].split('"')[0]) for s in svgs)
        body = "".join(s.replace("<svg ", f'<svg x="{440 * i}" ', 1) for i, s in enumerate(svgs))
        write(output, f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
                      f'height="{height}">{body}</svg>\n')
    else:
        write(output, page(runs))
    return output
