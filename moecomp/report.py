"""The report of a run: one Markdown file and one self-contained HTML file (figures embedded as
base64) that say what was compressed, how the search went, what the front offers, what was
picked, refined and exported, and how the front compares with the DE baseline.

Everything is read from the run folder (``moecomp.runs``); parts whose files are absent
(picks, refined solutions, exports, the DE comparison) say so or are left out. The HTML is the
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

import pandas as pd

from moecomp.runs import METRICS, RunFolder, atomic_write_text

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
    "accuracy": ".2f",
    "acc_drop": ".2f",
    "val_acc": ".2f",
    "val_drop": ".2f",
    "test_acc": ".2f",
    "test_drop": ".2f",
    "teacher_val_acc": ".2f",
    "teacher_test_acc": ".2f",
    "hv": ".4f",
    "elapsed_s": ".1f",
    "fidelity_before": ".4g",
    "fidelity_after": ".4g",
    "file_bytes": ",.0f",
    "fp32_bytes": ",.0f",
    "teacher_file_bytes": ",.0f",
    "tolerance": ".3g",
    "seconds": ".1f",
    "max_drop": "g",
}
# Accuracy-drop tolerances (points) of the front's "what each tolerance buys" table.
DROP_LEVELS = (0.5, 1.0, 2.0, 5.0, 10.0)
# Captions of the figures moecomp.plots draws, in the order they are shown.
FIGURES = {
    "front_pairs.png": "Pairwise projections of the front (all objectives minimised); grey "
    "points are dominated, stars are the picks.",
    "ratio_accuracy.png": "Compression ratio vs accuracy on the calibration set; diamonds are "
    "the picks re-evaluated on the test set; the right panel (if any) zooms on the picks.",
    "pick_layers.png": "Per-layer sparsity and bits of the picks.",
    "hv_history.png": "Hypervolume after each generation (objectives divided by the fixed "
    "reference point, so runs of one problem compare).",
}
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


# --- sections -------------------------------------------------------------------------------
def _problem_section(run: RunFolder) -> list[str]:
    p = run.problem()
    layers = run.layer_names() if run.file("evaluated.csv").is_file() else []
    o, g, r, s = p.objectives, p.genes, p.relevance, p.search
    model = p.model.zoo or f"{p.model.factory} (weights {p.model.weights})"
    constraints = [
        f"accuracy drop <= {o.max_accuracy_drop:g} points" if o.max_accuracy_drop else "",
        f"divergence <= {o.max_divergence:g}" if o.max_divergence else "",
    ]
    items = [
        ("name", p.name),
        ("model", model),
        ("data", f"{p.data.dataset}, {p.data.calibration} calibration images (seed {p.data.seed})"),
        ("compressed tensors", ", ".join(layers) or "-"),
        ("objectives", f"{o.mode}, divergence {o.divergence}"),
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


def _front_section(run: RunFolder) -> list[str]:
    front = run.front()
    n_eval = len(run.evaluated())
    cols = ["id", "gen", *METRICS]
    cols += [c for c in ("shared_k",) if c in front.columns]
    top = front.sort_values("ratio", ascending=False).head(FRONT_ROWS)[cols]
    return [
        "## Front",
        "",
        f"{len(front)} non-dominated solutions of {n_eval} evaluated. Accuracy and its drop "
        "from the teacher (points) are on the calibration set.",
        "",
        "Best compression ratio within an accuracy drop of:",
        "",
        markdown_table(tolerance_table(front)),
        "",
        f"The {len(top)} solutions of best compression ratio:",
        "",
        markdown_table(top),
        "",
    ]


def tolerance_table(front: pd.DataFrame, levels: Sequence[float] = DROP_LEVELS) -> pd.DataFrame:
    """Per accuracy-drop tolerance (points), the front's solution of best ratio within it:
    columns ``max_drop``, ``id``, ``ratio``, ``density``, ``bits``, ``accuracy``,
    ``acc_drop`` (a tolerance nothing meets gives a row of ``-``)."""
    cols = ["id", "ratio", "density", "bits", "accuracy", "acc_drop"]
    rows: list[dict[str, Any]] = []
    for level in levels:
        ok = front[front["acc_drop"] <= level]
        row: dict[str, Any] = {"max_drop": level}
        if ok.empty:
            row |= dict.fromkeys(cols, None)
        else:
            best = ok.sort_values(["ratio", "divergence"], ascending=[False, True]).iloc[0]
            row |= {c: best[c] for c in cols}
            row["id"] = int(best["id"])
        rows.append(row)
    return pd.DataFrame(rows, columns=["max_drop", *cols])


def _picks_section(run: RunFolder) -> list[str]:
    out = ["## Picks", ""]
    path = run.file("picks.csv")
    if not path.is_file():
        return out + ["No picks yet: run `moecomp pick RUN` (e.g. `--knee` or `--max-drop 1`).", ""]
    picks = pd.read_csv(path)
    cols = [
        "id",
        "rule",
        "ratio",
        "density",
        "bits",
        "divergence",
        "accuracy",
        "acc_drop",
        "val_acc",
        "val_drop",
        "test_acc",
        "test_drop",
    ]
    table = picks[[c for c in cols if c in picks.columns]].rename(
        columns={"accuracy": "calib_acc", "acc_drop": "calib_drop"}
    )
    fmt = FORMATS | {"calib_acc": ".2f", "calib_drop": ".2f"}
    out += [
        "Accuracy (%) and drop from the teacher (points) on the calibration set the "
        "search used and, re-evaluated, on the full validation and test splits.",
        "",
    ]
    if "teacher_test_acc" in picks.columns:
        t = picks.iloc[0]
        out += [
            f"Teacher: validation {t['teacher_val_acc']:.2f} %, test "
            f"{t['teacher_test_acc']:.2f} %.",
            "",
        ]
    return out + [markdown_table(table, fmt), ""]


def _refined_section(run: RunFolder) -> list[str]:
    path = run.file("refined.csv")
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    # Per-layer level counts are JSON blobs; too wide for a table.
    df = df.drop(columns=[c for c in ("levels_before", "levels_after") if c in df.columns])
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(lambda v: _relative(v, run.path))
    return ["## Refined solutions", "", f"From `{path.name}`:", "", markdown_table(df), ""]


def _exports_section(run: RunFolder) -> list[str]:
    folder = run.path / "exports"
    if not folder.is_dir():
        return []
    records = []
    for f in sorted(folder.rglob("*.export.json")):
        rec = json.loads(f.read_text())
        records.append({k: v for k, v in rec.items() if not isinstance(v, dict | list)})
    out = ["## Exports", ""]
    if records:
        df = pd.DataFrame(records)
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].map(lambda v: _relative(v, run.path))
        out += [markdown_table(df), ""]
    files = [f for f in sorted(folder.rglob("*")) if f.is_file()]
    out += ["Files:", ""]
    out += [f"- `{f.relative_to(run.path)}` ({f.stat().st_size:,} bytes)" for f in files]
    return out + [""]


def _relative(v: Any, base: Path) -> Any:
    if isinstance(v, str) and v.startswith(str(base)):
        return os.path.relpath(v, base)
    return v


def _figures_section(paths: Sequence[Path], image: Callable[[Path], str]) -> list[str]:
    out = ["## Figures", ""]
    shown = [p for p in paths if p.is_file()]
    if not shown:
        return out + ["No figures.", ""]
    for p in shown:
        caption = FIGURES.get(p.name, p.stem.replace("_", " "))
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
    parts += _problem_section(run)
    parts += _search_section(run)
    parts += _front_section(run)
    parts += _picks_section(run)
    parts += _refined_section(run)
    parts += _exports_section(run)
    parts += _figures_section(figures, link)
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
        figures = [folder / n for n in FIGURES if (folder / n).is_file()]
    md = report_markdown(run.path, figures)
    html_md = report_markdown(run.path, figures, image=_data_uri)
    md_path = run.file(REPORT_MD)
    atomic_write_text(md_path, md)
    title = f"moecomp report: {run.problem().name}"
    atomic_write_text(run.file(REPORT_HTML), markdown_to_html(html_md, title=title))
    return md_path
