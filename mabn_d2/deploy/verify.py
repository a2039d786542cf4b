"""Verification: the same images through two forms of a model, and the largest differences between
their predictions, against tolerances."""
import os
from dataclasses import dataclass, field
from itertools import islice
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances
from torch import nn

from .errors import ExportError


# Largest max-abs differences accepted between the eval-mode MABN model and a folded form.
# The frozen form runs the same ops on the same numbers: measured difference exactly 0. The fused
# form rounds each folded weight once in float32 and ~70 layers compound it. Measured on Mask
# R-CNN R50-FPN at 800x1333 (box coordinates up to 1333 px, where float32 resolves 1.2e-4 px):
# 4.9e-4 px, scores 1.5e-6, mask probabilities 9e-7 with MABN statistics matched to the data
# (as training leaves them); 1.3e-2 px, 2.2e-5, 3.4e-5 with statistics 2x off, which inflates the
# activations. The bounds sit above the worse case, and far below what any folding mistake
# gives (a missed centering or affine moves boxes by pixels and scores by 1e-2 and more);
# 0.05 px is invisible to IoU-based evaluation.
TOLERANCES = {"boxes": 5e-2, "scores": 1e-4, "masks": 1e-4}


def verification_inputs(cfg: CfgNode, num_images: int, image_paths: Sequence[str] = ()) -> List[dict]:
    """`num_images` model inputs: from `image_paths` (resized as DefaultPredictor does), or
    the first images of cfg.DATASETS.TEST[0] through detectron2's test loader."""
    if image_paths:
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        inputs = []
        for path in list(image_paths)[:num_images] if num_images > 0 else image_paths:
            if not os.path.isfile(path):
                raise ExportError(f"image not found: {path}")
            original = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
            image = resize.get_transform(original).apply_image(original)
            tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": original.shape[0], "width": original.shape[1]})
        return inputs
    if not cfg.DATASETS.TEST:
        raise ExportError("cannot verify: cfg.DATASETS.TEST is empty and no --images were given")
    name = cfg.DATASETS.TEST[0]
    try:
        loader = build_detection_test_loader(cfg, name)
    except KeyError as e:
        raise ExportError(f"cannot verify on dataset {name!r}: {e}") from e
    return [batch[0] for batch in islice(loader, num_images)]


def raw_predictions(model: nn.Module, inputs: Sequence[dict]) -> List[Instances]:
    """Per-image Instances before resizing to the original image: for R-CNN models the masks
    are the per-ROI mask probabilities, not pasted binary masks."""
    outputs = []
    with torch.no_grad():
        for item in inputs:
            if isinstance(model, GeneralizedRCNN):
                outputs.append(model.inference([item], do_postprocess=False)[0])
            else:
                outputs.append(model([item])[0]["instances"])
    return outputs


@dataclass
class PredictionDiff:
    """Max absolute differences between two models' predictions over the same images."""

    boxes: float = 0.0  # pixels
    scores: float = 0.0
    masks: float = 0.0  # mask probabilities
    images: int = 0
    detections: int = 0
    mismatches: List[str] = field(default_factory=list)  # images whose detections differ in number or class

    def exceeded(self, tolerances: Dict[str, float] = TOLERANCES) -> List[str]:
        """Human-readable reasons the difference is too large (empty when within tolerances)."""
        reasons = list(self.mismatches)
        for key, bound in tolerances.items():
            value = getattr(self, key)
            if not value <= bound:
                reasons.append(f"max |{key} difference| {value:.3g} > {bound:g}")
        return reasons

    def __str__(self) -> str:
        text = (
            f"{self.images} images, {self.detections} detections: max abs difference "
            f"boxes {self.boxes:.3g} px, scores {self.scores:.3g}, mask probabilities {self.masks:.3g}"
        )
        return text + (f"; {'; '.join(self.mismatches)}" if self.mismatches else "")


def compare_predictions(reference: Sequence[Instances], candidate: Sequence[Instances]) -> PredictionDiff:
    """Compare per-image predictions detection by detection.

    Each reference detection is paired with the candidate of the same class whose box is
    closest, so two near-equal scores that swap places do not count as a difference. A
    different number of detections per class is a mismatch.
    """
    diff = PredictionDiff(images=len(reference))
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        pairs = _pair_detections(ref, cand)
        if pairs is None:
            diff.mismatches.append(f"image {index}: detections differ ({len(ref)} vs {len(cand)}, or other classes)")
            continue
        diff.detections += len(ref)
        if len(ref) == 0:
            continue
        cand = cand[pairs]
        diff.boxes = max(diff.boxes, _max_abs(ref.pred_boxes.tensor, cand.pred_boxes.tensor))
        diff.scores = max(diff.scores, _max_abs(ref.scores, cand.scores))
        if ref.has("pred_masks"):
            diff.masks = max(diff.masks, _max_abs(ref.pred_masks, cand.pred_masks))
    return diff


def _pair_detections(ref: Instances, cand: Instances) -> Optional[torch.Tensor]:
    """For each detection of `ref`, the index of its counterpart in `cand`; None if the
    per-class counts differ."""
    if len(ref) != len(cand) or not torch.equal(ref.pred_classes.sort().values, cand.pred_classes.sort().values):
        return None
    if len(ref) == 0:
        return torch.zeros(0, dtype=torch.long)
    distance = torch.cdist(ref.pred_boxes.tensor.double(), cand.pred_boxes.tensor.double(), p=float("inf"))
    other_class = ref.pred_classes[:, None] != cand.pred_classes[None, :]
    return distance.masked_fill(other_class, float("inf")).argmin(dim=1)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())
