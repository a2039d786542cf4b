"""Re-estimation of MABN's running_var at a study run's checkpoints, evaluated again.

The evaluations land in a metrics.json of their own, under the iteration they were made at, so
the detection study can put the curve beside the run it came from.
"""
import json
import os
from typing import Any, Callable, Dict

from detectron2.config import CfgNode


from ..utils.atomic_io import atomic_write_text
from .checkpoint import MABNCheckpointer
from .trainer import MABNTrainer, setup_cfg
from ..modeling.precise_stats import update_mabn_running_var

__all__ = ["evaluation_records", "reestimate_run_checkpoints"]


def _checkpoint_for(run_dir: str, iterations: int, max_iter: int) -> str:
    name = "model_final.pth" if iterations >= max_iter else f"model_{iterations - 1:07d}.pth"
    return os.path.join(run_dir, name)


def evaluation_records(metrics_path: str, max_iter: int) -> Dict[int, Dict]:
    """{iterations trained: record} for every evaluation in a detectron2 metrics.json.

    detectron2 logs a periodic evaluation under the index of its last iteration and the final
    one, run after training, under MAX_ITER itself; both map to the number of iterations trained.
    """
    records: Dict[int, Dict] = {}
    if not os.path.exists(metrics_path):
        return records
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if "bbox/AP" in record or "segm/AP" in record:
                index = int(record["iteration"])
                records[index if index >= max_iter else index + 1] = record
    return records


def reestimate_run_checkpoints(run_dir: str, output_dir: str, num_batches: int = 100,
                               all_evaluated: bool = False,
                               register_datasets: Callable[[CfgNode], Any] = lambda cfg: None,
                               ) -> Dict[int, Dict[str, float]]:
    """Re-estimate running_var at a run's checkpoints and evaluate; {iterations: flat metrics}.

    Reads run_dir/config.yaml; evaluates model_final.pth, or with `all_evaluated` every
    checkpoint whose iteration the run evaluated. Results are appended to
    output_dir/metrics.json; checkpoints already there are skipped. A checkpoint whose model
    state differs from the checksum saved with it raises CheckpointError naming the file.
    """
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage


    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: --run-dir must be a detectron2 run directory")
    cfg = setup_cfg(config_path, ["OUTPUT_DIR", output_dir])
    register_datasets(cfg)  # the run's datasets, when they are not detectron2's builtin ones
    max_iter = cfg.SOLVER.MAX_ITER
    source_records = evaluation_records(os.path.join(run_dir, "metrics.json"), max_iter)
    wanted = sorted(source_records) if all_evaluated else [max_iter]
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "config.yaml"), cfg.dump())
    metrics_path = os.path.join(output_dir, "metrics.json")
    done = set(evaluation_records(metrics_path, max_iter))
    results: Dict[int, Dict[str, float]] = {}
    for iterations in wanted:
        if iterations in done:
            continue
        checkpoint = _checkpoint_for(run_dir, iterations, max_iter)
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"{checkpoint} not found (needed for iteration {iterations})")
        model = MABNTrainer.build_model(cfg)
        MABNCheckpointer(model).load(checkpoint, checkpointables=[])  # verified: a damaged file is named
        seed_all_rng(cfg.SEED + iterations)
        with EventStorage(iterations):  # detectron2's training forward logs into an event storage
            updated = update_mabn_running_var(model, build_detection_train_loader(cfg), num_batches)
        if updated == 0:
            raise ValueError(f"{run_dir}: the model has no MABN layer to re-estimate")
        evaluation = MABNTrainer.test(cfg, model)
        flat = {f"{task}/{key}": float(value) for task, values in evaluation.items() for key, value in values.items()}
        results[iterations] = flat
        previous = open(metrics_path).read() if os.path.exists(metrics_path) else ""
        index = iterations if iterations >= max_iter else iterations - 1  # detectron2's convention
        record = json.dumps({"iteration": index, "reestimated_from": checkpoint,
                             "reestimate_batches": num_batches, **flat})
        atomic_write_text(metrics_path, previous + record + "\n")
    return results
