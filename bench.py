"""
Benchmark training and sampling against this machine's own limits (a dense matmul and a large copy, measured
first), on CPU or CUDA:

    python bench.py                                     # every section, CPU-sized defaults (a few minutes)
    python bench.py --sections=train --n_embd=512 --n_head=8 --intermediate_size=1408
    python bench.py config/bench_gpu.py                 # GPT-2-small width, bf16, torch.compile

Sections (--sections: a comma-separated choice, or "all"); each prints a table, and `out` gets every figure:
  train        a step at num_steps 1, mean_recurrence, 4 * mean_recurrence and under the depth sampler, then with
               every iteration carrying gradients beside a plain GPT of the same unrolled depth (MFU: matmul ceiling)
  memory       peak memory of a step at memory_depths, and with and without activation checkpointing
  decode       greedy generate() at decode_batches x decode_depths, and its share of the bandwidth roofline
  cache        generate() against recomputing the whole forward for every new token
  speculative  self-speculative against plain decoding, greedy and sampled, on a character model trained here
               on this repository's Python files (one thread)
"""

import ctypes
import glob
import itertools
import json
import os
import platform
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import fields, replace

import torch
import torch.nn.functional as F

from common import (WriteError, atomic_write, check_settings, configure, die, int_list, keep_freed_memory,
                    model_config, pick_dtype, resident_memory, restart_peak_memory, setup_device, speculation_stats,
                    training_memory)
from model import ModelConfig, RecurrentGPT

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
positive = ("batch_size", "timed_steps", "prompt_len", "decode_tokens", "cache_tokens", "spec_iters", "spec_tokens",
            "mm_size", "copy_mib")
check_settings(config, [("sections", set(chosen) <= set(SECTIONS), f"'all' or a choice of {', '.join(SECTIONS)}")]
               + [(k, config[k] >= 1, ">= 1") for k in positive] + [("warmup_steps", warmup_steps >= 0, ">= 0")])
memory_depths, decode_batches, decode_depths, draft_depths, draft_lengths = (int_list(k, config[k]) for k in (
    "memory_depths", "decode_batches", "decode_depths", "draft_depths", "draft_lengths"))
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


class PlainGPT(RecurrentGPT):
    """The yardstick: a pre-norm GPT of the coda's blocks (their norms after each sublayer and the core block go
    unused), whose FLOPs estimate_flops counts at depth (0, 0)."""

    def forward(self, idx, targets, num_steps=None):
        rope, x = self.rope_table[:idx.size(1), None, None], self.wte(idx)  # as RecurrentGPT.embed
        for b in self.coda:
            x = x + b.attn(b.norm_1(x), rope)
            x = x + b.mlp(b.norm_3(x))
        logits = self.lm_head(self.ln_f(x)).float()
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
    """Time timed_steps training steps of each run (name, model, depths), taking turns step by step so that all
    see the same load, each step beside a matmul probe. Returns a training-table row per run."""
    steps = [(model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device_type == "cuda"), depths)
             for _, model, depths in runs]
    [train_step(model, opt, x, y, depths[0]) for model, opt, depths in steps for _ in range(warmup_steps)]
    times, probes = [[] for _ in runs], [[] for _ in runs]
    for i in range(timed_steps):
        for k, (model, opt, depths) in enumerate(steps):
            probes[k].append(matmul_rate())
            times[k].append(seconds(lambda: train_step(model, opt, x, y, depths[i])))
    rows = []
    for (name, model, depths), t, p in zip(runs, times, probes):
        s = statistics.median(t) if len(set(depths)) == 1 else statistics.mean(t)
        f = statistics.mean(model.estimate_flops(batch_size, block_size, *d) for d in depths)
        rows.append(dict(name=name, depths=depths, ms_per_step=1000 * s, tokens_per_s=batch_size * block_size / s,
                         gflop_per_step=f / 1e9, mfu=f / s / statistics.median(p), times=t))
    return rows


def table(title, rows, **specs):
    """Print rows (dicts) under title: a column per key of specs (the names in `out`), in its format spec."""
    cells = [list(specs)] + [["-" if row[k] is None else format(row[k], f) for k, f in specs.items()] for row in rows]
    widths = [max(map(len, column)) for column in zip(*cells)]
    print(f"\n{title}")
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


results = dict(machine=dict(name=machine, device=device, dtype=dtype, torch=torch.__version__), settings=config)
print(f"bench: {machine}, {dtype}, torch {torch.__version__}")
print(f"model: {json.dumps(model_args)}; batch {batch_size} x {block_size} tokens")

