"""Contracts of huginn.py: a RecurrentGPT exported in the release's exact layout loads back to the same logits, and
the release's kind of tokenizer.json converts to the ids it specifies. Tiny files in tmp_path, no network."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import regex
import torch

from huginn import bytes_to_unicode, huginn_config, load_huginn_tokenizer
from conftest import tiny_config
from model import RecurrentGPT, precompute_rope

try:
    from safetensors.torch import load_file, save_file
except ImportError:  # safetensors is optional: only the weight tests need it
    save_file = None
needs_safetensors = pytest.mark.skipif(save_file is None, reason="pip install safetensors")


TINY = dict(vocab_size=96, block_size=32, intermediate_size=48, state_init="zero")  # over conftest's tiny_config


def build(seed=0, **kw):
    """A tiny RecurrentGPT with every weight random, norms and qk_bias included, so a swapped tensor shows."""
    torch.manual_seed(seed)
    model = RecurrentGPT(tiny_config(**{**TINY, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def release_config(c):
    """config.json with the release's keys for ModelConfig c, plus some that the math does not read."""
    return {"architectures": ["RavenForCausalLM"], "model_type": "huginn_raven", "n_embd": c.n_embd,
            "n_heads": c.n_head, "num_key_value_heads": c.n_head, "n_layers_in_prelude": c.n_prelude,
            "n_layers_in_recurrent_block": c.n_core, "n_layers_in_coda": c.n_coda, "n_layers": 4,
            "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
            "padded_vocab_size": c.vocab_size, "block_size": c.block_size, "mean_recurrence": c.mean_recurrence,
            "mean_backprop_depth": c.backprop_depth,
            "qk_bias": c.qk_bias, "norm_eps": c.norm_eps, "tie_embeddings": True, "rope_base": c.rope_base,
            "bias": False, "state_init": "like-init", "torch_dtype": "float32", "mlp_class_name": "GatedMLP",
            "init_values": {"embed_scale": math.sqrt(c.n_embd), "std": math.sqrt(2 / (5 * c.n_embd))}}


