"""Section 7 of docs/results.md: MABN's health scalars in a demo run, and what the health hook costs.

Rendered from two committed files alone: results/health_demo/mabn_scalars.json (tools/health_demo.py:
the `mabn/` scalars of a short demo run and the hook's log.txt lines) and
results/health_overhead.json (tools/benchmark_train.py --health-overhead: interleaved step
timings with the hook on and off). Every number in the section is read from them.
"""
import re
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from mabn_d2.utils.atomic_io import atomic_write
from .benchmarking import markdown_table

__all__ = ["phase_changes", "logged_phase_changes", "plot_health_scalars", "health_demo_lines", "health_overhead_lines", "health_section"]

TRAINER_PERIOD = 20  # mabn_d2.engine.trainer.HEALTH_PERIOD, not imported: rendering needs no trainer

PHASE_NAMES = ("batch statistics", "moving averages", "moving averages with re-normalization")
# (scalars, axis label, smallest upper y limit: a flat zero line still shows the scale)
_PANELS: Tuple[Tuple[Tuple[str, ...], str, Optional[float]], ...] = (
    (("mabn/phase",), "phase (least advanced layer)", None),
    (("mabn/chi2_log_ratio_abs_median", "mabn/chi2_log_ratio_median"), "log(chi2_B / SMA), median", None),
    (("mabn/r_clipped_fraction",), "share of channels with r clipped", 0.05),
    (("mabn/nonfinite_skipped",), "non-finite batches skipped", 1.0),
)
_LOGGED_CHANGE = re.compile(r"from iteration (\d+) every MABN layer normalizes with (.+)$")


def phase_changes(series: Sequence[Sequence[float]]) -> List[Tuple[int, int]]:
    """[(iteration, phase)] where the written `mabn/phase` differs from the value written before it."""
    changes, previous = [], None
    for iteration, value in series:
        if previous is not None and value != previous:
            changes.append((int(iteration), int(value)))
        previous = value
    return changes


def logged_phase_changes(log: Sequence[str]) -> List[Tuple[int, int]]:
    """[(iteration, phase)] of the phase changes the hook's log lines name."""
    changes = []
    for line in log:
        found = _LOGGED_CHANGE.search(line)
        if found and found.group(2) in PHASE_NAMES:
            changes.append((int(found.group(1)), PHASE_NAMES.index(found.group(2))))
    return changes


def plot_health_scalars(record: Dict, path: str) -> str:
    """One PNG: a panel per group of `mabn/` scalars against iteration, phase changes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = record["scalars"]
    panels = [panel for panel in _PANELS if any(n in scalars for n in panel[0])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.1 * len(panels)), sharex=True)
    changes = logged_phase_changes(record.get("log", [])) or phase_changes(scalars.get("mabn/phase", []))
    for ax, (names, title, least_top) in zip(axes, panels):
        for name in names:
            if name in scalars:
                iterations, values = zip(*scalars[name])
                ax.plot(iterations, values, drawstyle="steps-post" if name == "mabn/phase" else "default",
                        label=name.split("/", 1)[1])
                if least_top is not None:
                    top = max(least_top, 1.1 * max(values))
                    ax.set_ylim(-0.03 * top, top)
        for iteration, phase in changes:
            ax.axvline(iteration, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
    axes[0].set_yticks(range(3))
    axes[-1].set_xlabel("iteration (detectron2's, from 0)")
    axes[0].set_title(f"mabn/ scalars of a demo run (hook period {record['period']}; dotted: logged phase changes)",
                      fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def _per_phase_rows(scalars: Dict[str, List[List[float]]]) -> List[List[str]]:
    """One row per phase: iterations written, medians of the ratio scalars, the largest clipped share."""
    phase_at = {int(it): int(v) for it, v in scalars.get("mabn/phase", [])}
    rows = []
    for phase, name in enumerate(PHASE_NAMES):
        iterations = sorted(it for it, p in phase_at.items() if p == phase)
        if not iterations:
            continue

        def values(key: str) -> List[float]:
            return [v for it, v in scalars.get(key, []) if phase_at.get(int(it)) == phase]

        def median(key: str) -> str:
            found = values(key)
            return f"{statistics.median(found):.3f}" if found else "–"

        clipped = values("mabn/r_clipped_fraction")
        rows.append([f"{phase} {name}", f"{iterations[0]}–{iterations[-1]}", median("mabn/chi2_log_ratio_abs_median"),
                     median("mabn/chi2_log_ratio_median"), f"{max(clipped):.3f}" if clipped else "–"])
    return rows


def health_demo_lines(record: Dict, figure: str) -> List[str]:
    """Section 7.1: the demo run's command, figure, per-phase table and the phase changes its log names."""
    scalars = record["scalars"]
    logged = [line for line in record["log"] if "every MABN layer normalizes" in line]
    named = [name for name in PHASE_NAMES[1:] if any(line.endswith(f"with {name}") for line in logged)]
    skipped = scalars.get("mabn/nonfinite_skipped", [[0, 0.0]])[-1][1]
    lines = [
        "### 7.1 The `mabn/` scalars of a short demo run", "",
        f"Command: `{record['command']}` (results/health_demo/mabn_scalars.json; torch {record['torch']}). "
        f"{record['max_iter']} iterations of {record['config']} with the warm-ups shortened to "
        f"{record['warmup_iters']} / {record['renorm_warmup_iters']} iterations (buffer {record['buffer_size']}) "
        f"and the hook writing every {record['period']} iterations; the scalars are the EventStorage history.", "",
        f"![mabn/ scalars of the demo run]({figure})", "",
        markdown_table(["phase", "iterations written", "median abs log ratio", "median log ratio",
                        "largest r clipped share"], _per_phase_rows(scalars)), "",
        "The hook's lines in the run's log.txt:", "",
        *(f"    {line}" for line in record["log"]), "",
    ]
    named_text = ("The log names both phase changes (to moving averages, then to re-normalization)."
                  if len(named) == 2 else f"The log names {len(named)} of the 2 phase changes.")
    skipped_text = (f"`mabn/nonfinite_skipped` ended at {skipped:.0f}"
                    + (": no batch of this run had a non-finite statistic." if skipped == 0 else "."))
    return lines + [f"{named_text} {skipped_text}", ""]


