"""
Benchmark prepare_data.py on a generated corpus, offline: tokenizing speed with 1 and with num_proc processes
beside what the cores allow at that moment (a CPU loop in as many processes, measured first), and peak memory
on a small and a large corpus (which must stay flat), with the ids compared across process counts (sha256 of
train.bin and val.bin).

    python bench_data.py                                        # both sections (minutes; about 3 GB under work_dir)
    python bench_data.py --sections=speed --speed_mib=64         # only the speed

The corpus is a folder of .txt files (sizes log-uniform from 2 KiB to 4 MiB) and one .jsonl of short records,
of words drawn from a Zipf law. The tokenizer is a byte-level BPE in the release's tokenizer.json format whose
merges spell those words (about 22,000 ids), so the work per byte is a real BPE's.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from common import check_settings, configure, die
from huginn import bytes_to_unicode

# ---- settings: defaults, overridden by config files and --key=value ----
sections = "speed,memory"
speed_mib = 64               # corpus of the speed section
repeats = 2                  # speed runs of each process count (the best is reported)
num_proc = 2                 # processes compared with one
memory_mib = "100,1024"      # corpora of the memory section: peak RSS of the largest within 1.5x of the smallest's
memory_tokenizer = "char"    # "char" or "huginn" (the BPE above) for the memory section
work_dir = "/tmp/bench_data"  # corpora and data sets, deleted at the end
seed = 1337

ROOT = os.path.dirname(os.path.abspath(__file__))
SPECIALS = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>"]
GPT2_REGEX = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def vocabulary(rng, n=3000):
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1 / np.arange(1, 27)
    return sorted({"".join(rng.choice(letters, size=rng.integers(2, 11), p=p / p.sum())) for _ in range(n)})


def write_corpus(path, mib, words, rng):
    """Files of words (Zipf-distributed) in sentences and paragraphs, mib MiB in all; a tenth in one .jsonl."""
    zipf = 1 / np.arange(1, len(words) + 1)
    paragraphs = []
    for _ in range(4096):
        ws = rng.choice(words, size=rng.integers(20, 200), p=zipf / zipf.sum())
        ends = [".", ",", "!", "?", f" {rng.integers(1, 2026)}."]
        sentences = [" ".join(ws[i:i + 12]).capitalize() + rng.choice(ends) for i in range(0, len(ws), 12)]
        paragraphs.append(" ".join(sentences) + "\n\n")
    os.makedirs(path, exist_ok=True)
    left, k = mib << 20, 0
    with open(os.path.join(path, "records.jsonl"), "w") as f:
        for i in rng.integers(len(paragraphs), size=left // 10 // 1000):
            f.write(json.dumps({"text": paragraphs[i]}) + "\n")
    left -= os.path.getsize(os.path.join(path, "records.jsonl"))
    while left > 0:
        size = min(left, int(np.exp(rng.uniform(np.log(2 << 10), np.log(4 << 20)))))
        text = "".join(paragraphs[i] for i in rng.integers(len(paragraphs), size=size // 500 + 1))[:size]
        with open(os.path.join(path, f"doc_{k:06d}.txt"), "w") as f:
            f.write(text)
        left, k = left - len(text), k + 1


def write_tokenizer(path, words):
    """A tokenizer.json in the release's format: the 256 bytes, then every prefix of each word (with and without
    its leading space) by length, so BPE merges a word back letter by letter; then the special tokens."""
    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    spelled = ["".join(chars[b] for b in w.encode()) for w in words]
    prefixes = sorted({w[:k] for w in spelled + [chars[32] + w for w in spelled] for k in range(2, len(w) + 1)},
                      key=lambda s: (len(s), s))
    merges = [f"{p[:-1]} {p[-1]}" for p in prefixes]
    for p in prefixes:
        vocab[p] = len(vocab)
    added = [{"id": len(vocab) + i, "content": s, "special": True} for i, s in enumerate(SPECIALS)]
    tok = {"added_tokens": added, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    return len(vocab) + len(added)


def tree_rss(pid):
    """Resident bytes of pid and its descendants (Linux /proc): their proportional set sizes, which count a page
    shared by several processes (the forked workers share the parent's) once in all."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) << 10
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass  # the process ended meanwhile
    return total


def spin(n):
    return sum(range(n))  # a fixed amount of CPU work


def ceiling(procs, n=30_000_000):
    """How much faster procs processes run procs equal CPU loads than one process does, now: what the cores
    allow this moment (other work on them lowers it), the bound on any speedup of prepare_data.py."""
    t0 = time.time()
    for _ in range(procs):
        spin(n)
    serial = time.time() - t0
    with concurrent.futures.ProcessPoolExecutor(procs) as pool:
        list(pool.map(spin, [1] * procs))  # the processes started before the clock
        t0 = time.time()
        list(pool.map(spin, [n] * procs))
    return serial / (time.time() - t0)


def prepare(corpus, name, procs, *args):
    """prepare_data.py on corpus: its tokenizing MiB/s and tokens/s as it prints them, wall seconds, CPU seconds
    of its processes, their peak RSS together, the sha256 of train.bin and val.bin, and the load average before."""
    cmd = [sys.executable, os.path.join(ROOT, "prepare_data.py"), f"--input={corpus}", f"--name={name}",
           f"--data_dir={work_dir}/data", f"--num_proc={procs}", *args]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # not on Windows
    cpu = os.times()  # its children's CPU time counts once it has ended
    t0, peak = time.time(), 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    while proc.poll() is None:
        if sys.platform == "linux":
            peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        die(f"prepare_data.py failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}", code=1)
    wall = time.time() - t0
    used = os.times()
    cpu = used.children_user + used.children_system - cpu.children_user - cpu.children_system
    rates = re.search(r"\(([\d,.]+) MiB/s, ([\d,]+) tokens/s\)", out)
    digest = hashlib.sha256()
    for split in ("train", "val"):
        with open(f"{work_dir}/data/{name}/{split}.bin", "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    shutil.rmtree(f"{work_dir}/data/{name}")
    return dict(mib_s=float(rates[1].replace(",", "")), tokens_s=int(rates[2].replace(",", "")), wall=wall, cpu=cpu,
                peak=peak, sha256=digest.hexdigest(), load=load)


def line(run):
    return (f"{run['mib_s']:.2f} MiB/s, {run['tokens_s']:,} tokens/s tokenizing; {run['wall']:.1f} s in all, "
            f"{run['cpu']:.1f} CPU s, peak RSS {run['peak'] / 2**20:,.0f} MiB (load average {run['load']:.1f})")


if __name__ == "__main__":
    config, _ = configure(globals())
    chosen = sections.split(",")
    check_settings(config, [("sections", set(chosen) <= {"speed", "memory"}, "a choice of speed, memory"),
                            ("num_proc", num_proc >= 2, ">= 2"), ("speed_mib", speed_mib >= 1, ">= 1"),
                            ("repeats", repeats >= 1, ">= 1"),
                            ("memory_tokenizer", memory_tokenizer in ("char", "huginn"), "char or huginn")])
    sizes = [int(m) for m in memory_mib.split(",")]
    print(f"bench_data: {json.dumps(config)}; {os.cpu_count()} cores, {sys.platform}")
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    n_vocab = write_tokenizer(f"{work_dir}/tokenizer", words)
    huginn = ["--tokenizer=huginn", f"--huginn_dir={work_dir}/tokenizer"]
    try:
        if "speed" in chosen:
            write_corpus(f"{work_dir}/speed", speed_mib, words, rng)
            print(f"speed: {speed_mib} MiB corpus, the release-format BPE of {n_vocab:,} ids, best of {repeats}")
            runs, ceilings = {p: [] for p in (1, num_proc)}, []
            for _ in range(repeats):  # alternated, so that a busy moment does not fall on one side only
                ceilings.append(ceiling(num_proc))
                for p in runs:
                    runs[p].append(prepare(f"{work_dir}/speed", "speed", p, *huginn))
            best = {p: max(r, key=lambda run: run["tokens_s"]) for p, r in runs.items()}
            for p, run in best.items():
                print(f"  num_proc={p}: {line(run)}")
            print(f"  speedup {best[num_proc]['tokens_s'] / best[1]['tokens_s']:.2f}x (the cores allowed "
                  f"{', '.join(f'{c:.2f}x' for c in ceilings)} just before, a CPU loop in {num_proc} processes); "
                  f"ids equal: {len({run['sha256'] for r in runs.values() for run in r}) == 1}")
            shutil.rmtree(f"{work_dir}/speed")
        if "memory" in chosen:
            args = huginn if memory_tokenizer == "huginn" else ["--tokenizer=char"]
            peaks = {}
            for mib in sizes:
                write_corpus(f"{work_dir}/mem", mib, words, rng)
                run = prepare(f"{work_dir}/mem", "mem", num_proc, *args)
                peaks[mib] = run["peak"]
                print(f"memory: {mib:,} MiB corpus ({memory_tokenizer}), num_proc={num_proc}: {line(run)}")
                if mib == sizes[-1]:
                    one = prepare(f"{work_dir}/mem", "mem", 1, *args)
                    print(f"  num_proc=1: {line(one)}; ids equal: {one['sha256'] == run['sha256']}")
                shutil.rmtree(f"{work_dir}/mem")
            print(f"  peak RSS at {sizes[-1]:,} MiB / at {sizes[0]:,} MiB: {peaks[sizes[-1]] / peaks[sizes[0]]:.2f}x")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
