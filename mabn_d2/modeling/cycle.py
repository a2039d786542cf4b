"""Per-level MABN for a head that is shared across FPN levels (RetinaNet).

MABN's iteration counter and ring buffers describe one input distribution, so a layer applied
to every FPN level in turn needs one MABN2d per level, as detectron2's `CycleBatchNormList`
does for BN.
"""
import copy
from typing import Callable

import torch
from torch import nn

from ..layers import MABN2d

__all__ = ["CycleMABNList"]


def _without_affine(norm: nn.Module) -> nn.Module:
    """Replace `weight`/`bias` parameters by constant, non-persistent buffers (1 and 0).

    The per-level layers then contribute only their statistics to the state_dict, and the
    shared affine lives in the list, exactly the layout of `CycleBatchNormList(affine=True)`.
    """
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        param = getattr(norm, name, None)
        if isinstance(param, nn.Parameter):
            delattr(norm, name)
            norm.register_buffer(name, torch.full_like(param.detach(), fill), persistent=False)
    return norm


class CycleMABNList(nn.ModuleList):
    """`length` norms with their own statistics, used in turn on each call, and a shared affine.

    With gamma = 1 per level followed by the shared weight, the forward and the MABN backward
    statistic (Psi of g_z = dy * gamma * r) are the same as one MABN2d whose weight is the shared one.
    NOTE: like `CycleBatchNormList`, the caller MUST call it a multiple of `length` times per
    iteration, or the levels get each other's statistics.
    """

    def __init__(
        self, length: int, num_features: int, norm_class: Callable[..., nn.Module] = MABN2d, **kwargs
    ):
        """
        Args:
            length: number of input domains (FPN levels) to cycle through.
            num_features: channels.
            norm_class: builds one level's norm as ``norm_class(num_features, **kwargs)``
                (MABN2d, BatchRenorm2d or a factory such as ``functools.partial(get_norm, "MABN")``).
        """
        if length < 1:
            raise ValueError(f"CycleMABNList: length must be >= 1, got {length}")
        super().__init__([_without_affine(norm_class(num_features, **kwargs)) for _ in range(length)])
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self._pos = 0

    @classmethod
    def from_shared(cls, norm: nn.Module, length: int) -> "CycleMABNList":
        """One copy of `norm` per level, its affine becoming the shared one.

        For a norm that a head applies to every level in turn: each level starts from `norm`'s
        hyper-parameters and state, on its device, so the list first computes what `norm` did,
        and from then on keeps each level's statistics apart.
        """
        levels = cls(length, norm.num_features, norm_class=lambda _: copy.deepcopy(norm)).to(norm.weight.device)
        with torch.no_grad():
            levels.weight.copy_(norm.weight)
            levels.bias.copy_(norm.bias)
        levels.weight.requires_grad_(norm.weight.requires_grad)
        levels.bias.requires_grad_(norm.bias.requires_grad)
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self[self._pos](x)
        self._pos = (self._pos + 1) % len(self)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}"
