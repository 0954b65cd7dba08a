"""A recurrent-depth language model in one file: the architecture of Geiping et al. 2025, "Scaling up
Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach" (released as Huginn-0125).

    e   = P(x)                   prelude: embed the tokens, then n_prelude blocks
    s_0 = random (or zeros)      the initial latent state
    s_i = R(e, s_{i-1})          core block: adapter(cat[s, e]), then n_core blocks; i = 1..num_steps
    p   = C(ln_f(s_r))           coda: n_coda blocks, ln_f, the tied lm_head

One set of weights serves any num_steps. Training samples the depth for every step and backpropagates through
the last backprop_depth iterations only; at inference the user picks the depth, and generate() adds the paper's
per-iteration KV cache, adaptive exit, KV-cache sharing, warm start and self-speculative decoding.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    """Weight-only RMSNorm, computed in float32 whatever the input dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def precompute_rope(head_dim, block_size, base):
    """The RoPE table: cos and sin of position * frequency, shape (block_size, head_dim // 2, 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x, rope):
    """Rotate the adjacent pairs of dims (0,1), (2,3), ... of x (B, T, 2, H, hd): queries and keys at once,
    in float32. rope holds the table's rows at x's positions, shaped ([B,] T, 1, 1, hd // 2, 2)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.layer_id = layer_id  # which rows of a KVCache this layer reads and writes
        self.Wqkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        # the release's only bias: a learned offset added to q and k (index 0 and 1) before RoPE
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_head, self.head_dim)) if config.qk_bias else None
        # pos_encoding "alibi" (Press et al. 2022): no rotation, a bias -slope * distance on the logits instead
        self.log_slopes = (nn.Parameter(torch.linspace(0, -4 * math.log(2), self.n_head))
                           if config.pos_encoding == "alibi" else None)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rope, cache=None, iteration=0):
        B, T, C = x.shape
        qkv = self.Wqkv(x).view(B, T, 3, self.n_head, self.head_dim)
        qk, v = qkv[:, :, :2], qkv[:, :, 2].transpose(1, 2)  # q and k go through the bias and RoPE together
        if self.qk_bias is not None:
            qk = qk + self.qk_bias[:, 0].to(qk.dtype)
        q, k = (qk if rope is None else apply_rope(qk, rope)).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        k, v, mask = (k, v, None) if cache is None else cache.update(self.layer_id, iteration, k, v)
        if self.log_slopes is not None:  # distances between cache slots: a left-padded row keeps its spacing
            S = k.size(2)
            dist = torch.arange(S - T, S, device=x.device)[:, None] - torch.arange(S, device=x.device)
            bias = (-self.log_slopes.exp()[:, None, None] * dist).to(q.dtype)
            mask = torch.where(dist >= 0 if mask is None else mask, bias, -math.inf)
        # without a mask, a prefill is plainly causal and a single decoded token sees every cached key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class GatedMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)  # one matmul for both halves
        return self.proj(F.silu(a) * b)


