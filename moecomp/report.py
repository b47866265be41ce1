"""The report of a run: one Markdown file and one self-contained HTML file (figures embedded as
base64) that say what was compressed, how the search went, what the front offers, what was
picked, refined and exported, and how the front compares with the DE baseline.

Everything is read from the run folder (``moecomp.runs``); parts whose files are absent
(picks, refined solutions, exports, the DE comparison) say so or are left out. Metric columns
are shown under the run's metric name and unit (target.json, :func:`moecomp.runs.metric_info`);
a run without a task metric is reported on its divergence alone, and says so. The HTML is the
same Markdown rendered by markdown-it (a dependency of rich), so the two never disagree.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moecomp.divergence import divergence_label
from moecomp.runs import METRICS, MetricInfo, RunFolder, atomic_write_text, metric_info, read_table

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FRONT_ROWS = 20
# Number formats of the metric columns wherever they appear in a table.
FORMATS = {
    "density": ".3f",
    "bits": ".2f",
    "divergence": ".4g",
    "size_bytes": ",.0f",
    "ratio": ".1f",
    "val_divergence": ".4g",
    "test_divergence": ".4g",
    "hv": ".4f",
    "elapsed_s": ".1f",
    "fidelity_before": ".4g",
    "fidelity_after": ".4g",
    "file_bytes": ",.0f",
    "fp32_bytes": ",.0f",
    "teacher_file_bytes": ",.0f",
    "tolerance": ".3g",
    "seconds": ".1f",
}
# Drop tolerances (points) of a percentage metric in the front's "what each tolerance buys"
# table. Other metrics and divergences have no natural steps: their levels are QUANTILES of
# the front's own values.
DROP_LEVELS = (0.5, 1.0, 2.0, 5.0, 10.0)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# The figures moecomp.plots draws, in the order they are shown (captions: _captions).
FIGURES = ("front_pairs.png", "ratio_metric.png", "pick_layers.png", "hv_history.png")
# What run folders drawn by an earlier moecomp hold instead (shown with --no-plots).
LEGACY_FIGURES = {"ratio_metric.png": "ratio_accuracy.png"}
COMPARE_MD = "compare_summary.md"
COMPARE_PNG = "compare_de.png"


# --- Markdown pieces ----------------------------------------------------------------------
def markdown_table(df: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (index dropped); numbers formatted by
    column name (``formats``, default :data:`FORMATS`), ``|`` in text escaped."""
    formats = FORMATS if formats is None else formats
    cols = [str(c) for c in df.columns]
    lines = [
        "| " + " | ".join(_escape(c) for c in cols) + " |",
        "|" + "|".join("---:" if _numeric(df[c]) else "---" for c in df.columns) + "|",
    ]
    for row in df.itertuples(index=False):
        cells = [_cell(v, formats.get(c, "")) for c, v in zip(cols, row, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _cell(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float) and fmt:
        return format(v, fmt)
    if isinstance(v, float):
        return f"{v:.6g}"
    return _escape(str(v))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _key_values(items: Sequence[tuple[str, Any]]) -> str:
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| {_escape(k)} | {_cell(v, '')} |" for k, v in items]
    return "\n".join(lines)


# --- metric columns -------------------------------------------------------------------------
SPLITS = ("calib", "val", "test")


def metric_headers(metric: MetricInfo) -> dict[str, str]:
    """Run-table column -> the header a reader sees: ``metric`` -> ``accuracy (%)``,
    ``metric_drop`` -> ``accuracy drop (points)``, ``val_metric`` -> ``val accuracy (%)``,
    ``val_drop`` -> ``val drop (points)``, ``teacher_test_metric`` -> ``teacher test
    accuracy (%)``."""
    drop = f"drop ({metric.drop_unit})" if metric.drop_unit else "drop"
    out = {"metric": metric.label, "metric_drop": metric.drop_label}
    for split in SPLITS:
        out[f"{split}_metric"] = f"{split} {metric.label}"
        out[f"{split}_drop"] = f"{split} {drop}"
        out[f"teacher_{split}_metric"] = f"teacher {split} {metric.label}"
    return out


def shown(df: pd.DataFrame, metric: MetricInfo | None) -> tuple[pd.DataFrame, dict[str, str]]:
    """``df`` as a report shows it, and the formats of its columns: metric columns renamed
    (:func:`metric_headers`), or dropped when the run has no metric (they hold only NaN)."""
    names = metric_headers(MetricInfo("metric", "", "maximize"))
    if metric is None:
        return df.drop(columns=[c for c in df.columns if c in names]), dict(FORMATS)
    headers = metric_headers(metric)
    # A percentage to two decimals (points); a user's metric has no known scale.
    fmt = ".2f" if metric.percent else ".4g"
    formats = FORMATS | {headers[c]: fmt for c in df.columns if c in headers}
    return df.rename(columns=headers), formats


def _capital(text: str) -> str:
    """The first letter upper case (``str.capitalize`` would lower the rest: ``KL``)."""
    return text[:1].upper() + text[1:]


def _value(v: float, metric: MetricInfo) -> str:
    """A metric value with its unit: ``96.50 %``, ``0.9731``."""
    if metric.percent:
        return f"{v:.2f} %"
    return f"{v:.4g} {metric.unit}".rstrip()


# --- sections -------------------------------------------------------------------------------
def _problem_section(run: RunFolder, metric: MetricInfo | None) -> list[str]:
    p = run.problem()
    layers = run.layer_names() if run.file("evaluated.csv").is_file() else []
    o, g, r, s = p.objectives, p.genes, p.relevance, p.search
    model: str
    if p.model.zoo:
        model = p.model.zoo
    elif p.model.factory:
        model = f"{p.model.factory} (weights {p.model.weights or 'from the factory'})"
    else:
        model = "a Python object (not rebuilt from the problem)"
    source = {"factory": f"factory {p.data.factory}", "file": f"file {p.data.path}"}.get(
        p.data.source, p.data.source
    )
    constraints = [
        f"divergence <= {o.max_divergence:g}" if o.max_divergence else "",
    ]
    if o.max_metric_drop and metric is not None:
        constraints.insert(
            0, f"{metric.name} drop <= {o.max_metric_drop:g} {metric.drop_unit}".rstrip()
        )
    task = (
        f"{metric.label}, {'higher' if metric.direction == 'maximize' else 'lower'} is better"
        if metric is not None
        else "none: solutions are measured by their divergence alone"
    )
    items = [
        ("name", p.name),
        ("model", model),
        ("data", f"{source}, {p.data.calibration} calibration samples (seed {p.data.seed})"),
        ("compressed tensors", ", ".join(layers) or "-"),
        ("objectives", f"{o.mode}, divergence {o.divergence}"),
        ("task metric", task),
        ("constraints", "; ".join(c for c in constraints if c) or "none"),
        ("HV reference point", ", ".join(f"{v:g}" for v in o.ref_point)),
        (
            "genes",
            f"sparsity step {g.sparsity_step:g} up to {g.sparsity_max:g}; bits "
            f"{g.bits_min}..{g.bits_max}; quantizer {g.quantizer}",
        ),
        ("relevance", r.scorer),
        (
            "search",
            f"{s.algorithm}, operators {s.operators}, population {s.pop_size}, "
            f"budget {s.budget}, seed {s.seed}",
        ),
    ]
    return ["## Problem", "", _key_values(items), ""]


def _search_section(run: RunFolder) -> list[str]:
    out = ["## Search", ""]
    status = run.status()
    if status:
        items = [(k, v) for k, v in status.items() if not isinstance(v, dict | list)]
        out += [_key_values(items), ""]
    else:
        out += ["No search.json in the run folder.", ""]
    hv_file = run.file("hv.csv")
    hv = run.hv_history() if hv_file.is_file() else pd.DataFrame()
    if hv.empty:
        out += ["No hypervolume history (hv.csv) yet.", ""]
    else:
        last = hv.iloc[-1]
        ref = ", ".join(f"{v:g}" for v in run.problem().objectives.ref_point)
        out += [
            f"**Final hypervolume: {last['hv']:.4f}** after {int(last['n_evals'])} "
            f"evaluations ({len(hv)} generations; objectives divided by the reference point "
            f"({ref}), so 1 would be the whole box).",
            "",
        ]
    return out


def _front_section(run: RunFolder, metric: MetricInfo | None) -> list[str]:
    front = run.front()
    n_eval = len(run.evaluated())
    cols = ["id", "gen", *METRICS]
    cols += [c for c in ("shared_k",) if c in front.columns]
    top, formats = shown(front.sort_values("ratio", ascending=False).head(FRONT_ROWS)[cols], metric)
    column, levels, how = tolerance_levels(front, metric)
    table, table_formats = shown(tolerance_table(front, levels, column=column), metric)
    if metric is None:
        div = divergence_label(run.problem().objectives.divergence)
        measured = (
            f"This target has no task metric: solutions are measured by their {div} alone, "
            "on the calibration set."
        )
        within = f"Best compression ratio per tolerance on the divergence ({how}):"
        level = f"max {div}"
    else:
        unit = f" ({metric.drop_unit})" if metric.drop_unit else ""
        measured = (
            f"{_capital(metric.name)} and its drop from the teacher{unit} are on the "
            "calibration set."
        )
        within = f"Best compression ratio per tolerance on the {metric.name} drop ({how}):"
        level = f"max {metric.drop_label}"
    table = table.rename(columns={f"max_{column}": level})
    table_formats[level] = "g"
    return [
        "## Front",
        "",
        f"{len(front)} non-dominated solutions of {n_eval} evaluated. {measured}",
        "",
        within,
        "",
        markdown_table(table, table_formats),
        "",
        f"The {len(top)} solutions of best compression ratio:",
        "",
        markdown_table(top, formats),
        "",
    ]


def tolerance_levels(
    front: pd.DataFrame, metric: MetricInfo | None
) -> tuple[str, tuple[float, ...], str]:
    """The column, levels and a description of the levels of the front's tolerance table:
    for a percentage metric its drop at :data:`DROP_LEVELS` points; for another metric its
    drop, and without a metric the divergence, at the :data:`QUANTILES` of the front's
    values (rounded to two significant digits; such metrics have no natural steps)."""
    if metric is not None and metric.percent:
        return "metric_drop", DROP_LEVELS, "points"
    column = "divergence" if metric is None else "metric_drop"
    values = front[column].to_numpy(float)
    values = values[np.isfinite(values)]
    if not len(values):
        return column, (), "no finite values on the front"
    levels = sorted({float(f"{q:.2g}") for q in np.quantile(values, QUANTILES)})
    pct = ", ".join(f"{q:.0%}" for q in QUANTILES)
    unit = f"{metric.drop_unit}; " if metric is not None and metric.drop_unit else ""
    return column, tuple(levels), f"{unit}levels: the {pct} quantiles of the front's values"


def tolerance_table(
    front: pd.DataFrame, levels: Sequence[float] = DROP_LEVELS, *, column: str = "metric_drop"
) -> pd.DataFrame:
    """Per tolerance on ``column`` (``metric_drop``, in the metric's drop units, or
    ``divergence``), the front's solution of best ratio within it: columns ``max_<column>``,
    ``id``, ``ratio``, ``density``, ``bits``, then ``metric`` and ``metric_drop``, or
    ``divergence`` (a tolerance nothing meets gives a row of ``-``)."""
    if column not in ("metric_drop", "divergence"):
        raise ValueError(f"column: must be 'metric_drop' or 'divergence', got {column!r}")
    cols = ["id", "ratio", "density", "bits"]
    cols += ["metric", "metric_drop"] if column == "metric_drop" else ["divergence"]
    rows: list[dict[str, Any]] = []
    for level in levels:
        ok = front[front[column] <= level]
        row: dict[str, Any] = {f"max_{column}": level}
        if ok.empty:
            row |= dict.fromkeys(cols, None)
        else:
            best = ok.sort_values(["ratio", "divergence"], ascending=[False, True]).iloc[0]
            row |= {c: best[c] for c in cols}
            row["id"] = int(best["id"])
        rows.append(row)
    return pd.DataFrame(rows, columns=[f"max_{column}", *cols])


def _picks_section(run: RunFolder, metric: MetricInfo | None) -> list[str]:
    out = ["## Picks", ""]
    path = run.file("picks.csv")
    if not path.is_file():
        return out + ["No picks yet: run `moecomp pick RUN` (e.g. `--knee` or `--max-drop 1`).", ""]
    picks = read_table(path)
    cols = ["pick", "id", "rule", "ratio", "density", "bits", "divergence"]
    if metric is None:
        cols += ["val_divergence", "test_divergence"]
    else:
        cols += ["metric", "metric_drop", "val_metric", "val_drop", "test_metric", "test_drop"]
    table = picks[[c for c in cols if c in picks.columns]].rename(
        columns={"metric": "calib_metric", "metric_drop": "calib_drop"}
    )
    table, fmt = shown(table, metric)
    on = picks["bounds_on"].dropna().astype(str) if "bounds_on" in picks.columns else None
    if on is not None and (on != "").any():
        splits = ", ".join(sorted(set(on[on != ""])))
        out += [
            f"Bounds on the drop and the divergence (a rule's \"within\") were checked on the "
            f"{splits} split: the front's solutions measured there once (`validation.csv`); "
            "test is reported, never chosen on. Every pick is kept, numbered in `pick`.",
            "",
        ]
    if metric is None:
        split = {f"{s}_divergence": f"{s} divergence" for s in ("val", "test")}
        table = table.rename(columns={"divergence": "calib divergence"} | split)
        fmt |= dict.fromkeys(["calib divergence", *split.values()], ".4g")
        div = divergence_label(run.problem().objectives.divergence)
        out += [
            f"No task metric: {div} on the calibration set the search used (calib) and, "
            "re-evaluated, on the full validation and test splits.",
            "",
        ]
        return out + [markdown_table(table, fmt), ""]
    unit = f" ({metric.drop_unit})" if metric.drop_unit else ""
    out += [
        f"{_capital(metric.label)} and its drop from the teacher{unit} "
        "on the calibration set the search used (calib) and, re-evaluated, on the full "
        "validation and test splits.",
        "",
    ]
    if {"teacher_val_metric", "teacher_test_metric"} <= set(picks.columns):
        t = picks.iloc[0]
        out += [
            f"Teacher: validation {_value(t['teacher_val_metric'], metric)}, test "
            f"{_value(t['teacher_test_metric'], metric)}.",
            "",
        ]
    return out + [markdown_table(table, fmt), ""]


def _refined_section(run: RunFolder, metric: MetricInfo | None) -> list[str]:
    path = run.file("refined.csv")
    if not path.is_file():
        return []
    df = read_table(path)
    # Per-layer level counts are JSON blobs; too wide for a table.
    df = df.drop(columns=[c for c in ("levels_before", "levels_after") if c in df.columns])
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(lambda v: _relative(v, run.path))
    df, fmt = shown(df, metric)
    return ["## Refined solutions", "", f"From `{path.name}`:", "", markdown_table(df, fmt), ""]


def _exports_section(run: RunFolder, metric: MetricInfo | None) -> list[str]:
    folder = run.path / "exports"
    if not folder.is_dir():
        return []
    records = []
    for f in sorted(folder.rglob("*.export.json")):
        rec = json.loads(f.read_text())
        records.append({k: v for k, v in rec.items() if not isinstance(v, dict | list)})
    out = ["## Exports", ""]
    if records:
        # The metric's name and unit are in the headers.
        df = pd.DataFrame(records).drop(columns=["metric_name", "metric_unit"], errors="ignore")
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].map(lambda v: _relative(v, run.path))
        df, fmt = shown(df, metric)
        out += [markdown_table(df, fmt), ""]
    files = [f for f in sorted(folder.rglob("*")) if f.is_file()]
    out += ["Files:", ""]
    out += [f"- `{f.relative_to(run.path)}` ({f.stat().st_size:,} bytes)" for f in files]
    return out + [""]


def _relative(v: Any, base: Path) -> Any:
    if isinstance(v, str) and v.startswith(str(base)):
        return os.path.relpath(v, base)
    return v


def figure_captions(metric: MetricInfo | None) -> dict[str, str]:
    """PNG name -> its caption in the report."""
    if metric is None:
        ratio = (
            "Compression ratio vs divergence on the calibration set (this target has no task "
            "metric; the teacher's divergence is 0); diamonds are the picks re-evaluated on "
            "the test set."
        )
    else:
        ratio = (
            f"Compression ratio vs {metric.name} on the calibration set; diamonds are the "
            "picks re-evaluated on the test set; the right panel (if any) zooms on the picks."
        )
    return {
        "front_pairs.png": "Pairwise projections of the front (all objectives minimised); "
        "grey points are dominated, stars are the picks.",
        "ratio_metric.png": ratio,
        "ratio_accuracy.png": "Compression ratio vs accuracy (drawn by an earlier moecomp).",
        "pick_layers.png": "Per-layer sparsity and bits of the picks.",
        "hv_history.png": "Hypervolume after each generation (objectives divided by the fixed "
        "reference point, so runs of one problem compare).",
    }


def _figures_section(
    paths: Sequence[Path], image: Callable[[Path], str], metric: MetricInfo | None
) -> list[str]:
    out = ["## Figures", ""]
    present = [p for p in paths if p.is_file()]
    if not present:
        return out + ["No figures.", ""]
    captions = figure_captions(metric)
    for p in present:
        caption = captions.get(p.name, p.stem.replace("_", " "))
        out += [f"![{p.stem}]({image(p)})", "", f"*{caption}*", ""]
    return out


def _compare_section(run: RunFolder, image: Callable[[Path], str]) -> list[str]:
    md = run.file(COMPARE_MD)
    if not md.is_file():
        return []
    out = ["## Comparison with the Directed Evolution baseline", ""]
    for line in md.read_text(encoding="utf-8").splitlines():
        # Nest the file's headings under this section's.
        out.append("##" + line if line.startswith("#") else line)
    out.append("")
    png = run.path / "plots" / COMPARE_PNG
    if png.is_file():
        out += [f"![DE comparison]({image(png)})", ""]
    return out


# --- the report -----------------------------------------------------------------------------
def report_markdown(
    run_dir: str | os.PathLike[str],
    figures: Sequence[Path],
    image: Callable[[Path], str] | None = None,
) -> str:
    """The report's Markdown. figures: PNGs to show; image: PNG path -> the link written
    (default: relative to the run folder, for report.md beside it)."""
    run = RunFolder(run_dir)
    link = image or (lambda p: os.path.relpath(p, run.path))
    name = run.problem().name
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"# moecomp report: {name}",
        "",
        f"Run folder `{run.path}`, report written {when}.",
        "",
    ]
    metric = metric_info(run, run.front())
    parts += _problem_section(run, metric)
    parts += _search_section(run)
    parts += _front_section(run, metric)
    parts += _picks_section(run, metric)
    parts += _refined_section(run, metric)
    parts += _exports_section(run, metric)
    parts += _figures_section(figures, link, metric)
    parts += _compare_section(run, link)
    return "\n".join(parts).rstrip() + "\n"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def markdown_to_html(markdown: str, *, title: str) -> str:
    """A standalone HTML page of ``markdown`` (tables on; raw HTML in the text escaped)."""
    from html import escape

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>\n{_CSS}</style>\n</head>\n<body>\n"
        f"{body}</body>\n</html>\n"
    )


_CSS = """body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto;
  padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def write_report(run_dir: str | os.PathLike[str], *, plots: bool = True) -> Path:
    """Write ``RUN/report.md`` and ``RUN/report.html`` (self-contained: figures embedded as
    base64) and return the Markdown's path. plots: draw the figures again first
    (``moecomp.plots.plot_run``, with the picks of picks.csv); otherwise show those in
    ``RUN/plots/`` already."""
    run = RunFolder(run_dir)
    run.require("problem.json")
    run.require("front.csv")
    if plots:
        from moecomp.plots import plot_run

        figures = plot_run(run.path)
    else:
        folder = run.path / "plots"
        names = [n if (folder / n).is_file() else LEGACY_FIGURES.get(n, n) for n in FIGURES]
        figures = [folder / n for n in names if (folder / n).is_file()]
    md = report_markdown(run.path, figures)
    html_md = report_markdown(run.path, figures, image=_data_uri)
    md_path = run.file(REPORT_MD)
    atomic_write_text(md_path, md)
    title = f"moecomp report: {run.problem().name}"
    atomic_write_text(run.file(REPORT_HTML), markdown_to_html(html_md, title=title))
    return md_path
