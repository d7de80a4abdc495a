"""Turn a run's history into the report's pictures and page: SVG and PNG from matplotlib, HTML from jinja2.

Pure functions of plain data (see `report.ReportWriter` for where the data comes from), so the
report looks the same wherever it is rendered and tests need no training run. Output is
deterministic: matplotlib's SVG ids use a fixed salt and no file carries a date.

Every logged point is one marker in its series' group (`<g id="series-step-loss">` holds one
`<use>` per step), so a browser test can count them.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SERIES = {
    # gid: (label, colour)
    "series-step-loss": ("step loss", "#9ab8d8"),
    "series-smoothed-loss": ("smoothed loss", "#1f5fa8"),
    "series-validation-loss": ("validation loss", "#d2691e"),
    "series-loss-instance": ("instance term", "#2e8b57"),
    "series-loss-prior": ("prior term", "#8b3a8b"),
    "series-lr": ("learning rate", "#444444"),
    "series-images-per-second": ("images/s", "#2e8b57"),
}
RC = {"svg.hashsalt": "kubetune-report", "svg.fonttype": "path", "font.size": 9, "axes.grid": True,
      "grid.alpha": 0.3}
"""Fixed ids (no random salt) and text as paths (no font files, nothing to fetch)."""
SVG_METADATA = {"Date": None, "Creator": None}
PNG_METADATA = {"Software": None}
DENSE_POINTS = 200
MAX_GRID_STEPS = 12
"""Sampled steps shown in the grid: the first, the last and evenly spaced ones between."""
THUMBNAIL = 192
"""Longest side of an embedded sample image, in pixels: 64 samples stay about 2 MB of page."""


@dataclass(frozen=True)
class Series:
    """One line of a figure: (x, y) points, each drawn as one marker."""

    gid: str
    x: Sequence[float]
    y: Sequence[float]

    @property
    def label(self) -> str:
        return SERIES[self.gid][0]


@dataclass(frozen=True)
class SampleCell:
    """One sample image as it appears in the grid."""

    step: int
    prompt: str
    uri: str
    thumbnail: Any
    """A PIL image, at most `THUMBNAIL` pixels on its longest side."""


def loss_series(steps: list[dict[str, Any]], validations: list[dict[str, Any]]) -> list[Series]:
    """Step loss, smoothed loss, validation loss and each loss term that was logged."""
    series = [Series("series-step-loss", [s["step"] for s in steps], [s["stepLoss"] for s in steps]),
              Series("series-smoothed-loss", [s["step"] for s in steps], [s["smoothedLoss"] for s in steps])]
    if validations:
        series.append(Series("series-validation-loss", [v["step"] for v in validations],
                             [v["validationLoss"] for v in validations]))
    for term in ("instance", "prior"):
        points = [(s["step"], s["lossTerms"][term]) for s in steps if term in (s.get("lossTerms") or {})]
        if points:
            series.append(Series(f"series-loss-{term}", [p[0] for p in points], [p[1] for p in points]))
    return series


def lr_series(steps: list[dict[str, Any]]) -> list[Series]:
    points = [(s["step"], s["lr"]) for s in steps if s.get("lr") is not None]
    return [Series("series-lr", [p[0] for p in points], [p[1] for p in points])] if points else []


def throughput_series(steps: list[dict[str, Any]]) -> list[Series]:
    """Images per second against minutes since the run started."""
    return [Series("series-images-per-second", [s["time"] / 60 for s in steps],
                   [s["imagesPerSecond"] for s in steps])] if steps else []


def _figure(series: list[Series], xlabel: str, ylabel: str, marked: tuple[int, str] | None = None,
            log_y: bool = False) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.add_subplot()
    for line in series:
        colour = SERIES[line.gid][1]
        raw = line.gid == "series-step-loss"
        dense = len(line.x) > DENSE_POINTS  # markers shrink rather than merge into a band
        ax.plot(line.x, line.y, marker="o", markersize=(1.2 if dense else 3) * (0.8 if raw else 1),
                linewidth=0.6 if raw else 1.2, color=colour, label=line.label, gid=line.gid,
                zorder=3 if line.gid == "series-validation-loss" else 2)
    if marked is not None:
        ax.axvline(marked[0], color="#c00000", linestyle="--", linewidth=1, label=marked[1], gid="exported-step")
    if log_y and all(v > 0 for line in series for v in line.y):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1 or marked is not None:
        ax.legend(loc="upper right", fontsize=8)
    return fig


def svg_of(fig: Any) -> str:
    """The figure as an `<svg>` element to place inline (the XML prolog and doctype dropped)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buffer, format="svg", metadata=SVG_METADATA)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def png_of(fig: Any, dpi: int = 100) -> bytes:
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buffer, format="png", dpi=dpi, metadata=PNG_METADATA)
    return buffer.getvalue()


