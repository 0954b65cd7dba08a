"""Contracts of the benchmark: the FLOP formula it divides by."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, RecurrentGPT


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine every op would wait for the slowest one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("layers", [dict(n_prelude=1, n_coda=1), dict(n_prelude=0, n_coda=2),
                                    dict(n_prelude=2, n_coda=0)])
@pytest.mark.parametrize("num_steps", [(0, 1), (0, 3), (2, 2), (5, 1), (3, 0)])
def test_estimate_flops_matches_flop_counter(layers, num_steps):
    """estimate_flops counts what a forward + backward really runs, within 5% of FlopCounterMode, for any
    split of the depth into no-grad and grad iterations (the math attention backend: FlopCounterMode does
    not see the CPU's fused attention kernel)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=96, block_size=32, n_embd=32, n_head=2, intermediate_size=48, n_core=2,
                         backprop_depth=2, **layers)
    model = RecurrentGPT(config).train()
    idx = torch.randint(0, 96, (3, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets=idx, num_steps=num_steps)
        loss.backward()
    measured = counter.get_total_flops()
    estimate = model.estimate_flops(3, 32, *num_steps)
    assert abs(estimate - measured) <= 0.05 * measured, (estimate, measured)

