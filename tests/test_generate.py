"""Contracts of generation: the per-iteration KV cache, adaptive exit, KV-cache sharing, warm start,
prompts of different lengths in one batch, and the logit lens (trace)."""

import pytest
import torch

import model as model_module
from conftest import tiny_config
from model import RecurrentGPT


def build(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return RecurrentGPT(tiny_config(state_init="zero", **kw)).to(dtype).eval()


def greedy_by_recompute(model, idx, n, num_steps):
    for _ in range(n):
        logits, _ = model(idx, num_steps=num_steps)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_steps", [1, 3, 8])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_greedy_equals_full_recompute(dtype, num_steps, batch, pos_encoding):
    """Decoding with the cache gives exactly the tokens of recomputing the whole forward per token, whatever
    the positions (rotary, a learned distance bias, or none)."""
    model = build(dtype, pos_encoding=pos_encoding)
    idx = torch.randint(0, 64, (batch, 7), generator=torch.Generator().manual_seed(1))
    out = model.generate(idx, 16, num_steps=num_steps, top_k=1)
    assert out.shape == (batch, 23)
    assert torch.equal(out, greedy_by_recompute(model, idx, 16, num_steps))


def test_on_token_streams_each_token_as_sampled():
    """generate(on_token=f) calls f with every new column of tokens, in order, as it is sampled."""
    model = build()
    idx = torch.randint(0, 64, (2, 5))
    seen = []
    out = model.generate(idx, 6, num_steps=2, top_k=1, on_token=lambda x: seen.append(x.clone()))
    assert len(seen) == 6 and all(s.shape == (2, 1) for s in seen)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 5:])


def test_generated_tokens_can_be_trained_on():
    """forward_cached runs under inference_mode, generate does not: its tokens, steps and a list's rows are
    ordinary tensors that a training step can use (inference tensors refuse autograd and in-place writes)."""
    model = build(torch.float32)
    out, steps = model.generate(torch.randint(0, 64, (2, 5)), 4, num_steps=2, warm_start=True, exit_threshold=1e-3,
                                return_steps=True)
    rows = model.generate([torch.tensor([1, 2, 3]), torch.tensor([4])], 3, num_steps=2)
    assert not any(t.is_inference() for t in (out, steps, *rows))
    out[:, 0] = 0  # an in-place write outside inference_mode
    _, loss = model.train()(out[:, :-1], out[:, 1:], num_steps=2)
    loss.backward()
    assert model.wte.weight.grad is not None


def test_exit_threshold_bounds_the_steps():
    """Threshold 0 never exits (num_steps for every token); a huge one exits at the first comparison."""
    model = build()
    idx = torch.randint(0, 64, (3, 5))
    _, steps = model.generate(idx, 6, num_steps=8, top_k=1, exit_threshold=0.0, return_steps=True)
    assert steps.shape == (3, 6) and steps.dtype == torch.long and (steps == 8).all()
    _, steps = model.generate(idx, 6, num_steps=8, top_k=1, exit_threshold=1e9, return_steps=True)
    assert (steps == 2).all()  # two iterations are the fewest that can be compared
    _, steps = model.generate(idx, 6, num_steps=1, top_k=1, exit_threshold=1e9, return_steps=True)
    assert (steps == 1).all()
    out_exit0 = model.generate(idx, 6, num_steps=8, top_k=1, exit_threshold=0.0)
    assert torch.equal(out_exit0, model.generate(idx, 6, num_steps=8, top_k=1))


def test_rows_exit_independently_and_keep_their_answer(trained_toy_model):
    """In one batch, rows stop at different steps, and each gets what it would get alone."""
    model, data = trained_toy_model
    idx = torch.stack([data[i:i + 9] for i in (0, 13, 40, 77)])
    out, steps = model.generate(idx, 12, num_steps=16, top_k=1, exit_threshold=1e-2, return_steps=True)
    assert len(set(steps.flatten().tolist())) > 1 and steps.max() <= 16
    for b in range(len(idx)):
        alone, s = model.generate(idx[b:b + 1], 12, num_steps=16, top_k=1, exit_threshold=1e-2, return_steps=True)
        assert torch.equal(alone[0], out[b]) and torch.equal(s[0], steps[b])


