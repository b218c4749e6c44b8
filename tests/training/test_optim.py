import torch
from torch import nn

from saelab.training.config import TrainerConfig
from saelab.training.optim import MaskedAdam, build_optimizer, reset_moments


def _run(optimizer_cls, grads, **kw):
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(4, 3))
    opt = optimizer_cls([param], lr=0.1, betas=(0.9, 0.999), eps=1e-8, **kw)
    history = []
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
        history.append((param.detach().clone(), {k: v.clone() for k, v in opt.state[param].items()}))
    return param, history


def test_masked_adam_equals_adam_when_no_gradient_is_zero() -> None:
    grads = [torch.randn(4, 3) for _ in range(5)]
    p_masked, _ = _run(MaskedAdam, grads)
    p_adam, _ = _run(torch.optim.Adam, grads, foreach=False)
    assert torch.allclose(p_masked, p_adam, atol=1e-6)


def test_masked_adam_leaves_zero_gradient_entries_untouched() -> None:
    grads = [torch.randn(4, 3) for _ in range(3)]
    for grad in grads[1:]:
        grad[1] = 0.0  # row 1 gets no gradient after the first step (an unselected latent)
        grad[2, 0] = 0.0
    _, history = _run(MaskedAdam, grads)
    (p1, s1), (p2, s2), (p3, s3) = history
    for later_p, later_s in ((p2, s2), (p3, s3)):
        assert torch.equal(later_p[1], p1[1]) and torch.equal(later_p[2, 0], p1[2, 0])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(later_s[key][1], s1[key][1]) and torch.equal(later_s[key][2, 0], s1[key][2, 0])
    assert not torch.equal(p3[0], p2[0]) and not torch.equal(s3["exp_avg"][0], s2["exp_avg"][0])
    # plain Adam keeps moving the zero-gradient row on its momentum
    _, adam_history = _run(torch.optim.Adam, grads)
    assert not torch.equal(adam_history[2][0][1], adam_history[0][0][1])


def test_build_optimizer_prefers_fused_adam() -> None:
    params = [nn.Parameter(torch.randn(3, 2))]
    opt = build_optimizer(params, TrainerConfig(), lr=1e-3)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["fused"]
    masked = build_optimizer(params, TrainerConfig(optimizer="masked_adam", betas=(0.8, 0.9)), lr=1e-3)
    assert isinstance(masked, MaskedAdam) and masked.param_groups[0]["betas"] == (0.8, 0.9)


def test_reset_moments_zeroes_only_the_given_slices() -> None:
    param = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.randn(4, 3)
    opt.step()
    before = opt.state[param]["exp_avg"].clone()
    reset_moments(opt, param, torch.tensor([2]), dim=1)
    after = opt.state[param]["exp_avg"]
    assert torch.equal(after[:, 2], torch.zeros(4)) and torch.equal(after[:, :2], before[:, :2])
    assert torch.equal(opt.state[param]["exp_avg_sq"][:, 2], torch.zeros(4))
