"""Contracts of prepare_data.py on corpora: folders, globs and .jsonl files of documents, each starting with BOS; the
split by whole documents; the same ids whatever num_proc; Hugging Face data sets (local stand-ins); chat rows of a
set length; and one-line errors for bad input. The release-format tokenizer is test_huginn's tiny one."""

import json
import sys

import numpy as np
import pytest

from conftest import run_main, run_script, train_tiny
from huginn import chat_prompt, load_huginn_tokenizer
from test_huginn import write_tokenizer

WORDS = "The year 2025 has 12345 days. Hello world, def f(x): return x_1 + 42. café 東京 don't".split()


def text(rng, n_words):
    return " ".join(rng.choice(WORDS, size=n_words)) + "\n"


def prepare(tmp_path, *args, code=0):
    assert run_main("prepare_data.py", [f"--data_dir={tmp_path / 'data'}", *map(str, args)]) == code
    return tmp_path / "data"


def stream(out, dtype=np.uint16):
    return [np.fromfile(out / f"{split}.bin", dtype=dtype) for split in ("train", "val")]


def split_documents(ids, bos):
    starts = list(np.flatnonzero(ids == bos)) + [len(ids)]
    assert starts[0] == 0  # the split starts with a document's BOS
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


def test_folder_and_jsonl_documents_start_with_bos_split_whole_and_train(tmp_path):
    """A folder of .txt files (a subfolder too) and a .jsonl: each file and each record is a document that starts
    with the tokenizer's BOS; the validation split is whole documents, drawn with the seed; train.py trains on it."""
    write_tokenizer(tmp_path)
    enc = load_huginn_tokenizer(tmp_path)
    bos = enc.encode_single_token("<|begin_text|>")
    rng = np.random.default_rng(0)
    docs = [text(rng, 200) for _ in range(12)]
    (tmp_path / "corpus/more").mkdir(parents=True)
    for i, doc in enumerate(docs[:6]):
        (tmp_path / "corpus" / ("more" if i % 2 else "") / f"{i}.txt").write_text(doc)
    (tmp_path / "corpus/records.jsonl").write_text("".join(json.dumps({"text": d}) + "\n\n" for d in docs[6:]))
    (tmp_path / "corpus/notes.md").write_text("not a document: a folder gives its .txt and .jsonl files")
    data = prepare(tmp_path, f"--input={tmp_path / 'corpus'}", "--tokenizer=huginn", f"--huginn_dir={tmp_path}",
                   "--val_fraction=0.3")
    out = data / "corpus_huginn"
    meta = json.loads((out / "meta.json").read_text())
    train, val = stream(out)
    split = {s: [enc.decode(d[1:].tolist()) for d in split_documents(ids, bos)]
             for s, ids in zip(meta["tokens"], (train, val))}
    assert sorted(split["train"] + split["val"]) == sorted(docs)  # every document whole, once, after its BOS
    assert meta["documents"] == {s: len(d) for s, d in split.items()} and 1 <= len(split["val"]) < 12
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert meta["source"] == {"input": str(tmp_path / "corpus"), "files": 7} and meta["split"]["seed"] == 1337
    again = prepare(tmp_path / "b", f"--input={tmp_path / 'corpus'}", "--tokenizer=huginn", f"--huginn_dir={tmp_path}",
                    "--val_fraction=0.3", "--seed=7") / "corpus_huginn"
    assert (again / "val.bin").read_bytes() != (out / "val.bin").read_bytes()  # the seed draws the split

    train_tiny(tmp_path, "--dataset=corpus_huginn", "--block_size=16", "--max_iters=2", "--eval_interval=2",
               "--out_dir=out")
    assert (tmp_path / "out/ckpt.pt").exists()


def test_gpt2_documents_are_separated_by_endoftext(tmp_path, monkeypatch):
    """GPT-2 has no BOS of its own: <|endoftext|> starts each document, as between the documents of nanoGPT's
    openwebtext (a local byte-level stand-in for the BPE, which would be downloaded)."""
    import tiktoken
    stand_in = tiktoken.Encoding("stand-in", pat_str=r"\s+|\S+", special_tokens={"<|endoftext|>": 256},
                                 mergeable_ranks={bytes([i]): i for i in range(256)})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 30)
    train, val = stream(prepare(tmp_path, f"--input={tmp_path / '*.txt'}", "--name=docs") / "docs")
    ids = np.concatenate([train, val])
    assert train[0] == 256 and val[0] == 256 and (ids == 256).sum() == 3
    assert sorted(bytes(d[1:].tolist()).decode() for d in split_documents(ids, 256)) == [f"document {i} " * 30
                                                                                           for i in range(3)]


