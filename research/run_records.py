"""Committed metrics of study runs: one small JSON file per (study, arm, seed) under results/.

detectron2's run folders (metrics.json, checkpoints, log.txt) live under the ignored output/;
what docs/results.md reports must not depend on them. A record keeps what the tables and
figures need: the evaluation curve (final evaluation included), mean training loss over
windows, the commit the run trained at, its wall time and its config overrides.
"""
import glob
import json
import os
import statistics
from typing import Dict, List, Optional, Sequence

from mabn_d2.utils.atomic_io import atomic_write_text

__all__ = ["RECORD_KEYS", "load_records", "write_record", "record_from_run", "loss_windows"]

# every record holds these keys; values may be null where a restored run lost them
RECORD_KEYS = ("study", "variant", "seed", "description", "curve", "loss_windows", "commit", "wall_minutes",
               "config_opts", "source")


def _check(record: Dict, where: str) -> Dict:
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"{where}: run record lacks keys {missing}")
    if not record["curve"]:
        raise ValueError(f"{where}: run record has an empty evaluation curve")
    return record


def write_record(folder: str, record: Dict) -> str:
    """Write folder/<variant>_seed<k>.json atomically; the path."""
    _check(record, folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{record['variant']}_seed{record['seed']}.json")
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def load_records(folder: str) -> List[Dict]:
    """Every record in folder, curves keyed by int iteration, sorted by (variant order in file names, seed)."""
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "*_seed*.json"))):
        with open(path) as f:
            try:
                record = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a JSON run record ({e})") from e
        _check(record, path)
        record["curve"] = {int(it): metrics for it, metrics in record["curve"].items()}
        records.append(record)
    return sorted(records, key=lambda r: (r["variant"], r["seed"]))


def loss_windows(metrics_json: str, edges: Sequence[int]) -> Optional[Dict]:
    """Mean total_loss between consecutive `edges` from detectron2's metrics.json; None if absent."""
    if not os.path.exists(metrics_json):
        return None
    losses = []
    with open(metrics_json) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if "total_loss" in record:
                losses.append((int(record["iteration"]), float(record["total_loss"])))
    means = []
    for a, b in zip(edges, edges[1:]):
        window = [loss for it, loss in losses if a <= it < b]
        means.append(round(statistics.mean(window), 4) if window else None)
    return {"edges": list(edges), "total_loss": means}


def record_from_run(run_dir: str, study: str, variant: str, seed: int, description: str,
                    curve: Dict[int, Dict[str, float]], edges: Sequence[int], config_opts: Sequence[str],
                    **extra) -> Dict:
    """A record of a finished detectron2 run folder (its metrics.json, code_commit.txt, wall_time.txt).

    `commit` names every commit the run trained at, joined by "+" when it was resumed on newer code.
    """
    commit_path = os.path.join(run_dir, "code_commit.txt")
    wall_path = os.path.join(run_dir, "wall_time.txt")
    # a run resumed on newer code trained at several commits: "first+second"
    commit = ("+".join(c[:7] for c in open(commit_path).read().split()) or None) if os.path.exists(commit_path) else None
    wall = (round(sum(float(x) for x in open(wall_path).read().split()) / 60, 1)
            if os.path.exists(wall_path) else None)
    record = {
        "study": study, "variant": variant, "seed": seed, "description": description,
        "curve": {str(it): dict(m) for it, m in sorted(curve.items())},
        "loss_windows": loss_windows(os.path.join(run_dir, "metrics.json"), edges),
        "commit": commit, "wall_minutes": wall, "config_opts": list(config_opts),
        "source": f"exported from {run_dir} by the study tool",
    }
    record.update(extra)
    return record
