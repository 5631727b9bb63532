"""The one optimizer builder of the distiller, the teachers and the grounding trainer."""
import torch
from torch import nn

from distill.train.optim import build_adamw, exempt_from_decay


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.vision = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def _names(model, group):
    ids = {id(p): n for n, p in model.named_parameters()}
    return sorted(ids[id(p)] for p in group["params"])


def test_groups_decay_and_rates_in_a_fixed_order():
    m = Net()
    opt = build_adamw(m.named_parameters(), 1e-3, 0.05, betas=(0.9, 0.95), no_decay=exempt_from_decay,
                      lr_groups={"vision": (lambda n, _: n.startswith("vision."), 1e-4)})
    got = [(g["name"], g["lr"], g["base_lr"], g["weight_decay"], _names(m, g)) for g in opt.param_groups]
    assert got == [("vision", 1e-4, 1e-4, 0.05, ["vision.weight"]),
                   ("vision/no_decay", 1e-4, 1e-4, 0.0, ["vision.bias"]),
                   ("rest", 1e-3, 1e-3, 0.05, ["proj.weight"]),
                   ("rest/no_decay", 1e-3, 1e-3, 0.0, ["cls_token", "norm.bias", "norm.weight", "proj.bias"])]
    assert opt.defaults["betas"] == (0.9, 0.95)
    # no rule: one group where every trainable parameter decays (the teacher recipes), frozen ones left out
    plain = build_adamw(m.named_parameters(), 1e-3, 0.1)
    assert [(g["name"], g["weight_decay"]) for g in plain.param_groups] == [("rest", 0.1)]
    assert len(plain.param_groups[0]["params"]) == 7


def test_the_same_steps_as_a_plain_adamw():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    ours = build_adamw(a.named_parameters(), 1e-2, 0.05)
    ours_start = {n: p.detach().clone() for n, p in a.named_parameters()}
    # the reference path: the per-tensor loop (ours is the fused kernel; they agree to float rounding)
    plain = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05,
                              foreach=False)
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, opt in ((a, ours), (b, plain)):
            opt.zero_grad()
            (model.vision(model.norm(model.proj(x) + model.cls_token)) ** 2).mean().backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
        assert torch.equal(p, ours_start[n]) == (n.startswith("frozen.")), n   # the trained ones moved