def test_kv_budget_fixes_cache_memory(monkeypatch, trained_toy_model):
    """kv_budget=4: the same cache memory at num_steps 8 and 32; a budget >= num_steps changes nothing;
    a trained model's output stays close to the full cache."""
    sizes = []

    class RecordingCache(model_module.KVCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            sizes.append(self.k.nbytes + self.v.nbytes)

    monkeypatch.setattr(model_module, "KVCache", RecordingCache)
    model, data = trained_toy_model
    idx = torch.stack([data[i:i + 6] for i in range(0, 160, 20)])
    full = model.generate(idx, 24, num_steps=8, top_k=1)
    shared8 = model.generate(idx, 24, num_steps=8, top_k=1, kv_budget=4)
    model.generate(idx, 24, num_steps=32, top_k=1, kv_budget=4)
    model.generate(idx, 24, num_steps=32, top_k=1)
    assert sizes[1] == sizes[2] and sizes[1] < sizes[0] < sizes[3]
    assert torch.equal(model.generate(idx, 24, num_steps=8, top_k=1, kv_budget=8), full)
    agreement = (shared8[:, 6:] == full[:, 6:]).float().mean().item()
    assert agreement > 0.8, agreement


def test_warm_start_changes_only_the_initial_state(monkeypatch):
    """With warm_start, each decoded token starts from the previous token's final state, normed by ln_f as
    in the release; the prompt still starts from s_0, so the first new token is unchanged."""
    model = build()
    with torch.no_grad():
        model.ln_f.weight.uniform_(0.5, 1.5)  # at init ln_f is the identity on the core block's normed output
    idx = torch.randint(0, 64, (2, 5))
    calls = []
    original = model.forward_cached

    def recording(x, cache, num_steps, exit_threshold=None, state=None):
        out = original(x, cache, num_steps, exit_threshold, state)
        calls.append((state, out[2]))
        return out

    monkeypatch.setattr(model, "forward_cached", recording)
    warm = model.generate(idx, 6, num_steps=4, top_k=1, warm_start=True)
    assert calls[0][0] is None
    latent = list(model.trace(idx, 4))[-1][1]  # the prompt's latent after the last iteration
    torch.testing.assert_close(calls[0][1], model.ln_f(latent[:, -1:]))
    for (_, final_prev), (state, _) in zip(calls[:-1], calls[1:]):
        assert state is final_prev
    cold = model.generate(idx, 6, num_steps=4, top_k=1)
    assert torch.equal(warm[:, :6], cold[:, :6])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("exit_threshold", [None, 1e-2])
def test_prompts_of_different_lengths_batch_like_alone(dtype, exit_threshold, trained_toy_model):
    """A list of prompts is left-padded into one batch; each row gets exactly what it gets alone."""
    model, data = trained_toy_model
    model = model.to(dtype)
    prompts = [data[3:4], data[10:19], data[30:35], data[50:62]]
    outs, steps = model.generate(prompts, 10, num_steps=8, top_k=1, exit_threshold=exit_threshold,
                                 return_steps=True)
    for p, out, s in zip(prompts, outs, steps):
        alone, s_alone = model.generate(p[None], 10, num_steps=8, top_k=1, exit_threshold=exit_threshold,
                                        return_steps=True)
        assert torch.equal(out, alone[0]) and torch.equal(s, s_alone[0])
    model.to(torch.float32)


def test_trace_ends_at_the_forward_pass_and_settles(trained_toy_model):
    """trace's last iteration equals forward at that depth; the first iterations differ from it."""
    model, data = trained_toy_model
    idx = data[:40][None]
    logits, states = (torch.stack(t) for t in zip(*model.trace(idx, 12)))
    assert logits.shape == (12, 1, 40, model.config.vocab_size) and states.shape == (12, 1, 40, 48)
    forward, _ = model(idx, num_steps=12)
    assert torch.allclose(logits[-1], forward, atol=1e-5)
    assert not torch.allclose(logits[0], forward, atol=1e-2)
    logp = torch.log_softmax(logits, dim=-1)
    kl_to_final = (logp.exp() * (logp - logp[-1])).sum(-1).mean(dim=(1, 2))  # per iteration
    assert kl_to_final[0] > 10 * kl_to_final[-2]  # the prediction settles as the iterations go on


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=70), "block_size"),
    (dict(num_steps=0), "num_steps"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(kv_budget=0), "kv_budget"),
    (dict(exit_threshold=-1.0), "exit_threshold"),
])
def test_bad_generation_arguments(kwargs, match):
    model = build()
    args = dict(max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **args)