def test_a_long_text_is_tokenized_in_pieces_as_a_whole(monkeypatch):
    """Text read in blocks is regrouped in pieces cut where a BPE's regex splits anyway (GPT-2's here), so the ids
    are those of the whole text, and no piece grows much past CHUNK whatever the blocks."""
    import tiktoken
    import prepare_data
    gpt2_regex = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("bytes", pat_str=gpt2_regex, special_tokens={},
                            mergeable_ranks={bytes([i]): i for i in range(256)} | {b" t": 256, b" th": 257})
    whole = "".join(f"x{'  ' * (i % 3)}{',' * (i % 2)}\n{' ' * (i % 4)}the {i} Éte " for i in range(3000))
    monkeypatch.setattr(prepare_data, "CHUNK", 500)
    blocks = [whole[i:i + 137] for i in range(0, len(whole), 137)]
    pieces = list(prepare_data.pieces(blocks))
    assert len(pieces) > 20 and "".join(pieces) == whole and all(p[0] == " " for p in pieces[1:])
    assert max(map(len, pieces)) < 500 + 137
    assert [i for p in pieces for i in enc.encode_ordinary(p)] == enc.encode_ordinary(whole)


def test_ids_are_the_same_whatever_num_proc(tmp_path):
    """Many documents and one longer than a piece (1 MiB), in 1 process and in 2: the same bytes."""
    write_tokenizer(tmp_path)
    rng = np.random.default_rng(1)
    (tmp_path / "c").mkdir()
    (tmp_path / "c/big.txt").write_text(text(rng, 400_000))  # about 2.5 MiB: three pieces
    for i in range(40):
        (tmp_path / f"c/{i:02d}.txt").write_text(text(rng, 2000))
    args = [f"--input={tmp_path / 'c'}", "--tokenizer=huginn", f"--huginn_dir={tmp_path}"]
    prepare(tmp_path, *args, "--num_proc=1", "--name=p1")
    run = run_script("prepare_data.py", *args, "--num_proc=2", "--name=p2", cwd=tmp_path)  # a fresh process forks
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stdout and "train.bin" in run.stdout
    outs = [[(tmp_path / f"data/{name}/{s}.bin").read_bytes() for s in ("train", "val")] for name in ("p1", "p2")]
    assert outs[0] == outs[1] and len(outs[0][0]) > 2 << 20


