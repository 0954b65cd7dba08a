"""Contracts of prepare_data.py: the shell game's generator, the text tokenizers, the offline download (corpora:
test_corpus.py)."""

import json
import urllib.request

import numpy as np
import pytest
import tiktoken

import prepare_data
from conftest import run_main

TINY = ["--train_examples=6000", "--val_examples=500", "--test_examples=200", "--long_test_examples=30"]


def prepare(tmp_path, *args, code=0):
    """prepare_data.py with args, writing under tmp_path/data; it must exit with code."""
    assert run_main("prepare_data.py", [f"--data_dir={tmp_path / 'data'}", *args]) == code
    return tmp_path / "data"


def rows(path, n):
    return np.fromfile(path, dtype=np.uint16 if "targets" not in path.name else np.int16).reshape(-1, n)


def simulate(tokens):
    """An independent simulation: keep the cups as a permutation and ask where cup 1's ball went."""
    under = [1, 2, 3, 4, 5]  # under[position] = the ball's original cup... only cup 1 holds a ball
    pairs = [(a, b) for a in range(5) for b in range(a + 1, 5)]
    answers = []
    for t in tokens:
        a, b = pairs[t - prepare_data.FIRST_SWAP]
        under[a], under[b] = under[b], under[a]
        answers.append(prepare_data.FIRST_CUP + under.index(1))
    return answers


def test_shell_game_is_reproducible_correct_and_held_out(tmp_path):
    a = prepare(tmp_path / "a", *TINY)
    b = prepare(tmp_path / "b", *TINY)
    c = prepare(tmp_path / "c", *TINY, "--seed=7")
    for name in ("train.bin", "train_targets.bin", "val.bin", "test_8.bin", "test_24_targets.bin", "test_256.bin"):
        assert (a / "shellgame" / name).read_bytes() == (b / "shellgame" / name).read_bytes()
    assert (a / "shellgame" / "train.bin").read_bytes() != (c / "shellgame" / "train.bin").read_bytes()

    meta = json.loads((a / "shellgame" / "meta.json").read_text())
    assert meta["layout"] == "rows" and meta["row_len"] == 17 and meta["vocab_size"] == 17
    assert meta["train_swaps"] == [1, 16] and meta["test_swaps"] == [2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    x, y = rows(a / "shellgame" / "train.bin", 17), rows(a / "shellgame" / "train_targets.bin", 17)
    lengths = (x != prepare_data.PAD).sum(1) - 1
    for row, target, n in zip(x[:500], y[:500], lengths[:500]):
        assert row[0] == prepare_data.START and target[0] == -1
        assert list(target[1:n + 1]) == simulate(row[1:n + 1]) and (target[n + 1:] == -1).all()
    counts = np.bincount(lengths, minlength=17)[1:]
    assert counts.min() > 0.8 * len(x) / 16 and counts.max() < 1.2 * len(x) / 16  # uniform over 1..16

    train = {tuple(r[:n + 1]) for r, n in zip(x, lengths)}
    for n in meta["test_swaps"]:
        tx, ty = rows(a / "shellgame" / f"test_{n}.bin", n + 1), rows(a / "shellgame" / f"test_{n}_targets.bin", n + 1)
        count = 200 if n <= 64 else 30  # fewer of the longest games, which cost the most to evaluate
        assert len(tx) == min(count, 10 ** n // 2) == len({tuple(r) for r in tx})  # distinct; half of n=2's 100
        assert list(ty[0, 1:]) == simulate(tx[0, 1:])
        assert not any(tuple(r) in train for r in tx)


def test_char_text_round_trip(tmp_path):
    text = "To be, or not to be: that is the question.\n" * 50
    (tmp_path / "play.txt").write_text(text)
    out = prepare(tmp_path, f"--input={tmp_path / 'play.txt'}", "--tokenizer=char") / "play_char"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["layout"] == "stream" and meta["dtype"] == "uint16" and meta["tokenizer"] == "char"
    ids = np.concatenate([np.fromfile(out / "train.bin", dtype=np.uint16), np.fromfile(out / "val.bin", dtype=np.uint16)])
    assert "".join(meta["itos"][i] for i in ids) == text
    assert meta["tokens"] == {"train": len(ids) - len(ids) // 10, "val": len(ids) // 10}


def test_gpt2_tokenizer_path_on_a_local_stand_in(tmp_path, monkeypatch):
    """The GPT-2 path tokenizes with whatever tiktoken gives (here a local byte-level stand-in, since the
    real BPE file would be downloaded)."""
    stand_in = tiktoken.Encoding("stand-in", pat_str=r"\s+|\S+", special_tokens={},
                                 mergeable_ranks={bytes([i]): i for i in range(256)})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    (tmp_path / "t.txt").write_text("hello world " * 40)
    out = prepare(tmp_path, f"--input={tmp_path / 't.txt'}") / "t_gpt2"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 256
    assert bytes(np.fromfile(out / "train.bin", dtype=np.uint16)[:11].tolist()) == b"hello world"


def test_offline_gpt2_and_shakespeare_fail_in_one_line(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    (tmp_path / "t.txt").write_text("hello world " * 40)
    prepare(tmp_path, f"--input={tmp_path / 't.txt'}", code=1)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tokenizer=char" in err
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: offline() or None)
    prepare(tmp_path, "--dataset=shakespeare", "--tokenizer=char", code=1)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--input=" in err
    assert not (tmp_path / "data" / "shakespeare_char").exists()


def test_shakespeare_download_on_a_local_stand_in(tmp_path, monkeypatch):
    (tmp_path / "tiny.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, **kw: urlopen((tmp_path / "tiny.txt").as_uri()))
    out = prepare(tmp_path, "--dataset=shakespeare", "--tokenizer=char") / "shakespeare_char"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["name"] == "shakespeare_char" and "F" in meta["itos"]


@pytest.mark.parametrize("args, message", [
    (["--batch=3"], "unknown setting --batch"),
    (["--seed=abc"], "seed"),
    (["--tokenizer=bpe"], "tokenizer must be"),
    (["--min_swaps=5", "--max_swaps=3"], "min_swaps"),
    (["--test_swaps=2,x"], "test_swaps"),
    (["--input=/no/such/file.txt"], "not found"),
    (["missing_config.py"], "config file not found"),
])
def test_bad_flags_give_one_line(tmp_path, capsys, args, message):
    assert run_main("prepare_data.py", [f"--data_dir={tmp_path / 'data'}", *args]) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
