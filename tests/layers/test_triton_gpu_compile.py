"""The Triton kernels compile to sm_90 (H100/H200) machine code, without a GPU.

The interpreter runs kernels as numpy and accepts constructs a GPU compiler would reject; this
lowers every kernel variant with Triton's own compiler and ptxas in a subprocess that has no
TRITON_INTERPRET and imports only triton and the kernel modules.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from ..conftest import REPO_ROOT

COMPILE_SCRIPT = textwrap.dedent(
    """
    import importlib, sys, types
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    root = sys.argv[1]
    for name, path in (("mabn_d2", "mabn_d2"), ("mabn_d2.layers", "mabn_d2/layers")):
        package = types.ModuleType(name)  # the package without its __init__ (no torch, no detectron2)
        package.__path__ = [root + "/" + path]
        sys.modules[name] = package
    mabn = importlib.import_module("mabn_d2.layers.triton.mabn_kernels")
    brn = importlib.import_module("mabn_d2.layers.triton.batch_renorm_kernels")
    common = importlib.import_module("mabn_d2.layers.triton.common")

    def source(kernel, act, state, constexprs):
        sig = {}
        for p in kernel.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name in ("x_ptr", "grad_ptr", "a_ptr", "b_ptr", "out_ptr"):
                sig[p.name] = "*" + act
            elif p.name == "counters_ptr":
                sig[p.name] = "*i32"
            elif p.name == "nonfinite_ptr":
                sig[p.name] = "*i64"
            elif p.name.endswith("_ptr"):
                sig[p.name] = "*" + state
            else:
                sig[p.name] = p.annotation or "i32"
        return ASTSource(kernel, sig, constexprs)

    sources = []
    variants = [("bf16", "fp32", False, True), ("fp16", "fp32", True, True), ("fp32", "fp32", False, False),
                ("bf16", "fp32", True, False), ("fp64", "fp64", True, False)]
    for act, state, channels_last, early in variants:
        blocks = dict(BLOCK_R=32, BLOCK_C=64, BLOCK_S=32) if channels_last else dict(BLOCK_R=1024, BLOCK_C=2, BLOCK_S=64)
        layout = dict(CHANNELS_LAST=channels_last, **blocks)
        ring = dict(BLOCK_RING=16)
        sources += [
            source(mabn.forward_statistics_kernel, act, state,
                   dict(USE_BATCH_STATISTICS=early, RENORMALIZE=not early, **layout, **ring)),
            source(mabn.backward_statistics_kernel, act, state, dict(USE_BATCH_STATISTICS=early, **layout, **ring)),
            source(brn.forward_statistics_kernel, act, state, dict(LERP_FROM_END=not early, **layout)),
            source(brn.backward_statistics_kernel, act, state, layout),
            source(common.channel_affine_kernel, act, state,
                   dict(HAS_B=not early, HAS_SHIFT=True, CHANNELS_LAST=channels_last, BLOCK_M=2, BLOCK_K=1024)),
        ]
    for src in sources:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        assert compiled.asm["cubin"], src.name
    print("compiled", len(sources))
    """
)


def test_kernels_compile_for_an_sm90_gpu(tmp_path):
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, REPO_ROOT], env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 25" in result.stdout, result.stdout
