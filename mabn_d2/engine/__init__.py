"""Training machinery around detectron2's DefaultTrainer: `MABNTrainer` (trainer), exact resume
(checkpoint, rank_state, train_stream), configuration and device
checks before anything is written (preflight), the evaluator by dataset type (evaluation), and
MABN's health in the training log (health: `MABNHealthHook`, which a stock DefaultTrainer adds with
`trainer.register_hooks([MABNHealthHook()])`), and LazyConfig (.py) runs with the same parts (lazy:
loading, overrides, checks and the model; lazy_trainer: `LazyMABNTrainer`), and the starting
points of a run: ImageNet BatchNorm weights converted for MABN fine-tuning (convert_pretrained)
and running_var re-estimated from training batches (reestimation).

`import mabn_d2` does not import this package; `tools/train_net.py` and the trainer do.
"""
from .health import MABNHealthHook
from .trainer import MABNTrainer, setup_cfg

__all__ = ["MABNHealthHook", "MABNTrainer", "setup_cfg"]
