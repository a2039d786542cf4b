"""The two MABN ablations: equal to full MABN where the spec says so, different where it must be."""
import copy

import torch

from research.ablations import CenteredMABNFunction, MABNCentered2d, MABNForwardOnly2d
from mabn_d2.layers import MABN2d, mabn_phase

HPARAMS = dict(buffer_size=4, ema_decay=0.9, warmup_iters=7, renorm_warmup_iters=20, renorm_clip=1.5, eps=1e-3)
ITERATIONS = 40  # early phase (1..6), moving averages (7..20), re-normalization (21..40)
DIMS = (0, 2, 3)


def _pair(cls, **hparams):
    torch.manual_seed(0)
    full = MABN2d(3, **hparams).double()
    with torch.no_grad():
        full.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
        full.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    ablation = cls(3, **hparams).double()
    ablation.load_state_dict(full.state_dict(), strict=False)
    return full, ablation


def _step(layer, x, dy):
    x = x.clone().requires_grad_(True)
    layer.weight.grad = layer.bias.grad = None
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def _inputs(t, generator, zero_mean=False):
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=generator)
    x = x * (1.0 + 0.5 * torch.rand(1, 3, 1, 1, dtype=torch.float64, generator=generator))
    if t > 25:  # scale jump late, so re-normalization clips
        x[:, 0] *= 4.0
    x = x + 0.7 * torch.randn(1, 3, 1, 1, dtype=torch.float64, generator=generator)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    if zero_mean:
        x = x - x.mean(DIMS, keepdim=True)
        dy = dy - dy.mean(DIMS, keepdim=True)
    return x, dy


def _view(t):
    return t.view(1, -1, 1, 1)


