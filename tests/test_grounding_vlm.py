"""The early-fusion grounding VLM: init from a student, attention rules, decoding, train/eval/resume."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from distill.io import load_tensors
from distill.student import Student
from grounding_vlm.boxes import box_iou
from grounding_vlm.evaluate import greedy_box_tokens
from distill.encoders.student import save_student
from grounding_vlm.init import load_student_source, load_vision_experts
from grounding_vlm.model import GroundingVLM, SampleAttention, VLMConfig, _sorted_mask
from grounding_vlm.tokenizer import GroundingTokenizer, train_tokenizer
from grounding_vlm.train import apply_overrides, load_config, train

TINY_STUDENT = dict(dim=32, n_layers=2, n_heads=2, head_dim=16, n_kv_heads=1, moe_dim=32,
                    moe_args=dict(num_experts=4, top_k=2), teachers_dim=[32, 32])
TINY_REFER_WORLD = {
    "classification": {"shapes": 2, "colours": 2, "image_size": 32, "train_max_per_class": 2,
                       "train_min_per_class": 1, "zipf_alpha": 1.0, "val_per_class": 1, "distractor_prob": 0.0},
    "retrieval": {"images": 2, "image_size": 32, "max_objects": 1},
    "segmentation": {"train": 2, "val": 1, "image_size": 32, "min_objects": 1, "max_objects": 1},
    "refer": {"images": 12, "min_side": 96, "max_side": 128, "min_objects": 3, "max_objects": 4,
              "split_fractions": {"train": 0.5, "val": 0.25, "testA": 0.125, "testB": 0.125}},
    "pool": {"images": 2, "per_shard": 2, "min_side": 64, "max_side": 64, "zipf_alpha": 1.1, "max_objects": 1},
}


def random_student(seed: int = 0, cfg=TINY_STUDENT) -> Student:
    torch.manual_seed(seed)
    st = Student(cfg, attention_backend="sdpa", expert_backend="loop")
    with torch.no_grad():   # move away from the init (zeroed wo/w2) so every weight matters
        for p in st.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return st


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    st = random_student()
    return save_student(st.state_dict(), st.config, tmp_path_factory.mktemp("student") / "export")


@pytest.fixture(scope="module")
def refer_world(tmp_path_factory) -> Path:
    from benchmarks.world import make_world

    out = tmp_path_factory.mktemp("gworld") / "w"
    make_world(out, size=TINY_REFER_WORLD, seed=0, workers=1, progress=False)
    return out


def test_vision_path_reproduces_student_patch_features(student_dir, tmp_path):
    st = random_student()
    imgs = [torch.randn(3, 32, 48), torch.randn(3, 64, 32), torch.randn(3, 16, 16)]
    ref = [o.patch_features["siglino"][0] for o in st.forward_packed(imgs)]
    for spec in ({"kind": "student", "path": str(student_dir)},):
        cfg, sd = load_student_source(spec)
        vlm = GroundingVLM(VLMConfig(vision=cfg, vocab_size=50))
        load_vision_experts(vlm, sd)
        got = vlm.encode_images(imgs).patch_features
        for r, g in zip(ref, got):
            assert (r - g).abs().max().item() <= 1e-5
    # the official .pt route (plain state_dict, loaded with weights_only=True) maps the same way
    torch.save({"model." + k: v for k, v in st.state_dict().items()}, tmp_path / "release.pt")
    cfg, sd = load_student_source({"kind": "official", "path": str(tmp_path / "release.pt"), "config": TINY_STUDENT})
    vlm = GroundingVLM(VLMConfig(vision=cfg, vocab_size=50))
    load_vision_experts(vlm, sd)
    assert (vlm.encode_images(imgs[:1]).patch_features[0] - ref[0]).abs().max().item() <= 1e-5
    # with text in the sequence, image tokens still equal the student (they never see text)
    mixed = vlm(imgs[:2], [[1, 2, 3], [4, 5, 6, 7]]).patch_features
    assert (mixed[1] - ref[1]).abs().max().item() <= 1e-5


def test_mismatched_student_names_the_keys(student_dir):
    other = dict(TINY_STUDENT, dim=48)
    vlm = GroundingVLM(VLMConfig(vision=other, vocab_size=20))
    _, sd = load_student_source({"kind": "student", "path": str(student_dir)})
    with pytest.raises(ValueError, match=r"img_projector.weight: checkpoint \(32, 768\) vs VLM \(48, 768\)"):
        load_vision_experts(vlm, sd)
    del sd["norm.weight"]
    vlm = GroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=20))
    with pytest.raises(ValueError, match="missing keys: \\['norm.weight'\\]"):
        load_vision_experts(vlm, sd)


def test_text_is_causal_and_samples_do_not_leak():
    torch.manual_seed(1)
    vlm = GroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=40))
    with torch.no_grad():
        for p in vlm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    imgs = [torch.randn(3, 32, 32), torch.randn(3, 32, 16)]
    a = vlm(imgs, [[1, 2, 3, 4], [5, 6, 7]])
    b = vlm(imgs, [[1, 2, 3, 9], [5, 6, 8]])                    # change the last tokens only
    assert torch.allclose(a.logits[0][:3], b.logits[0][:3], atol=1e-6)
    assert torch.allclose(a.logits[1][:2], b.logits[1][:2], atol=1e-6)
    assert not torch.allclose(a.logits[0][3], b.logits[0][3])
    c = vlm([imgs[0], torch.randn(3, 32, 16)], [[1, 2, 3, 4], [5, 6, 7]])   # other sample's image changes
    assert torch.allclose(a.logits[0], c.logits[0], atol=1e-5)
    d = vlm([torch.randn(3, 32, 32), imgs[1]], [[1, 2, 3, 4], [5, 6, 7]])   # own image changes
    assert not torch.allclose(a.logits[0], d.logits[0], atol=1e-4)


def test_per_sample_rows_carry_each_samples_own_mask_and_padding_sees_only_the_text_sink():
    img_lens, txt_lens = [5, 3, 7], [4, 0, 2]
    rows = SampleAttention(img_lens, txt_lens, "cpu")
    L = rows.mask.shape[1]
    for j, (a, b) in enumerate(zip(img_lens, txt_lens)):
        n, own = a + b, _sorted_mask([a], [b], "cpu")
        assert torch.equal(rows.mask[j, :n, :n], own[:, :n]) and torch.equal(rows.mask[j, :n, L:], own[:, n:])
        assert not rows.mask[j, n:, :L + 1].any() and rows.mask[j, n:, L + 1].all()
    # row j gathers sample j's image tokens, then its text tokens (which follow every image in the sequence)
    assert rows.idx[0, :9].tolist() == [0, 1, 2, 3, 4, 15, 16, 17, 18] and rows.idx[1, :3].tolist() == [5, 6, 7]
    assert torch.equal(rows.idx[rows.valid][rows.inverse], torch.arange(21))


def test_per_sample_attention_equals_the_dense_mask_forward_and_backward():
    """The default per-sample attention (every sample one row of a padded batch) against one dense mask
    over the whole packed sequence: logits, image states and gradients agree, with samples of unequal
    lengths (padding rows) and one without text."""
    torch.manual_seed(2)
    vlm = GroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=40))
    with torch.no_grad():
        for p in vlm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    imgs = [torch.randn(3, 32, 32), torch.randn(3, 32, 16), torch.randn(3, 32, 32), torch.randn(3, 16, 16)]
    texts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11], []]   # rows of unequal lengths: padding

    def run(mode):
        vlm.attention = mode
        vlm.zero_grad()
        out = vlm(imgs, texts)
        loss = sum(x.square().sum() for x in out.logits) + sum(s.square().mean() for s in out.image_states)
        loss.backward()
        return out, {k: p.grad.clone() for k, p in vlm.named_parameters() if p.grad is not None}

    (a, ga), (b, gb) = run("samples"), run("dense")
    for x, y in zip(a.logits + a.image_states, b.logits + b.image_states):
        assert x.shape == y.shape and (x.numel() == 0 or (x - y).abs().max() <= 1e-5)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert (ga[k] - gb[k]).abs().max() <= 1e-5, k


def test_text_queries_read_where_each_patch_sits():
    """Box positions: a text query reads each image value plus a projection of its patch's box-frame
    position (checked against an explicit softmax); image queries read the plain values, so image
    states do not change; a model saved before box positions existed loads without them."""
    from grounding_vlm.model import _sorted_mask, shared_sink_attention

    torch.manual_seed(3)
    n_i, n_t, H, hd = 5, 3, 2, 4
    q, k, v, dv = (torch.randn(n_i + n_t, H, hd) for _ in range(4))
    dv[n_i:] = 0
    sinks_v, sinks_t = torch.randn(H), torch.randn(H)
    mask = _sorted_mask([n_i], [n_t], "cpu")
    out = shared_sink_attention(q, k, v, sinks_v, sinks_t, n_i, mask, dv).view(n_i + n_t, H, hd)
    scores = torch.einsum("shd,khd->hsk", q, k) / hd ** 0.5
    sink = torch.where(torch.arange(n_i + n_t) < n_i, sinks_v[:, None], sinks_t[:, None])   # (H, S)
    scores = scores.masked_fill(~mask[None, :, : n_i + n_t], -torch.inf)       # each query's own sink is always seen
    p = torch.cat([scores, sink[..., None]], -1).softmax(-1)[..., :-1]
    want_image = torch.einsum("hsk,khd->shd", p[:, :n_i], v)
    want_text = torch.einsum("hsk,khd->shd", p[:, n_i:], v + dv)
    assert torch.allclose(out[:n_i], want_image, atol=1e-5) and torch.allclose(out[n_i:], want_text, atol=1e-5)

    models = {on: GroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=40, box_positions=on)) for on in (True, False)}
    with torch.no_grad():
        for p in models[False].parameters():
            p.add_(torch.randn_like(p) * 0.05)        # zeroed output projections would hide the text side
    missing, unexpected = models[True].load_state_dict(models[False].state_dict(), strict=False)
    assert not unexpected and missing and all(".text.box_position." in m for m in missing)
    imgs, texts = [torch.randn(3, 32, 32)], [[1, 2, 3]]
    a, b = models[True](imgs, texts), models[False](imgs, texts)
    assert torch.equal(a.image_states[0], b.image_states[0])
    assert not torch.allclose(a.logits[0], b.logits[0], atol=1e-4)
    a.logits[0].sum().backward()
    assert models[True].layers["0"].text.box_position.weight.grad.abs().sum() > 0

    from grounding_vlm.train import build_model
    tok = GroundingTokenizer(train_tokenizer(["the red circle", "the blue star on the left"], 60), 8)
    for on in (True, False):                            # the training config's model.box_positions
        cfg = load_config("miniworld-scratch", [f"model.vision={json.dumps(TINY_STUDENT)}",
                                                f"model.box_positions={json.dumps(on)}"])
        assert (build_model(cfg, tok)[0].layers["0"].text.box_position is not None) is on

    old = models[False].config.to_dict()
    del old["box_positions"]
    assert VLMConfig.from_dict(old).box_positions is False
    assert VLMConfig.from_dict(models[True].config.to_dict()).box_positions is True


def test_constrained_decoding_always_gives_four_ordered_location_tokens():
    tok = GroundingTokenizer(train_tokenizer(["red circle left", "blue star", "big green square"] * 10,
                                             vocab_size=80), bins=16)
    torch.manual_seed(2)
    vlm = GroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=tok.vocab_size))
    with torch.no_grad():   # bias the head towards non-location tokens: the constraint must still hold
        vlm.lm_head.weight.normal_(0, 1.0)
        vlm.lm_head.weight[tok.loc_start:] -= 5
    imgs = [torch.randn(3, 32, 32) for _ in range(5)]
    prompts = [tok.encode_prompt(t) for t in ["red circle", "blue", "big green square left", "star", "x"]]
    gen = greedy_box_tokens(vlm, tok, imgs, prompts, ordered=True)
    for g in gen:
        assert len(g) == 4 and all(i in tok.loc_ids() for i in g)
        box = tok.decode_box(g)
        assert box is not None and box[2] >= box[0] and box[3] >= box[1]


def test_kv_cache_decoding_equals_the_uncached_forward():
    """The cached path (image prefix and prompt once, then one text-expert step per token over the
    cached keys) gives the logits of re-running the whole sequence, step after step, for samples of
    different image sizes and prompt lengths (GQA and MoE vision experts included); greedy decoding
    picks the same tokens either way."""
    tok = GroundingTokenizer(train_tokenizer(["red circle left", "blue star", "big green square"] * 10,
                                             vocab_size=80), bins=16)
    torch.manual_seed(3)
    vlm = GroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=tok.vocab_size, max_text_len=24))
    with torch.no_grad():   # away from the init (zeroed text outputs) so every text weight matters
        for p in vlm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    imgs = [torch.randn(3, 32, 32), torch.randn(3, 48, 32), torch.randn(3, 32, 64)]
    prompts = [tok.encode_prompt(t) for t in ["red circle", "big green square left", "x"]]
    out = vlm(imgs, prompts, cache_room=3)
    ids = [list(p) for p in prompts]
    step_tokens = torch.tensor([[tok.loc_start + 1, tok.loc_start + 7, tok.loc_start + 3],
                                [tok.loc_start + 2, tok.loc_start, tok.loc_start + 15],
                                [5, 6, 7]])
    for new in step_tokens:
        cached = vlm.decode_step(out.cache, new)
        ids = [i + [int(t)] for i, t in zip(ids, new)]
        full = torch.stack([lg[-1] for lg in vlm(imgs, ids).logits])
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_text_len"):
        short = GroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=tok.vocab_size,
                                       max_text_len=len(prompts[1])))
        short.decode_step(short(imgs, prompts, cache_room=1).cache, step_tokens[0])
    assert greedy_box_tokens(vlm, tok, imgs, prompts, kv_cache=True) == \
        greedy_box_tokens(vlm, tok, imgs, prompts, kv_cache=False)


def test_decode_perf_command_prints_both_paths():
    """`amoe ground perf` times both decoding paths on the same inputs and says whether they agree."""
    from grounding_vlm.perf import run_decode_perf

    r = run_decode_perf("tiny-moe", expressions=3, batch=2, side=32, words=3, repeats=1)
    assert r["same_tokens"] and r["cached_expressions_per_s"] > 0 and r["uncached_expressions_per_s"] > 0
    assert r["speedup"] == pytest.approx(r["cached_expressions_per_s"] / r["uncached_expressions_per_s"], rel=0.05)


def test_bad_inputs_are_named():
    vlm = GroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=20, max_text_len=4))
    with pytest.raises(ValueError, match="multiple of the patch"):
        vlm([torch.randn(3, 30, 32)], [[1]])
    with pytest.raises(ValueError, match="max_text_len=4"):
        vlm([torch.randn(3, 32, 32)], [[1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="vocab mismatch"):
        vlm([torch.randn(3, 32, 32)], [[25]])
    with pytest.raises(ValueError, match="one text per image"):
        vlm([torch.randn(3, 32, 32)], [[1], [2]])
    cfg = load_config("miniworld-scratch")
    from distill.config import ConfigError
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' .*did you mean 'steps'"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ValueError, match="data.root is not set"):
        train(cfg, "/nonexistent/never-written")
    with pytest.raises(FileNotFoundError, match="not an amoe-student export"):
        load_student_source({"kind": "student", "path": "/nonexistent"})


def _tiny_sets(world: Path, student: Path | None, steps: int) -> list[str]:
    sets = [f"data.root={world / 'refer'}", "data.min_pixels=1024", "data.max_pixels=2304",
            "tokenizer.vocab_size=120", "tokenizer.bins=16", f"train.steps={steps}", "train.batch_size=3",
            "train.log_every=1", "train.checkpoint_every=2", "train.progress=false", "optim.warmup_steps=1"]
    if student is not None:
        sets.append(f"init.path={student}")
    return sets


def test_train_eval_end_to_end_and_leaderboard(refer_world, student_dir, tmp_path):
    from benchmarks.leaderboard import suite_table
    from distill.results import load_results, read_items
    from benchmarks.suites import load_suite
    from grounding_vlm.evaluate import evaluate

    run = tmp_path / "run"
    summary = train("miniworld-student-gram", run, _tiny_sets(refer_world, student_dir, 3))
    assert summary["steps"] == 3 and summary["init"]["copied"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(x["gram_weight"] > 0 for x in lines)
    rec = evaluate(run, "val", limit=5, results_dir=tmp_path / "results", progress=False)
    m = rec["metrics"]
    assert m["n"] == 5 and 0 <= m["acc@0.5"] <= 100 and m["unparsable"] == 0
    lo, hi = rec["intervals"]["metrics"]["acc@0.5"]          # over the 5 expressions
    assert lo <= m["acc@0.5"] <= hi and "n" in rec["intervals"]["missing"]
    ious = [json.loads(x)["iou"] for x in (run / "eval" / "val.jsonl").read_text().splitlines()]
    assert read_items(rec)["mean_iou"].metric() == pytest.approx(100 * sum(ious) / 5, abs=0.01)
    preds = [json.loads(p) for p in (run / "eval" / "val.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and all(len(p["pred"]) == 4 and len(p["pred_1000"]) == 4 for p in preds)
    hits_1000 = sum(box_iou(p["pred_1000"], p["truth_1000"]) >= 0.5 for p in preds)   # both conventions scored
    assert m["acc@0.5_norm1000"] == pytest.approx(100 * hits_1000 / 5)
    assert "pixels" in rec["config"]["boxes"]["scored_in"]
    from amoe.cli import main as amoe_main

    assert amoe_main(["ground", "eval", "--run", str(run), "--split", "testA", "--limit", "2",
                      "--results", str(tmp_path / "results")]) == 0
    table, *_ = suite_table(load_results(tmp_path / "results"), load_suite("miniworld"))
    assert "grounding testA acc@0.5" in table.columns
    assert "grounding val acc@0.5" in table.columns
    assert table.loc[0, "model"] == "grounding-vlm:run"   # named after the run folder, not the config


def test_referring_segmentation_trains_and_is_scored(refer_world, student_dir, tmp_path):
    """mask.weight > 0 adds the mask head and its loss; evaluation then scores the masks against the
    refs' COCO masks (cIoU, mIoU, with intervals) and writes each expression's mask IoU. A run
    without it has no mask head and no mask metrics."""
    from grounding_vlm.evaluate import evaluate

    run = tmp_path / "seg"
    train("miniworld-student", run, _tiny_sets(refer_world, student_dir, 3) + ["mask.weight=1.0"])
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(x["mask"] > 0 for x in logged)
    rec = evaluate(run, "val", limit=5, results_dir=tmp_path / "results", progress=False)
    m = rec["metrics"]
    assert 0 <= m["mask_ciou"] <= 100 and 0 <= m["mask_miou"] <= 100
    assert set(rec["intervals"]["metrics"]) >= {"mask_ciou", "mask_miou"}
    lines = [json.loads(x) for x in (run / "eval" / "val.jsonl").read_text().splitlines()]
    assert m["mask_miou"] == pytest.approx(100 * sum(x["mask_iou"] for x in lines) / 5, abs=0.01)
    plain = tmp_path / "plain"
    train("miniworld-student", plain, _tiny_sets(refer_world, student_dir, 1))
    assert "mask_ciou" not in evaluate(plain, "val", limit=2, results_dir=tmp_path / "r2", progress=False)["metrics"]


def test_frozen_parts_stay_as_they_were(refer_world, student_dir, tmp_path):
    """optim.freeze leaves the named parts untrained: with the vision experts frozen they keep the
    student's weights (router bias included) while the text side learns; an unknown part is named."""
    from grounding_vlm.train import load_run

    run = tmp_path / "frozen"
    train("miniworld-student", run, _tiny_sets(refer_world, student_dir, 2) + ['optim.freeze=["vision"]'])
    model, *_ = load_run(run, "cpu")
    fresh = GroundingVLM(model.config)
    load_vision_experts(fresh, load_student_source({"kind": "student", "path": str(student_dir)})[1])
    trained, init = dict(model.named_parameters()), dict(fresh.named_parameters())
    vision = {n for n, p in model.named_parameters() if any(p is q for q in model.vision_parameters())}
    assert vision and all(torch.equal(trained[n], init[n]) for n in vision)
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            assert torch.equal(buf, dict(fresh.named_buffers())[name]), name
    assert any(not torch.equal(trained[n], init[n]) for n in trained if n not in vision)
    with pytest.raises(ValueError, match="optim.freeze: unknown part"):
        train("miniworld-student", tmp_path / "bad", _tiny_sets(refer_world, student_dir, 1) + ['optim.freeze=["eyes"]'])


