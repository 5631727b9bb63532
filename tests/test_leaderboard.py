"""Leaderboards from hand-made result JSONs: paper-shaped tables, macro averages, deltas vs reported, plot."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from amoe.cli import main as amoe_main
from benchmarks.leaderboard import build, load_reported, pick_metric, preferred_heads, suite_table
from distill.results import Cell, load_results, make_record, write_result
from benchmarks.suites import load_suite

PAPER_CLS = ["imagenet", "cub200", "food101", "dtd", "fgvc_aircraft", "flowers102", "caltech101"]


def _record(model, task, dataset, metrics, resolution=512, status="ok", name=None, active=None, suite="paper"):
    return make_record(Cell(model, task, dataset, resolution), status, metrics=metrics,
                       config={"suite": suite}, model={"spec": model, "name": name or model, "active_params": active},
                       dataset={"id": dataset}, task={"name": task, "version": "1"}, timings={"total_s": 1.0},
                       reason="no text tower" if status == "skipped" else None)


def _write_paper_results(folder):
    # model A: full zero-shot and kNN sets; 1..7 as top1 so averages are easy to check
    for i, ds in enumerate(PAPER_CLS, start=1):
        write_result(folder, _record("modelA", "zeroshot", ds, {"ensemble/top1": 10.0 * i, "siglip2/top1": 1.0,
                                                                "ensemble/top5": 99.0}, active=3e8))
        write_result(folder, _record("modelA", "knn", ds, {"siglino/top1": float(i), "dinov3/top1": 50.0}, active=3e8))
    write_result(folder, _record("modelA", "retrieval", "coco5k", {"ensemble/t2i_r1": 50.0, "ensemble/i2t_r1": 70.0}))
    write_result(folder, _record("modelA", "segmentation", "ade20k", {"siglino/miou": 40.0}))
    # a second model with the official name so it matches reported.csv rows by encoder name
    write_result(folder, _record("siglino:somewhere", "retrieval", "coco5k", {"ensemble/t2i_r1": 55.0},
                                 name="SigLino-MoE-0.3-0.6B", active=3e8))
    write_result(folder, _record("siglino:somewhere", "zeroshot", "imagenet", {"siglip2/top1": 80.0},
                                 name="SigLino-MoE-0.3-0.6B", active=3e8))
    # teacher with only one head and a skipped cell
    write_result(folder, _record("dinov3:x", "zeroshot", "imagenet", {}, status="skipped"))


def test_pick_metric_prefers_heads_in_order():
    m = {"siglip2/top1": 1.0, "ensemble/top1": 2.0, "dinov3/top5": 3.0}
    assert pick_metric(m, "top1", ["ensemble", "siglip2"]) == ("ensemble", 2.0)
    assert pick_metric(m, "top1", ["siglino"]) == ("ensemble", 2.0)  # fallback: first by name
    assert pick_metric(m, "miou", ["ensemble"]) is None
    assert pick_metric({"top1": 5.0}, "top1", []) == ("", 5.0)


def test_a_task_can_prefer_its_own_heads(tmp_path):
    """Segmentation reads the DINOv3 branch first (the official eval's patch tokens); other tasks keep the
    suite's order, which puts the backbone (`siglino`) before the branches."""
    write_result(tmp_path, _record("modelB", "segmentation", "ade20k", {"siglino/miou": 40.0, "dinov3/miou": 45.0}))
    write_result(tmp_path, _record("modelB", "knn", "cub200", {"siglino/top1": 3.0, "dinov3/top1": 50.0}))
    suite = load_suite("paper")
    assert preferred_heads(suite["leaderboard"], "segmentation")[0] == "dinov3"
    assert preferred_heads(suite["leaderboard"], "knn") == suite["leaderboard"]["head_preference"]
    table, heads, *_ = suite_table(load_results(tmp_path), suite)
    b = table.iloc[0]
    assert b["seg ADE20K miou"] == 45.0 and heads[("modelB", "512")]["seg ADE20K miou"] == "dinov3"
    assert b["kNN CUB-200 top1"] == 3.0


def test_suite_table_columns_and_family_averages(tmp_path):
    _write_paper_results(tmp_path)
    records = load_results(tmp_path)
    table, heads, *_ = suite_table(records, load_suite("paper"))
    a = table[table["model"] == "modelA"].iloc[0]
    assert a["zero-shot ImageNet-1k top1"] == 10.0 and heads[("modelA", "512")]["kNN CUB-200 top1"] == "siglino"
    assert a["image-text avg"] == pytest.approx(40.0) and a["image-text avg n"] == 7   # mean(10..70)
    assert a["kNN avg"] == pytest.approx(3.5) and a["kNN avg n"] == 6                  # Caltech-101 left out
    assert a["retrieval avg"] == 50.0 and a["retrieval avg n"] == 1
    cols = list(table.columns)
    # paper order, grouped by task family: each family's columns, then its average
    assert cols.index("zero-shot Caltech-101 top1") < cols.index("image-text avg") < \
        cols.index("kNN ImageNet-1k top1") < cols.index("kNN avg") < cols.index("retrieval MSCOCO 5k t2i_r1") < \
        cols.index("seg ADE20K miou")
    s = table[table["model"] == "siglino:somewhere"].iloc[0]
    assert s["image-text avg"] == 80.0 and s["image-text avg n"] == 1


def test_build_writes_tables_comparison_and_plot(tmp_path):
    results = tmp_path / "results"
    _write_paper_results(results)
    out = tmp_path / "lb"
    rc = amoe_main(["leaderboard", "build", "--results", str(results), "--out", str(out)])
    assert rc == 0
    for name in ("paper.md", "paper.csv", "paper.tex", "leaderboard.md", "comparison.csv", "results_long.csv",
                 "status.csv", "score_vs_active_params.png"):
        assert (out / name).is_file(), name
    png = (out / "score_vs_active_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    csv = pd.read_csv(out / "paper.csv")
    assert set(csv["model"]) == {"modelA", "siglino:somewhere"}
    assert "\\begin{tabular}" in (out / "paper.tex").read_text()
    md = (out / "leaderboard.md").read_text()
    assert "| modelA | 512 |" in md and "no text tower" in md
    cmp = pd.read_csv(out / "comparison.csv")
    # COCO T2I@1: matched through the encoder name; image-text avg not compared (1 of 7 datasets)
    row = cmp[(cmp["model"] == "siglino:somewhere") & (cmp["metric"] == "coco5k/t2i_r1")].iloc[0]
    assert row["reported"] == 53.98 and row["delta"] == pytest.approx(55.0 - 53.98)
    assert "2512.20157" in row["source"]
    assert not ((cmp["model"] == "siglino:somewhere") & (cmp["metric"] == "image-text avg")).any()
    # modelA is not in reported.csv: no comparison rows for it
    assert not (cmp["model"] == "modelA").any()


def test_full_family_compared_against_reported(tmp_path):
    reported = tmp_path / "reported.csv"
    reported.write_text("model,spec,metric,value,resolution,source\n"
                        "My Model,modelA,image-text avg,41.0,512,made-up table 1\n"
                        "My Model,modelA,kNN avg,3.0,224,made-up table 2\n")
    _write_paper_results(tmp_path / "r")
    summary = build(tmp_path / "r", tmp_path / "lb", reported_csv=reported)
    assert summary["compared"] == 1   # the 224 px kNN number is not compared with a 512 px run
    cmp = pd.read_csv(tmp_path / "lb" / "comparison.csv")
    assert cmp.iloc[0]["delta"] == pytest.approx(-1.0)


def test_reported_csv_has_sources_and_headline_numbers():
    rep = load_reported()
    assert rep["source"].str.contains("2512.20157").all()
    key = rep.set_index(["model", "metric"])["value"]
    assert key[("SigLino-MoE-0.3-0.6B", "image-text avg")] == 84.13
    assert key[("RADIOv2.5-H", "kNN avg")] == 85.12
    assert key[("SigLino-Dense-0.6B", "cityscapes/miou")] == 65.38
    assert key[("ablation: ARKD (asymmetric)", "kNN avg")] == 83.63


def test_build_without_results_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="amoe bench sweep"):
        build(tmp_path / "empty", tmp_path / "lb")


def test_rows_get_display_names_and_no_machine_paths(tmp_path):
    from benchmarks.leaderboard import LABELS_FILE, build
    from distill.io import relative_spec
    results = tmp_path / "run" / "results"
    _write_paper_results(results)
    (results / LABELS_FILE).write_text(json.dumps([{"spec": "siglino:somewhere", "name": "B first"},
                                                   {"spec": "modelA", "name": "Model A"}]))
    build(results, tmp_path / "run" / "leaderboard")
    md = (tmp_path / "run" / "leaderboard" / "leaderboard.md").read_text()
    assert "| Model A |" in md and "modelA" not in md
    assert md.index("| B first |") < md.index("| Model A |")       # rows in the labels' order
    for f in (tmp_path / "run" / "leaderboard").glob("*.*"):
        if f.suffix in (".md", ".csv", ".tex"):
            assert str(tmp_path) not in f.read_text(), f.name
    csv = (tmp_path / "run" / "leaderboard" / "paper.csv").read_text()
    assert "Model A,modelA," in csv                          # the spec stays in the CSV
    base = tmp_path / "run"
    assert relative_spec(f"student:{base}/students/x?phis_inverse=0", base) == "student:students/x?phis_inverse=0"
    assert relative_spec("siglip2:google/siglip2-so400m-patch16-naflex", base) == \
        "siglip2:google/siglip2-so400m-patch16-naflex"
