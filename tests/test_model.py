"""Contracts of model.py's training half: shapes, init, depth, truncated backprop, the depth sampler."""

import math

import pytest
import torch

from conftest import tiny_config
from model import RecurrentGPT


def tiny(**kw):
    return tiny_config(**{"block_size": 32, **kw})


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return RecurrentGPT(tiny(**kw))


def test_shapes_dtypes_and_seeded_determinism():
    """logits are (B, T, vocab) float32, the loss a scalar; same seed, same model, same output."""
    idx = torch.randint(0, 64, (3, 16))
    outs = []
    for _ in range(2):
        model = build(seed=1)
        torch.manual_seed(2)
        logits, loss = model(idx, targets=idx, num_steps=3)
        outs.append(logits)
    assert logits.shape == (3, 16, 64) and logits.dtype == torch.float32
    assert loss.shape == () and torch.isfinite(loss)
    assert torch.equal(outs[0], outs[1])
    assert model(idx)[1] is None


def test_loss_at_init_is_near_uniform():
    """A fresh model predicts close to uniformly: loss within 0.5 nats of ln(vocab_size)."""
    model = build(vocab_size=512)
    idx = torch.randint(0, 512, (4, 32))
    _, loss = model(idx, targets=idx, num_steps=4)
    assert abs(loss.item() - math.log(512)) < 0.5


def test_loss_ignores_targets_of_minus_one():
    """Only targets != -1 count, so a task can score its answers alone."""
    model = build(state_init="zero").eval()
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.full_like(idx, -1)
    targets[:, -1] = idx[:, 0]
    logits, loss = model(idx, targets=targets, num_steps=2)
    expected = torch.nn.functional.cross_entropy(logits[:, -1], idx[:, 0])
    assert torch.allclose(loss, expected)


def test_depth_changes_the_output_and_zero_state_is_deterministic():
    model = build().eval()
    idx = torch.randint(0, 64, (2, 16))
    model.config.state_init = "zero"  # switchable on a built model
    a1, _ = model(idx, num_steps=1)
    a8, _ = model(idx, num_steps=8)
    assert not torch.allclose(a1, a8, atol=1e-4)
    assert torch.equal(model(idx, num_steps=8)[0], a8)  # no seeding needed
    model.config.state_init = "like-init"
    assert not torch.equal(model(idx, num_steps=8)[0], model(idx, num_steps=8)[0])  # random s_0


def count_saved_tensors(model, idx, num_steps):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        _, loss = model(idx, targets=idx, num_steps=num_steps)
    return len(saved), loss


def test_truncated_backprop_keeps_memory_flat_and_reaches_every_parameter():
    """With backprop_depth=4, num_steps=4 and num_steps=32 save the same tensors for backward."""
    model = build(backprop_depth=4).train()
    idx = torch.randint(0, 64, (2, 16))
    n4, _ = count_saved_tensors(model, idx, 4)
    n32, loss = count_saved_tensors(model, idx, 32)
    n2, _ = count_saved_tensors(model, idx, 2)
    assert n4 == n32 and n2 < n4
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_num_steps_forms():
    model = build(backprop_depth=3)
    assert model.split_num_steps(10) == (7, 3)
    assert model.split_num_steps(2) == (0, 2)
    assert model.split_num_steps((5, 1)) == (5, 1)
    model.eval()
    assert model.split_num_steps(None) == (1, 3)  # mean_recurrence=4 in eval mode
    model.train()
    n_no_grad, n_grad = model.split_num_steps(None)
    assert 1 <= n_grad <= 3 and n_no_grad >= 0


def test_depth_sampler_mean_bound_and_reproducibility():
    """E[r] = mean_recurrence + 1, n_grad <= backprop_depth, and a seeded generator repeats itself."""
    model = build(mean_recurrence=8, backprop_depth=4)
    g = torch.Generator().manual_seed(0)
    draws = [model.sample_num_steps(g) for _ in range(20000)]
    depths = [a + b for a, b in draws]
    assert abs(sum(depths) / len(depths) - 9) < 0.05 * 9
    assert max(b for _, b in draws) <= 4 and min(b for _, b in draws) >= 1
    assert max(depths) > 20  # the heavy tail
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [model.sample_num_steps(g1) for _ in range(50)] == [model.sample_num_steps(g2) for _ in range(50)]


