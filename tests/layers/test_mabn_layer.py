"""MABN2d against the float64 transcription of the algorithm spec (mabn_d2.layers.reference)."""
import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mabn_d2.layers import CenteredConv2d, MABN2d, MABNFunction, mabn_phase
from mabn_d2.layers.reference import ReferenceMABN

DEFAULTS = dict(buffer_size=16, ema_decay=0.98, warmup_iters=100, renorm_warmup_iters=1000, renorm_clip=5.0, eps=1e-5)
CUSTOM = dict(buffer_size=4, ema_decay=0.9, warmup_iters=7, renorm_warmup_iters=30, renorm_clip=1.5, eps=1e-3)


def test_reference_follows_the_spec_formulas_by_hand():
    """The shared float64 reference, checked on values worked out per channel from the spec."""
    reference = ReferenceMABN(2, **CUSTOM)
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, -2.0]]], [[[-1.0, 1.0]], [[0.0, 4.0]]]], dtype=torch.float64)
    dy = torch.tensor([[[[0.5, -1.0]], [[1.0, 0.0]]], [[[2.0, 1.0]], [[-1.0, 3.0]]]], dtype=torch.float64)
    gamma, beta = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.0], dtype=torch.float64)
    y, dx, dgamma, dbeta = reference.step(x, dy, gamma, beta)
    eps = CUSTOM["eps"]
    for c in range(2):
        xc, dyc = x[:, c].flatten().tolist(), dy[:, c].flatten().tolist()
        chi2 = sum(v * v for v in xc) / len(xc)
        s = math.sqrt(chi2 + eps)
        z = [v / s for v in xc]
        psi = sum(float(gamma[c]) * d * zi for d, zi in zip(dyc, z)) / len(z)
        torch.testing.assert_close(y[:, c].flatten(), torch.tensor([float(gamma[c]) * zi + float(beta[c]) for zi in z],
                                                                   dtype=torch.float64))
        want_dx = [(float(gamma[c]) * d - zi * psi) / s for d, zi in zip(dyc, z)]
        torch.testing.assert_close(dx[:, c].flatten(), torch.tensor(want_dx, dtype=torch.float64))
        assert math.isclose(float(dgamma[c]), sum(d * zi for d, zi in zip(dyc, z)), rel_tol=1e-12)
        assert math.isclose(float(dbeta[c]), sum(dyc), rel_tol=1e-12)
        assert math.isclose(float(reference.running_var[c]), chi2, rel_tol=1e-12)  # the first statistic
        assert math.isclose(float(reference.x2[1, c]), chi2, rel_tol=1e-12)  # slot t % buffer_size


def _input_for(t, generator, channels=3):
    """Inputs whose per-channel scale jumps late, so re-normalization clips in both directions."""
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64, generator=generator)
    x = x + 0.3 * torch.randn(1, channels, 1, 1, dtype=torch.float64, generator=generator)
    if t > 1100:
        x[:, 0] *= 12.0
        x[:, 1] *= 0.02
    return x


@pytest.mark.parametrize("hparams,iterations", [(DEFAULTS, 1200), (CUSTOM, 120)], ids=["defaults", "custom"])
def test_training_matches_reference(hparams, iterations):
    generator = torch.Generator().manual_seed(0)
    layer = MABN2d(3, **hparams).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    reference = ReferenceMABN(3, **hparams)
    for t in range(1, iterations + 1):
        x = _input_for(t if hparams is DEFAULTS else t * 10, generator).requires_grad_(True)
        dy = torch.randn(x.shape, dtype=torch.float64, generator=generator)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(dy)
        y_ref, dx_ref, dgamma_ref, dbeta_ref = reference.step(x.detach(), dy, layer.weight.detach(), layer.bias.detach())
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12, msg=f"output at iteration {t}")
        torch.testing.assert_close(x.grad, dx_ref, rtol=1e-9, atol=1e-12, msg=f"input grad at iteration {t}")
        torch.testing.assert_close(layer.weight.grad, dgamma_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, dbeta_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-10, atol=0)
    assert layer.iteration == iterations == int(layer.num_batches_tracked)
    assert reference.clipped > 0, "the run never reached clipped re-normalization"
    torch.testing.assert_close(layer.x2_buffer, reference.x2, rtol=1e-10, atol=0)
    torch.testing.assert_close(layer.gz_buffer, reference.gz, rtol=1e-9, atol=1e-14)


