"""Leaderboards built from result JSONs only: tables in the paper's shape, comparison with the papers, plots.

For each suite found in the results, one table with a row per (model, resolution) and a column per
(task, dataset, metric) in suite order, followed by the suite's macro averages per task family
(image-text avg, kNN avg, retrieval, segmentation). Written as Markdown, CSV and LaTeX. A metric is
taken from the first head in the suite's `head_preference` (or its `task_head_preference` for that
task) that reports it (the ensemble for the student, the teacher's own head for a teacher).
`reported.csv` (numbers from the papers, with sources) is shown beside reproduced numbers with deltas
wherever the same (model, metric) exists.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from distill.io import relative_spec
from distill.results import load_results
from benchmarks.suites import SuiteError, load_suite

# package data, so an installed amoe (not only a checkout) compares against the papers' numbers
REPORTED_CSV = Path(__file__).resolve().parent / "suites" / "reported.csv"
TASK_ORDER = ("zeroshot", "knn", "linear", "retrieval", "segmentation")
TASK_LABELS = {"zeroshot": "zero-shot", "knn": "kNN", "retrieval": "retrieval", "segmentation": "seg"}  # else the name
LABELS_FILE = "labels.json"   # optional [{"spec", "name"[, "arm", "seed"]}, ...] beside the result JSONs (rows in that order)


def _saved_labels(results_dir: str | os.PathLike) -> list[dict]:
    path = Path(results_dir) / LABELS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else []
    return [{"spec": k, "name": v} for k, v in saved.items()] if isinstance(saved, dict) else saved


def read_labels(results_dir: str | os.PathLike) -> dict[str, str]:
    """{spec: display name} from `results_dir/labels.json` (a list of {"spec", "name"} in row order, or a
    {spec: name} dict); empty when there is none."""
    return {e["spec"]: e["name"] for e in _saved_labels(results_dir)}


def read_arms(results_dir: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """{spec: (arm, training seed)} from labels.json: rows trained with several seeds name the arm they
    belong to (`arm`, the display name of its seed-0 row) and their `seed`; any other row is its own arm,
    seed 0."""
    return {e["spec"]: (e.get("arm", e["name"]), int(e.get("seed", 0))) for e in _saved_labels(results_dir)}


def display_names(records: list[dict], base: Path, labels: dict[str, str]) -> dict[str, str]:
    """spec -> row name: the given label, else the spec relative to the run folder; labelled rows first,
    in the labels' order (the quickstart lists teachers, then students, then grounding runs)."""
    present = {r["cell"]["model"] for r in records}
    specs = dict.fromkeys([s for s in labels if s in present] + sorted(present))
    return {s: labels.get(s) or relative_spec(s, base) for s in specs}


def _column(task: str, ds: dict, metric: str, head: str | None = None) -> str:
    """Column label: task, the dataset's short name (its name if none), metric, and the head if pinned."""
    short = ds.get("short", ds.get("name", ds["id"]))
    words = [TASK_LABELS.get(task, task)] + ([short] if short else []) + [metric]
    return " ".join(words) + (f" ({head})" if head else "")


# ---------------------------------------------------------------- results -> long frame

def preferred_heads(leaderboard: dict, task: str) -> list[str]:
    """The heads a task's value is taken from, in order: the suite leaderboard's `task_head_preference`
    for that task (segmentation reads the DINOv3 branch's patches, as the official AMoE eval does), else
    its `head_preference`."""
    return (leaderboard.get("task_head_preference") or {}).get(task) or leaderboard.get("head_preference") or []


def pick_metric(metrics: dict[str, float], metric: str, head_preference: list[str]) -> tuple[str, float] | None:
    """(head, value) of `metric`: the first preferred head reporting it, else the best-named other head.

    Metrics are 'head/metric'; a bare 'metric' key counts as head ''."""
    available = {k.rsplit("/", 1)[0] if "/" in k else "": v for k, v in metrics.items()
                 if k == metric or k.endswith("/" + metric)}
    for head in head_preference:
        if head in available:
            return head, available[head]
    if available:
        head = sorted(available)[0]
        return head, available[head]
    return None


