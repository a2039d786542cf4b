import os
import sys

# Triton kernels are tested on the CPU under Triton's interpreter, which must be on before
# anything imports triton (torch does, lazily). Export TRITON_INTERPRET=0 to opt out.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def load_tool(name: str):
    """tools/<name>.py as a module named <name>_tool (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_datasets_dir(tmp_path_factory):
    """A session-wide $DETECTRON2_DATASETS so demo datasets are built once per test run."""
    path = str(tmp_path_factory.mktemp("detectron2_datasets"))
    previous = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = path
    yield path
    if previous is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = previous


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module; opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. The tensors there are tiny: extra
    intra-op threads only add waiting on a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_TOOL_LOGGERS = ("mabn_d2", "detectron2", "d2", "fvcore", "")


@pytest.fixture(autouse=True)
def _restore_log_handlers():
    """Tools run in-process call detectron2's setup_logger, which attaches handlers to the stream
    pytest captured for that test; a later test would log into the closed stream. Put the
    handler lists back after every test."""
    import logging

    saved = {name: list(logging.getLogger(name).handlers) for name in _TOOL_LOGGERS}
    yield
    for name, handlers in saved.items():
        logging.getLogger(name).handlers[:] = handlers