@pytest.mark.parametrize("kw, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(state_init="gaussian"), "state_init"),
    (dict(backprop_depth=0), "backprop_depth"),
    (dict(mean_recurrence=0), "mean_recurrence"),
])
def test_bad_config_raises_value_error_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


@pytest.mark.parametrize("num_steps", [0, -3, (0, 0), (-1, 2), 2.5])
def test_bad_num_steps_raises(num_steps):
    model = build()
    with pytest.raises(ValueError, match="num_steps"):
        model(torch.zeros(1, 4, dtype=torch.long), num_steps=num_steps)


def test_unknown_state_init_set_after_build_raises():
    model = build()
    model.config.state_init = "ones"
    with pytest.raises(ValueError, match="state_init"):
        model(torch.zeros(1, 4, dtype=torch.long), num_steps=1)


def test_too_long_sequence_raises():
    """forward and the logit lens (trace) refuse a sequence longer than block_size with one ValueError."""
    with pytest.raises(ValueError, match="sequence length 33 exceeds block_size 32"):
        build()(torch.zeros(1, 33, dtype=torch.long), num_steps=1)
    with pytest.raises(ValueError, match="sequence length 33 exceeds block_size 32"):
        next(build().trace(torch.zeros(1, 33, dtype=torch.long), 2))  # a generator: it checks as it starts


def test_architecture_facts():
    """Tied head, the adapter's shape, the depth-scaled init and weight decay groups."""
    model = build(mean_recurrence=8)
    assert model.lm_head.weight is model.wte.weight
    assert model.adapter.weight.shape == (32, 64)
    assert model.core_block[0].attn.qk_bias.shape == (2, 1, 2, 16)
    std = math.sqrt(2 / (5 * 32))
    out_std = std / math.sqrt(2 * (1 + 1 + 2 * 8))
    assert abs(model.wte.weight.std().item() - std) < 0.1 * std
    assert abs(model.core_block[0].attn.proj.weight.std().item() - out_std) < 0.15 * out_std
    assert model.core_block[0].mlp.fc.weight[64:].std() < 0.5 * model.core_block[0].mlp.fc.weight[:64].std()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p.shape == (2, 1, 2, 16) for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.get_num_params()


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less():
    """Recomputing each iteration with gradients in the backward pass changes no gradient (float64, 1e-10);
    the graph keeps far fewer tensors per iteration that carries gradients (its input, not its activations)."""
    model = build(backprop_depth=6).double().train()
    idx = torch.randint(0, 64, (2, 16))
    grads, saved = [], []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(3)  # the same s_0
        _, loss = model(idx, targets=idx, num_steps=(2, 6))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        saved.append([count_saved_tensors(model, idx, (0, k))[0] for k in (2, 6)])
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=0, atol=1e-10), name
    per_iteration = [(b - a) / 4 for a, b in saved]
    assert 0 < 5 * per_iteration[1] < per_iteration[0], saved


def test_alibi_bias_is_minus_slope_times_distance():
    """pos_encoding="alibi": attention scores are q.k / sqrt(head_dim) - slope_h * (query position - key
    position), causal, with no rotation; with slopes near 0 that is attention without positions."""
    from model import CausalSelfAttention
    torch.manual_seed(0)
    alibi, none = CausalSelfAttention(tiny(pos_encoding="alibi"), 0), CausalSelfAttention(tiny(pos_encoding="none"), 0)
    none.load_state_dict({k: v for k, v in alibi.state_dict().items() if k != "log_slopes"})
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        alibi.log_slopes.copy_(torch.tensor([0.7, 0.05]).log())
        bias = torch.cat([alibi.qk_bias[:, 0], torch.zeros(1, 2, 16)])  # on q and k, not v
        q, k, v = (alibi.Wqkv(x).view(2, 10, 3, 2, 16) + bias).permute(2, 0, 3, 1, 4)
        dist = torch.arange(10)[:, None] - torch.arange(10)
        scores = q @ k.transpose(-1, -2) / 4 - torch.tensor([0.7, 0.05])[:, None, None] * dist
        y = scores.masked_fill(dist < 0, float("-inf")).softmax(-1) @ v
        assert torch.allclose(alibi(x, None), alibi.proj(y.transpose(1, 2).reshape(2, 10, 32)), atol=1e-5)
        alibi.log_slopes.fill_(-30.0)
        assert torch.allclose(alibi(x, None), none(x, None), atol=1e-5)