def test_phase_schedule_covers_all_three_phases():
    phases = [mabn_phase(t, 16, 100, 1000) for t in (1, 16, 99, 100, 1000, 1001)]
    assert [p.use_batch_statistics for p in phases] == [True, True, True, False, False, False]
    assert [p.renormalize for p in phases] == [False, False, False, False, False, True]
    assert [p.slot for p in phases] == [1, 0, 3, 4, 8, 9]


def _early_phase_function(x, weight, bias):
    C = x.shape[1]
    state = [torch.ones(C, dtype=x.dtype), torch.zeros(4, C, dtype=x.dtype), torch.zeros(4, C, dtype=x.dtype)]
    return MABNFunction.apply(x, weight, bias, *state, mabn_phase(1, 4, 100, 1000), 0.98, 1e-5, 5.0)


def test_gradcheck_in_early_phase():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64, generator=generator) + 0.5).requires_grad_(True)
    bias = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(_early_phase_function, (x, weight, bias))


def test_backward_leaves_saved_tensors_untouched():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x_before = x.detach().clone()
    layer = MABN2d(3).double()
    y = layer(x)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, x, dy, retain_graph=True)[0]
    second = torch.autograd.grad(y, x, dy)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(x.detach(), x_before, rtol=0, atol=0)


def test_eval_is_the_frozen_affine():
    layer = MABN2d(4)
    layer.train()
    for _ in range(5):
        layer(torch.randn(2, 4, 5, 5) * 3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    layer.eval()
    x = torch.randn(2, 4, 5, 5)
    state = copy.deepcopy(layer.state_dict())
    expected = layer.weight.view(1, -1, 1, 1) * x / torch.sqrt(layer.running_var.view(1, -1, 1, 1) + layer.eps) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), f"eval changed {key}"


class _ForbidHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor value on the host (.item(), bool(), int(), tolist)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation in the training path: {func}")
        return func(*args, **(kwargs or {}))


def test_training_step_never_reads_tensor_values_on_host():
    layer = MABN2d(3, buffer_size=2, warmup_iters=3, renorm_warmup_iters=4)
    with _ForbidHostSync():
        for _ in range(7):  # batch statistics, moving averages, re-normalization
            x = torch.randn(2, 3, 4, 4, requires_grad=True)
            layer(x).sum().backward()
    assert layer.iteration == 7


def test_checkpoint_restores_the_host_counter_and_state_exactly():
    torch.manual_seed(0)
    hparams = dict(buffer_size=3, warmup_iters=4, renorm_warmup_iters=6)
    layer = MABN2d(3, **hparams)
    inputs = [torch.randn(2, 3, 4, 4) for _ in range(16)]
    for x in inputs[:8]:
        layer(x.requires_grad_()).sum().backward()
    restored = MABN2d(3, **hparams)
    restored.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert restored.iteration == 8
    for x in inputs[8:]:
        a, b = layer(x.clone().requires_grad_()), restored(x.clone().requires_grad_())
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        a.pow(2).sum().backward()
        b.pow(2).sum().backward()
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)