# --------------------------------------------------------------------------- forward-only
def test_forward_only_equals_mabn_early_then_differs_only_in_input_gradient():
    full, ablation = _pair(MABNForwardOnly2d, **HPARAMS)
    generator = torch.Generator().manual_seed(1)
    for t in range(1, ITERATIONS + 1):
        x, dy = _inputs(t, generator)
        running_var_before = ablation.running_var.clone()
        y_f, dx_f, dw_f, db_f = _step(full, x, dy)
        y_a, dx_a, dw_a, db_a = _step(ablation, x, dy)
        torch.testing.assert_close(y_a, y_f, rtol=0, atol=0, msg=f"output at {t}")
        torch.testing.assert_close(dw_a, dw_f, rtol=0, atol=0)
        torch.testing.assert_close(db_a, db_f, rtol=0, atol=0)
        early = mabn_phase(t, 4, 7, 20).use_batch_statistics
        if early:
            torch.testing.assert_close(dx_a, dx_f, rtol=0, atol=0, msg=f"input grad at {t}")
        else:
            assert (dx_a - dx_f).abs().max() > 1e-6, f"input grad at {t} should use Psi_B, not its SMA"
            # dx = (g_z - z * Psi_B) / s with the SMA chi2 in s and z, Psi_B of this batch.
            chi2 = ablation.x2_buffer.mean(0)
            s = (chi2 + HPARAMS["eps"]).sqrt()
            r = torch.ones(3, dtype=torch.float64)
            if mabn_phase(t, 4, 7, 20).renormalize:
                r = (s / (running_var_before + HPARAMS["eps"]).sqrt()).clamp(1 / 1.5, 1.5)
            z = x / _view(s)
            g_z = dy * _view(ablation.weight.detach() * r)
            psi_batch = (g_z * z).mean(DIMS)
            torch.testing.assert_close(dx_a, (g_z - z * _view(psi_batch)) / _view(s), rtol=1e-10, atol=1e-12)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(ablation.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_forward_only_eval_matches_mabn():
    full, ablation = _pair(MABNForwardOnly2d, **HPARAMS)
    generator = torch.Generator().manual_seed(2)
    for t in range(1, 12):
        x, dy = _inputs(t, generator)
        _step(full, x, dy)
        _step(ablation, x, dy)
    full.eval()
    ablation.eval()
    x, _ = _inputs(0, generator)
    torch.testing.assert_close(ablation(x), full(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- no centralization
class ReferenceCentered:
    """The ablation's spec, written out step by step (float64, no shared code)."""

    def __init__(self, channels, buffer_size, ema_decay, warmup_iters, renorm_warmup_iters, renorm_clip, eps):
        self.m, self.ema_decay, self.eps, self.clip = buffer_size, ema_decay, eps, renorm_clip
        self.warmup, self.renorm_warmup = warmup_iters, renorm_warmup_iters
        self.t = 0
        self.rows = {k: torch.zeros(buffer_size, channels, dtype=torch.float64) for k in ("mu", "var", "g", "psi")}
        self.running_mean = torch.zeros(channels, dtype=torch.float64)
        self.running_var = torch.ones(channels, dtype=torch.float64)
        self.clipped = 0

    def step(self, x, dy, gamma, beta):
        self.t += 1
        k = self.t % self.m
        early = self.t <= self.m or self.t < self.warmup
        mu_b = x.mean(DIMS)
        var_b = ((x - _view(mu_b)) ** 2).mean(DIMS)
        self.rows["mu"][k], self.rows["var"][k] = mu_b, var_b
        mu = mu_b if early else self.rows["mu"].mean(0)
        var = var_b if early else self.rows["var"].mean(0)
        s = (var + self.eps).sqrt()
        r = torch.ones_like(s)
        if self.t > max(self.renorm_warmup, self.warmup):
            raw = s / (self.running_var + self.eps).sqrt()
            r = raw.clamp(1 / self.clip, self.clip)
            self.clipped += int((raw != r).sum())
        decay = self.ema_decay if self.t > 1 else 0.0  # the first iteration starts the EMAs from data
        self.running_mean = decay * self.running_mean + (1 - decay) * mu
        self.running_var = decay * self.running_var + (1 - decay) * var
        x_hat = (x - _view(mu)) / _view(s)
        y = _view(gamma * r) * x_hat + _view(beta)
        g = dy * _view(gamma * r)
        g_b, psi_b = g.mean(DIMS), (g * x_hat).mean(DIMS)
        self.rows["g"][k], self.rows["psi"][k] = g_b, psi_b
        g_bar = g_b if early else self.rows["g"].mean(0)
        psi = psi_b if early else self.rows["psi"].mean(0)
        dx = (g - _view(g_bar) - x_hat * _view(psi)) / _view(s)
        return y, dx, (dy * x_hat).sum(DIMS) * r, dy.sum(DIMS)


def test_centered_matches_its_reference_in_all_phases():
    _, layer = _pair(MABNCentered2d, **HPARAMS)
    reference = ReferenceCentered(3, **HPARAMS)
    generator = torch.Generator().manual_seed(3)
    for t in range(1, ITERATIONS + 1):
        x, dy = _inputs(t, generator)
        expected = reference.step(x, dy, layer.weight.detach().clone(), layer.bias.detach().clone())
        for name, got, want in zip(("y", "dx", "dgamma", "dbeta"), _step(layer, x, dy), expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{name} at iteration {t}")
    assert reference.clipped > 0, "re-normalization never clipped"
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(layer.mean_buffer, reference.rows["mu"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(layer.grad_mean_buffer, reference.rows["g"], rtol=1e-10, atol=1e-14)


def test_centered_early_phase_is_the_exact_gradient():
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=generator) + 1.0).requires_grad_(True)
    weight = (torch.rand(3, dtype=torch.float64, generator=generator) + 0.5).requires_grad_(True)
    bias = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)

    def step(x, weight, bias):
        state = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
        state += [torch.zeros(4, 3, dtype=torch.float64) for _ in range(4)]
        return CenteredMABNFunction.apply(x, weight, bias, *state, mabn_phase(1, 4, 100, 1000), 0.98, 1e-5, 5.0)

    assert torch.autograd.gradcheck(step, (x, weight, bias))


def test_centered_early_phase_equals_batchnorm():
    _, layer = _pair(MABNCentered2d, buffer_size=16, warmup_iters=100)
    bn = torch.nn.BatchNorm2d(3, eps=layer.eps).double()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")}, strict=False)
    generator = torch.Generator().manual_seed(5)
    for t in range(1, 10):
        x, dy = _inputs(t, generator)
        for got, want in zip(_step(layer, x, dy), _step(bn, x, dy)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_centered_equals_mabn_on_zero_mean_inputs_and_differs_otherwise():
    full, ablation = _pair(MABNCentered2d, **HPARAMS)
    generator = torch.Generator().manual_seed(6)
    for t in range(1, ITERATIONS + 1):
        x, dy = _inputs(t, generator, zero_mean=True)
        for got, want in zip(_step(ablation, x, dy), _step(full, x, dy)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"iteration {t}")
    torch.testing.assert_close(ablation.running_var, full.running_var, rtol=1e-10, atol=0)

    full, ablation = _pair(MABNCentered2d, **HPARAMS)
    for t in range(1, ITERATIONS + 1):
        x, dy = _inputs(t, generator)
        y_f, dx_f, _, _ = _step(full, x, dy)
        y_a, dx_a, _, _ = _step(ablation, x, dy)
        assert (y_a - y_f).abs().max() > 1e-3, f"non-zero-mean input: outputs should differ at {t}"
        assert (dx_a - dx_f).abs().max() > 1e-6


def test_centered_eval_and_checkpoint():
    _, layer = _pair(MABNCentered2d, **HPARAMS)
    generator = torch.Generator().manual_seed(7)
    for t in range(1, 12):
        _step(layer, *_inputs(t, generator))
    restored = MABNCentered2d(3, **HPARAMS).double()
    restored.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert restored.iteration == layer.iteration == 11
    for module in (layer, restored):
        module.eval()
    x, _ = _inputs(0, generator)
    expected = _view(layer.weight) * (x - _view(layer.running_mean)) / _view(
        (layer.running_var + layer.eps).sqrt()
    ) + _view(layer.bias)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(restored(x), expected)
    layer.reset_running_stats()
    assert layer.iteration == 0 and not layer.mean_buffer.any() and not layer.grad_mean_buffer.any()