rate = statistics.median([matmul_rate() for _ in range(6)][1:])  # the first warms up
a, b = torch.ones(copy_mib * 2 ** 20 // 4, device=device), torch.empty(copy_mib * 2 ** 20 // 4, device=device)
bandwidth = 2 * a.nbytes / statistics.median(seconds(lambda: b.copy_(a)) for _ in range(6))  # a read, a write
results["ceilings"] = dict(matmul_flops_per_s=rate, bandwidth_bytes_per_s=bandwidth)
print(f"machine ceilings (medians): matmul {mm_size}^2 {rate / 1e9:,.0f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s")

if "train" in chosen:
    model, r = build(), mean_recurrence
    fixed = [(n, *model.split_num_steps(n)) for n in (1, r, 4 * r)]
    rows = [measure([(f"num_steps={n} ({a} + {b} with grad)", model, [(a, b)] * timed_steps)])[0] for n, a, b in fixed]
    generator = torch.Generator().manual_seed(seed)
    depths = [model.sample_num_steps(generator) for _ in range(timed_steps)]
    rows += measure([(f"sampler (r = {', '.join(str(sum(d)) for d in depths)})", model, depths)])
    n_layer = n_prelude + r * n_core + n_coda  # all iterations with gradients beside a plain GPT of this depth
    gpt = PlainGPT(replace(model.config, n_prelude=0, n_core=1, n_coda=n_layer, qk_bias=False)).to(device)
    if compile:
        gpt.compile()
    rows += measure([(f"num_steps=(0, {r})", model, [(0, r)] * timed_steps),
                     (f"plain GPT, {n_layer} layers", gpt, [(0, 0)] * timed_steps)])
    ratio = statistics.median(a / b for a, b in zip(rows[-2]["times"], rows[-1]["times"]))
    results["train"] = dict(rows=rows, time_ratio_to_plain_gpt=ratio)
    table(f"training step and AdamW, batch {batch_size} x {block_size}, {dtype}{', compiled' if compile else ''}", rows,
          name="", ms_per_step=".0f", tokens_per_s=",.0f", gflop_per_step=".1f", mfu=".1%")
    print(f"num_steps=(0, {r}) takes {ratio:.2f}x the time of the plain GPT of {n_layer} layers (medians of pairs)")

if "memory" in chosen:  # truncated backprop keeps memory flat in num_steps; checkpointing lowers it at any depth
    rows = results["memory"] = []
    for r, k, ckpt in [(r, backprop_depth, False) for r in memory_depths] + [(8, 8, False), (8, 8, True)]:
        model = build(backprop_depth=k)
        model.activation_checkpointing = ckpt
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device_type == "cuda")
        train_step(model.train(), opt, x, y, 1)  # the optimizer state is made before: the rise is the step's own
        if device_type == "cuda":  # CUDA's max allocated, or on Linux the peak RSS, None elsewhere
            torch.cuda.reset_peak_memory_stats(device)
        elif resident_memory() is not None:  # restarted once glibc has returned freed memory
            ctypes.CDLL(None).malloc_trim(0)
            restart_peak_memory()
        before = torch.cuda.memory_allocated(device) if device_type == "cuda" else resident_memory()
        for _ in range(2):
            train_step(model, opt, x, y, r)
        peak = torch.cuda.max_memory_allocated(device) if device_type == "cuda" else resident_memory(peak=True)
        plan = training_memory(model.config, batch_size, block_size, min(r, k), ckpt, ptdtype)
        rows.append(dict(num_steps=r, backprop_depth=k, checkpointing=ckpt, peak_mib=peak and peak / 2 ** 20,
                         rise_mib=peak and (peak - before) / 2 ** 20,
                         predicted_rise_mib=(plan["activations"] + plan["gradients"]) / 2 ** 20))
    table(f"peak memory of a training step, MiB ({'max allocated' if device_type == 'cuda' else 'peak RSS'}), its rise "
          "over the memory before it, and the rise common.training_memory predicts", rows, num_steps="",
          backprop_depth="", checkpointing="", peak_mib=",.0f", rise_mib=",.0f", predicted_rise_mib=",.0f")

