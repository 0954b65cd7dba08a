"""
Benchmark training and sampling against this machine's own limits (a dense matmul and a large copy, measured
first), on CPU or CUDA:

    python bench.py                                     # every section, CPU-sized defaults (a few minutes)
    python bench.py --sections=train --n_embd=512 --n_head=8 --intermediate_size=1408
    python bench.py config/bench_gpu.py                 # GPT-2-small width, bf16, torch.compile

Sections (--sections: a comma-separated choice, or "all"):
  train   a training step at num_steps = 1, mean_recurrence, 4 * mean_recurrence and under the depth sampler,
          then all iterations with gradients beside a plain pre-norm GPT of the same unrolled depth. FLOPs are
          RecurrentGPT.estimate_flops; MFU is against the matmul ceiling measured beside each row.
  memory  peak memory of a step at memory_depths, and at backprop_depth 8 with and without activation
          checkpointing, beside what common.training_memory predicts (CUDA: max allocated; Linux: peak RSS)
  decode  greedy generate(): tokens/s for decode_batches x decode_depths, and of the bandwidth roofline
  cache   generate() against recomputing the whole forward for every new token, batch 1
  speculative  self-speculative decoding against plain decoding at num_steps 32, greedy (the same tokens) and
          sampled, on a 64-wide character model trained here for spec_iters steps on this repository's Python
          files, for each draft_steps in draft_depths and draft_tokens in draft_lengths (one thread: the model is small)
Prints tables; writes every figure to `out`.
"""

import ctypes
import glob
import json
import os
import platform
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (WriteError, atomic_write, check_settings, configure, die, int_list, keep_freed_memory,
                    model_config, pick_dtype, resident_memory, restart_peak_memory, setup_device, speculation_stats,
                    training_memory)
from model import CausalSelfAttention, GatedMLP, ModelConfig, RecurrentGPT, RMSNorm, precompute_rope

# ---- settings: defaults, overridden by config files and --key=value ----
sections = "all"
out = "bench.json"           # where the JSON goes ("" = nowhere)
vocab_size = 8192
block_size = 256
n_embd = 256
n_head = 4
intermediate_size = 704
n_prelude = 1
n_core = 2
n_coda = 1
mean_recurrence = 8
backprop_depth = 4
batch_size = 8
warmup_steps = 1             # untimed steps before each measurement
timed_steps = 5              # timed steps per row (the median is reported; the mean under the sampler)
memory_depths = "4,64"
decode_batches = "1,16"
decode_depths = "1,8,32"
prompt_len = 16
decode_tokens = 32
cache_tokens = 256           # generate() against recomputing: new tokens, at the first of decode_depths
spec_iters = 400             # training steps of the speculative section's character model
spec_tokens = 128            # new tokens per generate() in the speculative section
draft_depths = "2,4,8"       # its draft_steps ...
draft_lengths = "2,4,8"      # ... and draft_tokens
mm_size = 2048               # side of the square matmul of the ceiling (8192 fills a GPU)
copy_mib = 256               # size of the copied buffer of the bandwidth (2048 on a GPU)
device = "auto"              # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1"
dtype = "auto"               # "auto" (bfloat16 on CUDA, float32 elsewhere), "bfloat16", "float32"
compile = False              # torch.compile each block in the train and memory sections
seed = 1337
config, _ = configure(globals())

SECTIONS = ("train", "memory", "decode", "cache", "speculative")
chosen = SECTIONS if sections == "all" else sections.split(",")
check_settings(config, [("sections", set(chosen) <= set(SECTIONS), f"'all' or a choice of {', '.join(SECTIONS)}")]
               + [(k, config[k] >= 1, ">= 1") for k in ("batch_size", "timed_steps", "prompt_len", "decode_tokens",
                                                        "cache_tokens", "spec_iters", "spec_tokens", "mm_size",
                                                        "copy_mib")]
               + [("warmup_steps", warmup_steps >= 0, ">= 0")])
memory_depths, decode_batches, decode_depths, draft_depths, draft_lengths = map(
    int_list, ("memory_depths", "decode_batches", "decode_depths", "draft_depths", "draft_lengths"),
    (memory_depths, decode_batches, decode_depths, draft_depths, draft_lengths))
