"""MoE expert paths (loop vs grouped GEMM), routing semantics, load recording and bias balancing; configs."""
from __future__ import annotations

import pytest
import torch

from distill.student import Student, StudentConfig, update_expert_bias
from distill.student.config import MoEArgs, get_config, known_configs
from distill.student.moe import MoE, grouped_mm_supported

SMALL = {"dim": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16, "n_kv_heads": 1, "moe_dim": 24,
         "moe_args": {"num_experts": 6, "num_shared_experts": 1, "top_k": 2, "score_before_experts": True,
                      "route_norm": True, "route_scale": 0.9, "activation": "relu2"},
         "first_n_layers_dense": 1, "ffn_dim": 40, "teachers_dim": [32, 16], "n_storage_tokens": 2}


def _moe(args: MoEArgs, seed=0) -> MoE:
    torch.manual_seed(seed)
    m = MoE(32, 24, args)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    m.expert_bias.normal_(0, 0.1)
    return m


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("args", [
    MoEArgs(num_experts=8, top_k=2),
    MoEArgs(num_experts=6, num_shared_experts=1, top_k=3, route_norm=True, route_scale=0.8633,
            score_before_experts=True, activation="relu2"),
])
def test_grouped_equals_loop_forward_backward(args):
    moe = _moe(args)
    x = torch.randn(4, 13, 32, requires_grad=True)
    assert grouped_mm_supported(x, (24, 32))
    results = {}
    for backend in ("loop", "grouped"):
        moe.expert_backend = backend
        assert moe.resolve_backend(x) == backend
        moe.zero_grad()
        x.grad = None
        out = moe(x)
        out.sum().backward()  # .sum() gives a zero-stride gradient: the grouped path must cope
        results[backend] = (out.detach(), x.grad.clone(), {k: p.grad.clone() for k, p in moe.named_parameters()})
    (o1, gx1, gp1), (o2, gx2, gp2) = results["loop"], results["grouped"]
    assert (o1 - o2).abs().max() <= 1e-5
    assert (gx1 - gx2).abs().max() <= 1e-5
    for k in gp1:
        assert (gp1[k] - gp2[k]).abs().max() <= 1e-5, k


def test_expert_bias_selects_but_does_not_weight():
    args = MoEArgs(num_experts=4, top_k=1)
    moe = _moe(args)
    x = torch.randn(10, 32)
    scores = torch.sigmoid(moe.router.gate(x))
    moe.expert_bias.zero_()
    moe.expert_bias[2] = 100.0  # forces expert 2 for every token
    weights, chosen = moe.router(x, moe.expert_bias)
    assert (chosen == 2).all()
    assert torch.allclose(weights[:, 0], scores[:, 2])  # raw score, not score + bias


def test_tokens_per_expert_counts_valid_tokens_only():
    moe = _moe(MoEArgs(num_experts=5, top_k=2))
    x = torch.randn(2, 7, 32)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False
    moe(x, valid)
    assert moe.tokens_per_expert.sum().item() == 2 * valid.sum().item()
    assert "tokens_per_expert" not in moe.state_dict() and "expert_bias" in moe.state_dict()


def test_update_expert_bias_rule():
    model = Student(SMALL)
    layers = model.moe_layers()
    assert len(layers) == 1  # layer 0 dense, layer 1 MoE
    loads = [torch.tensor([10.0, 0.0, 5.0, 5.0, 1.0, 9.0])]
    before = layers[0].expert_bias.clone()
    updates = update_expert_bias(model, loads, rate=0.01)
    # mean load 5: over-loaded experts go down, under-loaded go up, exactly-average stay
    assert torch.allclose(updates[0], torch.tensor([-0.01, 0.01, 0.0, 0.0, 0.01, -0.01]))
    assert torch.allclose(layers[0].expert_bias - before, updates[0])
    # default: the loads recorded by the last forward
    with torch.no_grad():
        model(torch.randn(1, 6, 768), None, torch.tensor([[2, 3]]))
    recorded = layers[0].tokens_per_expert.clone()
    assert recorded.sum() == (6 + 3) * 2
    before = layers[0].expert_bias.clone()
    update_expert_bias(model.moe_layers(), rate=0.5)
    assert torch.allclose(layers[0].expert_bias - before, 0.5 * torch.sign(recorded.mean() - recorded))
    with pytest.raises(ValueError, match="loads for 2 layers"):
        update_expert_bias(model, [loads[0], loads[0]])


