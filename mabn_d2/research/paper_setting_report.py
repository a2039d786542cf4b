"""Records and the table of the paper-setting study (8 virtual GPUs x 2 images), from results/paper_setting."""
import os
import statistics
from typing import Dict, Sequence

from .benchmarking import markdown_table
from .run_records import record_from_run

__all__ = ["CHI2_EDGES", "export_arm_record", "paper_setting_table"]


def chi2_edges(steps: int, buffer_size: int = 16, sma_start: int = 30) -> list:
    """Windows of the chi2 lag statistic: the buffer filling, then thirds of the rest."""
    rest = steps - sma_start
    return [buffer_size + 1, sma_start, sma_start + rest // 3, sma_start + 2 * rest // 3, steps]


CHI2_EDGES = chi2_edges(120)


def export_arm_record(run_dir: str, arm: str, seed: int, steps: int, setting: str) -> Dict:
    """A committed record of one finished arm run: curve, loss over the last quarter, chi2 lag windows."""
    from .detection_study import evaluation_curve
    from .paper_setting import ARMS, summarize_chi2_lag

    last_quarter = [steps - steps // 4, steps]
    record = record_from_run(run_dir, "paper_setting", arm, seed, ARMS[arm].description, evaluation_curve(run_dir),
                             last_quarter, [ARMS[arm].config, *ARMS[arm].opts], setting=setting,
                             chi2_lag=summarize_chi2_lag(os.path.join(run_dir, "chi2_lag.jsonl"), chi2_edges(steps)))
    return record


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def paper_setting_table(records: Sequence[Dict]) -> str:
    """One row per arm: final box / mask AP (mean ± std over seeds), per seed, the earlier evaluations, loss, chi2 lag."""
    if not records:
        raise ValueError("no paper-setting run records to report")
    rows = []
    for arm in dict.fromkeys(r["variant"] for r in records):
        runs = sorted((r for r in records if r["variant"] == arm), key=lambda r: r["seed"])
        finals = [r["curve"][max(r["curve"])] for r in runs]
        earlier = "; ".join((f"seed {r['seed']} " if len(runs) > 1 else "")
                            + f"{step}: {r['curve'][step]['bbox/AP']:.1f} / {r['curve'][step]['segm/AP']:.1f}"
                            for r in runs for step in sorted(r["curve"], key=int)[:-1])
        losses = [r["loss_windows"]["total_loss"][-1] for r in runs if r["loss_windows"]]
        edges = runs[0]["loss_windows"]["edges"] if runs[0]["loss_windows"] else None
        lag = runs[0].get("chi2_lag") or {}
        lag_cell = "; ".join(f"{w}: {lag[w]['all layers'][0]:.2f} ({lag[w]['all layers'][1]:+.2f})"
                             for w in sorted(lag, key=lambda w: int(w.split("-")[0]))) or "–"
        rows.append([
            arm, ", ".join(str(r["seed"]) for r in runs),
            f"{_mean_std([m['bbox/AP'] for m in finals])} / {_mean_std([m['segm/AP'] for m in finals])}",
            "; ".join(f"{m['bbox/AP']:.1f} / {m['segm/AP']:.1f}" for m in finals),
            earlier or "–",
            (f"{statistics.mean(losses):.3f} (steps {edges[-2]}-{edges[-1]})" if losses else "–"),
            lag_cell + (f" [seed {runs[0]['seed']}]" if lag and len(runs) > 1 else ""),
        ])
    return markdown_table(["arm", "seeds", "final box / mask AP", "per seed", "earlier evaluations, step: box / mask AP",
                           "mean training loss", "chi2 scatter (bias), all MABN layers"], rows)
