"""Shared fixtures: tiny configs, and a tiny model trained for a few seconds on a toy language."""

import pytest
import torch

from model import ModelConfig, RecurrentGPT

# the models here are tiny: more threads only contend for the cores (and spin-wait when the cores are busy)
torch.set_num_threads(1)

TOY_TEXT = "".join(f"{a}+{b}={a + b};" for a in range(10) for b in range(10))  # a little arithmetic language
TOY_ITOS = sorted(set(TOY_TEXT))


def tiny_config(**kw):
    args = dict(vocab_size=64, block_size=64, n_embd=32, n_head=2, intermediate_size=64, n_prelude=1,
                n_core=2, n_coda=1, mean_recurrence=4, backprop_depth=2)
    args.update(kw)
    return ModelConfig(**args)


@pytest.fixture(scope="session")
def trained_toy_model():
    """A tiny model trained with the random depth sampler on TOY_TEXT for a few hundred steps (CPU,
    seconds). Returns (model in eval mode with state_init="zero", encoded text as a LongTensor)."""
    torch.manual_seed(0)
    data = torch.tensor([TOY_ITOS.index(c) for c in TOY_TEXT * 4])
    model = RecurrentGPT(tiny_config(vocab_size=len(TOY_ITOS), n_embd=48, intermediate_size=96, mean_recurrence=6,
                                     backprop_depth=3))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        ix = torch.randint(len(data) - 33, (32,), generator=g)
        x = torch.stack([data[i:i + 32] for i in ix])
        y = torch.stack([data[i + 1:i + 33] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.config.state_init = "zero"
    return model, data


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
# train.py on the shell game at a size that trains in seconds
TINY_TRAIN = [ROOT / "config/demo.py", "--device=cpu", "--n_embd=32", "--intermediate_size=64", "--batch_size=16",
              "--eval_iters=2", "--log_interval=5", "--warmup_iters=5", "--lr_decay_iters=40"]


def run_script(script, *args, cwd, timeout=300, env=None):
    """Run one of the project's scripts as a user would, in cwd; returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def train_tiny(cwd, *args, **kw):
    """train.py with TINY_TRAIN and args, in cwd; it must succeed. Returns the CompletedProcess."""
    run = run_script("train.py", *TINY_TRAIN, *args, cwd=cwd, **kw)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def run_main(script, args, cwd=None):
    """Run one of the project's scripts in this process, as `python script args` would (fast: torch is
    imported already). Returns its exit code; its output is left for capsys."""
    import os
    import runpy
    import sys
    argv, here = sys.argv, os.getcwd()
    sys.argv = [script, *map(str, args)]
    try:
        if cwd is not None:
            os.chdir(cwd)
        runpy.run_path(str(ROOT / script), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = argv
        os.chdir(here)


def make_shellgame(path):
    """A small shell-game data set in path/data/shellgame (run the scripts with cwd=path)."""
    assert run_main("prepare_data.py", [f"--data_dir={path / 'data'}", "--train_examples=3000", "--val_examples=300",
                                        "--test_examples=100", "--test_swaps=2,8,20"]) == 0
    return path


@pytest.fixture
def shellgame_dir(tmp_path):
    return make_shellgame(tmp_path)