def export(model, path, head=False, rope=None, dtype=torch.float32):
    """Write model as the release lays it out: config.json, two safetensors shards of "transformer." names and
    their index; with head a copy of the tied lm_head, with rope a stored RoPE table. Returns the tensors."""
    path.mkdir(exist_ok=True)
    tensors = {"transformer." + k: v.to(dtype).clone() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    if head:
        tensors["lm_head.weight"] = model.wte.weight.detach().to(dtype).clone()
    if rope is not None:
        tensors["freqs_cis"] = rope[None, :, None].contiguous()  # the release's (1, T, 1, hd/2, 2)
    names, weight_map = list(tensors), {}
    for i, part in enumerate([names[:len(names) // 2], names[len(names) // 2:]]):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(release_config(model.config)))
    return tensors


def logits_at(model, num_steps, seed=1):
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx, num_steps=num_steps)[0]


@needs_safetensors
def test_round_trip_every_tensor_mapped_and_logits_equal(tmp_path):
    """Exported and loaded back: every file tensor lands on the parameter of the same name minus "transformer.",
    the head is tied to wte, the rest of the mapping is as hand-checked below, and the logits are the exported
    model's at several depths (float32, zero initial state)."""
    src = build()
    tensors = export(src, tmp_path)
    model = RecurrentGPT.from_huginn(tmp_path)
    loaded = model.state_dict()
    assert len(tensors) == len(loaded) - 1  # all but the tied lm_head come from the file
    for name, t in tensors.items():
        assert torch.equal(loaded[name.removeprefix("transformer.")], t), name
    assert model.lm_head.weight is model.wte.weight and not model.training
    assert model.config.state_init == "zero" and model.rope_table.dtype == torch.float32
    assert torch.equal(model.rope_table, src.rope_table)  # no table in the file: computed from rope_base
    assert torch.equal(model.core_block[1].attn.qk_bias, tensors["transformer.core_block.1.attn.qk_bias"])
    assert torch.equal(model.adapter.weight, tensors["transformer.adapter.weight"])
    for num_steps in (1, 3, 8):
        torch.testing.assert_close(logits_at(model, num_steps), logits_at(src, num_steps), atol=1e-5, rtol=0)


def test_config_mapping_hand_checked():
    """The released Huginn-0125's config.json maps onto ModelConfig: both spellings of the head count,
    rope_base 50000 when missing, zero initial state; its shapes make the 3.5B model."""
    release = dict(n_embd=5280, n_heads=55, n_layers_in_prelude=2, n_layers_in_recurrent_block=4,
                   n_layers_in_coda=2, intermediate_size=17920, vocab_size=65536, padded_vocab_size=65536,
                   block_size=4096, mean_recurrence=32, mean_backprop_depth=8, qk_bias=True, norm_eps=1e-6,
                   tie_embeddings=True, num_key_value_heads=55, init_values={"embed_scale": math.sqrt(5280)},
                   rope_base=50000)
    c = huginn_config(release)
    assert (c.n_embd, c.n_head, c.n_prelude, c.n_core, c.n_coda) == (5280, 55, 2, 4, 2)
    assert (c.intermediate_size, c.vocab_size, c.block_size) == (17920, 65536, 4096)
    assert (c.mean_recurrence, c.backprop_depth, c.qk_bias, c.norm_eps) == (32, 8, True, 1e-6)
    assert c.rope_base == 50000.0 and c.state_init == "zero"
    renamed = {k: v for k, v in release.items() if k not in ("n_heads", "rope_base")} | {"num_attention_heads": 55}
    assert huginn_config(renamed) == c
    with torch.device("meta"):
        assert 3.5e9 < RecurrentGPT(c).get_num_params() < 3.6e9
    with pytest.raises(ValueError, match="num_key_value_heads=11"):
        huginn_config({**release, "num_key_value_heads": 11})  # grouped-query attention: not ours


@needs_safetensors
def test_stored_rope_table_is_used_as_stored(tmp_path):
    """A freqs_cis table in the file becomes our buffer value for value (bf16 in the release), and the logits
    follow it: here a table other than the one rope_base gives."""
    src = build()
    table = precompute_rope(16, 32, 1000.0).to(torch.bfloat16)
    export(src, tmp_path, rope=table)
    model = RecurrentGPT.from_huginn(tmp_path)
    assert model.rope_table.dtype == torch.float32 and torch.equal(model.rope_table, table.float())
    computed = logits_at(src, 3)  # with the table rope_base gives
    src.rope_table = table.float()
    stored = logits_at(model, 3)
    torch.testing.assert_close(stored, logits_at(src, 3), atol=1e-5, rtol=0)
    assert (stored - computed).abs().max() > 1e-3


@needs_safetensors
def test_head_copy_dtype_and_single_file(tmp_path):
    """A stored lm_head equal to wte is accepted (and tied), a different one refused; dtype None keeps the stored
    bf16, float32 upcasts it; a lone model.safetensors without index loads too."""
    src = build()
    tensors = export(src, tmp_path, head=True, dtype=torch.bfloat16)
    model = RecurrentGPT.from_huginn(tmp_path)
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.wte.weight
    wide = RecurrentGPT.from_huginn(tmp_path, dtype=torch.float32)
    assert torch.equal(wide.wte.weight, tensors["transformer.wte.weight"].float())
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, single / "model.safetensors")
    (single / "config.json").write_text((tmp_path / "config.json").read_text())
    assert torch.equal(RecurrentGPT.from_huginn(single).wte.weight, model.wte.weight)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, single / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight"):
        RecurrentGPT.from_huginn(single)


# VmHWM, the peak resident set: ru_maxrss would not do, as after fork and exec it still counts the parent's pages
MEASURE = """
import sys, torch
from model import RecurrentGPT
def kib(key): return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
RecurrentGPT.from_huginn(sys.argv[1], dtype=torch.float32)  # warm-up: one-time allocations stay out of the figure
before = kib("VmRSS:")
model = RecurrentGPT.from_huginn(sys.argv[2], dtype=torch.float32)
print((kib("VmHWM:") - before) * 1024 / sum(p.nbytes for p in model.parameters()))
"""


@needs_safetensors
def test_loading_peaks_below_one_and_a_half_model_sizes(tmp_path):
    """Memory-sane loading: the 100 MB float32 model that a bf16 checkpoint with a stored head becomes grows the
    process's peak RSS by less than 1.5x its size (measured in a fresh process)."""
    export(build(), tmp_path / "tiny")
    big = build(vocab_size=8192, n_embd=640, n_head=10, intermediate_size=1792)
    export(big, tmp_path / "big", head=True, dtype=torch.bfloat16)
    out = subprocess.run([sys.executable, "-c", MEASURE, tmp_path / "tiny", tmp_path / "big"], capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent, check=True).stdout
    assert float(out) < 1.5, f"peak RSS growth {float(out):.2f}x the model"


def break_checkpoint(path, case):
    """Spoil an exported checkpoint one way; returns the name the error must give."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    if case == "missing shard":
        (path / "model-00002-of-00002.safetensors").unlink()
        return "model-00002-of-00002.safetensors"
    if case == "missing config key":
        cfg = json.loads((path / "config.json").read_text())
        del cfg["n_layers_in_coda"]
        (path / "config.json").write_text(json.dumps(cfg))
        return "n_layers_in_coda"
    name = {"wrong shape": "transformer.coda.0.mlp.proj.weight", "missing tensor": "transformer.ln_f.weight",
            "unknown tensor": "transformer.core_block.0.attn.bias"}[case]
    file = "model-00002-of-00002.safetensors"
    tensors = load_file(path / file)
    if case == "wrong shape":
        tensors[name] = tensors[name].t().contiguous()
    elif case == "missing tensor":
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = torch.zeros(3)
        index["weight_map"][name] = file
    save_file(tensors, path / file)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return name


@needs_safetensors
@pytest.mark.parametrize("case", ["missing shard", "wrong shape", "missing tensor", "unknown tensor",
                                  "missing config key"])
def test_broken_checkpoint_gives_one_line_naming_it(tmp_path, case):
    """Each fault stops the load with one line that names the shard, tensor or key."""
    export(build(), tmp_path)
    name = break_checkpoint(tmp_path, case)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        RecurrentGPT.from_huginn(tmp_path)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_missing_safetensors_names_the_install(tmp_path, monkeypatch):
    """Without the optional safetensors package: one line saying pip install safetensors."""
    (tmp_path / "config.json").write_text(json.dumps(release_config(tiny_config(**TINY))))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes the import fail
    with pytest.raises(ImportError) as err:
        RecurrentGPT.from_huginn(tmp_path)
    assert "pip install safetensors" in str(err.value) and "\n" not in str(err.value)


# ---- the tokenizer ----

# a GPT-4-style Split regex, as in the release: contractions, letters, 1-3 digits, punctuation, whitespace runs
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
           r"|\s*[\r\n]|\s+(?!\S)|\s+")
MERGES = ["T h", "Th e", "Ġ y", "e a", "Ġy ea", "Ġyea r", "2 0", "20 2", "1 2", "12 3", "4 5", "Ġ Ġ",
          "ĠĠ ĠĠ", "Ċ Ċ", "d e", "de f", "r e", "t u", "re tu", "retu r", "retur n", ") :", "): Ċ", "Ã ©", "H e",
          "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
SPECIALS = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>"]
TEXTS = ["The year 2025 has 12345 days.", "def f(x):\n    return x_1 + 42\n", "a  b\t\tc\n\n\nd    e   ",
         "<|begin_text|>Hello world<|end_turn|>", "Hello world, café 東京 🙂 don't"]


def write_tokenizer(path):
    """A small tokenizer.json in the release's Hugging Face format: byte-level BPE, ids 0..255 the bytes in order,
    then the merges in rank order, then the special tokens."""
    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    for merge in MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    added = [{"id": len(vocab) + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(SPECIALS)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": MERGES}}
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return tok


def reference_ids(tok, text):
    """What the file specifies, done plainly: split off the added tokens, cut the rest with the Split regex, write
    each piece's bytes in GPT-2's characters, merge the lowest-ranked adjacent pair until none is left."""
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    rank = {tuple(m.split(" ")): i for i, m in enumerate(tok["model"]["merges"])}
    chars, ids = bytes_to_unicode(), []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(specials[part])
            continue
        for piece in regex.findall(tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"], part):
            word = [chars[b] for b in piece.encode("utf-8")]
            while pairs := [(rank[p], i) for i, p in enumerate(zip(word, word[1:])) if p in rank]:
                _, i = min(pairs)
                word[i:i + 2] = [word[i] + word[i + 1]]
            ids += [tok["model"]["vocab"][w] for w in word]
    return ids


def test_gpt2_byte_table():
    """Hand-checked facts of GPT-2's byte-to-unicode table the vocab is written in."""
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord("~")] == "~"
    assert (table[0], table[ord("\t")], table[ord("\n")], table[ord(" ")]) == ("Ā", "ĉ", "Ċ", "Ġ")


def test_tokenizer_ids_are_what_the_file_specifies(tmp_path):
    """Digits, code, whitespace runs, special tokens and multi-byte text encode to the ids the HF-format file
    specifies (an independent straightforward BPE), and decode back to the text."""
    tok = write_tokenizer(tmp_path)
    enc = load_huginn_tokenizer(tmp_path)
    vocab = tok["model"]["vocab"]
    for text in TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert ids == reference_ids(tok, text), text
        assert enc.decode(ids) == text
    assert enc.encode("Hello") == [vocab["Hello"]]
    assert enc.encode("2025") == [vocab["202"], ord("5")]  # three digits at most per piece
    assert enc.encode("    x") == [vocab["ĠĠ"], ord(" "), ord(" "), ord("x")]  # the run leaves a space to x
    assert enc.encode("<|begin_text|>", allowed_special="all") == [256 + len(MERGES)]
    assert enc.encode_single_token("<|end_turn|>") == 256 + len(MERGES) + 4


@needs_safetensors
def test_sample_py_samples_the_release_layout_at_several_depths(tmp_path):
    """sample.py --init_from=huginn runs every sampling option on a checkpoint in the release's layout."""
    tok = write_tokenizer(tmp_path)
    vocab = max(t["id"] for t in tok["added_tokens"]) + 1
    export(build(vocab_size=vocab, block_size=96), tmp_path)
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "sample.py"), "--init_from=huginn", f"--huginn_dir={tmp_path}",
                          "--num_steps=1,4", "--exit_threshold=1e-3", "--kv_budget=2", "--warm_start", "--chat",
                          "--start=Hello world", "--max_new_tokens=8", "--device=cpu"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "num_steps=1, sample 1" in run.stdout and "num_steps=4, sample 1" in run.stdout
    stats = run.stdout.split("KV cache")[1].strip().splitlines()
    assert [line.split()[0] for line in stats] == ["1", "4"]
    assert float(stats[1].split()[2]) <= 4  # mean iterations per token under adaptive exit
