"""
Benchmark training and sampling against this machine's own limits, on CPU or CUDA:

    python bench.py                                     # every section, CPU-sized defaults (a few minutes)
    python bench.py --sections=train,memory --n_embd=512 --n_head=8 --intermediate_size=1408
    python bench.py config/bench_gpu.py                 # GPT-2-small width, bf16, torch.compile

Sections (--sections: a comma-separated choice, or "all"):
  ceilings  dense matmul FLOP/s in the training dtype (mm_size square) and memory bandwidth (a large copy)
  train     a training step (forward, backward, AdamW) at num_steps = 1, mean_recurrence, 4 * mean_recurrence
            and under the depth sampler; then the model with every iteration carrying gradients beside a
            plain pre-norm GPT of the same width and unrolled depth, their steps interleaved
  memory    peak memory of a training step at each of memory_depths (CUDA: max allocated; CPU, Linux: the
            peak RSS of a fresh process, and its rise over the RSS before the steps)
  decode    cached greedy decoding: tokens/s for decode_batches x decode_depths, and the fraction of the
            memory-bandwidth roofline (weights read per step: prelude, coda and head once, core num_steps times)
  cache     batch 1: the KV cache against recomputing the full forward per token, the time per token against
            num_steps (a fit a + b * r), and 2 * cache_tokens new tokens against cache_tokens; what is compared
            takes turns, timed_steps rounds
  compile   torch.compile of each block (not the loop) on and off, and the recompilations seen when the
            depth changes after warm-up

FLOPs are RecurrentGPT.estimate_flops: the depth actually run, the backward only for the iterations that carry
gradients. MFU is against the matmul ceiling measured beside each row (the machine may be shared) and, on
A100/H100/H200 in bfloat16, against the datasheet dense peak. Prints tables; writes every figure to `out`.
"""

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import configure, die, int_list, keep_freed_memory
from model import (CausalSelfAttention, GatedMLP, KVCache, ModelConfig, RecurrentGPT, RMSNorm, SandwichBlock,
                   precompute_rope)

# ---- settings: defaults, overridden by config files and --key=value ----
sections = "all"
out = "bench.json"           # where the JSON goes ("" = nowhere)
# model: the fields of model.ModelConfig
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
qk_bias = True
# training steps
batch_size = 8
warmup_steps = 1             # untimed steps before each measurement
timed_steps = 5              # timed steps per row (the median is reported; the mean under the sampler)
memory_depths = "4,64"
memory_subprocess = True     # CPU: measure each depth in a fresh process (peak RSS never goes down)
# decoding
decode_batches = "1,16"
decode_depths = "1,8,32"
prompt_len = 16
decode_tokens = 32
decode_cache = "auto"        # "dynamic" (model.KVCache), "static" (fixed shapes, for CUDA graphs), "auto":
                             # static when compiling on CUDA
cache_tokens = 256
cache_depths = "4,8,16,32"   # the KV cache against recomputing runs at the first
# machine ceilings
mm_size = 0                  # side of the square matmul; 0 = 2048 on CPU, 8192 on CUDA
copy_mib = 0                 # size of the copied buffer; 0 = 256 on CPU, 2048 on CUDA
# system
device = "auto"              # "auto", "cpu", "cuda", "cuda:1"
dtype = "auto"               # "auto" (bfloat16 on CUDA, float32 elsewhere), "bfloat16", "float32"
compile = False              # torch.compile each block in the train, memory and decode sections
seed = 1337

settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
config = configure(settings, usage=__doc__)
globals().update(config)

