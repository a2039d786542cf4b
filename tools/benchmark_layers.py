#!/usr/bin/env python
"""Speed and saved-for-backward memory of MABN2d against BN, GN, FrozenBN and BatchRenorm2d.

Shapes are those of ResNet-50 FPN Mask R-CNN at 2 images per GPU plus two ROI-head shapes.
MABN2d is timed in its last phase (moving averages + clipped re-normalization), its most
expensive one. Prints a Markdown table of medians and ratios to nn.BatchNorm2d.
"""
import argparse
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from mabn_d2.benchmarking import interleaved_medians, markdown_table, saved_tensor_bytes
from mabn_d2.layers import BatchRenorm2d, MABN2d

DETECTION_SHAPES = [
    (2, 64, 200, 336), (2, 256, 200, 336), (2, 512, 100, 168), (2, 1024, 50, 84),
    (2, 2048, 25, 42), (100, 256, 14, 14), (1024, 256, 7, 7),
]
QUICK_SHAPES = [(2, 64, 50, 84), (2, 256, 25, 42), (64, 256, 7, 7)]
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


def benchmark_shape(shape, norms: List[str], repeats: int) -> Dict[str, Dict[str, float]]:
    x = torch.randn(shape)
    grad = torch.randn(shape)
    layers = {name: build_norm(name, shape[1]) for name in norms}
    train = interleaved_medians({n: training_step(l, x, grad) for n, l in layers.items()}, repeats)
    evals = {}
    for layer in layers.values():
        layer.eval()
    evals = interleaved_medians({n: eval_forward(l, x) for n, l in layers.items()}, repeats)
    saved = {}
    for name, layer in layers.items():
        layer.train()
        saved[name] = saved_tensor_bytes(lambda: layer(x.detach().requires_grad_(True)))
    return {"train": train, "eval": evals, "saved": saved, "activation_bytes": x.numel() * x.element_size()}


def run(shapes, norms: List[str], repeats: int) -> str:
    rows = []
    train_ratios, eval_ratios, saved_ratios = [], [], []
    for shape in shapes:
        result = benchmark_shape(shape, norms, repeats)
        bn_train, frozen_eval = result["train"]["BatchNorm2d"], result["eval"]["FrozenBN"]
        for name in norms:
            t, e = result["train"][name], result["eval"][name]
            saved = result["saved"][name] / result["activation_bytes"]
            rows.append([
                "x".join(map(str, shape)), name, f"{t * 1e3:.1f}", f"{t / bn_train:.2f}",
                f"{e * 1e3:.1f}", f"{e / frozen_eval:.2f}", f"{saved:.2f}",
            ])
        train_ratios.append(result["train"]["MABN2d"] / bn_train)
        eval_ratios.append(result["eval"]["MABN2d"] / frozen_eval)
        saved_ratios.append(result["saved"]["MABN2d"] / result["activation_bytes"])
        print(f"done {shape}", file=sys.stderr, flush=True)
    table = markdown_table(
        ["shape", "norm", "train fwd+bwd ms", "vs BN", "eval fwd ms", "vs FrozenBN", "saved for bwd (activations)"],
        rows,
    )
    summary = (
        f"\nMABN2d median over shapes: training step {statistics.median(train_ratios):.2f}x BatchNorm2d, "
        f"eval {statistics.median(eval_ratios):.2f}x FrozenBatchNorm2d, "
        f"saves at most {max(saved_ratios):.2f} activation-sized tensors for backward."
    )
    return table + "\n" + summary


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (smoke test)")
    parser.add_argument("--norms", nargs="+", default=NORMS, choices=NORMS)
    args = parser.parse_args(argv)
    for required in ("MABN2d", "BatchNorm2d", "FrozenBN"):
        if required not in args.norms:
            parser.error(f"--norms must include {required} (the ratios are taken against it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else DETECTION_SHAPES
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU", file=sys.stderr)
    report = run(shapes, args.norms, repeats)
    print(report)
    return report


if __name__ == "__main__":
    main()