model_args = {f.name: config[f.name] for f in fields(ModelConfig) if f.name in config}
model_config(model_args)  # the model's own checks, before any work
device, device_type = setup_device(device)
dtype = pick_dtype(dtype, device_type)
ptdtype = getattr(torch, dtype)
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()) if os.path.exists("/proc/cpuinfo") else None
machine = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device_type == "cuda"
           else f"{cpu[1] if cpu else platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
if device_type == "cpu":
    keep_freed_memory()  # as train.py does
x, y = (torch.randint(vocab_size, (batch_size, block_size), device=device) for _ in range(2))  # a training batch


def seconds(fn):
    sync = torch.cuda.synchronize if device_type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    fn(), sync()
    return time.perf_counter() - t0


def matmul_rate():
    """Dense matmul FLOP/s in the training dtype, timed once: the caller takes medians."""
    a, b = (torch.randn(mm_size, mm_size, device=device, dtype=ptdtype) for _ in range(2))
    reps = 20 if device_type == "cuda" else 1  # a window long enough to time
    return reps * 2 * mm_size ** 3 / seconds(lambda: [a @ b for _ in range(reps)])


class PlainGPT(nn.Module):
    """The yardstick: a pre-norm GPT of n_layer blocks made of model.py's parts (no qk_bias), tied embeddings."""

    def __init__(self, config, n_layer):
        super().__init__()
        config = replace(config, qk_bias=False)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm_1=RMSNorm(config.n_embd, config.norm_eps), attn=CausalSelfAttention(config, i),
            norm_2=RMSNorm(config.n_embd, config.norm_eps), mlp=GatedMLP(config))) for i in range(n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        self.register_buffer("rope_table", precompute_rope(config.n_embd // config.n_head, config.block_size,
                                                           config.rope_base), persistent=False)

    def forward(self, idx, targets, num_steps=None):
        rope = self.rope_table[:idx.size(1), None, None]  # as RecurrentGPT.embed
        x = self.wte(idx)
        for b in self.blocks:
            x = x + b.attn(b.norm_1(x), rope)
            x = x + b.mlp(b.norm_2(x))
        logits = F.linear(self.ln_f(x), self.wte.weight).float()
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(**overrides):
    torch.manual_seed(seed)
    model = RecurrentGPT(ModelConfig(**(model_args | overrides))).to(device)
    if compile:  # each block, as train.py: a new depth reuses the compiled code
        for block in (*model.prelude, *model.core_block, *model.coda):
            block.compile()
    return model


def train_step(model, optimizer, x, y, num_steps):
    with autocast:
        _, loss = model(x, y, num_steps=num_steps)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(runs):
    """Time timed_steps training steps of each run (model, depths), taking turns step by step so that all see
    the same load, each step beside a matmul probe. Returns a training-table row per run."""
    steps = [(model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device_type == "cuda"), depths)
             for _, model, depths, _ in runs]
    [train_step(model, opt, x, y, depths[0]) for model, opt, depths in steps for _ in range(warmup_steps)]
    times, probes = [[] for _ in runs], [[] for _ in runs]
    for i in range(timed_steps):
        for k, (model, opt, depths) in enumerate(steps):
            probes[k].append(matmul_rate())
            times[k].append(seconds(lambda: train_step(model, opt, x, y, depths[i])))
    rows = []
    for (name, model, depths, flops), t, p in zip(runs, times, probes):
        s, flops = statistics.median(t) if len(set(depths)) == 1 else statistics.mean(t), statistics.mean(map(flops, depths))
        rows.append(dict(name=name, depths=depths, ms_per_step=1000 * s, tokens_per_s=batch_size * block_size / s,
                         flops_per_step=flops, mfu=flops / s / statistics.median(p), times=t))
    return rows


def peak_memory(num_steps, checkpointing=False, **overrides):
    """Peak memory in bytes of two training steps at num_steps, and its rise over the memory before them (the
    optimizer state made already): CUDA's max allocated, or on Linux the peak RSS, restarted once glibc has
    returned freed memory. (None, None) elsewhere."""
    model = build(**overrides)
    model.activation_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device_type == "cuda")
    train_step(model.train(), opt, x, y, 1)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    elif resident_memory() is not None:  # Linux
        ctypes.CDLL(None).malloc_trim(0)
        restart_peak_memory()
        before = resident_memory()
    else:
        return None, None
    for _ in range(2):
        train_step(model, opt, x, y, num_steps)
    peak = torch.cuda.max_memory_allocated(device) if device_type == "cuda" else resident_memory(peak=True)
    return peak, peak - before