def test_mask_head_learns_a_mask_and_the_scores_add_up():
    """The head alone fits one expression's mask from fixed patch states (the loss can be optimised);
    cIoU sums areas over expressions, mIoU averages their IoUs."""
    import numpy as np

    from grounding_vlm.mask import MaskHead, MaskScore, mask_loss, predicted_mask

    torch.manual_seed(0)
    head = MaskHead(16)
    patches, text = torch.randn(4 * 6, 16), torch.randn(16)
    truth = np.zeros((64, 96), dtype=np.uint8)
    truth[16:48, 32:80] = 1
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        mask_loss(head(patches, (4, 6), text), truth).backward()
        opt.step()
    pred = predicted_mask(head(patches, (4, 6), text), 64, 96)
    score = MaskScore()
    assert score.add(pred, truth) > 0.9
    score.add(np.zeros((2, 2), bool), np.array([[1, 0], [0, 0]], np.uint8))    # IoU 0 on 1 pixel
    m = score.metrics()
    r = np.asarray(score.rows)
    assert m["mask_ciou"] == pytest.approx(100 * r[:, 0].sum() / r[:, 1].sum())
    assert m["mask_miou"] == pytest.approx(100 * (r[0, 0] / r[0, 1]) / 2)
    assert score.items()["mask_ciou"].metric() == pytest.approx(m["mask_ciou"])