def test_hugging_face_data_set_on_local_stand_ins(tmp_path, capsys):
    """--hf_dataset reads a local folder of parquet files and a save_to_disk folder (the hub's sets stream the same
    way), --max_tokens stops at that many tokens, and a missing field is one line naming the setting."""
    datasets = pytest.importorskip("datasets")
    write_tokenizer(tmp_path)
    rng = np.random.default_rng(2)
    docs = [text(rng, 30) for _ in range(40)]
    ds = datasets.Dataset.from_dict({"id": list(range(40)), "content": docs})
    ds.to_parquet(str(tmp_path / "pq/train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    tok = ["--tokenizer=huginn", f"--huginn_dir={tmp_path}", "--hf_text_field=content"]
    enc = load_huginn_tokenizer(tmp_path)
    bos = enc.encode_single_token("<|begin_text|>")
    for folder in ("pq", "saved"):
        out = prepare(tmp_path, f"--hf_dataset={tmp_path / folder}", *tok) / f"{folder}_huginn"
        ids = np.concatenate(stream(out))
        assert sorted(enc.decode(d[1:].tolist()) for d in split_documents(ids, bos)) == sorted(docs)
    out = prepare(tmp_path, f"--hf_dataset={tmp_path / 'pq'}", *tok, "--max_tokens=500", "--name=sample") / "sample"
    meta = json.loads((out / "meta.json").read_text())
    assert sum(meta["tokens"].values()) == 500 == sum(len(s) for s in stream(out))
    assert meta["source"]["hf_dataset"] == str(tmp_path / "pq") and meta["max_tokens"] == 500
    capsys.readouterr()
    prepare(tmp_path, f"--hf_dataset={tmp_path / 'pq'}", "--tokenizer=char", code=2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'text'" in err and "--hf_text_field" in err and "content" in err


def test_hugging_face_offline_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    run = run_script("prepare_data.py", "--hf_dataset=nobody/no-such-set", "--tokenizer=char", cwd=tmp_path,
                     env=dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    err = run.stderr.strip()
    assert run.returncode == 1 and len(err.splitlines()) == 1 and "offline?" in err and "nobody/no-such-set" in err
    assert not list(tmp_path.glob("data/*/meta.json"))


def test_hugging_face_without_the_package_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    prepare(tmp_path, "--hf_dataset=nobody/no-such-set", "--tokenizer=char", code=2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install datasets" in err


def test_chat_rows_cut_or_drop_a_long_example_and_train(tmp_path, capsys):
    """One very long example among short ones: at --row_len=64 it is cut (the prompt's start and the header that
    asks for the answer, the response's first part) and counted, and train.py takes the rows at block_size 64;
    --long_examples=drop leaves it out; a row too short for any response is one line naming the fix."""
    write_tokenizer(tmp_path)
    enc = load_huginn_tokenizer(tmp_path)
    examples = [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}."} for i in range(8)]
    examples.insert(3, {"prompt": "Hello world " * 40, "response": "The year 2025 " * 60})
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    tok = [f"--input={tmp_path / 'chat.jsonl'}", "--tokenizer=huginn", f"--huginn_dir={tmp_path}"]
    capsys.readouterr()
    out = prepare(tmp_path, *tok, "--row_len=64") / "chat_huginn"
    assert "1 longer examples cut, 0 dropped" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["row_len"] == 64 and meta["rows"] == {"train": 8, "val": 1} and meta["examples"]["cut"] == 1
    x = np.fromfile(out / "train.bin", dtype=np.uint16).reshape(-1, 64)[3]
    y = np.fromfile(out / "train_targets.bin", dtype=np.int32).reshape(-1, 64)[3]
    prompt = enc.encode(chat_prompt(examples[3]["prompt"]), allowed_special="all")
    answer = enc.encode("<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n", allowed_special="all")
    start = (64 + 1) // 2  # the prompt keeps half of the row's 65 tokens (inputs and the last target)
    assert x[:start - len(answer)].tolist() == prompt[:start - len(answer)]
    assert x[start - len(answer):start].tolist() == answer and (y[:start - 1] == -1).all()
    assert enc.decode(y[start - 1:].tolist()) == ("The year 2025 " * 60)[:len(enc.decode(y[start - 1:].tolist()))]
    train_tiny(tmp_path, "--dataset=chat_huginn", "--block_size=64", "--max_iters=2", "--eval_interval=2",
               "--out_dir=out")
    assert (tmp_path / "out/ckpt.pt").exists()

    dropped = prepare(tmp_path, *tok, "--row_len=64", "--long_examples=drop", "--name=dropped") / "dropped"
    assert "0 longer examples cut, 1 dropped" in capsys.readouterr().out
    assert json.loads((dropped / "meta.json").read_text())["rows"] == {"train": 7, "val": 1}
    prepare(tmp_path, *tok, "--row_len=4", code=2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "raise --row_len" in err


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "empty").mkdir() or "empty", "holds no .txt or .jsonl files"),
    (lambda p: "nothing/*.txt", "matches no file"),
    (lambda p: (p / "b.txt").write_bytes(bytes(range(256)) * 8) and "b.txt", "b.txt is not a text file"),
    (lambda p: (p / "r.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n') and "r.jsonl",
     "r.jsonl, line 3: not JSON"),
    (lambda p: (p / "m.jsonl").write_text('{"text": "ok"}\n{"prompt": "a", "response": "b"}\n') and "m.jsonl",
     "m.jsonl, line 2: the input mixes documents and chat examples"),
])
def test_bad_input_gives_one_line(tmp_path, capsys, make, message):
    prepare(tmp_path, f"--input={tmp_path / make(tmp_path)}", "--tokenizer=char", "--name=bad", code=2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "data/bad/meta.json").exists() and not list((tmp_path / "data").glob("*/*.tmp"))


def test_bench_data_runs_end_to_end(tmp_path):
    """bench_data.py on a 2 MiB corpus: both process counts report their rates and write the same ids."""
    run = run_script("bench_data.py", "--sections=speed", "--speed_mib=2", "--repeats=1",
                     f"--work_dir={tmp_path / 'bench'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "num_proc=1: " in run.stdout and "num_proc=2: " in run.stdout and "ids equal: True" in run.stdout
    assert not (tmp_path / "bench").exists()
