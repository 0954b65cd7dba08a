"""
Build a data set under data/<name>/: train.bin and val.bin of token ids, and meta.json (vocabulary,
tokenizer, dtype, layout). Nothing here needs the network except --dataset=shakespeare.

    python prepare_data.py                                  # the shell game, generated offline (default)
    python prepare_data.py --input=notes.txt                # any text file, GPT-2 BPE (tiktoken)
    python prepare_data.py --input=notes.txt --tokenizer=char
    python prepare_data.py --dataset=shakespeare --tokenizer=char
    python prepare_data.py --input=notes.txt --tokenizer=huginn --huginn_dir=huginn-0125   # to fine-tune the release
    python prepare_data.py --input=chat.jsonl --tokenizer=huginn --huginn_dir=huginn-0125  # supervised chat data

With the release's tokenizer every document starts with <|begin_text|>: a text file is one document, and a
.jsonl file holds one per line, {"text": ...}. A .jsonl of {"prompt": ..., "response": ...} (and optionally
"system") is chat data: each example rendered in the release's chat format, with the loss on the response
and its <|end_turn|> alone.

The shell game: five cups, a ball under cup 1, then n swaps of two cups, one token per swap (a..j name
the ten pairs). The target at every swap is the cup that holds the ball after it. Tracking the ball
means composing n swaps, which one fixed-depth pass cannot do for long games: each iteration of the
core block can compose more of them, so more test-time iterations give better answers.

Layouts: "stream" (text): one token stream, the target of each token is the next one. "rows" (the
shell game, chat data): fixed-length rows padded at the end, with a parallel <split>_targets.bin that
holds each position's target or -1 where there is none, so the loss counts those alone.
Held-out test sets per difficulty, including longer games than training, are test_<n>.bin and
test_<n>_targets.bin (rows of exactly n + 1 tokens).
"""

import json
import os
import re
import urllib.request

import numpy as np
from tqdm import tqdm

from common import WriteError, atomic_write, check_settings, configure, die, int_list

# ---- settings: defaults, overridden by config files and --key=value ----
dataset = "shellgame"        # "shellgame", "shakespeare" (downloaded), or "text" (implied by --input)
input = ""                   # a local text file to tokenize
tokenizer = "gpt2"           # for text: "gpt2" (tiktoken's BPE), "char", or "huginn" (the release's)
huginn_dir = ""              # the release's directory, for its tokenizer.json
name = ""                    # data/<name>; "" = shellgame, shakespeare_<tokenizer> or <input stem>_<tokenizer>
data_dir = "data"
val_fraction = 0.1           # text: the last tenth is the validation split
train_examples = 200_000     # the shell game: games in each split, and per test difficulty
val_examples = 2_000
test_examples = 1_000
long_test_examples = 200     # per test length beyond 4x max_swaps, where evaluation costs the most
min_swaps = 1                # training games have min_swaps..max_swaps swaps, uniformly
max_swaps = 16
test_swaps = "2,4,8,12,16,24,32,48,64,96,128,192,256"
seed = 1337

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# the ten swaps of the shell game, named a..j: (1,2), (1,3), (1,4), (1,5), (2,3), ... (4,5)
SWAPS = [(i, j) for i in range(1, 6) for j in range(i + 1, 6)]
SHELL_ITOS = ["."] + [">"] + [chr(ord("a") + k) for k in range(10)] + ["1", "2", "3", "4", "5"]
PAD, START, FIRST_SWAP, FIRST_CUP = 0, 1, 2, 12
CHUNK = 1 << 20  # characters per piece of a long text, tokenized one piece at a time behind a progress bar
CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")  # where a piece may end: see pieces()


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


def write_rows(out, split, rows, row_len, pad=PAD, targets_dtype="int16"):
    """rows of (tokens, targets) padded to row_len, as <split>.bin (uint16) and <split>_targets.bin."""
    tokens = np.full((len(rows), row_len), pad, dtype=np.uint16)
    targets = np.full((len(rows), row_len), -1, dtype=targets_dtype)
    for r, (x, y) in enumerate(rows):
        tokens[r, :len(x)], targets[r, :len(y)] = x, y
    atomic_write(os.path.join(out, f"{split}.bin"), tokens.tobytes())
    atomic_write(os.path.join(out, f"{split}_targets.bin"), targets.tobytes())
    return len(rows)


