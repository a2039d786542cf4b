"""MABN's Triton kernels under Triton's CPU interpreter, against the spec and the public-op path.

The kernels run as numpy programs here (TRITON_INTERPRET=1, set by tests/conftest.py before
triton is imported), so tensors are tiny and runs short; the phase settings (buffer 2, warm-ups 3
and 5) put every phase in a few iterations. tests/layers/test_triton_gpu_compile.py compiles the same
kernels for a GPU.
"""
import copy
import dataclasses

import pytest
import torch

from mabn_d2.layers import backend as backend_module
from mabn_d2.layers.triton import launch as triton_launch, mabn as triton_mabn
from mabn_d2.layers import MABNFunction, mabn_phase
from mabn_d2.layers.reference import ReferenceMABN
from mabn_d2.layers.triton.launch import elementwise_plan, reduction_plan
from mabn_d2.layers.nonfinite import new_nonfinite_record
from mabn_d2.layers.triton.mabn import TritonMABNFunction

from .triton_interpreter import requires_triton_interpreter

pytestmark = requires_triton_interpreter

PHASES = dict(buffer_size=2, warmup_iters=3, renorm_warmup_iters=5)
HPARAMS = dict(ema_decay=0.9, eps=1e-5, renorm_clip=1.5)
ITERATIONS = 8  # 1-2 batch statistics, 3-5 moving averages, 6-8 moving averages + clipped r
DETECTION_SHAPES = [
    (2, 64, 200, 336), (2, 256, 200, 336), (2, 512, 100, 168), (2, 1024, 50, 84),
    (2, 2048, 25, 42), (1024, 256, 7, 7), (100, 256, 14, 14),
]
# Several programs per channel block, several channel blocks, epilogue loops one row at a time.
SMALL_TILES = triton_launch.LaunchTuning(
    reduce_tile=16, elementwise_tile=128, programs_per_sm=4, max_channel_block=2, epilogue_rows=1
)


@dataclasses.dataclass
class LayerState:
    weight: torch.Tensor
    bias: torch.Tensor
    running_var: torch.Tensor
    x2_buffer: torch.Tensor
    gz_buffer: torch.Tensor
    iteration: int = 0
    nonfinite: torch.Tensor = dataclasses.field(default_factory=new_nonfinite_record)  # MABN2d.nonfinite_skipped

    @classmethod
    def fresh(cls, channels, dtype=torch.float32, buffer_size=PHASES["buffer_size"]):
        generator = torch.Generator().manual_seed(channels)
        weight = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
        bias = torch.randn(channels, generator=generator, dtype=torch.float64).to(dtype)
        return cls(
            weight.requires_grad_(), bias.requires_grad_(), torch.ones(channels, dtype=dtype),
            torch.zeros(buffer_size, channels, dtype=dtype), torch.zeros(buffer_size, channels, dtype=dtype),
        )

    def step(self, function, x, dy, phases=PHASES, hparams=HPARAMS):
        """One training step through `function`: (y, dx, dweight, dbias)."""
        self.iteration += 1
        phase = mabn_phase(self.iteration, phases["buffer_size"], phases["warmup_iters"], phases["renorm_warmup_iters"])
        x = x.detach().requires_grad_(True)
        y = function.apply(
            x, self.weight, self.bias, self.running_var, self.x2_buffer, self.gz_buffer, phase,
            hparams["ema_decay"], hparams["eps"], hparams["renorm_clip"], self.nonfinite,
        )
        return (y, *torch.autograd.grad(y, (x, self.weight, self.bias), dy))

    def buffers(self):
        return {"running_var": self.running_var, "x2_buffer": self.x2_buffer, "gz_buffer": self.gz_buffer}


def batch(t, channels=3, shape=(2, 5, 7), dtype=torch.float32, seed=0):
    """Inputs whose per-channel scale jumps at iteration 6, so r clips in both directions."""
    generator = torch.Generator().manual_seed(seed * 1000 + t)
    n, h, w = shape
    x = torch.randn(n, channels, h, w, dtype=torch.float64, generator=generator)
    x = x + 0.3 * torch.randn(1, channels, 1, 1, dtype=torch.float64, generator=generator)
    if t >= 6:
        x[:, 0] *= 4.0
        x[:, 1] *= 0.25
    dy = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    return x.to(dtype), dy.to(dtype)