def test_bad_prompts():
    model = build()
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 4)
    with pytest.raises(ValueError, match="token ids"):
        model.generate(torch.tensor([[1, 64]]), 4)


@pytest.mark.parametrize("pos_encoding", ["alibi", "none"])
@pytest.mark.parametrize("exit_threshold", [None, 1e-2])
def test_prompts_of_different_lengths_batch_like_alone_without_rotary_positions(pos_encoding, exit_threshold):
    """The batching contract for the other positional schemes: left-padded rows get what they get alone. The
    slopes are spread out first, so that the distance bias decides something."""
    model = build(pos_encoding=pos_encoding)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompts = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (1, 9, 4, 12)]
    outs, steps = model.generate(prompts, 8, num_steps=6, top_k=1, exit_threshold=exit_threshold, return_steps=True)
    for p, out, s in zip(prompts, outs, steps):
        alone, s_alone = model.generate(p[None], 8, num_steps=6, top_k=1, exit_threshold=exit_threshold,
                                        return_steps=True)
        assert torch.equal(out, alone[0]) and torch.equal(s, s_alone[0])


def test_a_prompt_exits_once_every_position_has_settled(trained_toy_model):
    """Under adaptive exit a prompt stops at the first iteration where the KL between successive iterations
    is below the threshold at every one of its positions, not at its last position alone."""
    model, data = trained_toy_model
    idx, num_steps, threshold = data[:40][None], 16, 1e-3
    _, steps = model.generate(idx, 1, num_steps=num_steps, top_k=1, exit_threshold=threshold, return_steps=True)
    logp = torch.log_softmax(torch.stack([logits for logits, _ in model.trace(idx, num_steps)])[:, 0], dim=-1)
    kl = (logp[:-1].exp() * (logp[:-1] - logp[1:])).sum(-1)  # (num_steps - 1, T): KL(iteration i || i + 1)

    def first_below(k):
        return int((k < threshold).int().argmax()) + 2 if (k < threshold).any() else num_steps

    assert steps[0, 0] == first_below(kl.amax(-1))
    assert first_below(kl[:, -1]) < steps[0, 0]  # the last position alone would have stopped earlier