def prepare_shell_game(out, test_swaps):
    rng = np.random.default_rng(seed)
    train_swaps = list(range(min_swaps, max_swaps + 1))
    row_len = max_swaps + 1
    tests = {n: distinct_games(rng, n, test_examples if n <= 4 * max_swaps else long_test_examples)
             for n in test_swaps}
    held_out = {tuple(x) for games in tests.values() for x, _ in games}
    games = []
    # train and val never repeat a test game: a rejected game is redrawn at the same length, which keeps the
    # lengths uniform (a test set takes at most half the games of its length, so the redraw ends)
    for n in rng.choice(train_swaps, size=train_examples + val_examples):
        game = shell_game(rng, int(n))
        while tuple(game[0]) in held_out:
            game = shell_game(rng, int(n))
        games.append(game)
    splits = {"train": write_rows(out, "train", games[:train_examples], row_len),
              "val": write_rows(out, "val", games[train_examples:], row_len)}
    for n, games in tests.items():
        splits[f"test_{n}"] = write_rows(out, f"test_{n}", games, n + 1)
    return dict(tokenizer="char", itos=SHELL_ITOS, vocab_size=len(SHELL_ITOS), dtype="uint16", layout="rows",
                row_len=row_len, pad_id=PAD, targets_dtype="int16", train_swaps=[train_swaps[0], train_swaps[-1]],
                test_swaps=test_swaps, rows=splits, seed=seed)


def read_text():
    if input:
        if not os.path.isfile(input):
            die(f"--input file not found: {input}")
        with open(input, encoding="utf-8", errors="replace") as f:
            return f.read()
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=15) as response:
            return response.read().decode("utf-8")
    except OSError as e:
        die(f"could not download Tiny Shakespeare ({e.__class__.__name__}): offline? Save the text yourself "
            "and run python prepare_data.py --input=path/to/file.txt", code=1)


def pieces(text, size):
    """text cut into pieces of about size characters, each cut before a space that follows a non-space and
    precedes a letter: a BPE's regex splits there too, so the pieces tokenize as the whole text does."""
    start = 0
    while start < len(text):
        cut = CUT.search(text, start + size) if start + size < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[start:end]
        start = end


def tokenize(text, encode):
    """encode(text) piece by piece, behind a progress bar (on a terminal) when there are several."""
    n = len(text) // CHUNK + 1
    ids = [encode(p) for p in tqdm(pieces(text, CHUNK), total=n, unit="MB", disable=None if n > 1 else True)]
    return [i for piece in ids for i in piece]


