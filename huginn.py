"""
The released Huginn-0125 (huggingface.co/tomg-group-umd/huginn-0125, downloaded to a local directory), both ways:
load its weights into a RecurrentGPT and its tokenizer into tiktoken, and export a model trained here in its
layout, so that the release's own modeling code (and through it Hugging Face and vLLM) reads it:

    python huginn.py --out_dir=out-finetune --export_dir=my-huginn        # a train.py checkpoint, exported

The release's tensor names are ours behind a "transformer." prefix; config.json's keys map onto ModelConfig in
huginn_config(). The tokenizer: a byte-level BPE of 65536 ids whose last ones are special tokens, encoded with
enc.encode(text, allowed_special="all") to get the release's ids:

    <|begin_text|>    65504   BOS: begins every document, so every prompt starts with it
    <|end_text|>      65505   ends a document
    <|begin_header|>  65506   opens a chat role
    <|end_header|>    65507   closes it
    <|end_turn|>      65508   ends a chat turn: stop sampling here
    <|pad|>           65509

Chat format: BOS, then per turn <|begin_header|>role<|end_header|>\\n\\n text <|end_turn|> with the roles system,
user and Huginn (the assistant); a prompt for an answer ends with an open Huginn header (chat_prompt):

    <|begin_text|><|begin_header|>system<|end_header|>\\n\\nYou are a helpful assistant.<|end_turn|>
    <|begin_header|>user<|end_header|>\\n\\nWhat is 7 * 6?<|end_turn|><|begin_header|>Huginn<|end_header|>\\n\\n

(one line in the real prompt; broken here to fit).
"""

import json
import math
import os
from pathlib import Path

import tiktoken
import torch

from common import WriteError, atomic_write, check_settings, configure, die, load_model
from model import ModelConfig, precompute_rope

# ---- settings of the export (python huginn.py), overridden by --key=value ----
out_dir = "out"              # the train.py checkpoint to export (out_dir/ckpt.pt)
export_dir = ""              # where the release's layout is written
dtype = "float32"            # of the stored weights: "float32" (as trained) or "bfloat16" (as released)
shard_mib = 4096             # the largest safetensors shard
huginn_dir = ""              # the release whose tokenizer and code files go with the export; "" = the one fine-tuned from

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")

# the release's config.json key -> our ModelConfig field; every one of them must be present
CONFIG_KEYS = {"n_embd": "n_embd", "n_layers_in_prelude": "n_prelude", "n_layers_in_recurrent_block": "n_core",
               "n_layers_in_coda": "n_coda", "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
               "block_size": "block_size", "mean_recurrence": "mean_recurrence",
               "mean_backprop_depth": "backprop_depth", "qk_bias": "qk_bias", "norm_eps": "norm_eps"}


