"""Fault injection on the whole loop (evolve.py, tiny models, the real BM25 and question set): kill -9 at every
stage of a round, a retriever that is down, a model whose loss is NaN. Kills are real SIGKILLs of an evolve.py
subprocess, placed deterministically with NANO_E1_CRASH_AT (checkpoint.crash_point)."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evolve
import model as M
from rollout import build_prompt
from search import BM25, RetrieverError
from test_rollout import teach
from test_search import serve

ROOT = Path(__file__).resolve().parents[1]
# fp32 rollouts so runs compare bit for bit; a KL coefficient large enough that a wrong reference model after a
# resume changes the weights (at 0.001 its gradient vanishes in the bf16 autocast backward); groups of 8, so that
# a group of the answerer below is all right or all wrong with a chance of only 2 / 2**8
RUN = ["--rollout_dtype=float32", "--warmup=off", "--grpo_steps=1", "--grpo_questions=2", "--group_size=8",
       "--distill_questions=2", "--eval_questions=2", "--max_turn_tokens=24", "--max_total_tokens=80",
       "--max_obs_tokens=30", "--kl_coef=0.5", "--grpo_lr=1e-3", "--show=0"]


def enc(tok, s):
    return tok(s, add_special_tokens=False).input_ids


COUNTRIES = ("France", "Italy")


def probability(model, ids: list[int], mask: list[int]) -> float:
    """The probability that the model writes the masked tokens (a whole response) after the tokens before them."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    written = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return written[torch.tensor(mask[1:], dtype=torch.bool)].sum().exp().item()


