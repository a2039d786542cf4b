"""Triton kernels of the MABN and Batch Renormalization training steps (four launches per step).

`launch` plans and guards the launches, `mabn` / `batch_renorm` are the autograd Functions,
`*_kernels` and `common` the kernels, `first_use_check` the check against the public path before first use.
Kernel modules are imported on first use (see `launch.kernel_module`), so importing this
package needs no Triton.
"""
