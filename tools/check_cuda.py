#!/usr/bin/env python
"""Check the MABN layers on one CUDA GPU: smoke stage, correctness of MABN2d and BatchRenorm2d,
host syncs and autocast, one streamed table.

The checks are the plugin's, mabn_d2/layers/cuda_check.py (`--help` describes them). This script
only makes sure the project imports first, says in one line what a torch-only GPU box lacks if it
does not, and gives the checks a watch for host reads of tensor values (`forbid_host_reads`).
The layer timings, the ablation layers and the Mask R-CNN step are tools/benchmark_cuda.py's.

  python tools/check_cuda.py --output check.md
"""
import contextlib
import importlib.util
import os
import sys
import warnings
from typing import Iterator, List, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What `import mabn_d2` needs besides torch (import name: package name). A torch-only GPU box lacks
# most of them; detectron2's pure-Python part is enough.
RUNTIME_PACKAGES = {
    "detectron2": "detectron2", "torchvision": "torchvision", "PIL": "Pillow", "pycocotools": "pycocotools",
    "fvcore": "fvcore", "iopath": "iopath", "omegaconf": "omegaconf", "yacs": "yacs", "termcolor": "termcolor",
    "hydra": "hydra-core", "tabulate": "tabulate", "cloudpickle": "cloudpickle",
}


def missing_packages() -> List[str]:
    """The packages of RUNTIME_PACKAGES that are not importable here."""
    missing = []
    for module, package in RUNTIME_PACKAGES.items():
        try:
            found = sys.modules.get(module, 0) is not None and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


@contextlib.contextmanager
def forbid_host_reads() -> Iterator[None]:
    """Raise on any host read of a tensor value (`.item()`, `bool(t)`, ...), on any device.

    It watches ATen's scalar-read ops in a dispatch mode; it lives here, not in the package, which
    uses public PyTorch only (on CUDA, torch.cuda.set_sync_debug_mode catches the same reads).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    host_reads = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)

    class ForbidHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in host_reads:
                raise RuntimeError(f"host read of a tensor value: {func}")
            return func(*args, **(kwargs or {}))

    with ForbidHostReads():
        yield


def import_failure(tool: str, error: ImportError) -> int:
    """Say in one line why the project does not import here (no CUDA GPU first, if there is none,
    else the packages a torch-only GPU box lacks); the exit status 2."""
    if not torch.cuda.is_available():
        print(f"{tool}: no CUDA GPU available (torch {torch.__version__}, torch.cuda.is_available() is "
              "False); run this on a machine with a CUDA GPU", file=sys.stderr)
    else:
        missing = ", ".join(missing_packages()) or "none of the known packages"
        print(f"{tool}: cannot import mabn_d2 ({error}); missing: {missing}; put detectron2 and its "
              "pure-Python dependencies on PYTHONPATH", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    """Import the checks (mabn_d2.layers.cuda_check) and run them; a box that cannot import the
    project gets one line naming what it lacks (and no CUDA GPU first, if it has none)."""
    if REPO_ROOT not in sys.path:  # a checkout that is not installed
        sys.path.insert(0, REPO_ROOT)
    try:
        with warnings.catch_warnings():  # detectron2's import-time deprecation warnings: not this check's output
            warnings.simplefilter("ignore")
            from mabn_d2.layers import cuda_check
    except ImportError as error:
        return import_failure("check_cuda", error)
    return cuda_check.main(argv, host_read_watch=forbid_host_reads)


if __name__ == "__main__":
    sys.exit(main())
