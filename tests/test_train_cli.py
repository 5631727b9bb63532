"""`amoe distill` command line: config errors, overrides, and the perf benchmark's JSON."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_standins import TINY_STUDENT  # noqa: E402

from amoe.cli import main  # noqa: E402
from distill.train.perf import run_perf  # noqa: E402


def test_unknown_key_exits_2_naming_it(capsys):
    assert main(["distill", "miniworld", "--set", "optim.lrr=1", "world=/w", "teachers=/t"]) == 2
    err = capsys.readouterr().err
    assert "'lrr'" in err and "optim" in err and "did you mean 'lr'" in err


def test_missing_recipe_is_named(capsys):
    assert main(["distill", "no-such-recipe"]) == 2
    assert "no-such-recipe" in capsys.readouterr().err


def test_perf_reports_both_modes_on_same_budget():
    res = run_perf(dict(TINY_STUDENT, teachers_dim=[32, 24]), max_tokens=128, seqs=2, steps=2,
                   sides=(32, 48, 64, 96), n_images=32)
    for mode in ("packed", "padded"):
        assert res[mode]["tokens_per_s"] > 0 and 0 < res[mode]["fill_ratio"] <= 1
    assert res["packed"]["fill_ratio"] > res["padded"]["fill_ratio"]
    assert res["token_budget_per_step"] == 256
    ip = res["input_pipeline"]          # real JPEGs through 2 loader workers into the same training step
    assert ip["workers"] == 2 and ip["train_side_px"] <= 176 and 0 <= ip["data_wait_fraction"] < 1
    assert set(ip["images_per_s_per_worker"]) == {"256", "768"}