def long_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (cell, metric key) of every ok result."""
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        c = r["cell"]
        bounds = (r.get("intervals") or {}).get("metrics", {})
        for key, value in r["metrics"].items():
            low, high = bounds.get(key, (math.nan, math.nan))
            rows.append({"model": c["model"], "model_name": r["model"].get("name", c["model"]),
                         "task": c["task"], "dataset": c["dataset"], "resolution": c["resolution"],
                         "suite": r["config"].get("suite"), "metric_key": key, "value": float(value),
                         "low": low, "high": high,
                         "params": r["model"].get("params"), "active_params": r["model"].get("active_params"),
                         "task_version": r["task"].get("version"), "created": r["created"]})
    return pd.DataFrame(rows, columns=["model", "model_name", "task", "dataset", "resolution", "suite",
                                       "metric_key", "value", "low", "high", "params", "active_params", "task_version",
                                       "created"])


def _res_label(res) -> str:
    return "native" if res is None or (isinstance(res, float) and math.isnan(res)) else str(int(res))


# ---------------------------------------------------------------- one suite -> wide table

INTERVAL_NOTE = ("\n`± h`: half the width of the 95 % percentile-bootstrap interval over the evaluation items "
                 "(results_long.csv has the bounds); family averages carry none.\n")
LIMITED_MARK = "ᴸ"    # a cell measured on a `--limit` subset
SETTINGS_MARK = "†"   # a cell whose task settings differ from the rest of its column
UNREADABLE_MARK = "ᵁ"  # a cell whose dataset had images that do not decode (their items left out)


def _pick_records(records: list[dict], suite_name: str) -> dict[tuple, dict]:
    """One record per (model, resolution, task, dataset): a full run before a limited one, then the
    newest. The others stay in results_long.csv; the tables never show two runs of one cell."""
    chosen: dict[tuple, dict] = {}
    for r in records:
        if r["status"] != "ok" or r["config"].get("suite") != suite_name:
            continue
        c = r["cell"]
        key = (c["model"], _res_label(c["resolution"]), c["task"], c["dataset"])
        rank = (c.get("limit") is None, r["created"])
        if key not in chosen or rank > (chosen[key]["cell"].get("limit") is None, chosen[key]["created"]):
            chosen[key] = r
    return chosen


def _settings_notes(picked: dict[tuple, dict]) -> dict[tuple, str]:
    """(task, dataset) columns whose rows ran with different task settings: for each row off the
    column's most common settings, the config keys that differ. Empty when a column is uniform."""
    from collections import Counter

    notes: dict[tuple, str] = {}
    by_col: dict[tuple, list] = {}
    for key, r in picked.items():
        by_col.setdefault(key[2:], []).append((key, r))
    for col, items in by_col.items():
        counts = Counter(r["cell"].get("settings") for _, r in items)
        if len(counts) < 2:
            continue
        common = counts.most_common(1)[0][0]
        ref = next(r for _, r in items if r["cell"].get("settings") == common)
        ref_cfg, ref_ver = ref["config"].get("task_cfg") or {}, ref["task"].get("version")
        for key, r in items:
            if r["cell"].get("settings") == common:
                continue
            cfg = r["config"].get("task_cfg") or {}
            diff = [f"{k}={json.dumps(cfg.get(k))} (others: {json.dumps(ref_cfg.get(k))})"
                    for k in sorted(set(cfg) | set(ref_cfg)) if cfg.get(k) != ref_cfg.get(k)]
            if r["task"].get("version") != ref_ver:
                diff.insert(0, f"task version {r['task'].get('version')} (others: {ref_ver})")
            notes[key] = "; ".join(diff) or f"settings {r['cell'].get('settings')} (others: {common})"
    return notes