def health_overhead_lines(result: Dict) -> List[str]:
    """Section 7.2: hook-on vs hook-off step times per block pair, the median ratio, and the hook's own time."""
    rows = [[str(i + 1), f"{on:.2f}", f"{off:.2f}", f"{on / off:.3f}"]
            for i, (on, off) in enumerate(zip(result["block_seconds"]["on"], result["block_seconds"]["off"]))]
    load = result.get("load_average_1min") or {}
    loaded = (f" (1-minute load average {load['before']:.1f} before, {load['after']:.1f} after)" if load else "")
    period = result["period"]
    rate = ("as in a run" if period == TRAINER_PERIOD else
            f"every {period} steps, where a run with the trainer's period reads every {TRAINER_PERIOD}")
    spread = ("the range includes 1: no difference shows above the machine's noise"
              if result["ratio_min"] <= 1.0 <= result["ratio_max"] else "the range excludes 1")
    return [
        "### 7.2 What the health hook costs a training step", "",
        f"Command: `{result['command']}` (results/health_overhead.json; torch {result['torch']}), on "
        f"{result['config']}, {result['device']}. Measured on a loaded 2-core CPU: other jobs, two training runs "
        f"among them, ran throughout{loaded}, so step times are noisy; the arms share one model and alternate in blocks of "
        f"{period} steps (one hook read per hook-on block; {rate}), {result['blocks']} blocks per arm, {result['warmup_steps']} warm-up steps discarded, "
        "MABN layers past their warm-ups.", "",
        markdown_table(["block pair", "hook on s", "hook off s", "on / off"], rows), "",
        f"Step time ratio hook on / off: median {result['median_ratio']:.3f} over {len(rows)} block pairs "
        f"(range {result['ratio_min']:.3f}–{result['ratio_max']:.3f}; {spread}). Timed inside the "
        f"hook: {1e3 * result['hook_seconds_per_step']:.2f} ms per step, "
        f"{100 * result['hook_share_of_step']:.3f}% of the hook-on step time; a read of the "
        f"{result['mabn_layers']} MABN layers takes {1e3 * result['hook_read_seconds_median']:.1f} ms (median).", "",
    ]


def health_section(demo: Optional[Dict], overhead: Optional[Dict], figure: str) -> List[str]:
    """Section 7 from whichever of the two committed files exists."""
    lines = ["## 7. MABN's health scalars (`mabn/` in metrics.json) and their cost", ""]
    if demo is not None:
        lines += health_demo_lines(demo, figure)
    if overhead is not None:
        lines += health_overhead_lines(overhead)
    return lines
