"""
Evaluate a shell-game checkpoint: accuracy on the held-out games of each difficulty (number of swaps)
at several depths, and under adaptive exit with the mean iterations it used.

    python eval.py --out_dir=out-demo
    python eval.py --out_dir=out-demo --baseline=out-demo-fixed     # the fixed-depth model beside it
    python eval.py --out_dir=out-demo --test_seed=4242              # freshly drawn games instead

A game's answer is the cup under which the ball ends: the model's prediction at the last swap
(exact match). The prompts of all difficulties are decoded together, in batches of mixed lengths
(generate() left-pads them). Writes out_dir/eval.json and, with matplotlib installed, out_dir/eval.png.
"""

import json
import os
import sys
import time

import numpy as np
import torch

from configurator import configure, die, int_list
from model import RecurrentGPT, read_checkpoint
from prepare_data import shell_game, write

# exit_threshold 1e-4, not the release's 1e-3: on the default model both stay within 0.002 of num_steps=32
# (1e-4 at up to one more iteration per game), but a model that settles slowly exits too early at 1e-3 (one
# trained with mean_recurrence=6 lost ~0.05 at n=16)
defaults = dict(out_dir="out-demo", baseline="", num_steps="1,2,4,8,16,32", exit_threshold=1e-4,
                exit_max_steps=32, batch_size=500, test_seed=0, test_examples=1000, data_dir="data",
                device="cpu", seed=1337)


def load(out_dir, device):
    try:
        checkpoint = read_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        model = RecurrentGPT.from_checkpoint(checkpoint, device)
    except ValueError as e:
        die(str(e), code=1)
    # a zero initial state, as the paper's evaluations use: no noise, so a game's answer does not depend
    # on which batch it is in (random states would draw differently for batch 500 and batch 1)
    model.config.state_init = "zero"
    if checkpoint["meta"].get("name") != "shellgame":
        die(f"{out_dir} was not trained on the shell game (data set {checkpoint['meta'].get('name')!r})", code=1)
    return model, checkpoint["meta"]


def test_sets(meta, cfg):
    """{difficulty: (prompts, answers)}: the data set's test files, or games drawn with test_seed."""
    if cfg["test_seed"]:
        rng = np.random.default_rng(cfg["test_seed"])
        games = {n: [shell_game(rng, n) for _ in range(cfg["test_examples"])] for n in meta["test_swaps"]}
        return {n: ([torch.tensor(x) for x, _ in g], torch.tensor([y[-1] for _, y in g])) for n, g in games.items()}
    sets = {}
    for n in meta["test_swaps"]:
        paths = [os.path.join(cfg["data_dir"], meta["name"], f"test_{n}{s}.bin") for s in ("", "_targets")]
        if not all(os.path.isfile(p) for p in paths):
            die(f"{paths[0]} is missing: run python prepare_data.py", code=1)
        x = np.fromfile(paths[0], dtype=np.uint16).astype(np.int64).reshape(-1, n + 1)
        y = np.fromfile(paths[1], dtype=np.int16).astype(np.int64).reshape(-1, n + 1)
        sets[n] = (list(torch.from_numpy(x)), torch.from_numpy(y[:, -1]))
    return sets


def predict(model, prompts, num_steps, batch_size, exit_threshold=None):
    """Greedy answers (the token generated after each prompt) and the iterations each used."""
    preds, steps = [], []
    for i in range(0, len(prompts), batch_size):
        out, used = model.generate(prompts[i:i + batch_size], 1, num_steps=num_steps, top_k=1,
                                   exit_threshold=exit_threshold, return_steps=True)
        preds += [o[-1].item() for o in out]
        steps += used[:, 0].tolist()
    return torch.tensor(preds), torch.tensor(steps, dtype=torch.float)


def evaluate(model, sets, depths, cfg):
    """Accuracy per difficulty at each depth and under adaptive exit; all difficulties share batches."""
    lengths = {n: len(p) for n, (p, _) in sets.items()}
    prompts = [p for ps, _ in sets.values() for p in ps]
    answers = torch.cat([a for _, a in sets.values()])
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))  # mix the lengths
    prompts = [prompts[i] for i in order]

    def per_difficulty(values):
        restored = torch.empty_like(values)
        restored[order] = values
        return dict(zip(lengths, restored.split(list(lengths.values()))))

    correct = {}
    for r in depths:
        preds, _ = predict(model, prompts, r, cfg["batch_size"])
        correct[r] = per_difficulty((preds == answers[order]).float())
    preds, steps = predict(model, prompts, cfg["exit_max_steps"], cfg["batch_size"], cfg["exit_threshold"])
    exit_correct, exit_steps = per_difficulty((preds == answers[order]).float()), per_difficulty(steps)
    return {n: dict(accuracy=[correct[r][n].mean().item() for r in depths],
                    exit_accuracy=exit_correct[n].mean().item(), exit_mean_steps=exit_steps[n].mean().item())
            for n in sets}


