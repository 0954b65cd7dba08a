"""
Build a data set under data/<name>/: train.bin and val.bin of token ids, and meta.json (vocabulary,
tokenizer, dtype, layout, and what reproduces the set). Nothing here needs the network except
--dataset=shakespeare and a Hugging Face data set from the hub.

    python prepare_data.py                                  # the shell game, generated offline (default)
    python prepare_data.py --input=notes.txt                # any text file, GPT-2 BPE (tiktoken)
    python prepare_data.py --input=corpus/ --tokenizer=char # a folder (or a glob, "corpus/*.jsonl") of .txt/.jsonl
    python prepare_data.py --dataset=shakespeare --tokenizer=char
    python prepare_data.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --max_tokens=1_000_000_000
    python prepare_data.py --input=notes.txt --tokenizer=huginn --huginn_dir=huginn-0125   # to fine-tune the release
    python prepare_data.py --input=chat.jsonl --tokenizer=huginn --huginn_dir=huginn-0125  # supervised chat data

Text is streamed: read in pieces, tokenized by num_proc processes, the ids written as they come, so memory
does not grow with the corpus. Documents are the files, the records of a .jsonl ({"text": ...}) or of the
Hugging Face set; each starts with the tokenizer's BOS where it has one (GPT-2's <|endoftext|>, the release's
<|begin_text|>). The validation split is whole documents: after the first (always train), each goes to val
with probability val_fraction, a draw seeded by seed; when none did, the last one does, and a single
document gives its last val_fraction of tokens. The ids are the same whatever num_proc.

A .jsonl of {"prompt": ..., "response": ...} (and optionally "system") is chat data, for the release's
tokenizer: each example rendered in its chat format, with the loss on the response and its <|end_turn|>
alone, one example a row of row_len tokens. A longer example is cut (the prompt's start and its closing
header, the response's first part) or dropped (--long_examples=drop).

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

import collections
import concurrent.futures
import contextlib
import gc
import glob
import itertools
import json
import os
import re
import time
import urllib.request

import numpy as np
from tqdm import tqdm

from common import WriteError, atomic_write, check_settings, configure, die, int_list

# ---- settings: defaults, overridden by config files and --key=value ----
dataset = "shellgame"        # "shellgame", "shakespeare" (downloaded), or "text" (implied by --input, --hf_dataset)
input = ""                   # text: a file, a folder or a glob of .txt and .jsonl files
hf_dataset = ""              # text: a Hugging Face data set, a hub name or a local folder (needs `datasets`)
hf_config = ""               # its configuration ("" = the default)
hf_split = "train"
hf_text_field = "text"
max_tokens = 0               # text: stop after this many tokens (0 = the whole input)
tokenizer = "gpt2"           # for text: "gpt2" (tiktoken's BPE), "char", or "huginn" (the release's)
huginn_dir = ""              # the release's directory, for its tokenizer.json
num_proc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # cores
name = ""                    # data/<name>; "" = shellgame, shakespeare_<tokenizer> or <input stem>_<tokenizer>
data_dir = "data"
val_fraction = 0.1           # text: documents drawn for val (see above); chat: the last examples
row_len = 0                  # chat: tokens per row (0 = the longest example's)
long_examples = "cut"        # chat: an example longer than row_len is "cut" or "drop"ped
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
CHUNK = 1 << 20  # characters of text in a piece, and in a task of a tokenizing process
CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")  # where a piece may end: see pieces()
BOS = {"gpt2": "<|endoftext|>", "huginn": "<|begin_text|>"}  # the token that starts a document
WORKER = {}  # a tokenizing process's encoder (start_worker)


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


def input_files():
    """The files of --input: the file itself, a folder's .txt and .jsonl files (its subfolders too), or a glob's
    matches; sorted, so the document order (and the split) does not depend on the file system."""
    if os.path.isfile(input):
        return [input]
    if os.path.isdir(input):
        files = sorted(f for f in glob.glob(os.path.join(glob.escape(input), "**", "*"), recursive=True)
                       if f.endswith((".txt", ".jsonl")) and os.path.isfile(f))
        return files or die(f"--input folder {input} holds no .txt or .jsonl files")
    if any(c in input for c in "*?["):  # a glob
        return sorted(f for f in glob.glob(input, recursive=True) if os.path.isfile(f)) or die(
            f"--input={input} matches no file")
    die(f"--input file not found: {input}")


def records(path, chat):
    """The records of a .jsonl file, checked: documents {"text"}, or when chat, examples {"prompt", "response"[,
    "system"]}. Read a line at a time."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                die(f"{path}, line {n}: not JSON")
            text = isinstance(r, dict) and isinstance(r.get("text"), str)
            example = isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("prompt", "response"))
            if not (text or example and isinstance(r.get("system", ""), str)):
                die(f'{path}, line {n}: want {{"text": str}} or {{"prompt": str, "response": str[, "system": str]}}')
            if ("response" in r) != chat:
                die(f"{path}, line {n}: the input mixes documents and chat examples: one kind a data set")
            yield r


