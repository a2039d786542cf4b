"""The layers' check on one CUDA GPU (tools/check_cuda.py is its command line, `main` its CLI):
one streamed table of correctness, host syncs and autocast for MABN2d and BatchRenorm2d.

1. correctness: MABN2d over every phase (batch statistics, moving averages, clipped
   re-normalization), with short warm-ups and with the layer's defaults (mabn_d2.layers.hyperparams),
   against the float64 CPU computation of the algorithm in mabn_d2.layers.reference (independent of
   the layers), in float64, float32 and float32 channels_last on the GPU; BatchRenorm2d against its
   own float64 run on the CPU;
2. no host synchronisation: training steps across every phase boundary, then eval and an
   empty batch, under torch.cuda.set_sync_debug_mode("error"), with no tensor value read
   on the host;
3. bf16 and fp16 autocast: finite outputs and gradients, float32 state, chi2 as in float32.

Each check runs once per training-step backend (MABN_D2_BACKEND): "torch", the public PyTorch
operations, always; "triton" (the strict Triton backend) too when Triton is installed.
Rows say which ("[torch] ...").

Before all of it, a smoke stage (about 30 s): the strict "triton" backend on every kernel variant
(float32, bfloat16, float16, float64; NCHW and channels_last; every MABN phase; Batch
Renormalization with r and d clipped and free) at multi-program shapes against the public path,
and every arrival counter zero afterwards. It fails fast, in one line.

Every row is printed (and flushed) as its section finishes and appended to `--output FILE` with
its details; the printed summary at the end fits in 8 KB: pass/fail per section, the failed rows,
then the speed ratios of any timing section a caller added. About a minute on one GPU.

Needs torch with CUDA and an importable detectron2 (its pure-Python part is enough, e.g. on
PYTHONPATH with fvcore, iopath, yacs, omegaconf, ...).
Exit status: 0 every check passed, 1 a check failed, 2 no CUDA GPU or the project does not import.

A caller extends the table (tools/benchmark_cuda.py does): `extra_layers` adds layers (name:
factory of a layer with warm-ups short enough to cross every phase in SHORT_ITERATIONS steps)
to the correctness, host-sync and autocast sections, and `extra_sections` adds sections
(name, rows_of(first_backend) -> rows), run per backend into the same table and summary.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import os
import sys
from typing import Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..utils.errors import first_line
from .backend import first_use_verdicts, use_backend
from .batch_renorm import BatchRenorm2d, batch_renorm_step
from .centered_conv import CenteredConv2d
from .hyperparams import MABN_HYPERPARAMETERS, defaults
from .mabn import MABN2d, MABNFunction
from .reference import ReferenceMABN

__all__ = ["Unavailable", "Row", "Reporter", "run_checks", "main", "build_parser", "markdown",
           "SHORT_PHASES", "DEFAULT_PHASES"]

DIMS = (0, 2, 3)  # the independent chi2 of the autocast check, written out (not channel_ops')
# Phases in a few iterations: batch statistics 1-6, moving averages 7-20, re-normalization 21-40.
SHORT_PHASES = dict(buffer_size=4, ema_decay=0.9, warmup_iters=7, renorm_warmup_iters=20, renorm_clip=1.5, eps=1e-3)
SHORT_ITERATIONS, SHORT_JUMP = 40, 25
# The layer's defaults (written once, in hyperparams.py); the run goes 100 iterations past the
# start of re-normalization, with the input's scales jumping 50 iterations in, so r clips.
DEFAULT_PHASES = defaults(MABN_HYPERPARAMETERS)
DEFAULT_ITERATIONS = DEFAULT_PHASES["renorm_warmup_iters"] + 100
DEFAULT_JUMP = DEFAULT_PHASES["renorm_warmup_iters"] + 50
LIMITS = {torch.float64: 1e-9, torch.float32: 1e-4}
INPUT_SHAPE = (2, 6, 5, 7)

LayerFactory = Callable[[int], torch.nn.Module]
HostReadWatch = Callable[[], ContextManager[None]]


class Unavailable(Exception):
    """The check cannot run here (no CUDA GPU, project not importable); a one-line reason."""


@dataclasses.dataclass
class Row:
    section: str
    case: str
    result: str
    limit: str = ""
    status: str = "info"  # "ok", "FAIL" or "info" (a measurement without a limit)
    speed_ratio: bool = False  # a timing ratio against its target: repeated in the summary's "speed ratios"


# The sections run_checks runs: (name, rows_of(first_backend) -> rows); rows_of runs under each
# backend in turn, first_backend True for the first (where backend-independent work belongs).
Section = Tuple[str, Callable[[bool], List[Row]]]


# --------------------------------------------------------------------------- environment
def cuda_device(name: str) -> torch.device:
    """The CUDA device `name` names, or Unavailable saying why it cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Unavailable(f"--device {name!r} is not a device name (expected cuda or cuda:N)") from None
    if device.type != "cuda":
        raise Unavailable(f"--device must be a CUDA device, got {name!r}")
    if not torch.cuda.is_available():
        raise Unavailable(
            f"no CUDA GPU available (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "run this on a machine with a CUDA GPU"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise Unavailable(f"{name} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def select_device(name: str) -> torch.device:
    """The device to check: a CUDA device (see cuda_device)."""
    return cuda_device(name)


def available_backends() -> List[str]:
    """The training-step backends worth checking here: public operations, and Triton's if installed.

    Triton's rows use the strict "triton" backend: a refused or failed kernel is an error, so a
    silent fallback can never be judged as Triton.
    """
    return ["torch", "triton"] if importlib.util.find_spec("triton") is not None else ["torch"]


def backend_context(name: str) -> ContextManager[None]:
    """Run the block with the layers' training step on backend `name` ("torch", "auto", "triton")."""
    return use_backend(name)


# --------------------------------------------------------------------------- correctness
def phase_inputs(t: int, generator: torch.Generator, jump_at: int, shape=INPUT_SHAPE) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 (x, dy) for iteration t; channel scales jump after `jump_at` so r clips both ways."""
    channels = shape[1]
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    x = x * (1.0 + 0.5 * torch.rand(1, channels, 1, 1, dtype=torch.float64, generator=generator))
    x = x + 0.3 * torch.randn(1, channels, 1, 1, dtype=torch.float64, generator=generator)
    if t > jump_at:
        x[:, 0] *= 12.0
        x[:, 1] *= 0.02
    return x, torch.randn(shape, dtype=torch.float64, generator=generator)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (want in float64 on the CPU)."""
    got = got.detach().to(device="cpu", dtype=torch.float64)
    want = want.detach()
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _on(t: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    t = t.to(device=device, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def check_mabn_against_spec(
    device: torch.device, dtype: torch.dtype, hparams: Dict, iterations: int, jump_at: int, channels_last: bool = False
) -> Row:
    """MABN2d on `device` in `dtype` against ReferenceMABN (mabn_d2.layers.reference), over `iterations` training steps."""
    channels = INPUT_SHAPE[1]
    layer = MABN2d(channels, **hparams).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1.5, 1.5, channels) + 0.1)
        layer.bias.copy_(torch.linspace(-0.3, 0.3, channels))
    gamma, beta = (p.detach().to("cpu", torch.float64) for p in (layer.weight, layer.bias))
    spec = ReferenceMABN(channels, **hparams)
    generator = torch.Generator().manual_seed(0)
    errors: Dict[str, float] = {}
    for t in range(1, iterations + 1):
        x64, dy64 = phase_inputs(t, generator, jump_at)
        x = _on(x64, device, dtype, channels_last).requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(_on(dy64, device, dtype, channels_last))
        expected = spec.step(x64, dy64, gamma, beta)
        for name, got, want in zip(("y", "dx", "dgamma", "dbeta"), (y, x.grad, layer.weight.grad, layer.bias.grad), expected):
            errors[name] = max(errors.get(name, 0.0), relative_error(got, want))
    for name, want in (("running_var", spec.running_var), ("x2_buffer", spec.x2), ("gz_buffer", spec.gz)):
        errors[name] = relative_error(getattr(layer, name), want)
    case = f"MABN2d {_dtype_name(dtype)}{' channels_last' if channels_last else ''} vs float64 spec on the CPU, " \
           f"{iterations} it. (buffer {hparams['buffer_size']}, warm-ups {hparams['warmup_iters']}/{hparams['renorm_warmup_iters']})"
    return _error_row("correctness", case, errors, LIMITS[dtype], spec.clipped > 0)


def _error_row(section: str, case: str, errors: Dict[str, float], limit: float, covered: bool = True) -> Row:
    worst_name = max(errors, key=errors.get)
    worst = errors[worst_name]
    result = f"max rel. error {worst:.1e} ({worst_name})"
    if not covered:
        result += "; re-normalization never clipped: phases not covered"
    return Row(section, case, result, f"<= {limit:.0e}", "ok" if worst <= limit and covered else "FAIL")


def short_phase_layers(extra_layers: Optional[Mapping[str, LayerFactory]] = None) -> Dict[str, LayerFactory]:
    """The trainable layers besides MABN2d, with warm-ups short enough to cross every phase in
    SHORT_ITERATIONS steps: BatchRenorm2d, then `extra_layers` (a caller's)."""
    return {
        "BatchRenorm2d": lambda c: BatchRenorm2d(
            c, ema_update_rate=0.1, r_max=1.5, d_max=0.5, warmup_iters=5, r_max_ramp_iters=10, d_max_ramp_iters=10
        ),
        **(extra_layers or {}),
    }


def check_layer_against_cpu(
    device: torch.device, dtype: torch.dtype, name: str, factory: LayerFactory, iterations: int
) -> Row:
    """A layer on `device` in `dtype` against the same layer in float64 on the CPU."""
    channels = INPUT_SHAPE[1]
    reference = factory(channels).double()
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(-1.5, 1.5, channels) + 0.1)
        reference.bias.copy_(torch.linspace(-0.3, 0.3, channels))
    layer = copy.deepcopy(reference).to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    errors: Dict[str, float] = {}
    for t in range(1, iterations + 1):
        x64, dy64 = phase_inputs(t, generator, SHORT_JUMP)
        outputs = []
        for module, x in ((reference, x64.clone()), (layer, x64.to(device=device, dtype=dtype))):
            x.requires_grad_(True)
            module.weight.grad = module.bias.grad = None
            y = module(x)
            y.backward(dy64.to(device=device, dtype=dtype) if module is layer else dy64)
            outputs.append((y, x.grad, module.weight.grad, module.bias.grad))
        for key, got, want in zip(("y", "dx", "dgamma", "dbeta"), outputs[1], outputs[0]):
            errors[key] = max(errors.get(key, 0.0), relative_error(got, want.detach()))
    for key, want in reference.state_dict().items():
        if want.is_floating_point():
            errors[key] = relative_error(layer.state_dict()[key], want)
    case = f"{name} {_dtype_name(dtype)} vs its float64 run on the CPU, {iterations} it. (every phase)"
    return _error_row("correctness", case, errors, LIMITS[dtype])


