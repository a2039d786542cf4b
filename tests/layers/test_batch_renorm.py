"""BatchRenorm2d against Ioffe (2017), written out independently in float64."""
import pytest
import torch

from mabn_d2.layers import BatchRenorm2d
from mabn_d2.layers.batch_renorm import renorm_limits


def _reference_step(x, gamma, beta, mean_run, var_run, r_max, d_max, eps, ema_update_rate):
    """y and the updated running statistics; r and d are constants for the gradient."""
    mu = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    sigma = torch.sqrt(var + eps)
    sigma_run = torch.sqrt(var_run + eps)
    r = torch.clamp(sigma.detach() / sigma_run, 1 / r_max, r_max)
    d = torch.clamp((mu.detach() - mean_run) / sigma_run, -d_max, d_max)
    view = (1, -1, 1, 1)
    x_hat = (x - mu.view(view)) / sigma.view(view) * r.view(view) + d.view(view)
    y = gamma.view(view) * x_hat + beta.view(view)
    n = x.numel() // x.shape[1]
    new_mean = mean_run + ema_update_rate * (mu.detach() - mean_run)
    new_var = var_run + ema_update_rate * (var.detach() * n / (n - 1) - var_run)
    return y, new_mean, new_var


def test_limits_ramp_after_the_warm_up():
    assert renorm_limits(10, 3.0, 5.0, 10, 100, 50) == (1.0, 0.0)
    assert renorm_limits(60, 3.0, 5.0, 10, 100, 50) == pytest.approx((2.0, 5.0))
    assert renorm_limits(10**6, 3.0, 5.0, 10, 100, 50) == (3.0, 5.0)


@pytest.mark.parametrize("iterations", [3, 40])
def test_training_matches_the_formula(iterations):
    torch.manual_seed(0)
    layer = BatchRenorm2d(3, ema_update_rate=0.1, r_max=1.5, d_max=0.5, warmup_iters=2, r_max_ramp_iters=5,
                          d_max_ramp_iters=5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.2, 0.8, -0.5]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    clipped = 0
    for t in range(1, iterations + 1):
        x = (torch.randn(2, 3, 4, 5, dtype=torch.float64) * (1 + 2 * (t % 3)) + t % 2).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        mean_run, var_run = layer.running_mean.clone(), layer.running_var.clone()
        r_max, d_max = renorm_limits(t, 1.5, 0.5, 2, 5, 5)
        y_ref, new_mean, new_var = _reference_step(x_ref, layer.weight.detach(), layer.bias.detach(), mean_run,
                                                   var_run, r_max, d_max, layer.eps, layer.ema_update_rate)
        y = layer(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_mean, new_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.running_var, new_var, rtol=1e-12, atol=1e-14)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
        sigma = x.detach().var(dim=(0, 2, 3), unbiased=False).add(layer.eps).sqrt()
        raw_r = sigma / (var_run + layer.eps).sqrt()
        clipped += int(((raw_r > r_max) | (raw_r < 1 / r_max)).any())
    assert layer.iteration == iterations
    if iterations > 10:
        assert clipped > 0, "r never clipped: the test does not cover the renormalization"


def test_eval_uses_the_running_statistics_and_non_finite_batches_are_ignored():
    layer = BatchRenorm2d(2)
    layer(torch.randn(4, 2, 3, 3) * 2 + 1)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(4, 2, 3, 3)
    bad[0, 0, 0, 0] = float("nan")
    layer(bad)
    assert torch.equal(layer.running_mean[0], state["running_mean"][0])
    assert torch.isfinite(layer.running_var).all()
    layer.eval()
    x = torch.randn(2, 2, 3, 3)
    expected = (x - layer.running_mean.view(1, -1, 1, 1)) / torch.sqrt(layer.running_var.view(1, -1, 1, 1) + layer.eps)
    torch.testing.assert_close(layer(x), expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))


@pytest.mark.parametrize("kwargs", [dict(eps=0.0), dict(ema_update_rate=0.0), dict(r_max=0.5), dict(d_max=-1.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="BatchRenorm2d"):
        BatchRenorm2d(4, **kwargs)
