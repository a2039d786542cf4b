"""What tools/benchmark_cuda.py adds to the plugin's GPU check (mabn_d2.layers.cuda_check): the
ablation layers and the timings, in the same streamed table and summary.

- the ablation layers (research.ablations: MABNForwardOnly2d, MABNCentered2d) in the check's
  correctness, host-sync and autocast sections (`short_phase_layers`);
- per-layer time of a training step (forward + backward) and an eval forward, against
  BatchNorm2d, GroupNorm, FrozenBN and BatchRenorm2d at the R50-FPN and ROI-head shapes
  (CUDA events, medians; `layer_time_rows`);
- the Mask R-CNN R50-FPN training step at 2 images of 800x1216 for MABN, BN, GN and BRN
  (`maskrcnn_rows`).
The medians of the layer timings and MABN's ratio in the Mask R-CNN step are judged against the
Triton step's targets (SPEED_TARGETS: MABN2d train <= 1.2x BN, eval <= 1.05x FrozenBN,
BatchRenorm2d <= 1.5x BN, Mask R-CNN step <= 1.10x BN) for the backends that use Triton;
"torch" rows report them only. `timing_sections` makes the two timing sections for the check's
`run_checks` (the norms without a backend choice, BN, GN and FrozenBN, timed with the first
backend only).
"""
import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mabn_d2.layers.cuda_check import SHORT_PHASES, Row, Section

__all__ = ["SPEED_TARGETS", "QUICK_SHAPES", "short_phase_layers", "layer_time_rows", "maskrcnn_rows",
           "timing_sections"]

# Speed targets of the Triton training step on a CUDA GPU (ratios of medians); the public-operation
# path ("torch" backend) is reported against them without a verdict.
SPEED_TARGETS = {"MABN2d train": 1.2, "MABN2d eval": 1.05, "BatchRenorm2d train": 1.5, "MABN model step": 1.10}
QUICK_SHAPES = [(2, 256, 200, 336), (2, 1024, 50, 84), (512, 256, 14, 14)]


def short_phase_layers() -> Dict[str, Callable[[int], torch.nn.Module]]:
    """The ablation layers, with warm-ups short enough to cross every phase in the check's 40 steps."""
    from research.ablations import MABNCentered2d, MABNForwardOnly2d

    return {
        "MABNForwardOnly2d": lambda c: MABNForwardOnly2d(c, **SHORT_PHASES),
        "MABNCentered2d": lambda c: MABNCentered2d(c, **SHORT_PHASES),
    }


# --------------------------------------------------------------------------- speed
def layer_time_rows(
    device: torch.device, shapes: Optional[Sequence] = None, repeats: int = 20, norms: Optional[Sequence[str]] = None
) -> List[Row]:
    """Train and eval time of each norm per shape, as ratios to BatchNorm2d (train) and FrozenBN (eval)."""
    from research.norm_benchmark import DETECTION_SHAPES, NORMS, benchmark_shape

    norms = list(norms or NORMS)
    for baseline in ("MABN2d", "BatchNorm2d", "FrozenBN"):
        if baseline not in norms:
            norms.append(baseline)
    rows, train_ratios, eval_ratios, brn_ratios = [], [], [], []
    for shape in shapes or DETECTION_SHAPES:
        label = "x".join(map(str, shape))
        result = benchmark_shape(shape, norms, repeats, device)
        bn, frozen = result["train"]["BatchNorm2d"], result["eval"]["FrozenBN"]
        for name in norms:
            t, e = result["train"][name], result["eval"][name]
            rows.append(Row("layer time", f"{label} {name}",
                            f"train {t * 1e3:.3f} ms = {t / bn:.2f}x BN; eval {e * 1e3:.3f} ms = {e / frozen:.2f}x FrozenBN"))
        train_ratios.append(result["train"]["MABN2d"] / bn)
        eval_ratios.append(result["eval"]["MABN2d"] / frozen)
        if "BatchRenorm2d" in norms:
            brn_ratios.append(result["train"]["BatchRenorm2d"] / bn)
    if brn_ratios:
        brn = statistics.median(brn_ratios)
        rows.append(_speed_row("layer time", "BatchRenorm2d, median over shapes", f"train {brn:.2f}x BN",
                               {f"train <= {SPEED_TARGETS['BatchRenorm2d train']}x BN": brn <= SPEED_TARGETS["BatchRenorm2d train"]},
                               device))
    train, evaluation = statistics.median(train_ratios), statistics.median(eval_ratios)
    rows.append(_speed_row("layer time", "MABN2d, median over shapes", f"train {train:.2f}x BN; eval {evaluation:.2f}x FrozenBN", {
        f"train <= {SPEED_TARGETS['MABN2d train']}x BN": train <= SPEED_TARGETS["MABN2d train"],
        f"eval <= {SPEED_TARGETS['MABN2d eval']}x FrozenBN": evaluation <= SPEED_TARGETS["MABN2d eval"],
    }, device))
    return rows


def _speed_row(section: str, case: str, result: str, targets: Dict[str, bool], device: torch.device) -> Row:
    """A timing row with the fast path's targets as its limit, judged for the Triton step on CUDA only;
    marked for the summary's speed ratios."""
    from mabn_d2.layers.backend import selected_backend

    limit = ", ".join(targets)
    if torch.device(device).type != "cuda" or selected_backend() == "torch":
        return Row(section, case, result, f"target (Triton on CUDA): {limit}", "info", speed_ratio=True)
    return Row(section, case, result, limit, "ok" if all(targets.values()) else "FAIL", speed_ratio=True)


def maskrcnn_rows(
    device: torch.device, height: int = 800, width: int = 1216, repeats: int = 10,
    variants: Sequence[str] = ("MABN", "BN", "GN", "BRN"),
) -> List[Row]:
    """Median Mask R-CNN R50-FPN training step (2 images) per norm, as a ratio to BN."""
    from research.maskrcnn_benchmark import measure_training_steps

    results = measure_training_steps(list(variants), height, width, repeats, str(device))
    bn = results["BN"]["seconds"] if "BN" in results else None
    rows = []
    for name, result in results.items():
        text = f"{result['seconds']:.3f} s" + (f" = {result['seconds'] / bn:.2f}x BN" if bn else "")
        if "peak_bytes" in result:
            text += f", peak {result['peak_bytes'] / 2**30:.1f} GiB"
        case = f"{name}, 2 images of {height}x{width}, norm in backbone, FPN, heads"
        if name == "MABN" and bn:
            target = SPEED_TARGETS["MABN model step"]
            rows.append(_speed_row("Mask R-CNN step", case, text, {f"<= {target}x BN": result["seconds"] / bn <= target}, device))
        else:
            rows.append(Row("Mask R-CNN step", case, text))
    return rows


def timing_sections(
    device: torch.device, repeats: int = 20, model_repeats: int = 10, speed: bool = True, model: bool = True,
    height: int = 800, width: int = 1216, shapes: Optional[Sequence] = None,
) -> List[Section]:
    """The layer-time and Mask R-CNN sections for `run_checks` (`shapes`: layer-timing shapes,
    default R50-FPN's). BN, GN and FrozenBN have no backend choice: timed with the first backend only."""
    sections: List[Section] = []
    if speed:
        sections.append(("layer time", lambda first: layer_time_rows(
            device, shapes, repeats, None if first else ["MABN2d", "BatchRenorm2d"])))
    if model:
        sections.append(("Mask R-CNN step", lambda first: maskrcnn_rows(
            device, height, width, model_repeats, ("MABN", "BN", "GN", "BRN") if first else ("MABN", "BN", "BRN"))))
    return sections
