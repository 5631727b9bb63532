"""True sequence packing: planner, per-image equivalence (forward and backward), sink attention backends."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from distill.student import Student, plan_packing
from distill.student.attention import AttentionMask, reference_sink_attention, sink_attention

ATOL = 1e-5


def load_golden_model(conformance, name) -> Student:
    meta = json.loads((conformance / f"{name}.json").read_text())
    t = load_file(str(conformance / f"{name}.safetensors"))
    model = Student(meta["SigLinoArgs"])
    model.load_state_dict({k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")})
    return model


# ----------------------------------------------------------------------------- planner
def test_plan_first_fit_decreasing():
    plan = plan_packing([5, 30, 20, 10, 40, 25], max_tokens=50, max_images=16)
    assert sorted(i for s in plan.sequences for i in s) == list(range(6))
    assert all(t <= 50 for t in plan.sequence_tokens)
    # FFD: 40+10, 30+20, 25+5
    assert plan.sequences == [[4, 3], [1, 2], [5, 0]]
    assert plan.fill_ratio == pytest.approx(130 / 150)
    assert plan.to_dict()["num_sequences"] == 3


def test_plan_respects_max_images():
    plan = plan_packing([1] * 10, max_tokens=100, max_images=4)
    assert [len(s) for s in plan.sequences] == [4, 4, 2]
    assert plan.fill_ratio == pytest.approx(10 / 300)


def test_plan_rejects_oversized_image():
    with pytest.raises(ValueError, match=r"image 1 needs 70 tokens, more than max_tokens=64"):
        plan_packing([10, 70], max_tokens=64)
    with pytest.raises(ValueError, match="at least one"):
        plan_packing([], max_tokens=64)


def test_plan_is_no_worse_than_one_image_per_sequence():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(5, 300, (200,), generator=g).tolist()
    plan = plan_packing(counts, 1024, 16)
    assert plan.num_sequences <= -(-sum(counts) // 1024) * 11 // 9 + 2  # FFD bound, loose form
    assert plan.fill_ratio > 0.8


# ----------------------------------------------------------------------------- equivalence
def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 96), (32, 32), (48, 16), (16, 16), (96, 64), (32, 80)]
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def _alone(model, img):
    vecs, grid = model._patchify_chw(img, 0)
    return model(vecs[None], None, torch.tensor([grid]))


def _loss(out):
    return (out.summary_features["siglip2"].square().sum() + out.summary_features["dinov3"].sum()
            + out.patch_features["dinov3"].square().sum() + out.patch_features["siglip2"].mean()
            + out.register_features["dinov3"].sum() + out.patch_features["siglino"].square().mean())


@pytest.mark.parametrize("backend", ["sdpa", "segments"])
@pytest.mark.parametrize("name", ["tiny-moe", "tiny-moe-alt", "tiny-dense"])
def test_packed_equals_each_image_alone(conformance, name, backend):
    model = load_golden_model(conformance, name)
    imgs = _images()
    outs = model.forward_packed(imgs, max_tokens=64, max_images_per_seq=16, attention_backend=backend)
    plan = outs[0].extras["plan"]
    assert plan.num_sequences < len(imgs)  # several images really share a sequence
    assert any(len(s) >= 2 for s in plan.sequences)
    _loss_total = sum(_loss(o) for o in outs)
    _loss_total.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone_total = 0
    for img, out in zip(imgs, outs):
        ref = _alone(model, img)
        for group in ("patch_features", "summary_features", "register_features"):
            for head, want in getattr(ref, group).items():
                got = getattr(out, group)[head]
                assert got.shape == want.shape, (group, head)
                if want.numel():
                    assert (got - want).abs().max() <= ATOL, (name, group, head)
        alone_total = alone_total + _loss(ref)
    alone_total.backward()
    assert set(packed_grads) == {k for k, p in model.named_parameters() if p.grad is not None}
    for k, p in model.named_parameters():
        if p.grad is None:
            continue
        scale = 1.0 + p.grad.abs().max().item()
        assert (packed_grads[k] - p.grad).abs().max().item() <= ATOL * scale, k


def test_packed_input_order_and_grids(conformance):
    model = load_golden_model(conformance, "tiny-moe")
    imgs = _images(1)
    with torch.no_grad():
        outs = model.forward_packed(imgs, max_tokens=48)
    for img, out in zip(imgs, outs):
        hp, wp = img.shape[1] // 16, img.shape[2] // 16
        assert out.spatial_shapes.tolist() == [[hp, wp]]
        assert out.patch_features["siglino"].shape == (1, hp * wp, 64)
        feats = out.to_features()
        assert feats.grids == [(hp, wp)] and feats.registers.shape == (1, 4, 64)


def test_packing_with_a_given_plan(conformance):
    model = load_golden_model(conformance, "tiny-dense")
    imgs = _images(2)
    counts = [5 + (i.shape[1] // 16) * (i.shape[2] // 16) for i in imgs]
    plan = plan_packing(counts, 40, 2)
    with torch.no_grad():
        a = model.forward_packed(imgs, plan=plan)
        b = model.forward_packed(imgs, max_tokens=1000)
    for x, y in zip(a, b):
        assert (x.summary_features["siglip2"] - y.summary_features["siglip2"]).abs().max() <= ATOL
    bad = plan_packing(counts[:-1], 40, 2)
    with pytest.raises(ValueError, match="does not cover every image"):
        model.forward_packed(imgs, plan=bad)


# ----------------------------------------------------------------------------- attention backends
def _random_qkv(B=2, H=3, S=11, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, hd, generator=g) for _ in range(3))
    sinks = torch.randn(H, generator=g) * 2
    seg = torch.tensor([[0] * 4 + [1] * 5 + [-1] * 2, [0] * 11])
    return q, k, v, sinks, seg


def test_sdpa_sink_key_equals_lse_formula():
    """The extra-key form used with SDPA equals out * sigmoid(LSE - sink) computed explicitly, including
    fully masked (padding) queries -> 0, and gradients agree."""
    q, k, v, sinks, seg = _random_qkv()
    for t in (q, k, v, sinks):
        t.requires_grad_(True)
    got = sink_attention(q, k, v, sinks, AttentionMask(seg, "sdpa"))
    want, lse = reference_sink_attention(q, k, v, sinks, seg)
    assert (got - want).abs().max() <= 1e-6
    assert torch.isinf(lse[0, :, -2:]).all() and got[0, :, -2:].abs().max() == 0
    g1 = torch.autograd.grad(got.square().sum(), (q, k, v, sinks))
    g2 = torch.autograd.grad(want.square().sum(), (q, k, v, sinks))
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-5
    # the sink really matters: without it the result differs
    assert (sink_attention(q, k, v, sinks + 5.0, AttentionMask(seg, "sdpa")) - got).abs().max() > 1e-2


def test_segments_equal_the_dense_reference_forward_and_backward():
    """Per-segment SDPA (grouped by length, scattered back) against the dense-mask reference: equal
    lengths share a call, padding outputs 0, gradients agree; it computes only sum(n_i^2) scores."""
    g = torch.Generator().manual_seed(5)
    B, H, S, hd = 3, 4, 24, 8
    q, k, v = (torch.randn(B, H, S, hd, generator=g, requires_grad=True) for _ in range(3))
    sinks = torch.randn(H, generator=g, requires_grad=True)
    seg = torch.tensor([[0] * 7 + [1] * 7 + [2] * 5 + [-1] * 5,
                        [0] * 24,
                        [0] * 5 + [1] * 7 + [-1] * 12])
    dense, segments = AttentionMask(seg, "sdpa"), AttentionMask(seg, "segments")
    want = sink_attention(q, k, v, sinks, dense)
    got = sink_attention(q, k, v, sinks, segments)
    assert (got - want).abs().max() <= 1e-5 and got[0, :, -5:].abs().max() == 0
    g1 = torch.autograd.grad((got * want.detach()).sum(), (q, k, v, sinks))
    g2 = torch.autograd.grad((want * want.detach()).sum(), (q, k, v, sinks))
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-5
    groups, _, n_pad = segments.segment_groups()
    assert [tuple(x.shape) for x in groups] == [(2, 5), (3, 7), (1, 24)] and n_pad == 17
    assert segments.attention_scores() == {"needed": 2 * 25 + 3 * 49 + 576, "segments": 2 * 25 + 3 * 49 + 576,
                                           "dense": 3 * 24 * 24}


def test_flex_matches_sdpa_forward_cpu():
    """flex_attention runs eagerly on CPU for inference only (no CPU backward); compare the forward."""
    q, k, v, sinks, seg = _random_qkv(S=20, seed=3)
    seg = torch.tensor([[0] * 7 + [1] * 10 + [-1] * 3, [0] * 20])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = sink_attention(q, k, v, sinks, AttentionMask(seg, "flex"))
    sdpa = sink_attention(q, k, v, sinks, AttentionMask(seg, "sdpa"))
    assert (flex - sdpa).abs().max() <= 1e-5


def test_model_flex_vs_sdpa_packed(conformance):
    model = load_golden_model(conformance, "tiny-moe")
    imgs = _images(3)[:4]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = model.forward_packed(imgs, max_tokens=64, attention_backend="flex")
        b = model.forward_packed(imgs, max_tokens=64, attention_backend="sdpa")
    for x, y in zip(a, b):
        for head in ("siglino", "siglip2", "dinov3"):
            assert (x.patch_features[head] - y.patch_features[head]).abs().max() <= ATOL
            assert (x.summary_features[head] - y.summary_features[head]).abs().max() <= ATOL


def test_auto_backend_choice():
    from distill.student.attention import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "segments"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="unknown attention_backend"):
        resolve_backend("xformers", torch.device("cpu"))


def test_bf16_packed_close_to_fp32(conformance):
    """bf16 fast path (as run on GPU) against the fp32 reference: same routing-insensitive summary."""
    model = load_golden_model(conformance, "tiny-dense")
    imgs = _images(4)[:3]
    with torch.no_grad():
        ref = model.forward_packed(imgs, max_tokens=64)
        model.to(torch.bfloat16)
        low = model.forward_packed([i.bfloat16() for i in imgs], max_tokens=64)
    for r, l in zip(ref, low):
        got = l.summary_features["siglip2"]
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        cos = torch.nn.functional.cosine_similarity(got.float(), r.summary_features["siglip2"], dim=-1)
        assert cos.min() > 0.99
        cos = torch.nn.functional.cosine_similarity(l.patch_features["siglino"].float(),
                                                    r.patch_features["siglino"], dim=-1)
        assert cos.min() > 0.98


def test_flex_is_compiled_by_default_on_cuda_and_the_path_is_reported():
    """On CUDA the flex path compiles flex_attention at its first use (eager flex is the slow reference
    there); `attention_path` names what runs. torch.compile is lazy: nothing is compiled here."""
    from distill.student import Student

    model = Student("tiny-moe")
    assert model.attention_path("cpu") == "segments"
    assert model.attention_path("cuda") == "flex-compiled"
    assert model._compiled_flex is None
    assert model._backend(None, "cuda") == "flex" and model._compiled_flex is not None
    assert Student("tiny-moe", compile_flex=False).attention_path("cuda") == "flex-eager"
    eager = Student("tiny-moe", attention_backend="flex")
    assert eager.attention_path("cpu") == "flex-eager"
    eager._backend(None, "cpu")
    assert eager._compiled_flex is None          # CPU: compiled flex has no lse output, stays eager
    assert Student("tiny-moe", attention_backend="sdpa").attention_path("cuda") == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs CUDA")
def test_compiled_flex_matches_sdpa_forward_and_backward_on_cuda(conformance):
    """The default CUDA path (compiled flex) against the SDPA reference, fp32, forward and gradients."""
    model = load_golden_model(conformance, "tiny-moe").cuda()
    imgs = [im.cuda() for im in _images(3)[:4]]
    outs = {}
    for backend in ("flex", "sdpa"):
        model.zero_grad(set_to_none=True)
        out = model.forward_packed(imgs, max_tokens=64, attention_backend=backend)
        sum(o.summary_features["siglino"].square().sum() for o in out).backward()
        outs[backend] = ([o.patch_features["siglino"].detach() for o in out],
                         {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model._compiled_flex is not None
    for a, b in zip(outs["flex"][0], outs["sdpa"][0]):
        assert (a - b).abs().max() <= 1e-4
    for n, g in outs["sdpa"][1].items():
        assert torch.allclose(outs["flex"][1][n], g, atol=1e-4, rtol=1e-3), n