def correctness_rows(device: torch.device, default_iterations: int = DEFAULT_ITERATIONS,
                     extra_layers: Optional[Mapping[str, LayerFactory]] = None) -> List[Row]:
    """MABN2d against the spec (short and default warm-ups), then the other layers against their CPU run."""
    rows = []
    for dtype in (torch.float64, torch.float32):
        rows.append(_guarded("correctness", f"MABN2d {_dtype_name(dtype)}, short warm-ups", lambda d=dtype: check_mabn_against_spec(
            device, d, SHORT_PHASES, SHORT_ITERATIONS, SHORT_JUMP)))
    rows.append(_guarded("correctness", "MABN2d float32 channels_last", lambda: check_mabn_against_spec(
        device, torch.float32, SHORT_PHASES, SHORT_ITERATIONS, SHORT_JUMP, channels_last=True)))
    jump = default_iterations - (DEFAULT_ITERATIONS - DEFAULT_JUMP)
    for dtype in (torch.float64, torch.float32):
        rows.append(_guarded("correctness", f"MABN2d {_dtype_name(dtype)}, default warm-ups", lambda d=dtype: check_mabn_against_spec(
            device, d, DEFAULT_PHASES, default_iterations, jump)))
    for name, factory in short_phase_layers(extra_layers).items():
        for dtype in (torch.float64, torch.float32):
            rows.append(_guarded("correctness", f"{name} {_dtype_name(dtype)}", lambda n=name, f=factory, d=dtype: check_layer_against_cpu(
                device, d, n, f, SHORT_ITERATIONS)))
    return rows