def test_the_counter_buffer_is_written_when_read_not_per_step():
    layer = MABN2d(3, buffer_size=2, warmup_iters=3, renorm_warmup_iters=4)
    stored = layer._buffers["num_batches_tracked"]
    for _ in range(5):
        layer(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    assert int(stored) == 0, "a training step wrote the counter buffer"
    assert int(layer.state_dict()["num_batches_tracked"]) == 5  # saving mirrors the host count
    assert int(stored) == 5
    layer(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    assert int(layer.num_batches_tracked) == 6 == layer.iteration  # so does reading it
    assert layer.num_batches_tracked is stored  # the buffer itself, not a copy
    copied = copy.deepcopy(layer)
    assert int(copied.num_batches_tracked) == 6
    layer.reset_running_stats()
    assert layer.iteration == 0 and int(stored) == 0


def test_empty_batch_keeps_state_and_backward_works():
    layer = MABN2d(3)
    layer(torch.randn(2, 3, 4, 4)).sum().backward()
    state = copy.deepcopy(layer.state_dict())
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 4, 4)
    layer.weight.grad = None
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(3))
    assert layer.iteration == 1
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), f"empty batch changed {key}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("iteration_count", [1, 40])
def test_non_finite_batch_never_reaches_the_state(bad, iteration_count):
    layer = MABN2d(3, buffer_size=4, warmup_iters=5, renorm_warmup_iters=10)
    for _ in range(iteration_count - 1):
        layer(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 1, 1] = bad
    x.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    for key, value in layer.state_dict().items():
        assert torch.isfinite(value.float()).all(), f"{bad} reached {key}"
    slot = iteration_count % 4
    # The poisoned channel keeps its old values, the clean channels are updated.
    assert torch.equal(layer.x2_buffer[slot, 0], before["x2_buffer"][slot, 0])
    assert not torch.equal(layer.x2_buffer[slot, 1:], before["x2_buffer"][slot, 1:])
    assert not torch.equal(layer.running_var[1:], before["running_var"][1:])
    if iteration_count == 1:  # batch statistic in use: the poisoned channel's EMA is skipped
        assert torch.equal(layer.running_var[0], before["running_var"][0])
    else:  # moving average in use: it holds only finite rows, so the EMA advances finitely
        assert not torch.equal(layer.running_var[0], before["running_var"][0])
    # One skipped batch, counted once although chi2_B and Psi_B were both non-finite.
    assert layer.nonfinite_skipped.tolist() == [1, iteration_count]


def test_skipped_batches_are_counted_on_the_device_without_host_reads():
    layer = MABN2d(3, buffer_size=2, warmup_iters=3, renorm_warmup_iters=4)
    with _ForbidHostSync():
        for t in range(1, 8):
            x = torch.randn(2, 3, 4, 4)
            if t in (2, 6):
                x[1, 2, 0, 0] = float("nan")
            layer(x.requires_grad_()).pow(2).sum().backward()
    assert layer.nonfinite_skipped.tolist() == [2, 6]


def test_a_non_finite_gradient_alone_is_counted_and_kept_out_of_the_state():
    """Psi_B non-finite with a finite forward (e.g. an fp16 gradient overflow under AMP)."""
    layer = MABN2d(3, buffer_size=2, warmup_iters=3, renorm_warmup_iters=4)
    layer(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    gz_before = layer.gz_buffer.clone()
    y = layer(torch.randn(2, 3, 4, 4, requires_grad=True))
    dy = torch.ones_like(y)
    dy[0, 1, 0, 0] = float("inf")
    y.backward(dy)
    assert layer.nonfinite_skipped.tolist() == [1, 2]
    assert torch.equal(layer.gz_buffer[0, 1], gz_before[0, 1]), "the non-finite Psi_B row was written"
    assert torch.isfinite(layer.gz_buffer).all()


def test_the_skip_count_is_not_state():
    """Not in state_dict: checkpoints written before it existed load strictly, and saved ones do not grow."""
    layer = MABN2d(3, buffer_size=2, warmup_iters=3, renorm_warmup_iters=4)
    for t in range(1, 4):
        x = torch.randn(2, 3, 4, 4)
        x[0, 0, 0, 0] = float("nan") if t == 3 else 0.0
        layer(x.requires_grad_()).sum().backward()
    assert "nonfinite_skipped" not in layer.state_dict()
    assert dict(layer.named_buffers())["nonfinite_skipped"].tolist() == [1, 3]
    restored = MABN2d(3, buffer_size=2, warmup_iters=3, renorm_warmup_iters=4)
    restored.load_state_dict(layer.state_dict(), strict=True)
    assert restored.nonfinite_skipped.tolist() == [0, 0]
    layer.load_state_dict(restored.state_dict())  # the iteration count may go back: so does the latest counted
    assert layer.nonfinite_skipped.tolist() == [1, 0]
    layer.reset_running_stats()
    assert layer.nonfinite_skipped.tolist() == [0, 0]


def test_several_calls_before_one_backward():
    layer = MABN2d(4, buffer_size=2, warmup_iters=2, renorm_warmup_iters=3)
    for _ in range(3):
        inputs = [torch.randn(2, 4, s, s, requires_grad=True) for s in (8, 4, 2)]
        loss = sum(layer(x).pow(2).sum() for x in inputs)
        loss.backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)
    assert layer.iteration == 9