def taught_dir(tmp_path_factory, tok, responses: dict[str, list[str]], seed: int, at_least: float):
    """The folder of a tiny model taught, after the prompt of each country's question, to write one of its
    responses, each with a probability above at_least. Every question of the set below is taught: what a tiny
    model writes elsewhere depends on the CPU's float rounding. It trains until the bar is met, however fast it
    gets there on this CPU."""
    model = M.tiny_model("llama", vocab_size=len(tok), seed=seed)
    rows = []
    for country in COUNTRIES:
        prompt = enc(tok, build_prompt(tok, f"What is the capital of {country}?"))
        rows += [(prompt + enc(tok, r), [0] * len(prompt) + [1] * len(enc(tok, r))) for r in responses[country]]
    for _ in range(10):
        teach(model, rows, steps=50)
        if all(probability(model, ids, mask) > at_least for ids, mask in rows):
            return M.save_policy(model, tok, tmp_path_factory.mktemp("model"))
    raise AssertionError(f"not taught: probabilities {[probability(model, ids, mask) for ids, mask in rows]}")


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """A question set whose every answer is Paris or Rome, so the answerer below is right half the time."""
    path = tmp_path_factory.mktemp("questions")
    capitals = [("France", "Paris"), ("Italy", "Rome")]
    for split, n in (("train", 24), ("dev", 2), ("test", 2)):
        qa = [{"id": f"{split}{i}", "question": f"What is the capital of {country}?", "golden_answers": [capital]}
              for i, (country, capital) in enumerate(capitals * (n // 2))]
        (path / f"{split}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    return path


@pytest.fixture(scope="module")
def answerer(tmp_path_factory, tok):
    """A tiny model that answers Paris or Rome at random, about evenly, to both questions: GRPO groups get mixed
    rewards, so rounds really train (a random model earns 0 and nothing would be trained, making "resumes
    identically" vacuous)."""
    answers = [f"<think> I know. </think>\n<answer> {a} </answer>" for a in ("Paris", "Rome")]
    return taught_dir(tmp_path_factory, tok, {c: answers for c in COUNTRIES}, seed=4, at_least=0.4)  # 0.5 at best


def args(model, out, rounds=2, *extra):
    return [f"--model={model}", f"--out_dir={out}", f"--rounds={rounds}", *RUN, *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Float rounding depends on the thread count: in-process and subprocess runs compare bit for bit only on
    one fixed count, here and in run() below."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(argv: list[str], env=None):
    """evolve.py in a subprocess (the only way to kill -9 it without killing pytest), on one thread too."""
    return subprocess.run([sys.executable, str(ROOT / "evolve.py"), *argv], cwd=ROOT, capture_output=True,
                          env={**(env or os.environ), "OMP_NUM_THREADS": "1"}, text=True)


def strip(rows):  # everything but wall-clock times (seconds, eval_seconds); json, so NaN == NaN
    return [json.dumps({k: v for k, v in m.items() if not k.endswith("seconds")}) for m in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, answerer, questions):
    out = tmp_path_factory.mktemp("uninterrupted")
    rows = evolve.main(args(answerer, out, 2, f"--questions={questions}"))
    assert all(m["zero_adv_groups"] < 2 and m["kept"] > 0 for m in rows[1:]), "rounds 1 and 2 must both train"
    return out, rows


def run_killed(point, argv):
    p = run(argv, {**os.environ, "NANO_E1_CRASH_AT": point})
    assert p.returncode == -signal.SIGKILL, f"{point}: exit {p.returncode}\n{p.stderr[-2000:]}"


def test_kill_9_at_every_stage_loses_no_finished_round_and_resumes_to_identical_results(
        tmp_path, answerer, questions, reference):
    ref_out, ref_rows = reference
    out = tmp_path / "run"
    argv = args(answerer, out, 2, f"--questions={questions}")
    weights = lambda folder, r: load_file(folder / f"round_{r}" / "model.safetensors")
    # (kill point, rounds finished at the kill, lines in metrics.jsonl at the kill)
    for point, finished, lines in [("rollouts:1", [0], 1),   # round 1: GRPO rollouts done, no update yet
                                   ("trained:1", [0], 1),    # round 1: GRPO and distillation updates done
                                   ("save:1", [0], 1),       # round 1's temp folder written, not renamed
                                   ("saved:1", [0, 1], 1),   # renamed, metrics.jsonl not yet rebuilt
                                   ("rollouts:2", [0, 1], 2)]:  # resumed from round_1, killed in round 2
        run_killed(point, argv)
        assert sorted(p.name for p in out.glob("round_*")) == [f"round_{r}" for r in finished], point
        for r in finished:  # intact: loads, and equals the uninterrupted run's round
            assert weights(out, r).keys() == weights(ref_out, r).keys()
            assert strip([json.loads((out / f"round_{r}" / "metrics.json").read_text())]) == strip([ref_rows[r]])
        assert len((out / "metrics.jsonl").read_text().splitlines()) == lines, point
        if point == "save:1":  # a half-written round must never be loaded: make loading it fail loudly
            assert (out / ".round_1.tmp" / "model.safetensors").exists()
            (out / ".round_1.tmp" / "model.safetensors").write_bytes(b"")
    rows = evolve.main(argv)
    assert strip(rows) == strip(ref_rows)
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert not list(out.glob(".*tmp"))
    for r in (0, 1, 2):
        got, want = weights(out, r), weights(ref_out, r)
        assert all(torch.equal(got[k], want[k]) for k in want), f"round {r} weights differ from the uninterrupted run"


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, tok):
    """A tiny model that searches first: with a probability over 0.95, so sampling all but always picks the
    search, and greedy decoding on any CPU (each token leads the runner-up by over ln 19 ~ 2.9 in logits, float
    rounding moves them by ~1e-5)."""
    searches = {c: [f"<search> capital of {c.lower()} </search>"] for c in COUNTRIES}
    return taught_dir(tmp_path_factory, tok, searches, seed=5, at_least=0.95)


def test_retriever_down_with_stop_ends_the_run_clearly_and_keeps_finished_rounds(tmp_path, searcher, questions):
    out = tmp_path / "run"
    evolve.main(args(searcher, out, 0, f"--questions={questions}"))  # round 0 with the local BM25
    files = lambda: [(out / "round_0" / name).read_bytes() for name in ("metrics.json", "model.safetensors")]
    before = files()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/retrieve"  # closed on exit: connections are refused
    p = run(args(searcher, out, 1, f"--questions={questions}", f"--retriever_url={url}", "--on_search_error=stop"))
    assert p.returncode == 1
    assert f"stopped: retriever {url} failed after 4 attempts" in p.stderr and "rerun the same command" in p.stderr
    assert "Traceback" not in p.stderr
    assert [x.name for x in out.iterdir() if x.name.startswith(("round", ".round"))] == ["round_0"]
    assert files() == before
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_retriever_errors_with_observe_become_observations_and_the_run_finishes(tmp_path, searcher, questions):
    bm25 = BM25([{"id": "0", "contents": '"Paris"\nParis is the capital of France.'}])
    with serve(bm25, mode="400") as (url, state):  # every request rejected at once (no retries to wait for)
        rows = evolve.main(args(searcher, tmp_path / "run", 1, f"--questions={questions}", f"--retriever_url={url}",
                                "--on_search_error=observe"))
    assert [m["round"] for m in rows] == [0, 1] and state["requests"] > 0
    assert rows[0]["searches_per_q"] >= 1 and rows[1]["test_em"] == 0  # it searched, and read only failures


def test_on_search_error_stop_raises_retriever_error_from_main(tmp_path, searcher, questions):
    bm25 = BM25([{"id": "0", "contents": '"Paris"\nParis is the capital of France.'}])
    with serve(bm25, mode="400") as (url, _):
        with pytest.raises(RetrieverError, match="HTTP 400"):
            evolve.main(args(searcher, tmp_path / "run", 0, f"--questions={questions}", f"--retriever_url={url}",
                             "--on_search_error=stop"))
    assert not list((tmp_path / "run").glob("*round_*"))


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, tok):
    model = M.tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return M.save_policy(model, tok, tmp_path_factory.mktemp("nan"))


@pytest.mark.parametrize("max_bad, error", [
    (1, r"warm-up: 1 optimizer steps in a row had a non-finite loss or gradient \(max_bad_steps=1\)"),
    (3, r"round 0: non-finite weights in \d+ tensors .*not saving them"),  # 1 skip < 3, then the save refuses
], ids=["stops-at-max_bad_steps", "refuses-to-save-nan-weights"])
def test_non_finite_steps_are_skipped_logged_and_stop_the_run_without_a_poisoned_checkpoint(
        tmp_path, nan_model, capsys, max_bad, error):
    out = tmp_path / "run"
    with pytest.raises(evolve.TrainingError, match=error):
        evolve.main(args(nan_model, out, 1, "--warmup=on", "--warmup_questions=6", f"--max_bad_steps={max_bad}"))
    assert "warm-up: skipped 1 of 1 optimizer steps (non-finite loss or gradient)" in capsys.readouterr().err
    assert not list(out.glob("*round_*"))
