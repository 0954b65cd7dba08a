"""
Build a data set under data/<name>/: train.bin and val.bin of token ids, and meta.json (vocabulary,
tokenizer, dtype, layout). Nothing here needs the network except --dataset=shakespeare.

    python prepare_data.py                                  # the shell game, generated offline (default)
    python prepare_data.py --input=notes.txt                # any text file, GPT-2 BPE (tiktoken)
    python prepare_data.py --input=notes.txt --tokenizer=char
    python prepare_data.py --dataset=shakespeare --tokenizer=char

The shell game: five cups, a ball under cup 1, then n swaps of two cups, one token per swap (a..j name
the ten pairs). The target at every swap is the cup that holds the ball after it. Tracking the ball
means composing n swaps, which one fixed-depth pass cannot do for long games: each iteration of the
core block can compose more of them, so more test-time iterations give better answers.

Layouts: "stream" (text): one token stream, the target of each token is the next one. "rows" (the
shell game): fixed-length rows padded at the end, with a parallel <split>_targets.bin (int16) that
holds each position's answer or -1 where there is none, so the loss counts the answers alone.
Held-out test sets per difficulty, including longer games than training, are test_<n>.bin and
test_<n>_targets.bin (rows of exactly n + 1 tokens).
"""

import json
import os
import sys
import urllib.request

import numpy as np

from configurator import configure, die, int_list

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# the ten swaps of the shell game, named a..j: (1,2), (1,3), (1,4), (1,5), (2,3), ... (4,5)
SWAPS = [(i, j) for i in range(1, 6) for j in range(i + 1, 6)]
SHELL_ITOS = ["."] + [">"] + [chr(ord("a") + k) for k in range(10)] + ["1", "2", "3", "4", "5"]
PAD, START, FIRST_SWAP, FIRST_CUP = 0, 1, 2, 12


def shell_game(rng, n):
    """One game of n swaps as (tokens, targets), each of length n + 1: '>' with no target, then one swap
    token per swap with the cup (the token of its digit) that holds the ball after it."""
    moves = [int(m) for m in rng.integers(0, len(SWAPS), size=n)]
    return [START] + [FIRST_SWAP + m for m in moves], [-1] + [FIRST_CUP + c - 1 for c in play(moves)]