def test_standin_lm_pretrains_on_pool_captions_in_hub_format(refer_world, tmp_path):
    """The mini-world stand-in LM: a Qwen2ForCausalLM trained on the pool captions only, saved so
    `from_pretrained` loads it offline (model and tokenizer), kept when complete, retrained when the
    settings change; an unknown setting names the nearest one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import ConfigError
    from grounding_vlm.standin_lm import pool_captions, pretrain_standin_lm

    caps = pool_captions(refer_world)
    assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)
    out = tmp_path / "lm"
    log = pretrain_standin_lm(refer_world, out, {"steps": 5, "warmup_steps": 1}, progress=False)
    assert (out / "COMPLETE.json").is_file() and not (tmp_path / ".lm.partial").exists()
    assert len(log["losses"]) == 5 and log["captions"] == {"train": 1, "held_out": 1}
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.vocab_size == len(tok)
    again = pretrain_standin_lm(refer_world, out, {"steps": 5, "warmup_steps": 1}, progress=False)
    assert again["status"] == "skipped (complete)"
    assert len(pretrain_standin_lm(refer_world, out, {"steps": 3, "warmup_steps": 1}, progress=False)["losses"]) == 3
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        pretrain_standin_lm(refer_world, out, {"stepz": 3}, progress=False)


def test_missing_images_are_counted(refer_world, tmp_path):
    from grounding_vlm.data import load_split

    world = tmp_path / "w"
    shutil.copytree(refer_world / "refer", world / "refer")
    full = load_split({"root": str(world / "refer"), "dataset": "refcoco"}, "train")
    victim = Path(full.examples[0].image_path)
    victim.unlink()
    after = load_split({"root": str(world / "refer"), "dataset": "refcoco"}, "train")
    refs_on_image = len({e.ref_id for e in full.examples if e.image_path == str(victim)})
    assert after.missing_images == refs_on_image > 0
    assert after.refs == full.refs and len(after.examples) < len(full.examples)


def test_resume_equals_uninterrupted(refer_world, student_dir, tmp_path):
    sets = _tiny_sets(refer_world, student_dir, 4)
    train("miniworld-student", tmp_path / "a", sets)
    train("miniworld-student", tmp_path / "b", sets, stop_after=2)
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["step"] == 2
    train("miniworld-student", tmp_path / "b", sets)
    a = load_tensors(tmp_path / "a" / "checkpoints" / "step_00000004" / "model.safetensors")
    b = load_tensors(tmp_path / "b" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]  # noqa: E731
    assert strip(la) == strip(lb)


# ---------------------------------------------------------------- results that land where the user's data is

def _user_refer(refer_world: Path, tmp_path: Path) -> Path:
    """The world's refer folder copied out of the world: RefCOCO-layout data that is not a mini-world."""
    shutil.copytree(refer_world / "refer", tmp_path / "mydata" / "refer")
    return tmp_path / "mydata"


