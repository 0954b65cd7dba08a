"""What the user sets is what runs: keys given in a config file or a flag apply whatever their values, a resumed
run keeps its own settings, a stop saves before anything else, running out of memory anywhere is one line, an
unreadable checkpoint says why, and fresh test games are games training never showed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from common import configure, read_checkpoint
from conftest import ROOT, TINY_TRAIN, run_main, run_script, train_tiny
from test_faults import one_line


def test_configure_says_which_keys_were_given(tmp_path):
    """A key set to its default value, in a flag or a config file, is given all the same."""
    (tmp_path / "cfg.py").write_text("batch_size = 64\nname = 'x'\n")
    namespace = dict(batch_size=64, lr=1e-3, name="x", flag=False)
    config, given = configure(namespace, [str(tmp_path / "cfg.py"), "--lr=0.001"])
    assert given == {"batch_size", "name", "lr"} and config == namespace and namespace["lr"] == 1e-3


def test_resume_keeps_the_runs_own_settings(shellgame_dir):
    """A --state_init=zero, fixed-depth run at mean_recurrence 3, resumed without those flags, keeps them; a flag
    given at resume overrides (here backprop_depth, at its default value 4)."""
    args = ["--out_dir=out", "--eval_interval=2", "--state_init=zero", "--random_depth=False",
            "--mean_recurrence=3", "--learning_rate=2e-3"]
    train_tiny(shellgame_dir, *args, "--max_iters=2", "--backprop_depth=2")
    run = run_script("train.py", "--out_dir=out", "--init_from=resume", "--max_iters=4", "--backprop_depth=4", "--log_interval=1",
                     cwd=shellgame_dir)  # no config file: everything else comes from the checkpoint
    assert run.returncode == 0, run.stderr[-2000:]
    checkpoint = read_checkpoint(str(shellgame_dir / "out/ckpt.pt"))
    assert checkpoint["iter_num"] == 4
    assert checkpoint["model_args"]["state_init"] == "zero" and checkpoint["model_args"]["mean_recurrence"] == 3
    assert checkpoint["model_args"]["backprop_depth"] == 4
    assert checkpoint["config"]["random_depth"] is False and checkpoint["config"]["learning_rate"] == 2e-3
    assert "iter 3: loss" in run.stdout and "depth 3 (3 with grad)" in run.stdout


# slows every evaluation batch after the first training step, so that an evaluation lasts minutes
SLOW_EVAL = """
import time
import model
forward, trained = model.RecurrentGPT.forward, []
def slow(self, idx, targets=None, num_steps=None):
    if self.training:
        trained.append(1)
    elif trained:
        time.sleep(3)
    return forward(self, idx, targets, num_steps)
