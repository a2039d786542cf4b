"""Registers the demo datasets a config names, building them on first use.

Like detectron2's builtin datasets they live under $DETECTRON2_DATASETS (default ./datasets).
`fmnist_coco_{train,val}` is the demo's dataset; `fmnist_coco_tiny_{train,val}` a small one
for smoke tests. Unlike detectron2's builtin datasets, importing a package does not register
them: a script of your own calls `register_demo_datasets(cfg)` (tools/train_net.py and
tools/fold_mabn.py do).
"""
import os
from typing import Any, Dict

from detectron2.config import CfgNode
from detectron2.utils import comm

from .fashion_mnist_coco import build_fashion_mnist_coco, register_fashion_mnist_coco

__all__ = ["DEMO_DATASETS", "demo_dataset_root", "register_demo_datasets", "register_lazy_demo_datasets"]

# name prefix -> build arguments
DEMO_DATASETS: Dict[str, Dict[str, int]] = {
    "fmnist_coco": dict(num_train=2000, num_val=200),
    "fmnist_coco_tiny": dict(num_train=32, num_val=8),
}


def demo_dataset_root(prefix: str = "fmnist_coco") -> str:
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), prefix)


def register_demo_datasets(cfg: CfgNode) -> bool:
    """Build (main process, once) and register the demo datasets that cfg.DATASETS names.

    Call it once after loading a config that names `fmnist_coco_*` datasets (the configs in
    configs/Demo/) and before building a data loader or evaluator, in every process: detectron2
    knows only the datasets registered in its DatasetCatalog, and these are registered by this
    call, not by `import mabn_d2`. Without it, DefaultTrainer stops with detectron2's "Dataset
    'fmnist_coco_train' is not registered". Safe to call again; a config without demo datasets
    is left alone. Returns whether the config names one.

        from demo_datasets.builtin import register_demo_datasets
        register_demo_datasets(cfg)
        trainer = DefaultTrainer(cfg)
    """
    names = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    used = [p for p in DEMO_DATASETS if {f"{p}_train", f"{p}_val"} & names]
    for prefix in used:
        root = demo_dataset_root(prefix)
        if comm.is_main_process():
            build_fashion_mnist_coco(root, **DEMO_DATASETS[prefix])
        comm.synchronize()
        register_fashion_mnist_coco(root, names=(f"{prefix}_train", f"{prefix}_val"))
    return bool(used)


def register_lazy_demo_datasets(cfg: Any) -> bool:
    """`register_demo_datasets` for the datasets a LazyConfig's data loaders name."""
    from mabn_d2.engine.lazy import lazy_dataset_names

    train, test = lazy_dataset_names(cfg)
    return register_demo_datasets(CfgNode({"DATASETS": CfgNode({"TRAIN": list(train), "TEST": list(test)})}))