def as_layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def assert_close(actual, expected, tolerance, what):
    torch.testing.assert_close(
        actual.double(), expected.double(), **tolerance, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


FLOAT64 = dict(rtol=1e-10, atol=1e-12)
FLOAT32 = dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "dtype,tuning",
    [(torch.float64, triton_launch.TUNING), (torch.float32, triton_launch.TUNING), (torch.float64, SMALL_TILES)],
    ids=["float64", "float32", "float64_split_reductions"],
)
def test_kernels_follow_the_spec_over_every_phase(dtype, tuning, channels_last, monkeypatch):
    monkeypatch.setattr(triton_launch, "TUNING", tuning)
    channels = 3 if tuning is SMALL_TILES else 5  # fewer programs under the interpreter
    state = LayerState.fresh(channels, dtype)
    spec = ReferenceMABN(channels, **PHASES, **HPARAMS, first_statistic_initializes=False)
    tolerance = FLOAT64 if dtype == torch.float64 else FLOAT32
    for t in range(1, ITERATIONS + 1):
        x, dy = batch(t, channels, dtype=dtype)
        x, dy = as_layout(x, channels_last), as_layout(dy, channels_last)
        y, dx, dweight, dbias = state.step(TritonMABNFunction, x, dy)
        expected = spec.step(x, dy, state.weight, state.bias)
        for name, got, want in zip(("y", "dx", "dweight", "dbias"), (y, dx, dweight, dbias), expected):
            assert_close(got, want, tolerance, f"{name} at iteration {t}")
        assert_close(state.running_var, spec.running_var, tolerance, f"running_var at iteration {t}")
        assert_close(state.x2_buffer, spec.x2, tolerance, f"x2_buffer at iteration {t}")
        assert_close(state.gz_buffer, spec.gz, tolerance, f"gz_buffer at iteration {t}")
        assert y.dtype == dx.dtype == dtype and dweight.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert dx.stride() == x.stride()
    assert spec.clipped_high > 0 and spec.clipped_low > 0, "the run never clipped r in both directions"
    plan = reduction_plan(2, channels, 35, channels_last, 1, tuning)
    if tuning is SMALL_TILES:
        assert plan.num_splits > 1 and plan.channel_blocks > 1, plan
    assert not triton_launch.arrival_counters(torch.device("cpu"), 1).any(), "a reduction left its counter set"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernels_match_the_public_operation_path(channels_last):
    channels = 4
    triton_state, torch_state = LayerState.fresh(channels), LayerState.fresh(channels)
    for t in range(1, ITERATIONS + 1):
        x, dy = batch(t, channels, shape=(3, 4, 6), seed=1)
        x, dy = as_layout(x, channels_last), as_layout(dy, channels_last)
        got = triton_state.step(TritonMABNFunction, x, dy)
        want = torch_state.step(MABNFunction, x, dy)
        for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
            assert_close(a, b, FLOAT32, f"{name} at iteration {t}")
        for name, value in triton_state.buffers().items():
            assert_close(value, torch_state.buffers()[name], FLOAT32, f"{name} at iteration {t}")


def test_several_forwards_before_one_backward_match_the_public_path():
    states = {fn: LayerState.fresh(3) for fn in (TritonMABNFunction, MABNFunction)}
    results = {}
    for function, state in states.items():
        grads = []
        for t in range(1, 4):
            inputs = [batch(t, shape=(2, s, s), seed=s)[0].requires_grad_() for s in (4, 3)]
            phases = [mabn_phase(state.iteration + i + 1, **PHASES) for i in range(len(inputs))]
            state.iteration += len(inputs)
            outputs = [
                function.apply(x, state.weight, state.bias, state.running_var, state.x2_buffer, state.gz_buffer,
                               phase, *HPARAMS.values())
                for x, phase in zip(inputs, phases)
            ]
            loss = sum(y.pow(2).sum() for y in outputs)
            grads.append(torch.autograd.grad(loss, inputs))
        results[function] = (grads, state.buffers())
    (grads_a, buffers_a), (grads_b, buffers_b) = results.values()
    for a, b in zip(grads_a, grads_b):
        for ga, gb in zip(a, b):
            assert_close(ga, gb, FLOAT32, "input grad")
    for name in buffers_a:
        assert_close(buffers_a[name], buffers_b[name], FLOAT32, name)


