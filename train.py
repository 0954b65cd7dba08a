"""
Train a recurrent-depth model. The same loop runs on a laptop CPU, one GPU, or many GPUs and nodes:

    python prepare_data.py && python train.py config/demo.py           # CPU, the shell game
    python train.py config/demo.py --batch_size=32 --max_iters=2000    # settings from the command line
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_small.py
    python train.py --out_dir=out-demo --init_from=resume              # continue with the run's own settings
    python train.py config/finetune_huginn.py --huginn_dir=huginn-0125 --dataset=notes_huginn   # fine-tune the release
    torchrun --standalone --nproc_per_node=8 train.py config/finetune_huginn.py --fsdp ...      # sharded (FSDP2)

Every step draws one depth r from the paper's sampler (the same on every rank, from a generator seeded
by the step) and backpropagates through the last min(r, backprop_depth) iterations. All the randomness
of step i (batches, depth, initial states) is seeded from (seed, i, rank), so a resumed run repeats
exactly what the uninterrupted run would have done; it takes every setting from its checkpoint but those given
again (and the machine's: device, dtype, compile, fsdp, activation_checkpointing). Ctrl-C or SIGTERM saves at
once, without waiting for an evaluation. --dry_run prints the memory a step needs per GPU
(one process or DDP, and FSDP on 8 GPUs) and the host memory of loading, and stops.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (WriteError, atomic_write, check_settings, configure, die, int_list, keep_freed_memory,
                    model_config, pick_dtype, read_checkpoint, resident_memory, restart_peak_memory, save_checkpoint,
                    setup_device, training_memory)
from model import ModelConfig, RecurrentGPT, precompute_rope

# ---- settings: defaults, overridden by config files and --key=value ----
# I/O
out_dir = "out"
init_from = "scratch"        # "scratch", "resume" (from out_dir/ckpt.pt) or "huginn" (the release in huginn_dir)
huginn_dir = ""              # a local copy of Huginn-0125 (or of a model exported in its layout)
eval_interval = 250          # evaluate and save a checkpoint every eval_interval steps
eval_iters = 20              # batches per evaluation
eval_depths = ""             # depths at which to report val loss, e.g. "1,4,16"; "" = 1, 4, mean, 2*mean
log_interval = 10
# data
dataset = "shellgame"        # data/<dataset>/, written by prepare_data.py
batch_size = 64              # per rank and micro-step
block_size = 256             # context length (for a rows data set: at least the row length)
gradient_accumulation_steps = 1  # in total over all ranks (as nanoGPT)
# model: the fields of model.ModelConfig, with its defaults (vocab_size comes from the data set's meta.json). Resuming
# or fine-tuning takes the shape from the checkpoint or the release; mean_recurrence, backprop_depth and state_init
# given here (in a config file or a flag) apply.
n_embd = 256
n_head = 4
intermediate_size = 704
n_prelude = 1
n_core = 2
n_coda = 1
mean_recurrence = 8
backprop_depth = 4
qk_bias = True
rope_base = 50000.0
norm_eps = 1e-6
state_init = "like-init"
pos_encoding = "rope"        # "rope" (rotary, the release's), "alibi" (a learned bias on distance) or "none"
random_depth = True          # False: every step runs mean_recurrence iterations (a fixed-depth model)
# AdamW, warmup then cosine decay
learning_rate = 1e-3
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # 0 = off
warmup_iters = 100
lr_decay_iters = 5000
min_lr = 1e-4
nonfinite = "stop"           # on a NaN/inf loss: "stop" the run, or "skip" the step
# logging: every log line and evaluation is also a record in out_dir/metrics.jsonl (plot_metrics.py draws it)
peak_flops = 0.0             # the device's peak FLOP/s (312e12: an A100 in bf16), for MFU in metrics.jsonl; 0 = no MFU
wandb_log = False            # send the same records to Weights & Biases (pip install wandb)
wandb_project = "recurrent-gpt"
wandb_run_name = ""          # "" = wandb's own name
# system
device = "auto"              # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", "mps"
dtype = "auto"               # "auto" (bfloat16 on CUDA, float32 elsewhere), "bfloat16", "float32"
compile = False              # torch.compile each block (a new depth does not recompile)
activation_checkpointing = False  # recompute each iteration with gradients in the backward pass: less memory
fsdp = False                 # under torchrun: shard weights, gradients and AdamW states over the ranks (FSDP2)
dry_run = False              # print the memory a step needs per GPU, then stop
seed = 1337
config, given = configure(globals())

MODEL_FIELDS = [f.name for f in fields(ModelConfig) if f.name != "vocab_size"]
SHAPE = ("n_embd", "n_head", "intermediate_size", "n_prelude", "n_core", "n_coda", "qk_bias", "rope_base", "norm_eps",
         "pos_encoding")
# settings of this invocation and machine: everything else a resumed run takes from its checkpoint unless given
SESSION = ("init_from", "out_dir", "device", "dtype", "compile", "activation_checkpointing", "fsdp", "dry_run",
           "peak_flops")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
checkpoint = None
if init_from == "resume":
    try:
        checkpoint = read_checkpoint(ckpt_path)
    except ValueError as e:
        die(str(e), code=1)
    resumed = {k: v for k, v in checkpoint.get("config", {}).items() if k in config and k not in given and k not in SESSION}
    config.update(resumed)
    globals().update(resumed)
check_settings(config, [
    ("batch_size", batch_size >= 1, ">= 1"), ("block_size", block_size >= 1, ">= 1"),
    ("gradient_accumulation_steps", gradient_accumulation_steps >= 1, ">= 1"), ("max_iters", max_iters >= 1, ">= 1"),
    ("eval_interval", eval_interval >= 1, ">= 1"), ("eval_iters", eval_iters >= 1, ">= 1"),
    ("log_interval", log_interval >= 1, ">= 1"), ("learning_rate", learning_rate > 0, "> 0"),
    ("min_lr", min_lr >= 0, ">= 0"), ("warmup_iters", warmup_iters >= 0, ">= 0"),
    ("lr_decay_iters", lr_decay_iters >= 1, ">= 1"), ("weight_decay", weight_decay >= 0, ">= 0"),
    ("grad_clip", grad_clip >= 0, ">= 0"), ("beta1", 0 <= beta1 < 1, "in [0, 1)"), ("beta2", 0 <= beta2 < 1, "in [0, 1)"),
    ("init_from", init_from in ("scratch", "resume", "huginn"), "'scratch', 'resume' or 'huginn'"),
    ("nonfinite", nonfinite in ("stop", "skip"), "'stop' or 'skip'")])
model_config({k: config[k] for k in MODEL_FIELDS})
eval_depths = int_list("eval_depths", eval_depths) if eval_depths else []
if init_from == "huginn" and not huginn_dir:
    die("--init_from=huginn needs --huginn_dir=PATH, a local copy of the release (see the README)")
if init_from == "huginn":  # saved absolute: the export and a resumed run find it from any directory
    if not os.path.isdir(huginn_dir):
        die(f"--huginn_dir={huginn_dir} is not a directory: point --huginn_dir at your local copy of the release")
    huginn_dir = config["huginn_dir"] = os.path.abspath(huginn_dir)
if fsdp and "RANK" not in os.environ and not dry_run:
    die("--fsdp shards the model over processes: start train.py with torchrun (see the README)")
device, device_type = setup_device(device)
dtype = pick_dtype(dtype, device_type)

# ---- distributed setup: torchrun sets RANK; NCCL on CUDA, gloo on CPU; DDP, or FSDP with --fsdp ----
distributed = "RANK" in os.environ
rank, local_rank, world_size = 0, 0, 1
if distributed:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        die(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be a multiple of the "
            f"number of processes ({world_size})")
    gradient_accumulation_steps //= world_size
master = rank == 0
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
if device_type == "cpu":
    keep_freed_memory()

# ---- data ----
data_dir = os.path.join("data", dataset)
meta_path = os.path.join(data_dir, "meta.json")
if not os.path.isfile(meta_path):
    hint = "python prepare_data.py" if dataset == "shellgame" else "python prepare_data.py (see its --help)"
    die(f"{data_dir} has no data set (no meta.json): create it with {hint}", code=1)
with open(meta_path) as f:
    meta = json.load(f)


def split_files(split):
    """The files of one split as (path, dtype): the tokens, then for a rows data set the targets."""
    files = [(os.path.join(data_dir, f"{split}.bin"), meta["dtype"])]
    if meta["layout"] == "rows":
        files.append((os.path.join(data_dir, f"{split}_targets.bin"), meta.get("targets_dtype", "int16")))
    return files


def get_batch(split, generator):
    """A batch of inputs and targets; targets are -1 where a rows data set has no answer. A fresh memmap per
    batch, as nanoGPT: a long-lived one grows the process's memory."""
    arrays = [np.memmap(path, dtype=dt, mode="r") for path, dt in split_files(split)]
    if meta["layout"] == "rows":
        tokens, targets = (a.reshape(-1, meta["row_len"]) for a in arrays)
        ix = torch.randint(len(tokens), (batch_size,), generator=generator).numpy()
        x = torch.from_numpy(tokens[ix].astype(np.int64))
        y = torch.from_numpy(targets[ix].astype(np.int64))
    else:
        tokens = arrays[0]
        ix = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([tokens[i:i + block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if int(x.max()) >= meta["vocab_size"] or int(y.max()) >= meta["vocab_size"]:
        die(f"{data_dir} holds token id {max(int(x.max()), int(y.max()))} >= vocab_size {meta['vocab_size']} "
            "of its meta.json: rerun prepare_data.py", code=1)
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


for split in ("train", "val"):  # every file whole, checked once against meta.json
    count = meta["rows"][split] * meta["row_len"] if meta["layout"] == "rows" else meta["tokens"][split]
    for path, dt in split_files(split):
        if not os.path.isfile(path):
            die(f"{path} is missing: rerun prepare_data.py", code=1)
        expected = count * np.dtype(dt).itemsize
        if os.path.getsize(path) != expected:
            die(f"{path} has {os.path.getsize(path)} bytes, meta.json says {expected} ({count} x {dt}): "
                "truncated or written with another dtype; rerun prepare_data.py", code=1)
    if meta["layout"] == "stream" and count <= block_size:
        die(f"block_size ({block_size}) must be smaller than the {split} split of {data_dir} "
            f"({count} tokens): lower --block_size or give more text")
if meta["layout"] == "rows" and block_size < meta["row_len"]:
    die(f"block_size ({block_size}) must be >= the row length of {data_dir} ({meta['row_len']})")
if init_from == "huginn" and meta["tokenizer"] != "huginn":
    die(f"{data_dir} was tokenized with {meta['tokenizer']!r}, not the release's tokenizer: run prepare_data.py "
        "--tokenizer=huginn --huginn_dir=... on your text", code=1)

# ---- model, optimizer, checkpoint ----

def shaped_like(source, where):
    """model_args of a resumed or released model: its shape (a setting given here that contradicts it stops
    the run), with the training choices given here."""
    for key in SHAPE:
        if key in given and config[key] != source[key]:
            die(f"{key} is {config[key]!r} but {where} has {source[key]!r}: drop the setting, or use another out_dir",
                code=1)
    return source | {k: config[k] for k in ("mean_recurrence", "backprop_depth", "state_init") if k in given}


if init_from == "resume":
    model_args = shaped_like(checkpoint["model_args"], f"the checkpoint in {out_dir}")
elif init_from == "huginn":
    from huginn import huginn_config, load_huginn
    try:
        with open(os.path.join(huginn_dir, "config.json")) as f:
            release = vars(huginn_config(json.load(f)))
    except (OSError, ValueError) as e:
        die(f"{huginn_dir}: {e}", code=1)
    # fine-tuned as the release was trained: from random initial states unless state_init is given
    model_args = shaped_like(release | dict(state_init=state_init), f"{huginn_dir}/config.json")
else:
    model_args = {k: config[k] for k in MODEL_FIELDS} | dict(vocab_size=meta["vocab_size"])
mean_recurrence = model_args["mean_recurrence"]  # the model's: the release's when fine-tuning it, unless given
# the depths of the val loss at each evaluation; mean_recurrence is always one of them
val_depths = sorted(set(eval_depths or [1, 4, 2 * mean_recurrence]) | {mean_recurrence})
if meta["vocab_size"] > model_args["vocab_size"]:
    die(f"{data_dir} has a vocabulary of {meta['vocab_size']}, the model one of {model_args['vocab_size']}: use a data "
        "set made with the model's tokenizer, or another out_dir", code=1)
if block_size > model_args["block_size"]:
    die(f"block_size ({block_size}) must be <= the model's block_size ({model_args['block_size']})")
if dry_run:  # the memory of a step, from the model's shape alone (on the meta device): no weights are loaded
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    plan = [training_memory(ModelConfig(**model_args), batch_size, block_size, model_args["backprop_depth"], ckpt,
                            compute) for ckpt in (False, True)]
    d, h, V = model_args["n_embd"], model_args["intermediate_size"], model_args["vocab_size"]
    block, rest = 4 * d * d + 3 * d * h, V * d + 2 * d * d  # parameters of a block, and of the rest (wte, adapter)
    # FSDP gathers the rest and two blocks (the one computed, the next) in the compute dtype, and holds a block's
    # gradients in it and in float32 before reducing them
    gathered = compute.itemsize * (rest + 3 * block) + 4 * block
    unit, scale = ("GiB", 2 ** 30) if sum(plan[0].values()) >= 2 ** 30 else ("MiB", 2 ** 20)
    print(f"memory per GPU in {unit}: batch {batch_size} x {block_size} tokens, backprop_depth "
          f"{model_args['backprop_depth']}, {dtype} compute, float32 weights and AdamW; activations and total "
          "without / with --activation_checkpointing")
    print(f"{'':<22}{'weights':>9}{'grads':>9}{'AdamW':>9}{'gathered':>9}{'activations':>18}{'total':>18}")
    for name, n in (("one process, or DDP", 1), ("FSDP on 8 GPUs", 8)):
        states = [plan[0][k] / n / scale for k in ("weights", "gradients", "optimizer")] + [(n > 1) * gathered / scale]
        acts = [p["activations"] / scale for p in plan]
        print(f"{name:<22}" + "".join(f"{v:>9.2f}" for v in states) + f"{acts[0]:>10.2f} / {acts[1]:<5.2f}"
              + f"{sum(states) + acts[0]:>10.2f} / {sum(states) + acts[1]:<5.2f}")
    # host memory of loading at rank 0 / any other rank / a node of 8 (the model section below): each process holds
    # the float32 model, plus a resumed checkpoint's mapped pages, which the node's processes share; FSDP with
    # weights to load holds one copy on the node: the mapped checkpoint, or the release as stored, on rank 0 alone
    whole = plan[0]["weights"]
    mapped = os.path.getsize(ckpt_path) if init_from == "resume" else 0
    ddp_host = fsdp_host = (whole + mapped, whole + mapped, 8 * whole + mapped)
    if init_from == "resume":
        fsdp_host = (mapped, mapped, mapped)
    elif init_from == "huginn":
        stored = sum(os.path.getsize(os.path.join(huginn_dir, f)) for f in os.listdir(huginn_dir)
                     if f.endswith(".safetensors"))
        fsdp_host = (stored, 0, stored)
    show = lambda host: " / ".join(f"{v / scale:.2f}" for v in host)
    print(f"host memory of loading in {unit}, rank 0 / any other / a node of 8: one process or DDP {show(ddp_host)}; "
          f"FSDP {show(fsdp_host)} (on a CPU, plus each rank's shards)")
    sys.exit(0)


def load_release(dtype):
    """The release in huginn_dir as a RecurrentGPT on the CPU, with the training choices given here. Under FSDP rank 0
    alone reads it (the others get None); when it cannot, every rank stops with its line."""
    model, error = None, [None]
    if master or not fsdp:
        try:
            model = load_huginn(RecurrentGPT, huginn_dir, dtype=dtype)
            model.config = ModelConfig(**model_args)
        except (OSError, ValueError, ImportError) as e:
            error = [str(e).splitlines()[0]]
    if fsdp:
        dist.broadcast_object_list(error)
    if error[0]:
        die(error[0], code=1)
    return model


torch.manual_seed(seed)  # the same initial weights on every run and rank
restart_peak_memory()  # the host memory of loading is logged below
before_loading = resident_memory()
# FSDP with weights to load builds the model on the meta device (shapes, no memory), shards it, and fills each
# rank's shards from one full copy on the node: the release as stored, read by rank 0 alone and sent tensor by
# tensor, or the checkpoint's mapped pages. Otherwise each process holds the whole float32 model (DDP needs it).
on_meta = fsdp and init_from != "scratch"
if init_from == "huginn" and not fsdp:
    model = load_release(torch.float32)
else:
    released = load_release(None) if init_from == "huginn" else None  # under FSDP: rank 0's, as stored
    with torch.device("meta") if on_meta else nullcontext():
        model = RecurrentGPT(ModelConfig(**model_args))
if not on_meta:
    model = model.to(device)
model.train()
model.activation_checkpointing = activation_checkpointing
if fsdp:  # each block its own shard group, then the rest (embedding, adapter, ln_f); PyTorch's FSDP2
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
    mesh = init_device_mesh(device_type, (world_size,))
    for block in (*model.prelude, *model.core_block, *model.coda):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if on_meta:
        model.to_empty(device=device)  # memory for this rank's shards alone (a resumed run fills them below)
    if init_from == "huginn":  # rank 0 sends each tensor, every rank keeps its shard of it in float32
        set_model_state_dict(model, released.state_dict() if master else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        released = None
# the computed RoPE table, not the release's stored one (a resumed run recomputes it); to_empty left it unset
model.rope_table = precompute_rope(model_args["n_embd"] // model_args["n_head"], model_args["block_size"],
                                   model_args["rope_base"]).to(device)
if compile:
    for block in (*model.prelude, *model.core_block, *model.coda):
        block.compile()  # the blocks, not the loop over iterations: a new depth reuses the compiled code
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
iter_num = saved_iter = 0
if checkpoint is not None:  # PyTorch's state-dict helpers: the same full checkpoint for one process, DDP and FSDP
    try:
        set_state_dict(model, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        die(f"{ckpt_path} does not fit this model ({str(e).splitlines()[0]})", code=1)
    iter_num = saved_iter = checkpoint["iter_num"]
    checkpoint = None  # free the memory
loading_memory = [(resident_memory(peak=True), before_loading)] * world_size  # this rank's, then every rank's
if distributed:
    dist.all_gather_object(loading_memory, loading_memory[0])
raw_model = model
if distributed and not fsdp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def save(iter_num):
    """Save everything a resumed run needs (every rank takes part: FSDP gathers the shards to rank 0). Weights
    that are not finite are never written; a failed write stops every rank, naming the checkpoint that is intact."""
    global saved_iter
    if fsdp or master:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, state = get_state_dict(raw_model, optimizer, options=options)
    error = None
    if master and not all(torch.isfinite(w).all() for w in weights.values()):
        log(f"not saving at iter {iter_num}: the weights are not finite")
    elif master:
        try:
            save_checkpoint(dict(model=weights, optimizer=state, model_args=model_args, config=config, meta=meta,
                                 iter_num=iter_num), ckpt_path)
            saved_iter = iter_num
        except WriteError as e:
            kept = f"the checkpoint of iter {saved_iter} is intact" if saved_iter else f"{ckpt_path} is as it was"
            error = f"{e}; {kept}. Free some space, then continue with --init_from=resume"
    if agree(error is not None):
        stop_together(error or f"rank {rank}: stopping, rank 0 could not save the checkpoint")


def agree(flag):
    """Whether flag is true on any rank (every rank calls this at the same point)."""
    if not distributed:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def stop_together(message):
    """Stop every rank where all of them decided to, each with its one line: all print before any exits
    (torchrun ends the other ranks as soon as one exits)."""
    sys.stderr.write(f"error: {message}\n")  # one write: the lines of several ranks never run together
    sys.stderr.flush()
    if distributed:
        dist.barrier()
    sys.exit(1)


def step_seed(i, stream, per_rank=True):
    """The seed of step i's draws of one kind (0: initial states, 1: batches, 2: depth): a function of
    (seed, i, rank) alone, so a resumed run draws what the uninterrupted one would have. The depth is
    drawn without the rank, so every rank runs the same depth."""
    return ((seed * 1_000_003 + i) * 8 + stream) * 1009 + (rank + 1 if per_rank else 0)


def get_lr(i):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if i < warmup_iters:
        return learning_rate * (i + 1) / (warmup_iters + 1)
    if i >= lr_decay_iters:
        return min_lr
    ratio = (i - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def evaluate(iter_num):
    """Mean loss over eval_iters fixed batches: train at mean_recurrence, val at each eval depth (every rank
    runs the same batches: FSDP needs them all). Its random draws are forked off, so evaluating never changes
    what training does next. None when a stop was requested meanwhile (on any rank): the save must not wait."""
    global stop_requested
    raw_model.eval()
    out = {}
    with torch.random.fork_rng(devices=[device] if device_type == "cuda" else []):
        for split, split_depths in (("train", [mean_recurrence]), ("val", val_depths)):
            for r in split_depths:
                g = torch.Generator().manual_seed(seed)
                torch.manual_seed(seed)
                losses = []
                for _ in range(eval_iters):
                    if agree(stop_requested):
                        stop_requested = True
                        raw_model.train()
                        return None
                    x, y = get_batch(split, g)
                    with autocast, on_out_of_memory(f"in the evaluation at iter {iter_num} ({split} loss at depth {r}, "
                                                    f"batch_size {batch_size} x block_size {block_size})",
                                                    "lower batch_size or block_size, or give fewer --eval_depths"):
                        losses.append(raw_model(x, y, num_steps=r)[1].item())
                out[(split, r)] = sum(losses) / len(losses)
    raw_model.train()
    return out


stop_requested = False


def request_stop(signum, frame):
    """Ctrl-C or SIGTERM: finish the step, save, then exit. A second Ctrl-C stops at once."""
    global stop_requested
    stop_requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)
# a progress bar on a terminal (rank 0 only); the log lines are printed through it, and stay plain in a file
progress = tqdm(total=max_iters, initial=min(iter_num, max_iters), unit="step", dynamic_ncols=True,
                disable=None if master else True)


def log(line):
    if master:
        progress.write(line, file=sys.stdout)
        sys.stdout.flush()


@contextmanager
def on_out_of_memory(what, fix):
    """Running out of memory inside stops the run with one line: what ran, and the settings that lower memory."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA's) is one, and so is the CPU allocator's error
        if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
            raise
        die(f"out of memory {what}: {fix}", code=1)


metrics_path = os.path.join(out_dir, "metrics.jsonl")
wandb_run = None


def start_metrics():
    """metrics.jsonl of a resumed run keeps its records up to the checkpoint's iter (a killed run may have written
    later ones, which this run writes again, and a line cut short); any other run starts it empty. Opens the
    Weights & Biases run with wandb_log."""
    global wandb_run
    kept = []
    if init_from == "resume" and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                try:
                    kept += [line] if json.loads(line)["iter"] <= iter_num else []
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut by a kill
    atomic_write(metrics_path, "".join(line.rstrip("\n") + "\n" for line in kept).encode())
    if wandb_log:
        try:
            import wandb
        except ImportError:
            die("wandb_log=True needs wandb: pip install wandb", code=1)
        wandb_run = wandb.init(project=wandb_project, name=wandb_run_name or None, config=config, dir=out_dir)


def record(entry):
    """One record (a dict with "iter") as a line of metrics.jsonl, and to Weights & Biases with wandb_log."""
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if wandb_run is not None:
            wandb_run.log(entry, step=entry["iter"])


def report(losses, iter_num):
    if losses is not None:  # None: the evaluation stopped for a save
        record({"iter": iter_num, **{f"{s}_loss_r{r}": v for (s, r), v in losses.items()}})
        log(f"eval iter {iter_num}: train loss {losses[('train', mean_recurrence)]:.4f} | val loss by depth: "
            + " | ".join(f"r={r}: {v:.4f}" for (s, r), v in losses.items() if s == "val"))


log(f"train: {json.dumps(config)}")
log(f"model: {raw_model.get_num_params():,} parameters, {json.dumps(model_args)}")
log(f"data: {data_dir} ({meta['layout']}, vocab {meta['vocab_size']}); device {device}, dtype {dtype}"
    + (f", {world_size} processes" + (" (FSDP)" if fsdp else " (DDP)") if distributed else ""))
if None not in loading_memory[0]:  # Linux
    peaks, rises = zip(*((peak >> 20, (peak - start) >> 20) for peak, start in loading_memory))
    log(f"loading: peak host memory{' by rank' * distributed} {', '.join(map(str, peaks))} MiB; it rose by "
        f"{', '.join(map(str, rises))} MiB while loading" + f" ({sum(rises)} in all)" * distributed)
if master:
    os.makedirs(out_dir, exist_ok=True)
    start_metrics()
if iter_num >= max_iters:
    log(f"nothing to do: the checkpoint is at iter {iter_num} and max_iters is {max_iters}; raise --max_iters")
elif iter_num == 0:
    report(evaluate(0), 0)  # the loss before any training, as nanoGPT shows it (a fine-tune starts from here)
depth_history = []
t0, t0_iter, flops = time.time(), iter_num, 0
while iter_num < max_iters and not stop_requested:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(step_seed(iter_num, 0))  # this step's initial states s_0
    batches = torch.Generator().manual_seed(step_seed(iter_num, 1))
    if random_depth:
        n_no_grad, n_grad = raw_model.sample_num_steps(torch.Generator().manual_seed(step_seed(iter_num, 2, False)))
    else:
        n_no_grad, n_grad = raw_model.split_num_steps(mean_recurrence)
    depth_history.append(n_no_grad + n_grad)
    loss_sum = torch.zeros((), device=device)
    # forward, backward and AdamW's step (the first allocates its moments) may each run out of memory
    step_memory = lambda: on_out_of_memory(f"at iter {iter_num + 1} (depth {n_no_grad + n_grad}, {n_grad} with gradients, "
                                           f"batch_size {batch_size} x block_size {block_size})", "lower "
                                           "batch_size, backprop_depth or block_size, or pass --activation_checkpointing")
    with step_memory():
        for micro in range(gradient_accumulation_steps):
            x, y = get_batch("train", batches)
            last = micro == gradient_accumulation_steps - 1  # gradients are reduced over the ranks at the last one
            if fsdp:
                model.set_requires_gradient_sync(last)
            with model.no_sync() if distributed and not fsdp and not last else nullcontext():
                with autocast:
                    _, loss = model(x, y, num_steps=(n_no_grad, n_grad))
                (loss / gradient_accumulation_steps).backward()
            loss_sum += loss.detach().float()
    # FLOPs of a rank's step at the depth run, for MFU
    flops += raw_model.estimate_flops(batch_size * gradient_accumulation_steps, x.size(1), n_no_grad, n_grad)
    # one small all-reduce: the mean loss over the ranks, and whether any rank was asked to stop
    flags = torch.stack([loss_sum / gradient_accumulation_steps, torch.tensor(float(stop_requested), device=device)])
    if distributed:
        dist.all_reduce(flags)
    loss_value, stop_requested = flags[0].item() / world_size, flags[1].item() > 0
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or math.inf)  # the reduced gradients
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not (math.isfinite(loss_value) and math.isfinite(norm)):  # the same on every rank: all skip, or all stop
        message = f"non-finite loss at iter {iter_num + 1} (depth {n_no_grad + n_grad})"
        if nonfinite == "stop":
            stop_together(f"{message}: stopping; the last checkpoint in {out_dir} is intact. Lower learning_rate, "
                          "or pass --nonfinite=skip to skip such steps")
        log(f"{message}: skipping the step")
    else:
        with step_memory():
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    progress.update()
    if iter_num % log_interval == 0 or iter_num == 1:
        dt = (time.time() - t0) / (iter_num - t0_iter)
        tokens = batch_size * x.size(1) * gradient_accumulation_steps * world_size
        progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        log(f"iter {iter_num}: loss {loss_value:.4f}, depth {n_no_grad + n_grad} ({n_grad} with grad), "
            f"lr {lr:.2e}, {dt * 1000:.1f} ms/step, {tokens / dt:,.0f} tok/s")
        flops_per_s = flops / (dt * (iter_num - t0_iter))  # achieved, from estimate_flops at the depths run
        mfu = {"mfu": flops_per_s / peak_flops} if peak_flops else {}
        record(dict(iter=iter_num, loss=loss_value, depth=n_no_grad + n_grad, n_grad=n_grad, grad_norm=norm, lr=lr,
                    tokens_per_s=tokens / dt, flops_per_s=flops_per_s, **mfu))
        t0, t0_iter, flops = time.time(), iter_num, 0
    if iter_num % eval_interval == 0 or iter_num == max_iters or stop_requested:
        if not stop_requested:  # a stop saves at once: a scheduler's grace period may be shorter than an evaluation
            report(evaluate(iter_num), iter_num)
        save(iter_num)
        if distributed:  # the ranks must agree on every depth drawn, and under DDP on the weights
            weights = None if fsdp else sum(p.detach().double().sum().item() for p in raw_model.parameters())
            digests = [None] * world_size
            dist.all_gather_object(digests, (tuple(depth_history), weights))
            if master and any(d != digests[0] for d in digests):
                die("the ranks disagree on the depths drawn or the weights", code=1)
            log(f"{'fsdp' if fsdp else 'ddp'}: {world_size} ranks agree on {len(depth_history)} depths"
                + ("" if fsdp else " and the weights"))
        t0, t0_iter, flops = time.time(), iter_num, 0
progress.close()
if wandb_run is not None:
    wandb_run.finish()
if stop_requested:
    log(f"interrupted at iter {iter_num}: " + (f"saved {ckpt_path}; continue with --init_from=resume" if saved_iter
                                               else "stopped before the first step, nothing to save"))
exit_code = 130 if stop_requested else 0  # 130: the shell's code for a run stopped by Ctrl-C
if distributed:
    dist.barrier()
    dist.destroy_process_group()
    # gloo's worker threads may still be freeing tensors while Python shuts down, which aborts the
    # process now and then (SIGABRT, a PyTorch issue): everything is saved, so skip the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
sys.exit(exit_code)
