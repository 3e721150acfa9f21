"""bench/quality.py's summary over seeds, its markdown table and its plot (kNN top-1 vs time and images)."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from bench.common import markdown_table

ORDER = ("w2ssl", "mocov3", "supervised", "random")  # the default rows
LABELS = {"w2ssl": "W2SSL", "mocov3": "MoCo v3", "w2ssl-nowhere": "W2SSL without where (--loss_loc 0)",
          "supervised": "supervised (ceiling)", "random": "random init (floor)"}
SIGNIFICANCE = 0.05  # two-sided, Welch's t-test over seeds


def label(kind: str) -> str:
    return LABELS.get(kind, kind)


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value); ``(None, None)`` if any value is missing."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], per_epoch: int, gflops: dict[str, dict[str, float]],
              kinds: Sequence[str] = ORDER) -> dict[str, dict]:
    """Per kind (method, supervised, random): seeds, images seen, trunk GFLOPs, wall-clock (mean over
    seeds), kNN and probe top-1 mean ± std at the end, and the kNN curve at the evaluated epochs.

    ``runs``: bench/quality.py's per-run records (``kind, seed, epochs, wall_s [per epoch], knn {epoch:
    top-1}, probe``, optionally ``where_acc``); ``per_epoch`` source images per epoch; ``gflops[kind]["trunk"]``
    per image; ``kinds`` the rows, in order. Also the per-seed end values and the mean where-accuracy.
    """
    out = {}
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        if not mine:
            continue
        epochs = mine[0]["epochs"]
        per_image = gflops.get(kind, {}).get("trunk", 0.0)
        last = max(mine[0]["knn"])
        curve = []
        for e in sorted(mine[0]["knn"]):
            seen = (e + 1) * per_epoch if epochs else 0
            knn_mean, knn_std = _mean_std([r["knn"][e] for r in mine])
            curve.append({"epoch": e, "images": seen, "gflops": seen * per_image,
                          "wall_s": statistics.fmean(r["wall_s"][e] for r in mine) if epochs else 0.0,
                          "knn_mean": knn_mean, "knn_std": knn_std})
        knn_mean, knn_std = _mean_std([r["knn"][last] for r in mine])
        probe_mean, probe_std = _mean_std([r["probe"] for r in mine])
        out[kind] = {"seeds": len(mine), "epochs": epochs, "images": epochs * per_epoch,
                     "gflops": epochs * per_epoch * per_image, "wall_s": curve[-1]["wall_s"],
                     "knn_mean": knn_mean, "knn_std": knn_std, "probe_mean": probe_mean, "probe_std": probe_std,
                     "knn_seeds": [r["knn"][last] for r in mine], "probe_seeds": [r["probe"] for r in mine],
                     "where_acc": _mean_std([r.get("where_acc") for r in mine])[0], "curve": curve}
    return out


def _pm(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.1f} ± {std:.1f}"


def _seeds(values: Sequence[float | None]) -> str:
    return ", ".join("-" if v is None else f"{v:.1f}" for v in values)


def table(summary: dict[str, dict]) -> str:
    header = ("method", "seeds", "epochs", "images seen", "trunk GFLOPs", "wall-clock s", "kNN top-1 %",
              "cached probe top-1 %", "kNN per seed", "where-acc %")
    rows = [(label(k), s["seeds"], s["epochs"], s["images"], round(s["gflops"]), round(s["wall_s"]),
             _pm(s["knn_mean"], s["knn_std"]), _pm(s["probe_mean"], s["probe_std"]), _seeds(s["knn_seeds"]),
             "-" if s.get("where_acc") is None else f"{s['where_acc']:.1f}") for k, s in summary.items()]
    return markdown_table(header, rows)


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """``(mean(a) − mean(b), p)`` with ``p`` the two-sided p-value of Welch's t-test (None under 2 seeds or
    no spread at all)."""
    from scipy import stats

    delta = statistics.fmean(a) - statistics.fmean(b)
    if min(len(a), len(b)) < 2 or statistics.stdev(a) + statistics.stdev(b) == 0:
        return delta, None
    return delta, float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def verdicts(summary: dict[str, dict], kinds: Sequence[str]) -> str:
    """One line per pair of methods (and each method against the random floor): the kNN difference and
    whether it is larger than the seed spread (Welch's t-test at the 5 % level)."""
    rows = [k for k in kinds if k in summary] + (["random"] if "random" in summary else [])
    lines = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if summary[a]["knn_mean"] is None or summary[b]["knn_mean"] is None:
                continue
            delta, p = difference(summary[a]["knn_seeds"], summary[b]["knn_seeds"])
            verdict = ("too few seeds to tell" if p is None else
                       f"larger than the seed spread (p = {p:.3f})" if p < SIGNIFICANCE else
                       f"within the seed spread (p = {p:.2f})")
            lines.append(f"kNN {label(a)} − {label(b)}: {delta:+.1f} points, {verdict}")
    return "\n".join(lines)


def plot(summary: dict[str, dict], path: Path) -> None:
    """Three panels, kNN top-1 against wall-clock, images seen and trunk GFLOPs: a line per method (from the
    random-init floor at 0) with the seed spread (± 1 std) shaded; the floor as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    floor = summary.get("random")
    panels = (("wall_s", "wall-clock per run (s)"), ("images", "source images seen"), ("gflops", "trunk GFLOPs"))
    for ax, (x, axis_label) in zip(axes, panels):
        for kind in summary:
            if kind == "random":
                continue
            curve = ([{x: 0, "knn_mean": floor["knn_mean"], "knn_std": floor["knn_std"]}] if floor else []) \
                + summary[kind]["curve"]
            xs = [p[x] for p in curve]
            mean = [p["knn_mean"] for p in curve]
            std = [p["knn_std"] for p in curve]
            style = "--" if kind == "supervised" else "-"
            (line,) = ax.plot(xs, mean, style, marker="o", ms=3, label=label(kind))
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
        if floor:
            ax.axhline(floor["knn_mean"], color="grey", ls=":", label=label("random"))
        ax.set_xlabel(axis_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("kNN top-1 (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