def greedy(model, prompt, n, num_steps, cached=True):
    """n greedy tokens after prompt: generate() with its KV cache, or the whole forward again for every token."""
    if cached:
        return model.generate(prompt, n, num_steps=num_steps, top_k=1)
    with torch.no_grad():
        for _ in range(n):
            prompt = torch.cat([prompt, model(prompt, num_steps=num_steps)[0][:, -1:].argmax(-1)], dim=1)
    return prompt


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))


pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
results = dict(machine=dict(name=machine, device=device, dtype=dtype, torch=torch.__version__), settings=config)
print(f"bench: {machine}, {dtype}, torch {torch.__version__}")
print(f"model: {json.dumps(model_args)}; batch {batch_size} x {block_size} tokens")

matmul_rate()  # warm-up
rate = statistics.median(matmul_rate() for _ in range(5))
a, b = torch.ones(copy_mib * 2 ** 20 // 4, device=device), torch.empty(copy_mib * 2 ** 20 // 4, device=device)
bandwidth = 2 * a.nbytes / statistics.median(seconds(lambda: b.copy_(a)) for _ in range(6))  # a read, a write
results["ceilings"] = dict(matmul_flops_per_s=rate, bandwidth_bytes_per_s=bandwidth)
print(f"machine ceilings (medians): matmul {mm_size}^2 {dtype} {rate / 1e9:,.0f} GFLOP/s, copy {copy_mib} MiB "
      f"{bandwidth / 1e9:.1f} GB/s")

if "train" in chosen:
    model, r = build(), mean_recurrence
    flops = lambda d: model.estimate_flops(batch_size, block_size, *d)
    rows = []
    for num_steps in (1, r, 4 * r):
        a, b = model.split_num_steps(num_steps)
        rows += measure([(f"num_steps={num_steps} ({a} + {b} with grad)", model, [(a, b)] * timed_steps, flops)])
    generator = torch.Generator().manual_seed(seed)
    depths = [model.sample_num_steps(generator) for _ in range(timed_steps)]
    rows += measure([(f"sampler (r = {', '.join(str(sum(d)) for d in depths)})", model, depths, flops)])
    # every iteration with gradients, against the plain GPT of the same unrolled depth (no adapter: fewer FLOPs)
    n_layer = n_prelude + r * n_core + n_coda
    gpt = PlainGPT(model.config, n_layer).to(device)
    if compile:
        gpt.compile()
    adapters = 3 * r * 4 * batch_size * block_size * n_embd ** 2  # the r adapters (2d -> d), forward and backward
    rows += measure([(f"num_steps=(0, {r})", model, [(0, r)] * timed_steps, flops),
                     (f"plain GPT, {n_layer} layers", gpt, [(0, r)] * timed_steps, lambda d: flops(d) - adapters)])
    ratio = statistics.median(a / b for a, b in zip(rows[-2]["times"], rows[-1]["times"]))
    results["train"] = dict(rows=rows, time_ratio_to_plain_gpt=ratio)
    table(f"training step (forward, backward, AdamW), batch {batch_size} x {block_size}, {dtype}"
          + (", compiled blocks" if compile else ""),
          ["depth", "ms/step", "tokens/s", "GFLOP/step", "MFU"],
          [[row["name"], f"{row['ms_per_step']:.0f}", f"{row['tokens_per_s']:,.0f}", f"{row['flops_per_step'] / 1e9:.1f}",
            pct(row["mfu"])] for row in rows])
    print(f"num_steps=(0, {r}) takes {ratio:.2f}x the time of the plain GPT of {n_layer} layers (medians of pairs)")

if "memory" in chosen:  # truncated backprop keeps memory flat in num_steps; checkpointing lowers it at any depth
    cases = [(r, backprop_depth, False) for r in memory_depths] + [(8, 8, False), (8, 8, True)]
    rows = []
    for r, k, ckpt in cases:
        peak, rise = peak_memory(r, ckpt, backprop_depth=k)
        plan = training_memory(ModelConfig(**(model_args | dict(backprop_depth=k))), batch_size, block_size, min(r, k),
                               ckpt, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        rows.append(dict(num_steps=r, backprop_depth=k, checkpointing=ckpt, peak_bytes=peak, rise_bytes=rise,
                         predicted_rise_bytes=plan["activations"] + plan["gradients"]))
    results["memory"] = rows
    mib = lambda b: "n/a" if b is None else f"{b / 2 ** 20:,.0f}"
    table(f"peak memory of a training step ({'max allocated' if device_type == 'cuda' else 'peak RSS'}); the rise "
          "over the memory before it, and the rise common.training_memory predicts (activations + gradients)",
          ["num_steps", "backprop_depth", "checkpointing", "peak MiB", "rise MiB", "predicted rise MiB"],
          [[row["num_steps"], row["backprop_depth"], "yes" if row["checkpointing"] else "no", mib(row["peak_bytes"]),
            mib(row["rise_bytes"]), mib(row["predicted_rise_bytes"])] for row in rows])

if "decode" in chosen:
    dmodel = build(block_size=max(block_size, prompt_len + decode_tokens, prompt_len + cache_tokens)).to(ptdtype).eval()
    size = lambda *modules: sum(p.nbytes for m in modules for p in m.parameters())
    rows = []
    for B in decode_batches:
        for r in decode_depths:
            prompt = torch.randint(vocab_size, (B, prompt_len), device=device)
            greedy(dmodel, prompt, 2, r)  # warm-up
            step_s = statistics.median(seconds(lambda: greedy(dmodel, prompt, decode_tokens, r))
                                       for _ in range(timed_steps)) / decode_tokens
            # weights read per token: prelude, coda, ln_f and the head once, the adapter and core num_steps times
            weights = size(dmodel.prelude, dmodel.coda, dmodel.ln_f, dmodel.wte) + r * size(dmodel.adapter, dmodel.core_block)
            rows.append(dict(batch=B, num_steps=r, ms_per_token=1000 * step_s, tokens_per_s=B / step_s,
                             roofline_fraction=B / step_s / (B * bandwidth / weights)))
    table(f"greedy generate(), prompt {prompt_len} + {decode_tokens} tokens, {dtype}",
          ["batch", "num_steps", "ms/token", "tokens/s", "of bandwidth roofline"],
          [[row["batch"], row["num_steps"], f"{row['ms_per_token']:.2f}", f"{row['tokens_per_s']:,.0f}",
            pct(row["roofline_fraction"])] for row in rows])
    results["decode"] = rows

if "cache" in chosen:
    cmodel = build(block_size=prompt_len + cache_tokens).to(ptdtype).eval()
    prompt, r = torch.randint(vocab_size, (1, prompt_len), device=device), decode_depths[0]
    rounds = [[seconds(lambda: greedy(cmodel, prompt, cache_tokens, r, cached)) for cached in (True, False)]
              for _ in range(timed_steps)]
    cached, recompute = map(statistics.median, zip(*rounds))
    speedup = statistics.median(b / a for a, b in rounds)
    results["cache"] = dict(num_steps=r, new_tokens=cache_tokens, cached_s=cached, recompute_s=recompute, speedup=speedup)
    print(f"\n{cache_tokens} new tokens at num_steps={r}, batch 1: generate() {cached:.2f} s, recomputing the whole "
          f"forward per token {recompute:.2f} s (medians; the KV cache is {speedup:.1f}x faster)")

if "speculative" in chosen:  # drafts at a low depth are worth checking only on a model that has learned something
    torch.set_num_threads(1)  # a 64-wide model: a second thread only waits for the first
    text = "".join(open(f, encoding="utf-8").read() for f in sorted(glob.glob(os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "*.py"))))
    itos = sorted(set(text))
    data = torch.tensor([{c: i for i, c in enumerate(itos)}[c] for c in text], device=device)
    split = int(0.9 * len(data))
    torch.manual_seed(seed)
    smodel = RecurrentGPT(ModelConfig(vocab_size=len(itos), block_size=256, n_embd=64, n_head=4, intermediate_size=176,
                                      mean_recurrence=8, backprop_depth=4)).to(device)
    opt = smodel.configure_optimizers(0.1, 3e-3, (0.9, 0.95), device_type)
    t0 = time.perf_counter()
    for it in range(spec_iters):  # in train mode the depth sampler picks each step's depth, as in train.py
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = 3e-3 * min(1, (it + 1) / 50)
        batch = torch.stack([data[i:i + 65] for i in torch.randint(split - 65, (16,)).tolist()])
        train_step(smodel, opt, batch[:, :-1], batch[:, 1:], None)
    train_s = time.perf_counter() - t0
    smodel.eval().config.state_init = "zero"  # plain and speculative decoding start every token from the same s_0
    val = torch.stack([data[i:i + 129] for i in range(split, len(data) - 129, 128)])
    with torch.no_grad():
        val_loss = {r: smodel(val[:, :-1], val[:, 1:], num_steps=r)[1].item() for r in (1, 2, 4, 8, 32)}
    prompt = data[split:split + 32][None]

    def run(**kw):
        """(seconds, tokens, sizes of the blocks streamed) of spec_tokens tokens after the prompt at num_steps 32."""
        tokens, blocks = [], []
        elapsed = seconds(lambda: tokens.append(smodel.generate(prompt, spec_tokens, num_steps=32, **kw,
                                                                on_token=lambda x: blocks.append(x.size(1)))))
        return elapsed, tokens[0], blocks

    plain = run(top_k=1)[1]  # a warm-up, and the tokens every draft setting must give
    plain_s = statistics.median(run(top_k=1)[0] for _ in range(3))
    rows = []
    for d in draft_depths:
        for L in draft_lengths:
            elapsed, tokens, blocks = run(top_k=1, draft_steps=d, draft_tokens=L)
            accepted, per_pass = speculation_stats(blocks, L)
            rows.append(dict(draft_steps=d, draft_tokens=L, tokens_per_s=spec_tokens / elapsed,
                             speedup=plain_s / elapsed, acceptance=accepted, tokens_per_pass=per_pass,
                             same_tokens=torch.equal(tokens, plain)))
    best = max(rows, key=lambda row: row["speedup"])
    torch.manual_seed(seed)  # sampled as sample.py samples by default: temperature 0.8, top_k 200
    sampled_s = run(temperature=0.8, top_k=200)[0]
    torch.manual_seed(seed)
    elapsed, _, blocks = run(temperature=0.8, top_k=200, draft_steps=best["draft_steps"],
                             draft_tokens=best["draft_tokens"])
    accepted, per_pass = speculation_stats(blocks, best["draft_tokens"])
    sampled = dict(plain_tokens_per_s=spec_tokens / sampled_s, tokens_per_s=spec_tokens / elapsed,
                   speedup=sampled_s / elapsed, acceptance=accepted, tokens_per_pass=per_pass)
    results["speculative"] = dict(train_s=train_s, val_loss_by_depth=val_loss,
                                  plain_tokens_per_s=spec_tokens / plain_s, rows=rows, best=best, sampled=sampled)
    print(f"\ncharacter model, {spec_iters} steps in {train_s:.0f} s; validation loss by depth: "
          + ", ".join(f"r={r}: {v:.3f}" for r, v in val_loss.items()))
    table(f"self-speculative greedy decoding at num_steps=32, batch 1, {spec_tokens} tokens: plain decoding "
          f"{spec_tokens / plain_s:.1f} tokens/s (median of 3)",
          ["draft_steps", "draft_tokens", "tokens/s", "speed-up", "accepted", "tokens/pass", "same tokens"],
          [[row["draft_steps"], row["draft_tokens"], f"{row['tokens_per_s']:.1f}", f"{row['speedup']:.2f}x",
            pct(row["acceptance"]), f"{row['tokens_per_pass']:.2f}", "yes" if row["same_tokens"] else "NO"]
           for row in rows])
    print(f"sampled (temperature 0.8, top_k 200) at draft_steps={best['draft_steps']}, draft_tokens="
          f"{best['draft_tokens']}: {sampled['tokens_per_s']:.1f} tokens/s against {sampled['plain_tokens_per_s']:.1f} "
          f"({sampled['speedup']:.2f}x), {pct(accepted)} accepted, {per_pass:.2f} tokens per pass")

if out:
    try:
        atomic_write(out, json.dumps(results, indent=1).encode())
    except WriteError as e:
        die(str(e), code=1)
    print(f"wrote {out}")