SECTIONS = ("ceilings", "train", "memory", "decode", "cache", "compile")
DATASHEET_BF16 = [("A100", 312e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                  ("H200", 989e12)]  # dense bfloat16 FLOP/s; the first name found in the GPU's name counts
CPU_MFU_TARGETS = {256: 0.60, 512: 0.75}  # issue 8: CPU, 2 cores, float32, block 256, batch 8


chosen = SECTIONS if sections == "all" else sections.split(",")
if any(s not in SECTIONS for s in chosen):
    die(f"sections must be 'all' or a comma-separated choice of {', '.join(SECTIONS)} (got {sections!r})")
for key in ("batch_size", "timed_steps", "prompt_len", "decode_tokens", "cache_tokens"):
    if config[key] < 1:
        die(f"{key} must be >= 1 (got {config[key]})")
for key in ("warmup_steps", "mm_size", "copy_mib"):
    if config[key] < 0:
        die(f"{key} must be >= 0 (got {config[key]})")
if decode_cache not in ("auto", "dynamic", "static"):
    die(f"decode_cache must be 'auto', 'dynamic' or 'static' (got {decode_cache!r})")
if dtype not in ("auto", "bfloat16", "float32"):
    die(f"dtype must be 'auto', 'bfloat16' or 'float32' (got {dtype!r})")
memory_depths, decode_batches, decode_depths, cache_depths = (
    int_list(key, config[key]) for key in ("memory_depths", "decode_batches", "decode_depths", "cache_depths"))
model_args = {f.name: config[f.name] for f in fields(ModelConfig) if f.name in config}
try:
    ModelConfig(**model_args)
except ValueError as e:
    die(str(e))

if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
device_type = "cuda" if device.startswith("cuda") else device
if device_type not in ("cuda", "cpu"):
    die(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {device!r})")
if device_type == "cuda" and not torch.cuda.is_available():
    die("device is cuda but no CUDA GPU is available: use --device=cpu")
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" else "float32"
ptdtype = getattr(torch, dtype)
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu_name = torch.cuda.get_device_name(device)
    datasheet_peak = next((p for name, p in DATASHEET_BF16 if name in gpu_name), None) if dtype == "bfloat16" else None
    machine_name = f"{gpu_name} (CUDA {torch.version.cuda})"
else:
    keep_freed_memory()  # as train.py does: without it page faults add 10-15% to a step, unevenly
    datasheet_peak = None
    cpu_model = platform.processor() or "CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_model)
    machine_name = f"{cpu_model}, {torch.get_num_threads()} threads"
mm_size = mm_size or (8192 if device_type == "cuda" else 2048)
copy_mib = copy_mib or (2048 if device_type == "cuda" else 256)
if decode_cache == "auto":
    decode_cache = "static" if compile and device_type == "cuda" else "dynamic"


# ---- measuring ----

def sync():
    if device_type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@functools.cache
def matmul_operands():
    return [torch.randn(mm_size, mm_size, device=device, dtype=ptdtype) for _ in range(3)]


def matmul_rate():
    """Dense matmul FLOP/s in the training dtype, timed once: the caller takes medians."""
    a, b, c = matmul_operands()
    reps = 20 if device_type == "cuda" else 1  # a window long enough to time

    def run():
        for _ in range(reps):
            torch.mm(a, b, out=c)
    return reps * 2 * mm_size ** 3 / seconds(run)


def copy_bandwidth(reps=5):
    """Memory bandwidth in bytes/s: a copy between two large buffers reads and writes each byte once."""
    x = torch.ones(copy_mib * 2 ** 20 // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * x.numel() * 4 / statistics.median(seconds(lambda: y.copy_(x)) for _ in range(reps))


def compile_blocks(model, mode="default"):
    """torch.compile each block, not the loop over iterations: a new depth reuses the compiled code."""
    # decoding compiles a graph per layer, iteration slot, batch size, and prompt or token: more than 8
    torch._dynamo.config.recompile_limit = 64
    for block in model.modules():
        if isinstance(block, (SandwichBlock, PreNormBlock)):
            block.compile(mode=mode)
    return model


def build(compiled=compile, **overrides):
    torch.manual_seed(seed)
    model = RecurrentGPT(ModelConfig(**(model_args | overrides))).to(device)
    return compile_blocks(model) if compiled else model


class PreNormBlock(nn.Module):
    """The plain GPT block, x = x + attn(norm(x)); x = x + mlp(norm(x)), made of model.py's parts."""

    def __init__(self, config, layer_id):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_id)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x, rope):
        x = x + self.attn(self.norm_1(x), rope)
        return x + self.mlp(self.norm_2(x))


