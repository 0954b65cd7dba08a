"""
Plot a training run from its out_dir/metrics.jsonl (train.py writes it): the training loss, and the val loss at
each evaluated depth over training, one line per depth: a model learning to use its depth.

    python plot_metrics.py out-demo                 # writes out-demo/metrics.png
    python plot_metrics.py out-demo docs/demo_metrics.png

Needs matplotlib (pip install matplotlib).
"""

import json
import os
import sys

from common import WriteError, atomic_write, die


def pyplot():
    """matplotlib.pyplot drawing into files (no display needed), or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def read_metrics(path):
    """The records of a metrics.jsonl: (log records, evaluation records), each a list of dicts in file order."""
    if not os.path.isfile(path):
        die(f"{path} not found: train.py writes it into its out_dir", code=1)
    logs, evals = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                die(f"{path}, line {n}: not JSON", code=1)
            (logs if "loss" in record else evals).append(record)
    return logs, evals


def main(argv):
    if len(argv) not in (1, 2) or argv[0].startswith("-"):
        die("usage: python plot_metrics.py OUT_DIR [PNG] (the PNG defaults to OUT_DIR/metrics.png)")
    plt = pyplot()
    if plt is None:
        die("plot_metrics.py needs matplotlib: pip install matplotlib", code=1)
    logs, evals = read_metrics(os.path.join(argv[0], "metrics.jsonl"))
    if not logs and not evals:
        die(f"{argv[0]}/metrics.jsonl holds no records yet", code=1)
    depths = sorted({int(k.removeprefix("val_loss_r")) for e in evals for k in e if k.startswith("val_loss_r")})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot([r["iter"] for r in logs], [r["loss"] for r in logs], lw=0.8, color="gray")
    left.set_title("training loss (at the depth drawn for each step)")
    for r in depths:
        points = [(e["iter"], e[f"val_loss_r{r}"]) for e in evals if f"val_loss_r{r}" in e]
        right.plot(*zip(*points), marker="o", label=f"num_steps={r}")
    right.set_title("val loss by depth")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = argv[1] if len(argv) == 2 else os.path.join(argv[0], "metrics.png")
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    except WriteError as e:
        die(str(e), code=1)
    print(f"wrote {path}: {len(logs)} log records, {len(evals)} evaluations at depths {depths}")


if __name__ == "__main__":
    main(sys.argv[1:])