def test_create_graph_gives_the_same_gradients_and_refuses_a_second_order():
    """The backward skips once_differentiable's wrapping per step, but not under create_graph."""
    x, dy = batch(3, 3)
    dy.requires_grad_(True)  # an upstream gradient that is itself differentiable
    results = []
    for create_graph in (False, True):
        state = LayerState.fresh(3)
        for t in range(1, 4):  # into the moving-average phase
            state.iteration += 1
            phase = mabn_phase(state.iteration, **PHASES)
            inputs = x.detach().requires_grad_(True)
            y = TritonMABNFunction.apply(inputs, state.weight, state.bias, state.running_var, state.x2_buffer,
                                         state.gz_buffer, phase, *HPARAMS.values())
            grads = torch.autograd.grad(y, (inputs, state.weight, state.bias), dy, create_graph=create_graph)
        results.append(grads)
    for a, b in zip(*results):
        assert_close(b.detach(), a, FLOAT64 | dict(rtol=0, atol=0), "gradient with create_graph")
    with pytest.raises(RuntimeError, match="once_differentiable"):
        results[1][0].sum().backward()


def test_backwards_of_different_geometries_share_one_scratch_and_match_the_public_path(monkeypatch):
    """The backward works in a per-stream scratch that grows to the largest geometry seen: a
    small layer after a large one (a stale tail) and a large one after a small one (growth)."""
    monkeypatch.setattr(triton_launch, "TUNING", SMALL_TILES)  # many partial-sum rows per backward
    monkeypatch.setattr(triton_launch, "_scratch", {})
    shapes = [(3, (2, 6, 6)), (2, (1, 2, 3)), (4, (2, 5, 9)), (2, (1, 2, 3))]  # (channels, (n, h, w))
    states = {fn: [LayerState.fresh(c) for c, _ in shapes] for fn in (TritonMABNFunction, MABNFunction)}
    sizes = []
    for t in range(1, 5):
        results = {}
        for function, layer_states in states.items():
            results[function] = [
                layer_state.step(function, *batch(t, c, shape=shape, seed=i))
                for i, (layer_state, (c, shape)) in enumerate(zip(layer_states, shapes))
            ]
            sizes.append([s.numel() for s in triton_launch._scratch.values()])
        for i, (got, want) in enumerate(zip(*results.values())):
            for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
                assert_close(a, b, FLOAT32, f"layer {i} {name} at iteration {t}")
    assert all(len(s) == 1 for s in sizes), "one scratch per (device, thread or stream, dtype)"
    assert sizes[0][0] >= max(plan_rows * c for c, plan_rows in _backward_rows(shapes))