# --------------------------------------------------------------------------- host synchronisation
@contextlib.contextmanager
def no_host_sync(device: torch.device, host_read_watch: Optional[HostReadWatch] = None) -> Iterator[None]:
    """Raise on any synchronising CUDA call (on CUDA), and on any host read of a tensor value that
    `host_read_watch()` catches: tools/check_cuda.py passes one (a dispatch-mode watch, which names
    ATen ops and so stays out of the package), which is how the check also bites on the CPU."""
    on_cuda = torch.device(device).type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if on_cuda else 0
    if on_cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with host_read_watch() if host_read_watch is not None else contextlib.nullcontext():
            yield
    finally:
        if on_cuda:
            torch.cuda.set_sync_debug_mode(previous)


def check_no_host_sync(device: torch.device, name: str, layer: torch.nn.Module, iterations: int,
                       host_read_watch: Optional[HostReadWatch] = None) -> Row:
    """`iterations` training steps, an eval forward and an empty batch, with no host synchronisation."""
    layer = layer.to(device)
    generator = torch.Generator().manual_seed(2)
    steps = []
    for t in range(1, iterations + 1):
        x, dy = phase_inputs(t, generator, SHORT_JUMP)
        steps.append((x.float().to(device).requires_grad_(True), dy.float().to(device)))
    empty = torch.zeros((0,) + INPUT_SHAPE[1:], device=device, requires_grad=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    case = f"{name}: {iterations} training steps across every phase boundary, eval, empty batch"
    try:
        with no_host_sync(device, host_read_watch):
            for x, dy in steps:
                layer(x).backward(dy)
            layer.eval()
            with torch.no_grad():
                layer(steps[0][0])
            layer.train()
            layer(empty).sum().backward()
    except RuntimeError as error:
        return Row("no host sync", case, _error_cell(error), "none", "FAIL")
    return Row("no host sync", case, "none", "none", "ok")


def _all_layers(extra_layers: Optional[Mapping[str, LayerFactory]]) -> Dict[str, LayerFactory]:
    return {"MABN2d": lambda c: MABN2d(c, **SHORT_PHASES), **short_phase_layers(extra_layers)}


def host_sync_rows(device: torch.device, iterations: int = SHORT_ITERATIONS,
                   host_read_watch: Optional[HostReadWatch] = None,
                   extra_layers: Optional[Mapping[str, LayerFactory]] = None) -> List[Row]:
    return [
        _guarded("no host sync", name, lambda n=name, f=factory: check_no_host_sync(
            device, n, f(INPUT_SHAPE[1]), iterations, host_read_watch))
        for name, factory in _all_layers(extra_layers).items()
    ]


# --------------------------------------------------------------------------- autocast
def check_autocast(device: torch.device, dtype: torch.dtype, name: str, layer: torch.nn.Module, iterations: int) -> Row:
    """conv -> layer under autocast: output in `dtype`, finite everywhere, float32 state, chi2 as in float32."""
    torch.manual_seed(3)
    conv = CenteredConv2d(3, INPUT_SHAPE[1], 3, padding=1).to(device)  # MABN refuses a raw-weight convolution
    layer = layer.to(device)
    problems: List[str] = []
    chi2_error = 0.0
    for _ in range(iterations):
        x = torch.randn(2, 3, 12, 16, device=device)
        with torch.autocast(device.type, dtype=dtype):
            features = conv(x)
            y = layer(features)
        y.float().pow(2).mean().backward()
        if y.dtype != dtype:
            problems.append(f"output {y.dtype}")
        grads = [conv.weight.grad, layer.weight.grad, layer.bias.grad]
        if not torch.isfinite(y).all() or not all(torch.isfinite(g).all() for g in grads):
            problems.append("non-finite output or gradient")
        if hasattr(layer, "x2_buffer") and hasattr(layer, "gz_buffer") and not hasattr(layer, "mean_buffer"):
            slot = layer.iteration % layer.buffer_size
            chi2_error = max(chi2_error, relative_error(layer.x2_buffer[slot], features.detach().double().pow(2).mean(DIMS).cpu()))
        conv.zero_grad(set_to_none=True)
        layer.zero_grad(set_to_none=True)
    for key, value in layer.state_dict().items():
        if value.is_floating_point() and (value.dtype != torch.float32 or not torch.isfinite(value).all()):
            problems.append(f"state {key} {value.dtype}")
    if chi2_error > 1e-3:
        problems.append(f"chi2 rel. error {chi2_error:.1e}")
    case = f"{name} under {_dtype_name(dtype)} autocast, {iterations} it. (every phase)"
    result = "; ".join(sorted(set(problems))) or (
        f"finite, output {_dtype_name(dtype)}, state float32" + (f", chi2 rel. error {chi2_error:.0e}" if chi2_error else "")
    )
    return Row("autocast", case, result, "finite, float32 state", "FAIL" if problems else "ok")


def autocast_rows(device: torch.device, dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16),
                  extra_layers: Optional[Mapping[str, LayerFactory]] = None) -> List[Row]:
    return [
        _guarded("autocast", f"{name} {_dtype_name(dtype)}", lambda n=name, f=factory, d=dtype: check_autocast(
            device, d, n, f(INPUT_SHAPE[1]), SHORT_ITERATIONS))
        for dtype in dtypes for name, factory in _all_layers(extra_layers).items()
    ]


