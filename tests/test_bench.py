"""Contracts of the benchmark: the FLOP formula it divides by, and bench.py itself end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_config
from model import RecurrentGPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("layers", [dict(n_prelude=1, n_coda=1), dict(n_prelude=0, n_coda=2),
                                    dict(n_prelude=2, n_coda=0)])
@pytest.mark.parametrize("num_steps", [(0, 1), (0, 3), (2, 2), (5, 1), (3, 0)])
def test_estimate_flops_matches_flop_counter(layers, num_steps):
    """estimate_flops counts what a forward + backward really runs, within 5% of FlopCounterMode, for any
    split of the depth into no-grad and grad iterations (the math attention backend: FlopCounterMode does
    not see the CPU's fused attention kernel)."""
    torch.manual_seed(0)
    model = RecurrentGPT(tiny_config(vocab_size=96, block_size=32, intermediate_size=48, **layers)).train()
    idx = torch.randint(0, 96, (3, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets=idx, num_steps=num_steps)
        loss.backward()
    measured = counter.get_total_flops()
    estimate = model.estimate_flops(3, 32, *num_steps)
    assert abs(estimate - measured) <= 0.05 * measured, (estimate, measured)


TINY = ["--vocab_size=64", "--block_size=32", "--n_embd=32", "--n_head=2", "--intermediate_size=64",
        "--mean_recurrence=2", "--backprop_depth=2", "--batch_size=2", "--warmup_steps=1", "--timed_steps=2",
        "--memory_depths=2,8", "--decode_batches=1,2", "--decode_depths=1,3", "--prompt_len=4",
        "--decode_tokens=4", "--cache_tokens=4", "--spec_iters=2", "--spec_tokens=6", "--draft_depths=1,2",
        "--draft_lengths=2", "--mm_size=128", "--copy_mib=4"]


def run_bench(tmp_path, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny sizes: more threads only wait on each other
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *TINY, *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_bench_runs_end_to_end_and_writes_json(tmp_path):
    """bench.py runs every section on a tiny config, prints the tables and writes JSON holding each figure."""
    proc = run_bench(tmp_path, "--out=bench.json")
    assert proc.returncode == 0, proc.stderr
    assert "training step" in proc.stdout and "plain GPT" in proc.stdout and "KV cache is" in proc.stdout
    with open(tmp_path / "bench.json") as f:
        result = json.load(f)
    assert result["ceilings"]["matmul_flops_per_s"] > 0 and result["ceilings"]["bandwidth_bytes_per_s"] > 0
    rows = result["train"]["rows"]
    assert [row["name"].split()[0] for row in rows][:3] == ["num_steps=1", "num_steps=2", "num_steps=8"]
    assert rows[3]["name"].startswith("sampler") and rows[-1]["name"] == "plain GPT, 6 layers"
    assert all(row["gflop_per_step"] > 0 and 0 < row["mfu"] for row in rows)
    assert rows[-1]["gflop_per_step"] < rows[-2]["gflop_per_step"]  # the same depth without the adapters
    memory = [(row["num_steps"], row["backprop_depth"], row["checkpointing"]) for row in result["memory"]]
    assert memory == [(2, 2, False), (8, 2, False), (8, 8, False), (8, 8, True)]
    if sys.platform == "linux":
        assert all(row["peak_mib"] > 0 for row in result["memory"])
    no_ckpt, ckpt = result["memory"][2:]  # checkpointing keeps less for the backward pass at the same depth
    assert 0 < ckpt["predicted_rise_mib"] < no_ckpt["predicted_rise_mib"]
    assert [(row["batch"], row["num_steps"]) for row in result["decode"]] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(row["tokens_per_s"] > 0 for row in result["decode"]) and result["cache"]["speedup"] > 0
    spec = result["speculative"]["rows"]  # greedy drafts give plain decoding's tokens; sampled ones are not compared
    assert [(row["sampling"], row["draft_steps"], row["draft_tokens"]) for row in spec] == [
        ("greedy", 1, 2), ("greedy", 2, 2), ("sampled", 1, 2), ("sampled", 2, 2)]
    assert [row["same_tokens"] for row in spec] == [True, True, None, None]
    assert all(0 <= row["acceptance"] <= 1 and 1 <= row["tokens_per_pass"] <= 3 and row["tokens_per_s"] > 0
               for row in spec)


@pytest.mark.parametrize("flag, message", [("--sections=train,fly", "sections must be"),
                                           ("--decode_depths=1,x", "decode_depths must be comma-separated"),
                                           ("--device=tpu", "device must be"),
                                           ("--n_head=3", "must be divisible by n_head")])
def test_bench_rejects_bad_settings_in_one_line(tmp_path, flag, message):
    """A bad setting stops bench.py before any work with one line naming it (exit code 2)."""
    proc = run_bench(tmp_path, flag)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bench_help_lists_the_settings(tmp_path):
    proc = run_bench(tmp_path, "--help")
    assert proc.returncode == 0 and "Sections" in proc.stdout and "--decode_depths=" in proc.stdout
