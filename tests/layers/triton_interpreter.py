"""Skip marker for tests that run Triton kernels on CPU tensors under Triton's interpreter."""
import importlib.util
import os

import pytest


def interpreter_active() -> bool:
    """True when Triton's own jit helpers (tl.sum, tl.zeros) were defined for the interpreter,
    i.e. TRITON_INTERPRET=1 was set before triton was imported (tests/conftest.py does it)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(tl.zeros, InterpretedFunction)


requires_triton_interpreter = pytest.mark.skipif(
    not interpreter_active(),
    reason="needs Triton, with TRITON_INTERPRET=1 set before triton is imported (see tests/conftest.py)",
)
