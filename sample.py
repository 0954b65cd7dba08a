"""
Sample from a trained model at the depth you choose, or at several depths, one after another.

    python sample.py --out_dir=out-demo --start=">abcdefgh" --num_steps=1,2,4,8,32
    python sample.py --out_dir=out-shakespeare-char --num_steps=4,32 --exit_threshold=1e-3
    python sample.py --out_dir=out-demo --start=">abcdefghij" --trace          # each iteration's guess
    python sample.py --init_from=huginn --huginn_dir=huginn-0125 --num_steps=4,8,32 --chat --start="Hi!"
    python sample.py --out_dir=out-shakespeare-char --num_steps=32 --draft_steps=4 --draft_tokens=4

--start is the prompt text, or FILE:path to read it from a file. One prompt at one depth streams its
tokens as they come. After the samples, one line per depth: tokens/s, mean and max iterations per token
(they differ under --exit_threshold), KV-cache memory, and with --draft_steps (self-speculative decoding)
the share of drafts accepted and the tokens each pass at num_steps gave. On the shell game (a data set of
rows) the answer after the prompt is the cup that holds the ball; it is printed greedily with the true cup
beside it.
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from common import (WriteError, atomic_write, check_settings, configure, die, int_list, load_model, pick_dtype,
                    setup_device, speculation_stats)
from model import KVCache, RecurrentGPT, check_sampling

# ---- settings: defaults, overridden by config files and --key=value ----
init_from = "resume"         # "resume" (out_dir's checkpoint) or "huginn" (the release in huginn_dir)
out_dir = "out"
huginn_dir = ""
start = "\n"                 # the prompt, or FILE:path
num_samples = 1
max_new_tokens = 200
temperature = 0.8
top_k = 200
top_p = None                 # nucleus sampling: the fewest most likely tokens whose probabilities reach it
min_p = None                 # only tokens at least min_p times as likely as the most likely
num_steps = ""               # depths, e.g. "4" or "1,4,32"; "" = the model's mean_recurrence
exit_threshold = None        # adaptive exit: KL between successive iterations, e.g. 1e-3
kv_budget = None             # KV-cache sharing: at most this many iteration slots
warm_start = False           # start each token from the previous token's final state
draft_steps = None           # self-speculative decoding: draft at this depth, verify at num_steps
draft_tokens = None          # ... this many tokens per verification pass
chat = False                 # wrap --start in the release's chat format (init_from=huginn)
trace = False                # print each iteration's prediction instead of sampling (the logit lens)
trace_plot = ""              # with --trace: also draw it into this PNG file (needs matplotlib)
trace_positions = 4          # with --trace: the last positions shown
seed = 1337
device = "auto"              # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", "mps"
dtype = "auto"               # "auto" (bfloat16 on CUDA, float32 elsewhere), "bfloat16", "float32"
config, _ = configure(globals())


def load():
    """(model, meta, encode, decode) from out_dir's checkpoint or the released Huginn-0125 weights."""
    try:
        if init_from == "huginn":
            model, meta = RecurrentGPT.from_huginn(huginn_dir, device=device, dtype=getattr(torch, dtype)), {}
        else:
            model, checkpoint = load_model(out_dir, device)
            meta = checkpoint["meta"]
        if init_from == "huginn" or meta["tokenizer"] == "huginn":  # the release, or a model trained on its tokens
            from huginn import load_huginn_tokenizer
            source = huginn_dir or meta.get("huginn_dir")  # the flag, else the release the data set was made with
            if not os.path.isdir(source or ""):
                die(f"the release's tokenizer is not at {source!r}: point --huginn_dir at your copy of the release",
                    code=1)
            enc = load_huginn_tokenizer(source)
            return model, dict(meta, tokenizer="huginn"), lambda s: enc.encode(s, allowed_special="all"), enc.decode
    except (ValueError, OSError, ImportError) as e:
        die(str(e).splitlines()[0], code=1)
    if meta["tokenizer"] == "char":
        stoi = {c: i for i, c in enumerate(meta["itos"])}

        def encode(text):
            missing = sorted(set(text) - stoi.keys())
            if missing:
                die(f"--start has characters outside this model's vocabulary {missing}: it knows "
                    f"{''.join(meta['itos'])!r}")
            return [stoi[c] for c in text]
        return model, meta, encode, lambda ids: "".join(meta["itos"][i] for i in ids)
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        die(f"tiktoken could not load the GPT-2 BPE ({e.__class__.__name__}): run once online so it is cached", code=1)
    return model, meta, lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}), enc.decode