def test_grounding_results_are_filed_under_the_users_data_and_named_by_run(refer_world, student_dir, tmp_path,
                                                                              capsys):
    """Reproduced: a built-in config on a user's RefCOCO data filed its results as the mini-world's
    (`mw-refcoco-*`, suite miniworld: a leaderboard row of dashes), and two runs of one config
    overwrote each other's results (both named after the config)."""
    from amoe.cli import main as amoe_main
    from distill.results import load_results
    from grounding_vlm.evaluate import evaluate

    data = _user_refer(refer_world, tmp_path)
    sets = [s.replace(str(refer_world), str(data)) for s in _tiny_sets(refer_world, student_dir, 2)]
    for run in ("run-a", "run-b"):
        train("miniworld-student", tmp_path / run, sets)
        evaluate(tmp_path / run, "val", limit=3, results_dir=tmp_path / "results", progress=False)
    recs = load_results(tmp_path / "results")
    assert sorted(r["cell"]["model"] for r in recs) == ["grounding-vlm:run-a", "grounding-vlm:run-b"]
    assert {(r["config"]["suite"], r["cell"]["dataset"]) for r in recs} == {("paper", "refcoco-val")}
    assert all(r["cell"]["limit"] == 3 for r in recs)
    # --suite / --dataset-id file it elsewhere; an id without {split} for several splits is refused
    assert amoe_main(["ground", "eval", "--run", str(tmp_path / "run-a"), "--split", "val", "--limit", "2",
                      "--results", str(tmp_path / "own"), "--suite", "mine", "--dataset-id", "lab-{split}"]) == 0
    (own,) = load_results(tmp_path / "own")
    assert (own["config"]["suite"], own["cell"]["dataset"]) == ("mine", "lab-val")
    capsys.readouterr()
    assert amoe_main(["ground", "eval", "--run", str(tmp_path / "run-a"), "--split", "all",
                      "--dataset-id", "lab"]) == 2
    assert "put {split} in it" in capsys.readouterr().err


