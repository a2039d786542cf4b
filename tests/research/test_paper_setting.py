"""The paper-setting trainer: per-virtual-GPU norm state swaps and gradient accumulation over micro-batches."""
import copy

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from mabn_d2.layers import MABN2d
from research.paper_setting import MicroBatchTrainer, ReplicaNormStates


def _norms():
    torch.manual_seed(0)
    return nn.Sequential(MABN2d(3, buffer_size=2, warmup_iters=3, renorm_warmup_iters=4), nn.BatchNorm2d(3)).train()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()} | {"iteration": model[0].iteration}


def _assert_state(model, expected):
    assert model[0].iteration == expected["iteration"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def _x(seed):
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * (1 + seed)


def test_each_replica_advances_its_own_state_and_replica_0_stays_the_model_s():
    model = _norms()
    initial = _state(model)
    tensors_before = [b for _, b in model.named_buffers()]
    replicas = ReplicaNormStates(model, 3)
    reference_1, reference_0 = copy.deepcopy(model), copy.deepcopy(model)

    with torch.no_grad():
        for seed in (1, 2):
            with replicas.use(1):
                model(_x(seed))
            reference_1(_x(seed))
            _assert_state(model, initial)  # outside the block: replica 0, untouched
        with replicas.use(0):
            model(_x(3))
        reference_0(_x(3))
        with replicas.use(1):
            _assert_state(model, _state(reference_1))  # two iterations of replica 1's own inputs
        with replicas.use(2):
            _assert_state(model, initial)  # never used
    _assert_state(model, _state(reference_0))
    assert all(a is b for a, b in zip(tensors_before, (b for _, b in model.named_buffers())))


def test_replica_0_is_restored_when_the_block_raises():
    model = _norms()
    replicas = ReplicaNormStates(model, 2)
    initial = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with replicas.use(1), torch.no_grad():
            model(_x(1))
            raise RuntimeError("boom")
    assert replicas.active == 0
    _assert_state(model, initial)
    with pytest.raises(ValueError, match="replicas"):
        ReplicaNormStates(model, 0)


class _Linear(nn.Module):
    """loss = mean over images of (x . w)^2: its gradient over a batch is the mean of per-image gradients."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.seen = []

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        self.seen.append(len(batch))
        return {"loss_sq": ((x @ self.w) ** 2).mean()}


def _step(norm_state, micro_batches, data):
    model = _Linear().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = MicroBatchTrainer(model, [data], optimizer, micro_batches, norm_state)
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
        loss = storage.history("total_loss").latest()
    return model, loss


def test_micro_batches_accumulate_the_gradient_of_the_whole_step():
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(3, generator=generator)} for _ in range(8)]
    x = torch.stack([d["x"] for d in data])
    w0 = torch.tensor([1.0, -2.0, 0.5])
    grad = (2 * (x @ w0)[:, None] * x).mean(0)  # d/dw of mean_i (x_i . w)^2

    shared, loss_shared = _step("shared", 4, data)
    assert shared.seen == [2, 2, 2, 2]
    torch.testing.assert_close(shared.w.detach(), w0 - grad, rtol=1e-6, atol=1e-6)
    assert loss_shared == pytest.approx(float(((x @ w0) ** 2).mean()), rel=1e-6)

    sync, loss_sync = _step("sync", 4, data)
    assert sync.seen == [8]  # SyncBN(16): one forward over the whole step
    torch.testing.assert_close(sync.w.detach(), shared.w.detach(), rtol=1e-6, atol=1e-6)
    assert loss_sync == pytest.approx(loss_shared, rel=1e-6)


def test_a_step_that_does_not_split_into_equal_micro_batches_is_refused():
    data = [{"x": torch.ones(3)} for _ in range(6)]
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH=6 does not split into 4"):
        _step("shared", 4, data)
    with pytest.raises(ValueError, match="norm_state"):
        MicroBatchTrainer(_Linear(), [data], torch.optim.SGD(_Linear().parameters(), lr=1.0), 4, "ddp")


def test_per_gpu_state_keeps_one_bn_state_per_micro_batch():
    class _BNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, batch):
            return {"loss": (self.bn(torch.stack([d["x"] for d in batch])) * self.w).sum()}

    model = _BNModel().train()
    data = [{"x": torch.full((3,), float(i))} for i in range(4)]  # micro-batch 0: images 0, 1; 1: images 2, 3
    trainer = MicroBatchTrainer(model, [data], torch.optim.SGD(model.parameters(), lr=0.0), 2, "per_gpu")
    with EventStorage(0):
        trainer.iter = 0
        trainer.run_step()
    momentum = model.bn.momentum
    torch.testing.assert_close(model.bn.running_mean, torch.full((3,), 0.5 * momentum))  # replica 0 saw 0, 1
    with trainer.replicas.use(1):
        torch.testing.assert_close(model.bn.running_mean, torch.full((3,), 2.5 * momentum))  # replica 1: 2, 3