if "decode" in chosen:
    dmodel = build(block_size=max(block_size, prompt_len + decode_tokens)).to(ptdtype).eval()
    size = lambda *modules: sum(p.nbytes for m in modules for p in m.parameters())
    rows = results["decode"] = []
    for B, r in itertools.product(decode_batches, decode_depths):
        prompt = torch.randint(vocab_size, (B, prompt_len), device=device)
        greedy = lambda n: dmodel.generate(prompt, n, num_steps=r, top_k=1)
        greedy(2)  # warm-up
        s = statistics.median(seconds(lambda: greedy(decode_tokens)) for _ in range(timed_steps)) / decode_tokens
        read_s = (size(dmodel) + (r - 1) * size(dmodel.adapter, dmodel.core_block)) / bandwidth  # the roofline
        rows.append(dict(batch=B, num_steps=r, ms_per_token=1000 * s, tokens_per_s=B / s, roofline_fraction=read_s / s))
    table(f"greedy generate(), prompt {prompt_len} + {decode_tokens} tokens, {dtype}", rows, batch="",
          num_steps="", ms_per_token=".2f", tokens_per_s=",.0f", roofline_fraction=".1%")

if "cache" in chosen:
    cmodel = build(block_size=prompt_len + cache_tokens).to(ptdtype).eval()
    prompt, r = torch.randint(vocab_size, (1, prompt_len), device=device), decode_depths[0]

    @torch.no_grad()
    def recomputed(tokens):  # greedy decoding without a cache: the whole forward again for every new token
        for _ in range(cache_tokens):
            tokens = torch.cat([tokens, cmodel(tokens, num_steps=r)[0][:, -1:].argmax(-1)], dim=1)
    rounds = [(seconds(lambda: cmodel.generate(prompt, cache_tokens, num_steps=r, top_k=1)),
               seconds(lambda: recomputed(prompt))) for _ in range(timed_steps)]
    (cached, recompute), speedup = map(statistics.median, zip(*rounds)), statistics.median(b / a for a, b in rounds)
    results["cache"] = dict(num_steps=r, cached_s=cached, recompute_s=recompute, speedup=speedup)
    print(f"\n{cache_tokens} new tokens at num_steps={r}, batch 1: generate() {cached:.2f} s, recomputing the whole "
          f"forward per token {recompute:.2f} s (medians; the KV cache is {speedup:.1f}x faster)")

if "speculative" in chosen:  # drafts at a low depth are worth checking only on a model that has learned something
    torch.set_num_threads(1)  # a 64-wide model: a second thread only waits for the first
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py")))
    text = "".join(open(f, encoding="utf-8").read() for f in files)  # this repository's Python files
    itos = sorted(set(text))
    data, split = torch.tensor([itos.index(c) for c in text], device=device), int(0.9 * len(text))
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
        val_loss = {r: round(smodel(val[:, :-1], val[:, 1:], num_steps=r)[1].item(), 3) for r in (1, 2, 4, 8, 32)}

    def run(**kw):
        """Seconds, and the blocks of tokens streamed (one per pass at num_steps), of spec_tokens tokens at 32."""
        torch.manual_seed(seed)  # sampled runs draw the same random numbers
        blocks, prompt = [], data[None, split:split + 32]
        return seconds(lambda: smodel.generate(prompt, spec_tokens, num_steps=32, **kw, on_token=blocks.append)), blocks
    rows = []  # greedy, then sampled as sample.py samples by default
    for mode, sampling in dict(greedy=dict(top_k=1), sampled=dict(temperature=0.8, top_k=200)).items():
        plain = torch.cat(run(**sampling)[1], 1)  # a warm-up, and the tokens greedy drafts must give
        plain_s = statistics.median(run(**sampling)[0] for _ in range(3))
        for d, L in itertools.product(draft_depths, draft_lengths):
            s, blocks = run(**sampling, draft_steps=d, draft_tokens=L)
            stats = zip(("acceptance", "tokens_per_pass"), speculation_stats([b.size(1) for b in blocks], L))
            rows.append(dict(stats, sampling=mode, draft_steps=d, draft_tokens=L, tokens_per_s=spec_tokens / s,
                             plain_tokens_per_s=spec_tokens / plain_s, speedup=plain_s / s,
                             same_tokens=torch.equal(torch.cat(blocks, 1), plain) if mode == "greedy" else None))
    results["speculative"] = dict(train_s=train_s, val_loss_by_depth=val_loss, rows=rows)
    print(f"\ncharacter model, {spec_iters} steps in {train_s:.0f} s; validation loss by num_steps: {val_loss}")
    table(f"self-speculative decoding at num_steps=32, batch 1, {spec_tokens} tokens (plain: the median of 3; sampled: "
          "temperature 0.8, top_k 200)", rows, sampling="", draft_steps="", draft_tokens="", plain_tokens_per_s=".1f",
          tokens_per_s=".1f", speedup=".2f", acceptance=".1%", tokens_per_pass=".2f", same_tokens="")

if out:
    try:
        atomic_write(out, json.dumps(results, indent=1).encode())
    except WriteError as e:
        die(str(e), code=1)
    print(f"wrote {out}")
