"""Contracts of train.py's metrics.jsonl: one record per log interval and per evaluation, none repeated after a
kill -9 and a resume, the same records in Weights & Biases (offline); plot_metrics.py draws them."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

from common import read_checkpoint
from conftest import ROOT, TINY_TRAIN, run_main, train_tiny

ARGS = ["--max_iters=12", "--eval_interval=4", "--log_interval=2", "--eval_depths=1,4"]


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_one_record_per_log_interval_and_evaluation(shellgame_dir, capsys):
    """Log records at iters 1 and every log_interval with loss, depth, grad norm, lr, tokens/s and MFU; evaluation
    records at 0 and every eval_interval with the val loss at each depth; plot_metrics.py draws them."""
    train_tiny(shellgame_dir, *ARGS, "--out_dir=out", "--peak_flops=1e12", "--mean_recurrence=16")
    logs, evals = [], []
    for r in records(shellgame_dir / "out/metrics.jsonl"):
        (logs if "loss" in r else evals).append(r)
    assert [r["iter"] for r in logs] == [1, 2, 4, 6, 8, 10, 12]
    assert [r["iter"] for r in evals] == [0, 4, 8, 12]
    for r in logs:
        assert {"loss", "depth", "n_grad", "grad_norm", "lr", "tokens_per_s", "flops_per_s", "mfu"} <= r.keys()
        assert r["depth"] >= r["n_grad"] >= 1 and r["grad_norm"] > 0 and 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0
    assert all(set(e) == {"iter", "train_loss_r16", "val_loss_r1", "val_loss_r4", "val_loss_r16"} for e in evals)
    assert evals[-1]["val_loss_r4"] < evals[0]["val_loss_r4"]
    if importlib.util.find_spec("matplotlib") is None:  # optional: the plot is drawn where it is installed (CI)
        assert run_main("plot_metrics.py", [shellgame_dir / "out"]) == 1
        assert "pip install matplotlib" in capsys.readouterr().err
        return
    assert run_main("plot_metrics.py", [shellgame_dir / "out"]) == 0
    assert (shellgame_dir / "out/metrics.png").stat().st_size > 10_000
    assert "7 log records, 4 evaluations at depths [1, 4, 16]" in capsys.readouterr().out


def test_kill_9_then_resume_repeats_no_iteration(shellgame_dir):
    """A run killed (SIGKILL) after its checkpoint at iter 4 has written records past it, and maybe half a line;
    resumed, metrics.jsonl holds each iteration once, with the uninterrupted run's losses."""
    train_tiny(shellgame_dir, *ARGS, "--out_dir=straight")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, TINY_TRAIN), *ARGS, "--out_dir=killed"],
                            cwd=shellgame_dir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:
        if line.startswith("iter 6:"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    path = shellgame_dir / "killed/metrics.jsonl"
    assert read_checkpoint(str(shellgame_dir / "killed/ckpt.pt"))["iter_num"] == 4
    with open(path, "a") as f:
        f.write('{"iter": 7, "lo')  # a line cut short by the kill
    train_tiny(shellgame_dir, *ARGS, "--out_dir=killed", "--init_from=resume")
    straight, resumed = records(shellgame_dir / "straight/metrics.jsonl"), records(path)
    key = lambda r: (r["iter"], "loss" in r)
    assert sorted(map(key, resumed)) == sorted(set(map(key, resumed))) == sorted(map(key, straight))
    same = lambda rs: [(r["iter"], r.get("loss"), r.get("depth"), r.get("val_loss_r4")) for r in rs]
    assert same(resumed) == same(straight)


def test_wandb_offline_writes_the_run(shellgame_dir):
    """wandb_log=True with WANDB_MODE=offline: the run is written under out_dir/wandb, named, holding every log
    record and the evaluations."""
    wandb = pytest.importorskip("wandb", reason="pip install wandb")
    assert wandb
    train_tiny(shellgame_dir, *ARGS, "--out_dir=out", "--wandb_log", "--wandb_run_name=tiny",
               env=dict(WANDB_MODE="offline", WANDB_SILENT="true"))
    runs = list((shellgame_dir / "out/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()  # protobuf records: the keys are stored as text
    assert data.count(b"grad_norm") >= 7 and b"val_loss_r4" in data and b"tiny" in data
