"""The shell game's test set of one length, read from the files prepare_data.py writes, as an lm-eval dataset."""

import json
import os

import numpy as np


def load(swaps, data_dir="data", **metadata):  # lm-eval passes the task's metadata too (its version)
    import datasets
    base = os.path.join(data_dir, "shellgame")
    paths = [os.path.join(base, f"test_{swaps}{s}.bin") for s in ("", "_targets")]
    if not all(os.path.isfile(p) for p in paths + [os.path.join(base, "meta.json")]):
        raise FileNotFoundError(f"{paths[0]} is missing: run python prepare_data.py where data/ should be")
    with open(os.path.join(base, "meta.json")) as f:
        itos = json.load(f)["itos"]
    games = np.fromfile(paths[0], dtype=np.uint16).reshape(-1, swaps + 1)
    answers = np.fromfile(paths[1], dtype=np.int16).reshape(-1, swaps + 1)[:, -1]
    docs = [{"game": "".join(itos[t] for t in g), "answer": itos[a]} for g, a in zip(games, answers)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