def chart(depths, rows):
    """Accuracy against depth as one line of bars per difficulty: no plotting package needed."""
    bars = " ▁▂▃▄▅▆▇█"
    lines = [f"accuracy vs num_steps ({', '.join(map(str, depths))}), one bar per depth, full = 1.0"]
    for row in rows:
        spark = "".join(bars[round(a * (len(bars) - 1))] for a in row["accuracy"])
        lines.append(f"  n={row['difficulty']:<3} |{spark}|  {row['accuracy'][0]:.2f} -> {row['accuracy'][-1]:.2f}"
                     + ("" if row["in_training_range"] else "  (longer than trained)"))
    return "\n".join(lines)


def plot(path, depths, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib for eval.png")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        line, = ax.plot(depths, row["accuracy"], marker="o", label=f"n={row['difficulty']}"
                        + ("" if row["in_training_range"] else " (untrained length)"))
        if "baseline_accuracy" in row:
            ax.plot([row["baseline_num_steps"]], [row["baseline_accuracy"]], marker="x", markersize=10,
                    color=line.get_color(), linestyle="none")
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("num_steps (iterations of the core block at test time)")
    ax.set_ylabel("accuracy (ball's final cup)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Shell game: same weights, more iterations" + (" (x: fixed-depth baseline)" if
                                                                "baseline_accuracy" in rows[0] else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv):
    cfg = configure(defaults, argv, usage=__doc__)
    depths = int_list("num_steps", cfg["num_steps"])
    for key, value in [("exit_max_steps", cfg["exit_max_steps"]),
                       ("batch_size", cfg["batch_size"]), ("test_examples", cfg["test_examples"])]:
        if value < 1:
            die(f"{key} must be >= 1 (got {value})")
    if cfg["exit_threshold"] < 0:
        die(f"exit_threshold must be >= 0 (got {cfg['exit_threshold']})")
    print(f"eval: {json.dumps(cfg)}")
    torch.manual_seed(cfg["seed"])
    model, meta = load(cfg["out_dir"], cfg["device"])
    depths = sorted(set(depths) | {model.config.mean_recurrence})
    sets = test_sets(meta, cfg)
    t0 = time.time()
    results = evaluate(model, sets, depths, cfg)
    elapsed = time.time() - t0
    low, high = meta["train_swaps"]
    rows = [dict(difficulty=n, in_training_range=low <= n <= high, n=len(sets[n][1]), **results[n]) for n in sets]
    if cfg["baseline"]:
        base, _ = load(cfg["baseline"], cfg["device"])
        r = base.config.mean_recurrence
        for row, (n, (prompts, answers)) in zip(rows, sets.items()):
            preds, _ = predict(base, prompts, r, cfg["batch_size"])
            row.update(baseline_accuracy=(preds == answers).float().mean().item(), baseline_num_steps=r)
    header = f"{'n':>4} {'count':>6} " + " ".join(f"{'r=' + str(r):>6}" for r in depths)
    header += f" | {'exit acc':>8} {'steps':>6}" + (" | baseline" if cfg["baseline"] else "")
    print(header)
    for row in rows:
        line = f"{row['difficulty']:>4} {row['n']:>6} " + " ".join(f"{a:>6.3f}" for a in row["accuracy"])
        line += f" | {row['exit_accuracy']:>8.3f} {row['exit_mean_steps']:>6.2f}"
        line += f" | {row['baseline_accuracy']:>8.3f}" if cfg["baseline"] else ""
        print(line + ("" if row["in_training_range"] else "   (longer than trained)"))
    print(f"adaptive exit: KL threshold {cfg['exit_threshold']}, at most {cfg['exit_max_steps']} steps")
    print(chart(depths, rows))
    print(f"evaluated {sum(r['n'] for r in rows):,} games at {len(depths) + 1} settings in {elapsed:.1f} s "
          f"(batches of {cfg['batch_size']} mixed lengths)")
    result = dict(num_steps=depths, exit_threshold=cfg["exit_threshold"], exit_max_steps=cfg["exit_max_steps"],
                  test_seed=cfg["test_seed"], seconds=elapsed, rows=rows)
    write(os.path.join(cfg["out_dir"], "eval.json"), json.dumps(result, indent=1).encode())
    print(f"wrote {os.path.join(cfg['out_dir'], 'eval.json')}")
    plot(os.path.join(cfg["out_dir"], "eval.png"), depths, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