class PlainGPT(nn.Module):
    """The yardstick: a pre-norm GPT of the model's width, heads and MLP, without qk_bias, with n_layer
    blocks and tied embeddings. n_layer = n_prelude + r * n_core + n_coda unrolls the model at depth r."""

    def __init__(self, config, n_layer):
        super().__init__()
        config = replace(config, qk_bias=False)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(PreNormBlock(config, i) for i in range(n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.register_buffer("freqs_cis", precompute_rope(config.n_embd // config.n_head, config.block_size,
                                                          config.rope_base), persistent=False)

    def forward(self, idx, targets, num_steps=None):
        rope = self.freqs_cis[:idx.size(1), None, None]  # as RecurrentGPT.rope_at
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.ln_f(x)).float()
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device_type == "cuda")


def train_step(model, optimizer, x, y, num_steps):
    with autocast:
        _, loss = model(x, y, num_steps=num_steps)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def random_batch():
    return [torch.randint(vocab_size, (batch_size, block_size), device=device) for _ in range(2)]


def measure(runs):
    """Time timed_steps training steps of each run (model, depths), alternating between the runs step by
    step so that all see the same load, each step beside a matmul probe. Returns (times, probes) per run."""
    x, y = random_batch()
    runs = [(model.train(), optimizer_for(model), depths) for model, depths in runs]
    for model, optimizer, depths in runs:
        for _ in range(warmup_steps):
            train_step(model, optimizer, x, y, depths[0])
    results = [([], []) for _ in runs]
    for i in range(timed_steps):
        for (model, optimizer, depths), (times, probes) in zip(runs, results):
            probes.append(matmul_rate())
            times.append(seconds(lambda: train_step(model, optimizer, x, y, depths[i])))
    return results


def train_row(name, depths, flops, times, probes):
    """A row of the training table: the median step at a fixed depth; the mean under the sampler."""
    step_s = statistics.median(times) if len(set(depths)) == 1 else statistics.mean(times)
    rate, ceiling = statistics.mean(flops) / step_s, statistics.median(probes)
    return dict(name=name, depths=depths, ms_per_step=1000 * step_s, tokens_per_s=batch_size * block_size / step_s,
                flops_per_step=statistics.mean(flops), flops_per_s=rate, ceiling_flops_per_s=ceiling,
                mfu=rate / ceiling, mfu_datasheet=rate / datasheet_peak if datasheet_peak else None)


def peak_memory(num_steps):
    """Peak memory of training steps at num_steps, in bytes, and its rise over the memory before them."""
    model = build()
    optimizer = optimizer_for(model)
    x, y = random_batch()
    if device_type == "cuda":
        train_step(model, optimizer, x, y, num_steps)  # the optimizer state exists from here on
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(model, optimizer, x, y, num_steps)
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:  # a peak RSS never goes down: measured in a fresh process (see peak_memory_in_fresh_process)
        before = proc_status("VmRSS")
        for _ in range(2):
            train_step(model, optimizer, x, y, num_steps)
        peak_bytes = proc_status("VmHWM")
    return dict(num_steps=num_steps, peak_bytes=peak_bytes, step_bytes=peak_bytes - before)


def proc_status(key):
    """A memory figure of this process in bytes, from /proc/self/status (Linux). VmHWM is the peak RSS of this
    address space alone: getrusage's ru_maxrss would start a child at its parent's RSS, carried across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_memory_in_fresh_process(num_steps):
    """peak_memory(num_steps) run by this script in a new process with the same settings."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--sections=memory",
                               f"--memory_depths={num_steps}", "--memory_subprocess=False", f"--out={path}"],
                              capture_output=True, text=True)
        if proc.returncode:
            die(f"measuring memory at num_steps={num_steps} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}",
                code=1)
        with open(path) as f:
            return json.load(f)["memory"][0]


