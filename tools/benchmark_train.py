#!/usr/bin/env python
"""Training-step time and activation memory of Mask R-CNN R50-FPN at 2 images/iteration.

One process, interleaved rounds, the same synthetic batch for every model: NORM MABN
(backbone, FPN, 4conv1fc box head, mask head) vs BN vs GN (and BRN, on request) in the same
positions, and the stock fine-tuning layout (FrozenBN backbone, no norm elsewhere). MABN layers
are put past their warm-ups so the steady state is timed. Memory: bytes autograd saves for
backward (the activation memory of a step); on CUDA also the allocator's peak.

--health-overhead times something else: training steps of a config (default the demo's) with
MABN's health hook on vs off, in one process, interleaved blocks of one hook period each
(research.health_overhead); --output writes the figures, and the command, as JSON
(results/health_overhead.json is what docs/results.md renders):
  python tools/benchmark_train.py --health-overhead --blocks 4 --output results/health_overhead.json
"""
import argparse
import os
import platform
import shlex
import sys
from typing import List, Optional

import torch

import mabn_d2  # noqa: F401  (registers the "MABN" and "BRN" norm strings)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from research.benchmarking import markdown_table
from research.maskrcnn_benchmark import VARIANTS, measure_training_steps

DEFAULT_VARIANTS = ["MABN", "BN", "GN", "FrozenBN backbone"]
DEMO_CONFIG = "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn.yaml"


def health_overhead(args: argparse.Namespace, argv: List[str]) -> str:
    """Time the health hook on vs off (see research.health_overhead); print and optionally save."""
    from demo_datasets.builtin import register_demo_datasets
    from mabn_d2.engine import setup_cfg
    from mabn_d2.utils.atomic_io import atomic_write_json
    from mabn_d2.engine.trainer import HEALTH_PERIOD
    from research.health_overhead import measure_health_overhead

    cfg = setup_cfg(args.config_file, args.opts)
    register_demo_datasets(cfg)
    load_before = os.getloadavg()
    result = measure_health_overhead(cfg, args.blocks, args.period or HEALTH_PERIOD, args.warmup_steps)
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    where = (torch.cuda.get_device_name(cfg.MODEL.DEVICE) if cfg.MODEL.DEVICE.startswith("cuda")
             else f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    result.update(command="python tools/benchmark_train.py " + " ".join(shlex.quote(a) for a in argv),
                  config=args.config_file, opts=list(args.opts), device=where, torch=torch.__version__)
    ratios = ", ".join(f"{r:.3f}" for r in result["ratios"])
    report = (
        f"MABN health hook on vs off, {args.config_file}, {where}: {result['blocks']} interleaved blocks of "
        f"{result['period']} steps per arm ({result['warmup_steps']} warm-up steps discarded)\n"
        f"step time ratio on/off: median {result['median_ratio']:.3f}, per block pair {ratios}\n"
        f"median step: on {result['step_seconds_median']['on']:.3f} s, off {result['step_seconds_median']['off']:.3f} s; "
        f"inside the hook: {1e3 * result['hook_seconds_per_step']:.3f} ms per step "
        f"({100 * result['hook_share_of_step']:.3f}% of the hook-on step time), "
        f"{1e3 * result['hook_read_seconds_median']:.2f} ms for a period's read of {result['mabn_layers']} layers"
    )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        atomic_write_json(args.output, result)
    print(report)
    return report


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when available; CUDA times are CUDA-event medians)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    health = parser.add_argument_group("--health-overhead: the MABN health hook on vs off")
    health.add_argument("--health-overhead", action="store_true", help="time the health hook on vs off instead")
    health.add_argument("--config-file", default=DEMO_CONFIG)
    health.add_argument("--blocks", type=int, default=4, help="interleaved blocks per arm (each one hook period)")
    health.add_argument("--period", type=int, default=None, help="hook period (default: the trainer's, 20)")
    health.add_argument("--warmup-steps", type=int, default=5, help="untimed steps before the first block")
    health.add_argument("--output", default=None, help="write the figures as JSON here (atomically)")
    health.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.health_overhead:
        if args.threads:
            torch.set_num_threads(args.threads)
        return health_overhead(args, argv)
    if "BN" not in args.variants:
        parser.error("--variants must include BN (ratios are taken against it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = measure_training_steps(args.variants, args.height, args.width, args.repeats, args.device)
    times = {name: r["seconds"] for name, r in results.items()}
    saved = {name: r["saved_bytes"] for name, r in results.items()}
    peaks = {name: r["peak_bytes"] for name, r in results.items() if "peak_bytes" in r}
    rows = []
    for name in args.variants:
        row = [name, f"{times[name]:.3f}", f"{times[name] / times['BN']:.2f}",
               f"{saved[name] / 2**20:.0f}", f"{saved[name] / saved['BN']:.2f}"]
        if peaks:
            row += [f"{peaks[name] / 2**20:.0f}", f"{peaks[name] / peaks['BN']:.2f}"]
        rows.append(row)
    header = ["norm", "step s", "vs BN", "saved for bwd MiB", "vs BN"] + (["peak MiB", "vs BN"] if peaks else [])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report = (
        f"Mask R-CNN R50-FPN, 2 images of {args.height}x{args.width}, {where}, torch {torch.__version__}, "
        f"median of {args.repeats} steps\n\n" + markdown_table(header, rows)
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
