"""The evaluator for a dataset, chosen by its `evaluator_type` as detectron2's train_net does."""
import os
from typing import Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
)

__all__ = ["build_evaluator_for_dataset"]


def build_evaluator_for_dataset(cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """detectron2's evaluator(s) for `dataset_name`'s `evaluator_type`.

    A dataset registered without an evaluator_type but with a COCO json_file is evaluated with
    COCOEvaluator; anything else raises NotImplementedError naming the dataset and its type.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type", "coco" if metadata.get("json_file") else None)
    evaluators = []
    if evaluator_type in ("sem_seg", "coco_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type in ("coco", "coco_panoptic_seg"):
        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder))
    if evaluator_type == "coco_panoptic_seg":
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if evaluator_type == "cityscapes_instance":
        return CityscapesInstanceEvaluator(dataset_name)
    if evaluator_type == "cityscapes_sem_seg":
        return CityscapesSemSegEvaluator(dataset_name)
    if evaluator_type == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if evaluator_type == "lvis":
        return LVISEvaluator(dataset_name, output_dir=output_folder)
    if not evaluators:
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; register it with one "
            "of coco, coco_panoptic_seg, sem_seg, lvis, pascal_voc, cityscapes_instance, cityscapes_sem_seg, "
            "or override build_evaluator."
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
