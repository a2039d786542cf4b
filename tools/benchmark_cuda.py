#!/usr/bin/env python
"""Check and benchmark MABN on one CUDA GPU: the layers' check (tools/check_cuda.py: smoke stage,
correctness, host syncs, autocast) with the ablation layers added, then the per-layer timings and
the Mask R-CNN step, one streamed table (research/cuda_benchmarks.py holds the additions).

Sections, each once per training-step backend ("torch"; "triton" too when Triton is installed):
1. correctness: MABN2d against the float64 spec (mabn_d2.layers.reference); BatchRenorm2d and
   the ablation layers (MABNForwardOnly2d, MABNCentered2d) against their own float64 CPU run;
2. no host sync and 3. bf16/fp16 autocast, for the same layers;
4. per-layer time of a training step and an eval forward, against BatchNorm2d, GroupNorm,
   FrozenBN and BatchRenorm2d at the R50-FPN and ROI-head shapes (CUDA events, medians);
5. the Mask R-CNN R50-FPN training step at 2 images of 800x1216 for MABN, BN, GN and BRN.
The medians of 4 and MABN's ratio in 5 are judged against the Triton step's targets (MABN2d
train <= 1.2x BN, eval <= 1.05x FrozenBN, BatchRenorm2d <= 1.5x BN, Mask R-CNN step <= 1.10x BN)
for the backends that use Triton; "torch" rows report them only. The printed summary (8 KB at
most) ends with those speed ratios; `--output FILE` gets every row in full.

Sized for under 5 minutes on one GPU; `--quick` (three layer shapes x 5 rounds, no Mask R-CNN)
for under 3. Needs an importable detectron2 and the repository's research/ (a checkout).
Exit status: 0 every check passed, 1 a check failed, 2 no CUDA GPU or the project does not import.

  python tools/benchmark_cuda.py --quick --output benchmark.md
"""
import argparse
import importlib.util
import os
import sys
import warnings
from typing import List, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_HELP = "three layer shapes x at most 5 rounds, no Mask R-CNN step (the checks unchanged)"


def _check_cuda_tool():
    """tools/check_cuda.py as a module: its host-read watch and its one-line import diagnosis."""
    spec = importlib.util.spec_from_file_location("check_cuda_tool", os.path.join(REPO_ROOT, "tools", "check_cuda.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The timing options, added to the check's own (mabn_d2.layers.cuda_check.build_parser)."""
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per layer and shape (median)")
    parser.add_argument("--model-repeats", type=int, default=10, help="timed Mask R-CNN steps per variant (median)")
    parser.add_argument("--height", type=int, default=800, help="Mask R-CNN image height")
    parser.add_argument("--width", type=int, default=1216, help="Mask R-CNN image width")
    parser.add_argument("--skip-speed", action="store_true", help="no per-layer timing")
    parser.add_argument("--skip-model", action="store_true", help="no Mask R-CNN timing")
    return parser


def build_parser() -> argparse.ArgumentParser:
    from mabn_d2.layers import cuda_check

    return add_arguments(cuda_check.build_parser(prog="benchmark_cuda.py", description=__doc__, quick_help=QUICK_HELP))


def timing_sections(args: argparse.Namespace, device: torch.device):
    """The layer-time and Mask R-CNN sections the options ask for (research.cuda_benchmarks)."""
    from research import cuda_benchmarks

    return cuda_benchmarks.timing_sections(
        device, repeats=min(args.repeats, 5) if args.quick else args.repeats, model_repeats=args.model_repeats,
        speed=not args.skip_speed, model=not (args.skip_model or args.quick), height=args.height, width=args.width,
        shapes=cuda_benchmarks.QUICK_SHAPES if args.quick else None,
    )


def main(argv: Optional[List[str]] = None) -> int:
    """The check (mabn_d2.layers.cuda_check.main) with the ablation layers and the timing sections."""
    if REPO_ROOT not in sys.path:  # research/ and, in a checkout, mabn_d2/
        sys.path.insert(0, REPO_ROOT)
    tool = _check_cuda_tool()
    try:
        with warnings.catch_warnings():  # detectron2's import-time deprecation warnings: not this table's
            warnings.simplefilter("ignore")
            from mabn_d2.layers import cuda_check
            from research import cuda_benchmarks
    except ImportError as error:
        return tool.import_failure("benchmark_cuda", error)
    return cuda_check.main(argv, host_read_watch=tool.forbid_host_reads, extra_sections=timing_sections,
                           extra_layers=cuda_benchmarks.short_phase_layers(), parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