def is_chat(files):
    """Whether the input is chat data: the first record of its first .jsonl is an example (records() checks all)."""
    path = next((f for f in files if f.endswith(".jsonl")), None)
    if path is None:
        return False
    with open(path, "rb") as f:
        line = next((line for line in f if line.strip()), b"")
    try:
        r = json.loads(line)
    except ValueError:
        return False  # records() names the line
    return isinstance(r, dict) and "response" in r


def file_blocks(path):
    """A text file in blocks of CHUNK characters, never held whole; a NUL character means it is not text."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while block := f.read(CHUNK):
            if "\0" in block:
                die(f"{path} is not a text file (it holds NUL bytes): give .txt or .jsonl files")
            yield block


def hf_texts():
    """The texts of --hf_dataset, streamed record by record with the `datasets` library: a hub name, a local
    folder of parquet or json files, or a folder written by save_to_disk."""
    try:
        import datasets
        import huggingface_hub
    except ImportError:
        die("--hf_dataset needs the datasets package: pip install datasets")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # its and the hub's warnings (retries, offline) would break the one line
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        if any(os.path.isfile(os.path.join(hf_dataset, f)) for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(hf_dataset)  # written by save_to_disk: mapped from its files, not loaded
            ds = ds[hf_split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(hf_dataset, hf_config or None, split=hf_split, streaming=True)
        for r in ds:
            if not isinstance(r.get(hf_text_field), str):
                die(f"{hf_dataset} has no text field {hf_text_field!r} (its fields: {', '.join(r)}): "
                    "set --hf_text_field")
            yield r[hf_text_field]
    except Exception as e:  # the hub, the files, the network: report in one line
        cause = f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}" if str(e) else e.__class__.__name__
        die(f"could not read the Hugging Face data set {hf_dataset} ({cause}); offline? Give a local copy, "
            "--hf_dataset=path/to/folder of parquet or json files", code=1)


def download(out):
    """Tiny Shakespeare, saved as out/input.txt (then read as any text file)."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=15) as response:
            text = response.read()
    except OSError as e:
        die(f"could not download Tiny Shakespeare ({e.__class__.__name__}): offline? Save the text yourself "
            "and run python prepare_data.py --input=path/to/file.txt", code=1)
    atomic_write(os.path.join(out, "input.txt"), text)
    return [os.path.join(out, "input.txt")]


def documents(files):
    """Each document of the text input as blocks of its text: a file, a record of a .jsonl or of the Hugging Face
    data set. A generator: nothing is read before it is needed."""
    if hf_dataset:
        yield from ([text] for text in hf_texts())
    for path in files:
        if path.endswith(".jsonl"):
            yield from ([r["text"]] for r in records(path, chat=False))
        else:
            yield file_blocks(path)


def pieces(blocks):
    """The text of blocks (strings) in pieces of about CHUNK characters, each cut before a space that follows a
    non-space and precedes a letter: a BPE's regex splits there too, so the pieces tokenize as the whole text
    does. At most a piece and a block are held (a text with no such place at all, one endless word, is whole)."""
    text = ""
    for block in blocks:
        text += block
        while len(text) > CHUNK and (cut := CUT.search(text, CHUNK)):
            yield text[:cut.start()]
            text = text[cut.start():]
    if text:
        yield text


def tasks(docs, rng):
    """The tokenizers' work, in order: lists of (split, starts a document, text), about CHUNK characters each.
    The first document goes to train; each after it to val with probability val_fraction (rng's draw)."""
    task, size, started = [], 0, False
    for doc in docs:
        split = "val" if started and rng.random() < val_fraction else "train"
        for k, text in enumerate(pieces(doc)):
            started = True
            task.append((split, k == 0, text))
            size += len(text)
            if size >= CHUNK:
                yield task
                task, size = [], 0
    if task:
        yield task