def test_eval_reads_each_depth_as_generate_gives_it(tmp_path, monkeypatch):
    """eval.py reads every depth from one pass of the logit lens and replays adaptive exit on it: its
    accuracies, exit accuracy and mean exit steps are generate()'s, game by game. It keeps no iteration's
    logits once it has read them (all of them, for long games, are gigabytes)."""
    import json
    import weakref

    import numpy as np

    import model as model_module
    from common import load_model
    from conftest import make_shellgame, run_main, train_tiny
    make_shellgame(tmp_path)
    train_tiny(tmp_path, "--max_iters=40", "--mean_recurrence=4", "--pos_encoding=alibi", "--out_dir=out")
    threshold, max_steps = 1e-3, 8
    trace, alive = model_module.RecurrentGPT.trace, []

    def watched_trace(self, idx, num_steps):
        logits_seen = []
        for logits, s in trace(self, idx, num_steps):
            logits_seen.append(weakref.ref(logits))
            yield logits, s
            del logits
            alive.append(sum(ref() is not None for ref in logits_seen))

    monkeypatch.setattr(model_module.RecurrentGPT, "trace", watched_trace)
    assert run_main("eval.py", ["--out_dir=out", "--num_steps=1,3", f"--exit_threshold={threshold}", "--device=cpu",
                                f"--exit_max_steps={max_steps}", "--batch_size=64"], tmp_path) == 0
    monkeypatch.undo()
    assert len(alive) > max_steps and max(alive) <= 1  # the eval read every iteration and kept none but the last
    result = json.loads((tmp_path / "out/eval.json").read_text())
    assert result["num_steps"] == [1, 3, 4]  # the model's mean_recurrence added
    model, _ = load_model(str(tmp_path / "out"), "cpu")
    model.config.state_init = "zero"
    all_steps = []
    for row in result["rows"]:
        n = row["difficulty"]
        x = torch.from_numpy(np.fromfile(tmp_path / f"data/shellgame/test_{n}.bin", dtype=np.uint16).astype(np.int64))
        y = np.fromfile(tmp_path / f"data/shellgame/test_{n}_targets.bin", dtype=np.int16).astype(np.int64)
        x, answers = x.view(-1, n + 1), torch.from_numpy(y).view(-1, n + 1)[:, -1]
        for r, accuracy in zip(result["num_steps"], row["accuracy"]):
            assert (model.generate(x, 1, num_steps=r, top_k=1)[:, -1] == answers).float().mean().item() == accuracy
        out, steps = model.generate(x, 1, num_steps=max_steps, top_k=1, exit_threshold=threshold, return_steps=True)
        assert (out[:, -1] == answers).float().mean().item() == row["exit_accuracy"]
        assert steps.float().mean().item() == pytest.approx(row["exit_mean_steps"], abs=1e-6)
        all_steps.append(steps)
    all_steps = torch.cat(all_steps)
    assert all_steps.min() < all_steps.max()  # games exited at different iterations: the replay was exercised


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "none"])
@pytest.mark.parametrize("padded", [False, True])
def test_several_tokens_after_a_prefill_equal_one_full_forward(pos_encoding, padded):
    """forward_cached of T new tokens on a cache that holds k attends causally from position k: every new
    position's logits are those of one forward over all k + T tokens (a left-padded row: over the row alone)."""
    model = build(pos_encoding=pos_encoding)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    n_pad = [0, 4] if padded else [0, 0]
    cache = model_module.KVCache(model.config, 2, 12, 3, torch.tensor(n_pad) if padded else None, dtype=torch.float64)
    model.forward_cached(idx[:, :5], cache, 3)
    logits = model.forward_cached(idx[:, 5:], cache, 3)[0]
    for b in range(2):
        full, _ = model(idx[b:b + 1, n_pad[b]:], num_steps=3)
        torch.testing.assert_close(logits[b], full[0, 5 - n_pad[b]:])


def test_sampling_probs_cut_to_top_p_and_min_p():
    """top_p keeps the fewest most likely tokens whose probabilities reach it, min_p those at least min_p
    times as likely as the most likely, top_k the k most likely; what is kept is renormalized."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    probs = lambda **kw: model_module.sampling_probs(logits, **kw)
    torch.testing.assert_close(probs(top_p=0.8), torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(probs(top_p=0.81), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    torch.testing.assert_close(probs(min_p=0.2), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    torch.testing.assert_close(probs(top_k=1, top_p=1.0), torch.tensor([1.0, 0, 0, 0]))
    root = logits.exp().sqrt()
    torch.testing.assert_close(probs(temperature=2.0), root / root.sum())


def blocks_of(model, *args, **kw):
    """generate()'s output and the sizes of the blocks it streamed (one per pass at num_steps)."""
    blocks = []
    out = model.generate(*args, **kw, on_token=lambda x: blocks.append(x.size(1)))
    return out, blocks