def suite_table(records: list[dict], suite: dict, names: dict[str, str] | None = None,
                base: Path | None = None, allow_limited: bool = False) -> tuple[pd.DataFrame, dict, dict, dict]:
    """The paper-shaped table for one suite, the head each value came from, the cells' marks and
    their 95 % intervals ({(model name, resolution, column): (low, high)}, where the result has one).

    Rows are named by `names` (spec -> display name; rows keep that order) with the spec (relative to
    `base`) in column `spec`. Columns go task family by family: each dataset's metrics (value of the
    preferred head), the heads the suite pins for that task (`per_head`, e.g. zero-shot per text head
    and the ensemble), then the family's macro average when it spans several datasets.

    Marks: {(model name, resolution, column): [mark, note]} for limited cells (LIMITED_MARK) and cells
    run with settings unlike the rest of their column (SETTINGS_MARK). A family average never mixes a
    limited cell with full ones (it is left empty) unless `allow_limited`; an average over limited
    cells is itself marked limited."""
    lb = suite.get("leaderboard") or {}
    columns_by_task = lb.get("columns") or {}
    per_head = lb.get("per_head") or {}
    names = names or {}
    datasets = {d["id"]: d for d in suite["datasets"]}
    families = lb.get("families", [])
    col_specs = []   # (task, ds_id, metric, head or None)
    for task in list(TASK_ORDER) + sorted(set(columns_by_task) - set(TASK_ORDER)):
        for ds in suite["datasets"]:
            if task in ds["tasks"]:
                for metric in columns_by_task.get(task, []):
                    col_specs.append((task, ds["id"], metric, None))
                    col_specs += [(task, ds["id"], metric, h) for h in per_head.get(task, [])]
    picked = _pick_records(records, suite["name"])
    settings_notes = _settings_notes(picked)
    rows: dict[tuple[str, str], dict] = {}
    heads: dict[tuple[str, str], dict] = {}
    marks: dict[tuple, list] = {}
    intervals: dict[tuple, tuple[float, float]] = {}
    limited_cols: dict[tuple[str, str], set] = {}
    for pick_key, r in picked.items():
        c = r["cell"]
        row_key = pick_key[:2]
        row = rows.setdefault(row_key, {"model": names.get(c["model"], c["model"]),
                                        "spec": relative_spec(c["model"], base) if base else c["model"],
                                        "resolution": row_key[1], "active_params": r["model"].get("active_params")})
        for task, ds_id, metric, head in col_specs:
            if task == c["task"] and ds_id == c["dataset"]:
                col = _column(task, datasets[ds_id], metric, head)
                if head is not None:
                    if f"{head}/{metric}" not in r["metrics"]:
                        continue
                    row[col] = r["metrics"][f"{head}/{metric}"]
                    key = f"{head}/{metric}"
                else:
                    picked_metric = pick_metric(r["metrics"], metric, preferred_heads(lb, task))
                    if picked_metric is None:
                        continue
                    row[col] = picked_metric[1]
                    heads.setdefault(row_key, {})[col] = picked_metric[0]
                    key = f"{picked_metric[0]}/{metric}" if picked_metric[0] else metric
                where = (row["model"], row_key[1], col)
                bounds = (r.get("intervals") or {}).get("metrics", {}).get(key)
                if bounds is not None and all(math.isfinite(b) for b in bounds):
                    intervals[where] = tuple(bounds)
                if c.get("limit") is not None:
                    marks.setdefault(where, []).append((LIMITED_MARK, f"limited to {c['limit']} items per split"))
                    limited_cols.setdefault(row_key, set()).add(col)
                if pick_key in settings_notes:
                    marks.setdefault(where, []).append((SETTINGS_MARK, settings_notes[pick_key]))
                unreadable = r["dataset"].get("unreadable")
                if unreadable:
                    marks.setdefault(where, []).append((UNREADABLE_MARK, "; ".join(
                        f"{len(files)} unreadable {role} image(s) left out ({', '.join(files[:3])}"
                        + (", ..." if len(files) > 3 else "") + ")" for role, files in unreadable.items())))
    table = pd.DataFrame(list(rows.values()))
    col_task = {}   # column -> its task, in column order
    for task, ds_id, metric, head in col_specs:
        col_task.setdefault(_column(task, datasets[ds_id], metric, head), task)
    ordered = list(col_task)
    if table.empty:
        return pd.DataFrame(columns=["model", "spec", "resolution"] + ordered), {}, {}, {}
    present = [c for c in ordered if c in table.columns and table[c].notna().any()]
    # family macro averages: mean over the family's datasets this row has; the count says how complete
    fam_after: dict[str, list[str]] = {}
    row_keys = list(rows)
    for fam in families:
        cols = [_column(fam["task"], datasets[d], fam["metric"]) for d in fam["datasets"] if d in datasets]
        have = [c for c in cols if c in table.columns]
        table[fam["name"]] = table[have].mean(axis=1, skipna=True) if have else float("nan")
        table[f"{fam['name']} n"] = table[have].notna().sum(axis=1).astype(int) if have else 0
        for i, row_key in enumerate(row_keys):
            lim = [c for c in have if c in limited_cols.get(row_key, set()) and pd.notna(table.at[i, c])]
            full = [c for c in have if c not in lim and pd.notna(table.at[i, c])]
            where = (table.at[i, "model"], row_key[1], fam["name"])
            if lim and full and not allow_limited:
                table.at[i, fam["name"]] = float("nan")
                marks[where] = [(LIMITED_MARK, "not averaged: limited and full cells are not mixed "
                                               "(`amoe leaderboard build --mix-limited` to average them)")]
            elif lim:
                marks[where] = [(LIMITED_MARK, f"averages {len(lim)} limited cell(s)")]
        fam_after.setdefault(fam["task"], []).append(fam["name"])
    grouped = []
    for task in dict.fromkeys(col_task.values()):
        grouped += [c for c in present if col_task[c] == task] + fam_after.get(task, [])
    grouped += [f["name"] for f in families if f["name"] not in grouped]
    count_cols = [f"{f['name']} n" for f in families]
    table["notes"] = [_row_notes(marks, m, res) for m, res in zip(table["model"], table["resolution"])]
    table = table[["model", "spec", "resolution"] + grouped + count_cols + ["active_params", "notes"]]
    order = {n: i for i, n in enumerate(dict.fromkeys(names.values()))}
    table["_order"] = [order.get(m, len(order)) for m in table["model"]]
    table = table.sort_values(["resolution", "_order", "model"]).drop(columns="_order").reset_index(drop=True)
    return table, heads, marks, intervals


