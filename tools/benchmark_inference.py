#!/usr/bin/env python
"""Per-image inference time of Mask R-CNN R50-FPN with folded MABN, unfolded MABN, FrozenBN and GN.

One architecture, the paper's COCO setting (norm in the backbone, FPN, 4conv1fc box head and
mask head; configs/COCO-InstanceSegmentation/Base-mask_rcnn_R_50_FPN_scratch.yaml), random
weights, eval mode, torch.no_grad, all variants timed round-robin in one process. Prints a
Markdown table of medians and ratios to FrozenBN.

Fair work: with random weights the number of detections, and so the ROI-head work, depends on
what each model happens to score. Each timed call therefore runs the norm-dependent pipeline
on a fixed number of boxes: preprocessing, backbone + FPN, RPN (its top POST_NMS_TOPK_TEST
proposals), the box head on those proposals, and the mask head on the first `--detections`
proposals taken as detections. The final score threshold and per-class NMS, which contain no
norm, are left out. The number of proposals per variant is checked to be the same.
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.config import CfgNode, get_cfg
from mabn_d2 import build_model
from detectron2.structures import Instances
from torch import nn

import mabn_d2  # noqa: F401  (registers the "MABN" norm string)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from research.benchmarking import interleaved_medians, markdown_table
from mabn_d2.config import add_mabn_config
from mabn_d2.deploy.fold import fold_mabn
from mabn_d2.layers import MABN2d

CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "COCO-InstanceSegmentation",
    "Base-mask_rcnn_R_50_FPN_scratch.yaml",
)
SIZES = [(480, 640), (800, 1333)]
QUICK_SIZES = [(480, 640)]
BASELINE = "FrozenBN"


def model_cfg(norm: str, config_file: str = CONFIG) -> CfgNode:
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(config_file)
    for node in (cfg.MODEL.RESNETS, cfg.MODEL.FPN, cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_MASK_HEAD):
        node.NORM = norm
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _trained_looking_(model: nn.Module, seed: int = 0) -> nn.Module:
    """MABN statistics and affine away from their initial 1/0 (timing does not depend on it,
    but folding an identity would hide nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MABN2d):
                c = module.num_features
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return model


def build_variants(config_file: str = CONFIG, device: str = "cpu") -> Dict[str, nn.Module]:
    """The five variants, all eval mode, in table order, on `device` (built and folded on the CPU).

    The stock FrozenBN model holds the frozen fold's weights: a FrozenBN model at its initial
    identity statistics produces degenerate RPN boxes and so less work than a trained one.
    """
    torch.manual_seed(0)
    mabn = _trained_looking_(build_model(model_cfg("MABN", config_file))).eval()
    frozen = fold_mabn(mabn, "frozen")[0]
    stock = build_model(model_cfg("FrozenBN", config_file)).eval()
    stock.load_state_dict(frozen.state_dict())
    variants = {
        BASELINE: stock,
        "MABN folded (frozen)": frozen,
        "MABN folded (fused)": fold_mabn(mabn, "fused")[0],
        "MABN unfolded (eval)": mabn,
        "GN": build_model(model_cfg("GN", config_file)).eval(),
    }
    return {name: model.to(device) for name, model in variants.items()}


def fixed_work_inference(model: nn.Module, inputs: List[dict], detections: int) -> Callable[[], int]:
    """A call running the norm-dependent pipeline on a fixed number of boxes; returns #proposals."""
    heads = model.roi_heads

    def run() -> int:
        with torch.no_grad():
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, features, None)
            box_features = heads.box_pooler(
                [features[f] for f in heads.box_in_features], [p.proposal_boxes for p in proposals]
            )
            heads.box_predictor(heads.box_head(box_features))
            chosen = [
                Instances(
                    p.image_size,
                    pred_boxes=p.proposal_boxes[:detections],
                    pred_classes=torch.zeros(min(detections, len(p)), dtype=torch.long, device=p.proposal_boxes.device),
                )
                for p in proposals
            ]
            heads.forward_with_given_boxes(features, chosen)
            return sum(len(p) for p in proposals)

    return run


def benchmark(
    variants: Dict[str, nn.Module], sizes: Sequence, repeats: int, detections: int, seed: int = 0, device: str = "cpu"
) -> Dict[tuple, Dict[str, float]]:
    """{size: {variant: median seconds per image}}."""
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for size in sizes:
        inputs = [{"image": (torch.rand(3, *size, generator=generator) * 255).to(device)}]
        calls = {name: fixed_work_inference(model, inputs, detections) for name, model in variants.items()}
        proposals = {name: call() for name, call in calls.items()}
        if len(set(proposals.values())) != 1:
            raise RuntimeError(f"variants got different numbers of proposals at {size}: {proposals}")
        print(f"{size[0]}x{size[1]}: {next(iter(proposals.values()))} proposals, {detections} detections",
              file=sys.stderr, flush=True)
        results[tuple(size)] = interleaved_medians(calls, repeats, warmup=1, device=torch.device(device))
    return results


def table(results: Dict[tuple, Dict[str, float]]) -> str:
    sizes = list(results)
    header = ["variant"] + [h for s in sizes for h in (f"{s[0]}x{s[1]} ms", f"vs {BASELINE}")]
    rows = []
    for name in results[sizes[0]]:
        row = [name]
        for size in sizes:
            seconds = results[size][name]
            row += [f"{seconds * 1e3:.0f}", f"{seconds / results[size][BASELINE]:.3f}"]
        rows.append(row)
    return markdown_table(header, rows)


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per size (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="480x640 only, 2 rounds (smoke test)")
    parser.add_argument("--detections", type=int, default=100, help="boxes given to the mask head per image")
    parser.add_argument("--config-file", default=CONFIG, help="architecture; NORM keys are set per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA times are CUDA-event medians)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = 2 if args.quick else args.repeats
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads, CPU"
    print(f"torch {torch.__version__}, {where}, {repeats} rounds", file=sys.stderr)
    variants = build_variants(args.config_file, args.device)
    report = table(benchmark(variants, sizes, repeats, args.detections, device=args.device))
    print(report)
    return report


if __name__ == "__main__":
    main()
