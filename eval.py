"""
Evaluate a shell-game checkpoint: accuracy on the held-out games of each difficulty (number of swaps)
at several depths, and under adaptive exit with the mean iterations it used.

    python eval.py --out_dir=out-demo
    python eval.py --out_dir=out-demo --baseline=out-demo-fixed     # the fixed-depth model beside it
    python eval.py --out_dir=out-demo --test_seed=4242              # freshly drawn games instead
    python eval.py --out_dir=out-demo --max_test_swaps=128 --num_steps=1,4,16,64,128   # a quicker look

A game's answer is the cup under which the ball ends: the model's prediction at the last swap
(exact match). Every depth is read from one pass of the recurrence (the logit lens, model.trace), which
gives what generate() gives at that depth (a test checks it); of each iteration it keeps only whether each
answer is right and how far the game's positions moved. Writes out_dir/eval.json and, with matplotlib
installed, out_dir/eval.png.
"""

import itertools
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from common import WriteError, atomic_write, check_settings, configure, die, int_list, load_model, setup_device
from model import check_sampling
from prepare_data import FIRST_CUP, FIRST_SWAP, PAD, START, SWAPS, play

# ---- settings: defaults, overridden by config files and --key=value ----
out_dir = "out-demo"
baseline = ""                # out_dir of a fixed-depth model to compare with (at its mean_recurrence)
num_steps = "1,2,4,8,16,32,64,128,256,512"  # the depths shown (the model's mean_recurrence is added)
exit_threshold = 3e-6        # adaptive exit: KL between successive iterations, the largest over the game's positions
exit_max_steps = 0           # adaptive exit stops by this iteration at the latest; 0: the deepest of num_steps
max_test_swaps = 0           # only the test sets of at most this many swaps (0: all of them)
batch_size = 500
test_seed = 0                # 0: the data set's test files; else as many fresh games per length, drawn with it
data_dir = "data"
device = "auto"              # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", "mps"
seed = 1337
config, _ = configure(globals())


def load(path):
    try:
        model, checkpoint = load_model(path, device)
    except ValueError as e:
        die(str(e), code=1)
    # a zero initial state, as the paper's evaluations use: no noise, so a game's answer does not depend
    # on which batch it is in (random states would draw differently for batch 500 and batch 1)
    model.config.state_init = "zero"
    if checkpoint["meta"].get("name") != "shellgame":
        die(f"{path} was not trained on the shell game (data set {checkpoint['meta'].get('name')!r})", code=1)
    return model, checkpoint["meta"]


def trained_games(meta):
    """The rows of the train and val splits, as bytes: the games a model saw in training."""
    rows = [np.fromfile(os.path.join(data_dir, meta["name"], f"{split}.bin"), dtype=np.uint16).reshape(-1, meta["row_len"])
            for split in ("train", "val")]
    return {row.tobytes() for split in rows for row in split}


def fresh_games(rng, n, count, trained, row_len):
    """Up to count distinct games of n swaps that training never showed, as prepare_data's test sets are.
    Short games have few variants (100 of 2 swaps, most of them trained on): those are listed whole and drawn from."""
    def unseen(moves):
        tokens = [START] + [FIRST_SWAP + m for m in moves]
        return n + 1 > row_len or np.array(tokens + [PAD] * (row_len - n - 1), np.uint16).tobytes() not in trained
    if len(SWAPS) ** n <= 100_000:
        pool = [moves for moves in itertools.product(range(len(SWAPS)), repeat=n) if unseen(moves)]
        picks = [pool[i] for i in rng.permutation(len(pool))[:count]]
    else:
        picks = {}
        while len(picks) < count:
            moves = tuple(int(m) for m in rng.integers(0, len(SWAPS), size=n))
            if unseen(moves):
                picks.setdefault(moves)
        picks = list(picks)
    prompts = torch.tensor([[START] + [FIRST_SWAP + m for m in moves] for moves in picks])
    return prompts, torch.tensor([FIRST_CUP + play(moves)[-1] - 1 for moves in picks])