def test_mini_world_grounding_results_keep_the_mini_world_ids(refer_world, student_dir, tmp_path):
    from grounding_vlm.evaluate import result_identity

    cfg = load_config("miniworld-student", [f"data.root={refer_world / 'refer'}"])
    assert result_identity(cfg, "testA") == ("miniworld", "mw-refcoco-testA")
    assert result_identity(cfg, "val", suite="paper", dataset_id="x-{split}") == ("paper", "x-val")


def test_expressions_too_long_are_found_before_training(refer_world, student_dir, tmp_path):
    """Reproduced: an expression longer than max_text_len stopped the run mid-training, minutes in."""
    from grounding_vlm.data import ExpressionTooLongError

    sets = _tiny_sets(refer_world, student_dir, 2) + ["model.max_text_len=6"]
    with pytest.raises(ExpressionTooLongError, match=r"refcoco train: \d+ expression\(s\) need more than "
                                                     r"max_text_len=6 .* --set model.max_text_len=\d+"):
        train("miniworld-student", tmp_path / "run", sets)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_images_are_a_note_in_the_leaderboard(refer_world, student_dir, tmp_path):
    """Reproduced: refs whose images are missing were skipped and counted in the result JSON, but
    nothing in the leaderboard said so."""
    from benchmarks.leaderboard import build
    from grounding_vlm.data import load_split
    from grounding_vlm.evaluate import evaluate

    data = _user_refer(refer_world, tmp_path)
    sets = [s.replace(str(refer_world), str(data)) for s in _tiny_sets(refer_world, student_dir, 2)]
    train("miniworld-student", tmp_path / "run", sets)
    val = load_split({"root": str(data / "refer"), "dataset": "refcoco"}, "val")
    Path(val.examples[0].image_path).unlink()
    evaluate(tmp_path / "run", "val", results_dir=tmp_path / "results", progress=False)
    build(tmp_path / "results", tmp_path / "lb", reported_csv=None)
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "## Notes" in md and "refs skipped because their image files are missing" in md


def test_a_ref_with_an_unknown_annotation_is_refused_at_load(refer_world, tmp_path):
    """Reproduced: a ref naming an ann_id absent from instances.json failed only at ds[i]."""
    import pickle

    from distill.data import AnnotationError, load_dataset

    data = _user_refer(refer_world, tmp_path) / "refer"
    refs_file = data / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_file.read_bytes())
    victim = next(r for r in refs if r["split"] == "val")
    victim["ann_id"] = 987654
    refs_file.write_bytes(pickle.dumps(refs))
    with pytest.raises(AnnotationError, match=rf"refs\(unc\)\.p: ref_id {victim['ref_id']}: ann_id 987654 is not "
                                              r"in instances\.json"):
        load_dataset("refcoco", data, "val")


def test_a_diverging_grounding_run_stops_and_never_saves_nan_weights(refer_world, student_dir, tmp_path):
    """Reproduced: the grounding trainer had no guard: exit 0, loss NaN, half a million non-finite
    weights in the checkpoint."""
    from distill.train.guard import TrainingAborted

    sets = _tiny_sets(refer_world, student_dir, 8) + ["optim.lr=1e9", "optim.vision_lr=1e9", "optim.grad_clip=0",
                                                       "optim.warmup_steps=0", "robustness.max_skipped_in_a_row=2"]
    with pytest.raises(TrainingAborted, match="2 skipped steps in a row"):
        train("miniworld-student", tmp_path / "run", sets)
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["step_skipped"] * 2
    for folder in (tmp_path / "run" / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(v).all() for v in load_tensors(folder / "model.safetensors").values())