def read_jsonl():
    """The records of a .jsonl input: documents {"text"} or chat examples {"prompt", "response"[, "system"]}."""
    records = []
    with open(input, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                die(f"{input}, line {n}: not JSON")
            text = isinstance(r, dict) and isinstance(r.get("text"), str)
            chat = isinstance(r, dict) and all(isinstance(r.get(k, ""), str) and k in r for k in ("prompt", "response"))
            if not (text or chat and isinstance(r.get("system", ""), str)):
                die(f'{input}, line {n}: want {{"text": str}} or {{"prompt": str, "response": str[, "system": str]}}')
            records.append(r)
    kinds = {"chat" if "response" in r else "text" for r in records}
    if len(kinds) != 1:
        die(f"{input} holds no records" if not kinds else f"{input} mixes documents and chat examples: one kind a file")
    return records, kinds.pop()


def huginn_encoding():
    from huginn import load_huginn_tokenizer
    if not huginn_dir:
        die("--tokenizer=huginn needs --huginn_dir=PATH, a local copy of the release (see the README)")
    try:
        return load_huginn_tokenizer(huginn_dir)
    except (OSError, ValueError) as e:
        die(str(e), code=1)


def prepare_chat(out, examples, enc):
    """Chat rows: the prompt in the release's format, then the response and <|end_turn|>; the targets are the
    next token where it belongs to the response (its end included), -1 elsewhere."""
    from huginn import chat_prompt
    rows = []
    for ex in examples:
        prompt = enc.encode(chat_prompt(ex["prompt"], ex.get("system", "")), allowed_special="all")
        full = prompt + enc.encode_ordinary(ex["response"]) + [enc.encode_single_token("<|end_turn|>")]
        rows.append((full[:-1], [-1] * (len(prompt) - 1) + full[len(prompt):]))
    n_val = max(1, int(len(rows) * val_fraction))
    if len(rows) - n_val < 1:
        die(f"{len(rows)} examples are too few to split into train and val: give more")
    row_len = max(len(x) for x, _ in rows)
    pad = enc._special_tokens.get("<|pad|>", 0)
    splits = {"train": write_rows(out, "train", rows[:-n_val], row_len, pad, "int32"),
              "val": write_rows(out, "val", rows[-n_val:], row_len, pad, "int32")}
    return dict(dtype="uint16", layout="rows", row_len=row_len, pad_id=pad, targets_dtype="int32", rows=splits)


def prepare_text(out):
    records, kind = read_jsonl() if input.endswith(".jsonl") else ([{"text": read_text()}], "text")
    if tokenizer == "huginn":
        enc = huginn_encoding()
        meta = dict(tokenizer="huginn", vocab_size=enc.n_vocab, huginn_dir=os.path.abspath(huginn_dir))
        if kind == "chat":
            return dict(meta, **prepare_chat(out, records, enc))
        bos = enc.encode_single_token("<|begin_text|>")
        ids = [i for r in records for i in [bos] + tokenize(r["text"], enc.encode_ordinary)]  # BOS starts each
    elif input.endswith(".jsonl"):
        die("a .jsonl input is for the release's tokenizer: add --tokenizer=huginn --huginn_dir=PATH")
    elif tokenizer == "char":
        text = records[0]["text"]
        itos = sorted(set(text))
        stoi = {c: i for i, c in enumerate(itos)}
        ids, meta = tokenize(text, lambda s: [stoi[c] for c in s]), dict(tokenizer="char", itos=itos,
                                                                       vocab_size=len(itos))
    else:
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches the BPE file on first use
            die(f"tiktoken could not load the GPT-2 BPE ({e.__class__.__name__}): offline? Use --tokenizer=char, "
                "or run once online so tiktoken caches it", code=1)
        ids, meta = tokenize(records[0]["text"], enc.encode_ordinary), dict(tokenizer="gpt2", vocab_size=enc.n_vocab)
    dtype = "uint16" if meta["vocab_size"] <= 65536 else "uint32"
    ids = np.array(ids, dtype=dtype)
    n_val = int(len(ids) * val_fraction)
    if n_val < 2 or len(ids) - n_val < 2:
        die(f"{len(ids)} tokens are too few to split into train and val: give a longer text")
    atomic_write(os.path.join(out, "train.bin"), ids[:-n_val].tobytes())
    atomic_write(os.path.join(out, "val.bin"), ids[-n_val:].tobytes())
    return dict(meta, dtype=dtype, layout="stream", tokens={"train": len(ids) - n_val, "val": n_val})


if __name__ == "__main__":
    config = configure(globals())
    if input:
        dataset = config["dataset"] = "text"
    check_settings(config, [
        ("dataset", dataset in ("shellgame", "shakespeare", "text"), "shellgame or shakespeare, or give --input=file"),
        ("tokenizer", tokenizer in ("gpt2", "char", "huginn"), "gpt2, char or huginn"),
        ("val_fraction", 0 < val_fraction < 1, "between 0 and 1"),
        ("min_swaps", 1 <= min_swaps <= max_swaps, "between 1 and max_swaps"),
        ("train_examples", train_examples >= 1, ">= 1"), ("val_examples", val_examples >= 1, ">= 1"),
        ("test_examples", test_examples >= 1, ">= 1"), ("long_test_examples", long_test_examples >= 1, ">= 1")])
    test_swaps = int_list("test_swaps", test_swaps)
    if dataset == "text":
        name = name or f"{os.path.splitext(os.path.basename(input))[0]}_{tokenizer}"
    else:
        name = name or (dataset if dataset == "shellgame" else f"shakespeare_{tokenizer}")
    print(f"prepare_data: {json.dumps(config)}")
    out = os.path.join(data_dir, name)
    if os.path.exists(os.path.join(out, "meta.json")):  # until the new one is written, the set is incomplete
        os.remove(os.path.join(out, "meta.json"))
    try:
        meta = dict(name=name, **(prepare_shell_game(out, test_swaps) if dataset == "shellgame" else prepare_text(out)))
        atomic_write(os.path.join(out, "meta.json"), json.dumps(meta, indent=1).encode())  # last: it completes the set
    except WriteError as e:
        die(f"{e}: {out} is incomplete (no meta.json); free some space and run prepare_data.py again", code=1)
    sizes = meta.get("tokens") or meta["rows"]
    print(f"wrote {out}: vocab {meta['vocab_size']}, layout {meta['layout']}, "
          + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
