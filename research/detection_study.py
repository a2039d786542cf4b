"""Detection-level study of norms and MABN settings on the Fashion-MNIST COCO demo.

Every variant trains the demo's model on the demo's data with the same learning rate and
schedule; only the norm or an MABN setting changes. Runs evaluate periodically
(TEST.EVAL_PERIOD), so AP can be followed over iterations. Each (variant, seed) run is a
`tools/train_net.py` subprocess in its own directory, checkpointing at every evaluation: a
finished run is skipped, an interrupted one resumes exactly.

One variant trains nothing: it takes another run's checkpoints, re-estimates MABN's running_var
at those weights (`update_mabn_running_var`) and evaluates again, which separates the
train/eval mismatch from what the weights learned.
"""
import dataclasses
import math
import os
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

from mabn_d2.utils.atomic_io import atomic_write_text
from .recipe import official_schedule
from mabn_d2.engine.reestimation import evaluation_records

__all__ = [
    "Variant", "VARIANTS", "DEMO_NORM_CONFIGS", "METRICS", "evaluation_curve", "final_metrics",
    "run_detection_study",
]

METRICS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")
_DEMO = "configs/Demo/fmnist_mask_rcnn_R_18_FPN_{}.yaml"
DEMO_NORM_CONFIGS = {"BN": _DEMO.format("bn"), "GN": _DEMO.format("gn"), "MABN": _DEMO.format("mabn"),
                     "BRN": _DEMO.format("brn")}
# The paper's warm-ups, pinned so the variant does not follow later changes of the demo config.
_PAPER_WARMUPS = ("MODEL.MABN.WARMUP_FRACTION", "-1.0", "MODEL.MABN.RENORM_WARMUP_FRACTION", "-1.0",
                  "MODEL.MABN.WARMUP_ITERS", "100", "MODEL.MABN.RENORM_WARMUP_ITERS", "1000")


def _official_demo_opts(max_iter: int = 450, lr: float = 0.02) -> Tuple[str, ...]:
    """The authors' solver scaled to the demo's schedule by the study's rules (recipe.official_schedule):
    at 450 iterations LR warm-up 90 from 1/3, moving averages from 22, re-normalization from 180,
    LR x 0.1 at 300 and 400, bias LR x 2 without decay, gamma decayed, no clipping. The demo's LR
    and its 2 images per step stay; the study sets its own evaluation and checkpoint periods."""
    schedule = official_schedule(max_iter, 0, lr=lr, images_per_step=2)
    pairs = list(zip(schedule.solver_opts[::2], schedule.solver_opts[1::2]))
    solver = [x for key, value in pairs if key not in ("TEST.EVAL_PERIOD", "SOLVER.CHECKPOINT_PERIOD")
              for x in (key, value)]
    return tuple(solver) + ("MODEL.MABN.WARMUP_FRACTION", "-1.0", "MODEL.MABN.RENORM_WARMUP_FRACTION", "-1.0",
                            "MODEL.MABN.WARMUP_ITERS", str(schedule.sma_start),
                            "MODEL.MABN.RENORM_WARMUP_ITERS", str(schedule.renorm_start))


