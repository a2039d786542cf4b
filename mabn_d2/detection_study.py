"""Detection-level comparison of norms on the Fashion-MNIST COCO demo (same schedule and seeds).

Each (norm, seed) run is a `tools/train_net.py` subprocess in its own directory, checkpointing
periodically: a finished run (final metrics present) is skipped, an interrupted one resumes
exactly. Results are read back from detectron2's metrics.json.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence

from .benchmarking import markdown_table

__all__ = ["DEMO_NORM_CONFIGS", "final_metrics", "run_detection_study", "results_table"]

DEMO_NORM_CONFIGS = {
    "BN": "configs/Demo/fmnist_mask_rcnn_R_18_FPN_bn.yaml",
    "GN": "configs/Demo/fmnist_mask_rcnn_R_18_FPN_gn.yaml",
    "MABN": "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn.yaml",
}
METRICS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")


def final_metrics(run_dir: str) -> Optional[Dict[str, float]]:
    """The evaluation metrics a finished run wrote to metrics.json, or None if it has not finished."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                if all(key in record for key in METRICS):
                    found = {key: float(record[key]) for key in METRICS}
    return found


def run_detection_study(output_dir: str, norms: Sequence[str], seeds: Sequence[int], opts: Sequence[str] = (),
                        repo_root: str = ".", python: str = sys.executable) -> Dict[str, Dict[int, Dict[str, float]]]:
    results: Dict[str, Dict[int, Dict[str, float]]] = {}
    for norm in norms:
        for seed in seeds:
            run_dir = os.path.join(output_dir, f"{norm}_seed{seed}")
            metrics = final_metrics(run_dir)
            if metrics is None:
                resume = os.path.exists(os.path.join(run_dir, "last_checkpoint"))
                command = [python, os.path.join(repo_root, "tools/train_net.py"),
                           "--config-file", os.path.join(repo_root, DEMO_NORM_CONFIGS[norm])]
                command += ["--resume"] if resume else []
                command += ["OUTPUT_DIR", run_dir, "SEED", str(seed), "SOLVER.CHECKPOINT_PERIOD", "100", *opts]
                start = time.time()
                subprocess.run(command, check=True, cwd=repo_root)
                metrics = final_metrics(run_dir)
                if metrics is None:
                    raise RuntimeError(f"{run_dir}: training finished without evaluation metrics")
                _append_wall_time(run_dir, time.time() - start)
            results.setdefault(norm, {})[seed] = metrics
    return results


def _append_wall_time(run_dir: str, seconds: float) -> None:
    with open(os.path.join(run_dir, "wall_time.txt"), "a") as f:
        f.write(f"{seconds:.0f}\n")


def results_table(results: Dict[str, Dict[int, Dict[str, float]]]) -> str:
    rows = []
    for norm, by_seed in results.items():
        row = [norm, ", ".join(str(s) for s in by_seed)]
        for key in METRICS:
            values = [m[key] for m in by_seed.values()]
            mean = statistics.mean(values)
            row.append(f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}")
        rows.append(row)
    return markdown_table(["norm", "seeds", *METRICS], rows)