def drafting_model():
    """A model whose drafts at a low depth are sometimes the tokens of num_steps=8 and sometimes not (the trained
    toy model's are always right: it has learned its text by one iteration)."""
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kv_budget", [None, 3])
@pytest.mark.parametrize("draft_steps, draft_tokens", [(1, 3), (2, 6), (4, 1)])
def test_greedy_speculative_decoding_gives_the_tokens_of_plain_decoding(kv_budget, draft_steps, draft_tokens):
    """Drafting at a low depth and verifying at num_steps gives plain greedy decoding's tokens, token for token,
    for one prompt and for a batch of prompts of different lengths, with and without KV-cache sharing, drafts
    kept and drafts rejected; the iterations reported are num_steps for every token."""
    model, g = drafting_model(), torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (1, 9), generator=g)
    prompts = [torch.randint(0, 64, (n,), generator=g) for n in (1, 9, 4)]
    for x in (idx, prompts):
        plain = model.generate(x, 30, num_steps=8, top_k=1, kv_budget=kv_budget)
        (fast, steps), blocks = blocks_of(model, x, 30, num_steps=8, top_k=1, kv_budget=kv_budget,
                                          draft_steps=draft_steps, draft_tokens=draft_tokens, return_steps=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, fast)) and (steps == 8).all()
        assert blocks[0] == 1 and sum(blocks) == 30 and max(blocks) <= draft_tokens + 1
        if x is idx:  # some rounds kept a draft, some rejected one
            assert max(blocks) > 1 and min(blocks[1:-1]) <= draft_tokens


def test_cache_after_a_rejected_draft_equals_plain_decoding(monkeypatch):
    """After every round of speculative decoding, rejected drafts included, the cache up to its position holds
    what plain decoding's holds at that position: later tokens read exactly the entries plain decoding wrote."""
    caches = []

    class RecordingCache(model_module.KVCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            caches.append(self)

    monkeypatch.setattr(model_module, "KVCache", RecordingCache)
    model, snapshots = drafting_model(), [{}, {}]

    def snapshot(k):
        def record(x):
            c = caches[-1]
            snapshots[k][c.pos] = (c.k[..., :c.pos, :].clone(), c.v[..., :c.pos, :].clone(), x.size(1))
        return record

    idx = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    model.generate(idx, 24, num_steps=8, top_k=1, on_token=snapshot(0))
    model.generate(idx, 24, num_steps=8, top_k=1, draft_steps=2, draft_tokens=6, on_token=snapshot(1))
    assert any(n < 7 for *_, n in list(snapshots[1].values())[1:-1])  # rounds that rejected a draft
    assert snapshots[1].keys() < snapshots[0].keys()
    for pos, (k, v, _) in snapshots[1].items():
        torch.testing.assert_close(k, snapshots[0][pos][0])
        torch.testing.assert_close(v, snapshots[0][pos][1])


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.7, top_p=0.9, min_p=0.05)])
def test_sampled_speculative_decoding_has_the_distribution_of_plain_sampling(monkeypatch, sampling):
    """The second token of 4,000 rows sampled speculatively (drafted at 1 iteration, checked at 4) follows plain
    sampling's distribution at 4 (a chi-square test over the vocabulary); accepting every draft instead, the
    test sees the draft's distribution."""
    torch.manual_seed(0)
    model = RecurrentGPT(tiny_config(vocab_size=8, state_init="zero")).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    prompt = torch.tensor([[1, 5, 2]])
    # the exact distribution of the second token: sum over the first of p(first) p(second | first)
    logits, _ = model(torch.cat([prompt.expand(8, 3), torch.arange(8)[:, None]], 1), num_steps=4)
    probs = model_module.sampling_probs(logits[:, -2:], **sampling)  # (first token, position, vocab)
    exact = probs[0, 0] @ probs[:, 1]

    def chi_square():
        torch.manual_seed(1)
        out = model.generate(prompt.expand(4000, 3), 3, num_steps=4, draft_steps=1, draft_tokens=1, **sampling)
        counts = torch.bincount(out[:, 4], minlength=8).double()
        seen = exact > 0
        assert counts[~seen].sum() == 0
        return ((counts[seen] - 4000 * exact[seen]) ** 2 / (4000 * exact[seen])).sum().item()

    assert chi_square() < 30  # the 0.9999 quantile of chi-square with 7 degrees of freedom is 29.9
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)  # every draft kept (the ratio p/q is > 0)
    assert chi_square() > 100


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(draft_steps=0, draft_tokens=2), "draft_steps"),
    (dict(draft_steps=2, draft_tokens=0), "draft_tokens"),
    (dict(draft_steps=2), "draft_tokens"),
    (dict(draft_steps=2, draft_tokens=2, exit_threshold=1e-3), "exit_threshold or warm_start"),
    (dict(draft_steps=2, draft_tokens=2, warm_start=True), "exit_threshold or warm_start"),
])
def test_bad_sampling_and_speculation_arguments(kwargs, match):
    """Each gets one ValueError naming it, speculative decoding's unsupported combinations included."""
    with pytest.raises(ValueError, match=match):
        build().generate(torch.zeros(1, 3, dtype=torch.long), 4, **kwargs)


