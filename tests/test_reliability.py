"""Bad input gets one clear line, never a traceback; checkpoints are atomic, plain data and resumable after
SIGKILL or Ctrl-C; non-finite losses never reach a checkpoint. Each test also checks no file was lost."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import read_checkpoint
from conftest import ROOT, TINY_TRAIN, make_shellgame, run_main, run_script, train_tiny

TINY = [*TINY_TRAIN, "--log_interval=1"]  # a log line at every step: the kill tests watch for them


def one_line_error(run, code, *needles):
    """The run stopped with exit code `code` and one line on stderr holding every needle; no traceback."""
    err = run.stderr.strip()
    assert run.returncode == code, (run.returncode, run.stderr[-1500:])
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def in_process(script, args, cwd, capsys):
    """Run a script's command line in this process (fast: torch is imported already); returns (code, stderr)."""
    return run_main(script, args, cwd), capsys.readouterr().err.strip()


# ---- configuration: stop before any work, naming the key ----

@pytest.mark.parametrize("args, needles", [
    (["--batch_szie=8"], ["--batch_szie"]),
    (["--batch_size=eight"], ["batch_size"]),
    (["--learning_rate=fast"], ["learning_rate"]),
    (["config/nope.py"], ["config file not found", "config/nope.py"]),
    (["--batch_size=0"], ["batch_size must be >= 1"]),
    (["--backprop_depth=0"], ["backprop_depth"]),
    (["--mean_recurrence=-2"], ["mean_recurrence"]),
    (["--n_embd=30", "--n_head=4"], ["n_embd", "n_head"]),
    (["--eval_depths=1,0"], ["eval_depths"]),
    (["--device=gpu9"], ["device"]),
    (["--dtype=float16"], ["dtype"]),
    (["--block_size=40"], ["block_size", "smaller than"]),
])
def test_bad_train_settings_stop_before_any_work(shellgame_dir, capsys, args, needles):
    data = "data/shakespeare_char" if "--block_size=40" in args else None
    if data:  # a stream data set shorter than the block
        (shellgame_dir / "t.txt").write_text("abc " * 12)
        run_script("prepare_data.py", f"--input={shellgame_dir / 't.txt'}", "--tokenizer=char",
                   "--name=shakespeare_char", cwd=shellgame_dir)
        args = [*args, "--dataset=shakespeare_char"]
    code, err = in_process("train.py", [*TINY, "--out_dir=out", *args], shellgame_dir, capsys)
    assert code in (1, 2) and len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert not (shellgame_dir / "out").exists()