def _row_notes(marks: dict, model: str, res: str) -> str:
    return "; ".join(f"{col}: {note}" for (m, r, col), items in marks.items() if (m, r) == (model, res)
                     for _, note in items)


def mark_notes(marks: dict) -> str:
    """The footnotes under a Markdown table: what each mark means, and each marked cell's reason."""
    if not marks:
        return ""
    used = {mk for items in marks.values() for mk, _ in items}
    lines = ["\n"]
    if LIMITED_MARK in used:
        lines.append(f"{LIMITED_MARK} measured on a `--limit` subset (stratified per class), not the whole split.  \n")
    if SETTINGS_MARK in used:
        lines.append(f"{SETTINGS_MARK} run with task settings unlike the rest of its column.  \n")
    if UNREADABLE_MARK in used:
        lines.append(f"{UNREADABLE_MARK} images that do not decode were left out of the split (named in the "
                     "result file).  \n")
    for (model, res, col), items in marks.items():
        for mk, note in items:
            lines.append(f"- {mk} {model} ({res}), {col}: {note}\n")
    return "".join(lines)


def shown_columns(table: pd.DataFrame, suite: dict) -> pd.DataFrame:
    """What the Markdown / LaTeX tables show: no spec, counts or parameters, and a family average only
    where it averages more than one dataset (else it repeats its one column)."""
    lb = suite.get("leaderboard") or {}
    single = [f["name"] for f in lb.get("families", []) if len(f["datasets"]) < 2]
    drop = ["spec", "active_params", "notes"] + [c for c in table.columns if c.endswith(" n")] + single
    drop += [c for c in table.columns if c not in ("model", "resolution") and table[c].isna().all()]
    return table.drop(columns=[c for c in dict.fromkeys(drop) if c in table.columns])