def start_worker(encoder, bos, dtype):
    """Set up a tokenizing process: encoder is a tiktoken Encoding, or for --tokenizer=char the sorted
    characters (a character's id is its index, found by a binary search over their code points)."""
    if isinstance(encoder, list):
        codes = np.array([ord(c) for c in encoder], dtype=np.uint32)
        WORKER["encode"] = lambda s: np.searchsorted(codes, np.frombuffer(s.encode("utf-32-le", "surrogatepass"),
                                                                          dtype=np.uint32))
    else:
        WORKER["encode"] = encoder.encode_ordinary
    WORKER.update(bos=bos, dtype=dtype)


def encode_task(task):
    """(bytes of text, [(split, starts a document, ids)]) of one task; a document's ids start with its BOS."""
    out = []
    for split, first, text in task:
        ids = np.asarray(WORKER["encode"](text), dtype=WORKER["dtype"])
        out.append((split, first, np.insert(ids, 0, WORKER["bos"]) if first and WORKER["bos"] is not None else ids))
    return sum(len(text.encode("utf-8", "surrogatepass")) for _, _, text in task), out


def tokenized(work, worker_args):
    """encode_task over work, in order: here, or in num_proc processes when there is more than one task. At
    most two tasks a process wait at a time, so memory stays bounded however long the input."""
    first = list(itertools.islice(work, 2))
    if num_proc == 1 or len(first) < 2:
        start_worker(*worker_args)
        yield from map(encode_task, itertools.chain(first, work))
        return
    with concurrent.futures.ProcessPoolExecutor(num_proc, initializer=start_worker, initargs=worker_args) as pool:
        waiting = collections.deque()
        try:
            for task in itertools.chain(first, work):
                waiting.append(pool.submit(encode_task, task))
                if len(waiting) >= 2 * num_proc:
                    yield waiting.popleft().result()
            while waiting:
                yield waiting.popleft().result()
        except concurrent.futures.process.BrokenProcessPool:
            die(f"a tokenizing process died (out of memory?): lower --num_proc (now {num_proc})", code=1)
        finally:
            pool.shutdown(cancel_futures=True)  # after an early stop (max_tokens, an error), drop the queued tasks


def text_encoder(files):
    """(what start_worker builds the encoder from, BOS id or None, meta) for --tokenizer. The char vocabulary
    is the input's characters, gathered in a first pass (up to max_tokens of them)."""
    if tokenizer == "char":
        chars, n = set(), 0
        for block in (b for doc in documents(files) for b in doc):
            chars.update(block[:max_tokens - n] if max_tokens else block)
            n += len(block)
            if max_tokens and n >= max_tokens:
                break
        itos = sorted(chars)
        return itos, None, dict(tokenizer="char", itos=itos, vocab_size=len(itos))
    if tokenizer == "huginn":
        enc = huginn_encoding()
        meta = dict(tokenizer="huginn", vocab_size=enc.n_vocab, huginn_dir=os.path.abspath(huginn_dir))
    else:
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches the BPE file on first use
            die(f"tiktoken could not load the GPT-2 BPE ({e.__class__.__name__}): offline? Use --tokenizer=char, "
                "or run once online so tiktoken caches it", code=1)
        meta = dict(tokenizer="gpt2", vocab_size=enc.n_vocab)
    bos = enc.encode_single_token(BOS[tokenizer]) if BOS[tokenizer] in enc.special_tokens_set else None
    return enc, bos, meta


def huginn_encoding():
    from huginn import load_huginn_tokenizer
    if not huginn_dir:
        die("--tokenizer=huginn needs --huginn_dir=PATH, a local copy of the release (see the README)")
    try:
        return load_huginn_tokenizer(huginn_dir)
    except (OSError, ValueError) as e:
        die(str(e), code=1)


