"""report.html: the values drawn are the run's own, every kind of run folder draws, text is escaped; and
metrics.jsonl is standard JSON."""
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET

import pytest

import report
import tsalign
from conftest import argv, metrics

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run-5540fa7")


def svgs(page):
    """Every <svg> element of a page, parsed (so each must be well-formed XML)."""
    return [ET.fromstring(s) for s in re.findall(r"<svg .*?</svg>", page, re.S)]


def drawn(svg):
    """{(series label, round): value} from the <title> of every point of a chart."""
    out = {}
    for t in svg.iter("{http://www.w3.org/2000/svg}title"):
        label, rnd, value = re.fullmatch(r"(.*), round (\d+): (\S+)(?: ± \S+)?", t.text).groups()
        out[(label, int(rnd))] = float(value)
    return out


@pytest.fixture(scope="module")
def two_rounds(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    tsalign.main(argv(world, out, "--rounds", "2"))
    return out


def expected(rows, key):
    """The value a chart draws for key in each round, computed here from metrics.jsonl: teacher calls and
    their bound (the teacher scoring all K) are cumulative, the warm-up's calls counted in both."""
    if key in ("calls", "calls_bound"):
        own = "teacher_calls" if key == "calls" else "teacher_calls_if_scoring_all"
        each = [(m.get(own) or 0) + (m.get("teacher_calls_warmup") or 0) for m in rows]
        return [sum(each[:i + 1]) for i in range(len(rows))]
    if key.startswith("dropped:"):
        return [(m.get("pairs_dropped") or {}).get(key.split(":")[1]) for m in rows]
    return [m.get(key) for m in rows]


def test_the_values_drawn_are_the_runs_own(two_rounds):
    page = (two_rounds / "report.html").read_text()
    rows = metrics(two_rounds)
    charts = dict(zip([title for title, _ in report.CHARTS], svgs(page)))
    assert len(charts) == len(report.CHARTS)
    checked = 0
    for title, specs in report.CHARTS:
        values = drawn(charts[title])
        for label, key, _ in specs:
            for m, want in zip(rows, expected(rows, key)):
                assert values.get((label, m["round"])) == want, (title, label, m["round"])
                checked += want is not None
    assert checked > 20  # the charts are not empty: win rates, agreement, calls, lengths, pairs for each round
    # This run has no oracle (the teacher judges): no oracle-accuracy points at all.
    assert drawn(charts["Oracle accuracy"]) == {}
    calls = drawn(charts["Teacher calls, cumulative"])
    assert calls[("scoring all K", 2)] > calls[("scoring all K", 1)] > calls[("scoring all K", 0)]
    for svg in charts.values():
        check_geometry(svg)


SVG = "{http://www.w3.org/2000/svg}"


def points(svg):
    """Every point of a chart as drawn: (value, stderr or 0, cx, cy, its error bar's (y1, y2) or None)."""
    bars = {}  # vertical lines (error bars), by their x and colour
    for line in svg.iter(SVG + "line"):
        if line.get("x1") == line.get("x2"):
            ends = float(line.get("y1")), float(line.get("y2"))
            bars.setdefault((line.get("x1"), line.get("stroke")), []).append(ends)
    out = []
    for c in svg.iter(SVG + "circle"):
        if c.find(SVG + "title") is None:  # a legend's marker, not a point
            continue
        value, err = re.fullmatch(r".*, round \d+: (\S+)(?: ± (\S+))?", c.find(SVG + "title").text).groups()
        cy = float(c.get("cy"))
        bar = min(bars.get((c.get("cx"), c.get("stroke")), []), key=lambda b: abs((b[0] + b[1]) / 2 - cy),
                  default=None)
        out.append((float(value), float(err or 0), float(c.get("cx")), cy, bar))
    return out


def check_geometry(svg):
    """Where the points are drawn: a larger value higher up (a smaller y), every point on the one linear scale
    that the y axis's labels give, and each error bar one stderr above and below its point."""
    pts = points(svg)
    right_aligned = [t for t in svg.iter(SVG + "text") if t.get("text-anchor") == "end"]
    axis_x = min((float(t.get("x")) for t in right_aligned), default=None)  # the y axis's labels: leftmost
    ticks = [(float(t.text[:-1]) * 1000 if t.text.endswith("k") else float(t.text), float(t.get("y")) - 4)
             for t in right_aligned if float(t.get("x")) == axis_x]
    if not pts:
        return
    (v0, y0), (v1, y1) = ticks[0], ticks[-1]
    scale = (y0 - y1) / (v1 - v0)  # pixels per unit, from the axis's own labels
    assert scale > 0, f"the y axis is upside down: {ticks}"
    span = max(v for v, _ in ticks) - min(v for v, _ in ticks)
    for value, err, _, cy, bar in pts:
        assert abs((v0 + (y0 - cy) / scale) - value) < 0.01 * span, (value, cy, ticks)  # on the axis's scale
        if err:
            assert bar is not None, f"no error bar at {value} ± {err}"
            assert abs(abs(bar[1] - bar[0]) - 2 * err * scale) < 0.25, (value, err, bar, scale)
            assert abs((bar[0] + bar[1]) / 2 - cy) < 0.15, (value, err, bar, cy)
    for a in pts:
        for b in pts:
            if a[0] > b[0]:
                assert a[3] < b[3], f"{a[0]} is drawn below {b[0]}"


WIN_RATES = [(0.5, 0.0), (0.62, 0.05), (0.81, 0.04), (0.7, 0.1)]  # (value, stderr) by round


def test_points_and_error_bars_are_drawn_where_their_values_say(tmp_path):
    rows = [dict(BASE, round=r, win_rate_vs_base=v, win_rate_stderr_vs_base=e, pairs=10 * r)
            for r, (v, e) in enumerate(WIN_RATES)]
    page = open(report.write_run_report(write_run(str(tmp_path / "run"), rows))).read()
    charts = dict(zip([title for title, _ in report.CHARTS], svgs(page)))
    win = points(charts["Win rate vs base (greedy)"])
    assert [(v, e) for v, e, *_ in win] == WIN_RATES
    assert [cx for _, _, cx, _, _ in win] == sorted(cx for _, _, cx, _, _ in win)  # rounds left to right
    assert sum(bar is not None for *_, bar in win) == 3  # a stderr of 0 has no bar
    for svg in charts.values():
        check_geometry(svg)


def test_metrics_jsonl_is_standard_json(two_rounds):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    for line in (two_rounds / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def write_run(folder, rows, pairs=None, config=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes NaN as NaN, as older versions did
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config or {"selection": "ts-align", "seed": 0}, f)
    for r, ps in (pairs or {}).items():
        os.makedirs(os.path.join(folder, f"round_{r}"), exist_ok=True)
        with open(os.path.join(folder, f"round_{r}", "pairs.jsonl"), "w") as f:
            f.write("".join(json.dumps(p) + "\n" for p in ps))
    return folder


BASE = {"round": 0, "win_rate_vs_base": 0.5, "win_rate_vs_base_sampled": 0.5, "student_teacher_agreement": 0.7,
        "policy_len": 5.0, "teacher_calls_warmup": 0}


@pytest.mark.parametrize("case", ["round 0 only", "a round with no pairs", "NaN from an older version", "no oracle"])
def test_every_kind_of_run_folder_draws(tmp_path, case):
    rows = [dict(BASE)]
    if case != "round 0 only":
        empty = dict(BASE, round=1, pairs=0, teacher_calls=0, teacher_calls_if_scoring_all=96,
                     pairs_dropped={"too_few_finished": 12, "identical": 0, "low_margin": 0, "invalid_judge": 0},
                     chosen_len=None, rejected_len=None, pairs_oracle_accuracy=None)
        if case == "NaN from an older version":
            empty.update(chosen_len=float("nan"), student_teacher_agreement=float("nan"))
        if case == "no oracle":
            empty.pop("pairs_oracle_accuracy")
        rows.append(empty)
    folder = write_run(str(tmp_path / "run"), rows)
    page = open(report.write_run_report(folder)).read()
    charts = svgs(page)
    assert len(charts) == len(report.CHARTS)
    win = drawn(charts[0])
    assert win[("greedy", 0)] == 0.5 and (len(rows) == 1 or win[("greedy", 1)] == 0.5)
    lengths = drawn(charts[5])
    assert ("chosen", 1) not in lengths  # a missing, null or NaN value is no point, not a zero


def test_text_from_the_run_is_escaped(tmp_path):
    evil = "<script>alert('x')</script> & <b>bold</b>"
    folder = write_run(str(tmp_path / "run"), [dict(BASE), dict(BASE, round=1, pairs=1)],
                       pairs={1: [{"prompt": evil, "chosen": evil, "rejected": "ok", "margin": 1.0}]},
                       config={"selection": evil, "seed": 0})
    page = open(report.write_run_report(folder)).read()
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page


def test_several_runs_on_the_same_axes(two_rounds, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)  # a folder written before the redesign: other options, NaN-free JSON
    page = open(report.compare([str(two_rounds), str(other)], str(tmp_path / "compare.html"))).read()
    win = drawn(svgs(page)[0])
    labels = {label for label, _ in win}
    assert len(labels) == 2 and all(label.startswith("ts-align, seed 0, ") for label in labels)  # and how they differ
    svg = report.compare([str(two_rounds), str(other)], str(tmp_path / "compare.svg"))
    ET.parse(svg)  # one well-formed SVG
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        report.compare([str(tmp_path)], str(tmp_path / "x.html"))


def test_report_command(two_rounds, tmp_path, capsys):
    tsalign.main(["--report", str(two_rounds), "-o", str(tmp_path / "r.html")])
    assert "wrote" in capsys.readouterr().out
    assert len(svgs((tmp_path / "r.html").read_text())) == len(report.CHARTS)


# ---- How the page reads: round axis values, the base's line, the headline, tables, runs without colour ----

SVG = "{http://www.w3.org/2000/svg}"


def y_axis(svg):
    """{label: y position} of a chart's y-axis labels (the right-aligned texts furthest left: left of the axis)."""
    right = [t for t in svg.iter(SVG + "text") if t.get("text-anchor") == "end"]
    x = min(float(t.get("x")) for t in right)
    return {t.text: float(t.get("y")) - 4 for t in right if float(t.get("x")) == x}


def test_axis_values_are_round():
    assert report.ticks(0.465, 0.87)[1] == ["0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    assert report.ticks(0.88, 0.98)[1] == ["0.88", "0.90", "0.92", "0.94", "0.96", "0.98"]
    assert report.ticks(0, 24576)[1] == ["0", "5k", "10k", "15k", "20k", "25k"]
    assert report.ticks(5.5, 6.8)[1] == ["5.5", "6.0", "6.5", "7.0"]


def test_charts_have_round_axis_values_and_a_dashed_line_at_half(two_rounds):
    for title, svg in zip([t for t, _ in report.CHARTS], svgs((two_rounds / "report.html").read_text())):
        if svg.find(SVG + "polyline") is None:
            continue  # no data (this run has no oracle)
        axis = y_axis(svg)
        values = sorted(float(k[:-1]) * 1000 if k.endswith("k") else float(k) for k in axis)
        steps = {round(b - a, 9) for a, b in zip(values, values[1:])}
        assert len(steps) == 1 and 4 <= len(values) <= 7, (title, axis)  # evenly spaced, a few of them
        step = steps.pop()
        assert f"{step:.0e}"[0] in "125", (title, axis)  # 1, 2 or 5 x 10^k
        assert all(abs(v / step - round(v / step)) < 1e-6 for v in values), (title, axis)
        dashed = [ln for ln in svg.iter(SVG + "line") if ln.get("stroke-dasharray") == "5 4"]
        if title.startswith("Win rate"):  # at the height of 0.5 on the chart's own axis
            (lo, y_lo), (hi, y_hi) = [(float(k), y) for k, y in axis.items() if float(k) in (values[0], values[-1])]
            assert len(dashed) == 1 and float(dashed[0].get("y1")) == pytest.approx(
                y_lo + (0.5 - lo) / (hi - lo) * (y_hi - y_lo), abs=0.1)
        else:
            assert not dashed


def test_headline_table_numbers_and_headings(two_rounds):
    page = (two_rounds / "report.html").read_text()
    rows = report.rows_of(metrics(two_rounds))
    last = rows[-1]
    want = (f"round 2: greedy win rate vs base {last['win_rate_vs_base']:.3f} ± {last['win_rate_stderr_vs_base']:.3f}; "
            f"teacher calls {last['calls']:,} against {last['calls_bound']:,} scoring all K "
            f"({last['calls'] / last['calls_bound']:.2f}); student-teacher agreement "
            f"{rows[0]['student_teacher_agreement']:.3f} → {last['student_teacher_agreement']:.3f}")
    assert f"<p class='headline'>{want}</p>" in page
    assert page.index("headline") < page.index("<svg")  # at the top, before the charts
    headings = re.findall(r"<h\d>(.*?)</h\d>", page)
    assert not [(a, b) for a in headings for b in headings if a != b and a in b], headings  # nothing said twice
    assert len(headings) == len(set(headings)), headings
    metrics_table = page.split("<h3>Metrics</h3>")[1].split("</table>")[0]
    cells = re.findall(r"<td>([^<]*)</td>", metrics_table)
    floats = [c for c in cells if "." in c]
    assert floats and all(re.fullmatch(r"-?\d+\.\d{3}", c) for c in floats), floats


def test_runs_on_a_comparison_chart_differ_without_colour(two_rounds, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)
    page = open(report.compare([str(two_rounds), str(other), str(two_rounds)], str(tmp_path / "c.html"))).read()
    for svg in svgs(page):  # each chart: a series per run, whose line and legend marker differ from the others'
        dashes = [p.get("stroke-dasharray") for p in svg.iter(SVG + "polyline")]
        if not dashes:
            continue  # no data (these runs have no oracle)
        markers = [c.get("fill") == "white" for c in svg.iter(SVG + "circle") if c.find(SVG + "title") is None]
        assert len(dashes) == len(markers) == 3 and len(set(zip(dashes, markers))) == 3, (dashes, markers)