def test_an_image_that_does_not_decode_is_skipped_counted_and_noted(refer_world, student_dir, tmp_path):
    """Before: one truncated refer image stopped grounding training and evaluation (an `OSError` from
    PIL in the image cache). Now its expressions are left out and counted, in training and evaluation,
    and the leaderboard says so."""
    from benchmarks.leaderboard import build
    from distill.results import load_results
    from grounding_vlm.data import load_split
    from grounding_vlm.evaluate import evaluate

    data = _user_refer(refer_world, tmp_path)
    root = data / "refer"
    train_split = load_split({"root": str(root), "dataset": "refcoco"}, "train")
    val = load_split({"root": str(root), "dataset": "refcoco"}, "val")
    for victim in (train_split.examples[0].image_path, val.examples[0].image_path):
        Path(victim).write_bytes(Path(victim).read_bytes()[:200])
    sets = [s.replace(str(refer_world), str(data)) for s in _tiny_sets(refer_world, student_dir, 4)]
    summary = train("miniworld-student", tmp_path / "run", sets)
    assert summary["steps"] == 4 and summary["last"]["count/unreadable_images"] >= 1
    assert summary["train"]["unreadable_images"] == [os.path.relpath(train_split.examples[0].image_path, root)]
    evaluate(tmp_path / "run", "val", results_dir=tmp_path / "results", progress=False)
    (rec,) = load_results(tmp_path / "results")
    lost = sum(e.image_path == val.examples[0].image_path for e in val.examples)
    assert rec["status"] == "ok" and rec["dataset"]["evaluated"] == len(val.examples) - lost
    assert rec["dataset"]["unreadable_images"] == [os.path.relpath(val.examples[0].image_path, root)]
    build(tmp_path / "results", tmp_path / "lb", reported_csv=None)
    assert "1 image(s) that do not decode were left out" in (tmp_path / "lb" / "leaderboard.md").read_text()


# ----------------------------------------------------------------------------- text experts from a causal LM
def _tiny_lm(family: str, tie: bool, vocab: int = 60, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("family,tie", [("qwen2", True), ("llama", False)])
def test_lm_text_experts_keep_the_lm_the_student_and_the_cache(family, tie):
    """Text experts from a causal LM: on text alone the converted model gives the LM's own logits; image
    states stay the student's; the KV cache equals the uncached forward; gradient checkpointing gives
    the same gradients; the bridge, the new tokens, the LM and the vision experts all learn."""
    from grounding_vlm.lm import LMGroundingVLM

    lm = _tiny_lm(family, tie)
    st = random_student().eval()
    vlm = LMGroundingVLM(VLMConfig(vision=st.config, vocab_size=70, text="lm", lm=lm.config.to_dict(), lm_vocab=60,
                                   max_text_len=20), lm).eval()
    load_vision_experts(vlm, st.state_dict())
    ids = torch.randint(0, 60, (2, 7))
    assert (vlm.text_only_logits(ids)[..., :60] - lm(input_ids=ids).logits).abs().max().item() <= 1e-5
    imgs = [torch.randn(3, 32, 48), torch.randn(3, 64, 32)]
    texts = [[1, 2, 3, 61], [4, 5, 66, 7, 8]]
    out = vlm(imgs, texts, cache_room=3)
    ref = [o.patch_features["siglino"][0] for o in st.forward_packed(imgs)]
    assert max((r - g).abs().max().item() for r, g in zip(ref, out.patch_features)) <= 1e-5
    for step in range(3):                              # decode three tokens through the cache
        nxt = torch.tensor([62 + step, 10 + step])
        cached = vlm.decode_step(out.cache, nxt)
        texts = [t + [int(n)] for t, n in zip(texts, nxt)]
        full = vlm(imgs, texts).logits
        assert max((cached[b] - full[b][-1]).abs().max().item() for b in range(2)) <= 1e-5
    # the text depends on the image once the bridge's values are not zero (they start at zero)
    with torch.no_grad():
        for b in vlm.text.bridges:
            b.v.weight.normal_(std=0.1)
    swapped = vlm([imgs[1], imgs[0]], texts).logits
    assert (swapped[0] - vlm(imgs, texts).logits[0]).abs().max().item() > 1e-3
    vlm.train()
    grads = []
    for checkpointed in (False, True):
        vlm.zero_grad()
        vlm.text.gradient_checkpointing = checkpointed
        sum(lg.square().mean() for lg in vlm(imgs, texts).logits).backward()
        grads.append({n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-5
    parts = vlm.parameter_parts()
    learning = {parts[n] for n, g in grads[0].items() if g.abs().sum() > 0}
    assert learning == {"vision", "text", "bridge", "new_tokens"}


def test_lm_route_bad_inputs_are_named(tmp_path):
    from transformers import GPT2Config

    from grounding_vlm.lm import LMGroundingVLM, LMRouteError, check_supported

    with pytest.raises(LMRouteError, match="GPT2.*supported families: LlamaForCausalLM, MistralForCausalLM, "
                                           "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        check_supported(GPT2Config(architectures=["GPT2LMHeadModel"]))
    lm = _tiny_lm("qwen2", True)
    with pytest.raises(LMRouteError, match="tokenizer holds 80 tokens but the LM's embedding has 60 rows"):
        LMGroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=90, text="lm", lm=lm.config.to_dict(),
                                 lm_vocab=80), lm)
    with pytest.raises(LMRouteError, match="max_text_len=64 exceeds the LM's max_position_embeddings=32"):
        LMGroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=70, text="lm", lm=lm.config.to_dict(),
                                 lm_vocab=60, max_text_len=64), lm)