def test_bias_balancing_reduces_imbalance():
    """Repeated updates on a fixed batch drive the per-expert load towards uniform."""
    moe = _moe(MoEArgs(num_experts=4, top_k=1), seed=3)
    moe.expert_bias.zero_()
    with torch.no_grad():
        moe.router.gate.weight[0] += 1.0  # skew towards expert 0
    x = torch.randn(400, 32)
    with torch.no_grad():
        moe(x)
        first = moe.tokens_per_expert.clone()
        for _ in range(200):
            moe(x)
            update_expert_bias(moe, rate=0.01)
        moe(x)
    last = moe.tokens_per_expert
    assert last.max() - last.min() < 0.5 * (first.max() - first.min())


# ----------------------------------------------------------------------------- configs
def test_release_moe_args_use_class_defaults():
    cfg = get_config("siglino-0.3B")
    m = cfg.moe_args
    assert (m.num_experts, m.top_k, m.num_shared_experts) == (28, 6, 0)
    assert (m.score_func, m.route_norm, m.route_scale, m.activation) == ("sigmoid", False, 1.0, "silu")
    assert get_config("siglino-0.15B").moe_args.top_k == 2


def test_missing_moe_args_use_siglino_default_factory():
    cfg = get_config({"dim": 32, "n_layers": 1, "n_heads": 2, "head_dim": 16, "moe_dim": 8})
    m = cfg.moe_args
    assert (m.num_experts, m.num_shared_experts, m.top_k) == (16, 1, 3)
    assert (m.route_norm, m.route_scale, m.activation) == (True, 0.8633, "relu2")


def test_config_sources_agree():
    d = get_config("dense-30M").to_dict()
    assert get_config(d) == get_config("dense-30M")
    obj = type("Args", (), {**d, "moe_args": type("M", (), d["moe_args"])()})()
    assert get_config(obj) == get_config("dense-30M")
    assert isinstance(get_config(StudentConfig(**SMALL)), StudentConfig)
    assert "moe-cpu-small" in known_configs()


def test_dense_config_has_no_moe_keys():
    sd = Student(get_config({**SMALL, "first_n_layers_dense": 2})).state_dict()
    assert not any(".moe." in k for k in sd)
    assert "layers.1.feed_forward.w1.weight" in sd


def test_init_weights_follows_release():
    model = Student(SMALL)
    model.init_weights(torch.Generator().manual_seed(0))
    assert model.layers["1"].attention.wo.weight.abs().max() == 0
    assert model.layers["1"].moe.experts.w2.abs().max() == 0
    assert model.layers["1"].moe.expert_bias.abs().max() == 0
    assert model.dinov3_adapter.fc1.bias.abs().max() == 0
    assert 0.01 < model.img_projector.weight.std().item() < 0.03
    assert model.layers["1"].attention.wq.weight.std().item() < model.layers["0"].attention.wq.weight.std().item()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_equals_loop_bf16():
    moe = _moe(MoEArgs(num_experts=8, top_k=2)).to(torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    if not grouped_mm_supported(x, (24, 32)):
        pytest.skip("no bf16 grouped GEMM kernel for this device in this torch")
    outs = []
    for backend in ("loop", "grouped"):
        moe.expert_backend = backend
        outs.append(moe(x).float())
    assert (outs[0] - outs[1]).abs().max() <= 2e-2 * (1 + outs[0].abs().max())


def test_expert_loads_matrix():
    model = Student({**SMALL, "n_layers": 3})
    with torch.no_grad():
        model(torch.randn(2, 4, 768), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), torch.tensor([[2, 2], [1, 2]]))
    loads = model.expert_loads()
    assert loads.shape == (2, 6)
    assert (loads.sum(1) == (2 * 3 + 4 + 2) * 2).all()  # valid tokens (prefix 3 per image) * top_k
