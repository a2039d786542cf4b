"""Records and the table of the paper-setting study (8 virtual GPUs x 2 images), from results/paper_setting."""
import os
import statistics
from typing import Dict, List, Sequence

from .benchmarking import markdown_table
from .run_records import record_from_run

__all__ = ["chi2_edges", "chi2_layer_table", "export_arm_record", "paper_setting_table"]


def chi2_edges(schedule, sma_start: int, buffer_size: int = 16) -> List[int]:
    """Windows of the chi2 statistics: the buffer filling, then the recipe's phases (moving averages,
    re-normalization, the first LR decay) up to the end."""
    inner = [e for e in (sma_start, schedule.renorm_start, int(round(schedule.steps * 2 / 3)))
             if buffer_size + 1 < e < schedule.steps]
    return sorted({buffer_size + 1, *inner, schedule.steps})


def export_arm_record(run_dir: str, arm: str, seed: int, schedule, virtual_gpus: int = 8,
                      opts: Sequence[str] = (), finished: bool = True) -> Dict:
    """A committed record of one finished arm run: curve, loss over the last quarter, the chi2 windows
    (chi2_sma: the batch statistic against MABN's moving average; chi2_step: against the step's pooled
    statistic, the control), and the recipe it trained under."""
    from .detection_study import evaluation_curve
    from .paper_setting import ARMS, arm_config, summarize_chi2

    steps = schedule.steps
    spec = ARMS[arm]
    sma_start, renorm_start = spec.phase_steps(schedule)
    chi2 = summarize_chi2(os.path.join(run_dir, "chi2.jsonl"), chi2_edges(schedule, sma_start))
    setting = (f"{virtual_gpus} virtual GPUs x 2 images, SGD batch {2 * virtual_gpus}, LR 0.02, "
               f"{schedule.describe()}, 192 px")
    return record_from_run(
        run_dir, "paper_setting", arm, seed, spec.description, evaluation_curve(run_dir),
        [steps - steps // 4, steps], [spec.config, *arm_config(spec, schedule, opts)], setting=setting,
        recipe=schedule.recipe, steps=steps, jitter=spec.jitter_for(schedule),
        mabn_phases={"moving_averages_from": sma_start, "renorm_from": renorm_start} if spec.is_mabn() else None,
        chi2_sma=chi2.get("sma"), chi2_step=chi2.get("step"), finished=finished)


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def paper_setting_table(records: Sequence[Dict]) -> str:
    """One row per arm: final box / mask AP (mean ± std over seeds), per seed, the earlier evaluations, loss, chi2 lag."""
    if not records:
        raise ValueError("no paper-setting run records to report")
    rows = []
    with_control = any(r.get("chi2_step") for r in records)
    for arm in dict.fromkeys(r["variant"] for r in records):
        runs = sorted((r for r in records if r["variant"] == arm), key=lambda r: r["seed"])
        finals = [r["curve"][max(r["curve"])] for r in runs]
        earlier = "; ".join((f"seed {r['seed']} " if len(runs) > 1 else "")
                            + f"{step}: {r['curve'][step]['bbox/AP']:.1f} / {r['curve'][step]['segm/AP']:.1f}"
                            for r in runs for step in sorted(r["curve"], key=int)[:-1])
        losses = [r["loss_windows"]["total_loss"][-1] for r in runs
                  if r["loss_windows"] and r["loss_windows"]["total_loss"][-1] is not None]
        edges = runs[0]["loss_windows"]["edges"] if runs[0]["loss_windows"] else None
        lag = runs[0].get("chi2_sma") or runs[0].get("chi2_lag") or {}
        lag_cell = _chi2_cell(lag)
        control_cell = _chi2_cell(runs[0].get("chi2_step") or {})
        rows.append([
            arm, ", ".join(str(r["seed"]) for r in runs),
            f"{_mean_std([m['bbox/AP'] for m in finals])} / {_mean_std([m['segm/AP'] for m in finals])}",
            "; ".join(f"{m['bbox/AP']:.1f} / {m['segm/AP']:.1f}" for m in finals),
            earlier or "–",
            (f"{statistics.mean(losses):.3f} (steps {edges[-2]}-{edges[-1]})" if losses else "–"),
            lag_cell + (f" [seed {runs[0]['seed']}]" if lag and len(runs) > 1 else ""),
        ] + ([control_cell] if with_control else []))
    final = "final" if all(r.get("finished", True) for r in records) else "last evaluated"
    header = ["arm", "seeds", f"{final} box / mask AP", "per seed", "earlier evaluations, step: box / mask AP",
              "mean training loss", "chi2 scatter (bias) against the SMA, all MABN layers"]
    if with_control:
        header.append("control: against the step's pooled statistic, all norm layers")
    return markdown_table(header, rows)


def _chi2_cell(windows: Dict) -> str:
    """'window: median |log ratio| (median log ratio)' for the "all layers" entry of every window."""
    return "; ".join(f"{w}: {windows[w]['all layers'][0]:.2f} ({windows[w]['all layers'][1]:+.2f})"
                     for w in sorted(windows, key=lambda w: int(w.split("-")[0]))) or "–"


def chi2_layer_table(records: Sequence[Dict]) -> str:
    """Seed 0's chi2 windows per tracked layer: against MABN's SMA and, beside it, against the step's
    pooled statistic (the control, nothing stale in it), for every arm that recorded them."""
    rows = []
    for record in records:
        if record["seed"] != min(r["seed"] for r in records if r["variant"] == record["variant"]):
            continue
        sma, step = record.get("chi2_sma") or {}, record.get("chi2_step") or {}
        for window in sorted(set(sma) | set(step), key=lambda w: int(w.split("-")[0])):
            layers = list(dict.fromkeys([*sma.get(window, {}), *step.get(window, {})]))
            for layer in layers:
                cells = [sma.get(window, {}).get(layer), step.get(window, {}).get(layer)]
                rows.append([record["variant"], window, layer,
                             *[f"{c[0]:.2f} ({c[1]:+.2f})" if c else "–" for c in cells]])
    if not rows:
        return ""
    return markdown_table(["arm", "steps", "layer", "abs log(chi2_B / SMA) (signed)",
                           "abs log(chi2_B / chi2_step) (signed), control"], rows)
