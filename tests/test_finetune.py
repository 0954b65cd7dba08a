"""Contracts of fine-tuning the release: its tokenizer's data (documents and chat), train.py --init_from=huginn,
the export back to its layout, FSDP against DDP, and the one-line errors. Tiny checkpoints in the release's layout,
written here (test_huginn's writer), stand in for the 7 GB release."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import load_model
from conftest import ROOT, TINY_TRAIN, make_shellgame, run_main, run_script
from huginn import chat_prompt, load_huginn_tokenizer, save_huginn
from model import RecurrentGPT
from test_huginn import build, export, needs_safetensors, write_tokenizer

TEXT = "The year 2025 has 12345 days. Hello world, def f(x): return x. " * 300
FINETUNE = ["--init_from=huginn", "--dataset=notes_huginn", "--block_size=32", "--batch_size=8", "--eval_iters=4",
            "--learning_rate=3e-3", "--warmup_iters=4", "--min_lr=3e-4", "--mean_recurrence=3", "--backprop_depth=2",
            "--device=cpu"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A directory in the release's layout (config.json, two shards and their index, tokenizer.json) and, beside
    it, data/notes_huginn: a text tokenized with its tokenizer."""
    root = tmp_path_factory.mktemp("finetune")
    src = root / "release"
    src.mkdir()
    tok = write_tokenizer(src)
    export(build(vocab_size=max(t["id"] for t in tok["added_tokens"]) + 1, block_size=64), src)
    (root / "notes.txt").write_text(TEXT)
    run = run_script("prepare_data.py", f"--input={root / 'notes.txt'}", "--tokenizer=huginn", f"--huginn_dir={src}",
                     cwd=root)
    assert run.returncode == 0, run.stderr
    return root, src


def val_losses(stdout, r):
    return [float(m) for m in re.findall(rf"eval iter \d+: .*r={r}: ([0-9.]+)", stdout)]


@needs_safetensors
def test_documents_start_with_begin_text(release):
    root, src = release
    meta = json.loads((root / "data/notes_huginn/meta.json").read_text())
    enc = load_huginn_tokenizer(src)
    assert meta["tokenizer"] == "huginn" and meta["vocab_size"] == enc.n_vocab and meta["huginn_dir"] == str(src)
    ids = np.fromfile(root / "data/notes_huginn/train.bin", dtype=np.uint16)
    assert ids[0] == enc.encode_single_token("<|begin_text|>") and enc.decode(ids[1:40].tolist()) == TEXT[:len(
        enc.decode(ids[1:40].tolist()))]


