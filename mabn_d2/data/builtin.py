"""Registers the demo datasets a config names, building them on first use.

Like detectron2's builtin datasets they live under $DETECTRON2_DATASETS (default ./datasets).
`fmnist_coco_{train,val}` is the demo's dataset; `fmnist_coco_tiny_{train,val}` a small one
for smoke tests.
"""
import os
from typing import Dict

from detectron2.config import CfgNode
from detectron2.utils import comm

from .fashion_mnist_coco import build_fashion_mnist_coco, register_fashion_mnist_coco

__all__ = ["DEMO_DATASETS", "demo_dataset_root", "register_demo_datasets"]

# name prefix -> build arguments
DEMO_DATASETS: Dict[str, Dict[str, int]] = {
    "fmnist_coco": dict(num_train=2000, num_val=200),
    "fmnist_coco_tiny": dict(num_train=32, num_val=8),
}


def demo_dataset_root(prefix: str = "fmnist_coco") -> str:
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), prefix)


def register_demo_datasets(cfg: CfgNode) -> bool:
    """Build (main process, once) and register the demo datasets that cfg.DATASETS names."""
    names = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    used = [p for p in DEMO_DATASETS if {f"{p}_train", f"{p}_val"} & names]
    for prefix in used:
        root = demo_dataset_root(prefix)
        if comm.is_main_process():
            build_fashion_mnist_coco(root, **DEMO_DATASETS[prefix])
        comm.synchronize()
        register_fashion_mnist_coco(root, names=(f"{prefix}_train", f"{prefix}_val"))
    return bool(used)