def test_sets(meta):
    """{difficulty: (prompts (N, n + 1), answers (N,))}: the data set's test files of at most max_test_swaps, or as
    many games drawn with test_seed."""
    swaps = [n for n in meta["test_swaps"] if not max_test_swaps or n <= max_test_swaps]
    if test_seed:
        rng, trained = np.random.default_rng(test_seed), trained_games(meta)
        return {n: fresh_games(rng, n, meta["rows"][f"test_{n}"], trained, meta["row_len"]) for n in swaps}
    sets = {}
    for n in swaps:
        paths = [os.path.join(data_dir, meta["name"], f"test_{n}{s}.bin") for s in ("", "_targets")]
        if not all(os.path.isfile(p) for p in paths):
            die(f"{paths[0]} is missing: run python prepare_data.py", code=1)
        x = np.fromfile(paths[0], dtype=np.uint16).astype(np.int64).reshape(-1, n + 1)
        y = np.fromfile(paths[1], dtype=np.int16).astype(np.int64).reshape(-1, n + 1)
        sets[n] = (torch.from_numpy(x), torch.from_numpy(y[:, -1]))
    return sets


def read_games(model, prompts, answers, num_steps):
    """One pass of the logit lens over a batch of games, kept lean: whether each answer (the prediction at the
    last swap) is right after every iteration, (num_steps, B), and where adaptive exit stops each game as
    generate() decides it for a prompt: at the first iteration i >= 2 where the KL between iterations i - 1
    and i is below exit_threshold at every position, else at exit_max_steps. (B,) iterations."""
    right, steps, logp_prev = [], torch.full((len(prompts),), exit_max_steps), None
    for i, (logits, _) in enumerate(model.trace(prompts.to(device), num_steps), 1):
        logp = torch.log_softmax(logits.float(), dim=-1)
        right.append(logp[:, -1].argmax(-1).cpu() == answers)
        if logp_prev is not None and i <= exit_max_steps:
            settled = (logp_prev.exp() * (logp_prev - logp)).sum(-1).amax(-1).cpu() < exit_threshold
            steps = torch.where(settled & (steps == exit_max_steps), i, steps)
        logp_prev = logp
    return torch.stack(right), steps


def evaluate(model, sets, depths, progress):
    """Accuracy per difficulty after every iteration and under adaptive exit. The games of one length run
    together (no padding) and the recurrence runs once, to the deepest setting."""
    results, start = {}, time.time()
    for n, (prompts, answers) in sets.items():
        right, exit_right, exit_steps = [], [], []
        for i in range(0, len(prompts), batch_size):
            ans = answers[i:i + batch_size]
            hits, steps = read_games(model, prompts[i:i + batch_size], ans, max(max(depths), exit_max_steps))
            right.append(hits)
            exit_right.append(hits[steps - 1, torch.arange(len(ans))])
            exit_steps.append(steps.float())
            progress.update()
        by_step = torch.cat(right, 1).float().mean(1)[:max(depths)]  # accuracy after each iteration
        best = by_step.max().item()
        results[n] = dict(accuracy=[by_step[r - 1].item() for r in depths], best_accuracy=best,
                          best_num_steps=int(by_step.argmax()) + 1,
                          needed_num_steps=int((by_step >= best - 0.01).int().argmax()) + 1,
                          exit_accuracy=torch.cat(exit_right).float().mean().item(),
                          exit_mean_steps=torch.cat(exit_steps).mean().item())
        r = results[n]  # a line per test set: long evaluations show their progress in a log file too
        progress.write(f"n={n}: best {r['best_accuracy']:.3f} at r={r['best_num_steps']}, adaptive exit "
                       f"{r['exit_accuracy']:.3f} in {r['exit_mean_steps']:.1f} steps ({time.time() - start:.0f} s)")
    return results


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
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for k, row in enumerate(rows):  # one color scale from the shortest games to the longest
        line, = ax.plot(depths, row["accuracy"], marker="o", color=plt.cm.viridis(k / max(1, len(rows) - 1)),
                        linestyle="-" if row["in_training_range"] else "--",
                        label=f"n={row['difficulty']}" + ("" if row["in_training_range"] else " (untrained length)"))
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
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"wrote {path}")