def test_location_tokens_start_from_the_lm_embeddings_of_their_numbers():
    """A location token starts at the mean LM embedding of its bin centre on the 0-1000 scale, as the
    LM's tokenizer spells it; where it cannot, and for the added specials, at the mean embedding."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from grounding_vlm.lm import LMGroundingVLM, new_token_spellings

    words = ["<unk>", "<pad>", "<bos>", "<eos>", "<sep>", *"0123456"]            # digits 7, 8, 9 missing
    vocab = {w: i for i, w in enumerate(words)}

    def fast():
        raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")        # one token per character
        return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>",
                                       bos_token="<bos>", eos_token="<eos>", sep_token="<sep>")

    base, tok = fast(), GroundingTokenizer(fast(), bins=4)        # bin centres 125, 375, 625, 875
    assert len(base) == 12 and tok.vocab_size == 16
    spell, centres = new_token_spellings(tok, base)
    d = {c: vocab[c] for c in "0123456"}
    assert spell == [[d["1"], d["2"], d["5"]], None, [d["6"], d["2"], d["5"]], None]
    assert centres == [0.125, 0.375, 0.625, 0.875]
    lm = _tiny_lm("qwen2", True, vocab=12)
    vlm = LMGroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=16, text="lm", lm=lm.config.to_dict(),
                                   lm_vocab=12, max_text_len=16), lm)
    vlm.text.init_new_tokens(spell, centres, torch.Generator().manual_seed(0))
    emb, new = lm.model.embed_tokens.weight.detach(), vlm.text.new_embed.weight.detach()
    noise = 0.1 * emb.std().item()
    assert (new[0] - emb[spell[0]].mean(0)).abs().max().item() < noise
    assert (new[0] - new[2]).abs().max().item() > noise                        # different numbers differ
    # unspellable bins: the mean embedding plus an ordinal code of the embeddings' spread, one per bin
    codes = new[[1, 3]] - emb.mean(0)
    assert codes.norm(dim=1).min().item() > 3 * noise and (codes[0] - codes[1]).norm().item() > 3 * noise
    plain = LMGroundingVLM(VLMConfig(vision=TINY_STUDENT, vocab_size=16, text="lm", lm=lm.config.to_dict(),
                                     lm_vocab=12, max_text_len=16), lm)
    plain.text.init_new_tokens(spell, None, torch.Generator().manual_seed(0))       # no centres: no code
    assert (plain.text.new_embed.weight[1] - emb.mean(0)).abs().max().item() < noise


@pytest.fixture(scope="module")
def standin_lm(refer_world, tmp_path_factory) -> Path:
    from grounding_vlm.standin_lm import pretrain_standin_lm

    out = tmp_path_factory.mktemp("standin") / "lm"
    pretrain_standin_lm(refer_world, out, {"steps": 5, "warmup_steps": 1}, progress=False)
    return out


def test_lm_route_trains_evaluates_and_resumes(refer_world, student_dir, standin_lm, tmp_path):
    """`lm.path` puts the stand-in LM's weights and tokenizer in as the text experts: a short run trains
    with its own rates for the bridge and the new tokens, freezes what it is told to, scores boxes and
    masks, resumes to the uninterrupted weights, and its run folder loads back without the LM."""
    from grounding_vlm.evaluate import evaluate
    from grounding_vlm.train import load_run
    from transformers import AutoModelForCausalLM

    sets = _tiny_sets(refer_world, student_dir, 4) + [f"lm.path={standin_lm}", "optim.bridge_lr=3e-3",
                                                      "optim.new_token_lr=2e-3", "mask.weight=1",
                                                      "optim.freeze=[\"text\"]", "lm.gradient_checkpointing=true"]
    summary = train("miniworld-student", tmp_path / "run", sets)
    assert summary["init"]["lm"]["class"] == "Qwen2ForCausalLM" and summary["init"]["lm"]["new_tokens"] == 16
    model, tok, cfg, _ = load_run(tmp_path / "run")
    assert type(model).__name__ == "LMGroundingVLM" and tok.vocab_size == model.config.vocab_size
    lm = AutoModelForCausalLM.from_pretrained(standin_lm)
    assert torch.equal(model.text.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)  # frozen
    assert not torch.equal(model.text.bridges[0].v.weight, torch.zeros_like(model.text.bridges[0].v.weight))
    rec = evaluate(tmp_path / "run", "val", limit=4, results_dir=tmp_path / "results", progress=False)
    assert rec["metrics"]["n"] == 4 and "mask_ciou" in rec["metrics"]
    # killed after 2 steps and resumed: the same weights as the uninterrupted run
    train("miniworld-student", tmp_path / "again", sets, stop_after=2)
    train("miniworld-student", tmp_path / "again", sets)
    resumed, *_ = load_run(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(ValueError, match="uses the LM's own tokenizer; drop tokenizer.path"):
        train("miniworld-student", tmp_path / "bad", sets + [f"tokenizer.path={standin_lm}"])


def test_grounding_memory_plan_counts_parts_and_recomputation(student_dir, standin_lm):
    """`amoe ground plan`: weights, gradients and AdamW state per part from the real model (frozen parts
    hold weights only); activations from probes at one and two layers per side, which add up to what
    the whole model saves; recomputing layers keeps less."""
    from distill.train.memory_plan import count_saved_bytes
    from grounding_vlm.plan import plan_grounding
    from grounding_vlm.train import build_model

    sets = [f"lm.path={standin_lm}", f"init.path={student_dir}", "data.max_pixels=4096", "model.max_text_len=24",
            "train.batch_size=3"]
    plan = plan_grounding(load_config("miniworld-student-lm", sets))
    parts = plan["parts"]
    assert set(parts) == {"vision", "text", "bridge", "new_tokens"}
    assert plan["device_bytes"]["weights"] == 4 * plan["params"]
    assert plan["device_bytes"]["optimizer_adamw"] == 8 * plan["params"]
    cfg = load_config("miniworld-student-lm", sets)
    tok = GroundingTokenizer(__import__("grounding_vlm.lm", fromlist=["x"]).lm_tokenizer(str(standin_lm)), 64)
    model = build_model(cfg, tok)[0].train()
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    # the probes' per-layer bytes, scaled to the real depth, equal what the whole model saves on one sample
    side = plan["activations"]["probe"]["image_side"]
    ids = [[int(i) for i in torch.randint(0, tok.vocab_size - 64, (24,))]]

    def run(_):
        model([torch.randn(3, side, side)], ids).logits[0].float().logsumexp(-1).sum().backward()
    whole = count_saved_bytes(run, exclude=list(model.parameters()))
    assert plan["activations"]["per_sample_without_checkpointing"] == pytest.approx(whole, rel=0.05)
    assert plan["device_bytes"]["activations"] == 3 * plan["activations"]["per_sample_bytes"]
    frozen = plan_grounding(load_config("miniworld-student-lm", sets + ['optim.freeze=["vision"]',
                                                                        "lm.gradient_checkpointing=true",
                                                                        "train.activation_checkpointing=true"]))
    assert frozen["device_bytes"]["grads"] == plan["device_bytes"]["grads"] - 4 * parts["vision"]["params"]
    assert frozen["activations"]["per_sample_bytes"] < plan["activations"]["per_sample_bytes"]
    sharded = plan_grounding(load_config("miniworld-student-lm", sets + ["train.parallel=fsdp"]), world_size=4,
                             measure_activations=False)
    assert sharded["parallel"] == "fsdp" and sharded["device_bytes"]["weights"] == plan["device_bytes"]["weights"] // 4
    assert sharded["device_bytes"]["fsdp_blocks_in_flight"] > 0 and "ddp_buckets" not in sharded["device_bytes"]


def test_constant_box_baseline_scores_the_mean_training_box_on_the_same_items(refer_world, student_dir, tmp_path):
    from benchmarks.compare import same_items
    from grounding_vlm.baseline import evaluate_constant_box, mean_box
    from grounding_vlm.data import load_split
    from grounding_vlm.evaluate import evaluate

    cfg = load_config("miniworld-student", [f"data.root={refer_world / 'refer'}"])
    train_ex = load_split(cfg["data"], "train").examples
    box = mean_box(train_ex)
    assert box[0] == pytest.approx(sum(x.box_xyxy[0] / x.width for x in train_ex) / len(train_ex))
    rec = evaluate_constant_box(cfg, "val", tmp_path / "results")
    val = load_split(cfg["data"], "val").examples
    hits = [box_iou([box[0] * x.width, box[1] * x.height, box[2] * x.width, box[3] * x.height], x.box_xyxy) >= 0.5
            for x in val]
    assert rec["metrics"]["acc@0.5"] == pytest.approx(100 * sum(hits) / len(val)) and rec["metrics"]["n"] == len(val)
    assert "acc@0.5" in rec["intervals"]["metrics"]
    run = tmp_path / "run"
    train("miniworld-student", run, _tiny_sets(refer_world, student_dir, 1))
    same_items(rec, evaluate(run, "val", results_dir=tmp_path / "results", progress=False))   # pairs item by item


def test_image_cache_keeps_images_within_its_byte_budget(refer_world):
    from grounding_vlm.data import ImageCache, load_split, processor_from

    cfg = load_config("miniworld-student", [f"data.root={refer_world / 'refer'}"])
    paths = sorted({e.image_path for e in load_split(cfg["data"], "train").examples})[:3]
    unbounded = ImageCache(processor_from(cfg["data"], 16))
    sizes = [unbounded.get(p).nbytes for p in paths]
    cache = ImageCache(processor_from(cfg["data"], 16), capacity_bytes=sizes[1] + sizes[2])
    for p in paths:
        cache.get(p)
    assert cache.keys() == paths[1:]        # the least recently used image went first
    assert cache.nbytes == sum(cache.lookup(p).nbytes for p in paths[1:])


def test_activation_checkpointing_trains_the_same_weights(refer_world, student_dir, tmp_path):
    from grounding_vlm.train import load_run

    sets = _tiny_sets(refer_world, student_dir, 2)
    train("miniworld-student", tmp_path / "kept", sets)
    train("miniworld-student", tmp_path / "recomputed", sets + ["train.activation_checkpointing=true"])
    a, b = (load_run(tmp_path / name)[0].state_dict() for name in ("kept", "recomputed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _grounding_worker(rank: int, port: int, config: str, out: str, sets: list[str]) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    train(config, out, sets)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_weights_of_one(refer_world, student_dir, standin_lm, tmp_path, parallel):
    """The LM route under two gloo processes (DDP, or FSDP2 sharding every vision block and LM layer)
    trains what one process does with the same global batch, and its checkpoint loads back whole."""
    import socket

    import torch.multiprocessing as mp

    from grounding_vlm.train import load_run

    base = [s for s in _tiny_sets(refer_world, student_dir, 2) if not s.startswith("train.batch_size")]
    base += [f"lm.path={standin_lm}", "train.device=cpu"]
    train("miniworld-student-lm", tmp_path / "one", base + ["train.batch_size=4"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_grounding_worker, args=(port, "miniworld-student-lm", str(tmp_path / "two"),
                                                base + ["train.batch_size=2", f"train.parallel={parallel}"]),
                       nprocs=2, join=True, start_method="spawn")
    one, two = (load_run(tmp_path / name)[0].state_dict() for name in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:   # Adam turns round-off-sized gradients into lr-sized steps: agree to a fraction of lr
        assert torch.allclose(one[k], two[k], atol=2e-4), k
    m1, m2 = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two"))
    assert [r["ce"] for r in m2] == pytest.approx([r["ce"] for r in m1], rel=1e-4)


def test_decode_perf_runs_the_lm_route_and_times_training_steps(standin_lm):
    from grounding_vlm.perf import run_decode_perf

    r = run_decode_perf("tiny-moe", expressions=3, batch=2, side=32, words=3, repeats=1, lm=str(standin_lm),
                        train_steps=2, train_batch=2)
    assert r["text"] == "lm" and r["same_tokens"] and r["train_step_ms"]["steps"] == 2
    assert r["train_step_ms"]["median_ms"] > 0


def test_a_finished_ablation_arm_is_kept_and_one_of_another_config_refused(tmp_path):
    from distill.io import portable
    from grounding_vlm.ablation import ARM_FILE, AblationConfigMismatch, arm_finished, arm_name

    assert arm_name("miniworld-student", 0) == "miniworld-student"
    run = tmp_path / arm_name("miniworld-student", 2)
    assert run.name == "miniworld-student-seed2"
    cfg = load_config("miniworld-student", [f"data.root={tmp_path / 'refer'}", "init.path=../student",
                                            "train.seed=2"])
    run.mkdir()
    assert arm_finished(run, cfg) is None                     # not finished: train it
    (run / "config.json").write_text(json.dumps(portable(cfg, run)))
    (run / ARM_FILE).write_text(json.dumps({"acc@0.5": {"val": 3.0}}))
    assert arm_finished(run, load_config(cfg, ["train.progress=false"])) == {"val": 3.0}   # reporting may differ
    with pytest.raises(AblationConfigMismatch, match=r"\(optim\.lr, train\.seed differ\)"):
        arm_finished(run, load_config(cfg, ["train.seed=1", "optim.lr=0.01"]))
