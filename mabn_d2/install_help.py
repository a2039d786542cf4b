"""The one dependency pip cannot install for mabn_d2: detectron2 is not on PyPI under its own name.
A user who ran `pip install mabn_d2` into a Python without it gets the way to install it, not a
bare "No module named 'detectron2'"."""
import importlib.util
import sys

__all__ = ["DETECTRON2_MISSING", "require_detectron2"]

DETECTRON2_MISSING = (
    "mabn_d2 needs detectron2, which this Python ({python}) cannot import. detectron2 is not on PyPI "
    "under its own name, so `pip install mabn_d2` does not bring it: install it first, e.g. "
    "`pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'` "
    "(it builds against the installed torch), or run `bash scripts/setup_env.sh` in a checkout of "
    "mabn_d2. See README.md, section \"Installing into a detectron2 environment\"."
)


def require_detectron2() -> None:
    """ModuleNotFoundError naming the way to install detectron2 when it cannot be found.

    Only detectron2's own absence is translated: a detectron2 that is present but fails to
    import (a missing dependency of its own) raises its own error later, unchanged.
    """
    try:
        found = importlib.util.find_spec("detectron2") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ModuleNotFoundError(DETECTRON2_MISSING.format(python=sys.executable), name="detectron2")