# --------------------------------------------------------------------------- smoke stage
SMOKE_SHAPE = (8, 96, 33, 35)  # several channel blocks and reduction programs per block on a GPU
SMOKE_DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                (torch.float64, torch.float64))  # (activation, state)


def smoke_rows(device: torch.device, shape: Sequence[int] = SMOKE_SHAPE) -> List[Row]:
    """Every kernel variant on the strict "triton" backend against the public path, then the counters.

    MABN in each phase and Batch Renormalization with r and d clipped and free, per (activation
    dtype, layout), at a multi-program shape; each check builds its own tensors (no layer state).
    """
    from .triton import launch as triton_launch
    from .triton.first_use_check import first_use_check_batch_renorm, first_use_check_mabn

    def kernels_mabn(x, state_dtype, shape):
        return first_use_check_mabn(x, state_dtype, shape, public_function=MABNFunction)

    def kernels_brn(x, state_dtype, shape):
        return first_use_check_batch_renorm(x, state_dtype, shape, public_step=batch_renorm_step)

    rows = []
    with backend_context("triton"):
        for dtype, state_dtype in SMOKE_DTYPES:
            for channels_last in (False, True):
                x = _on(torch.zeros(shape), device, dtype, channels_last)
                label = f"{_dtype_name(dtype)}{' channels_last' if channels_last else ''} {'x'.join(map(str, shape))}"
                for name, first_use_check in (("MABN2d", kernels_mabn), ("BatchRenorm2d", kernels_brn)):
                    def check(first_use_check=first_use_check, name=name, x=x, label=label, state_dtype=state_dtype) -> Row:
                        problem = first_use_check(x, state_dtype, shape)
                        return Row("smoke", f"{name} {label}", problem or "kernels = public path, every variant", "",
                                   "FAIL" if problem else "ok")
                    rows.append(_guarded("smoke", f"{name} {label}", check))
        left = triton_launch.counters_left_set(torch.device(device))
        rows.append(Row("smoke", "arrival counters after every launch", f"{left} left set", "0", "FAIL" if left else "ok"))
    return rows


