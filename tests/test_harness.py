"""Contracts of harness.py, the lm-evaluation-harness model: its log-likelihoods are the model's own log-softmax,
rolling windows cover texts longer than block_size, generation stops at the stop sequence, the shipped shell-game
tasks reproduce eval.py's accuracy exactly, and a checkpoint in the release's layout runs a local multiple-choice
task with HFLM's tokenization. Tiny models, no network."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="pip install lm-eval")
import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from common import save_checkpoint  # noqa: E402
from conftest import TOY_ITOS, TOY_TEXT, make_shellgame, run_main, run_script, train_tiny  # noqa: E402
from harness import RecurrentLM  # noqa: E402
from huginn import chat_prompt  # noqa: E402
from test_huginn import build, export, needs_safetensors, reference_ids, write_tokenizer  # noqa: E402


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


@pytest.fixture
def toy_lm(tmp_path):
    """A tiny random model over the toy text's characters (block_size 64) saved as a train.py checkpoint, loaded by
    the harness at num_steps=3."""
    model = build(vocab_size=len(TOY_ITOS), block_size=64)
    save_checkpoint(dict(model=model.state_dict(), model_args=vars(model.config),
                         meta=dict(tokenizer="char", itos=TOY_ITOS)), str(tmp_path / "ckpt.pt"))
    return RecurrentLM(out_dir=str(tmp_path), num_steps=3, batch_size=3, device="cpu"), model


def direct_logprob(model, ids, n, num_steps):
    """The sum of log-softmax(model(ids)) over the last n tokens, each predicted from the tokens before it."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), num_steps=num_steps)[0][0]
    return F.log_softmax(logits, -1)[len(ids) - 1 - n:].gather(1, torch.tensor(ids[-n:])[:, None]).sum().item()


def test_loglikelihood_is_the_log_softmax_of_forward(toy_lm):
    """Requests of different lengths in one padded batch: each equals the model's own log-softmax summed over its
    continuation (1e-5), and is_greedy says whether every continuation token is the argmax."""
    lm, model = toy_lm
    with torch.no_grad():
        best = model(torch.tensor([[TOY_ITOS.index(c) for c in "3+4="]]), num_steps=3)[0][0, -1].argmax().item()
    other = TOY_ITOS[(best + 1) % len(TOY_ITOS)]
    pairs = [("3+4=", TOY_ITOS[best]), ("1+1=2;5+", "5=10;"), ("9", "+9=18;"), ("3+4=", other)]
    got = lm.loglikelihood(requests(*pairs))
    for (ctx, cont), (logp, greedy) in zip(pairs, got):
        ids = [TOY_ITOS.index(c) for c in ctx + cont]
        assert logp == pytest.approx(direct_logprob(model, ids, len(cont), 3), abs=1e-5)
        with torch.no_grad():
            argmax = model(torch.tensor([ids[:-1]]), num_steps=3)[0][0, len(ctx) - 1:].argmax(-1).tolist()
        assert greedy == (argmax == ids[len(ctx):])
    assert got[0][1] and not got[3][1]
    lm.num_steps = 1
    ids = [TOY_ITOS.index(c) for c in "".join(pairs[1])]
    assert lm.loglikelihood(requests(pairs[1]))[0][0] == pytest.approx(direct_logprob(model, ids, 5, 1), abs=1e-5)
    assert direct_logprob(model, ids, 5, 1) != pytest.approx(got[1][0], abs=1e-3)  # the depth matters here


def test_rolling_loglikelihood_covers_a_text_longer_than_block_size(toy_lm):
    """A text of 3.5 blocks: every token after the first is predicted once, in lm-eval's disjoint windows of
    block_size predictions, each read with the block_size tokens before its last prediction."""
    lm, model = toy_lm
    text = TOY_TEXT[:224]
    ids, L = [TOY_ITOS.index(c) for c in text], model.config.block_size
    expected = 0.0
    for start in range(1, len(ids), L):  # predictions ids[start:end]
        end = min(start + L, len(ids))
        first = max(0, end - 1 - L)
        expected += direct_logprob(model, ids[first:end], end - start, 3)
    got = lm.loglikelihood_rolling(requests((text,)))[0]
    assert got == pytest.approx(expected, abs=1e-4)
    short = TOY_TEXT[:40]  # within one block: the whole text after its first character, in one pass
    short_ids = [TOY_ITOS.index(c) for c in short]
    assert lm.loglikelihood_rolling(requests((short,)))[0] == pytest.approx(
        direct_logprob(model, short_ids, len(short_ids) - 1, 3), abs=1e-5)


def test_generate_until_stops_at_the_stop_sequence(toy_lm):
    """Greedy generation is model.generate's argmax text cut before the first stop sequence, and it stops there
    (no more tokens computed than needed); sampling gives max_gen_toks tokens when nothing stops it."""
    lm, model = toy_lm
    torch.manual_seed(0)
    greedy = model.generate(torch.tensor([[TOY_ITOS.index(c) for c in "3+4="]]), 12, num_steps=3, top_k=1)
    text = "".join(TOY_ITOS[i] for i in greedy[0, 4:].tolist())
    stop = text[3]
    calls = []
    forward_cached = lm.model.forward_cached
    lm.model.forward_cached = lambda *a, **k: calls.append(1) or forward_cached(*a, **k)
    out = lm.generate_until(requests(("3+4=", {"until": [stop], "max_gen_toks": 12, "do_sample": False}),
                                     ("3+4=", {"until": ["nothing"], "max_gen_toks": 12, "do_sample": False})))
    assert out == [text.split(stop)[0], text]
    stopped = requests(("3+4=", {"until": [stop], "max_gen_toks": 12, "do_sample": False}))
    calls.clear()
    lm.generate_until(stopped)
    assert len(calls) == text.index(stop) + 1  # the token holding the stop sequence is the last one computed
    lm.model.forward_cached = forward_cached
    sampled = lm.generate_until(requests(("1+", {"until": [], "max_gen_toks": 9, "do_sample": True,
                                                 "temperature": 1.0})))[0]
    assert len(sampled) == 9