def huginn_config(cfg):
    """ModelConfig from the release's config.json (a dict). Keys the release's modeling code never reads
    (architecture_class_name, mlp_class_name, init_strategy, ...) are ignored; the few it reads that change the
    math are checked to hold the one value RecurrentGPT computes with. state_init is "zero": the release run with
    init_scale=0 starts from zeros, which makes its logits reproducible (its default is a random state)."""
    heads = cfg.get("num_attention_heads", cfg.get("n_heads"))  # HF's alias and the stored name
    missing = ["num_attention_heads (or n_heads)"] * (heads is None)
    missing += [key for key in [*CONFIG_KEYS, "tie_embeddings"] if key not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {missing[0]}: is this the Huginn-0125 release?")
    kw = {ours: cfg[key] for key, ours in CONFIG_KEYS.items()}
    # the tensors have padded_vocab_size rows (65536 in the release, as vocab_size); a missing rope_base is 50000
    kw.update(n_head=heads, vocab_size=cfg.get("padded_vocab_size", cfg["vocab_size"]),
              rope_base=float(cfg.get("rope_base", 50000)), state_init="zero")
    given = {**cfg, **cfg.get("init_values", {})}  # embed_scale lives in init_values
    for key, want in {"tie_embeddings": True, "bias": False, "num_key_value_heads": heads, "test_time_noise": 0,
                      "embed_scale": math.sqrt(cfg["n_embd"])}.items():
        if key in given and not math.isclose(float(given[key]), float(want), rel_tol=1e-6):
            raise ValueError(f"config.json has {key}={given[key]}: RecurrentGPT only computes with {key}={want}")
    return ModelConfig(**kw)


def shard_files(path, safe_open):
    """{tensor name: its file}, from model.safetensors.index.json or else a single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        for file in sorted(set(files.values())):
            if not file.exists():
                raise FileNotFoundError(f"shard {file.name} (listed in {index.name}) is missing from {path}: "
                                        "download it again")
        return files
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} has neither model.safetensors.index.json nor model.safetensors: "
                                "download the release (see README)")
    with safe_open(path / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), path / "model.safetensors")


def load_huginn(cls, path, device=None, dtype=None):
    """A RecurrentGPT (cls), in eval mode, with the weights of the release in the local directory path.
    dtype None keeps the stored dtype (bfloat16 in the release); the RoPE table stays float32, holding the stored
    table when the file has one (the release computes with its bf16-rounded table). Built on the meta device and
    filled tensor by tensor, loading peaks at the model plus about one tensor (the embedding if a head is
    stored)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'} not found: download the release there (see README), or "
                                "point --huginn_dir at your copy")
    config = huginn_config(json.loads((path / "config.json").read_text()))
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("loading Huginn-0125 needs safetensors: pip install safetensors") from None
    files = shard_files(path, safe_open)
    with torch.device("meta"):  # shapes without memory: each parameter is then materialized once, from the file
        model = cls(config)
    hd = config.n_embd // config.n_head
    shapes = {"transformer." + name: p.shape for name, p in model.named_parameters()}  # the tied head counted once
    required = set(shapes)
    shapes.update({"lm_head.weight": model.wte.weight.shape, "freqs_cis": (1, config.block_size, 1, hd // 2, 2)})
    missing, unknown = sorted(required - files.keys()), sorted(files.keys() - shapes.keys())
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing from the checkpoint in {path}")
    if unknown:
        raise ValueError(f"unexpected tensor {unknown[0]} in {files[unknown[0]].name}: not a Huginn tensor")
    state = {}
    for name in sorted(files, key=lambda n: n == "lm_head.weight"):  # the head last, to compare it with wte
        # safe_open maps the whole shard and keeps every page read resident until it closes: one open per tensor
        # holds the peak to the model plus one tensor
        with safe_open(files[name], "pt", device="cpu") as f:
            if name not in f.keys():
                raise ValueError(f"tensor {name} is not in {files[name].name}, though the index puts it there")
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(shapes[name]):
                raise ValueError(f"tensor {name} in {files[name].name} has shape {list(shape)}, "
                                 f"expected {list(shapes[name])}")
            t = f.get_tensor(name)
            if name == "freqs_cis":  # the release's name for its table: (1, T, 1, hd/2, 2) -> our (T, hd/2, 2)
                rope = t.reshape(config.block_size, hd // 2, 2)
                model.rope_table = rope.to(device=device, dtype=torch.float32, copy=True)
            elif name == "lm_head.weight":  # compared with wte in blocks of rows: never a second full copy
                blocks = zip(t.split(1024), state["wte.weight"].split(1024))
                if not all(torch.equal(a.to(device=b.device, dtype=b.dtype), b) for a, b in blocks):
                    raise ValueError(f"lm_head.weight in {files[name].name} differs from transformer.wte.weight: "
                                     "RecurrentGPT ties them, as the release does")
            else:
                state[name.removeprefix("transformer.")] = t.to(device=device, dtype=dtype, copy=True)
    model.load_state_dict(state, strict=False, assign=True)  # assign: the loaded tensors become the parameters
    model.lm_head.weight = model.wte.weight  # assign replaced wte's Parameter: tie the head to the new one
    if "freqs_cis" not in files:
        model.rope_table = precompute_rope(hd, config.block_size, config.rope_base).to(device=device)
    return model.eval()


def bytes_to_unicode():
    """GPT-2's table from bytes to the printable characters a byte-level BPE's vocab is written in: printable
    bytes stand for themselves, the other 68 move to chr(256), chr(257), ... in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = iter(range(256, 512))
    return {b: chr(b if b in printable else next(moved)) for b in range(256)}


def load_huginn_tokenizer(path):
    """The release's tokenizer.json (path: the directory or the file) as a tiktoken Encoding. Its BPE was trained
    tiktoken-style, ids in merge order, so the vocab mapped back to bytes is tiktoken's mergeable_ranks; its Split
    regex is the pat_str (tiktoken drops text the regex does not match, where HF keeps it: they agree on text the
    regex covers); added_tokens are the special tokens. No normalizer, no byte fallback, as in the release."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: download the release (see README)")
    tok = json.loads(file.read_text(encoding="utf-8"))
    pre = tok.get("pre_tokenizer") or {}
    regexes = [p["pattern"]["Regex"] for p in pre.get("pretokenizers", [pre])
               if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
    if not regexes:
        raise ValueError(f"{file} has no Split regex in its pre_tokenizer: not a byte-level BPE as released")
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special_ids = set(specials.values())
    ranks = {bytes(byte_of[c] for c in s): i for s, i in tok["model"]["vocab"].items() if i not in special_ids}
    return tiktoken.Encoding("huginn-0125", pat_str=regexes[0], mergeable_ranks=ranks, special_tokens=specials)


def chat_prompt(prompt, system=""):
    """The release's chat format up to Huginn's answer: BOS, a system turn if given, the user's turn, and the
    open header of Huginn's turn (the answer and its <|end_turn|> follow)."""
    turns = ([("system", system)] if system else []) + [("user", prompt)]
    return ("<|begin_text|>" + "".join(f"<|begin_header|>{role}<|end_header|>\n\n{text}<|end_turn|>" for role, text in turns)
            + "<|begin_header|>Huginn<|end_header|>\n\n")


def release_config(config, torch_dtype, source=None):
    """config.json for ModelConfig config in the release's keys: the source's config.json (its token ids,
    auto_map, ...) where there is one, with every key that describes the model set from config."""
    cfg = dict(source or {"architectures": ["RavenForCausalLM"], "model_type": "huginn_raven", "auto_map": {
        "AutoConfig": "raven_config_minimal.RavenConfig", "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        "architecture_class_name": "RecurrentGPT", "block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama",
        "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU", "injection_type": "linear", "bias": False,
        "sampling_scheme": "poisson-lognormal-filling", "activation_checkpoint_impl": "per-iteration"})
    cfg.update({key: getattr(config, ours) for key, ours in CONFIG_KEYS.items()})
    cfg.update(n_heads=config.n_head, num_attention_heads=config.n_head, num_key_value_heads=config.n_head,
               n_layers=config.n_prelude + config.n_core + config.n_coda, padded_vocab_size=config.vocab_size,
               tie_embeddings=True, rope_base=config.rope_base, torch_dtype=torch_dtype, state_init="like-init",
               init_values={"std": math.sqrt(2 / (5 * config.n_embd)), "embed_scale": math.sqrt(config.n_embd)})
    return cfg


def save_huginn(model, path, source_dir=None, dtype=None, shard_bytes=4 << 30):
    """Write model in the release's layout to the directory path: config.json with the release's keys,
    safetensors shards of at most shard_bytes with model.safetensors.index.json (written last: it names only
    whole shards), and the tokenizer and modeling-code files of source_dir (the release it was fine-tuned from)
    when there is one. dtype None keeps the weights' own. Every file is written atomically (WriteError)."""
    if model.config.pos_encoding != "rope":
        raise ValueError(f"the release computes with rotary positions; this model has pos_encoding="
                         f"{model.config.pos_encoding!r}, which its code cannot run")
    try:
        from safetensors.torch import save
    except ImportError:
        raise ImportError("exporting to the release's layout needs safetensors: pip install safetensors") from None
    tensors = {"transformer." + k: v.detach().to("cpu", dtype or v.dtype).contiguous()
               for k, v in model.state_dict().items() if k != "lm_head.weight"}  # the head is tied to wte
    shards = [[]]
    for name, t in tensors.items():
        if shards[-1] and sum(tensors[n].nbytes for n in shards[-1]) + t.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(name)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    source = Path(source_dir) if source_dir else None
    for file in sorted(source.iterdir()) if source else []:  # tokenizer, generation config, modeling code
        if file.is_file() and file.name not in WEIGHT_FILES and not file.name.endswith((".safetensors", ".bin")):
            atomic_write(os.path.join(path, file.name), file.read_bytes())
    source_cfg = json.loads((source / "config.json").read_text()) if source and (source / "config.json").exists() else None
    torch_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(os.path.join(path, "config.json"),
                 json.dumps(release_config(model.config, torch_dtype, source_cfg), indent=2).encode())
    for file, names in zip(files, shards):
        atomic_write(os.path.join(path, file), save({n: tensors[n] for n in names}, metadata={"format": "pt"}))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
    atomic_write(os.path.join(path, "model.safetensors.index.json"), json.dumps(index, indent=2).encode())


if __name__ == "__main__":
    config, _ = configure(globals())
    if not export_dir:
        die("give --export_dir=DIR, where the release's layout is written")
    check_settings(config, [("dtype", dtype in ("float32", "bfloat16"), "'float32' or 'bfloat16'")])
    print(f"huginn: {json.dumps(config)}")
    try:
        model, checkpoint = load_model(out_dir, "cpu")
        # set in the checkpoint when it was fine-tuned from the release
        source = huginn_dir or checkpoint.get("config", {}).get("huginn_dir") or None
        if source and not os.path.isdir(source):
            die(f"{source}, the release this run was fine-tuned from, is not there (moved?): point --huginn_dir at "
                "your copy of it", code=1)
        save_huginn(model, export_dir, source, getattr(torch, dtype), shard_mib << 20)
    except (ValueError, ImportError, WriteError) as e:
        die(str(e), code=1)
    print(f"wrote {export_dir}: {model.get_num_params():,} parameters in {dtype}"
          + (f", with the tokenizer and code files of {source}" if source else ""))
