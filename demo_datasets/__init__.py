"""Offline datasets for the demo, the studies and the tests (deterministic, nothing downloaded).

Names are imported lazily, so importing the package stays cheap.
"""

from typing import Any

__all__ = [
    "DEFAULT_DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "build_fashion_mnist_coco",
    "load_fashion_mnist",
    "read_idx",
    "register_fashion_mnist_coco",
    "resolve_fashion_mnist_dir",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import fashion_mnist_coco

        return getattr(fashion_mnist_coco, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