def test_adaptive_exit_scores_as_generate_decides(toy_lm):
    """Under exit_threshold=0 no row ever exits, so each token runs num_steps iterations: the scores equal the
    plain forward's; a large threshold exits after two iterations and changes them. In between, where some tokens
    exit early, generate()'s greedy text is the greedy continuation: each token exits as decoding decided it (one
    pass over the whole text, exit judged at all its positions at once, picks other tokens here)."""
    lm, model = toy_lm
    pairs = [("3+4=", "7;"), ("1+1=2;5+", "5=10;")]
    plain = lm.loglikelihood(requests(*pairs))
    lm.exit_threshold = 0.0
    assert [p for p, _ in lm.loglikelihood(requests(*pairs))] == pytest.approx([p for p, _ in plain], abs=1e-4)
    lm.exit_threshold = 1e9
    assert lm.loglikelihood(requests(*pairs))[1][0] != pytest.approx(plain[1][0], abs=1e-3)
    lm.exit_threshold = 0.1
    for ctx in ("3+4=", "9"):
        out, steps = model.generate(torch.tensor([[TOY_ITOS.index(c) for c in ctx]]), 12, num_steps=3, top_k=1,
                                    exit_threshold=0.1, return_steps=True)
        assert steps.min() == 2 and steps.max() == 3
        assert lm.loglikelihood(requests((ctx, "".join(TOY_ITOS[i] for i in out[0, len(ctx):].tolist()))))[0][1]


def test_shipped_shell_game_tasks_reproduce_eval_py(tmp_path):
    """harness.py on tasks/shellgame_<n> gives eval.py's accuracy at every depth, exactly: the same games, the same
    argmax (a model trained for seconds, so its answers are far from all right or all wrong)."""
    make_shellgame(tmp_path)
    train_tiny(tmp_path, "--max_iters=60", "--eval_interval=60", "--out_dir=out", "--mean_recurrence=4")
    depths = "1,2,4,8"
    assert run_main("eval.py", ["--out_dir=out", f"--num_steps={depths}", "--device=cpu"], cwd=tmp_path) == 0
    run = run_script("harness.py", "--out_dir=out", "--tasks=shellgame_2,shellgame_8,shellgame_20",
                     f"--num_steps={depths}", "--device=cpu", "--batch_size=37", cwd=tmp_path)  # its own process:
    assert run.returncode == 0, run.stderr[-2000:]  # run as a script, it registers the model under __main__ again
    evaluated = json.loads((tmp_path / "out/eval.json").read_text())
    harness = json.loads((tmp_path / "out/harness.json").read_text())["table"]
    accuracy = {row["difficulty"]: dict(zip(evaluated["num_steps"], row["accuracy"])) for row in evaluated["rows"]}
    for n in (2, 8, 20):
        # the same count of right answers (eval.py's mean is a float32: 1e-6, where one game is 0.01)
        assert harness[f"shellgame_{n} exact_match"] == pytest.approx([accuracy[n][r] for r in (1, 2, 4, 8)], abs=1e-6)
    assert 0.3 < accuracy[2][4] < 1  # it learned something, not everything
    assert (tmp_path / "out/harness.png").exists()


MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


@needs_safetensors
def test_release_layout_runs_a_local_multiple_choice_task_as_hflm(tmp_path):
    """huginn_dir=... runs a multiple-choice task end to end, and each choice's log-likelihood is what HFLM's
    conventions give: context and continuation encoded together with the release's tokenizer file (an independent
    BPE reads it), split where the context's ids end (its trailing space moved to the continuation), no BOS, zero
    initial state, the sum of log-softmax over the continuation (1e-5)."""
    tok = write_tokenizer(tmp_path)
    model = build(vocab_size=max(t["id"] for t in tok["added_tokens"]) + 1, block_size=64)
    export(model, tmp_path)
    docs = [{"question": "The year 2025 has", "choices": ["12345 days.", "Hello world"], "answer": 0},
            {"question": "def f(x): ", "choices": ["return x", "café 東京"], "answer": 1}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(MC_TASK.format(data=tmp_path / "mc.jsonl"))
    out = lm_eval.simple_evaluate("recurrent-gpt", f"huginn_dir={tmp_path},num_steps=3,device=cpu",
                                  tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    assert "acc,none" in out["results"]["tiny_mc"]
    lm = RecurrentLM(huginn_dir=str(tmp_path), num_steps=3, device="cpu")  # --apply_chat_template: the release's format
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 * 6?"}]
    assert lm.apply_chat_template(history) == chat_prompt("7 * 6?", "Be brief.")
    for sample in out["samples"]["tiny_mc"]:
        doc = sample["doc"]
        context = doc["question"].rstrip(" ")
        for choice, (logp, _) in zip(doc["choices"], sample["filtered_resps"]):
            continuation = doc["question"][len(context):] + " " + choice  # lm-eval's target_delimiter " "
            whole, ctx = reference_ids(tok, context + continuation), reference_ids(tok, context)
            assert logp == pytest.approx(direct_logprob(model, whole, len(whole) - len(ctx), 3), abs=1e-5)