def test_autocast_keeps_float32_statistics():
    torch.manual_seed(0)
    conv = CenteredConv2d(3, 8, 3, padding=1)  # MABN refuses a raw-weight convolution (centering_check)
    layer = MABN2d(8)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(x)
        y = layer(features)
    assert features.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert conv.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    for name in ("running_var", "x2_buffer", "gz_buffer"):
        assert getattr(layer, name).dtype == torch.float32, name
    expected_chi2 = features.detach().float().pow(2).mean((0, 2, 3))
    torch.testing.assert_close(layer.x2_buffer[1], expected_chi2, rtol=1e-4, atol=1e-6)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    a, b = MABN2d(5), MABN2d(5)
    for _ in range(3):
        x = torch.randn(2, 5, 6, 7)
        dy = torch.randn(2, 5, 6, 7)
        xa = x.clone().requires_grad_()
        xb = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        ya, yb = a(xa), b(xb)
        ya.backward(dy)
        yb.backward(dy.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(a.running_var, b.running_var)
    torch.testing.assert_close(a.weight.grad, b.weight.grad)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(buffer_size=0), "buffer_size"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_decay=-0.1), "ema_decay"),
        (dict(renorm_clip=0.5), "renorm_clip"),
        (dict(eps=0.0), "eps"),
        (dict(warmup_iters=-1), "warmup_iters"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MABN2d(4, **kwargs)


@pytest.mark.parametrize("shape", [(2, 4), (2, 4, 5), (1, 2, 4, 5, 5)])
def test_non_4d_input_raises(shape):
    with pytest.raises(ValueError, match="4-D input"):
        MABN2d(4)(torch.randn(*shape))


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="channels"):
        MABN2d(4)(torch.randn(2, 3, 5, 5))


# --------------------------------------------------------------------------- zero mean
def _batchnorm_state(channels, mean_value):
    bn = torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.fill_(mean_value)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn.state_dict()


@pytest.mark.parametrize("strict", [True, False])
def test_loading_a_non_zero_mean_is_refused_naming_the_key(strict):
    model = torch.nn.Sequential(torch.nn.Identity(), MABN2d(4))
    state = {f"1.{k}": v for k, v in _batchnorm_state(4, 0.5).items()}
    with pytest.raises(RuntimeError, match=r"1\.running_mean.*zero by definition"):
        model.load_state_dict(state, strict=strict)
    assert torch.equal(model[1].running_mean, torch.zeros(4)), "the refused mean must not stay in the layer"


