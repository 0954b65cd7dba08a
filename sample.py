"""
Sample from a trained model at the depth you choose, or at several depths side by side.

    python sample.py --out_dir=out-demo --start=">abcdefgh" --num_steps=1,2,4,8,32
    python sample.py --out_dir=out-shakespeare-char --num_steps=4,32 --exit_threshold=1e-3
    python sample.py --out_dir=out-demo --start=">abcdefghij" --trace          # each iteration's guess
    python sample.py --init_from=huginn --huginn_dir=huginn-0125 --num_steps=4,8,32 --chat --start="Hi!"

--start is the prompt text, or FILE:path to read it from a file. After the samples, one line per depth:
tokens/s, mean and max iterations per token (they differ under --exit_threshold), and KV-cache memory.
On the shell game (a data set of rows) the answer after the prompt is the cup that holds the ball; it
is printed greedily with the true cup beside it.
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from configurator import configure, die, int_list
from model import KVCache, RecurrentGPT, read_checkpoint

defaults = dict(init_from="resume", out_dir="out", huginn_dir="", start="\n", num_samples=1, max_new_tokens=200,
                temperature=0.8, top_k=200, num_steps="", exit_threshold=None, kv_budget=None,
                warm_start=False, chat=False, trace=False, trace_plot="", trace_positions=4, seed=1337,
                device="auto", dtype="auto")


def load_model(cfg, device):
    """(model, meta, encode, decode) from out_dir's checkpoint or the released Huginn-0125 weights."""
    try:
        if cfg["init_from"] == "huginn":
            from huginn import load_huginn_tokenizer
            dtype = torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float32
            model = RecurrentGPT.from_huginn(cfg["huginn_dir"], device=device, dtype=dtype)
            enc = load_huginn_tokenizer(cfg["huginn_dir"])
            return model, {"tokenizer": "huginn"}, lambda s: enc.encode(s, allowed_special="all"), enc.decode
        checkpoint = read_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
        model = RecurrentGPT.from_checkpoint(checkpoint, device)
    except (ValueError, OSError, ImportError) as e:
        die(str(e).splitlines()[0], code=1)
    meta = checkpoint["meta"]
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


def parse_settings(cfg, model):
    """Check the sampling settings against the model; returns the list of depths."""
    depths = int_list("num_steps", cfg["num_steps"]) if cfg["num_steps"] else [model.config.mean_recurrence]
    rules = [("num_samples", cfg["num_samples"] >= 1, ">= 1"), ("max_new_tokens", cfg["max_new_tokens"] >= 1, ">= 1"),
             ("temperature", cfg["temperature"] > 0, "> 0"), ("top_k", cfg["top_k"] >= 1, ">= 1"),
             ("trace_positions", cfg["trace_positions"] >= 1, ">= 1"),
             ("exit_threshold", cfg["exit_threshold"] is None or isinstance(cfg["exit_threshold"], (int, float))
              and cfg["exit_threshold"] >= 0, "a number >= 0"),
             ("kv_budget", cfg["kv_budget"] is None or type(cfg["kv_budget"]) is int and cfg["kv_budget"] >= 1,
              "an integer >= 1")]
    for key, ok, allowed in rules:
        if not ok:
            die(f"{key} must be {allowed} (got {cfg[key]!r})")
    return depths


def read_prompt(cfg, encode, block_size):
    text = cfg["start"]
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            die(f"cannot read the prompt file {text[5:]}: {e.strerror}", code=1)
    if cfg["chat"]:  # the release's chat format (see huginn.py)
        text = "<|begin_header|>user<|end_header|>\n\n" + text + "<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n"
    if cfg["init_from"] == "huginn":
        text = "<|begin_text|>" + text  # the release's BOS begins every document
    ids = encode(text)
    if not ids:
        die("the prompt is empty: pass some text with --start")
    if len(ids) >= block_size:
        die(f"the prompt has {len(ids)} tokens but the model's block_size is {block_size}: shorten --start")
    return ids


def print_trace(model, idx, num_steps, decode, cfg, answers=None):
    """Each iteration's prediction at the last few positions: the logit lens over the recurrence."""
    logits, states = model.trace(idx, num_steps, return_states=True)
    logp = F.log_softmax(logits[:, 0].float(), dim=-1)                          # (r, T, V)
    kl_final = (logp.exp() * (logp - logp[-1])).sum(-1).clamp(min=0)           # KL(iteration i || final)
    moved = (states[1:, 0] - states[:-1, 0]).norm(dim=-1) / states[1:, 0].norm(dim=-1)
    T = idx.size(1)
    print(f"trace at num_steps={num_steps}: each iteration's latent read through ln_f, the coda and the head")
    for t in range(max(0, T - cfg["trace_positions"]), T):
        truth = f", true cup {answers[t]}" if answers and answers[t] else ""
        print(f"position {t} (token {decode([idx[0, t].item()])!r}{truth})")
        print(f"  {'iter':>4}  {'top predictions':<36} {'KL to final':>11} {'latent moved':>12}")
        for i in range(num_steps):
            p, ids = logp[i, t].exp().topk(3)
            tops = "  ".join(f"{decode([j.item()])!r} {q:.2f}" for q, j in zip(p, ids))
            move = f"{moved[i - 1, t]:>12.4f}" if i else f"{'':>12}"
            print(f"  {i + 1:>4}  {tops:<36} {kl_final[i, t]:>11.4f} {move}")
    if cfg["trace_plot"]:
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
        fig.savefig(cfg["trace_plot"], dpi=120)
        print(f"wrote {cfg['trace_plot']}")