def chat_rows(examples, enc):
    """Chat rows: the prompt in the release's format, then the response and <|end_turn|>; the targets are the
    next token where it belongs to the response (its end included), -1 elsewhere. An example longer than
    row_len + 1 tokens (a row's inputs and the last one's target) is dropped, or cut: the prompt keeps what the
    response leaves but at least half, its start and the header that asks for the answer; the response its
    first part. Returns (rows, row_len, number cut, number dropped)."""
    from huginn import chat_prompt
    answer = enc.encode("<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n", allowed_special="all")
    end = enc.encode_single_token("<|end_turn|>")
    pairs = [(enc.encode(chat_prompt(ex["prompt"], ex.get("system", "")), allowed_special="all"),
              enc.encode_ordinary(ex["response"]) + [end]) for ex in examples]
    length = row_len or max(len(p) + len(r) - 1 for p, r in pairs)
    rows, cut, dropped = [], 0, 0
    for prompt, response in pairs:
        if len(prompt) + len(response) > length + 1:
            keep = min(len(prompt), max(length + 1 - len(response), (length + 1) // 2))
            if long_examples == "drop" or keep <= len(answer):  # drop, or even the answer header does not fit
                dropped += 1
                continue
            cut += 1
            prompt = prompt if keep == len(prompt) else prompt[:keep - len(answer)] + answer
            response = response[:length + 1 - len(prompt)]
        rows.append((prompt + response[:-1], [-1] * (len(prompt) - 1) + response))
    if not rows:
        die(f"no chat example fits a row of {length} tokens (the longest has "
            f"{max(len(p) + len(r) - 1 for p, r in pairs)}): raise --row_len"
            + (" or use --long_examples=cut" if long_examples == "drop" else ""))
    return rows, length, cut, dropped


def prepare_chat(out, files):
    enc = huginn_encoding() if tokenizer == "huginn" else die(
        "chat data (prompt and response) is for the release's tokenizer: add --tokenizer=huginn --huginn_dir=PATH")
    examples = [r for path in files for r in (records(path, chat=True) if path.endswith(".jsonl") else die(
        f"{path}: chat data comes in .jsonl files alone, not beside text files"))]
    rows, length, cut, dropped = chat_rows(examples, enc)
    print(f"chat: rows of {length} tokens; {cut} longer examples cut, {dropped} dropped (--long_examples)")
    n_val = max(1, int(len(rows) * val_fraction))
    if len(rows) - n_val < 1:
        die(f"{len(rows)} examples are too few to split into train and val: give more")
    pad = enc._special_tokens.get("<|pad|>", 0)
    splits = {"train": write_rows(out, "train", rows[:-n_val], length, pad, "int32"),
              "val": write_rows(out, "val", rows[-n_val:], length, pad, "int32")}
    return dict(tokenizer="huginn", vocab_size=enc.n_vocab, huginn_dir=os.path.abspath(huginn_dir), dtype="uint16",
                layout="rows", row_len=length, pad_id=pad, targets_dtype="int32", rows=splits,
                source=dict(input=input, files=len(files)), examples=dict(cut=cut, dropped=dropped))


def write_stream(out, files, worker_args):
    """Tokenize the documents into out/train.bin and out/val.bin as the ids come, each file renamed into place
    whole (atomic_write). Shows a bar in MiB of text with tokens/s, or when not on a terminal a line every 10 s.
    Returns {split: its documents and tokens}, the bytes of text, where in train its last document begins, and
    the seconds taken."""
    counts = {s: dict(documents=0, tokens=0) for s in ("train", "val")}
    done = dict(text_bytes=0, last_start=0, shown=time.time())
    bar = tqdm(total=sum(map(os.path.getsize, files)) or None, unit="B", unit_scale=True, unit_divisor=1024,
               disable=None)
    t0 = time.time()

    def write(writers):
        work = tasks(documents(files), np.random.default_rng(seed))
        with contextlib.closing(tokenized(work, worker_args)) as results:
            for text_bytes, pieces_ids in results:
                for split, first, ids in pieces_ids:
                    written = counts["train"]["tokens"] + counts["val"]["tokens"]
                    if max_tokens and written >= max_tokens:
                        return
                    if first and split == "train":
                        done["last_start"] = counts["train"]["tokens"]
                    ids = ids[:max_tokens - written] if max_tokens else ids
                    writers[split].write(ids.tobytes())
                    counts[split]["documents"] += first
                    counts[split]["tokens"] += len(ids)
                done["text_bytes"] += text_bytes
                rate = (counts["train"]["tokens"] + counts["val"]["tokens"]) / (time.time() - t0)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
                bar.update(text_bytes)
                if bar.disable and time.time() - done["shown"] >= 10:
                    done["shown"] = time.time()
                    print(f"tokenized {done['text_bytes'] / 2**20:,.1f} MiB of text, {rate:,.0f} tokens/s", flush=True)

    path = {s: os.path.join(out, f"{s}.bin") for s in ("train", "val")}
    gc.freeze()  # what exists now (torch, imported by common) outlives the run: collections skip it, workers share it
    try:
        atomic_write(path["train"], lambda t: atomic_write(path["val"], lambda v: write(dict(train=t, val=v))))
    finally:
        gc.unfreeze()
    bar.close()
    return counts, done["text_bytes"], done["last_start"], time.time() - t0


def move_to_val(out, start, dtype):
    """Make train's tokens from start on the validation split: val.bin written whole, then train.bin cut there
    (until meta.json is written the set is incomplete, so a crash in between leaves nothing that train.py reads)."""
    train_path, cut = os.path.join(out, "train.bin"), start * np.dtype(dtype).itemsize
    try:
        with open(train_path, "rb") as f:
            f.seek(cut)
            blocks = iter(lambda: f.read(CHUNK), b"")
            atomic_write(os.path.join(out, "val.bin"), lambda val: [val.write(b) for b in blocks])
        os.truncate(train_path, cut)
    except OSError as e:
        raise WriteError(f"could not cut {train_path}: {e.strerror}") from None


def prepare_text(out):
    files = input_files() if input else [] if hf_dataset else download(out)
    if is_chat(files):
        return prepare_chat(out, files)
    source = (dict(hf_dataset=hf_dataset, hf_config=hf_config, hf_split=hf_split, hf_text_field=hf_text_field)
              if hf_dataset else dict(input=input, files=len(files)) if input else dict(url=SHAKESPEARE_URL))
    encoder, bos, meta = text_encoder(files)
    dtype = "uint16" if meta["vocab_size"] <= 65536 else "uint32"
    print(f"text: {hf_dataset or f'{len(files)} files'}, {num_proc} tokenizing processes; documents drawn for "
          f"val with seed {seed}")
    counts, text_bytes, last_start, elapsed = write_stream(out, files, (encoder, bos, dtype))
    train, val = counts["train"], counts["val"]
    if not val["documents"] and train["tokens"]:  # none drawn for val: the last document goes, or a single one's tail
        several = train["documents"] > 1
        start = last_start if several else train["tokens"] - int(train["tokens"] * val_fraction)
        move_to_val(out, start, dtype)
        val.update(documents=int(several), tokens=train["tokens"] - start)
        train.update(documents=train["documents"] - several, tokens=start)
    if val["tokens"] < 2 or train["tokens"] < 2:
        die(f"{train['tokens'] + val['tokens']} tokens are too few to split into train and val: give a longer text")
    tokens = train["tokens"] + val["tokens"]
    print(f"tokenized {text_bytes / 2**20:,.1f} MiB of text into {tokens:,} tokens in {elapsed:.1f} s "
          f"({text_bytes / 2**20 / elapsed:,.1f} MiB/s, {tokens / elapsed:,.0f} tokens/s); "
          + ", ".join(f"{s}.bin: {c['tokens']:,} tokens of {c['documents']:,} documents" for s, c in counts.items())
          + ("" if val["documents"] else " (the document's last tokens)"))
    return dict(meta, dtype=dtype, layout="stream", tokens={s: c["tokens"] for s, c in counts.items()},
                documents={s: c["documents"] for s, c in counts.items()}, source=source, max_tokens=max_tokens,
                split=dict(seed=seed, val_fraction=val_fraction))


if __name__ == "__main__":
    config, _ = configure(globals())
    if input or hf_dataset:
        dataset = config["dataset"] = "text"
    check_settings(config, [
        ("dataset", dataset in ("shellgame", "shakespeare", "text"), "shellgame or shakespeare, or give --input=file"),
        ("hf_dataset", not (input and hf_dataset), "empty when --input is given: one source a data set"),
        ("tokenizer", tokenizer in ("gpt2", "char", "huginn"), "gpt2, char or huginn"),
        ("val_fraction", 0 < val_fraction < 1, "between 0 and 1"),
        ("num_proc", num_proc >= 1, ">= 1"), ("max_tokens", max_tokens >= 0, ">= 0 (0 = all)"),
        ("row_len", row_len >= 0, ">= 0 (0 = the longest example's)"),
        ("long_examples", long_examples in ("cut", "drop"), "cut or drop"),
        ("min_swaps", 1 <= min_swaps <= max_swaps, "between 1 and max_swaps"),
        ("train_examples", train_examples >= 1, ">= 1"), ("val_examples", val_examples >= 1, ">= 1"),
        ("test_examples", test_examples >= 1, ">= 1"), ("long_test_examples", long_test_examples >= 1, ">= 1")])
    test_swaps = int_list("test_swaps", test_swaps)
    if dataset == "text":  # the file's stem, the folder's or glob's folder name, the data set's last part
        stem = os.path.splitext(os.path.basename(re.split(r"[*?[]", hf_dataset or input)[0].rstrip("/\\")))[0]
        name = name or f"{stem or 'text'}_{tokenizer}"
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