def read_prompt(encode, block_size, huginn):
    text = start
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            die(f"cannot read the prompt file {text[5:]}: {e.strerror}", code=1)
    if chat or huginn:  # the release's chat format, or its BOS, which begins every document
        from huginn import chat_prompt
        text = chat_prompt(text) if chat else "<|begin_text|>" + text
    ids = encode(text)
    if not ids:
        die("the prompt is empty: pass some text with --start")
    if len(ids) >= block_size:
        die(f"the prompt has {len(ids)} tokens but the model's block_size is {block_size}: shorten --start")
    return ids


def print_trace(model, idx, num_steps, decode, answers=None):
    """Each iteration's prediction at the last few positions: the logit lens over the recurrence."""
    logits, states = (torch.stack(t) for t in zip(*model.trace(idx, num_steps)))
    logp = F.log_softmax(logits[:, 0].float(), dim=-1)                          # (r, T, V)
    kl_final = (logp.exp() * (logp - logp[-1])).sum(-1).clamp(min=0)           # KL(iteration i || final)
    moved = (states[1:, 0] - states[:-1, 0]).norm(dim=-1) / states[1:, 0].norm(dim=-1)
    T = idx.size(1)
    print(f"trace at num_steps={num_steps}: each iteration's latent read through ln_f, the coda and the head")
    for t in range(max(0, T - trace_positions), T):
        truth = f", true cup {answers[t]}" if answers and answers[t] else ""
        print(f"position {t} (token {decode([idx[0, t].item()])!r}{truth})")
        print(f"  {'iter':>4}  {'top predictions':<36} {'KL-to-final':>11}  {'latent-change':>13}")
        for i in range(num_steps):
            p, ids = logp[i, t].exp().topk(3)
            tops = "  ".join(f"{decode([j.item()])!r} {q:.2f}" for q, j in zip(p, ids))
            move = f"{moved[i - 1, t]:>13.4f}" if i else ""
            print(f"  {i + 1:>4}  {tops:<36} {kl_final[i, t]:>11.4f}  {move}".rstrip())
    if trace_plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            die("--trace_plot needs matplotlib: pip install matplotlib", code=1)
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * T + 2), 4))
        im = ax.imshow(kl_final.clamp(min=1e-6).log10().numpy(), aspect="auto", origin="lower", cmap="viridis",
                       extent=(-0.5, T - 0.5, 0.5, num_steps + 0.5))
        ax.set_xticks(range(T), [decode([i]) for i in idx[0].tolist()])
        ax.set_xlabel("token")
        ax.set_ylabel("iteration")
        ax.set_title("log10 KL(iteration || final) per token")
        fig.colorbar(im)
        fig.tight_layout()
        try:
            atomic_write(trace_plot, lambda f: fig.savefig(f, format="png", dpi=120))
        except WriteError as e:
            die(str(e), code=1)
        print(f"wrote {trace_plot}")


def end_of_turn(text, start=0):
    """In a chat, the text up to the first <|end_turn|> after start (Huginn's answer ends there)."""
    end = text.find("<|end_turn|>", start) if chat else -1
    return text if end < 0 else text[:end]


class Stream:
    """Prints one sample's text as its tokens arrive, up to the end of the turn in a chat (a BPE token may end
    inside a character: text is printed once it decodes whole)."""

    def __init__(self, decode, prompt):
        self.decode, self.ids, self.shown = decode, [], 0
        print(decode(prompt), end="", flush=True)

    def __call__(self, tokens):
        self.ids += tokens[0].tolist()
        text = end_of_turn(self.decode(self.ids))
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)


# every flag is checked before the model loads: a mistake must not wait for a 7 GB load
if init_from not in ("resume", "huginn"):
    die(f"init_from must be 'resume' (out_dir's checkpoint) or 'huginn' (got {init_from!r})")
if init_from == "huginn" and not huginn_dir:
    die("--init_from=huginn needs --huginn_dir=PATH, a local copy of the release (see the README)")