_OFFICIAL = _official_demo_opts()


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of the study: a demo config plus overrides, or a re-estimation of another arm."""

    description: str
    config: str = ""
    opts: Tuple[str, ...] = ()
    reestimate: str = ""  # name of the variant whose checkpoints get running_var re-estimated


VARIANTS: Dict[str, Variant] = {
    "BN": Variant("BatchNorm, batch statistics of 2 images", DEMO_NORM_CONFIGS["BN"]),
    "GN": Variant("GroupNorm(32)", DEMO_NORM_CONFIGS["GN"]),
    "BRN": Variant("Batch Renormalization, warm-up and ramps scaled to 2% / 20% of the schedule",
                   DEMO_NORM_CONFIGS["BRN"]),
    "MABN_paper_warmups": Variant("MABN, the paper's warm-ups 100 / 1000 iterations", DEMO_NORM_CONFIGS["MABN"],
                                  _PAPER_WARMUPS),
    "MABN_warmups_2_10": Variant("MABN, warm-ups 2% / 10% of the schedule", DEMO_NORM_CONFIGS["MABN"],
                                 ("MODEL.MABN.WARMUP_FRACTION", "0.02", "MODEL.MABN.RENORM_WARMUP_FRACTION", "0.1")),
    "MABN_warmups_2_20": Variant("MABN, warm-ups 2% / 20% of the schedule", DEMO_NORM_CONFIGS["MABN"],
                                 ("MODEL.MABN.WARMUP_FRACTION", "0.02", "MODEL.MABN.RENORM_WARMUP_FRACTION", "0.2")),
    "MABN_batch_stats": Variant("MABN with batch statistics throughout (warm-up beyond the schedule)",
                                DEMO_NORM_CONFIGS["MABN"],
                                ("MODEL.MABN.WARMUP_FRACTION", "-1.0", "MODEL.MABN.RENORM_WARMUP_FRACTION", "-1.0",
                                 "MODEL.MABN.WARMUP_ITERS", "1000000", "MODEL.MABN.RENORM_WARMUP_ITERS", "1000000")),
    "MABN_buffer_4": Variant("MABN, paper warm-ups, moving averages over 4 iterations", DEMO_NORM_CONFIGS["MABN"],
                             _PAPER_WARMUPS + ("MODEL.MABN.BUFFER_SIZE", "4")),
    "MABN_bn_heads": Variant("MABN in backbone and FPN, BN in the box and mask heads, paper warm-ups",
                             DEMO_NORM_CONFIGS["MABN"],
                             _PAPER_WARMUPS + ("MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN")),
    # The demo under the authors' solver scaled to its 450 iterations (docs/algorithm.md).
    "BN_official": Variant("BatchNorm, the official solver scaled to 450 iterations", DEMO_NORM_CONFIGS["BN"],
                           _OFFICIAL),
    "MABN_official": Variant("MABN everywhere, the official solver and MABN phases scaled to 450 iterations",
                             DEMO_NORM_CONFIGS["MABN"], _OFFICIAL),
    "MABN_bn_heads_official": Variant("MABN in backbone and FPN, BN in the heads, the official solver scaled to 450 "
                                      "iterations", DEMO_NORM_CONFIGS["MABN"],
                                      _OFFICIAL + ("MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN")),
    "MABN_paper_warmups_reestimated": Variant(
        "MABN_paper_warmups' checkpoints with running_var re-estimated from 100 training batches",
        reestimate="MABN_paper_warmups"),
}


def evaluation_curve(run_dir: str) -> Dict[int, Dict[str, float]]:
    """{iterations trained: metrics} for every evaluation in run_dir/metrics.json (empty if none).

    An evaluation where the model detected nothing counts as AP 0, which it is: detectron2's
    COCOEvaluator then logs NaN box metrics and no mask metrics at all.
    """
    max_iter = _max_iter(run_dir)
    records = evaluation_records(os.path.join(run_dir, "metrics.json"), max_iter if max_iter else 2**62)
    curve = {}
    for it, record in records.items():
        if all(k in record for k in METRICS):
            curve[it] = {key: float(record[key]) for key in METRICS}
        elif _detected_nothing(record):
            curve[it] = {key: 0.0 for key in METRICS}
    return curve


def _detected_nothing(record: Dict) -> bool:
    box = [record.get(key) for key in METRICS if key.startswith("bbox/")]
    return all(v is not None and math.isnan(float(v)) for v in box) and not any(
        math.isfinite(float(record[key])) for key in METRICS if key.startswith("segm/") and key in record)


def _max_iter(run_dir: str) -> Optional[int]:
    """SOLVER.MAX_ITER of the run, from the config.yaml detectron2 wrote into its directory."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])


