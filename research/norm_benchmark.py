"""The norm layers and shapes the layer benchmarks compare, and one shape's measurement.

Shapes are those of ResNet-50 FPN Mask R-CNN at 2 images per GPU plus two ROI-head shapes.
MABN2d is measured in its last phase (moving averages + clipped re-normalization), its most
expensive one, and BatchRenorm2d past its r_max/d_max ramps.
"""
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .benchmarking import interleaved_medians, saved_tensor_bytes
from mabn_d2.layers import BatchRenorm2d, MABN2d

__all__ = ["DETECTION_SHAPES", "QUICK_SHAPES", "NORMS", "build_norm", "training_step", "eval_forward", "benchmark_shape"]

Shape = Tuple[int, int, int, int]

DETECTION_SHAPES: List[Shape] = [
    (2, 64, 200, 336), (2, 256, 200, 336), (2, 512, 100, 168), (2, 1024, 50, 84),
    (2, 2048, 25, 42), (100, 256, 14, 14), (1024, 256, 7, 7),
]
QUICK_SHAPES: List[Shape] = [(2, 64, 50, 84), (2, 256, 25, 42), (64, 256, 7, 7)]
NORMS = ["MABN2d", "BatchNorm2d", "GroupNorm", "FrozenBN", "BatchRenorm2d"]


def build_norm(name: str, channels: int) -> nn.Module:
    if name == "MABN2d":
        layer = MABN2d(channels)
        layer._iteration = 2 * layer.renorm_warmup_iters  # time the late phase
        return layer
    if name == "BatchNorm2d":
        return nn.BatchNorm2d(channels)
    if name == "GroupNorm":
        return nn.GroupNorm(32, channels)
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if name == "BatchRenorm2d":
        layer = BatchRenorm2d(channels)
        layer._iteration = 10**6  # past its r_max/d_max ramps
        return layer
    raise ValueError(f"unknown norm {name!r}; choose from {NORMS}")


def training_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    layer.train()

    def step() -> None:
        inp = x.detach().requires_grad_(True)
        layer(inp).backward(grad)
        for p in layer.parameters():
            p.grad = None

    return step


def eval_forward(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            layer(x)

    return forward


def benchmark_shape(
    shape: Sequence[int], norms: Sequence[str], repeats: int, device: torch.device = torch.device("cpu")
) -> Dict[str, object]:
    """Median train (fwd+bwd) and eval seconds per norm, and bytes saved for backward."""
    device = torch.device(device)
    x = torch.randn(*shape, device=device)
    grad = torch.randn(*shape, device=device)
    layers = {name: build_norm(name, shape[1]).to(device) for name in norms}
    train = interleaved_medians({n: training_step(l, x, grad) for n, l in layers.items()}, repeats, device=device)
    for layer in layers.values():
        layer.eval()
    evals = interleaved_medians({n: eval_forward(l, x) for n, l in layers.items()}, repeats, device=device)
    saved = {}
    for name, layer in layers.items():
        layer.train()
        saved[name] = saved_tensor_bytes(lambda: layer(x.detach().requires_grad_(True)))
    return {"train": train, "eval": evals, "saved": saved, "activation_bytes": x.numel() * x.element_size()}