class StaticKVCache(KVCache):
    """model.KVCache with shapes that stay fixed for the whole generation, so that CUDA graphs can replay
    each block: attention reads the whole preallocated length under a mask, and the write position is a
    tensor on the device, not a Python int that a compiled block would specialize on. No padding, no
    adaptive exit (the benchmark uses neither)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index = torch.zeros((), dtype=torch.long, device=self.k.device)
        for buf in (self.k, self.v, self.index):
            torch._dynamo.mark_static_address(buf)  # updated in place: CUDA graphs may keep their addresses

    def update(self, layer_id, step, k, v):
        row = layer_id if layer_id < self.n_fixed else layer_id + (step % self.n_slots) * self.n_core
        pos = self.index + torch.arange(k.size(2), device=k.device)
        self.k[row].index_copy_(2, pos, k)
        self.v[row].index_copy_(2, pos, v)
        mask = torch.arange(self.k.size(3), device=k.device) <= pos[:, None]  # causal, over the whole buffer
        return self.k[row], self.v[row], mask

    def advance(self, T, steps=None):
        super().advance(T, steps)
        self.index += T


@torch.no_grad()  # as generate(): forward_cached itself runs under inference_mode
def decode(model, prompt, n_tokens, num_steps, cache_class):
    """Greedy decoding through forward_cached: generate()'s loop without the sampling. Returns the new
    tokens, the last logits, and the seconds of the prompt and of the n_tokens steps after it."""
    B, T = prompt.shape
    cache = kv_cache(model, cache_class, B, num_steps, T + n_tokens)
    cache.pos = 0  # start over: each entry is written again before anything reads it
    if cache_class is StaticKVCache:
        cache.index.zero_()
    graphs = device_type == "cuda" and cache_class is StaticKVCache

    def forward(idx):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new token: the last one's graph outputs may be reused
        return model.forward_cached(idx, cache, num_steps)[0]

    new = torch.zeros(B, n_tokens, dtype=torch.long, device=device)
    sync()
    t0 = time.perf_counter()
    logits = forward(prompt)
    sync()
    t1 = time.perf_counter()
    for t in range(n_tokens):
        new[:, t] = logits.argmax(-1)
        logits = forward(new[:, t:t + 1])
    sync()
    return new, logits, t1 - t0, time.perf_counter() - t1


@functools.cache
def kv_cache(model, cache_class, batch_size, num_steps, max_len):
    """One cache per decoding shape, reused by every decode of that shape: CUDA graphs recorded over a static
    cache hold the addresses of its buffers."""
    return cache_class(model.config, batch_size, max_len, num_steps, device=device, dtype=model.wte.weight.dtype)


@torch.inference_mode()  # the same mode as forward_cached, so that only the cache differs
def decode_recompute(model, prompt, n_tokens, num_steps):
    """Greedy decoding without a cache: the full forward over the whole sequence for every new token."""
    idx = prompt
    for _ in range(n_tokens):
        logits, _ = model(idx, num_steps=num_steps)
        idx = torch.cat([idx, logits[:, -1:].argmax(-1)], dim=1)
    return idx[:, prompt.size(1):]


def weight_bytes(model, num_steps):
    """Bytes of weights one decoding step reads: prelude, coda, ln_f and the head (the embedding) once, the
    adapter and the core blocks num_steps times. The KV cache and activations are not counted."""
    size = lambda *modules: sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return size(model.prelude, model.coda, model.ln_f, model.wte) + num_steps * size(model.adapter, model.core_block)


def decode_model():
    """The model for the decode and cache sections: weights in the training dtype, a context that fits."""
    longest = prompt_len + max(decode_tokens, 2 * cache_tokens)
    return build(compiled=False, block_size=max(block_size, longest)).to(ptdtype).eval()


def zero_state_logits(model, cache_class):
    """The logits after a short greedy decode from the zero initial state: what two caches must agree on."""
    state_init, model.config.state_init = model.config.state_init, "zero"
    torch.manual_seed(seed)
    prompt = torch.randint(vocab_size, (2, prompt_len), device=device)
    logits = decode(model, prompt, 4, 2, cache_class)[1]  # two iteration slots, little room for rounding to grow
    model.config.state_init = state_init
    return logits


def counter(group, name):
    """A torch.compile counter: counter("frames", "total") counts compilations, recompilations included."""
    return torch._dynamo.utils.counters[group][name]


def fmt_flops(x):
    return f"{x / 1e12:.1f} T" if x >= 1e12 else f"{x / 1e9:.1f} G"


def fmt_pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))


targets = []


def target(what, value, goal, met):
    """Record a target of the issues; met is None where this run cannot tell (another device or config)."""
    targets.append(dict(what=what, value=value, target=goal, met=met))


# ---- the run ----
results = dict(machine=dict(name=machine_name, device=device, dtype=dtype, torch=torch.__version__,
                            threads=torch.get_num_threads(), loadavg_start=os.getloadavg()),
               settings=config, sections=list(chosen))
print(f"bench: {results['machine']['name']}, {dtype}, torch {torch.__version__}, "
      f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
print(f"model: {json.dumps(model_args)}; batch {batch_size} x {block_size} tokens")
unit = 1e12 if device_type == "cuda" else 1e9
bandwidth = None

if "ceilings" in chosen or "decode" in chosen:
    matmul_rate()  # warm-up
    rates = [matmul_rate() for _ in range(5)]
    bandwidth = copy_bandwidth()
    results["ceilings"] = dict(matmul_size=mm_size, matmul_flops_per_s=statistics.median(rates),
                               matmul_samples=rates, copy_mib=copy_mib, bandwidth_bytes_per_s=bandwidth,
                               datasheet_flops_per_s=datasheet_peak)
    table("machine ceilings (medians)", ["what", "measured", "datasheet"],
          [[f"matmul {mm_size}^2 {dtype}", fmt_flops(statistics.median(rates)) + "FLOP/s",
            fmt_flops(datasheet_peak) + "FLOP/s" if datasheet_peak else "-"],
           [f"copy {copy_mib} MiB", f"{bandwidth / 1e9:.1f} GB/s", "-"]])

if "train" in chosen:
    model = build()
    flops = lambda d: model.estimate_flops(batch_size, block_size, *d)
    rows = []
    r = mean_recurrence
    for name, num_steps in (("num_steps=1", 1), (f"num_steps={r}", r), (f"num_steps={4 * r}", 4 * r)):
        depths = [model.split_num_steps(num_steps)] * timed_steps
        [(times, probes)] = measure([(model, depths)])
        rows.append(train_row(name, depths, [flops(d) for d in depths], times, probes))
    generator = torch.Generator().manual_seed(seed)
    depths = [model.sample_num_steps(generator) for _ in range(timed_steps)]
    [(times, probes)] = measure([(model, depths)])
    rows.append(train_row(f"sampler (r = {', '.join(str(sum(d)) for d in depths)})", depths,
                          [flops(d) for d in depths], times, probes))
    # issue 4: every iteration carrying gradients, against a plain GPT of the same unrolled depth
    n_layer = n_prelude + r * n_core + n_coda
    gpt = PlainGPT(model.config, n_layer).to(device)
    gpt = compile_blocks(gpt) if compile else gpt
    all_grad = [(0, r)] * timed_steps
    [(t_rec, p_rec), (t_gpt, p_gpt)] = measure([(model, all_grad), (gpt, all_grad)])
    adapters = 3 * r * 4 * batch_size * block_size * n_embd ** 2  # the r adapters (2d -> d), forward and backward
    rows.append(train_row(f"num_steps=(0, {r})", all_grad, [flops((0, r))], t_rec, p_rec))
    rows.append(train_row(f"plain GPT, {n_layer} layers", all_grad, [flops((0, r)) - adapters], t_gpt, p_gpt))
    ratio = statistics.median(a / b for a, b in zip(t_rec, t_gpt))  # steps side by side: robust to bursts of load
    results["train"] = dict(rows=rows, time_ratio_to_plain_gpt=ratio)
    table(f"training step (forward, backward, AdamW), batch {batch_size} x {block_size}, {dtype}"
          + (", compiled blocks" if compile else ""),
          ["depth", "n_no_grad+n_grad", "ms/step", "tokens/s", "GFLOP/step",
           "TFLOP/s" if unit == 1e12 else "GFLOP/s", "ceiling", "MFU", "MFU datasheet"],
          [[row["name"], ",".join(f"{a}+{b}" for a, b in dict.fromkeys(map(tuple, row["depths"]))),
            f"{row['ms_per_step']:.0f}", f"{row['tokens_per_s']:,.0f}", f"{row['flops_per_step'] / 1e9:.1f}",
            f"{row['flops_per_s'] / unit:.1f}", fmt_flops(row["ceiling_flops_per_s"]), fmt_pct(row["mfu"]),
            fmt_pct(row["mfu_datasheet"])] for row in rows])
    print(f"num_steps=(0, {r}) takes {ratio:.2f}x the time of the plain GPT (issue 4 target: <= 1.15)")
    target(f"issue 4: step at num_steps=(0, {r}) / plain GPT of {n_layer} layers", round(ratio, 3), "<= 1.15",
           ratio <= 1.15)
    headline = rows[1]  # num_steps = mean_recurrence
    if device_type == "cpu" and dtype == "float32" and n_embd in CPU_MFU_TARGETS:
        goal = CPU_MFU_TARGETS[n_embd]
        target(f"issue 8: CPU training MFU at n_embd={n_embd}, num_steps={r}", round(headline["mfu"], 3),
               f">= {goal}", headline["mfu"] >= goal if (batch_size, block_size) == (8, 256) else None)
    if datasheet_peak:
        target(f"issue 8: GPU training MFU vs datasheet, num_steps={r}", round(headline["mfu_datasheet"], 3),
               ">= 0.45", headline["mfu_datasheet"] >= 0.45)

if "memory" in chosen:
    fresh = device_type == "cpu" and memory_subprocess
    rows = [peak_memory_in_fresh_process(r) if fresh else peak_memory(r) for r in memory_depths]
    results["memory"] = rows
    how = "torch.cuda.max_memory_allocated" if device_type == "cuda" else "peak RSS (VmHWM), a fresh process each"
    table(f"peak memory of a training step, backprop_depth={backprop_depth} ({how})",
          ["num_steps", "peak MiB", "rise during the steps MiB"],
          [[row["num_steps"], f"{row['peak_bytes'] / 2 ** 20:.0f}", f"{row['step_bytes'] / 2 ** 20:.0f}"]
           for row in rows])
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        for key, what in (("peak_bytes", "peak"), ("step_bytes", "rise during the steps")):
            ratio = last[key] / first[key]
            target(f"issue 8: {what} at num_steps={last['num_steps']} / num_steps={first['num_steps']}",
                   round(ratio, 3), "<= 1.10", ratio <= 1.10)

if "decode" in chosen:
    dmodel = decode_model()
    cache_class = StaticKVCache if decode_cache == "static" else KVCache
    expected = zero_state_logits(dmodel, KVCache) if decode_cache == "static" else None  # before compiling
    if compile:  # CUDA graphs need the static cache; on CPU reduce-overhead would be plain compilation
        compile_blocks(dmodel, mode="reduce-overhead" if device_type == "cuda" else "default")
    static_error = None
    if expected is not None:  # the static cache must decode what model.KVCache decodes
        got = zero_state_logits(dmodel, StaticKVCache)
        static_error = ((got - expected).abs().max() / expected.abs().max()).item()
        if static_error > (5e-2 if dtype == "bfloat16" else 1e-4):
            print(f"warning: the static KV cache decodes {static_error:.2g} (relative) away from model.KVCache: "
                  "its figures are suspect")
    rows, recompiles = [], 0
    for B in decode_batches:
        for r in decode_depths:
            prompt = torch.randint(vocab_size, (B, prompt_len), device=device)
            decode(dmodel, prompt, 3, r, cache_class)  # warm-up: compilation, CUDA graphs recorded
            frames = counter("frames", "total") if compile else 0
            step_s = statistics.median(decode(dmodel, prompt, decode_tokens, r, cache_class)[3]
                                       for _ in range(timed_steps)) / decode_tokens
            recompiles += counter("frames", "total") - frames if compile else 0
            roofline = B * bandwidth / weight_bytes(dmodel, r)
            rows.append(dict(batch=B, num_steps=r, ms_per_step=1000 * step_s, tokens_per_s=B / step_s,
                             weight_bytes_per_step=weight_bytes(dmodel, r), roofline_tokens_per_s=roofline,
                             roofline_fraction=B / step_s / roofline))
    results["decode"] = dict(cache=decode_cache, compiled=compile, rows=rows, recompiles_while_timed=recompiles,
                             cudagraph_skips=counter("inductor", "cudagraph_skips") if compile else None,
                             static_cache_error=static_error)
    table(f"cached greedy decoding, prompt {prompt_len} + {decode_tokens} tokens, {decode_cache} cache"
          + (", compiled blocks" if compile else ""),
          ["batch", "num_steps", "ms/step", "tokens/s", "weights MiB/step", "roofline tokens/s", "of roofline"],
          [[row["batch"], row["num_steps"], f"{row['ms_per_step']:.2f}", f"{row['tokens_per_s']:,.0f}",
            f"{row['weight_bytes_per_step'] / 2 ** 20:.1f}", f"{row['roofline_tokens_per_s']:,.0f}",
            fmt_pct(row["roofline_fraction"])] for row in rows])
    if compile:
        print(f"recompilations while timed: {recompiles}" + (f"; CUDA graphs skipped: "
              f"{counter('inductor', 'cudagraph_skips')}" if device_type == "cuda" else ""))
    for row in rows:
        if (row["batch"], row["num_steps"]) == (1, 8):
            target("issue 8: decoding batch 1, num_steps=8, fraction of the bandwidth roofline (a CUDA target)",
                   round(row["roofline_fraction"], 3), ">= 0.30",
                   row["roofline_fraction"] >= 0.30 if device_type == "cuda" else None)

if "cache" in chosen:  # eager with model.KVCache everywhere: recomputing meets a new shape every token
    cmodel = decode_model()
    prompt = torch.randint(vocab_size, (1, prompt_len), device=device)
    r0 = cache_depths[0]
    decode(cmodel, prompt, 2, r0, KVCache)  # warm-up
    # recomputing, the cache, and the cache for twice the tokens, taking turns so that all see the same load;
    # the ratios are the medians of the rounds' ratios
    rounds = [[seconds(lambda: decode_recompute(cmodel, prompt, cache_tokens, r0)),
               *(sum(decode(cmodel, prompt, n, r0, KVCache)[2:]) for n in (cache_tokens, 2 * cache_tokens))]
              for _ in range(timed_steps)]
    recompute, cached, longer = map(statistics.median, zip(*rounds))
    speedup = statistics.median(a / b for a, b, _ in rounds)
    growth = statistics.median(c / b for _, b, c in rounds)
    per_round = [[decode(cmodel, prompt, cache_tokens, r, KVCache)[3] / cache_tokens for r in cache_depths]
                 for _ in range(timed_steps)]  # the depths take turns too
    per_token = list(map(statistics.median, zip(*per_round)))
    mean_r, mean_t = statistics.mean(cache_depths), statistics.mean(per_token)
    b = (sum((r - mean_r) * (t - mean_t) for r, t in zip(cache_depths, per_token))
         / sum((r - mean_r) ** 2 for r in cache_depths)) if len(cache_depths) > 1 else 0.0
    a = mean_t - b * mean_r
    deviations = [(t - (a + b * r)) / (a + b * r) for r, t in zip(cache_depths, per_token)]
    results["cache"] = dict(num_steps=r0, new_tokens=cache_tokens, cached_s=cached,
                            recompute_s=recompute, speedup=speedup, depths=cache_depths, ms_per_token=[
                                1000 * t for t in per_token], fit_ms=[1000 * a, 1000 * b], deviations=deviations,
                            double_tokens_s=longer, double_tokens_ratio=growth)
    table(f"KV cache (model.KVCache, eager) against recomputing the whole forward, batch 1, prompt {prompt_len}",
          ["what", "figure", "target (issue 6)"],
          [[f"{cache_tokens} tokens at num_steps={r0}: recompute / cached",
            f"{recompute:.2f} s / {cached:.2f} s (medians); median ratio {speedup:.1f}x", ">= 5x"],
           *[[f"ms/token at num_steps={r}", f"{1000 * t:.2f} (fit {1000 * (a + b * r):.2f}, {100 * dev:+.1f}%)",
              "within 10% of a + b r"] for r, t, dev in zip(cache_depths, per_token, deviations)],
           [f"{2 * cache_tokens} tokens / {cache_tokens} tokens at num_steps={r0}", f"{growth:.2f}x", "<= 2.2x"]])
    target(f"issue 6: KV cache speedup over recomputing, {cache_tokens} tokens", round(speedup, 2), ">= 5",
           speedup >= 5)
    target("issue 6: largest deviation of ms/token from a + b num_steps", round(max(map(abs, deviations)), 3),
           "<= 0.10", max(map(abs, deviations)) <= 0.10)
    target(f"issue 6: time of {2 * cache_tokens} tokens / {cache_tokens} tokens", round(growth, 3), "<= 2.2",
           growth <= 2.2)

if "compile" in chosen:
    torch._dynamo.reset()
    eager, compiled = build(compiled=False), build(compiled=True)
    x, y = random_batch()
    warm = (1, backprop_depth)  # one step runs the blocks with and without gradients: both get compiled
    compile_s = seconds(lambda: train_step(compiled.train(), optimizer_for(compiled), x, y, warm))
    frames, graphs = counter("frames", "total"), counter("stats", "unique_graphs")
    generator = torch.Generator().manual_seed(seed + 1)
    depths = [compiled.split_num_steps(4 * mean_recurrence)] + [compiled.sample_num_steps(generator)
                                                                 for _ in range(timed_steps - 1)]
    [(t_eager, p_eager), (t_comp, p_comp)] = measure([(eager, depths), (compiled, depths)])
    recompiles = counter("frames", "total") - frames
    flops = [eager.estimate_flops(batch_size, block_size, *d) for d in depths]
    rows = [train_row("eager", depths, flops, t_eager, p_eager), train_row("compiled", depths, flops, t_comp, p_comp)]
    speedup = statistics.median(a / b for a, b in zip(t_eager, t_comp))
    results["compile"] = dict(compile_s=compile_s, rows=rows, speedup=speedup, recompiles_after_warmup=recompiles,
                              new_graphs_after_warmup=counter("stats", "unique_graphs") - graphs)
    table(f"torch.compile of each block, training at r = {', '.join(str(sum(d)) for d in depths)} after a "
          f"warm-up at {warm}", ["blocks", "ms/step", "tokens/s", "MFU", "MFU datasheet"],
          [[row["name"], f"{row['ms_per_step']:.0f}", f"{row['tokens_per_s']:,.0f}", fmt_pct(row["mfu"]),
            fmt_pct(row["mfu_datasheet"])] for row in rows])
    print(f"compiled steps {speedup:.2f}x faster; first compiled step {compile_s:.1f} s (compilation; the inductor "
          f"cache makes later runs faster); recompilations after warm-up while the depth changed: {recompiles}")
    target("issue 8: recompilations when the depth changes, after warm-up", recompiles, "0", recompiles == 0)
    if device_type == "cuda":  # decoding: CUDA graphs over the static cache against eager
        torch._dynamo.reset()
        eager_d, graphed = decode_model(), compile_blocks(decode_model(), mode="reduce-overhead")
        prompt = torch.randint(vocab_size, (1, prompt_len), device=device)
        rates = {}
        for name, m, cls in (("eager", eager_d, KVCache), ("compiled, CUDA graphs", graphed, StaticKVCache)):
            decode(m, prompt, 4, mean_recurrence, cls)  # warm-up: compilation and graph recording
            rates[name] = decode_tokens / statistics.median(decode(m, prompt, decode_tokens, mean_recurrence, cls)[3]
                                                            for _ in range(timed_steps))
        results["compile"]["decode_tokens_per_s"] = rates
        results["compile"]["cudagraph_skips"] = counter("inductor", "cudagraph_skips")
        print(f"decoding batch 1, num_steps={mean_recurrence}: "
              + ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in rates.items())
              + f"; CUDA graph skips: {counter('inductor', 'cudagraph_skips')}")

results["machine"]["loadavg_end"] = os.getloadavg()
results["targets"] = targets
if targets:
    table("targets", ["what", "value", "target", "met"],
          [[t["what"], t["value"], t["target"], {True: "yes", False: "NO", None: "n/a here"}[t["met"]]]
           for t in targets])
print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
if out:
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
