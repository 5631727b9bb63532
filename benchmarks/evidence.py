"""The evidence page: the paper's claims, tested on a results folder with paired bootstrap intervals.

A claims file (data: benchmarks/suites/claims/<name>.json) lists, per claim, the paper's numbers and
the comparisons that test it in miniature. A comparison names two leaderboard rows (display names, as
in labels.json), a task, a dataset and a metric, and what the claim expects of row A against row B:

- ``better``: A - B > 0. Reproduced when the paired 95 % interval of A - B lies above 0, contradicted
  when it lies below 0, inconclusive otherwise.
- ``not_worse``: A - B > -margin (the claims file's ``margin``, in points). Reproduced when the
  interval lies above -margin, contradicted when it lies below -margin, inconclusive otherwise.

A claim is reproduced when all its comparisons are, contradicted when any is, inconclusive otherwise,
and "not run" when a row it needs is not in the results (the page names the missing rows). The verdict
is computed from the intervals only; nothing here knows what the paper hoped for beyond `expect`.

A comparison may restrict the items to the rarest concepts of the training pool (``"subset":
"pool_tail"``): the classes whose (colour, shape) concept has the fewest objects in the mini-world's
pool (world.json), the bottom ``tail_fraction`` of them; the metric is then top-1 on those items.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import numpy as np

from distill import stats
from distill.errors import AmoeError
from distill.io import write_json_atomic, write_text_atomic
from distill.results import load_results, read_items

from benchmarks.compare import CompareError, same_items
from benchmarks.leaderboard import display_names, pick_metric, preferred_heads, read_arms, read_labels
from benchmarks.suites import load_suite

CLAIMS_DIR = Path(__file__).resolve().parent / "suites" / "claims"
EXPECTATIONS = ("better", "not_worse")
VERDICTS = ("reproduced", "contradicted", "inconclusive", "not run")


class EvidenceError(AmoeError, ValueError):
    """A claims file that cannot be used; the message names the field and the fix."""


def load_claims(name_or_path: str | os.PathLike) -> dict:
    p = Path(name_or_path)
    path = p if p.suffix == ".json" and p.is_file() else CLAIMS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(x.stem for x in CLAIMS_DIR.glob("*.json")))
        raise EvidenceError(f"claims file '{name_or_path}' not found (built in: {known})")
    claims = json.loads(path.read_text())
    for c in claims.get("claims", []):
        for t in c.get("tests", []):
            missing = [k for k in ("a", "b", "task", "dataset", "metric", "expect") if k not in t]
            if missing or t["expect"] not in EXPECTATIONS:
                raise EvidenceError(f"{path}: claim '{c.get('id')}': a test lacks {', '.join(missing) or 'a valid'} "
                                    f"{'' if missing else 'expect'} (expect is one of {', '.join(EXPECTATIONS)})")
    return claims


def verdict(low: float, high: float, expect: str, margin: float) -> str:
    bound = 0.0 if expect == "better" else -margin
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if low > bound:
        return "reproduced"
    if high < bound:
        return "contradicted"
    return "inconclusive"


def claim_verdict(verdicts: list[str]) -> str:
    if not verdicts or "not run" in verdicts:
        return "not run"
    if "contradicted" in verdicts:
        return "contradicted"
    return "reproduced" if all(v == "reproduced" for v in verdicts) else "inconclusive"


def pool_tail_classes(world: Path, classes: list[str], fraction: float) -> list[int]:
    """Indices (in `classes`) of the classes whose pool concept is rarest: the bottom `fraction`."""
    from benchmarks.world.vocab import concept_name
    counts = json.loads((world / "world.json").read_text())["parts"]["pool"]["object_counts_per_concept"]
    names = {concept_name(c): n for c, n in enumerate(counts)}
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise EvidenceError(f"{world}: classes {unknown[:3]} are no pool concept; the tail subset needs the "
                            "mini-world's (colour, shape) classes")
    order = sorted(range(len(classes)), key=lambda i: (names[classes[i]], i))
    return sorted(order[:max(1, int(round(fraction * len(classes))))])


def _subset(scores: stats.ItemScores, keep_classes: list[int]) -> stats.ItemScores:
    """Top-1 hits of the items whose label is in `keep_classes`, from class-recall rows [label, hit]."""
    label, hit = scores.values[:, 0].astype(int), scores.values[:, 1]
    return stats.hits(hit[np.isin(label, keep_classes)])


class _Rows:
    """The ok results of a folder, found by arm (a display name, as in labels.json), task and dataset.
    An arm trained with several seeds has one row per seed (labels.json names its arm and seed)."""

    def __init__(self, results_dir: Path):
        self.records = load_results(results_dir, statuses=("ok",))
        self.names = display_names(self.records, results_dir.resolve().parent, read_labels(results_dir))
        self.arms = read_arms(results_dir)

    def find(self, row: str, task: str, dataset: str) -> dict[int, dict]:
        """{seed: result}: for each seed of the arm, its native-resolution result for (task, dataset), a
        full run before a `--limit` one, then the newest."""
        by_seed: dict[int, list[dict]] = {}
        for r in self.records:
            spec = r["cell"]["model"]
            arm, seed = self.arms.get(spec, (self.names.get(spec, spec), 0))
            if arm == row and r["cell"]["task"] == task and r["cell"]["dataset"] == dataset \
                    and r["cell"]["resolution"] is None:
                by_seed.setdefault(seed, []).append(r)
        return {k: max(v, key=lambda r: (r["cell"]["limit"] is None, r["created"])) for k, v in sorted(by_seed.items())}


def _paired_seeds(a: dict[int, dict], b: dict[int, dict]) -> tuple[list[dict], list[dict]]:
    """The seeds the two arms are compared on: the common ones, or all of one arm against the other's
    single row (a teacher is trained once)."""
    if len(a) > 1 and len(b) > 1:
        common = sorted(set(a) & set(b))
        return [a[k] for k in common], [b[k] for k in common]
    return list(a.values()), list(b.values())


def _one_test(t: dict, rows: _Rows, leaderboard: dict, margin: float, world: Path | None, bootstrap: dict) -> dict:
    out = {k: t[k] for k in ("a", "b", "task", "dataset", "metric", "expect")}
    if t.get("subset"):
        out["subset"] = t["subset"]
    found = {side: rows.find(t[side], t["task"], t["dataset"]) for side in ("a", "b")}
    absent = [t[s] for s, r in found.items() if not r]
    if absent:
        return {**out, "verdict": "not run", "why": f"no {t['task']} {t['dataset']} result of "
                                                    f"{' and '.join(absent)} in the results"}
    recs = dict(zip(("a", "b"), _paired_seeds(found["a"], found["b"])))
    if not recs["a"]:
        return {**out, "verdict": "not run", "why": f"{t['a']} and {t['b']} share no training seed"}
    try:
        for rec in recs["a"][1:] + recs["b"]:
            same_items(recs["a"][0], rec)
    except CompareError as e:
        return {**out, "verdict": "not run", "why": str(e)}
    if recs["a"][0]["cell"]["limit"] is not None:
        out["limit"] = recs["a"][0]["cell"]["limit"]
    tail = None
    if t.get("subset") == "pool_tail":
        if world is None:
            return {**out, "verdict": "not run", "why": "the tail subset needs the world (--world)"}
        classes = [c for c in (world / "classification" / "classnames.txt").read_text().split("\n") if c]
        tail = pool_tail_classes(world, classes, float(t.get("tail_fraction", 0.25)))
        out["tail_classes"] = len(tail)
    scores: dict[str, list] = {}
    for side in ("a", "b"):
        base = "mean_per_class_recall" if tail is not None else t["metric"]   # tail rows carry the labels
        scores[side] = []
        for rec in recs[side]:
            picked = pick_metric(rec["metrics"], base, preferred_heads(leaderboard, rec["cell"]["task"]))
            items = read_items(rec)
            key = f"{picked[0]}/{base}" if picked and picked[0] else base
            if picked is None or key not in items:
                return {**out, "verdict": "not run", "why": f"{t[side]} has no per-item scores for {t['metric']}"}
            scores[side].append(items[key] if tail is None else _subset(items[key], tail))
        values = [x.metric() for x in scores[side]]
        intervals = [stats.bootstrap_interval(x, **bootstrap) for x in scores[side]]
        out[f"{side}_head"] = picked[0]
        out[f"{side}_value"] = float(np.mean(values))          # the mean over the arm's seeds
        out[f"{side}_half_width"] = float(np.mean([(hi - lo) / 2 for lo, hi in intervals]))   # item noise
        out[f"{side}_seeds"] = len(values)
        out[f"{side}_seed_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None   # training noise
    if len({len(x) for x in scores["a"] + scores["b"]}) != 1:
        return {**out, "verdict": "not run", "why": f"{len(scores['a'][0])} vs {len(scores['b'][0])} items"}
    d = stats.seeded_difference(scores["a"], scores["b"], **bootstrap)
    out.update(difference=d["difference"], low=d["low"], high=d["high"], items=d["items"], seeds=d["seeds"],
               per_seed=d["per_seed"], verdict=verdict(d["low"], d["high"], t["expect"], margin))
    return out


def evaluate_claims(results_dir: str | os.PathLike, claims: dict, world: str | os.PathLike | None = None,
                    **bootstrap) -> dict:
    bootstrap = {**stats.DEFAULTS, **bootstrap}
    results_dir = Path(results_dir)
    rows = _Rows(results_dir)
    leaderboard = load_suite(claims["suite"]).get("leaderboard") or {}
    margin = float(claims.get("margin", 1.0))
    out = {"name": claims.get("name"), "suite": claims["suite"], "margin": margin, "bootstrap": bootstrap,
           "claims": []}
    for c in claims["claims"]:
        tests = [_one_test(t, rows, leaderboard, margin, Path(world) if world else None, bootstrap)
                 for t in c.get("tests", [])]
        entry = {k: c.get(k) for k in ("id", "title", "paper", "note")}
        entry.update(tests=tests, verdict=claim_verdict([t["verdict"] for t in tests]))
        if not tests:
            entry["why"] = c.get("not_run", "no comparison is defined for it")
        out["claims"].append(entry)
    return out


def _fmt(t: dict, side: str) -> str:
    """An arm's value: the mean over its seeds ± the item interval's half-width, and with several seeds
    their standard deviation (the training noise)."""
    text = f"{t[side + '_value']:.2f} ± {t[side + '_half_width']:.2f}"
    return text + (f", sd {t[side + '_seed_sd']:.2f}" if t.get(side + "_seed_sd") is not None else "")


def _plot(claim: dict, margin: float, path: Path) -> Path | None:
    tests = [t for t in claim["tests"] if "difference" in t]
    if not tests:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(tests) + 1.4))
    for i, t in enumerate(tests):
        colour = {"reproduced": "tab:green", "contradicted": "tab:red"}.get(t["verdict"], "tab:grey")
        ax.errorbar(t["difference"], i, xerr=[[t["difference"] - t["low"]], [t["high"] - t["difference"]]],
                    fmt="o", color=colour, capsize=4)
    ax.axvline(0.0, color="black", lw=0.8)
    if any(t["expect"] == "not_worse" for t in tests):
        ax.axvline(-margin, color="black", lw=0.8, ls=":")
    ax.set_yticks(range(len(tests)))
    ax.set_yticklabels([f"{t['a']} - {t['b']}\n{t['task']} {t['dataset']} {t['metric']}"
                        f"{' (tail)' if t.get('subset') else ''}" for t in tests], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference A - B (points), 95 % bootstrap interval")
    ax.set_title(textwrap.fill(claim["title"], 70), fontsize=9)   # wrapped: a long claim ran off the figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_evidence(results_dir: str | os.PathLike, out_dir: str | os.PathLike, claims: str | dict = "miniworld",
                   world: str | os.PathLike | None = None, **bootstrap) -> dict:
    """evidence.md (+ evidence.json and one plot per claim) in `out_dir`; returns the evidence dict."""
    claims = load_claims(claims) if not isinstance(claims, dict) else claims
    ev = evaluate_claims(results_dir, claims, world, **bootstrap)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Evidence: the paper's claims in miniature\n\n",
             f"Generated by `amoe leaderboard evidence` from the results in "
             f"`{os.path.relpath(Path(results_dir).resolve(), out.resolve())}` (relative to this folder). Every "
             "comparison is a paired difference A - B on the same evaluation items with its 95 % percentile-"
             f"bootstrap interval ({ev['bootstrap']['resamples']} resamples). `better`: reproduced when the "
             "interval lies above 0, contradicted below 0; `not_worse`: reproduced when it lies above "
             f"-{ev['margin']:g} points, contradicted below. Otherwise inconclusive. A claim is reproduced when "
             "all its comparisons are, contradicted when any is. `ᴸN`: both rows were measured on a `--limit N` "
             "subset. An arm trained with several seeds (`seeds` > 1) shows the mean over its seeds, the item "
             "interval's half-width and the standard deviation across seeds (`sd`); its interval is a hierarchical "
             "bootstrap that resamples the seeds as well as the items, so it covers training noise too (with 3 "
             "seeds it is still narrower than it should be: read the per-seed differences beside it). With one "
             "seed the intervals resample evaluation items for fixed weights and do not cover training noise: "
             "another seed or another CPU retrains every row (on the mini-world that moved a teacher's kNN by 3 "
             "points and flipped verdicts; docs/teachers.md, \"Reproducibility\").\n\n",
             "| claim | verdict |\n|---|---|\n"]
    lines += [f"| {c['title']} | **{c['verdict']}** |\n" for c in ev["claims"]]
    for c in ev["claims"]:
        lines.append(f"\n## {c['title']}\n\nPaper: {c['paper']}\n\n" + (f"{c['note']}\n\n" if c.get("note") else "")
                     + f"Verdict: **{c['verdict']}**")
        lines.append(f" ({c['why']})\n" if c.get("why") else "\n")
        if c["tests"]:
            lines.append("\n| A | B | task / metric | expect | A | B | seeds | A - B per seed | A - B [95 %] | verdict |\n"
                         "|---|---|---|---|---:|---:|---:|---:|---:|---|\n")
            for t in c["tests"]:
                what = f"{t['task']} {t['dataset']} {t['metric']}" + (f" ({t['tail_classes']} rarest pool concepts)"
                                                                      if t.get("tail_classes") else "") + \
                    (f" ᴸ{t['limit']}" if t.get("limit") else "")
                if "difference" not in t:
                    lines.append(f"| {t['a']} | {t['b']} | {what} | {t['expect']} | – | – | – | – | – | "
                                 f"{t['verdict']}: {t['why']} |\n")
                    continue
                lines.append(f"| {t['a']} | {t['b']} | {what} | {t['expect']} | "
                             f"{_fmt(t, 'a')} | {_fmt(t, 'b')} | {t['seeds']} | "
                             f"{' / '.join(f'{v:+.2f}' for v in t['per_seed'])} | {t['difference']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}] | {t['verdict']} |\n")
            plot = _plot(c, ev["margin"], out / f"evidence_{c['id']}.png")
            if plot is not None:
                lines.append(f"\n![{c['id']}]({plot.name})\n")
    write_text_atomic(out / "evidence.md", "".join(lines))
    write_json_atomic(out / "evidence.json", ev)
    return ev
