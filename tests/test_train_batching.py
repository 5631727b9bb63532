"""Token-balanced batching, recipe parsing and the pool index."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.train.batching import TokenBalancedSampler
from distill.train.config import ConfigError, load_config
from distill.student.processor import smart_resize
from distill.train.pool import TrainingPool, build_index, read_image

RECIPES = Path(__file__).resolve().parents[1] / "distill" / "recipes"


def _counts():
    # native-resolution mix: 256 px (256 tokens), 384 px (576), 128x256 (128), 512 px (1024)
    return [256, 576, 128, 1024, 256, 64, 576, 128, 256, 900, 64, 400] * 5


def test_packed_plan_respects_capacity_and_image_limit():
    s = TokenBalancedSampler(_counts(), world_size=2, seed=0, max_tokens=1024, max_images_per_seq=3,
                             seqs_per_rank=2, lookahead=16)
    for _ in range(10):
        plan = s.next_step()
        assert len(plan.ranks) == 2
        for r in range(2):
            assert len(plan.ranks[r]) == 2            # same number of sequences = same token budget
            assert plan.reserved_tokens(r) == 2 * 1024
            for seq, toks in zip(plan.ranks[r], plan.tokens[r]):
                assert 1 <= len(seq) <= 3 and sum(toks) <= 1024
        assert plan.fill_ratio() > 0.5


def test_every_image_is_used_once_per_epoch():
    counts = _counts()
    s = TokenBalancedSampler(counts, world_size=2, seed=3, max_tokens=1024, seqs_per_rank=1, lookahead=8)
    seen = []
    while s.state.epoch == 0:
        plan = s.next_step()
        seen += [i for r in range(2) for i in plan.images(r)]
    pending = s.state.pending
    first_epoch = [i for i in seen if i not in pending]
    # nothing duplicated before the permutation wraps
    assert len(seen) <= len(counts) + len(pending) + 64
    assert len(set(first_epoch)) >= len(counts) - 16


def test_sampler_state_round_trip_reproduces_plans():
    a = TokenBalancedSampler(_counts(), world_size=2, seed=1, max_tokens=1024, seqs_per_rank=2)
    for _ in range(5):
        a.next_step()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_step().ranks for _ in range(8)]   # crosses an epoch boundary too
    b = TokenBalancedSampler(_counts(), world_size=2, seed=1, max_tokens=1024, seqs_per_rank=2)
    b.load_state_dict(state)
    assert [b.next_step().ranks for _ in range(8)] == expected


def test_padded_baseline_has_lower_fill_on_mixed_resolutions():
    counts = _counts()
    packed = TokenBalancedSampler(counts, world_size=1, seed=0, max_tokens=1024, seqs_per_rank=4)
    padded = TokenBalancedSampler(counts, world_size=1, seed=0, mode="padded", images_per_rank=4)
    fp = sum(packed.next_step().fill_ratio() for _ in range(10)) / 10
    plans = [padded.next_step() for _ in range(10)]
    assert all(len(p.ranks[0]) == 4 and all(len(q) == 1 for q in p.ranks[0]) for p in plans)
    fd = sum(p.fill_ratio() for p in plans) / 10
    assert fp > fd


def test_oversized_image_is_a_clear_error():
    with pytest.raises(ValueError, match="raise batching.max_tokens"):
        TokenBalancedSampler([100, 2000], world_size=1, seed=0, max_tokens=1024)


def test_the_pool_plans_sizes_with_the_processor_rule_made_lenient():
    # (H, W) examples from the SigLino fact sheet, default min 128^2 / max 256^2: the same either way
    for strict in (True, False):
        assert smart_resize(64, 96, strict=strict) == (112, 160)
        assert smart_resize(300, 500, strict=strict) == (192, 320)
        assert smart_resize(480, 640, strict=strict) == (208, 288)
        assert smart_resize(1000, 1000, strict=strict) == (256, 256)
        assert smart_resize(200, 136, min_pixels=16 * 16, max_pixels=1024 ** 2, strict=strict) == (192, 128)
    # dirty data the processor refuses, the pool sizes: a sliver, an extreme banner
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        smart_resize(8, 100)
    assert smart_resize(8, 100, strict=False) == (48, 464)
    assert smart_resize(20, 4000, 16, 32 * 32, 64 * 64, strict=False) == (16, 896)


# ----------------------------------------------------------------------------- config
def test_all_recipes_parse():
    names = sorted(p.name for p in RECIPES.glob("*.json"))
    assert {"stage1.json", "stage2.json", "miniworld.json", "miniworld-none.json",
            "miniworld-rkd.json", "miniworld-arkd.json"} <= set(names)
    for n in names:
        load_config(RECIPES / n)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"'lrr'.*optim"):
        load_config(RECIPES / "miniworld.json", {"optim.lrr": 0.1})
    with pytest.raises(ConfigError, match=r"'bogus'.*top level"):
        load_config(RECIPES / "miniworld.json", {"bogus": 1})
    with pytest.raises(ConfigError, match=r"'rel'.*teachers.0"):
        load_config(RECIPES / "miniworld.json", ["teachers.0.rel=rkd"])


def test_overrides_types_and_paths(tmp_path):
    cfg = load_config(RECIPES / "miniworld.json", ["optim.lr=0.5", "teachers.1.relational=rkd",
                                                   f"world={tmp_path}", "teachers=/x/t"])
    assert cfg.optim.lr == 0.5 and cfg.teachers[1].relational == "rkd"
    resolved = cfg.resolve_paths(tmp_path / "out")
    assert resolved.data.sources[0].path.startswith(str(tmp_path))
    assert resolved.teachers[0].spec.startswith("/x/t")
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(RECIPES / "miniworld.json", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="relational must be one of"):
        load_config(RECIPES / "miniworld.json", ["teachers.0.relational=contrastive"])
    with pytest.raises(ConfigError, match="is not set; pass --set"):
        load_config(RECIPES / "miniworld.json").resolve_paths()


# ----------------------------------------------------------------------------- pool index
def _write_shard(path: Path, sizes, corrupt_at=()):
    with tarfile.open(path, "w") as tar:
        for i, (w, h) in enumerate(sizes):
            buf = io.BytesIO()
            if i in corrupt_at:
                buf.write(b"\xff\xd8\xff garbage, not a jpeg")
            else:
                Image.new("RGB", (w, h), (i * 20 % 255, 80, 160)).save(buf, format="JPEG")
            data = buf.getvalue()
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            cap = f"image {i}".encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(cap)
            tar.addfile(info, io.BytesIO(cap))


def test_pool_index_skips_and_counts_corrupt(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "pool-000000.tar", [(64, 48), (100, 200), (30, 30)], corrupt_at=(1,))
    _write_shard(shards / "pool-000001.tar", [(300, 150)])
    index = build_index(shards, tmp_path / "idx")
    assert index.corrupt == 1 and len(index) == 3
    assert (index.entry(0).width, index.entry(0).height) == (64, 48)
    assert read_image(index.entry(2)).size == (300, 150)
    again = build_index(shards, tmp_path / "idx")   # from the memory-mapped files
    assert isinstance(again.entries, np.memmap) and again.corrupt == 1
    assert [again.entry(i) for i in range(3)] == [index.entry(i) for i in range(3)]
    assert build_index(shards).entry(1) == index.entry(1)   # in memory, no index folder

    from distill.train.config import DataSource
    pool = TrainingPool([DataSource(path=str(shards), resolutions=[64, 128], min_resolution=32)],
                        patch_size=16, seed=0)
    assert len(pool) == 3 and pool.corrupt_at_index == 1
    for it in map(pool.item, range(len(pool))):
        h, w = it.size
        assert h % 16 == 0 and w % 16 == 0 and h * w <= it.resolution ** 2
        assert it.tokens == (h // 16) * (w // 16)


def _index_length(shards, folder, queue):
    try:
        queue.put(len(build_index(shards, folder)))
    except Exception as e:   # noqa: BLE001 - reported to the parent
        queue.put(f"{type(e).__name__}: {e}")


def test_processes_indexing_one_folder_at_once_all_get_the_index(tmp_path, monkeypatch):
    """Two teachers' target fills run side by side on one arm folder: each builds the pool index there.
    One builds, the others wait and map its result (before: the first to finish deleted the parts the
    other was still joining). Slowed per shard so that the builds overlap."""
    import multiprocessing
    import time

    import distill.train.pool as pool_mod

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(6):
        _write_shard(shards / f"pool-{i:06d}.tar", [(32, 32), (48, 40)])
    slow = pool_mod._index_shard
    monkeypatch.setattr(pool_mod, "_index_shard", lambda *a: (time.sleep(0.1), slow(*a))[1])
    ctx = multiprocessing.get_context("fork")   # the children inherit the slowed indexing
    queue = ctx.Queue()
    procs = [ctx.Process(target=_index_length, args=(shards, tmp_path / "idx", queue)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert got == [12, 12, 12]
    assert not (tmp_path / "idx" / "parts").exists()


def test_variant_recipes_apply_overrides_to_their_base(tmp_path):
    from distill.train.config import ConfigError, load_config
    base = load_config("miniworld").to_json()
    for kind in ("none", "rkd", "arkd"):
        variant = load_config(f"miniworld-{kind}").to_json()
        assert [t["relational"] for t in variant["teachers"]] == [kind, kind]
        assert variant["name"] == f"miniworld-{kind}"
        same = {k for k in base if k not in ("name", "description", "teachers")}
        assert {k: variant[k] for k in same} == {k: base[k] for k in same}
    loop = tmp_path / "loop.json"
    loop.write_text('{"base": "%s", "overrides": {}}' % loop)
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop)


def test_vectorised_plan_sizes_agree_with_the_scalar_rule_exactly():
    """`plan_sizes` (numpy, for 200M-image pools) gives what `planned_size` (smart_resize + token
    budget) gives for every image: web sizes, tiny sides, banners, both budgets' edges."""
    import numpy as np

    from distill.train.pool import plan_sizes, planned_size

    rng = np.random.default_rng(0)
    h = np.concatenate([rng.integers(1, 5000, 4000), [1, 15, 16, 17, 20, 4000, 128, 136, 200, 256, 255]])
    w = np.concatenate([rng.integers(1, 5000, 4000), [4000, 15, 16, 9, 4000, 20, 128, 200, 136, 256, 257]])
    for res in (256, 512, 768):
        for min_res in (32, 128, 256):
            r = np.full(len(h), res, np.uint16)
            gh, gw = plan_sizes(h, w, r, min_res, 16)
            want = [planned_size(int(a), int(b), res, min_res, 16) for a, b in zip(h, w)]
            assert list(zip(gh.tolist(), gw.tolist())) == want, (res, min_res)
