"""torch.compile: a compiled MABN / Batch Renormalization model trains exactly like eager through
every phase, and compiles a fixed number of graphs whatever the iteration."""
import copy

import torch
from torch import nn

from mabn_d2.layers import BatchRenorm2d, MABN2d
from mabn_d2.layers import backend as backend_module

ITERATIONS = 12  # MABN: batch statistics 1-2, moving averages 3-5, clipped re-normalization 6-12


class _CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts the graphs it got."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


class _Net(nn.Module):
    """Explicit calls (no Sequential loop), so the graph resumes after each norm's training step."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.mabn = MABN2d(4, buffer_size=2, warmup_iters=3, renorm_warmup_iters=5)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.brn = BatchRenorm2d(4, warmup_iters=2, r_max_ramp_iters=4, d_max_ramp_iters=4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = torch.relu(self.mabn(self.conv1(x)))
        x = torch.relu(self.brn(self.conv2(x)))
        return self.head(x.flatten(1))


def _model():
    """Prepared: conv1 becomes a CenteredConv2d and MABN knows it (a compiled graph hides the conv)."""
    from mabn_d2 import prepare_mabn_model

    torch.manual_seed(0)
    return prepare_mabn_model(_Net())


def test_compiled_training_equals_eager_in_every_phase_with_bounded_compiles():
    eager = _model()
    compiled_module = copy.deepcopy(eager)
    counting = _CountingBackend()
    compiled = torch.compile(compiled_module, backend=counting)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, compiled_module)]
    generator = torch.Generator().manual_seed(1)
    graphs_after = {}
    with backend_module.use_backend("torch"):
        for t in range(1, ITERATIONS + 1):
            x = torch.randn(2, 3, 6, 6, generator=generator) * (1 + 0.2 * t)
            target = torch.randint(0, 3, (2,), generator=generator)
            losses = []
            for model, optimizer in zip((eager, compiled), optimizers):
                loss = nn.functional.cross_entropy(model(x), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7, msg=f"loss at iteration {t}")
            graphs_after[t] = counting.graphs
    assert counting.graphs > 0, "torch.compile captured nothing"
    assert graphs_after[ITERATIONS] == graphs_after[2], f"recompiled in later phases: {graphs_after}"
    assert compiled_module.mabn.iteration == eager.mabn.iteration == ITERATIONS
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_module.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)

    eager.eval()
    compiled_module.eval()
    x = torch.randn(2, 3, 6, 6, generator=generator)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)


def test_cuda_graph_capture_of_a_training_step_is_refused_with_the_reason(monkeypatch):
    import types

    import pytest

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    on_cuda = types.SimpleNamespace(device=torch.device("cuda", 0), is_cuda=True)
    with pytest.raises(RuntimeError, match="MABN2d: a training step cannot be captured into a CUDA graph"):
        backend_module.refuse_graph_capture(on_cuda, "MABN2d")
    backend_module.refuse_graph_capture(torch.zeros(1), "MABN2d")  # CPU tensors are never captured
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    backend_module.refuse_graph_capture(on_cuda, "MABN2d")