# ---------------------------------------------------------------- reported vs reproduced

def load_reported(path: str | os.PathLike = REPORTED_CSV) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"spec": str, "model": str, "metric": str, "source": str})
    missing = {"model", "metric", "value", "source"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    if df["source"].isna().any():
        raise ValueError(f"{path}: every reported number needs a source; rows without one: "
                         f"{df[df['source'].isna()].index.tolist()}")
    return df


def reproduced_metrics(table: pd.DataFrame, suite: dict) -> pd.DataFrame:
    """Suite table -> (model, resolution, metric, value) with metric names as in reported.csv:
    family names ("image-text avg") and "<dataset>/<metric>" per dataset column. Family averages
    are only compared when the row has every dataset of the family."""
    lb = suite.get("leaderboard") or {}
    datasets = {d["id"]: d for d in suite["datasets"]}
    rows = []
    col_to_metric = {}
    for task, metrics in (lb.get("columns") or {}).items():
        for ds in suite["datasets"]:
            if task in ds["tasks"]:
                for m in metrics:
                    col_to_metric[_column(task, ds, m)] = f"{ds['id']}/{m}"
    sizes = {f["name"]: len([d for d in f["datasets"] if d in datasets]) for f in lb.get("families", [])}
    key = "spec" if "spec" in table.columns else "model"   # reported.csv names models by spec or name
    for _, r in table.iterrows():
        for col, metric in col_to_metric.items():
            if col in table.columns and pd.notna(r[col]):
                rows.append({"model": r[key], "resolution": r["resolution"], "metric": metric, "value": r[col]})
        for fam, size in sizes.items():
            if pd.notna(r[fam]) and int(r[f"{fam} n"]) == size:
                rows.append({"model": r[key], "resolution": r["resolution"], "metric": fam, "value": r[fam]})
    return pd.DataFrame(rows, columns=["model", "resolution", "metric", "value"])


def compare_with_reported(reproduced: pd.DataFrame, reported: pd.DataFrame,
                          model_names: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows where a reproduced (model, metric) matches a reported one: model spec equal to the
    reported `spec`, or the encoder's name equal to the reported `model`."""
    model_names = model_names or {}
    out = []
    for _, rep in reported.iterrows():
        for _, rr in reproduced.iterrows():
            same_model = (isinstance(rep.get("spec"), str) and rep["spec"] == rr["model"]) or \
                rep["model"] in (rr["model"], model_names.get(rr["model"]))
            if same_model and rep["metric"] == rr["metric"]:
                rep_res = rep.get("resolution")
                if pd.notna(rep_res) and rr["resolution"] != _res_label(rep_res):
                    continue  # a 512 px number is not compared with a 224 px run
                out.append({"model": rr["model"], "resolution": rr["resolution"], "metric": rr["metric"],
                            "reproduced": round(float(rr["value"]), 2), "reported": float(rep["value"]),
                            "delta": round(float(rr["value"]) - float(rep["value"]), 2),
                            "source": rep["source"]})
    return pd.DataFrame(out, columns=["model", "resolution", "metric", "reproduced", "reported", "delta", "source"])


# ---------------------------------------------------------------- writers

def plus_minus(value: float, bounds: tuple[float, float] | None, digits: int = 2) -> str:
    """`value ± half-width` of a (possibly asymmetric) percentile interval; the value alone without one."""
    if bounds is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {(bounds[1] - bounds[0]) / 2:.{digits}f}"


def to_markdown(df: pd.DataFrame, digits: int = 2, marks: dict | None = None, intervals: dict | None = None) -> str:
    """A GitHub-flavoured Markdown table (no optional dependency); `marks` as from `suite_table`
    ({(model, resolution, column): [(mark, note)]}) are appended to the marked values, and values with
    an interval ({(model, resolution, column): (low, high)}) show `± half-width`."""
    marks, intervals = marks or {}, intervals or {}

    def cell(row, col, v) -> str:
        where = (row.get("model"), row.get("resolution"), col)
        text = plus_minus(v, intervals[where], digits) if where in intervals and isinstance(v, float) \
            and not math.isnan(v) else fmt(v)
        items = marks.get(where)
        return text + "".join(dict.fromkeys(mk for mk, _ in items)) if items else text

    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    body = []
    for row in df.itertuples(index=False):
        named = dict(zip(df.columns, row))
        body.append("| " + " | ".join(cell(named, c, v) for c, v in named.items()) + " |")
    return "\n".join([header, sep, *body]) + "\n"


_LATEX_MARKS = {LIMITED_MARK: r"\textsuperscript{L}", SETTINGS_MARK: r"\textsuperscript{\dag}",
                UNREADABLE_MARK: r"\textsuperscript{U}"}


def to_latex(df: pd.DataFrame, caption: str, label: str, marks: dict | None = None,
             intervals: dict | None = None) -> str:
    """A LaTeX table; marked values carry a superscript L (limited) or a dagger (settings differ), values
    with an interval `$\\pm$ half-width`."""
    marks, intervals = marks or {}, intervals or {}
    if not marks and not intervals:
        return df.to_latex(index=False, float_format="%.2f", na_rep="--", caption=caption, label=label,
                           escape=True)
    specials = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                                                      "\\": r"\textbackslash{}"}

    def esc(text: str) -> str:
        return "".join(specials.get(ch, ch) for ch in text)

    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        values = []
        for i, v in df[col].items():
            where = (df.at[i, "model"], df.at[i, "resolution"], col) if "model" in df else None
            text = "--" if v is None or (isinstance(v, float) and math.isnan(v)) else \
                (plus_minus(v, intervals.get(where)).replace("±", r"$\pm$") if isinstance(v, float) else esc(str(v)))
            items = marks.get(where) if where else None
            values.append(text + "".join(_LATEX_MARKS[m] for m in dict.fromkeys(m for m, _ in items or [])))
        out[esc(str(col))] = values
    return out.to_latex(index=False, caption=caption, label=label, escape=False)


def plot_score_vs_params(tables: dict[str, pd.DataFrame], reported: pd.DataFrame, path: Path) -> Path | None:
    """Family averages against active parameters: reproduced runs (filled) and reported (hollow).
    Points are named in a legend, not by text beside them, so labels never overlap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = ["image-text avg", "kNN avg"]
    fig, axes = plt.subplots(1, len(families), figsize=(7 * len(families), 4.5), squeeze=False)
    for ax, fam in zip(axes[0], families):
        for suite_name, table in tables.items():
            if fam not in table.columns:
                continue
            sub = table.dropna(subset=[fam, "active_params"])
            for _, r in sub.iterrows():
                label = r["model"] if len(tables) == 1 else f"{r['model']} ({suite_name})"
                ax.scatter(float(r["active_params"]), r[fam], marker="o", label=label)
        rep = reported[(reported["metric"] == fam) & reported.get("params_active_m", pd.Series(dtype=float)).notna()]
        for k, (_, r) in enumerate(rep.iterrows()):   # a marker per reported model tells them apart
            x = float(r["params_active_m"]) * 1e6
            ax.scatter(x, r["value"], facecolors="none", edgecolors="k", marker="sD^vP*X"[k % 7],
                       label=f"{r['model']} (reported)")
        ax.set_xscale("log")
        ax.set_xlabel("active parameters")
        ax.set_ylabel(f"{fam} (%)")
        ax.set_title(fam)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("score vs active parameters (filled: reproduced here, hollow: reported by the papers)",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from distill.io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def build(results_dir: str | os.PathLike, out_dir: str | os.PathLike,
          reported_csv: str | os.PathLike | None = REPORTED_CSV, labels: dict[str, str] | None = None,
          allow_limited: bool = False) -> dict:
    """Write every table and plot; returns {"files": [...], "suites": [...], "cells": n}.

    Rows are named by `labels` ({spec: display name}; also read from `results_dir/labels.json`, a list
    of {"spec", "name"} in row order), else by their spec; paths in specs are written relative to the
    run folder (the parent of `results_dir`). Unreadable result files are named and left out.
    `allow_limited` lets family averages mix limited and full cells (marked)."""
    from distill.io import write_text_atomic

    unreadable: list = []
    records = load_results(results_dir, unreadable=unreadable)
    base = Path(results_dir).resolve().parent
    given = labels or {}   # given names win and keep their order; labels.json fills in the rest
    labels = {**given, **{k: v for k, v in read_labels(results_dir).items() if k not in given}}
    row_names = display_names(records, base, labels)
    if not records:
        raise ValueError(f"no result JSONs under {results_dir}; run `amoe bench sweep` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def write(name: str, text: str) -> None:
        write_text_atomic(out / name, text)
        written.append(str(out / name))

    long = long_frame(records)
    long["model"] = [relative_spec(m, base) for m in long["model"]]
    long["model_name"] = [relative_spec(m, base) for m in long["model_name"]]
    write("results_long.csv", long.to_csv(index=False))
    status = pd.DataFrame([{"model": row_names[r["cell"]["model"]], "task": r["cell"]["task"], "dataset": r["cell"]["dataset"],
                            "resolution": _res_label(r["cell"]["resolution"]), "status": r["status"],
                            "reason": r.get("reason", "")} for r in records])
    reported = load_reported(reported_csv) if reported_csv else pd.DataFrame(
        columns=["model", "spec", "metric", "value", "source"])
    names = {relative_spec(r["cell"]["model"], base): r["model"].get("name") for r in records}

    tables: dict[str, pd.DataFrame] = {}
    comparisons = []
    where = os.path.relpath(Path(results_dir).resolve(), Path(out_dir).resolve())
    md_parts = ["# Leaderboard\n", f"Built from {len(records)} result files in `{where}` (relative to this "
                "folder; `amoe leaderboard build`). Scores are percentages. A column with a head in brackets "
                "shows that head alone (`ensemble`: the entropy-weighted fusion of the text heads); the others "
                "show the preferred head. The CSV files add each row's encoder spec and the family averages "
                "with their dataset counts.\n"]
    suite_names = sorted({r["config"].get("suite") for r in records if r["config"].get("suite")})
    unlisted: list[str] = []
    for suite_name in suite_names:
        try:
            # suite_file is relative to the result's own folder (absolute in results written before)
            files = (Path(r["_path"]).parent / r["config"]["suite_file"] for r in records
                     if r["config"].get("suite") == suite_name and r["config"].get("suite_file"))
            suite = load_suite(next(f for f in files if f.is_file()))
        except (StopIteration, SuiteError):
            try:
                suite = load_suite(suite_name)
            except SuiteError:
                unlisted.append(f"- results name the suite `{suite_name}`, which is neither built in nor a file "
                                "here: they are in results_long.csv only")
                continue
        table, heads, marks, intervals = suite_table(records, suite, row_names, base, allow_limited=allow_limited)
        listed = {d["id"] for d in suite["datasets"]}
        strays = sorted({r["cell"]["dataset"] for r in records if r["config"].get("suite") == suite_name
                         and r["cell"]["dataset"] not in listed})
        if strays:   # results no column shows: say so rather than leave a row of dashes unexplained
            unlisted.append(f"- suite `{suite_name}` lists no dataset {', '.join(f'`{d}`' for d in strays)}: those "
                            "results are in results_long.csv only (`amoe ground eval --dataset-id` / `--suite` "
                            "file them under a listed id)")
        if table.empty:
            continue
        tables[suite_name] = table
        shown = shown_columns(table, suite)
        write(f"{suite_name}.csv", table.to_csv(index=False))
        shown_md = to_markdown(shown, marks=marks, intervals=intervals) + mark_notes(marks) + \
            (INTERVAL_NOTE if intervals else "")
        write(f"{suite_name}.md", f"# {suite_name}\n\n" + shown_md)
        write(f"{suite_name}.tex", to_latex(shown, caption=f"{suite_name} suite (reproduced with amoe)",
                                            label=f"tab:{suite_name}", marks=marks, intervals=intervals))
        head_rows = [{"model": row_names.get(m, m), "resolution": res, "column": col, "head": h}
                     for (m, res), cols in heads.items() for col, h in cols.items()]
        write(f"{suite_name}_heads.csv", pd.DataFrame(head_rows).to_csv(index=False))
        md_parts += [f"\n## Suite `{suite_name}`\n\n", shown_md]
        comparisons.append(compare_with_reported(reproduced_metrics(table, suite), reported, names))

    comparison = pd.concat(comparisons, ignore_index=True) if comparisons else pd.DataFrame()
    write("comparison.csv", comparison.to_csv(index=False))
    md_parts.append("\n## Reproduced vs reported\n\n")
    md_parts.append(to_markdown(comparison) if not comparison.empty else
                    "No reproduced (model, metric) matches a number in `reported.csv` yet.\n")
    if len(reported):
        shown_rep = reported[["model", "metric", "value", "resolution", "source"]].copy()
        shown_rep["resolution"] = [("" if pd.isna(v) else str(int(v))) for v in shown_rep["resolution"]]
        md_parts += ["\n## Reported by the papers\n\n", to_markdown(shown_rep)]
    failed = status[status["status"] != "ok"]
    if len(failed):
        md_parts += ["\n## Cells not in the tables\n\n", to_markdown(failed)]
    notes = data_notes(records, row_names) + unlisted + [f"- result file `{os.path.relpath(p, out)}` left out: {why}"
                                              for p, why in unreadable]
    if notes:
        md_parts += ["\n## Notes\n\n", "\n".join(notes) + "\n"]
    write("leaderboard.md", "".join(md_parts))
    write("status.csv", status.to_csv(index=False))
    plot = plot_score_vs_params(tables, reported, out / "score_vs_active_params.png")
    written.append(str(plot))
    return {"files": written, "suites": list(tables), "cells": len(records),
            "compared": int(len(comparison)), "unreadable": [os.path.relpath(p, out) for p, _ in unreadable]}


def data_notes(records: list[dict], row_names: dict[str, str]) -> list[str]:
    """What a score does not show: grounding expressions skipped because their image files are missing
    or do not decode."""
    out = []
    for r in records:
        missing = r["dataset"].get("missing_images")
        if r["status"] == "ok" and missing:
            c = r["cell"]
            out.append(f"- {row_names.get(c['model'], c['model'])}, {c['task']} {c['dataset']}: "
                       f"{int(missing)} refs skipped because their image files are missing "
                       f"(scored over {r['dataset'].get('evaluated', '?')} expressions)")
        unreadable = r["dataset"].get("unreadable_images")
        if r["status"] == "ok" and unreadable:
            c = r["cell"]
            out.append(f"- {row_names.get(c['model'], c['model'])}, {c['task']} {c['dataset']}: the expressions of "
                       f"{len(unreadable)} image(s) that do not decode were left out ({', '.join(unreadable[:3])}"
                       + (", ..." if len(unreadable) > 3 else "") + ")")
    return out