@pytest.mark.parametrize("key, index, bad, needle", [
    ("running_var", (2,), float("nan"), "1 of 4 values are NaN or infinite"),
    ("running_var", (0,), -0.25, r"negative values \(smallest -0\.25\)"),
    ("x2_buffer", (1, 3), float("inf"), "1 of 64 values are NaN or infinite"),
    ("gz_buffer", (0, 0), float("-inf"), "1 of 64 values are NaN or infinite"),
    ("weight", (1,), float("nan"), "1 of 4 values are NaN or infinite"),
    ("bias", (3,), float("inf"), "1 of 4 values are NaN or infinite"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_loading_non_finite_state_is_refused_naming_the_key(key, index, bad, needle, strict):
    model = torch.nn.Sequential(torch.nn.Identity(), MABN2d(4))
    source = MABN2d(4)
    with torch.no_grad():
        source.running_var.uniform_(0.5, 2.0)
        source.x2_buffer.uniform_(0.5, 2.0)
    state = {f"1.{k}": v.clone() for k, v in source.state_dict().items()}
    state[f"1.{key}"][index] = bad
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=rf"1\.{key}: {needle}"):
        model.load_state_dict(state, strict=strict)
    assert torch.equal(model.state_dict()[f"1.{key}"], before[f"1.{key}"]), "the refused value must not stay"


def test_loading_a_zero_mean_batchnorm_state_works():
    layer = MABN2d(4)
    state = _batchnorm_state(4, 0.0)
    result = layer.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["gz_buffer", "x2_buffer"] and not result.unexpected_keys
    torch.testing.assert_close(layer.running_var, state["running_var"], rtol=0, atol=0)


def test_running_mean_never_enters_the_math():
    """Even a mean written into the buffer by hand centres nothing, in training or eval."""
    torch.manual_seed(0)
    hparams = dict(buffer_size=2, warmup_iters=3, renorm_warmup_iters=4)
    clean, tampered = MABN2d(3, **hparams).double(), MABN2d(3, **hparams).double()
    with torch.no_grad():
        tampered.running_mean.fill_(0.5)
    for _ in range(7):  # every phase
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64) + 1.0
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = clean(xa), tampered(xb)
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
    clean.eval()
    tampered.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) + 1.0
    torch.testing.assert_close(tampered(x), clean(x), rtol=0, atol=0)
    expected = _view(clean.weight) * x / (_view(clean.running_var) + clean.eps).sqrt() + _view(clean.bias)
    torch.testing.assert_close(clean(x), expected)


def _view(t):
    return t.detach().view(1, -1, 1, 1)


def test_frozen_affine_parameters_get_no_gradient_and_the_input_gradient_is_unchanged():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    dy = torch.randn_like(x)
    grads = []
    for frozen in (False, True):
        layer = MABN2d(3).double()
        layer.bias.requires_grad_(not frozen)
        inp = x.clone().requires_grad_()
        layer(inp).backward(dy)
        grads.append(inp.grad)
        assert (layer.bias.grad is None) == frozen
        torch.testing.assert_close(layer.weight.grad, (dy * x / (x.pow(2).mean((0, 2, 3), keepdim=True) + layer.eps).sqrt()).sum((0, 2, 3)))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_first_iteration_initializes_running_var_from_the_statistic_it_used():
    layer = MABN2d(3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64) * torch.tensor([0.05, 1.0, 7.0], dtype=torch.float64).view(1, 3, 1, 1)
    layer(x.requires_grad_()).sum().backward()
    torch.testing.assert_close(layer.running_var, x.detach().pow(2).mean((0, 2, 3)), rtol=1e-12, atol=0)
    # From iteration 2 on it is the EMA again: decay 0.98 of the old value.
    x2 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    old = layer.running_var.clone()
    layer(x2.requires_grad_()).sum().backward()
    torch.testing.assert_close(layer.running_var, 0.98 * old + 0.02 * x2.detach().pow(2).mean((0, 2, 3)),
                               rtol=1e-12, atol=0)


def test_resume_after_the_first_iteration_continues_exactly():
    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(3)]
    straight = MABN2d(3, buffer_size=2, warmup_iters=2, renorm_warmup_iters=2).double()
    for x in inputs:
        straight(x.clone().requires_grad_()).sum().backward()
    first = MABN2d(3, buffer_size=2, warmup_iters=2, renorm_warmup_iters=2).double()
    first(inputs[0].clone().requires_grad_()).sum().backward()
    resumed = MABN2d(3, buffer_size=2, warmup_iters=2, renorm_warmup_iters=2).double()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for x in inputs[1:]:
        resumed(x.clone().requires_grad_()).sum().backward()
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_eval_allocates_its_zero_mean_once_per_device_and_dtype(monkeypatch):
    layer = MABN2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    first = layer(x)

    def no_allocation(*args, **kwargs):
        raise AssertionError("eval allocated a zero mean again")

    monkeypatch.setattr(torch, "zeros_like", no_allocation)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    monkeypatch.undo()
    layer.double()
    y = layer(x.double())  # a new dtype: a new zero mean
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, first.double(), rtol=1e-6, atol=1e-6)