def _backward_rows(shapes):
    for c, (n, h, w) in shapes:
        plan = reduction_plan(n, c, h * w, False, 1, SMALL_TILES)
        yield c, 1 + 2 * plan.num_splits


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, for inf * 0
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "phases,iteration",
    [
        (PHASES, 1),  # batch statistics
        (PHASES, 7),  # moving averages and re-normalization
        (dict(buffer_size=4, warmup_iters=1, renorm_warmup_iters=2), 3),  # batch statistics with r
    ],
    ids=["batch_statistics", "moving_averages", "batch_statistics_renormalized"],
)
def test_non_finite_batch_behaves_like_the_public_path(bad, phases, iteration):
    triton_state = LayerState.fresh(3, buffer_size=phases["buffer_size"])
    torch_state = LayerState.fresh(3, buffer_size=phases["buffer_size"])
    for t in range(1, iteration):
        x, dy = batch(t)
        triton_state.step(TritonMABNFunction, x, dy, phases)
        torch_state.step(MABNFunction, x, dy, phases)
    before = copy.deepcopy(triton_state.buffers())
    x, dy = batch(iteration)
    x[0, 0, 1, 1] = bad
    got = triton_state.step(TritonMABNFunction, x, dy, phases)
    want = torch_state.step(MABNFunction, x, dy, phases)
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert_close(a, b, FLOAT32, name)  # same values, same non-finite entries
    slot = iteration % phases["buffer_size"]
    for name, value in triton_state.buffers().items():
        assert torch.isfinite(value).all(), f"{bad} reached {name}"
        assert_close(value, torch_state.buffers()[name], FLOAT32, name)
    assert torch.equal(triton_state.x2_buffer[slot, 0], before["x2_buffer"][slot, 0]), "poisoned row was written"
    assert not torch.equal(triton_state.x2_buffer[slot, 1:], before["x2_buffer"][slot, 1:])
    # counted once (chi2_B and Psi_B both non-finite), as the public path counts it
    assert triton_state.nonfinite.tolist() == torch_state.nonfinite.tolist() == [1, iteration]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_non_finite_batches_are_counted_once_across_channel_blocks(channels_last, monkeypatch):
    """Several channel blocks (each its own program and atomics) meet NaN in one step; a later
    step has a non-finite gradient only. Counts and state match the public path."""
    monkeypatch.setattr(triton_launch, "TUNING", SMALL_TILES)  # channel blocks of 2 channels
    channels = 5
    states = {fn: LayerState.fresh(channels) for fn in (TritonMABNFunction, MABNFunction)}
    for t in range(1, 7):
        x, dy = batch(t, channels, shape=(2, 3, 4), seed=2)
        if t == 2:
            x[0, 0, 1, 1] = x[1, 3, 0, 2] = x[0, 4, 2, 3] = float("nan")  # blocks 0, 1 and 2
        if t == 5:
            dy[1, 2, 0, 0] = float("inf")
        x, dy = as_layout(x, channels_last), as_layout(dy, channels_last)
        for function, state in states.items():
            state.step(function, x, dy)
        triton_state, torch_state = states.values()
        for name, value in triton_state.buffers().items():
            assert torch.isfinite(value).all(), f"a non-finite statistic reached {name} at iteration {t}"
            assert_close(value, torch_state.buffers()[name], FLOAT32, f"{name} at iteration {t}")
        assert triton_state.nonfinite.tolist() == torch_state.nonfinite.tolist(), f"iteration {t}"
    assert triton_state.nonfinite.tolist() == [2, 5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_accumulates_and_keeps_state_in_float32(dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    state = LayerState.fresh(4)
    spec = ReferenceMABN(4, **PHASES, **HPARAMS, first_statistic_initializes=False)
    for t in range(1, ITERATIONS + 1):
        x, _ = batch(t)
        with torch.autocast("cpu", dtype=dtype):
            features = conv(x)
        assert features.dtype == dtype
        dy = torch.randn(features.shape).to(dtype)
        with torch.autocast("cpu", dtype=dtype):
            y, dx, dweight, dbias = state.step(TritonMABNFunction, features.detach(), dy)
        assert y.dtype == dx.dtype == dtype and dweight.dtype == torch.float32
        # Reduced precision in the activations only: statistics are float32 sums of exact products.
        y_ref, dx_ref, dweight_ref, dbias_ref = spec.step(features, dy, state.weight, state.bias)
        reduced = dict(rtol=1e-2, atol=1e-2)
        assert_close(y, y_ref, reduced, f"y at iteration {t}")
        assert_close(dx, dx_ref, reduced, f"dx at iteration {t}")
        assert_close(dweight, dweight_ref, FLOAT32, f"dweight at iteration {t}")
        assert_close(dbias, dbias_ref, FLOAT32, f"dbias at iteration {t}")
        for name, value in state.buffers().items():
            assert value.dtype == torch.float32, name
        assert_close(state.x2_buffer, spec.x2, FLOAT32, f"x2_buffer at iteration {t}")
        assert_close(state.gz_buffer, spec.gz, FLOAT32, f"gz_buffer at iteration {t}")
        assert_close(state.running_var, spec.running_var, FLOAT32, f"running_var at iteration {t}")


def test_gradient_of_a_strided_upstream_gradient():
    """dy from .sum() is an expanded tensor, and a channels_last x may get an NCHW dy."""
    for channels_last in (False, True):
        triton_state, torch_state = LayerState.fresh(3), LayerState.fresh(3)
        x = as_layout(batch(1)[0], channels_last)
        for dy in (torch.ones(1, 1, 1, 1).expand(x.shape), torch.randn(x.shape)):
            got = triton_state.step(TritonMABNFunction, x, dy)
            want = torch_state.step(MABNFunction, x, dy)
            for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
                assert_close(a, b, FLOAT32, name)


def test_gradcheck_in_the_batch_statistics_phase():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 1, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = (torch.rand(2, dtype=torch.float64, generator=generator) + 0.5).requires_grad_(True)
    bias = torch.randn(2, dtype=torch.float64, generator=generator, requires_grad=True)

    def first_step(x, weight, bias):
        state = [torch.ones(2, dtype=torch.float64)] + [torch.zeros(2, 2, dtype=torch.float64) for _ in range(2)]
        return TritonMABNFunction.apply(x, weight, bias, *state, mabn_phase(1, 2, 3, 5), *HPARAMS.values())

    assert torch.autograd.gradcheck(first_step, (x, weight, bias), fast_mode=True)


def test_only_the_input_is_saved_for_backward():
    state = LayerState.fresh(3)
    x = batch(1)[0].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        TritonMABNFunction.apply(x, state.weight, state.bias, state.running_var, state.x2_buffer, state.gz_buffer,
                                 mabn_phase(1, **PHASES), *HPARAMS.values())
    activation_sized = [t for t in saved if t.numel() >= x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0].data_ptr() == x.data_ptr()


def test_empty_batch_is_refused_without_touching_the_state():
    state = LayerState.fresh(3)
    before = copy.deepcopy(state.buffers())
    with pytest.raises(ValueError, match="non-empty"):
        state.step(TritonMABNFunction, torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4))
    for name, value in state.buffers().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("shape", DETECTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_launch_plans_fit_a_gpu(shape, channels_last):
    n, c, h, w = shape
    tuning = triton_launch.TUNING
    plan = reduction_plan(n, c, h * w, channels_last, 132, tuning)  # an H100/H200 has 132 SMs
    for block in (plan.block_r, plan.block_c):
        assert block & (block - 1) == 0, plan
    assert plan.block_r * plan.block_c <= tuning.reduce_tile
    assert plan.channel_blocks * plan.block_c >= c > (plan.channel_blocks - 1) * plan.block_c
    assert 1 <= plan.num_splits <= min(plan.num_tiles, 65535)
    assert plan.block_s & (plan.block_s - 1) == 0 and plan.block_s * plan.block_c <= tuning.reduce_tile
    assert plan.num_tiles * plan.block_r >= n * h * w, "tiles do not cover every row"
    assert plan.channel_blocks * plan.num_splits >= 132, "the reduction leaves SMs idle"
    elementwise = elementwise_plan(n, c, h * w, channels_last, tuning)
    assert elementwise.block_m * elementwise.block_k <= tuning.elementwise_tile
    assert elementwise.grid[0] * elementwise.block_m >= elementwise.rows
    assert elementwise.grid[1] * elementwise.block_k >= elementwise.row_len
    assert elementwise.grid[0] < 2**31 and elementwise.grid[1] <= 65535


def test_backend_switch(monkeypatch):
    monkeypatch.delenv(backend_module.BACKEND_ENV_VAR, raising=False)
    assert backend_module.selected_backend() == "auto"
    monkeypatch.setenv(backend_module.BACKEND_ENV_VAR, "Torch")
    assert backend_module.selected_backend() == "torch"
    with backend_module.use_backend("triton"):
        assert backend_module.selected_backend() == "triton"
    assert backend_module.selected_backend() == "torch"
    monkeypatch.setenv(backend_module.BACKEND_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MABN_D2_BACKEND"):
        backend_module.selected_backend()
    with pytest.raises(ValueError, match="auto, triton, torch"):
        backend_module.set_backend("fast")

    x = torch.randn(2, 3, 4, 4)
    supported = lambda: None  # noqa: E731
    with backend_module.use_backend("auto"):
        assert not backend_module.use_triton(x, supported, "MABN2d"), "auto must not interpret on the CPU"
    with backend_module.use_backend("torch"):
        assert not backend_module.use_triton(x, supported, "MABN2d")
    with backend_module.use_backend("triton"):
        assert backend_module.use_triton(x, supported, "MABN2d")  # CPU under the interpreter
        with pytest.raises(RuntimeError, match="float64 state"):
            backend_module.use_triton(x, lambda: "input dtype torch.float32 with float64 state", "MABN2d")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="CUDA needed"):
            backend_module.use_triton(x, supported, "MABN2d")


def test_unsupported_inputs_are_named():
    state = LayerState.fresh(3)
    args = (state.weight, state.bias, state.running_var, state.x2_buffer, state.gz_buffer)
    reason = triton_mabn.triton_mabn_unsupported_reason
    assert reason(torch.randn(2, 3, 4, 4), *args) is None
    assert reason(torch.randn(2, 3, 4, 4).to(torch.bfloat16), *args) is None
    assert reason(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last), *args) is None
    assert "float64" in reason(torch.randn(2, 3, 4, 4, dtype=torch.float64), *args)
    assert "contiguous" in reason(torch.randn(2, 3, 4, 8)[..., ::2], *args)
    assert "empty" in reason(torch.randn(0, 3, 4, 4), *args)


class _CountingTritonStep(TritonMABNFunction):
    """TritonMABNFunction that counts its forwards (to see which path MABN2d took)."""

    calls = 0

    @staticmethod
    def forward(ctx, *args):
        _CountingTritonStep.calls += 1
        return TritonMABNFunction.forward(ctx, *args)


def test_mabn2d_follows_the_switch_and_both_paths_agree(monkeypatch):
    import mabn_d2.layers.mabn as mabn_module
    from mabn_d2.layers import MABN2d

    monkeypatch.setattr(mabn_module, "TritonMABNFunction", _CountingTritonStep)
    _CountingTritonStep.calls = 0
    layers = {backend: MABN2d(3, **PHASES, **HPARAMS) for backend in ("triton", "torch")}
    for t in range(1, ITERATIONS + 1):
        x, dy = batch(t, shape=(2, 4, 5), seed=3)
        if t % 2:
            x, dy = as_layout(x, True), as_layout(dy, True)
        results = {}
        for backend, layer in layers.items():
            empty = torch.randn(0, 3, 4, 5, requires_grad=True)
            with backend_module.use_backend(backend):
                before = copy.deepcopy(layer.state_dict())
                layer(empty).sum().backward()  # an empty batch: eval form, state untouched
                for key, value in layer.state_dict().items():
                    assert torch.equal(value, before[key]), f"an empty batch changed {key}"
                xb = x.clone().requires_grad_()
                y = layer(xb)
                results[backend] = (y, *torch.autograd.grad(y, (xb, layer.weight, layer.bias), dy))
        for name, a, b in zip(("y", "dx", "dweight", "dbias"), results["triton"], results["torch"]):
            assert_close(a, b, FLOAT32, f"{name} at iteration {t}")
    for name in ("running_var", "x2_buffer", "gz_buffer", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layers["triton"], name), getattr(layers["torch"], name), rtol=2e-5, atol=2e-6)
    assert _CountingTritonStep.calls == ITERATIONS, "the triton backend did not run every training step on Triton"
    with backend_module.use_backend("auto"):
        layers["triton"](batch(1)[0])  # CPU tensors: auto takes the public operations
        layers["triton"].eval()
        layers["triton"](batch(1)[0])
    assert _CountingTritonStep.calls == ITERATIONS


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_mabn2d_on_triton_counts_a_nan_batch_and_keeps_its_averages():
    from mabn_d2.layers import MABN2d

    layer = MABN2d(3, **PHASES, **HPARAMS)
    with backend_module.use_backend("triton"):
        for t in range(1, 5):
            layer(batch(t)[0].requires_grad_()).pow(2).sum().backward()
        before = copy.deepcopy(layer.state_dict())
        x = batch(5)[0]
        x[:, 1] = float("nan")
        layer(x.requires_grad_()).pow(2).sum().backward()
    assert layer.nonfinite_skipped.tolist() == [1, 5]
    slot = 5 % PHASES["buffer_size"]
    assert torch.equal(layer.x2_buffer[slot, 1], before["x2_buffer"][slot, 1])
    assert torch.equal(layer.gz_buffer[slot, 1], before["gz_buffer"][slot, 1])
    for name in ("running_var", "x2_buffer", "gz_buffer"):
        assert torch.isfinite(getattr(layer, name)).all(), name


def test_forced_triton_refuses_a_layout_it_cannot_read_before_touching_the_state():
    from mabn_d2.layers import MABN2d

    layer = MABN2d(3, **PHASES)
    strided = torch.randn(2, 3, 4, 10)[..., ::2]
    with backend_module.use_backend("triton"), pytest.raises(RuntimeError, match="neither contiguous"):
        layer(strided)
    assert layer.iteration == 0 and int(layer.num_batches_tracked) == 0
    with backend_module.use_backend("auto"):
        layer(strided)  # public operations on the CPU
    assert layer.iteration == 1
