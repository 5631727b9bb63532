"""Curation under 2 gloo ranks on CPU: embedding splits whole shards over ranks, and the torch.distributed
k-means (points sliced over ranks, centroid sums and counts all-reduced) equals a 1-process run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ranks import run_two_ranks

TESTS_DIR = Path(__file__).resolve().parent

CFG = {"name": "dist", "engine": "torch", "seed": 0,
       "levels": [{"k": 7, "niter": 8, "resampling_steps": 2, "sample_size": 3, "resample_niter": 3,
                   "init": "kmeans++"},
                  {"k": 3, "niter": 5}]}

_WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from pathlib import Path
from curation_standins import ProjectionEncoder
from distill.curation import cluster_embeddings, embed_pool

tmp = Path({tmp!r})
dist.init_process_group("gloo", init_method="file://" + str(tmp / "rendezvous"), rank=int(sys.argv[1]), world_size=2)
enc = ProjectionEncoder(8)
embed_pool(enc, tmp / "pool", tmp / "emb2", batch_size=4, progress=False)
cluster_embeddings(tmp / "emb2", json.loads({cfg!r}), tmp / "cl2", progress=False)
print(json.dumps({{"rank": dist.get_rank(), "encode_calls": enc.calls}}))
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path):
    from test_curation import make_pool
    from curation_standins import ProjectionEncoder
    from distill.curation import EmbeddingSet, cluster_embeddings, embed_pool, load_hierarchy

    # 4 shards of 13 solid-colour images (duplicates make ties: both runs must break them alike), one corrupt
    make_pool(tmp_path / "pool", shards=4, per=13, corrupt="020005", seed=3)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(TESTS_DIR), tmp=str(tmp_path), cfg=json.dumps(CFG)))
    outs = [json.loads(out.strip().splitlines()[-1]) for out in run_two_ranks(script)]
    # whole shards per rank: rank 0 has shards 0 and 2 (12 decodable + 13 -> 3 + 4 batches of 4),
    # rank 1 has shards 1 and 3 (4 + 4 batches)
    assert sorted((o["rank"], o["encode_calls"]) for o in outs) == [(0, 7), (1, 8)]

    enc = ProjectionEncoder(8)
    embed_pool(enc, tmp_path / "pool", tmp_path / "emb1", batch_size=4, progress=False)
    one, two = EmbeddingSet(tmp_path / "emb1"), EmbeddingSet(tmp_path / "emb2")
    assert one.index.equals(two.index)
    np.testing.assert_array_equal(one.rows(one.valid_rows), two.rows(two.valid_rows))

    single = cluster_embeddings(tmp_path / "emb1", CFG, tmp_path / "cl1", progress=False)
    double = load_hierarchy(tmp_path / "cl2")
    assert len(single.rows) == 51
    np.testing.assert_array_equal(single.rows, double.rows)
    for a, b in zip(single.levels, double.levels):
        np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-5)
        np.testing.assert_array_equal(a.assignments, b.assignments)
        np.testing.assert_allclose(a.distances, b.distances, atol=1e-5)


_SPLIT_WORKER = """
import json, sys
import numpy as np
import torch.distributed as dist
from pathlib import Path
from distill.curation.hierarchy import load_cluster_config, run_hierarchy
from distill.curation.kmeans import make_engine

tmp = Path({tmp!r})
dist.init_process_group("gloo", init_method="file://" + str(tmp / "rendezvous"), rank=int(sys.argv[1]), world_size=2)
x = np.load(tmp / "x.npy")
run_hierarchy(x, len(x), load_cluster_config(json.loads({cfg!r})), tmp / "two",
              make_engine("torch", "cpu"), progress=False)
dist.destroy_process_group()
"""

SPLIT_CFG = {"engine": "torch", "seed": 0, "fit_points": 1500,
             "levels": [{"k": 30, "n_splits": 6, "niter": 6}, {"k": 5, "niter": 4}]}


@pytest.mark.distributed
def test_split_level_two_ranks_equal_one_process(tmp_path):
    """The split-based level across 2 gloo ranks (coarse sums, per-rank member counts for the seeded
    draws, group sums all-reduced; fit on a subsample, every point assigned) equals one process."""
    from distill.curation.hierarchy import load_cluster_config, run_hierarchy
    from distill.curation.kmeans import make_engine
    from distill.io import load_tensors

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(40, 6))[rng.integers(0, 40, 3001)] * 4 + rng.normal(size=(3001, 6))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "split_worker.py"
    script.write_text(_SPLIT_WORKER.format(tmp=str(tmp_path), cfg=json.dumps(SPLIT_CFG)))
    run_two_ranks(script)
    single = run_hierarchy(x, len(x), load_cluster_config(SPLIT_CFG), tmp_path / "one", make_engine("torch", "cpu"),
                           progress=False)
    for i, a in enumerate(single, 1):
        b = load_tensors(tmp_path / "two" / f"level_{i}" / "clusters.safetensors")
        np.testing.assert_allclose(a.centroids, b["centroids"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(a.assignments, b["assignments"].numpy())
