"""Faults of the machine: a full disk while writing (checkpoints, data, eval results), a crash's leftover temp
files, a non-finite loss on one DDP rank, and running out of memory. Each gives one line, a non-zero exit,
and loses nothing that was there before."""

import builtins
import errno
import os
import subprocess
import sys

import pytest
import torch

import common
import model as model_module
from common import read_checkpoint
from conftest import ROOT, TINY_TRAIN, run_main


class FullDisk:
    """A file on a disk with room bytes left: the write that crosses the limit fails, as ENOSPC does."""

    def __init__(self, path, mode, room):
        self.f, self.room = builtins.open(path, mode), room

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self.room:
            self.f.write(bytes(memoryview(data).cast("B")[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every file common.atomic_write opens from now on has room for this many bytes."""
    def fill(room):
        def opener(path, mode="r", *args, **kwargs):
            return FullDisk(path, mode, room) if "w" in mode else builtins.open(path, mode, *args, **kwargs)
        monkeypatch.setattr(common, "open", opener, raising=False)
    return fill


def one_line(capsys, code, expected, *needles):
    err = capsys.readouterr().err.strip()
    assert code == expected and len(err.splitlines()) == 1 and err.startswith("error: "), (code, err)
    assert all(n in err for n in needles), err
    return err


def temp_files(path):
    return [p for p in path.rglob("*.tmp")]


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(shellgame_dir, capsys, full_disk):
    """The save at iter 4 meets a full disk: one line naming the checkpoint, the cause and the intact iter 2,
    exit 1, no temp file; the checkpoint of iter 2 still loads, and --init_from=resume continues from it."""
    args = [*TINY_TRAIN, "--out_dir=out", "--eval_interval=2", "--log_interval=1"]
    assert run_main("train.py", [*args, "--max_iters=2"], shellgame_dir) == 0
    full_disk(1000)
    code = run_main("train.py", [*args, "--max_iters=4", "--init_from=resume"], shellgame_dir)
    one_line(capsys, code, 1, "ckpt.pt", "No space left on device", "iter 2 is intact")
    assert not temp_files(shellgame_dir) and read_checkpoint(str(shellgame_dir / "out/ckpt.pt"))["iter_num"] == 2
    full_disk(10 ** 12)
    assert run_main("train.py", [*args, "--max_iters=4", "--init_from=resume"], shellgame_dir) == 0
    out = capsys.readouterr().out
    assert "iter 3:" in out and "iter 1:" not in out and read_checkpoint(str(shellgame_dir / "out/ckpt.pt"))["iter_num"] == 4


def test_full_disk_during_prepare_data_and_eval(tmp_path, capsys, full_disk):
    """prepare_data.py and eval.py on a full disk: one line naming the file, exit 1, no temp file, and what was
    there before (an old eval.json) untouched; the data set without its meta.json reads as incomplete."""
    full_disk(50_000)
    code = run_main("prepare_data.py", [f"--data_dir={tmp_path / 'data'}", "--train_examples=3000", "--val_examples=300",
                                        "--test_examples=100"])
    one_line(capsys, code, 1, "train.bin", "No space left on device", "prepare_data.py")
    assert not temp_files(tmp_path) and not (tmp_path / "data/shellgame/meta.json").exists()
    full_disk(10 ** 12)
    assert run_main("prepare_data.py", [f"--data_dir={tmp_path / 'data'}", "--train_examples=3000",
                                        "--val_examples=300", "--test_examples=100", "--test_swaps=2,8"]) == 0
    assert run_main("train.py", [*TINY_TRAIN, "--max_iters=2", "--out_dir=out"], tmp_path) == 0
    (tmp_path / "out/eval.json").write_text("the previous results")
    capsys.readouterr()
    full_disk(100)
    code = run_main("eval.py", ["--out_dir=out", "--num_steps=1,2", "--exit_max_steps=4"], tmp_path)
    one_line(capsys, code, 1, "eval.json", "No space left on device")
    assert not temp_files(tmp_path) and (tmp_path / "out/eval.json").read_text() == "the previous results"


def test_temp_files_left_by_a_kill_are_never_read_and_get_replaced(shellgame_dir, capsys):
    """A half-written ckpt.pt.tmp and train.bin.tmp (what a kill leaves) change nothing: resuming reads ckpt.pt,
    training reads train.bin, and the next save replaces the temp file."""
    args = [*TINY_TRAIN, "--out_dir=out", "--eval_interval=2"]
    assert run_main("train.py", [*args, "--max_iters=2"], shellgame_dir) == 0
    (shellgame_dir / "out/ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    (shellgame_dir / "data/shellgame/train.bin.tmp").write_bytes(b"half a data file")
    assert run_main("train.py", [*args, "--max_iters=4", "--init_from=resume"], shellgame_dir) == 0
    assert not (shellgame_dir / "out/ckpt.pt.tmp").exists()
    assert read_checkpoint(str(shellgame_dir / "out/ckpt.pt"))["iter_num"] == 4


def test_out_of_memory_in_a_step_names_it_and_what_lowers_memory(shellgame_dir, capsys, monkeypatch):
    forward, calls = model_module.RecurrentGPT.forward, []

    def running_out(self, idx, targets=None, num_steps=None):
        calls.append(self.training)
        if self.training and calls.count(True) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, idx, targets, num_steps)
    monkeypatch.setattr(model_module.RecurrentGPT, "forward", running_out)
    code = run_main("train.py", [*TINY_TRAIN, "--out_dir=out", "--max_iters=5"], shellgame_dir)
    one_line(capsys, code, 1, "out of memory at iter 3 (depth", "batch_size 16", "backprop_depth", "block_size",
             "--activation_checkpointing")


# rank 1's loss turned into NaN at its fifth training step, by a sitecustomize module that the ranks import at start
POISON = """
import os
if os.environ.get("RANK") == "1":
    import model
    forward, steps = model.RecurrentGPT.forward, []
    def poisoned(self, idx, targets=None, num_steps=None):
        logits, loss = forward(self, idx, targets, num_steps)
        if self.training:
            steps.append(1)
            if len(steps) == 5:
                loss = loss * float("nan")
        return logits, loss
    model.RecurrentGPT.forward = poisoned
"""


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_non_finite_loss_on_one_ddp_rank_is_decided_by_all(shellgame_dir, tmp_path, mode):
    """torchrun, two gloo processes, rank 1's loss NaN at its fifth step: with skip both ranks skip it and end with
    equal, finite weights; with stop both stop at that step, one line each."""
    (tmp_path / "poison").mkdir()
    (tmp_path / "poison/sitecustomize.py").write_text(POISON)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *map(str, TINY_TRAIN), "--max_iters=6", "--eval_interval=6", "--log_interval=1", "--out_dir=out",
           "--gradient_accumulation_steps=2",
           f"--nonfinite={mode}"]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'poison'}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=shellgame_dir, env=env, capture_output=True, text=True, timeout=300)
    if mode == "skip":
        assert run.returncode == 0, run.stderr[-2000:]
        assert "non-finite loss at iter 5 (depth" in run.stdout and "skipping the step" in run.stdout
        assert "ddp: 2 ranks agree on 6 depths and the weights" in run.stdout
        weights = torch.load(shellgame_dir / "out/ckpt.pt", weights_only=True)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values())
    else:
        ours = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        assert run.returncode != 0 and len(ours) == 2, run.stderr[-2000:]
        assert all("non-finite loss at iter 5 (depth" in line for line in ours)
        assert not (shellgame_dir / "out/ckpt.pt").exists()