@needs_safetensors
def test_finetune_lowers_held_out_loss_and_exports_the_trained_weights(release):
    """A few dozen steps of the randomized-depth objective lower the val loss of a release-layout checkpoint (the
    run evaluates at iteration 0 too); `python huginn.py` exports the result, which from_huginn loads back with the
    trained weights: logits equal to the train.py checkpoint's."""
    root, src = release
    run = run_script("train.py", *FINETUNE, f"--huginn_dir={src}", "--max_iters=40", "--eval_interval=40",
                     "--out_dir=ft", cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    before, after = val_losses(run.stdout, 3)
    assert "eval iter 0:" in run.stdout and after < before - 0.5, (before, after)
    run = run_script("huginn.py", "--out_dir=ft", "--export_dir=exported", cwd=root)
    assert run.returncode == 0, run.stderr
    exported = root / "exported"
    assert (exported / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["n_layers_in_recurrent_block"] == 2 and cfg["mean_recurrence"] == 3 and cfg["tie_embeddings"]
    trained, _ = load_model(str(root / "ft"), "cpu")
    loaded = RecurrentGPT.from_huginn(exported)
    trained.config.state_init = "zero"
    assert not torch.equal(trained.wte.weight, RecurrentGPT.from_huginn(src).wte.weight)  # it did train
    idx = torch.randint(0, trained.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx, num_steps=4)[0], trained(idx, num_steps=4)[0])


@needs_safetensors
def test_export_of_a_model_trained_here_is_an_exact_round_trip(tmp_path):
    """A model trained from scratch with train.py, exported by huginn.py (no source: no tokenizer files) and loaded
    by from_huginn, has every tensor and its logits exactly; save_huginn shards at the size asked for."""
    make_shellgame(tmp_path)
    train = ["train.py", *TINY_TRAIN, "--max_iters=3", "--eval_interval=3", "--out_dir=out"]
    assert run_script(*train, "--pos_encoding=alibi", cwd=tmp_path).returncode == 0
    run = run_script("huginn.py", "--out_dir=out", "--export_dir=exported", cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.startswith("error: the release computes with rotary positions")
    assert not (tmp_path / "exported").exists()  # the release's code runs rotary positions only
    assert run_script(*train, "--pos_encoding=rope", cwd=tmp_path).returncode == 0
    run = run_script("huginn.py", "--out_dir=out", "--export_dir=exported", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    trained, _ = load_model(str(tmp_path / "out"), "cpu")
    loaded = RecurrentGPT.from_huginn(tmp_path / "exported")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))
    trained.config.state_init = "zero"
    idx = torch.randint(0, 17, (3, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx, num_steps=5)[0], trained(idx, num_steps=5)[0])
    save_huginn(trained, tmp_path / "small", shard_bytes=20_000)
    index = json.loads((tmp_path / "small/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "small/tokenizer.json").exists()
    assert torch.equal(RecurrentGPT.from_huginn(tmp_path / "small").adapter.weight, trained.adapter.weight)


@needs_safetensors
def test_chat_loss_mask_covers_the_response_and_its_end_of_turn(tmp_path):
    """Chat data in the release's format: each row is the prompt (chat_prompt's ids) then the response; what the
    targets leave unmasked decodes to exactly the response and <|end_turn|>."""
    write_tokenizer(tmp_path)
    examples = [{"prompt": "What is 7 * 6?", "response": "Hello world 42."},
                {"system": "Be brief.", "prompt": "Say hi", "response": "  Hello\n\nworld"},
                {"prompt": "def f(x):", "response": "    return x"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    assert run_main("prepare_data.py", [f"--input={tmp_path / 'chat.jsonl'}", "--tokenizer=huginn",
                                        f"--huginn_dir={tmp_path}", "--val_fraction=0.3",
                                        f"--data_dir={tmp_path / 'data'}"]) == 0
    enc = load_huginn_tokenizer(tmp_path)
    meta = json.loads((tmp_path / "data/chat_huginn/meta.json").read_text())
    assert meta["layout"] == "rows" and meta["targets_dtype"] == "int32" and meta["rows"] == {"train": 2, "val": 1}
    rows = [(np.fromfile(tmp_path / f"data/chat_huginn/{s}.bin", dtype=np.uint16).reshape(-1, meta["row_len"]),
             np.fromfile(tmp_path / f"data/chat_huginn/{s}_targets.bin", dtype=np.int32).reshape(-1, meta["row_len"]))
            for s in ("train", "val")]
    for ex, x, y in zip(examples, *map(np.concatenate, zip(*rows))):
        prompt = enc.encode(chat_prompt(ex["prompt"], ex.get("system", "")), allowed_special="all")
        assert x[:len(prompt)].tolist() == prompt
        assert enc.decode(y[y != -1].tolist()) == ex["response"] + "<|end_turn|>"
        assert (y[:len(prompt) - 1] == -1).all() and y[len(prompt) - 1] != -1


@pytest.mark.parametrize("args, code, needles", [
    (["--init_from=huginn", "--dataset=notes_huginn"], 2, ["--huginn_dir"]),
    (["--init_from=huginn", "--huginn_dir={src}", "--dataset=shellgame"], 1, ["tokenizer", "--tokenizer=huginn"]),
    (["--init_from=huginn", "--huginn_dir={src}", "--dataset=notes_huginn", "--n_embd=64"], 1,
     ["n_embd is 64", "config.json has 32"]),
    (["--fsdp", "--dataset=shellgame"], 2, ["--fsdp", "torchrun"]),
])
@needs_safetensors
def test_finetune_mistakes_give_one_line(release, capsys, args, code, needles):
    root, src = release
    if not (root / "data/shellgame").exists():
        make_shellgame(root)
    assert run_main("train.py", [a.format(src=src) for a in args] + ["--out_dir=never"], root) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and all(n in err for n in needles), err
    assert not (root / "never").exists()


@needs_safetensors
def test_dry_run_prints_the_memory_of_a_step(release, capsys):
    """--dry_run: weights, gradients and AdamW from the parameter count (4, 4 and 8 bytes each, divided over 8
    GPUs under FSDP), activations from the meta device; less with checkpointing; the host memory of loading. Nothing
    is trained or loaded."""
    root, src = release
    assert run_main("train.py", [*FINETUNE, f"--huginn_dir={src}", "--dry_run", "--out_dir=never"], root) == 0
    out = capsys.readouterr().out
    n = RecurrentGPT.from_huginn(src).get_num_params()
    rows = {line[:22].strip(): [float(v) for v in re.findall(r"[0-9]+\.[0-9]+", line[22:])]
            for line in out.splitlines() if line.startswith(("one process", "FSDP on 8"))}
    one, fsdp = rows["one process, or DDP"], rows["FSDP on 8 GPUs"]
    assert "memory per GPU in MiB" in out and not (root / "never").exists()
    assert one[:4] == pytest.approx([4 * n / 2 ** 20, 4 * n / 2 ** 20, 8 * n / 2 ** 20, 0], abs=0.01)
    assert fsdp[:3] == pytest.approx([v / 8 for v in one[:3]], abs=0.01) and fsdp[3] > 0 and fsdp[4:6] == one[4:6]
    assert one[4] > one[5] > 0 and one[6] == pytest.approx(sum(one[:5]), abs=0.03)
    # loading: each process of DDP holds the float32 model; under FSDP rank 0 alone holds the release as stored
    host = re.search(r"host memory of loading in MiB, rank 0 / any other / a node of 8: one process or DDP (.*) / (.*) / "
                     r"(.*); FSDP (.*) / (.*) / (.*) \(", out)
    stored = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2 ** 20
    assert [float(v) for v in host.groups()] == pytest.approx([one[0], one[0], 8 * one[0], stored, 0, stored], abs=0.01)


# ---- FSDP, two gloo processes on CPU ----

SCRATCH = [*TINY_TRAIN, "--pos_encoding=rope", "--mean_recurrence=5"]


def torchrun(cwd, out_dir, *args, popen=False, settings=SCRATCH):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *map(str, settings), "--max_iters=8", "--eval_interval=2", "--gradient_accumulation_steps=2",
           "--log_interval=1", f"--out_dir={out_dir}", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if popen:
        return proc
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def descendants(pid):
    """The processes started by pid, and theirs (Linux's /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        found += frontier
    return found


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks to kill in /proc")
def test_fsdp_matches_ddp_and_resumes_after_a_kill(shellgame_dir):
    """torchrun, two gloo processes: FSDP (fully_shard on each block and the model) ends with the weights of DDP on
    the same data (1e-5, float32); an FSDP run killed with SIGKILL after a checkpoint, then resumed, ends where the
    uninterrupted one does; a single process reads its checkpoint."""
    out = torchrun(shellgame_dir, "fsdp", "--fsdp")
    assert "2 processes (FSDP)" in out and "fsdp: 2 ranks agree on 8 depths" in out
    torchrun(shellgame_dir, "ddp")
    a, b = weights(shellgame_dir / "fsdp/ckpt.pt"), weights(shellgame_dir / "ddp/ckpt.pt")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    proc = torchrun(shellgame_dir, "killed", "--fsdp", popen=True)
    for line in proc.stdout:  # kill the launcher and both ranks in the step after the checkpoint of iter 4
        if line.startswith("iter 5:"):
            break
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(shellgame_dir / "killed/ckpt.pt", weights_only=True)["iter_num"]
    assert saved == 4
    out = torchrun(shellgame_dir, "killed", "--fsdp", "--init_from=resume")
    assert f"iter {saved + 1}:" in out and "iter 1:" not in out
    c = weights(shellgame_dir / "killed/ckpt.pt")
    assert all(torch.allclose(a[k], c[k], rtol=0, atol=1e-6) for k in a)
    model, _ = load_model(str(shellgame_dir / "fsdp"), "cpu")  # one process, no torchrun
    assert torch.equal(model.wte.weight, a["wte.weight"])


@needs_safetensors
def test_finetune_applies_settings_given_at_their_default_values(release):
    """config/finetune_huginn.py with --backprop_depth=4 --mean_recurrence=8 (ModelConfig's defaults, and not the
    release's 2 and 4) trains and saves with 4 and 8."""
    root, src = release
    args = [a for a in FINETUNE if not a.startswith(("--mean_recurrence", "--backprop_depth"))]
    run = run_script("train.py", ROOT / "config/finetune_huginn.py", *args, f"--huginn_dir={src}", "--max_iters=1",
                     "--eval_iters=1", "--backprop_depth=4", "--mean_recurrence=8", "--out_dir=given", cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    model_args = torch.load(root / "given/ckpt.pt", weights_only=True)["model_args"]
    assert (model_args["backprop_depth"], model_args["mean_recurrence"]) == (4, 8)


@needs_safetensors
def test_a_release_given_relative_or_moved_is_found_or_named(release, tmp_path):
    """Fine-tuned with a relative --huginn_dir, the run exports from another directory; once the release has moved,
    the export and sample.py name the path and --huginn_dir in one line, and the flag finds it."""
    root, src = release
    run = run_script("train.py", *FINETUNE, f"--huginn_dir={src.name}", "--max_iters=1", "--eval_iters=1",
                     "--out_dir=rel", cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = run_script("huginn.py", f"--out_dir={root / 'rel'}", "--export_dir=exported", cwd=elsewhere)
    assert run.returncode == 0 and (elsewhere / "exported/tokenizer.json").exists(), run.stderr
    moved = tmp_path / "moved"
    src.rename(moved)
    try:
        for script, args in (("huginn.py", ["--export_dir=again"]), ("sample.py", ["--start=Hello", "--num_steps=1"])):
            run = run_script(script, f"--out_dir={root / 'rel'}", *args, cwd=elsewhere)
            err = run.stderr.strip()
            assert run.returncode == 1 and len(err.splitlines()) == 1 and str(src) in err and "--huginn_dir" in err, err
            run = run_script(script, f"--out_dir={root / 'rel'}", *args, f"--huginn_dir={moved}", "--max_new_tokens=2"
                             if script == "sample.py" else "--dtype=float32", cwd=elsewhere)
            assert run.returncode == 0, run.stderr[-2000:]
    finally:
        moved.rename(src)


@needs_safetensors
@pytest.mark.skipif(sys.platform != "linux", reason="train.py measures host memory in /proc")
def test_fsdp_loads_the_release_once_per_node(release, tmp_path):
    """torchrun, two gloo processes fine-tuning a release stored in bfloat16 (150 MiB in float32): under --fsdp rank 0
    alone reads it and every rank keeps its float32 shards, so loading raises rank 1's peak host memory by about
    half the model, and the node's by the stored copy and the shards, where under DDP each rank's rises by the whole
    model (as it did under FSDP too, each rank building the model before sharding it). The shards hold the release's
    weights exactly, tied head included; from the tiny release, an FSDP fine-tune ends with the weights of DDP."""
    root, src = release
    vocab_size = json.loads((root / "data/notes_huginn/meta.json").read_text())["vocab_size"]
    export(build(vocab_size=vocab_size, block_size=64, n_embd=768, n_head=12, intermediate_size=3072), tmp_path / "big",
           dtype=torch.bfloat16)
    released = RecurrentGPT.from_huginn(tmp_path / "big", dtype=torch.float32)
    whole = 4 * released.get_num_params()
    one_step = ["--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--eval_depths=1",
                "--learning_rate=1e-30", "--min_lr=0"]  # a step far too small to change a float32 weight
    rises = {}
    for mode in ("fsdp", "ddp"):
        out = torchrun(root, tmp_path / mode, *FINETUNE, f"--huginn_dir={tmp_path / 'big'}", *one_step,
                       *["--fsdp"] * (mode == "fsdp"), settings=[])
        rises[mode] = [int(v) << 20 for v in re.search(r"loading: peak host memory by rank .* rose by ([0-9, ]+) MiB",
                                                         out).group(1).split(", ")]
        saved = weights(tmp_path / mode / "ckpt.pt")
        assert saved.keys() == released.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in released.state_dict().items()), mode
    assert min(rises["ddp"]) > whole  # the measure sees the whole float32 model on each DDP rank
    other = min(rises["ddp"]) - whole  # what loading adds besides the weights (modules imported on first use)
    assert rises["fsdp"][1] - other < 0.7 * whole, (rises, whole)  # its shard and a tensor in flight
    assert sum(rises["fsdp"]) - 2 * other < 1.7 * whole, (rises, whole)  # the stored copy (half) and the shards
    for mode in ("fsdp", "ddp"):
        torchrun(root, tmp_path / f"tiny-{mode}", *FINETUNE, f"--huginn_dir={src}", "--eval_interval=8",
                 *["--fsdp"] * (mode == "fsdp"), settings=[])
    broken = tmp_path / "big"
    (broken / "model-00002-of-00002.safetensors").unlink()  # rank 0 cannot read it: every rank stops with its line
    _, err = torchrun(root, tmp_path / "never", *FINETUNE, f"--huginn_dir={broken}", "--fsdp", settings=[],
                      popen=True).communicate(timeout=300)
    assert err.count("error: shard model-00002-of-00002.safetensors") == 2 and "[rank" not in err, err[-3000:]
    a, b = weights(tmp_path / "tiny-fsdp/ckpt.pt"), weights(tmp_path / "tiny-ddp/ckpt.pt")
    assert not torch.equal(a["wte.weight"], RecurrentGPT.from_huginn(src).wte.weight)  # it trained
    assert torch.equal(a["lm_head.weight"], a["wte.weight"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