check_settings(config, [("num_samples", num_samples >= 1, ">= 1"), ("trace_positions", trace_positions >= 1, ">= 1")])
depths = int_list("num_steps", num_steps) if num_steps else []
try:
    for r in depths or [1]:
        check_sampling(r, max_new_tokens, temperature, top_k, top_p, min_p, exit_threshold, kv_budget, warm_start,
                       draft_steps, draft_tokens)
except ValueError as e:
    die(str(e))
device, device_type = setup_device(device)
dtype = pick_dtype(dtype, device_type)
print(f"sample: {json.dumps(config)}")
torch.manual_seed(seed)
model, meta, encode, decode = load()
if chat and meta["tokenizer"] != "huginn":
    die("--chat is the released Huginn-0125's chat format: use it with --init_from=huginn or a model fine-tuned from it")
rope = model.rope_table
model = model.to(getattr(torch, dtype))
model.rope_table = rope  # float32 as under training's autocast: bfloat16 would round the angles
depths = depths or [model.config.mean_recurrence]
ids = read_prompt(encode, model.config.block_size, meta["tokenizer"] == "huginn")
idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
rows, answers = meta.get("layout") == "rows", None
if rows:  # the shell game: one answer, the most likely cup, and the true one when the prompt is a game
    from prepare_data import FIRST_SWAP, START, SWAPS, play
    moves = [i - FIRST_SWAP for i in ids[1:]]
    if ids[0] == START and all(0 <= m < len(SWAPS) for m in moves):
        answers = [None] + play(moves)
    max_new_tokens, top_k = 1, 1
if trace:
    print_trace(model, idx[:1], max(depths), decode, answers)
    sys.exit(0)
max_new = min(max_new_tokens, model.config.block_size - len(ids))
if max_new < max_new_tokens:
    print(f"max_new_tokens lowered to {max_new} to fit block_size {model.config.block_size}")
stream = not rows and len(depths) == 1 and num_samples == 1
stats = []
for r in depths:
    torch.manual_seed(seed)  # every depth draws the same random numbers
    if stream:
        print(f"---------- num_steps={r}, sample 1 ----------")
    blocks, show = [], Stream(decode, ids) if stream else None

    def on_token(tokens):  # the blocks of tokens generate() decides together: one per pass at num_steps
        blocks.append(tokens.size(1))
        if show:
            show(tokens)
    t0 = time.time()
    out, steps = model.generate(idx, max_new, num_steps=r, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, exit_threshold=exit_threshold, kv_budget=kv_budget,
                                warm_start=warm_start, draft_steps=draft_steps, draft_tokens=draft_tokens,
                                return_steps=True, on_token=on_token)
    elapsed = time.time() - t0
    shape = KVCache.shape(model.config, len(idx), idx.size(1) + max_new, min(kv_budget or r, r))
    cache = 2 * math.prod(shape) * torch.finfo(model.wte.weight.dtype).bits // 8
    stats.append((r, out.numel() - idx.numel(), elapsed, steps.float().mean().item(), steps.max().item(), cache,
                  speculation_stats(blocks, draft_tokens) if draft_steps else None))
    if rows:
        truth = f" (true cup: {answers[-1]})" if answers and answers[-1] else ""
        print(f"num_steps={r:<3} answer: cup {decode(out[0, -1:].tolist())}{truth}")
        continue
    if stream:
        print()
        continue
    for k in range(len(out)):
        print(f"---------- num_steps={r}, sample {k + 1} ----------")
        print(end_of_turn(decode(out[k].tolist()), start=len(decode(ids))))
print(f"{'num_steps':>9} {'tokens/s':>9} {'mean iters':>10} {'max iters':>9} {'KV cache':>10}"
      + (f" {'accepted':>8} {'tokens/pass':>11}" if draft_steps else ""))
for r, n_tokens, elapsed, mean_steps, max_steps, cache, spec in stats:
    print(f"{r:>9} {n_tokens / elapsed:>9.1f} {mean_steps:>10.2f} {max_steps:>9} {cache / 2**20:>8.2f}MB"
          + (f" {100 * spec[0]:>7.1f}% {spec[1]:>11.2f}" if spec else ""))
