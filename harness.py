"""
Evaluate a model of this codebase with EleutherAI's lm-evaluation-harness, as the paper reports every result,
at several depths in one call (pip install lm-eval):

    python harness.py --out_dir=out-demo --tasks=shellgame_8,shellgame_16,shellgame_32 --num_steps=1,4,8,16,32
    python harness.py --huginn_dir=huginn-0125 --tasks=hellaswag,arc_easy --num_steps=1,4,8,32
    python harness.py --huginn_dir=huginn-0125 --tasks=gsm8k_cot --num_steps=32 --num_fewshot=8 --apply_chat_template \\
        --system_instruction="You are a helpful assistant that can assist users with mathematical reasoning."

Prints one table (task x num_steps) and writes harness.json and, with matplotlib, harness.png (to out_dir, or
the working directory for the release). The tasks under tasks/ (the shell game, one task per test length) are
always included. Importing this file registers the model with lm-eval as "recurrent-gpt", for Python:

    import harness, lm_eval
    lm_eval.simple_evaluate(model="recurrent-gpt", model_args="out_dir=out-demo,num_steps=16", tasks=["arc_easy"])

model_args: out_dir= (a train.py checkpoint) or huginn_dir= (the release's layout), num_steps (default the model's
mean_recurrence), exit_threshold (adaptive exit, as generate() decides it), state_init ("zero", the default and
deterministic; "like-init" draws a random state, as the release's code does under plain lm-eval), batch_size,
device, dtype. Requests are tokenized as lm-eval's own "hf" model (HFLM) does: the context and continuation
encoded together and split where the context's ids end, no BOS added; an empty context, and the start of each
rolling window, is the BOS token (GPT-2's <|endoftext|>, the release's <|begin_text|>; a character vocabulary
has none, so its first character is context); sequences longer than block_size keep their last block_size tokens.
"""

import json
import os

import torch
import torch.nn.functional as F

from common import (WriteError, atomic_write, check_settings, configure, die, int_list, load_model, pick_dtype,
                    setup_device)
from model import KVCache, RecurrentGPT, check_sampling

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
except ImportError:
    die("harness.py needs lm-evaluation-harness: pip install lm-eval", code=1)

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
ROLES = {"system": "system", "user": "user", "assistant": "Huginn"}  # lm-eval's chat roles, as the release names them


class Tokenizer:
    """The model's tokenizer (char, GPT-2 or the release's) as HFLM uses one: encode, decode without special
    tokens, the BOS that starts a text without context (prefix, or None), and the ids that end a generation."""

    def __init__(self, meta, huginn_dir=""):
        self.name, self.prefix, self.eot, self.stop_ids, self.specials = meta["tokenizer"], None, None, set(), set()
        if self.name == "char":
            self.itos, self.stoi = meta["itos"], {c: i for i, c in enumerate(meta["itos"])}
            return
        if self.name == "gpt2":
            import tiktoken
            self.enc = tiktoken.get_encoding("gpt2")
            begin, ends = "<|endoftext|>", ["<|endoftext|>"]
        else:  # the release's: generation ends at <|end_text|> or <|end_turn|>, as its generation_config says
            from huginn import load_huginn_tokenizer
            self.enc = load_huginn_tokenizer(huginn_dir or meta["huginn_dir"])
            begin, ends = "<|begin_text|>", ["<|end_text|>", "<|end_turn|>"]
        self.prefix, self.eot = self.enc.encode_single_token(begin), self.enc.encode_single_token(ends[0])
        self.stop_ids = {self.enc.encode_single_token(s) for s in ends}
        self.specials = {self.enc.encode_single_token(s) for s in self.enc.special_tokens_set}

    def encode(self, text):
        if self.name != "char":
            return self.enc.encode(text, allowed_special="all")  # special tokens written in the text, as HF reads them
        unknown = set(text) - self.stoi.keys()
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]!r} is not in the model's character vocabulary: this task's text "
                             "cannot be written in it")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        if self.name == "char":
            return "".join(self.itos[i] for i in ids)
        return self.enc.decode([i for i in ids if i not in self.specials])


class _Done(Exception):
    """Raised from generate()'s on_token once every row has met a stop sequence."""


