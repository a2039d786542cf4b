"""Training machinery around detectron2's DefaultTrainer: `MABNTrainer` (trainer), exact resume
(checkpoint, rank_state, train_stream), atomic writes (atomic_io), configuration and device
checks before anything is written (preflight), and the evaluator by dataset type (evaluation).

`import mabn_d2` does not import this package; `tools/train_net.py` and the trainer do.
"""
from .trainer import MABNTrainer, setup_cfg

__all__ = ["MABNTrainer", "setup_cfg"]