def main(argv):
    cfg = configure(defaults, argv, usage=__doc__)
    if cfg["init_from"] not in ("resume", "huginn"):
        die(f"init_from must be 'resume' (out_dir's checkpoint) or 'huginn' (got {cfg['init_from']!r})")
    if cfg["init_from"] == "huginn" and not cfg["huginn_dir"]:
        die("--init_from=huginn needs --huginn_dir=PATH, a local copy of the release (see the README)")
    if cfg["chat"] and cfg["init_from"] != "huginn":
        die("--chat is the released Huginn-0125's chat format: use it with --init_from=huginn")
    if cfg["dtype"] not in ("auto", "bfloat16", "float32"):
        die(f"dtype must be 'auto', 'bfloat16' or 'float32' (got {cfg['dtype']!r})")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto" else cfg["device"]
    cfg["dtype"] = ("bfloat16" if device.startswith("cuda") else "float32") if cfg["dtype"] == "auto" else cfg["dtype"]
    print(f"sample: {json.dumps(cfg)}")
    torch.manual_seed(cfg["seed"])
    model, meta, encode, decode = load_model(cfg, device)
    model = model.to(getattr(torch, cfg["dtype"]))
    depths = parse_settings(cfg, model)
    ids = read_prompt(cfg, encode, model.config.block_size)
    idx = torch.tensor([ids] * cfg["num_samples"], dtype=torch.long, device=device)
    rows, answers = meta.get("layout") == "rows", None
    if rows:  # the shell game: one answer, the most likely cup, and the true one when the prompt is a game
        from prepare_data import FIRST_SWAP, START, SWAPS, play
        moves = [i - FIRST_SWAP for i in ids[1:]]
        if ids[0] == START and all(0 <= m < len(SWAPS) for m in moves):
            answers = [None] + play(moves)
        cfg.update(max_new_tokens=1, top_k=1)
    if cfg["trace"]:
        print_trace(model, idx[:1], max(depths), decode, cfg, answers)
        return
    max_new = min(cfg["max_new_tokens"], model.config.block_size - len(ids))
    if max_new < cfg["max_new_tokens"]:
        print(f"max_new_tokens lowered to {max_new} to fit block_size {model.config.block_size}")
    stats = []
    for r in depths:
        torch.manual_seed(cfg["seed"])  # every depth draws the same random numbers
        t0 = time.time()
        out, steps = model.generate(idx, max_new, num_steps=r, temperature=cfg["temperature"], top_k=cfg["top_k"],
                                    exit_threshold=cfg["exit_threshold"], kv_budget=cfg["kv_budget"],
                                    warm_start=cfg["warm_start"], return_steps=True)
        elapsed = time.time() - t0
        shape = KVCache.shape(model.config, len(idx), idx.size(1) + max_new, KVCache.n_slots_for(r, cfg["kv_budget"]))
        cache = 2 * math.prod(shape) * torch.finfo(model.wte.weight.dtype).bits // 8
        stats.append((r, out.numel() - idx.numel(), elapsed, steps.float().mean().item(), steps.max().item(), cache))
        if rows:
            truth = f" (true cup: {answers[-1]})" if answers and answers[-1] else ""
            print(f"num_steps={r:<3} answer: cup {decode(out[0, -1:].tolist())}{truth}")
            continue
        for k in range(len(out)):
            print(f"---------- num_steps={r}, sample {k + 1} ----------")
            text = decode(out[k].tolist())
            if cfg["chat"]:  # the answer ends at the turn's end
                text = text[:text.find("<|end_turn|>", len(decode(ids))) % (len(text) + 1)]
            print(text)
    print(f"{'num_steps':>9} {'tokens/s':>9} {'mean iters':>10} {'max iters':>9} {'KV cache':>10}")
    for r, n_tokens, elapsed, mean_steps, max_steps, cache in stats:
        print(f"{r:>9} {n_tokens / elapsed:>9.1f} {mean_steps:>10.2f} {max_steps:>9} {cache / 2**20:>8.2f}MB")


if __name__ == "__main__":
    main(sys.argv[1:])
