"""The Grafana dashboard drawn without Grafana: every panel's PromQL targets evaluated over
[start, end] by a real Prometheus (its HTTP API), drawn with matplotlib in the dashboard's
24-column ``gridPos`` layout into one PNG.

Grafana's variables are substituted first: ``$model`` (one model's name, or the dashboard's
all-value regex), ``$__rate_interval`` (a parameter: rate() needs two samples in its window, so
at least two scrape intervals; 15 s suits a 1 s scrape), ``$__interval`` (the step) and
``$__range``. Time series panels draw a line per series (stacked where the panel stacks) in the
panel's unit, with Grafana's table legend (last, max); stat and gauge panels show the last value.

    python -m loadtest.render_dashboard --prometheus URL --start T0 --end T1 \\
        --out docs/load/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from loadtest.prometheus import query_range, version

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/skipdit.json"
COLUMNS = 24  # Grafana's grid
WIDTH_IN = 20.0  # figure width; a grid row (gridPos h = 1) is ROW_IN high
ROW_IN = 0.42
HEADER_IN = 0.55
GAP_IN = 0.08
LEGEND_ROW_IN = 0.14  # one 7 pt monospace line
MAX_POINTS = 600  # per series, when no step is given
SPARSE = 60  # a series with at most this many points shows them as markers
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
REGEX_META = set(".^$*+?()[]{}|\\")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
UNITS = {
    "s": " s",
    "ms": " ms",
    "short": "",
    "none": "",
    "cps": "/s",
    "reqps": " req/s",
    "ops": " ops/s",
    "percent": "%",
    "bytes": " B",
}
CALCS = {"lastNotNull": "Last *", "last": "Last", "max": "Max", "min": "Min", "mean": "Mean"}
# Grafana's dark theme and its classic palette.
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17"]  # fmt: skip


@dataclass
class Series:
    name: str
    values: np.ndarray  # (T,) at the evaluation times; NaN where Prometheus returned none


def regex_literal(name: str) -> str:
    """``name`` as a regex matching only itself, inside a PromQL double-quoted string (whose
    escapes are Go's: a regex backslash is written twice)."""
    return "".join("\\\\" + c if c in REGEX_META else c for c in name)


def grafana_variables(
    dashboard: dict, model: str | None, rate_interval: str, step: float, start: float, end: float
) -> dict[str, str]:
    """Every variable the dashboard may use: its templating list (``model`` set to one name when
    given, else each variable's all-value) and Grafana's built-in interval and range ones."""
    variables = {
        "__rate_interval": rate_interval,
        "__interval": f"{round(step * 1000)}ms",
        "__interval_ms": str(round(step * 1000)),
        "__range": f"{round(end - start)}s",
        "__range_s": str(round(end - start)),
        "__range_ms": str(round((end - start) * 1000)),
    }
    for var in dashboard.get("templating", {}).get("list", []):
        variables[var["name"]] = var.get("allValue") or ".*"
    if model is not None:
        variables["model"] = regex_literal(model)
    return variables


def substitute(expr: str, variables: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name not in variables:
            raise KeyError(
                f"Grafana variable ${name} in {expr!r} has no value; known: {sorted(variables)}"
            )
        return variables[name]

    return VARIABLE.sub(value, expr)


def legend_name(legend_format: str | None, labels: dict[str, str], expr: str) -> str:
    """Grafana's series name: ``{{label}}`` replaced by the series' values; without a format,
    its labels (or the query, when it has none)."""
    if legend_format and legend_format != "__auto":
        return LEGEND.sub(lambda m: labels.get(m.group(1), ""), legend_format).strip()
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    if not shown:
        return labels.get("__name__", expr)
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(shown.items())) + "}"


def panels_of(dashboard: dict) -> Iterator[dict]:
    """Every panel with a place on the grid, collapsed rows' panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def evaluate(url: str, panel: dict, variables: dict[str, str], times: np.ndarray) -> list[Series]:
    """Each visible target of the panel, as series over ``times`` (evenly spaced)."""
    step = float(times[1] - times[0]) if len(times) > 1 else 1.0
    series = []
    for target in panel.get("targets", []):
        if target.get("hide") or not target.get("expr"):
            continue
        expr = substitute(target["expr"], variables)
        for result in query_range(url, expr, float(times[0]), float(times[-1]), step):
            values = np.full(len(times), np.nan)
            for t, v in result["values"]:
                i = round((float(t) - times[0]) / step)
                if 0 <= i < len(values):
                    values[i] = float(v)
            name = legend_name(target.get("legendFormat"), result["metric"], expr)
            series.append(Series(name, values))
    return series


def unit_of(panel: dict) -> str:
    return panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")


def fmt(value: float, unit: str) -> str:
    """A value as Grafana shows it in ``unit`` (seconds below one as milliseconds)."""
    if not np.isfinite(value):
        return "-"
    if unit == "s" and 0 < abs(value) < 1:
        return f"{value * 1000:.3g} ms"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    suffix = unit[len("suffix:") :] if unit.startswith("suffix:") else UNITS.get(unit, f" {unit}")
    return f"{value:.3g}{suffix}"


def calc(name: str, values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan")
    if name in ("lastNotNull", "last"):
        return float(finite[-1])
    return float({"max": np.max, "min": np.min, "mean": np.mean}[name](finite))


def legend_rows(panel: dict, series: list[Series]) -> tuple[str, list[str]]:
    """Grafana's table legend as monospace text: a header and one row per series."""
    calcs = [c for c in panel.get("options", {}).get("legend", {}).get("calcs", []) if c in CALCS]
    unit = unit_of(panel)
    width = max([len("Name"), *(len(s.name) for s in series)])
    header = "Name".ljust(width) + "".join(f"{CALCS[c]:>12}" for c in calcs)
    rows = [
        s.name.ljust(width) + "".join(f"{fmt(calc(c, s.values), unit):>12}" for c in calcs)
        for s in series
    ]
    return header, rows


def cell(grid: dict) -> tuple[float, float, float, float]:
    """The panel's box in inches from the figure's top left: (left, top, width, height)."""
    column_in = WIDTH_IN / COLUMNS
    left = grid["x"] * column_in + GAP_IN / 2
    top = HEADER_IN + grid["y"] * ROW_IN + GAP_IN / 2
    return left, top, grid["w"] * column_in - GAP_IN, grid["h"] * ROW_IN - GAP_IN


def axes_at(fig, left: float, top: float, width: float, height: float, height_in: float):
    """An axes at a box given in inches from the top left."""
    return fig.add_axes(
        (left / WIDTH_IN, 1 - (top + height) / height_in, width / WIDTH_IN, height / height_in)
    )


def draw_timeseries(
    ax, panel: dict, series: list[Series], x: np.ndarray, legend_at: tuple[float, float]
) -> None:
    """Lines (or stacked areas) over ``x``, and the table legend with its top left corner at
    ``legend_at`` (figure fractions)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    unit = unit_of(panel)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    stacking = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
    if series and stacking.get("stacking", {}).get("mode") == "normal":
        handles = ax.stackplot(
            x, *[np.nan_to_num(s.values) for s in series], colors=colors, alpha=0.6
        )
    else:
        # Points too, where they are sparse (Grafana's showPoints: auto): a lone sample shows.
        handles = [
            ax.plot(x, s.values, color=c, linewidth=1.2, marker="o",
                    markersize=3 if np.isfinite(s.values).sum() <= SPARSE else 0)[0]
            for s, c in zip(series, colors, strict=True)
        ]  # fmt: skip
    finite = np.concatenate([s.values[np.isfinite(s.values)] for s in series] or [[]])
    if finite.size == 0:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center")
    minimum = panel.get("fieldConfig", {}).get("defaults", {}).get("min")
    if finite.size == 0 or finite.max() <= 0:
        ax.set_ylim(0, 1)
    elif minimum is not None:
        ax.set_ylim(bottom=minimum)
    ax.set_xlim(0, x[-1])  # x: seconds since the range began
    ax.xaxis.set_major_locator(
        MaxNLocator(nbins=10, steps=[1, 2, 3, 6, 10], integer=True, min_n_ticks=1)
    )
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v, unit)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v // 60)}:{int(v % 60):02d}"))
    ax.grid(color=GRID, linewidth=0.6)
    if series:
        header, rows = legend_rows(panel, series)
        ax.legend(
            handles,
            rows,
            title=header,
            loc="upper left",
            frameon=False,
            bbox_to_anchor=legend_at,
            bbox_transform=ax.figure.transFigure,
            alignment="left",
            borderaxespad=0,
            prop={"family": "monospace", "size": 7},
            title_fontproperties={"family": "monospace", "size": 7},
        )


def draw_stat(ax, panel: dict, series: list[Series]) -> None:
    """The last value of each series in big text."""
    ax.set_axis_off()
    if not series:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center")
    for i, s in enumerate(series):
        y = 1 - (i + 0.5) / len(series)
        text = fmt(calc("lastNotNull", s.values), unit_of(panel))
        label = f"{s.name}  " if len(series) > 1 else ""
        ax.text(
            0.5,
            y,
            label + text,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=28 if len(series) == 1 else 14,
            color=PALETTE[i % len(PALETTE)],
        )


def draw_panel(
    fig,
    panel: dict,
    series: list[Series],
    x: np.ndarray,
    height_in: float,
    marks: Sequence[tuple[float, str]],
) -> None:
    box = cell(panel["gridPos"])
    left, top, width, height = box
    if panel.get("type") == "row":
        fig.text(
            left / WIDTH_IN,
            1 - (top + height / 2) / height_in,
            panel.get("title", ""),
            va="center",
            fontsize=12,
            weight="bold",
        )
        return
    frame = axes_at(fig, *box, height_in)
    frame.set_facecolor(PANEL)
    frame.set_xticks([])
    frame.set_yticks([])
    fig.text(
        (left + 0.1) / WIDTH_IN,
        1 - (top + 0.08) / height_in,
        panel.get("title", ""),
        va="top",
        fontsize=10,
        weight="bold",
    )
    if panel.get("type") in ("stat", "gauge"):
        draw_stat(axes_at(fig, left, top + 0.3, width, height - 0.35, height_in), panel, series)
        return
    # Below the plot: its tick labels, then the table legend (a header and a row per series).
    legend_in = min(height * 0.45, (len(series) + 1) * LEGEND_ROW_IN) if series else 0.0
    plot_bottom = top + height - legend_in - 0.28
    ax = axes_at(fig, left + 0.75, top + 0.32, width - 0.9, plot_bottom - top - 0.32, height_in)
    ax.set_facecolor(PANEL)
    for t, label in marks:
        ax.axvline(t, color=TEXT, linestyle="--", linewidth=0.7, alpha=0.6)
        ax.annotate(label, (t, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(3, -3),
                    textcoords="offset points", fontsize=7, va="top")  # fmt: skip
    legend_at = ((left + 0.1) / WIDTH_IN, 1 - (plot_bottom + 0.2) / height_in)
    draw_timeseries(ax, panel, series, x, legend_at)


def _style() -> dict[str, object]:
    """matplotlib rc settings of the dark, Grafana-like theme."""
    return {
        "text.color": TEXT,
        "axes.labelcolor": TEXT,
        "xtick.color": TEXT,
        "ytick.color": TEXT,
        "axes.edgecolor": GRID,
        "font.size": 8,
    }


def render(
    prometheus_url: str,
    start: float,
    end: float,
    out: Path,
    *,
    dashboard_path: Path = DASHBOARD,
    model: str | None = None,
    rate_interval: str = "15s",
    step: float | None = None,
    marks: Sequence[tuple[float, str]] = (),
) -> dict[str, int]:
    """Draws the dashboard over [start, end] (Unix seconds) into ``out``; ``marks``: (Unix
    seconds, label) drawn as vertical lines. Returns each panel's number of series with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(dashboard_path.read_text())
    step = step or max(1.0, (end - start) / MAX_POINTS)
    times = end - step * np.arange(int((end - start) // step), -1, -1)  # end included
    variables = grafana_variables(dashboard, model, rate_interval, step, start, end)
    panels = list(panels_of(dashboard))
    evaluated = [evaluate(prometheus_url, p, variables, times) for p in panels]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height_in = HEADER_IN + rows * ROW_IN
    with plt.rc_context(_style()):
        fig = plt.figure(figsize=(WIDTH_IN, height_in), facecolor=BACKGROUND)
        fig.text(
            0.005,
            1 - 0.3 / height_in,
            header(dashboard, prometheus_url, start, end, variables, model, step),
            fontsize=11,
            va="center",
        )
        for panel, series in zip(panels, evaluated, strict=True):
            draw_panel(
                fig,
                panel,
                series,
                times - start,
                height_in,
                [(t - start, label) for t, label in marks],
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, facecolor=BACKGROUND)
        plt.close(fig)
    return {
        p.get("title", str(p.get("id"))): sum(bool(np.isfinite(s.values).any()) for s in series)
        for p, series in zip(panels, evaluated, strict=True)
        if p.get("type") != "row"
    }


def header(
    dashboard: dict,
    url: str,
    start: float,
    end: float,
    variables: dict[str, str],
    model: str | None,
    step: float,
) -> str:
    began = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"{dashboard.get('title', 'dashboard')}    {began} UTC + {end - start:.0f} s "
        f"(x axis: m:ss into the range)    model = {model or 'All'}    "
        f"$__rate_interval = {variables['__rate_interval']}, step {step:g} s    "
        f"evaluated by Prometheus {version(url)}, drawn by loadtest/render_dashboard.py"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", required=True, help="its base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--start", type=float, required=True, help="Unix seconds")
    p.add_argument("--end", type=float, default=None, help="Unix seconds (default: now)")
    p.add_argument("--out", type=Path, default=Path("docs/load/dashboard.png"))
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    p.add_argument("--model", default=None, help="one model (default: all, as $model's All)")
    p.add_argument("--rate-interval", default="15s", help="$__rate_interval (>= 2 scrapes)")
    p.add_argument("--step", type=float, default=None, help="seconds between points")
    args = p.parse_args(argv)
    counts = render(
        args.prometheus,
        args.start,
        args.end or time.time(),
        args.out,
        dashboard_path=args.dashboard,
        model=args.model,
        rate_interval=args.rate_interval,
        step=args.step,
    )
    for title, n in counts.items():
        print(f"{n:3d} series  {title}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