def test_fuzzed_flags_give_clean_errors(tmp_path, capsys):
    """200 random malformed flag sets for train.py and sample.py: exit 1 or 2 and one line, never a
    traceback (in an empty directory: no data, no checkpoint)."""
    rng = random.Random(0)
    keys = ["batch_size", "block_size", "n_embd", "n_head", "max_iters", "learning_rate", "compile", "num_steps",
            "temperature", "top_k", "kv_budget", "exit_threshold", "start", "device", "dtype", "nonfinite",
            "eval_depths", "init_from", "seed", "warm_start", "max_new_tokens", "out_dir", "bogus", ""]
    values = ["", "0", "-1", "1e999", "nan", "x", "None", "[1,2]", "{'a':1}", "1,,2", "0,4", "True", "1.5",
              "9" * 400, "\u2603", "'", "__import__('os')", "cuda:7", "-0.0", "(1,2)", "b'x'"]
    for trial in range(200):
        flags = []
        for _ in range(rng.randint(1, 4)):
            form = rng.random()
            key, value = rng.choice(keys), rng.choice(values)
            flags.append(f"--{key}" if form < 0.1 else f"-{key}={value}" if form < 0.15 else f"--{key}={value}")
        code, err = in_process("train.py" if trial % 2 else "sample.py", flags, tmp_path, capsys)
        assert code in (1, 2), (flags, code, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (flags, err)
    assert not any(tmp_path.iterdir())


# ---- data ----

def test_missing_data_names_the_command(tmp_path):
    one_line_error(run_script("train.py", *TINY, cwd=tmp_path), 1, "python prepare_data.py")


@pytest.mark.parametrize("damage, needles", [
    ("truncate", ["train.bin", "truncated"]),
    ("uint32", ["train.bin", "dtype"]),
    ("big_id", ["token id 99", "vocab_size 17"]),
])
def test_damaged_data_gives_one_line(shellgame_dir, damage, needles):
    path = shellgame_dir / "data/shellgame/train.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-5])
    elif damage == "uint32":
        tokens.astype(np.uint32).tofile(path)  # the whole split written as uint32: twice the bytes
    else:
        tokens[tokens == 3] = 99
        tokens.tofile(path)
    one_line_error(run_script("train.py", *TINY, "--max_iters=3", cwd=shellgame_dir), 1, *needles)


# ---- checkpoints ----

def train(cwd, *args, **kw):
    return train_tiny(cwd, "--log_interval=1", *args, **kw)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A shell-game data set and a checkpoint of 2 steps in out/ (read it; copy it to damage it)."""
    path = make_shellgame(tmp_path_factory.mktemp("trained"))
    train(path, "--max_iters=2", "--eval_interval=2", "--out_dir=out")
    return path


@pytest.fixture
def checkpoint_dir(shellgame_dir, trained_dir):
    """shellgame_dir with its own copy of the trained checkpoint in out/."""
    (shellgame_dir / "out").mkdir()
    (shellgame_dir / "out/ckpt.pt").write_bytes((trained_dir / "out/ckpt.pt").read_bytes())
    return shellgame_dir


def test_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of writing a checkpoint: the previous one is still whole and loadable."""
    path = tmp_path / "ckpt.pt"
    code = f"""
import os, signal, torch, common
common.save_checkpoint({{"model": {{"w": torch.ones(3)}}, "model_args": {{}}, "iter_num": 1}}, {str(path)!r})
def dying_save(obj, f):
    f.write(b"the first bytes of a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
common.save_checkpoint({{"model": {{}}, "model_args": {{}}, "iter_num": 2}}, {str(path)!r})
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL
    assert (tmp_path / "ckpt.pt.tmp").exists()  # the half-written file never took the checkpoint's name
    checkpoint = read_checkpoint(str(path))
    assert checkpoint["iter_num"] == 1 and torch.equal(checkpoint["model"]["w"], torch.ones(3))


class Payload:  # what a malicious checkpoint could carry: pickled code that runs on load
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled code"])
def test_bad_checkpoints_give_one_line_and_run_nothing(checkpoint_dir, damage):
    shellgame_dir = checkpoint_dir
    path = shellgame_dir / "out/ckpt.pt"
    if damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"model": Payload(), "model_args": {}}, path)
    for run in (run_script("train.py", *TINY, "--out_dir=out", "--init_from=resume", cwd=shellgame_dir),
                run_script("sample.py", "--out_dir=out", "--start=>ab", cwd=shellgame_dir),
                run_script("eval.py", "--out_dir=out", cwd=shellgame_dir)):
        one_line_error(run, 1, "ckpt.pt")
    assert not (shellgame_dir / "pwned").exists()


def test_resume_refuses_another_shape_naming_the_field(checkpoint_dir):
    shellgame_dir = checkpoint_dir
    before = (shellgame_dir / "out/ckpt.pt").read_bytes()
    run = run_script("train.py", *TINY, "--out_dir=out", "--init_from=resume", "--n_embd=48", cwd=shellgame_dir)
    one_line_error(run, 1, "n_embd is 48", "has 32")
    assert (shellgame_dir / "out/ckpt.pt").read_bytes() == before


def test_checkpoint_is_plain_data(trained_dir):
    """weights_only loading accepts it: tensors, numbers, strings, lists and dicts, no pickled classes."""
    checkpoint = torch.load(trained_dir / "out/ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 2 and checkpoint["meta"]["name"] == "shellgame"
    assert {"model", "optimizer", "model_args", "config"} <= checkpoint.keys()


def test_sigkill_at_a_random_moment_then_resume_equals_the_uninterrupted_run(shellgame_dir):
    args = ["--max_iters=40", "--eval_interval=4"]
    train(shellgame_dir, *args, "--out_dir=straight")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, TINY), *args, "--out_dir=killed"],
                            cwd=shellgame_dir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:  # wait until it trains, then kill it at a random moment
        if line.startswith("iter 1:"):
            break
    time.sleep(random.Random().uniform(0.05, 0.6))
    proc.kill()
    proc.wait()
    saved = read_checkpoint(str(shellgame_dir / "killed/ckpt.pt"))["iter_num"] \
        if (shellgame_dir / "killed/ckpt.pt").exists() else 0
    run = train(shellgame_dir, *args, "--out_dir=killed", "--init_from=resume" if saved else "--init_from=scratch")
    a = torch.load(shellgame_dir / "straight/ckpt.pt", weights_only=True)["model"]
    b = torch.load(shellgame_dir / "killed/ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed from iter {saved}"
    assert saved == 0 or f"iter {saved + 1}:" in run.stdout


def test_ctrl_c_saves_before_exiting(shellgame_dir):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, TINY), "--max_iters=100000",
                             "--eval_interval=100000", "--out_dir=out"], cwd=shellgame_dir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:
        if line.startswith("iter 3:"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-1500:]
    stopped = int(out.split("interrupted at iter ")[1].split(":")[0])
    assert stopped >= 3 and read_checkpoint(str(shellgame_dir / "out/ckpt.pt"))["iter_num"] == stopped


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_loss_is_reported_and_never_saved(shellgame_dir, mode):
    run = run_script("train.py", *TINY, "--learning_rate=1e12", "--grad_clip=0", "--warmup_iters=0",
                     "--max_iters=4", "--eval_interval=2", f"--nonfinite={mode}", "--out_dir=out", cwd=shellgame_dir)
    if mode == "stop":
        one_line_error(run, 1, "non-finite loss at iter 2 (depth")
        assert not (shellgame_dir / "out/ckpt.pt").exists()
    else:
        assert run.returncode == 0 and "non-finite loss at iter 2 (depth" in run.stdout and "skipping" in run.stdout
        if (shellgame_dir / "out/ckpt.pt").exists():
            weights = torch.load(shellgame_dir / "out/ckpt.pt", weights_only=True)["model"]
            assert all(torch.isfinite(w).all() for w in weights.values())


# ---- sampling ----

@pytest.mark.parametrize("args, needles", [
    (["--start="], ["prompt is empty"]),
    (["--start=>" + "ab" * 130], ["block_size"]),
    (["--max_new_tokens=0"], ["max_new_tokens"]),
    (["--num_steps=1,x,4"], ["num_steps"]),
    (["--num_steps=0"], ["num_steps"]),
    (["--num_steps=4,-1"], ["num_steps"]),
    (["--start=>zz"], ["vocabulary"]),
    (["--out_dir=elsewhere"], ["no checkpoint", "elsewhere"]),
    (["--temperature=0"], ["temperature"]),
    (["--exit_threshold=[1]"], ["exit_threshold"]),
    (["--kv_budget=1.5"], ["kv_budget"]),
])
def test_bad_sampling_input_gives_one_line(trained_dir, capsys, args, needles):
    code, err = in_process("sample.py", ["--out_dir=out", "--start=>ab", *args], trained_dir, capsys)
    assert code in (1, 2) and len(err.splitlines()) == 1 and all(n in err for n in needles), err


@pytest.mark.parametrize("script, flag", [("sample.py", "--top_k=0"), ("sample.py", "--num_steps=2,0"),
                                          ("sample.py", "--draft_tokens=4"), ("sample.py", "--top_p=2"),
                                          ("eval.py", "--exit_threshold=-1"), ("eval.py", "--exit_max_steps=1")])
def test_bad_sampling_flags_fail_before_the_model_loads(tmp_path, capsys, script, flag):
    """A bad sampling flag is named at once, before any checkpoint is read (here there is none to read)."""
    code, err = in_process(script, ["--out_dir=nowhere", flag], tmp_path, capsys)
    key = flag[2:].split("=")[0]
    assert code == 2 and len(err.splitlines()) == 1 and key in err and "checkpoint" not in err, err
