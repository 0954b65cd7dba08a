"""Contracts of train.py: the loss falls, depths are evaluated, a resumed run equals an uninterrupted one,
and DDP ranks (one machine or two "nodes") draw the same depths and end with the same weights."""

import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_TRAIN, run_script, train_tiny as train


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_loss_falls_and_eval_reports_every_depth(shellgame_dir):
    run = train(shellgame_dir, "--max_iters=60", "--eval_interval=30", "--out_dir=out", "--mean_recurrence=6")
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in run.stdout.splitlines() if line.startswith("iter ")]
    assert losses[-1] < math.log(17) - 1.0, losses
    evals = [line for line in run.stdout.splitlines() if line.startswith("eval iter")]
    assert [e.split(":")[0] for e in evals] == ["eval iter 0", "eval iter 30", "eval iter 60"]  # before training too
    assert all(f"r={r}:" in evals[-1] for r in (1, 4, 6, 12))  # 1, 4, mean, 2 mean
    assert "depth" in run.stdout and "tok/s" in run.stdout


def test_defaults_train_without_a_config_file_or_device(shellgame_dir):
    """`python train.py --dataset=shellgame --max_iters=2`: the documented defaults (device "auto") train
    on a machine without a GPU."""
    run = run_script("train.py", "--dataset=shellgame", "--max_iters=2", "--eval_iters=1", cwd=shellgame_dir)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "device cpu" in run.stdout and "iter 2:" in run.stdout and (shellgame_dir / "out/ckpt.pt").exists()


def test_resume_repeats_the_uninterrupted_run_exactly(shellgame_dir):
    """N steps in one go, or N/2, then --init_from=resume for the rest: the same weights, bit for bit."""
    cfg = ["--eval_interval=10"]
    train(shellgame_dir, *cfg, "--max_iters=20", "--out_dir=straight")
    train(shellgame_dir, *cfg, "--max_iters=10", "--out_dir=halves")
    run = train(shellgame_dir, *cfg, "--max_iters=20", "--out_dir=halves", "--init_from=resume")
    a, b = weights(shellgame_dir / "straight/ckpt.pt"), weights(shellgame_dir / "halves/ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "iter 15:" in run.stdout and "iter 5:" not in run.stdout  # it continued, not restarted


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cwd, launcher_args, out_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, str(ROOT / "train.py"),
           *map(str, TINY_TRAIN), "--max_iters=8", "--eval_interval=4", f"--out_dir={out_dir}",
           "--gradient_accumulation_steps=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ddp_ranks_agree_on_one_node_and_on_two(shellgame_dir):
    """torchrun on CPU (gloo): both ranks draw the same depths and end with identical weights; two
    launchers as two nodes on one machine give the same weights as the standalone run."""
    standalone = torchrun(shellgame_dir, ["--standalone", "--nproc_per_node=2"], "ddp1")
    out, err = standalone.communicate(timeout=240)
    assert standalone.returncode == 0, err[-2000:]
    assert "ddp: 2 ranks agree on 8 depths and the weights" in out
    port = free_port()
    nodes = [torchrun(shellgame_dir, ["--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
                                      "--master_addr=127.0.0.1", f"--master_port={port}"], "ddp2") for r in (0, 1)]
    results = [p.communicate(timeout=240) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), results[0][1][-2000:] + results[1][1][-2000:]
    assert "ddp: 2 ranks agree on 8 depths and the weights" in results[0][0]
    a, b = weights(shellgame_dir / "ddp1/ckpt.pt"), weights(shellgame_dir / "ddp2/ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_config_file_holds_only_known_settings(tmp_path, monkeypatch, capsys):
    """Each config/*.py is read by its script's settings (an unknown key would stop it with exit 2):
    config/bench_*.py by bench.py, the others by train.py."""
    import runpy
    configs = sorted((ROOT / "config").glob("*.py"))
    assert len(configs) >= 5
    monkeypatch.chdir(tmp_path)
    for path in configs:
        script = "bench.py" if path.name.startswith("bench_") else "train.py"
        monkeypatch.setattr(sys, "argv", [script, str(path), "--help"])
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            assert e.code == 0, (path.name, capsys.readouterr().err)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings")
def test_keep_freed_memory_stops_page_faults_between_steps():
    """Training steps with 64 MB of logits (batch 8 x 256, vocab 8192): by default glibc returns freed
    blocks to the system and every step faults its pages in again; with keep_freed_memory (train.py on
    CPU) steps reuse the memory, bar an occasional block."""
    probe = ("import resource, sys, torch; from common import keep_freed_memory\n"
             "from model import ModelConfig, RecurrentGPT\n"
             "if sys.argv[1] == 'keep': assert keep_freed_memory()\n"
             "model = RecurrentGPT(ModelConfig(vocab_size=8192, block_size=256, n_embd=32, n_head=2,\n"
             "                                 intermediate_size=64, mean_recurrence=2, backprop_depth=2))\n"
             "idx = torch.randint(8192, (8, 256))\n"
             "for step in range(8):\n"
             "    if step == 4: before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "    model(idx, idx, num_steps=2)[1].backward()\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    faults = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], cwd=ROOT, capture_output=True,
                                       text=True, check=True, env=env).stdout) for mode in ("default", "keep")}
    assert faults["keep"] * 4 < faults["default"], faults
