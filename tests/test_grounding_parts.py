"""Grounding building blocks: boxes and location tokens, Gram anchoring, the tokenizer."""
import math

import pytest
import torch

from grounding_vlm.boxes import GroundingScore, box_iou, dequantise_box, quantise_box
from grounding_vlm.gram import gram_anchoring_loss, gram_weight
from grounding_vlm.tokenizer import GroundingTokenizer, train_tokenizer


def test_box_round_trip_within_half_a_bin():
    box = (13.0, 40.0, 97.5, 120.0)
    bins = quantise_box(box, width=160, height=128, bins=100)
    back = dequantise_box(bins, width=160, height=128, bins=100)
    for v, w, s in zip(box, back, (160, 128, 160, 128)):
        assert abs(v - w) <= 0.5 * s / 100 + 1e-9


def test_quantise_clamps_and_rejects_degenerate():
    assert quantise_box((-5, -5, 500, 500), 100, 100, 10) == [0, 0, 9, 9]
    with pytest.raises(ValueError, match="degenerate"):
        quantise_box((10, 10, 10, 20), 100, 100, 10)


def test_iou_and_accuracy_hand_cases():
    from grounding_vlm.boxes import to_norm1000

    assert to_norm1000([10, 5, 200, 99.96], 400, 100) == [25, 50, 500, 1000]
    assert to_norm1000([-3, 0, 401, 50], 400, 100) == [0, 0, 1000, 500]      # clamped to the image
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    score = GroundingScore()
    score.add([0, 0, 10, 10], [0, 0, 10, 10])        # IoU 1: hit
    score.add([0, 0, 10, 10], [0, 0, 10, 20])        # IoU 0.5: hit (>=)
    score.add([0, 0, 10, 10], [0, 0, 10, 21])        # IoU < 0.5: miss
    score.add(None, [0, 0, 1, 1])                    # unparsable: a miss, counted apart
    m = score.metrics()
    assert m["acc@0.5"] == 50.0 and m["unparsable"] == 1 and m["n"] == 4


def test_gram_loss_hand_computed_unequal_token_counts():
    # Image A: 2 tokens. VLM tokens orthogonal -> Gram I; anchor tokens parallel -> Gram all ones.
    # Differences: off-diagonals 1 - 0 -> mean of squares over 4 entries = 2/4 = 0.5.
    a_vlm = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    a_ref = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # Image B: 3 tokens, identical directions on both sides -> 0.
    b_vlm = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 0.0]])
    b_ref = b_vlm.clone() * 5
    loss = gram_anchoring_loss([a_vlm, b_vlm], [a_ref, b_ref])
    # Per-image average (0.5 + 0) / 2, not a per-element average over 4 + 9 entries (2/13).
    assert loss.item() == pytest.approx(0.25)
    assert not math.isclose(loss.item(), 2 / 13)


def test_gram_loss_gradient_flows_only_to_vlm_side():
    x = torch.randn(5, 8, requires_grad=True)
    y = torch.randn(5, 4, requires_grad=True)
    gram_anchoring_loss([x], [y]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is None


def test_gram_loss_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="token counts"):
        gram_anchoring_loss([torch.randn(3, 4)], [torch.randn(4, 4)])


def test_gram_weight_schedule():
    cfg = {"weight": 2.0, "start_step": 10, "warmup_steps": 4}
    assert gram_weight(5, cfg) == 0.0
    assert gram_weight(10, cfg) == pytest.approx(0.5)
    assert gram_weight(13, cfg) == pytest.approx(2.0)
    assert gram_weight(100, {"weight": 0.0}) == 0.0


def test_tokenizer_prompt_target_and_box_parsing(tmp_path):
    texts = ["the small red square left of the circle", "a big blue ring", "green star below the cross"]
    tok = GroundingTokenizer(train_tokenizer(texts * 20, vocab_size=120), bins=50)
    prompt = tok.encode_prompt("The small RED square")
    assert prompt[0] == tok.hf.bos_token_id and prompt[-1] == tok.hf.sep_token_id
    assert tok.hf.decode(prompt[1:-1]).replace(" ", "") == "thesmallredsquare"
    target = tok.encode_target([3, 4, 40, 49])
    assert target[-1] == tok.eos_id and tok.decode_box(target) == [3, 4, 40, 49]
    assert tok.decode_box([tok.loc_start, tok.eos_id]) is None              # too short
    assert tok.decode_box(prompt[:4]) is None                                # not location tokens
    assert tok.decode_box([tok.loc_start + 9, tok.loc_start, tok.loc_start + 1, tok.loc_start + 2]) is None
    exprs = ["The small RED square", "a big blue ring", "", "green star below the cross twice"]
    assert tok.encode_prompts(exprs) == [tok.encode_prompt(e) for e in exprs] and tok.encode_prompts([]) == []
    tok.save(tmp_path / "tok")
    again = GroundingTokenizer.load(tmp_path / "tok", bins=50)
    assert again.loc_start == tok.loc_start and again.encode_prompt("a big blue ring") == tok.encode_prompt(
        "a big blue ring")


def test_fusion_mask_rules():
    from grounding_vlm.sequence import PackedLayout

    layout = PackedLayout.build(image_lengths=[3, 2], text_lengths=[2, 1], total=10)
    m = layout.dense_mask()
    img0, txt0, img1, txt1, pad = [0, 1, 2], [3, 4], [5, 6], [7], [8, 9]
    # image tokens: bidirectional within their own image, never text, never the other sample
    assert m[0][img0].all() and not m[0][txt0].any() and not m[0][img1 + txt1].any()
    # text: all of its image, causal over its own text
    assert m[3][img0].all() and m[3][3] and not m[3][4]
    assert m[4][img0].all() and m[4][txt0].all()
    assert m[7][img1].all() and m[7][7] and not m[7][img0 + txt0].any()
    # padding attends nothing and is attended by nothing
    assert not m[pad].any() and not m[:, pad].any()
    assert layout.text_pos.tolist() == [0, 0, 0, 1, 2, 0, 0, 1, 0, 0]


def test_anchor_features_are_computed_once_per_image_and_equal_a_fresh_forward():
    """Gram anchoring's frozen student runs once per image: its kept features equal running the image
    alone, whatever batch the image first came in."""
    from distill.student import Student
    from grounding_vlm.gram import AnchorFeatures

    torch.manual_seed(0)
    student = Student(dict(dim=32, n_layers=2, n_heads=2, head_dim=16, n_kv_heads=1, moe_dim=32,
                           moe_args=dict(num_experts=4, top_k=2), teachers_dim=[32, 32]),
                      attention_backend="sdpa", expert_backend="loop").eval()
    images = {k: torch.randn(3, 16 * h, 16 * w) for k, (h, w) in {"a": (2, 3), "b": (4, 4), "c": (3, 2)}.items()}
    calls = []
    real = student.forward_packed
    student.forward_packed = lambda imgs: calls.append(len(imgs)) or real(imgs)
    anchor = AnchorFeatures(student)
    first = anchor(["a", "b"], [images["a"], images["b"]])
    second = anchor(["c", "a", "b"], [images["c"], images["a"], images["b"]])
    assert calls == [2, 1]                                    # only "c" was new in the second batch
    assert second[1] is first[0] and second[2] is first[1]
    with torch.no_grad():
        for k, got in zip("cab", second):
            alone = real([images[k]])[0].patch_features["siglino"][0]
            assert got.shape == alone.shape and torch.allclose(got, alone, atol=1e-5)