@register_model("recurrent-gpt")
class RecurrentLM(TemplateLM):
    """A RecurrentGPT at a fixed depth (num_steps) for lm-eval: loglikelihood, loglikelihood_rolling and
    generate_until, batched. num_steps may be changed between evaluations (harness.py evaluates several depths
    with one loaded model)."""

    def __init__(self, out_dir="", huginn_dir="", num_steps=None, exit_threshold=None, state_init="zero",
                 batch_size=16, device="auto", dtype="auto"):
        super().__init__()
        if bool(out_dir) == bool(huginn_dir):
            raise ValueError("give one of out_dir=... (a train.py checkpoint) or huginn_dir=... (the release)")
        if state_init not in ("zero", "like-init"):
            raise ValueError(f"state_init must be 'zero' or 'like-init' (got {state_init!r})")
        self._device, device_type = setup_device(device)
        compute = getattr(torch, pick_dtype(dtype, device_type))
        if huginn_dir:
            self.model = RecurrentGPT.from_huginn(huginn_dir, self._device, compute)
            self.tok = Tokenizer({"tokenizer": "huginn"}, huginn_dir)
        else:
            model, checkpoint = load_model(out_dir, self._device)
            rope = model.rope_table  # stays float32, as in training
            self.model, self.tok = model.to(compute), Tokenizer(checkpoint["meta"])
            self.model.rope_table = rope
        self.model.config.state_init = state_init
        self.num_steps = num_steps or self.model.config.mean_recurrence
        self.exit_threshold, self.batch_size = exit_threshold, int(batch_size)
        check_sampling(self.num_steps, exit_threshold=exit_threshold)

    # ---- what TemplateLM asks for ----

    @property
    def eot_token_id(self):
        return self.tok.eot

    @property
    def prefix_token_id(self):
        return self.tok.prefix

    @property
    def tokenizer_name(self):
        return self.tok.name

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs):
        return self.tok.decode(tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The release's chat format (huginn.chat_prompt for a whole history): lm-eval's --apply_chat_template."""
        if self.tok.name != "huginn":
            raise ValueError("a chat template exists only for the release's tokenizer (huginn_dir=...)")
        return ("<|begin_text|>" + "".join(f"<|begin_header|>{ROLES[m['role']]}<|end_header|>\n\n{m['content']}"
                                           "<|end_turn|>" for m in chat_history)
                + ("<|begin_header|>Huginn<|end_header|>\n\n" if add_generation_prompt else ""))

    # ---- scoring ----

    def batches(self, items, key):
        """Indices of items, longest first (by key), in batches of batch_size."""
        order = sorted(range(len(items)), key=lambda i: -key(items[i]))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """(sum of the log-probabilities of the continuation, whether it is the greedy one) per request
        ((context, continuation), context ids, continuation ids), at num_steps: a batch of right-padded rows
        in one forward (padding at the end changes nothing before it), or under adaptive exit a token at a time."""
        L, results = self.model.config.block_size, [None] * len(requests)
        rows = [(ctx + cont)[-(L + 1):] for _, ctx, cont in requests]  # HFLM's truncation: the last L inputs
        for batch in self.batches(rows, len):
            if self.exit_threshold is None:
                T = max(len(rows[i]) for i in batch) - 1
                idx = torch.zeros(len(batch), T, dtype=torch.long)
                for b, i in enumerate(batch):
                    idx[b, :len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
                logp = F.log_softmax(self.model(idx.to(self.device), num_steps=self.num_steps)[0].float(), -1).cpu()
            for b, i in enumerate(batch):
                n = len(requests[i][2])
                target = torch.tensor(rows[i][-n:])
                if self.exit_threshold is None:
                    lp = logp[b, len(rows[i]) - 1 - n:len(rows[i]) - 1]
                else:
                    lp = self.exit_logprobs(rows[i], n)
                results[i] = (lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(1) == target).all()))
        return results

    def exit_logprobs(self, tokens, n):
        """Log-probabilities (n, vocab) of the last n of tokens under adaptive exit, as generate() decides it: the
        context in one forward_cached (exit judged at all its positions), then one token at a time. Its own walk:
        generate() feeds back the tokens it samples, this the continuation's, each exiting on its own as decoded."""
        model, idx = self.model, torch.tensor([tokens[:-1]], device=self.device)
        cache = KVCache(model.config, 1, idx.size(1), self.num_steps, None, self.device, model.wte.weight.dtype)
        chunks = idx.split([len(tokens) - n] + [1] * (n - 1), dim=1)  # the context, then each continuation token
        logp = [model.forward_cached(x, cache, self.num_steps, self.exit_threshold)[0][:, -1] for x in chunks]
        return F.log_softmax(torch.cat(logp).float(), -1).cpu()

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of each whole text, in lm-eval's rolling windows of block_size tokens: every token
        is predicted once, the first after the BOS, each later window with the most context that fits."""
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            tokens, prefix = self.tok.encode(text), self.tok.prefix
            if prefix is None:  # a character vocabulary: the first character is the context
                if not tokens:
                    continue
                prefix, tokens = tokens[0], tokens[1:]
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    tokens, prefix, self.model.config.block_size, 1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += logp
        return totals

    # ---- generation ----

    def generate_until(self, requests, disable_tqdm=False):
        """Text generated after each context at num_steps (and under adaptive exit with exit_threshold), until a
        stop sequence or max_gen_toks tokens: greedy unless do_sample (temperature, top_k). Requests with the same
        settings run in batches (left-padded by generate); the context keeps its last block_size - max_gen_toks
        tokens. A batch stops as soon as every row has met a stop sequence or an end-of-text token."""
        args = [req.args for req in requests]
        groups, results = {}, [None] * len(requests)
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        for members in groups.values():
            kw = dict(normalize_gen_kwargs(args[members[0]][1], 256))
            until, max_gen = kw.pop("until"), kw.pop("max_gen_toks")
            greedy = not kw.pop("do_sample") or kw["temperature"] == 0
            temperature, top_k = (1.0, 1) if greedy else (kw.pop("temperature"), kw.pop("top_k", None))
            kw.pop("temperature", None)
            if kw:
                raise ValueError(f"generation setting {sorted(kw)[0]} is not supported (until, max_gen_toks, "
                                 "do_sample, temperature and top_k are)")
            keep = self.model.config.block_size - max_gen
            if keep < 1:
                raise ValueError(f"max_gen_toks ({max_gen}) must be below block_size ({self.model.config.block_size})")
            contexts = [self.tok.encode(args[i][0])[-keep:] for i in members]
            for batch in self.batches(list(range(len(members))), lambda j: len(contexts[j])):
                new = self.generate([contexts[j] for j in batch], max_gen, temperature, top_k, until)
                for j, tokens in zip(batch, new):
                    results[members[j]] = self.cut(tokens, until)
        return results

    def generate(self, prompts, max_new_tokens, temperature, top_k, until):
        """The new tokens of each prompt (lists of ids), generated until every row is done."""
        new = [[] for _ in prompts]

        def on_token(block):  # the new tokens of each row: one column, or several decided together
            for row, tokens in zip(new, block.tolist()):
                row.extend(tokens)
            if all(self.cut(row, until) != self.tok.decode(row) or self.tok.stop_ids & set(row) for row in new):
                raise _Done
        try:
            self.model.generate([torch.tensor(p, device=self.device) for p in prompts], max_new_tokens,
                                num_steps=self.num_steps, temperature=temperature, top_k=top_k,
                                exit_threshold=self.exit_threshold, on_token=on_token)
        except _Done:
            pass
        return new

    def cut(self, tokens, until):
        """The text of tokens up to the first end-of-text token, then up to the first stop sequence (HFLM's rule)."""
        stops = [k for k, t in enumerate(tokens) if t in self.tok.stop_ids]
        text = self.tok.decode(tokens[:stops[0]] if stops else tokens)
        for s in until:
            text = text.split(s)[0] if s else text
        return text


# ---- python harness.py: several depths, one table ----

def metrics(task_results):
    """The task's metrics other than their standard errors, as {name: value}."""
    return {k.split(",")[0]: v for k, v in task_results.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))}


