"""mabn_d2.modeling.cycle: CycleMABNList, one MABN per FPN level with a shared affine."""
import pytest
import torch
from torch import nn

from mabn_d2 import MABN2d
from mabn_d2.modeling.cycle import CycleMABNList

from .helpers import RING_BUFFERS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cycle_mabn_list_from_shared_copies_settings_state_and_affine():
    shared = MABN2d(4, buffer_size=3, ema_decay=0.5, eps=1e-3)
    with torch.no_grad():
        shared.weight.fill_(2.0)
        shared.bias.fill_(-1.0)
        shared.running_var.fill_(3.0)
    levels = CycleMABNList.from_shared(shared, 3)
    assert len(levels) == 3 and len({id(m) for m in levels}) == 3 and all(m is not shared for m in levels)
    for level in levels:
        assert (level.buffer_size, level.ema_decay, level.eps) == (3, 0.5, 1e-3)
        assert torch.equal(level.running_var, shared.running_var)
        assert torch.equal(level.weight, torch.ones(4)) and not isinstance(level.weight, nn.Parameter)
    assert torch.equal(levels.weight, shared.weight) and torch.equal(levels.bias, shared.bias)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(levels.eval()(x), shared.eval()(x))


def test_cycle_mabn_list_matches_one_mabn_per_level():
    torch.manual_seed(0)
    cycle = CycleMABNList(2, 4, buffer_size=2)
    with torch.no_grad():
        cycle.weight.uniform_(0.5, 1.5)
        cycle.bias.uniform_(-0.5, 0.5)
    refs = [MABN2d(4, buffer_size=2) for _ in range(2)]
    for ref in refs:
        ref.weight.data.copy_(cycle.weight.data)
        ref.bias.data.copy_(cycle.bias.data)
    assert set(cycle.state_dict()) == {"weight", "bias"} | {
        f"{i}.{k}" for i in range(2) for k in ("running_mean", "running_var", "num_batches_tracked") + RING_BUFFERS
    }
    for _ in range(3):
        for level in range(2):
            x = torch.randn(2, 4, 3, 3, requires_grad=True)
            x_ref = x.detach().clone().requires_grad_()
            y, y_ref = cycle(x), refs[level](x_ref)
            torch.testing.assert_close(y, y_ref)
            dy = torch.randn_like(y)
            y.backward(dy)
            y_ref.backward(dy)
            torch.testing.assert_close(x.grad, x_ref.grad)
    for level, ref in enumerate(refs):
        torch.testing.assert_close(cycle[level].running_var, ref.running_var)
        torch.testing.assert_close(cycle[level].gz_buffer, ref.gz_buffer)