# --------------------------------------------------------------------------- reporting
SUMMARY_LIMIT = 8192  # bytes of the printed summary


class Reporter:
    """Prints each row as soon as it is known (flushed) and appends it, in full, to an output file."""

    def __init__(self, output: Optional[str] = None, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.output = output
        self.rows: List[Row] = []
        if output:
            with open(output, "a") as f:
                f.write("| section | case | result | limit | status |\n|---|---|---|---|---|\n")

    def add(self, rows: Sequence[Row]) -> None:
        for row in rows:
            self.rows.append(row)
            print(f"{row.status:4s} {row.section}: {row.case}: {row.result[:160]}", file=self.stream, flush=True)
            if self.output:
                with open(self.output, "a") as f:
                    f.write(f"| {row.section} | {row.case} | {row.result} | {row.limit} | {row.status} |\n")

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        if self.output:
            with open(self.output, "a") as f:
                f.write(text + "\n")

    def summary(self) -> str:
        """Pass/fail per section, the failed rows (shortened), then the speed ratios (rows marked
        `speed_ratio`, when there are any); at most SUMMARY_LIMIT bytes."""
        sections: Dict[str, Dict[str, int]] = {}
        for row in self.rows:
            counts = sections.setdefault(row.section, {"ok": 0, "FAIL": 0, "info": 0})
            counts[row.status] = counts.get(row.status, 0) + 1
        lines = ["", "summary:"]
        lines += [f"  {name}: {c['ok']} ok, {c['FAIL']} failed, {c['info']} measured"
                  + (" -> FAIL" if c["FAIL"] else " -> pass") for name, c in sections.items()]
        ratios = [r for r in self.rows if r.speed_ratio]
        tail = ["speed ratios:"] + [f"  {r.case}: {r.result[:200]} [{r.status}; {r.limit[:120]}]" for r in ratios] \
            if ratios else []
        failed = [r for r in self.rows if r.status == "FAIL"]
        budget = SUMMARY_LIMIT - len("\n".join(lines + tail).encode()) - 200
        if failed:
            lines.append("failed:")
            for row in failed:
                line = f"  {row.section}: {row.case[:100]}: {row.result[:200]}"
                if budget - len(line.encode()) - 1 < 0:
                    lines.append(f"  ... {len(failed) - (len(lines) - len(sections) - 3)} more (see the output file)")
                    break
                budget -= len(line.encode()) + 1
                lines.append(line)
        text = "\n".join(lines + tail)
        return text.encode()[:SUMMARY_LIMIT].decode(errors="ignore")


# --------------------------------------------------------------------------- table
def _error_cell(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"[:300]


def _guarded(section: str, case: str, check: Callable[[], Row]) -> Row:
    """The check's row, or a FAIL row with the error's first line (the table always prints)."""
    try:
        return check()
    except Exception as error:  # a failing check must not hide the others
        return Row(section, case, _error_cell(error), "", "FAIL")


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| section | case | result | limit | status |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.case} | {r.result} | {r.limit} | {r.status} |" for r in rows]
    return "\n".join(lines)


def run_checks(
    device: torch.device, backends: Sequence[str] = ("torch",), reporter: Optional[Reporter] = None,
    host_read_watch: Optional[HostReadWatch] = None, extra_layers: Optional[Mapping[str, LayerFactory]] = None,
    extra_sections: Sequence[Section] = (),
) -> List[Row]:
    """Every check's rows, in table order, once per backend: correctness, no host sync, autocast
    (MABN2d, BatchRenorm2d and `extra_layers`), then `extra_sections` in their order.

    A section that raises becomes one FAIL row for that backend. A `reporter` gets each section's
    rows as soon as they are measured.
    """
    sections: List[Section] = [
        ("correctness", lambda first: correctness_rows(device, extra_layers=extra_layers)),
        ("no host sync", lambda first: host_sync_rows(device, host_read_watch=host_read_watch, extra_layers=extra_layers)),
        ("autocast", lambda first: autocast_rows(device, extra_layers=extra_layers)),
        *extra_sections,
    ]
    rows = []
    for section, rows_of in sections:
        for index, backend in enumerate(backends):
            try:
                with backend_context(backend):
                    section_rows = rows_of(index == 0)
            except Exception as error:
                section_rows = [Row(section, "all cases", _error_cell(error), "", "FAIL")]
            section_rows = [dataclasses.replace(row, case=f"[{backend}] {row.case}") for row in section_rows]
            if reporter is not None:
                reporter.add(section_rows)
            rows += section_rows
    return rows


def triton_served(device: torch.device) -> str:
    """Which (layer, dtype, layout) keys the Triton kernels served on `device`, from the first-use checks."""
    served = [f"{owner} {_dtype_name(dtype)}{' channels_last' if cl else ''}"
              for (owner, d, dtype, cl, _), verdict in first_use_verdicts().items()
              if verdict is None and d.type == torch.device(device).type]
    return ", ".join(sorted(served)) or "none"


QUICK_HELP = ("accepted for scripts written for the older, longer check: runs the same cases (this check "
              "takes about a minute; tools/benchmark_cuda.py holds the timings --quick used to shorten)")


def build_parser(prog: str = "check_cuda.py", description: Optional[str] = __doc__,
                 quick_help: str = QUICK_HELP) -> argparse.ArgumentParser:
    """The check's options; a caller adds its own (tools/benchmark_cuda.py) and passes it to `main`."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the CUDA device to check (default: cuda)")
    parser.add_argument("--skip-smoke", action="store_true", help="no smoke stage")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--output", default=None, help="append every row, with its details, to this file")
    parser.add_argument("--backends", nargs="+", choices=("torch", "auto", "triton"), default=None,
                        help="training-step backends to check (default: torch, and triton when Triton is installed)")
    return parser


SectionsOf = Callable[[argparse.Namespace, torch.device], Sequence[Section]]


def main(argv: Optional[List[str]] = None, host_read_watch: Optional[HostReadWatch] = None,
         extra_sections: Optional[SectionsOf] = None, extra_layers: Optional[Mapping[str, LayerFactory]] = None,
         parser: Optional[argparse.ArgumentParser] = None) -> int:
    """The command line: parse `argv` with `parser` (default `build_parser()`), pick the device,
    run the smoke stage (when "triton" is among the backends), then `run_checks` with
    `extra_layers` and the sections `extra_sections(args, device)` returns; print the summary.
    Returns the exit status (0 passed, 1 a check failed, 2 no usable CUDA device)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    tool = os.path.splitext(parser.prog)[0]
    try:
        device = select_device(args.device)
    except Unavailable as reason:
        print(f"{tool}: {reason}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backends = args.backends or available_backends()
    reporter = Reporter(args.output)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    reporter.note(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                  f"training-step backends: {', '.join(backends)}")
    if not args.skip_smoke and "triton" in backends:
        smoke = smoke_rows(device)
        reporter.add(smoke)
        failed = [row for row in smoke if row.status == "FAIL"]
        if failed:
            print(f"{tool}: smoke stage failed ({len(failed)} of {len(smoke)}): {failed[0].case}: "
                  f"{failed[0].result[:300]}", file=sys.stderr, flush=True)
            return 1
    sections = list(extra_sections(args, device)) if extra_sections is not None else []
    run_checks(device, backends, reporter, host_read_watch, extra_layers, sections)
    if "triton" in backends:
        reporter.note(f"Triton kernels served (first-use checks passed): {triton_served(device)}")
    print(reporter.summary(), flush=True)
    failed = sum(row.status == "FAIL" for row in reporter.rows)
    print(f"\n{failed} check(s) failed" if failed else "\nall checks passed")
    return 1 if failed else 0