def final_metrics(run_dir: str) -> Optional[Dict[str, float]]:
    """The evaluation after the last iteration of a finished run, or None if it has not finished."""
    curve = evaluation_curve(run_dir)
    max_iter = _max_iter(run_dir)
    if not curve or (max_iter is not None and max(curve) < max_iter):
        return None
    return curve[max(curve)]


def _record_commit(run_dir: str, repo_root: str) -> None:
    """The commit of the code a run starts (or resumes) from, appended to run_dir/code_commit.txt
    when it differs from the last one, so a run resumed on newer code names every commit it ran at."""
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root, capture_output=True, text=True)
    if result.returncode != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "code_commit.txt")
    commits = open(path).read().split() if os.path.exists(path) else []
    if not commits or commits[-1] != result.stdout.strip():
        atomic_write_text(path, "\n".join([*commits, result.stdout.strip()]) + "\n")


def _train(run_dir: str, variant: Variant, seed: int, eval_period: int, opts: Sequence[str], repo_root: str,
           python: str) -> None:
    resume = os.path.exists(os.path.join(run_dir, "last_checkpoint"))
    _record_commit(run_dir, repo_root)
    command = [python, os.path.join(repo_root, "tools/train_net.py"),
               "--config-file", os.path.join(repo_root, variant.config)]
    command += ["--resume"] if resume else []
    command += ["OUTPUT_DIR", run_dir, "SEED", str(seed), "SOLVER.CHECKPOINT_PERIOD", str(eval_period),
                "TEST.EVAL_PERIOD", str(eval_period), *variant.opts, *opts]
    subprocess.run(command, check=True, cwd=repo_root)


def _reestimate(run_dir: str, source_dir: str, num_batches: int, python: str, repo_root: str) -> None:
    command = [python, os.path.join(repo_root, "tools/reestimate_mabn_stats.py"), "--run-dir", source_dir,
               "--output-dir", run_dir, "--num-batches", str(num_batches), "--all-evaluated"]
    subprocess.run(command, check=True, cwd=repo_root)


def run_detection_study(output_dir: str, variants: Sequence[str], seeds: Sequence[int], opts: Sequence[str] = (),
                        eval_period: int = 300, reestimate_batches: int = 100, repo_root: str = ".",
                        python: str = sys.executable) -> Dict[str, Dict[int, Dict[int, Dict[str, float]]]]:
    """Run (or skip when finished) every (variant, seed); {variant: {seed: evaluation curve}}."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown study variants {unknown}; choose from {sorted(VARIANTS)}")
    results: Dict[str, Dict[int, Dict[int, Dict[str, float]]]] = {}
    for name in variants:
        variant = VARIANTS[name]
        for seed in seeds:
            run_dir = os.path.join(output_dir, f"{name}_seed{seed}")
            if variant.reestimate:
                source_dir = os.path.join(output_dir, f"{variant.reestimate}_seed{seed}")
                if final_metrics(source_dir) is None:
                    raise RuntimeError(f"{name} needs the finished run {source_dir}; run {variant.reestimate} first")
                done = os.path.exists(os.path.join(run_dir, "metrics.json")) and \
                    set(evaluation_curve(run_dir)) >= set(evaluation_curve(source_dir))
                if not done:
                    start = time.time()
                    _reestimate(run_dir, source_dir, reestimate_batches, python, repo_root)
                    _append_wall_time(run_dir, time.time() - start)
            elif final_metrics(run_dir) is None:
                start = time.time()
                _train(run_dir, variant, seed, eval_period, opts, repo_root, python)
                if final_metrics(run_dir) is None:
                    raise RuntimeError(f"{run_dir}: training finished without final evaluation metrics")
                _append_wall_time(run_dir, time.time() - start)
            results.setdefault(name, {})[seed] = evaluation_curve(run_dir)
    return results


def _append_wall_time(run_dir: str, seconds: float) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "wall_time.txt"), "a") as f:
        f.write(f"{seconds:.0f}\n")
