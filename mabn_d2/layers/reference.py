"""MABN's training step as the algorithm spec states it: float64, whole-tensor arithmetic, CPU.

Shares no code with the layers, so comparing them with it checks the implementation against
the spec (docs/algorithm.md) rather than against itself. The tests of both training paths
(public operations and Triton kernels) and tools/check_cuda.py use this one reference.
"""
import torch

__all__ = ["ReferenceMABN"]

_DIMS = (0, 2, 3)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


class ReferenceMABN:
    """One MABN layer's state (ring buffers, running_var, iteration) and its training step.

    `first_statistic_initializes`: the layer's rule that running_var starts from the first
    statistic it uses (EMA decay 0 at iteration 1). Tests that call the autograd Functions with a
    fixed decay turn it off. Non-finite batch statistics leave the stored values unchanged.
    """

    def __init__(self, channels: int, buffer_size: int, ema_decay: float, warmup_iters: int,
                 renorm_warmup_iters: int, renorm_clip: float, eps: float, *, first_statistic_initializes: bool = True):
        self.m, self.ema_decay, self.eps, self.clip = buffer_size, ema_decay, eps, renorm_clip
        self.warmup, self.renorm_warmup = warmup_iters, renorm_warmup_iters
        self.first_statistic_initializes = first_statistic_initializes
        self.t = 0
        self.x2 = torch.zeros(buffer_size, channels, dtype=torch.float64)
        self.gz = torch.zeros(buffer_size, channels, dtype=torch.float64)
        self.running_var = torch.ones(channels, dtype=torch.float64)
        self.clipped_high = self.clipped_low = 0

    @property
    def clipped(self) -> int:
        """Channel-iterations in which r was clipped (either way)."""
        return self.clipped_high + self.clipped_low

    def step(self, x: torch.Tensor, dy: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
        """(y, dx, dgamma, dbeta) of one training iteration, in float64; advances the state."""
        x, dy, gamma, beta = (t.detach().double().cpu() for t in (x, dy, gamma, beta))
        self.t += 1
        k = self.t % self.m
        early = self.t <= self.m or self.t < self.warmup
        chi2_batch = (x * x).mean(_DIMS)
        self.x2[k] = torch.where(torch.isfinite(chi2_batch), chi2_batch, self.x2[k])
        chi2 = chi2_batch if early else self.x2.mean(0)
        s = (chi2 + self.eps).sqrt()
        r = torch.ones_like(s)
        if self.t > max(self.renorm_warmup, self.warmup):
            raw = s / (self.running_var + self.eps).sqrt()
            r = raw.clamp(1.0 / self.clip, self.clip)
            self.clipped_high += int((raw > self.clip).sum())
            self.clipped_low += int((raw < 1.0 / self.clip).sum())
        decay = 0.0 if (self.first_statistic_initializes and self.t == 1) else self.ema_decay
        updated = decay * self.running_var + (1 - decay) * chi2
        self.running_var = torch.where(torch.isfinite(updated), updated, self.running_var)
        z = x / _per_channel(s)
        g_z = dy * _per_channel(gamma * r)
        psi_batch = (g_z * z).mean(_DIMS)
        self.gz[k] = torch.where(torch.isfinite(psi_batch), psi_batch, self.gz[k])
        psi = psi_batch if early else self.gz.mean(0)
        y = _per_channel(gamma * r) * z + _per_channel(beta)
        dx = (g_z - z * _per_channel(psi)) / _per_channel(s)
        return y, dx, (dy * z).sum(_DIMS) * r, dy.sum(_DIMS)