@pytest.fixture
def toy_checkpoint(tmp_path, trained_toy_model):
    """trained_toy_model saved as train.py saves a character model, in tmp_path/out."""
    from dataclasses import asdict

    from common import save_checkpoint
    from conftest import TOY_ITOS
    model, _ = trained_toy_model
    (tmp_path / "out").mkdir()
    meta = {"tokenizer": "char", "itos": TOY_ITOS, "layout": "stream"}
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "meta": meta},
                    str(tmp_path / "out/ckpt.pt"))
    return tmp_path


def test_sample_py_in_bfloat16_keeps_the_rope_table_in_float32(toy_checkpoint, monkeypatch):
    """sample.py --dtype=bfloat16 casts the weights, not the RoPE table: training under autocast rotated by
    the float32 table, and bfloat16 would round its angles (at position 100, by up to 0.4 radians)."""
    from conftest import run_main
    seen = []
    original = RecurrentGPT.generate

    def recording(self, *args, **kw):
        seen.append((self.wte.weight.dtype, self.rope_table.dtype))
        return original(self, *args, **kw)

    monkeypatch.setattr(RecurrentGPT, "generate", recording)
    assert run_main("sample.py", ["--out_dir=out", "--start=1+2=", "--max_new_tokens=4", "--dtype=bfloat16",
                                  "--device=cpu"], toy_checkpoint) == 0
    assert seen == [(torch.bfloat16, torch.float32)]


def test_sample_py_reports_speculative_decoding(toy_checkpoint, capsys):
    """--draft_steps and --draft_tokens: per depth, tokens/s beside the acceptance rate and the tokens each
    verification pass gave, for greedy and sampled decoding."""
    from conftest import run_main
    for top_k in (1, 20):
        assert run_main("sample.py", ["--out_dir=out", "--start=1+2=3;4+", "--max_new_tokens=40", "--num_steps=4,8",
                                      "--draft_steps=1", "--draft_tokens=4", f"--top_k={top_k}", "--top_p=0.95",
                                      "--device=cpu"], toy_checkpoint) == 0
        lines = capsys.readouterr().out.split("tokens/pass")[1].strip().splitlines()
        assert [line.split()[0] for line in lines] == ["4", "8"]
        for line in lines:
            acceptance, per_pass = float(line.split()[-2].rstrip("%")) / 100, float(line.split()[-1])
            assert 0 < acceptance <= 1 and 1 < per_pass <= 5