class SandwichBlock(nn.Module):
    """Norms before and after each sublayer: re-norming the residual keeps its scale however often the core runs."""

    def __init__(self, config, layer_id):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_id)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.norm_3 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_4 = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, rope, cache=None, iteration=0):
        x = self.norm_2(x + self.attn(self.norm_1(x), rope, cache, iteration))
        return self.norm_4(x + self.mlp(self.norm_3(x)))


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    block_size: int = 256          # longest sequence (the RoPE table's length)
    n_embd: int = 256
    n_head: int = 4
    intermediate_size: int = 704   # hidden width of the gated MLP
    n_prelude: int = 1
    n_core: int = 2                # blocks in the core block, applied num_steps times
    n_coda: int = 1
    mean_recurrence: int = 8       # mean of the training depth sampler; the default num_steps in eval
    backprop_depth: int = 4        # iterations that carry gradients (truncated backprop)
    qk_bias: bool = True
    rope_base: float = 50000.0
    norm_eps: float = 1e-6
    state_init: str = "like-init"  # s_0: "like-init" (truncated normal, as the embeddings) or "zero"
    pos_encoding: str = "rope"     # "rope" (rotary, the release's), "alibi" (a learned bias on distance) or "none"

    def __post_init__(self):
        for name in (f.name for f in fields(self) if f.type is int):  # the sizes and counts
            low = 0 if name in ("n_prelude", "n_coda") else 1
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low} (got {getattr(self, name)})")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                             "into an even head size (RoPE rotates pairs of dims)")
        for name, allowed in (("state_init", ("like-init", "zero")), ("pos_encoding", ("rope", "alibi", "none"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (got {getattr(self, name)!r})")


def check_sampling(num_steps, max_new_tokens=1, temperature=1.0, top_k=None, top_p=None, min_p=None,
                   exit_threshold=None, kv_budget=None, warm_start=False, draft_steps=None, draft_tokens=None):
    """generate()'s arguments, checked without a model: scripts check their flags before a long load."""
    args, required = locals(), ("num_steps", "max_new_tokens", "temperature")  # the others may be None: off
    count = (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    rules = dict(num_steps=count, max_new_tokens=count, top_k=count, kv_budget=count, draft_steps=count,
                 draft_tokens=count, temperature=(lambda v: v > 0, "a number > 0"),
                 top_p=(lambda v: 0 < v <= 1, "a number in (0, 1]"),
                 min_p=(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                 exit_threshold=(lambda v: v >= 0, "a number >= 0"))
    for name, (ok, allowed) in rules.items():
        value = args[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (value is None and name not in required or number and ok(value)):
            raise ValueError(f"{name} must be {allowed} (got {value!r})")
    if (draft_steps is None) != (draft_tokens is None):
        raise ValueError(f"draft_tokens must be given with draft_steps (got {draft_tokens!r})")
    if draft_steps is not None and (exit_threshold is not None or warm_start):
        raise ValueError("speculative decoding (draft_steps) cannot take exit_threshold or warm_start: its "
                         "verification pass runs several tokens at one depth, each from s_0")


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """The distribution generate() samples from: softmax(logits / temperature) over the last dim, cut to the top_k
    tokens, the fewest whose probability reaches top_p and those >= min_p times the likeliest's, renormalized."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        after = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the tokens after the nucleus is full
        probs = probs.masked_fill(after.scatter(-1, order, after), 0)
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0)
    return probs / probs.sum(-1, keepdim=True)


class RecurrentGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d, P, K, C = config.n_embd, config.n_prelude, config.n_core, config.n_coda
        self.wte = nn.Embedding(config.vocab_size, d)
        # layer ids count prelude, coda, then core: a KVCache gives the core layers one row per iteration slot
        self.prelude = nn.ModuleList(SandwichBlock(config, i) for i in range(P))
        self.adapter = nn.Linear(2 * d, d, bias=False)
        self.core_block = nn.ModuleList(SandwichBlock(config, P + C + i) for i in range(K))
        self.coda = nn.ModuleList(SandwichBlock(config, P + i) for i in range(C))
        self.ln_f = RMSNorm(d, config.norm_eps)  # applied twice: to s_r before the coda, and after it
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.register_buffer("rope_table", precompute_rope(d // config.n_head, config.block_size, config.rope_base),
                             persistent=False)
        self.activation_checkpointing = False  # training: recompute each grad iteration in the backward pass
        self.init_weights()

    def init_weights(self):
        """Truncated normals (at 3 std) scaled for depth: std = sqrt(2 / (5 n_embd)), and the layers that
        write into the residual stream std / sqrt(2 L_eff), L_eff counting the core mean_recurrence times."""
        cfg = self.config
        std = math.sqrt(2 / (5 * cfg.n_embd))
        out_std = std / math.sqrt(2 * (cfg.n_prelude + cfg.n_coda + cfg.n_core * cfg.mean_recurrence))
        for name, p in self.named_parameters():
            if p.dim() == 1 or name.endswith(".qk_bias"):
                continue  # norm weights, qk_bias and ALiBi's slopes keep the values they were made with
            s = out_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else std
            nn.init.trunc_normal_(p, 0.0, s, -3 * s, 3 * s)
            if name.endswith("mlp.fc.weight"):  # as in the release, the gate's linear half is scaled too
                nn.init.trunc_normal_(p[cfg.intermediate_size:], 0.0, out_std, -3 * out_std, 3 * out_std)

    @classmethod
    def from_huginn(cls, path, device=None, dtype=None):
        """The released Huginn-0125 from its directory (huginn.py), in eval mode with a zero initial state."""
        from huginn import load_huginn  # imported here: huginn.py imports this file, and needs safetensors
        return load_huginn(cls, path, device, dtype)

    def get_num_params(self):
        """Parameters counted once (the tied lm_head is the embedding); the core's are reused num_steps times."""
        return sum(p.numel() for p in self.parameters())

    # ---- the three stages ----

    def embed(self, idx, cache=None):
        """The prelude P: token embedding scaled by sqrt(n_embd), then the prelude blocks. Returns e and the RoPE
        table's rows at the tokens' positions, shaped for apply_rope (None without RoPE), which every block takes."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = slice(T) if cache is None else cache.positions(T)
        rope = self.rope_table[pos][..., None, None, :, :] if self.config.pos_encoding == "rope" else None
        x = self.wte(idx) * math.sqrt(self.config.n_embd)
        for block in self.prelude:
            x = block(x, rope, cache)
        return x, rope

    def initial_state(self, e):
        """s_0 for the recurrence, read from config.state_init at call time (eval.py switches it to zero)."""
        if self.config.state_init == "zero":
            return torch.zeros_like(e)
        if self.config.state_init != "like-init":
            raise ValueError(f"state_init must be one of ('like-init', 'zero') (got {self.config.state_init!r})")
        std = math.sqrt(2 / (5 * self.config.n_embd))
        s = nn.init.trunc_normal_(torch.empty(e.shape, device=e.device), 0.0, std, -3 * std, 3 * std)
        return (s * math.sqrt(self.config.n_embd)).to(e.dtype)

    def core_iteration(self, s, e, rope, cache=None, iteration=0):
        """One iteration s_i = R(e, s_{i-1}): the adapter re-injects the prelude output e every time."""
        x = self.adapter(torch.cat([s, e], dim=-1))
        for block in self.core_block:
            x = block(x, rope, cache, iteration)
        return x

    def coda_head(self, s, rope, cache=None):
        """The coda C on the normed latent, then ln_f again and the tied head; logits in float32."""
        x = self.ln_f(s)
        for block in self.coda:
            x = block(x, rope, cache)
        return self.lm_head(self.ln_f(x)).float()

    def forward(self, idx, targets=None, num_steps=None):
        """Logits (B, T, vocab_size) for every position and the mean cross-entropy over targets != -1
        (None without targets). num_steps: None (training: drawn by sample_num_steps; eval: mean_recurrence),
        an int r (gradients through the last min(r, backprop_depth) iterations) or a pair (n_no_grad, n_grad)."""
        n_no_grad, n_grad = self.split_num_steps(num_steps)
        e, rope = self.embed(idx)
        s = self.initial_state(e)
        with torch.no_grad():  # truncated backprop: the first iterations build no graph, so memory stays flat
            for _ in range(n_no_grad):
                s = self.core_iteration(s, e, rope)
        for _ in range(n_grad):  # checkpointed, an iteration keeps only its input s for the backward pass
            s = (checkpoint(self.core_iteration, s, e, rope, use_reentrant=False) if self.activation_checkpointing
                 else self.core_iteration(s, e, rope))
        logits = self.coda_head(s, rope)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def split_num_steps(self, num_steps):
        """forward's num_steps as (n_no_grad, n_grad)."""
        if num_steps is None and self.training:
            return self.sample_num_steps()
        if isinstance(num_steps, (tuple, list)):
            if min(num_steps) < 0 or sum(num_steps) < 1:
                raise ValueError(f"num_steps as (n_no_grad, n_grad) needs both >= 0, sum >= 1 (got {tuple(num_steps)})")
            return tuple(num_steps)
        num_steps = self.config.mean_recurrence if num_steps is None else num_steps
        check_sampling(num_steps)
        n_grad = min(num_steps, self.config.backprop_depth)
        return num_steps - n_grad, n_grad

    # ---- training helpers ----

    def sample_num_steps(self, generator=None):
        """The paper's depth sampler: lambda ~ LogNormal(log(mean_recurrence) - sigma^2 / 2, sigma = 0.5),
        r = Poisson(lambda) + 1, so E[r] = mean_recurrence + 1 with a heavy tail. Pass the same seeded
        generator on every DDP rank and all ranks run the same depth. Returns (n_no_grad, n_grad)."""
        sigma = 0.5
        mu = math.log(self.config.mean_recurrence) - sigma ** 2 / 2
        lam = torch.empty(1).log_normal_(mu, sigma, generator=generator)
        return self.split_num_steps(int(torch.poisson(lam, generator=generator).item()) + 1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; matrices (embedding included) decay, norm weights and qk_bias do not."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 and not name.endswith(".qk_bias") else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def estimate_flops(self, batch_size, seq_len, n_no_grad, n_grad):
        """FLOPs of one training step (forward + backward) at the depth run, matmuls only. A backward costs twice
        its forward (input and weight gradients); no-grad iterations have none, the prelude one only if n_grad > 0."""
        cfg = self.config
        N, d, h = batch_size * seq_len, cfg.n_embd, cfg.intermediate_size  # N tokens
        # a block: Wqkv 6Nd^2, proj 2Nd^2, gated MLP 6Ndh, QK^T and AV 2NTd each (all T x T, as FlopCounterMode)
        block = N * (8 * d * d + 6 * d * h) + 4 * N * seq_len * d
        core = cfg.n_core * block + 4 * N * d * d  # and the adapter (2d -> d)
        head = 2 * N * d * cfg.vocab_size  # the tied lm_head
        forward = (cfg.n_prelude + cfg.n_coda) * block + (n_no_grad + n_grad) * core + head
        backward = 2 * ((cfg.n_prelude * block if n_grad else 0) + n_grad * core + cfg.n_coda * block + head)
        return forward + backward

    # ---- inference ----

    @torch.inference_mode()  # no autograd bookkeeping (version counters, views) in the per-token step
    def forward_cached(self, idx, cache, num_steps, exit_threshold=None, state=None):
        """Run the next tokens idx (B, T) through the model, reading and writing the KVCache. Returns the logits
        at every new position (B, T, vocab_size), the iterations each row used (B,) and each row's final latent
        at the last position as ln_f norms it for the coda (B, 1, n_embd): the release warm-starts from it."""
        B, T = idx.shape
        e, rope = self.embed(idx, cache)
        s = self.initial_state(e) if state is None else state
        steps, logp = torch.full((B,), num_steps, dtype=torch.long, device=idx.device), None
        for i in range(num_steps):
            active = cache.active = None if exit_threshold is None else steps > i  # exited rows stop writing
            s_next = self.core_iteration(s, e, rope, cache, i)
            s = s_next if active is None else torch.where(active[:, None, None], s_next, s)  # exited rows keep theirs
            if active is None:
                continue
            # adaptive exit, judged at every new position: a prompt's last answer can settle before the others
            logp_prev, logp = logp, F.log_softmax(self.coda_head(s, rope, cache), dim=-1)
            if logp_prev is not None:
                kl = (logp_prev.exp() * (logp_prev - logp)).sum(-1)  # (B, T): KL(previous || current)
                if cache.valid is not None:  # left padding is no part of the prompt
                    kl = kl.masked_fill(~cache.valid[:, cache.pos:cache.pos + T], 0)
                steps[active & (kl.amax(-1) < exit_threshold)] = i + 1
                if not (steps > i + 1).any():
                    break
        cache.active = None
        logits = self.coda_head(s, rope, cache) if exit_threshold is None else logp  # log-probabilities under exit
        cache.advance(T, None if exit_threshold is None else steps)
        return logits, steps, self.ln_f(s[:, -1:])

    @torch.no_grad()  # not inference_mode: the tokens it returns stay ordinary tensors, fit to train on
    def generate(self, idx, max_new_tokens, num_steps=None, temperature=1.0, top_k=None, top_p=None, min_p=None,
                 exit_threshold=None, kv_budget=None, warm_start=False, draft_steps=None, draft_tokens=None,
                 return_steps=False, on_token=None):
        """Sample max_new_tokens tokens after idx (B, T), or after each prompt of a list of 1-D LongTensors
        (left-padded into one batch; each gets exactly what generating it alone gives). Returns the tokens,
        prompt included ((B, T + max_new_tokens), or a list for a list), and with return_steps also the
        iterations each new token used (B, max_new_tokens). num_steps: iterations per token (default
        mean_recurrence); temperature, top_k, top_p, min_p: sampling_probs; on_token(new): streams each block.
        exit_threshold  adaptive exit: a row stops iterating once the KL divergence between two successive
                        iterations' next-token distributions is below it (>= 2; a prompt: at every position)
        kv_budget       at most this many iteration slots per core layer in the cache (KV-cache sharing)
        warm_start      start each token's state from the previous token's final state (continuous CoT)
        draft_steps, draft_tokens  self-speculative decoding (speculate): plain decoding's tokens (greedy with a
                        zero s_0) or distribution (sampled), in fewer passes at num_steps
        prompt + max_new_tokens must fit in block_size: the cache is allocated once, so no crop as in nanoGPT."""
        num_steps = self.config.mean_recurrence if num_steps is None else num_steps
        check_sampling(num_steps, max_new_tokens, temperature, top_k, top_p, min_p, exit_threshold, kv_budget,
                       warm_start, draft_steps, draft_tokens)
        prompts = list(idx) if isinstance(idx, (list, tuple)) else None
        if prompts is not None:
            if not prompts or any(p.dim() != 1 or len(p) == 0 for p in prompts):
                raise ValueError("prompts must be a non-empty list of non-empty 1-D token tensors")
            T = max(len(p) for p in prompts)
            idx = torch.stack([F.pad(p, (T - len(p), 0)) for p in prompts]).to(self.rope_table.device)  # left-padded
        B, T = idx.shape
        if T == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                             f"({self.config.block_size}): shorten one of them")
        if int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}) (got {int(idx.min())}.."
                             f"{int(idx.max())})")
        n_pad = None if prompts is None else torch.tensor([T - len(p) for p in prompts], device=idx.device)
        n_slots = min(kv_budget or num_steps, num_steps)  # one per iteration, or kv_budget shared ones
        cache = KVCache(self.config, B, T + max_new_tokens, n_slots, n_pad, idx.device, self.wte.weight.dtype)
        steps = torch.full((B, max_new_tokens), num_steps, dtype=torch.long, device=idx.device)
        probs = lambda logits: sampling_probs(logits, temperature, top_k, top_p, min_p)
        x, state, n = idx, None, 0  # x: the tokens not yet in the cache
        while n < max_new_tokens:
            n_draft = 0 if draft_steps is None or n == 0 else min(draft_tokens, max_new_tokens - n - 1)
            if n_draft:
                new = self.speculate(x, cache, num_steps, draft_steps, n_draft, probs)
            else:
                logits, steps[:, n], last = self.forward_cached(x, cache, num_steps, exit_threshold, state)
                state = last if warm_start else None
                new = torch.multinomial(probs(logits[:, -1]), num_samples=1)
            idx, x, n = torch.cat([idx, new], dim=1), new[:, -1:], n + new.size(1)
            if on_token is not None:
                on_token(new)
        out = idx if prompts is None else [row[T - len(p):] for row, p in zip(idx, prompts)]
        return (out, steps) if return_steps else out

    def speculate(self, x, cache, num_steps, draft_steps, n_draft, probs):
        """One round of self-speculative decoding after the token x (B, 1): draft n_draft tokens one at a time at
        draft_steps, check them in one pass at num_steps, keep each with probability min(1, p/q) (p, q: its
        probability at num_steps, at draft_steps) and at the first rejection draw from max(0, p - q) instead: the
        tokens are distributed as sampling at num_steps (Leviathan et al. 2023). The rows share the cache's
        position, so a batch keeps the prefix all its rows accepted. Returns 1 to n_draft + 1 tokens (B, n)."""
        start, tokens, q = cache.pos, [x], []
        for _ in range(n_draft):  # a draft token reads the entries of full depth that the kept tokens left
            q.append(probs(self.forward_cached(tokens[-1], cache, draft_steps)[0][:, -1]))
            tokens.append(torch.multinomial(q[-1], num_samples=1))
        cache.pos = start  # the verification pass overwrites every entry the drafts wrote
        p = probs(self.forward_cached(torch.cat(tokens, 1), cache, num_steps)[0])  # (B, n_draft + 1, vocab)
        drafts, q = torch.cat(tokens[1:], 1)[..., None], torch.stack(q, 1)
        ratio = (p[:, :-1].gather(-1, drafts) / q.gather(-1, drafts))[..., 0]
        accepted = torch.rand_like(ratio) < ratio  # (B, n_draft)
        n = int(accepted.cumprod(1).sum(1).min())
        if n == n_draft:  # every draft kept: the verifier's own next token comes free
            last = torch.multinomial(p[:, -1], num_samples=1)
        else:  # a row that rejected draft n draws from the residual; rows that accepted it keep it
            keep = accepted[:, n, None]
            residual = torch.where(keep, p[:, n], (p[:, n] - q[:, n]).clamp(min=0))
            last = torch.where(keep, drafts[:, n], torch.multinomial(residual, num_samples=1))
        cache.pos = start + n + 1  # roll back past the rejected drafts: later tokens overwrite their entries
        return torch.cat([drafts[:, :n, 0], last], 1)

    @torch.no_grad()
    def trace(self, idx, num_steps):
        """A logit lens on the recurrence: yields (logits (B, T, vocab_size), latent (B, T, n_embd)) after every
        iteration, one at a time: a caller keeps what it needs (all the logits of long games are gigabytes)."""
        check_sampling(num_steps)
        e, rope = self.embed(idx)
        s = self.initial_state(e)
        for _ in range(num_steps):
            s = self.core_iteration(s, e, rope)
            yield self.coda_head(s, rope), s


class KVCache:
    """Preallocated keys and values for generate(): a row per prelude and coda layer, n_slots rows per core layer
    (iteration i writes slot i % n_slots). n_slots = num_steps is the paper's per-iteration cache (a token at
    iteration i attends to the earlier tokens' iteration i); fewer slots are shared (KV-cache sharing)."""

    def __init__(self, config, batch_size, max_len, n_slots, n_pad=None, device=None, dtype=None):
        self.n_fixed, self.n_core, self.n_slots = config.n_prelude + config.n_coda, config.n_core, n_slots
        self.k = torch.zeros(self.shape(config, batch_size, max_len, n_slots), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0         # tokens written so far (speculate moves it back past rejected drafts)
        self.active = None   # (B,) bool under adaptive exit: rows that exited stop writing
        self.n_pad = n_pad   # (B,) left padding of each row; None when nothing is padded
        self.valid = None if n_pad is None else torch.arange(max_len, device=device) >= n_pad[:, None]

    @staticmethod
    def shape(config, batch_size, max_len, n_slots):
        """(rows, B, n_head, max_len, head_dim) of the keys, and of the values."""
        rows = config.n_prelude + config.n_coda + n_slots * config.n_core
        return rows, batch_size, config.n_head, max_len, config.n_embd // config.n_head

    def positions(self, T):
        """RoPE positions of the next T tokens: (T,), or (B, T) counted from each row's first real token."""
        pos = torch.arange(self.pos, self.pos + T, device=self.k.device)
        return pos if self.n_pad is None else (pos - self.n_pad[:, None]).clamp(min=0)

    def update(self, layer_id, iteration, k, v):
        """Store k, v (B, H, T, hd) of the next T tokens; return every key and value so far and the mask."""
        row = layer_id if layer_id < self.n_fixed else layer_id + (iteration % self.n_slots) * self.n_core
        p, T = self.pos, k.size(2)
        for buf, new in ((self.k, k), (self.v, v)):
            if self.active is not None:  # a row that exited keeps the entry of its last iteration
                new = torch.where(self.active.view(-1, 1, 1, 1), new, buf[row, :, :, p:p + T])
            buf[row, :, :, p:p + T] = new
        return self.k[row, :, :, :p + T], self.v[row, :, :, :p + T], self.attn_mask(T)

    def attn_mask(self, T):
        """None where SDPA's own causal mask serves (a prefill, or one token), else (T, pos + T), or (B, 1, T,
        pos + T) with padding: causal from position pos (the T tokens follow the cached ones), never onto padding."""
        if self.valid is None and (self.pos == 0 or T == 1):
            return None
        causal = torch.ones(T, self.pos + T, dtype=torch.bool, device=self.k.device).tril(self.pos)
        if self.valid is None:
            return causal
        pad_query = ~self.valid[:, None, self.pos:self.pos + T, None]  # sees itself, so its softmax is finite
        return causal & (self.valid[:, None, None, :self.pos + T] | pad_query)

    def advance(self, T, steps=None):
        """Close the T tokens just written. A row that exited after e < n_slots iterations left slots e..
        empty: they get its last entry (slot e - 1), which is what later tokens read there."""
        if steps is not None and int(steps.min()) < self.n_slots:
            src = torch.minimum(torch.arange(self.n_slots, device=steps.device)[:, None], steps - 1)
            for buf in (self.k, self.v):
                core = buf[self.n_fixed:].unflatten(0, (self.n_slots, self.n_core))[..., self.pos:self.pos + T, :]
                core.copy_(core.gather(0, src[:, None, :, None, None, None].expand_as(core)))
        self.pos += T
