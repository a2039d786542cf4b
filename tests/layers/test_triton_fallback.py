"""The first-use check: "auto" falls back to the public path (one warning) when the kernels fail or
disagree, "triton" raises with the cause, and a passing check lets the kernels run.

Run under Triton's interpreter on CPU tensors, with "auto" told that the CPU is a device the
kernels may serve (on a real machine that is CUDA).
"""
import copy
import logging

import pytest
import torch

from mabn_d2.layers import BatchRenorm2d, MABN2d
from mabn_d2.layers import backend as backend_module
from mabn_d2.layers.triton import batch_renorm as triton_batch_renorm, mabn as triton_mabn

from .triton_interpreter import requires_triton_interpreter

pytestmark = requires_triton_interpreter
HPARAMS = dict(buffer_size=2, warmup_iters=3, renorm_warmup_iters=3)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_and_cpu_as_a_kernel_device(monkeypatch):
    backend_module.forget_first_use_checks()
    monkeypatch.setattr(backend_module, "_device_reason", lambda x, backend: None)
    handler = _Warnings()
    backend_module.logger.addHandler(handler)
    yield handler
    backend_module.logger.removeHandler(handler)
    backend_module.forget_first_use_checks()


def _train(layer, steps=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for t in range(steps):
        x = (torch.randn(2, layer.num_features, 3, 4, generator=generator) * (1 + t)).requires_grad_(True)
        y = layer(x)
        y.backward(torch.randn(y.shape, generator=generator))
        outputs.append((y.detach(), x.grad))
    return outputs


def _same_training_as_the_public_path(layer_cls, **kwargs):
    torch.manual_seed(0)
    layer = layer_cls(5, **kwargs)
    public = copy.deepcopy(layer)
    got = _train(layer)
    with backend_module.use_backend("torch"):
        want = _train(public)
    for (y, dx), (y_ref, dx_ref) in zip(got, want):
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)  # bit-equal: the public path ran, state untouched
    for key, value in public.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


def _break_launch(monkeypatch, module):
    def failing_kernel_module(name):
        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    raise RuntimeError("Triton could not build its CUDA driver helper: no C compiler")
                return launch
        real = __import__(f"mabn_d2.layers.triton.{name}", fromlist=["x"])
        stub = type("Stub", (), {k: getattr(real, k) for k in dir(real) if k.isupper()})()
        for kernel in ("forward_statistics_kernel", "backward_statistics_kernel"):
            setattr(stub, kernel, Launch())
        return stub
    monkeypatch.setattr(module, "kernel_module", failing_kernel_module)


@pytest.mark.parametrize("layer_cls, module, kwargs", [
    (MABN2d, triton_mabn, HPARAMS), (BatchRenorm2d, triton_batch_renorm, {})], ids=["mabn", "brn"])
def test_auto_falls_back_with_one_warning_when_a_kernel_fails(
        warnings_and_cpu_as_a_kernel_device, monkeypatch, layer_cls, module, kwargs):
    _break_launch(monkeypatch, module)
    with backend_module.use_backend("auto"):
        _same_training_as_the_public_path(layer_cls, **kwargs)
        _same_training_as_the_public_path(layer_cls, **kwargs)  # a second layer of the same key: no new check
    messages = warnings_and_cpu_as_a_kernel_device.messages
    assert len(messages) == 1, messages
    assert "no C compiler" in messages[0] and "public PyTorch operations" in messages[0]
    assert layer_cls.__name__ in messages[0]
    with backend_module.use_backend("triton"):
        backend_module.forget_first_use_checks()
        with pytest.raises(RuntimeError, match="first-use check .* no C compiler"):
            _train(layer_cls(5, **kwargs), steps=1)


def test_auto_falls_back_when_the_kernels_disagree_with_the_public_path(
        warnings_and_cpu_as_a_kernel_device, monkeypatch):
    real_affine = triton_mabn.launch_channel_affine

    def off_by_a_little(*args, **kwargs):
        return real_affine(*args, **kwargs) * 1.01

    monkeypatch.setattr(triton_mabn, "launch_channel_affine", off_by_a_little)
    with backend_module.use_backend("auto"):
        _same_training_as_the_public_path(MABN2d, **HPARAMS)
    (message,) = warnings_and_cpu_as_a_kernel_device.messages
    assert "differs from the public path at iteration 1" in message
    with backend_module.use_backend("triton"):
        backend_module.forget_first_use_checks()
        with pytest.raises(RuntimeError, match="differs from the public path"):
            _train(MABN2d(5, **HPARAMS), steps=1)


def test_a_passing_check_lets_the_kernels_serve_the_key(warnings_and_cpu_as_a_kernel_device, monkeypatch):
    launched = []
    real_apply = triton_mabn.TritonMABNFunction.apply

    def counting_apply(*args):
        launched.append(args[0].shape)
        return real_apply(*args)

    with backend_module.use_backend("auto"):
        layer = MABN2d(5, **HPARAMS)
        monkeypatch.setattr(triton_mabn.TritonMABNFunction, "apply", counting_apply)
        import mabn_d2.layers.mabn as mabn_module
        monkeypatch.setattr(mabn_module.TritonMABNFunction, "apply", counting_apply)
        _train(layer, steps=2)
    assert not warnings_and_cpu_as_a_kernel_device.messages
    verdicts = backend_module.first_use_verdicts()
    assert list(verdicts.values()) == [None], verdicts
    (key,) = verdicts
    assert key == ("MABN2d", torch.device("cpu"), torch.float32, False, torch.float32)
    assert len(launched) == 4 + 2  # the check's four iterations (once per key), then the layer's two steps