depths = int_list("num_steps", num_steps)
check_settings(config, [("batch_size", batch_size >= 1, ">= 1"),
                        ("max_test_swaps", max_test_swaps >= 0, ">= 0 (0: every test set)"),
                        ("exit_max_steps", exit_max_steps == 0 or exit_max_steps >= 2,
                         ">= 2 (exit compares two iterations), or 0 for the deepest of num_steps")])
try:
    for r in depths:
        check_sampling(r, exit_threshold=exit_threshold)
except ValueError as e:
    die(str(e))
device, _ = setup_device(device)
print(f"eval: {json.dumps(config)}")
torch.manual_seed(seed)
model, meta = load(out_dir)
base = load(baseline)[0] if baseline else None
depths = sorted(set(depths) | {model.config.mean_recurrence})
exit_max_steps = exit_max_steps or max(depths)
sets = test_sets(meta)
if not sets:
    die(f"no test set of at most {max_test_swaps} swaps (the data has {meta['test_swaps']}): raise --max_test_swaps")
n_batches = (2 if base else 1) * sum(-(-len(p) // batch_size) for p, _ in sets.values())
t0 = time.time()
with tqdm(total=n_batches, unit="batch", disable=None) as progress:
    results = evaluate(model, sets, depths, progress)
    low, high = meta["train_swaps"]
    rows = [dict(difficulty=n, in_training_range=low <= n <= high, n=len(sets[n][1]), **results[n]) for n in sets]
    if base:
        r = base.config.mean_recurrence
        for row, (prompts, answers) in zip(rows, sets.values()):
            hits = torch.cat([read_games(base, prompts[i:i + batch_size], answers[i:i + batch_size], r)[0][-1]
                              for i in range(0, len(prompts), batch_size)])
            progress.update(-(-len(prompts) // batch_size))
            row.update(baseline_accuracy=hits.float().mean().item(), baseline_num_steps=r)
elapsed = time.time() - t0
header = f"{'n':>4} {'count':>6} " + " ".join(f"{'r=' + str(r):>6}" for r in depths)
header += f" | {'best':>5} {'at r':>4} {'needs':>5} | {'exit acc':>8} {'steps':>6}" + (" | baseline" if base else "")
print(header)
for row in rows:
    line = f"{row['difficulty']:>4} {row['n']:>6} " + " ".join(f"{a:>6.3f}" for a in row["accuracy"])
    line += f" | {row['best_accuracy']:>5.3f} {row['best_num_steps']:>4} {row['needed_num_steps']:>5}"
    line += f" | {row['exit_accuracy']:>8.3f} {row['exit_mean_steps']:>6.2f}"
    line += f" | {row['baseline_accuracy']:>8.3f}" if base else ""
    print(line + ("" if row["in_training_range"] else "   (longer than trained)"))
print(f"best: the best accuracy after any iteration up to {max(depths)}, at r; needs: the first iteration within .01 "
      f"of it. Adaptive exit: KL threshold {exit_threshold} at every position, at most {exit_max_steps} steps")
print(chart(depths, rows))
print(f"evaluated {sum(r['n'] for r in rows):,} games at {len(depths) + 1} settings in {elapsed:.1f} s "
      f"(one pass to the deepest setting per batch)")
result = dict(num_steps=depths, exit_threshold=exit_threshold, exit_max_steps=exit_max_steps, test_seed=test_seed,
              seconds=elapsed, rows=rows)
try:
    atomic_write(os.path.join(out_dir, "eval.json"), json.dumps(result, indent=1).encode())
    print(f"wrote {os.path.join(out_dir, 'eval.json')}")
    plot(os.path.join(out_dir, "eval.png"), depths, rows)
except WriteError as e:
    die(str(e), code=1)
