"""parallel.py: one distill step and one GRPO step on 2 processes (gloo, CPU), each holding part of the
questions, give the weights that one process gets on all of them. fp32, no autocast, plain SGD so that a
wrong loss scale or a missing gradient sum shows up in the weights directly."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model as M
import parallel
from distill import DistillConfig, distill
from grpo import GRPOConfig, grpo_step
from test_distill import group
from test_evolve import TINY_RUN
from test_grpo import make_traj


def train(kind, policy, tok, trajs):
    """One optimizer step on every row given; the gradient is clipped (norm 0.01, so the clip is active) after
    the sum over processes, then SGD moves each weight by up to 0.01 * 100."""
    opt = torch.optim.SGD(policy.parameters(), lr=100.0)
    if kind == "distill":  # batch_size covers every pair: one optimizer step
        distill(policy, tok, trajs, DistillConfig(lr=100.0, batch_size=64, micro_batch=2, autocast_bf16=False,
                                                  max_grad_norm=0.01, progress=False), optimizer=opt)
    else:
        grpo_step(policy, copy.deepcopy(policy), opt, trajs, GRPOConfig(lr=100.0, kl_coef=0.1, autocast_bf16=False,
                                                                        micro_batch=2, max_grad_norm=0.01),
                  tok.pad_token_id)
    return policy.state_dict()


def questions(kind, tok):
    """Per question, its whole group; the groups differ in size and length, and one is all wrong."""
    if kind == "distill":
        return [group(tok, "q1"), group(tok, "q2")[:3], group(tok, "q3")[1:]]
    rewards = {"q1": [1, 0, 0], "q2": [0, 1], "q3": [1, 1]}
    return [[make_traj(tok, q, "Paris" + " is the answer" * g, r) for g, r in enumerate(rs)]
            for q, rs in rewards.items()]


def worker(rank, kind, init_file, out, shards):
    from transformers import AutoTokenizer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tok = AutoTokenizer.from_pretrained(M.resolve(M.EMBEDDED))
        tok.pad_token = tok.pad_token or tok.eos_token
        qs = questions(kind, tok)
        mine = [t for i in shards[rank] for t in qs[i]]
        state = train(kind, M.tiny_model("llama", vocab_size=len(tok)).train(), tok, mine)
        torch.save(state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["distill", "grpo"])
@pytest.mark.parametrize("shards", [[[0, 2], [1]], [[0, 1, 2], []]], ids=["uneven", "one-idle"])
def test_two_processes_on_halves_equal_one_process_on_everything(tmp_path, tok, kind, shards):
    alone = train(kind, M.tiny_model("llama", vocab_size=len(tok)).train(), tok,
                  [t for g in questions(kind, tok) for t in g])
    mp.spawn(worker, args=(kind, str(tmp_path / "init"), str(tmp_path / "w"), shards), nprocs=2)
    start = M.tiny_model("llama", vocab_size=len(tok)).state_dict()
    moved = max(float((alone[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # the step really moved the weights, far beyond the tolerance below
    for rank in (0, 1):
        together = torch.load(tmp_path / f"w.{rank}", weights_only=True)
        for k in alone:
            torch.testing.assert_close(together[k] - start[k], alone[k] - start[k], rtol=1e-4, atol=1e-6)


def test_torchrun_runs_evolve_on_two_processes_and_only_rank_0_writes(tmp_path, tiny_dir):
    """Every collective lines up (a mismatch would hang until the timeout) and the metrics are global."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evolve.py",
           f"--model={tiny_dir}", f"--out_dir={out}", "--rollout_dtype=float32", *TINY_RUN]
    done = subprocess.run(cmd, cwd=M.ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]  # one writer: two processes would have logged each round twice
    assert rows[0]["warmup"] and rows[0]["kept"] > 0 and (out / "round_1" / "model.safetensors").exists()
    assert done.stdout.count("round 1:") == 1


def test_alone_every_helper_is_the_identity():
    assert parallel.world() == (0, 1) and parallel.shard([1, 2, 3]) == [1, 2, 3] and parallel.all_sum(2.5) == 2.5
    assert parallel.batches(list(range(5)), 2) == [[0], [1, 2], [3, 4]] and parallel.batches([], 4) == []
    m = {"n": 3, "em": 0.5}
    assert parallel.merge_metrics(m) is m