def plot(path, depths, table):
    from plot_metrics import pyplot
    plt = pyplot()
    if plt is None:
        print("no plot: pip install matplotlib for harness.png")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in table.items():
        ax.plot(depths, values, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("num_steps (iterations of the core block at test time)")
    ax.set_ylabel("score")
    ax.set_title("lm-evaluation-harness by depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"wrote {path}")


if __name__ == "__main__":
    out_dir = ""                 # a train.py checkpoint (out_dir/ckpt.pt) ...
    huginn_dir = ""              # ... or a local copy of the release
    tasks = "shellgame_8"        # lm-eval task names, comma-separated (tasks/ is always included)
    num_steps = "1,4,8,32"       # the depths evaluated
    num_fewshot = None
    limit = None                 # at most this many examples per task (for a quick look)
    exit_threshold = None        # adaptive exit (KL between successive iterations)
    state_init = "zero"
    apply_chat_template = False  # the release's chat format (with huginn_dir), as its GSM8K setting
    system_instruction = ""
    batch_size = 16
    device = "auto"
    dtype = "auto"
    seed = 1234
    config, _ = configure(globals())
    depths = int_list("num_steps", num_steps)
    check_settings(config, [("batch_size", batch_size >= 1, ">= 1"),
                            ("out_dir", bool(out_dir) != bool(huginn_dir), "given, or huginn_dir (one of them)")])
    print(f"harness: {json.dumps(config)}")
    import lm_eval
    from lm_eval.tasks import TaskManager
    try:
        lm = RecurrentLM(out_dir, huginn_dir, depths[0], exit_threshold, state_init, batch_size, device, dtype)
    except (ValueError, OSError, ImportError) as e:
        die(str(e), code=1)
    manager = TaskManager(include_path=TASKS_DIR)
    names = tasks.split(",")
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        die(f"unknown task {unknown[0]!r}: see lm-eval --tasks list, or tasks/ here")
    table, results = {}, {}
    for r in depths:
        lm.num_steps = r
        out = lm_eval.simple_evaluate(lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                      apply_chat_template=apply_chat_template,
                                      system_instruction=system_instruction or None,
                                      log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
        results[r] = out["results"]
        for task in names:
            for metric, value in metrics(out["results"][task]).items():
                table.setdefault(f"{task} {metric}", []).append(value)
    width = max(len(k) for k in table)
    print(f"{'task metric':<{width}} " + " ".join(f"{'r=' + str(r):>7}" for r in depths))
    for name, values in table.items():
        print(f"{name:<{width}} " + " ".join(f"{v:>7.4f}" for v in values))
    where = out_dir or "."
    try:
        atomic_write(os.path.join(where, "harness.json"),
                     json.dumps(dict(config=config, num_steps=depths, table=table, results=results), indent=1,
                                default=str).encode())
        print(f"wrote {os.path.join(where, 'harness.json')}")
        plot(os.path.join(where, "harness.png"), depths, table)
    except WriteError as e:
        die(str(e), code=1)