def figures(steps: list[dict[str, Any]], validations: list[dict[str, Any]],
            marked: tuple[int, str] | None) -> dict[str, Any]:
    """The report's matplotlib figures by name; a figure without points is left out."""
    import matplotlib

    with matplotlib.rc_context(RC):
        out = {"loss": _figure(loss_series(steps, validations), "step", "loss", marked)} if steps else {}
        if lr := lr_series(steps):
            out["lr"] = _figure(lr, "step", "learning rate")
        if rate := throughput_series(steps):
            out["throughput"] = _figure(rate, "minutes since start", "images per second")
    return out


def grid_steps(steps: Iterable[int], limit: int = MAX_GRID_STEPS) -> list[int]:
    """At most `limit` of the sampled steps: the first, the last and evenly spaced ones between."""
    ordered = sorted(set(steps))
    if len(ordered) <= limit:
        return ordered
    picks = {ordered[round(i * (len(ordered) - 1) / (limit - 1))] for i in range(limit)}
    return sorted(picks)


def sample_grid(cells: list[SampleCell]) -> tuple[list[str], list[int], dict[tuple[str, int], list[SampleCell]]]:
    """Prompts (rows, in first-seen order), steps (columns) and the images of each (prompt, step)."""
    columns = grid_steps(c.step for c in cells)
    prompts = list(dict.fromkeys(c.prompt for c in cells))
    grid: dict[tuple[str, int], list[SampleCell]] = {}
    for cell in cells:
        if cell.step in columns:
            grid.setdefault((cell.prompt, cell.step), []).append(cell)
    return prompts, columns, grid


def samples_figure(cells: list[SampleCell]) -> Any:
    """The grid as one picture (`samples.png`): prompts down, steps across, the first image of each.

    The thumbnails are pasted into one mosaic shown on one axes: a subplot per image would cost
    seconds per render at 64 samples.
    """
    import matplotlib
    from matplotlib.figure import Figure
    from PIL import Image

    prompts, columns, grid = sample_grid(cells)
    size = THUMBNAIL + 8  # a white margin between pictures
    mosaic = Image.new("RGB", (size * len(columns), size * len(prompts)), "white")
    for row, prompt in enumerate(prompts):
        for col, step in enumerate(columns):
            if (prompt, step) in grid:
                thumb = grid[(prompt, step)][0].thumbnail
                mosaic.paste(thumb, (col * size + (size - thumb.width) // 2, row * size + (size - thumb.height) // 2))
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(1.5 * len(columns) + 2.2, 1.5 * len(prompts) + 0.6), layout="constrained")
        ax = fig.add_subplot()
        ax.imshow(mosaic)
        ax.grid(False)
        ax.set_xticks([size * (i + 0.5) for i in range(len(columns))], [f"step {s}" for s in columns], fontsize=7)
        ax.set_yticks([size * (i + 0.5) for i in range(len(prompts))],
                      [p if len(p) <= 28 else p[:27] + "…" for p in prompts], fontsize=7)
        ax.tick_params(length=0)
    return fig


def empty_figure(text: str) -> Any:
    """A small picture that says what is missing (samples.png before the first sample)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def data_uri(image: Any) -> str:
    """A PIL image as an embedded PNG, so the page needs no other file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_page(context: dict[str, Any]) -> str:
    """index.html from the package's template; every value is escaped except the SVGs matplotlib wrote."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("kubetune_trainer", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default=True), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)