def distinct_games(rng, n, count):
    """count different games of n swaps, at most half of all 10^n: short games have few variants (100 of
    2 swaps), and the other half stays for training."""
    games = {}
    while len(games) < min(count, len(SWAPS) ** n // 2):
        game = shell_game(rng, n)
        games.setdefault(tuple(game[0]), game)
    return list(games.values())


def play(moves):
    """The cup (1..5) that holds the ball after each swap; moves index SWAPS."""
    ball, cups = 1, []
    for m in moves:
        i, j = SWAPS[m]
        ball = j if ball == i else i if ball == j else ball
        cups.append(ball)
    return cups


def write(path, data):
    """Write bytes (or an array's buffer) atomically: a crash leaves the old file or the new one, never half
    of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_rows(out, split, games, row_len):
    tokens = np.full((len(games), row_len), PAD, dtype=np.uint16)
    targets = np.full((len(games), row_len), -1, dtype=np.int16)
    for r, (x, y) in enumerate(games):
        tokens[r, :len(x)], targets[r, :len(y)] = x, y
    write(os.path.join(out, f"{split}.bin"), tokens)
    write(os.path.join(out, f"{split}_targets.bin"), targets)
    return len(games)


def prepare_shell_game(out, cfg, test_swaps):
    rng = np.random.default_rng(cfg["seed"])
    train_swaps = list(range(cfg["min_swaps"], cfg["max_swaps"] + 1))
    row_len = cfg["max_swaps"] + 1
    tests = {n: distinct_games(rng, n, cfg["test_examples"]) for n in test_swaps}
    held_out = {tuple(x) for games in tests.values() for x, _ in games}
    games = []
    # train and val never repeat a test game: a rejected game is redrawn at the same length, which keeps the
    # lengths uniform (a test set takes at most half the games of its length, so the redraw ends)
    for n in rng.choice(train_swaps, size=cfg["train_examples"] + cfg["val_examples"]):
        game = shell_game(rng, int(n))
        while tuple(game[0]) in held_out:
            game = shell_game(rng, int(n))
        games.append(game)
    splits = {"train": write_rows(out, "train", games[:cfg["train_examples"]], row_len),
              "val": write_rows(out, "val", games[cfg["train_examples"]:], row_len)}
    for n, games in tests.items():
        splits[f"test_{n}"] = write_rows(out, f"test_{n}", games, n + 1)
    return dict(tokenizer="char", itos=SHELL_ITOS, vocab_size=len(SHELL_ITOS), dtype="uint16",
                layout="rows", row_len=row_len, pad_id=PAD, train_swaps=[train_swaps[0], train_swaps[-1]],
                test_swaps=test_swaps, rows=splits, seed=cfg["seed"])


def read_text(cfg):
    if cfg["input"]:
        if not os.path.isfile(cfg["input"]):
            die(f"--input file not found: {cfg['input']}")
        with open(cfg["input"], encoding="utf-8", errors="replace") as f:
            return f.read()
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=15) as response:
            return response.read().decode("utf-8")
    except OSError as e:
        die(f"could not download Tiny Shakespeare ({e.__class__.__name__}): offline? Save the text yourself "
            "and run python prepare_data.py --input=path/to/file.txt", code=1)


def prepare_text(out, cfg):
    text = read_text(cfg)
    if cfg["tokenizer"] == "char":
        itos = sorted(set(text))
        stoi = {c: i for i, c in enumerate(itos)}
        ids, meta = [stoi[c] for c in text], dict(tokenizer="char", itos=itos, vocab_size=len(itos))
    else:
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches the BPE file on first use
            die(f"tiktoken could not load the GPT-2 BPE ({e.__class__.__name__}): offline? Use --tokenizer=char, "
                "or run once online so tiktoken caches it", code=1)
        ids, meta = enc.encode_ordinary(text), dict(tokenizer="gpt2", vocab_size=enc.n_vocab)
    dtype = "uint16" if meta["vocab_size"] <= 65536 else "uint32"
    ids = np.array(ids, dtype=dtype)
    n_val = int(len(ids) * cfg["val_fraction"])
    if n_val < 2 or len(ids) - n_val < 2:
        die(f"{len(ids)} tokens are too few to split into train and val: give a longer text")
    write(os.path.join(out, "train.bin"), ids[:-n_val])
    write(os.path.join(out, "val.bin"), ids[-n_val:])
    return dict(meta, dtype=dtype, layout="stream", tokens={"train": len(ids) - n_val, "val": n_val})


def main(argv=None):
    defaults = dict(dataset="shellgame", input="", tokenizer="gpt2", name="", data_dir="data", seed=1337,
                    val_fraction=0.1, train_examples=200_000, val_examples=2_000, test_examples=1_000,
                    min_swaps=1, max_swaps=16, test_swaps="2,4,8,12,16,20,24")
    cfg = configure(defaults, argv, usage=__doc__)
    if cfg["input"]:
        cfg["dataset"] = "text"
    if cfg["dataset"] not in ("shellgame", "shakespeare", "text"):
        die(f"dataset must be shellgame or shakespeare, or give --input=file (got {cfg['dataset']!r})")
    if cfg["tokenizer"] not in ("gpt2", "char"):
        die(f"tokenizer must be gpt2 or char (got {cfg['tokenizer']!r})")
    if not 0 < cfg["val_fraction"] < 1:
        die(f"val_fraction must be between 0 and 1 (got {cfg['val_fraction']})")
    if not 1 <= cfg["min_swaps"] <= cfg["max_swaps"]:
        die(f"need 1 <= min_swaps <= max_swaps (got {cfg['min_swaps']}, {cfg['max_swaps']})")
    for key in ("train_examples", "val_examples", "test_examples"):
        if cfg[key] < 1:
            die(f"{key} must be >= 1 (got {cfg[key]})")
    test_swaps = int_list("test_swaps", cfg["test_swaps"])
    if cfg["dataset"] == "text":
        stem = os.path.splitext(os.path.basename(cfg["input"]))[0]
        name = cfg["name"] or f"{stem}_{cfg['tokenizer']}"
    else:
        name = cfg["name"] or (cfg["dataset"] if cfg["dataset"] == "shellgame" else f"shakespeare_{cfg['tokenizer']}")
    print(f"prepare_data: {json.dumps(cfg)}")
    out = os.path.join(cfg["data_dir"], name)
    if os.path.exists(os.path.join(out, "meta.json")):  # until the new one is written, the set is incomplete
        os.remove(os.path.join(out, "meta.json"))
    meta = prepare_shell_game(out, cfg, test_swaps) if cfg["dataset"] == "shellgame" else prepare_text(out, cfg)
    meta = dict(name=name, **meta)
    write(os.path.join(out, "meta.json"), json.dumps(meta, indent=1).encode())  # last: a set with one is complete
    sizes = meta.get("tokens") or meta["rows"]
    print(f"wrote {out}: vocab {meta['vocab_size']}, layout {meta['layout']}, "
          + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