model.RecurrentGPT.forward = slow
"""


@pytest.mark.parametrize("when", ["before the evaluation", "during the evaluation"])
def test_sigterm_saves_at_once_whatever_evaluation_is_due(shellgame_dir, tmp_path, when):
    """SIGTERM in the step before an evaluation of minutes is due (caught at that step's end or the next's), or in
    that evaluation: the checkpoint of the step is written within seconds, no evaluation reported, exit 130."""
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow/sitecustomize.py").write_text(SLOW_EVAL)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'slow'}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, TINY_TRAIN), "--log_interval=1",
                             "--eval_iters=10", "--eval_interval=3", "--max_iters=1000", "--out_dir=out"],
                            cwd=shellgame_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("iter 2:" if when == "before the evaluation" else "iter 3:"):
            break
    if when == "during the evaluation":
        time.sleep(1)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.time() - t0 < 15, (time.time() - t0, err[-1500:])
    saved = read_checkpoint(str(shellgame_dir / "out/ckpt.pt"))["iter_num"]
    assert saved in ((2, 3) if when == "before the evaluation" else (3,)) and "eval iter 3" not in out, saved


@pytest.mark.parametrize("where, needles", [
    ("AdamW", ["out of memory at iter 1 (depth", "batch_size 16", "backprop_depth", "--activation_checkpointing"]),
    ("evaluation", ["out of memory in the evaluation at iter 0 (train loss at depth", "batch_size", "--eval_depths"]),
])
def test_out_of_memory_in_adamw_or_an_evaluation_is_one_line(shellgame_dir, capsys, monkeypatch, where, needles):
    def running_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if where == "AdamW":
        monkeypatch.setattr(torch.optim.AdamW, "step", running_out)
    else:
        forward = __import__("model").RecurrentGPT.forward
        monkeypatch.setattr(__import__("model").RecurrentGPT, "forward", lambda self, *a, **k: (
            forward(self, *a, **k) if self.training else running_out()))
    code = run_main("train.py", [*TINY_TRAIN, "--out_dir=out", "--max_iters=3"], shellgame_dir)
    one_line(capsys, code, 1, *needles)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}}, str(path))
    return path


@pytest.mark.parametrize("damage, needle", [
    ("truncated", "is truncated or damaged (PytorchStreamReader"),
    ("text", "is not a checkpoint: torch.save writes a zip archive"),
    ("newer", "has checkpoint format 2, newer than this code reads (1): update the code"),
    ("unreadable", "cannot read"),
])
def test_an_unreadable_checkpoint_says_why(saved, monkeypatch, damage, needle):
    if damage == "truncated":
        saved.write_bytes(saved.read_bytes()[:300])
    elif damage == "text":
        saved.write_text("not a checkpoint at all")
    elif damage == "newer":
        torch.save({"model": {}, "model_args": {}, "format": 2}, saved)
    else:  # root reads any file whatever its mode: the denial is made here
        def denied(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(common, "open", denied, raising=False)
    with pytest.raises(ValueError) as e:
        read_checkpoint(str(saved))
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, e.value
    if damage == "unreadable":
        assert "Permission denied" in str(e.value) and "permissions" in str(e.value)


def test_fresh_test_games_are_games_training_never_showed(shellgame_dir):
    """eval.py --test_seed draws games outside the train and val splits: of the 100 games of 2 swaps, only those
    that neither split holds (the shipped test set's 50 among them); longer ones as many as the shipped set has."""
    data = shellgame_dir / "data/shellgame"
    meta = json.loads((data / "meta.json").read_text())
    rows = np.concatenate([np.fromfile(data / f"{s}.bin", dtype=np.uint16).reshape(-1, meta["row_len"])
                           for s in ("train", "val")])
    trained = {tuple(r[:3]) for r in rows if r[3] == 0 and r[2] != 0}  # the games of exactly 2 swaps
    train_tiny(shellgame_dir, "--max_iters=1", "--out_dir=out")
    assert run_main("eval.py", ["--out_dir=out", "--num_steps=1", "--exit_max_steps=2", "--test_seed=7"],
                    shellgame_dir) == 0
    rows = {r["difficulty"]: r for r in json.loads((shellgame_dir / "out/eval.json").read_text())["rows"]}
    assert rows[2]["n"] == min(meta["rows"]["test_2"], 100 - len(trained)) and rows[8]["n"] == meta["rows"]["test_8"]


def test_the_repository_cites_only_files_it_holds():
    """Every document the code, tests and docs cite (a capitalized *.md such as README.md, or a path outside the
    repository) is one a reader of the repository can open; files the tests write (notes.md) are theirs."""
    import re
    ours = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("*.md"), *ROOT.glob("docs/*.md"),
                 *ROOT.glob("config/*.py")]:
        text = path.read_text(encoding="utf-8")
        outside = "../" + "shared"  # spelled apart: this line is read too
        assert outside not in text, f"{path.name} cites {outside}, outside the repository"
        for name in re.findall(r"\b[A-Z][\w-]*\.md\b", text):
            assert name in ours, f"{path.name} names {name}, which is not in the repository"
