"""Search-E1's self-evolution loop: python evolve.py [--key=value ...]

Read top to bottom, this is the paper's Algorithm: rounds of vanilla GRPO alternate with
self-distillation, and the only signal is exact match against the training questions' answers.

    warm-up (only when the policy cannot follow the protocol; this project's addition, see below)
    for round r = 1..R:
        GRPO: grpo_steps steps of G rollouts per question, EM reward, PPO-clip     (grpo.py)
        rollouts on the round's own training questions, EM reward                 (rollout.py, eval.py)
        self-distillation on them: ofsd (paper) or sft on kept traces             (distill.py)
        evaluate dev/test, save out_dir/round_r (a plain HF folder), log metrics.jsonl

Warm-up (not in the paper, whose 3B models follow the protocol zero-shot; warmup.py): when the base policy's
reward on a probe of training questions is 0, it is cloned on scripted traces of *training* questions. round_0
is the post-warm-up checkpoint, so the table shows what self-evolution adds beyond it.

torchrun --nproc_per_node=N evolve.py ...: each process takes a shard of every batch of questions, training
equals one process's on all of them (parallel.py), and only rank 0 prints and writes.

CPU precision: the trainable policy keeps fp32 weights (updates of 1e-5 vanish in bf16) and trains
under bf16 autocast; rollouts run on a bf16 copy (the "actor"), re-synced after every update.
"""
import copy
import ctypes
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import parallel
from checkpoint import commit, crash_point, finished_rounds, rebuild_metrics
from data.load import QUESTIONS_DIR, load_qa
from data.prepare import ensure_all
from distill import DistillConfig, distill
from eval import evaluate, summarize
from grpo import GRPOConfig, TrainingError, check_finite, count_bad_steps, grpo_step
from metrics import exact_match
from model import EMBEDDED, load_policy, save_policy
from rollout import RolloutConfig, Trajectory, rollout
from warmup import scripted_traces
from search import RetrieverError, get_retriever


@dataclass
class Config:
    model: str = EMBEDDED
    out_dir: str = "runs/evolve"
    seed: int = 0
    corpus: str = ""              # jsonl {id, contents}; "" = the embedded Wikipedia subset
    questions: str = ""           # folder of train/dev/test.jsonl (data/prepare.py:load_qa); "" = the generated set
    retriever_url: str = ""       # Search-R1 /retrieve endpoint instead of local BM25
    device: str = ""              # "" = cuda if present, else cpu
    rollout_dtype: str = "bfloat16"  # the actor's dtype (see docstring); "float32" to roll out in fp32
    on_search_error: str = "observe"  # observe: the turn reads "Search failed: ..." | stop: the run stops
    max_bad_steps: int = 3        # stop after this many optimizer steps in a row skipped for a non-finite loss
    checkpointing: bool = True    # recompute activations in backward: training's peak -1.2 GB, +35% its time
    # warm-up
    warmup: str = "auto"          # auto (when the probe's reward is 0) | on | off
    warmup_questions: int = 96
    warmup_lr: float = 2e-4
    # rounds
    rounds: int = 3
    grpo_steps: int = 1           # GRPO steps per round (0 = self-distillation only)
    grpo_questions: int = 16      # questions per GRPO step
    group_size: int = 4           # G: Search-R1 / Search-E1 use 5; 4 keeps a CPU round short
    grpo_lr: float = 2e-5         # the paper's 1e-6 is for 3B; a 135M model on a few steps needs more
    kl_coef: float = 0.001
    distill: str = "ofsd"         # ofsd (paper) | sft (kept traces) | none (GRPO only)
    distill_questions: int = 24   # training questions rolled out for self-distillation per round
    distill_lr: float = 3e-5      # chosen on dev: 1e-4 collapsed every answer to a year, 2e-5 moved nothing
    kl_topk: int = 1              # departs from the paper's full-vocabulary KL: see distill.py's kl_topk
    # rollouts and evaluation
    max_turns: int = 4
    topk: int = 3
    max_turn_tokens: int = 96
    max_obs_tokens: int = 256
    max_total_tokens: int = 640
    temperature: float = 1.0
    batch_size: int = 64          # rollout slots decoded together
    eval_questions: int = 60      # first N of dev and of test, greedy
    show: int = 2                 # sample trajectories printed per round


def parse_config(argv: list[str]) -> Config:
    cfg, fields = Config(), {f.name: f for f in dataclasses.fields(Config)}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in fields:
            sys.exit(f"bad argument {arg!r}: use --key=value with a key from:\n  " + ", ".join(fields))
        kind = type(getattr(cfg, key))
        try:
            setattr(cfg, key, value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
        except ValueError:
            sys.exit(f"--{key} needs a {kind.__name__}, got {value!r}")
    checks = [(cfg.group_size >= 2 or cfg.grpo_steps == 0, "GRPO needs group_size >= 2"),
              (cfg.distill in ("ofsd", "sft", "none"), "distill is ofsd, sft or none"),
              (cfg.warmup in ("auto", "on", "off"), "warmup is auto, on or off"),
              (cfg.rounds >= 0 and cfg.max_turns >= 1, "rounds >= 0 and max_turns >= 1"),
              (cfg.on_search_error in ("observe", "stop"), "on_search_error is observe or stop"),
              (cfg.max_bad_steps >= 1, "max_bad_steps >= 1")]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        sys.exit(f"invalid config: {bad[0]}")
    return cfg


def rollout_cfg(cfg: Config, **kw) -> RolloutConfig:
    keys = ("max_turns", "topk", "max_turn_tokens", "max_obs_tokens", "max_total_tokens", "temperature",
            "batch_size", "on_search_error")
    return RolloutConfig(**{k: getattr(cfg, k) for k in keys}, **kw)


def reward(trajs: list[Trajectory], gold: dict[str, list[str]]) -> float:
    """Exact match, and nothing else: the paper's point. Returns the mean over every process's trajectories."""
    for t in trajs:
        t.reward = exact_match(t.answer, gold[t.qid])
    return parallel.all_sum(sum(t.reward for t in trajs)) / max(parallel.all_sum(len(trajs)), 1)


def sample_trajectories(cfg, actor, tok, questions, retriever, seed, desc):
    from tqdm import tqdm
    with tqdm(total=len(questions) * cfg.group_size, desc=desc, unit="traj", leave=False, disable=None) as bar:
        return rollout(actor, tok, questions, retriever,
                       rollout_cfg(cfg, group_size=cfg.group_size, seed=seed), progress=bar)


def evaluate_all(actor, tok, questions, retriever, rc, desc):
    """Greedy agent on this process's shard of the questions; metrics over all of them."""
    m, records = evaluate(actor, tok, parallel.shard(questions), retriever, "agent", rc, desc=desc)
    return parallel.merge_metrics(m), records


def evaluate_round(cfg, actor, tok, dev, test, retriever) -> dict:
    """dev and test in one greedy rollout call: more rows decode together (rollout.py)."""
    m, records = evaluate(actor, tok, parallel.shard(dev + test), retriever, "agent", rollout_cfg(cfg), desc="eval")
    test_ids = {q["id"] for q in test}
    m_dev, m_test = (parallel.merge_metrics(summarize([r for r in records if (r["id"] in test_ids) == is_test]))
                     for is_test in (False, True))
    return {"dev_em": m_dev["em"], "test_em": m_test["em"], "test_f1": m_test["f1"],
            "searches_per_q": m_test["searches_per_q"], "gen_tokens_per_q": m_test["gen_tokens_per_q"],
            "invalid_actions": m_test["invalid_actions"], "truncated": m_test["truncated"],
            "eval_seconds": m["seconds"]}, records


def save_round(policy, tok, out: Path, r: int, metrics: dict):
    """Atomic (checkpoint.py): a temp folder, fsynced and renamed, so a half-written round is never loaded."""
    check_finite(policy, f"round {r}")
    tmp = out / f".round_{r}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tok, tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics))
    crash_point(f"save:{r}")
    commit(tmp, out / f"round_{r}")
    crash_point(f"saved:{r}")
    rebuild_metrics(out)
    plot(out)


def plot(out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib not installed: no em_by_round.png", file=sys.stderr)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("dev_em", "test_em"):
        ax.plot([m["round"] for m in rows], [m[key] for m in rows], marker="o", label=key)
    ax.set_xlabel("round (0 = after warm-up)"); ax.set_ylabel("exact match"); ax.legend(); ax.grid(alpha=.3)
    fig.tight_layout(); fig.savefig(out / "em_by_round.png", dpi=120); plt.close(fig)


def release_freed_memory():
    """glibc keeps freed tensors in its heap, so RSS only grows across rounds; a fixed 1 MB mmap threshold hands
    every large tensor back to the OS when it is freed (Linux/glibc only; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    release_freed_memory()
    rank, _ = parallel.init()
    if rank:  # every process computes; only rank 0 reports
        sys.stdout = open(os.devnull, "w")
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    t_start = time.time()
    ensure_all()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    retriever = get_retriever(cfg.corpus or None, cfg.retriever_url or None)
    splits = {s: load_qa(Path(cfg.questions or QUESTIONS_DIR) / f"{s}.jsonl") for s in ("train", "dev", "test")}
    gold = {q["id"]: q["golden_answers"] for q in splits["train"]}
    dev, test = splits["dev"][:cfg.eval_questions], splits["test"][:cfg.eval_questions]
    train = list(splits["train"])
    random.Random(cfg.seed).shuffle(train)  # a fixed order: round r always sees the same questions

    # metrics.jsonl may lag a round killed after its rename; only rank 0 rewrites it
    done = [m["round"] for m in rebuild_metrics(out)] if rank == 0 else finished_rounds(out)
    start = fresh = done[-1] if done else None
    policy, tok = load_policy(str(out / f"round_{start}") if done else cfg.model, cfg.device or None, "float32")
    policy.train()
    if cfg.checkpointing:         # same gradients (the forward is recomputed exactly); keeps the run under 6 GB
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    bad = 0  # optimizer steps skipped in a row (grpo.count_bad_steps)
    actor = copy.deepcopy(policy).to(getattr(torch, cfg.rollout_dtype)).eval()
    sync = lambda: actor.load_state_dict(policy.state_dict())
    cursor = len(splits["train"]) // 4  # the warm-up uses train[:cursor]; rounds draw from the rest

    if start is None:  # round 0: warm-up if needed, then the baseline every later round is compared with
        t0 = time.time()
        probe_m, _ = evaluate_all(actor, tok, train[cursor:cursor + 8], retriever, rollout_cfg(cfg), "probe")
        probe_reward = probe_m["em"]  # greedy on 8 training questions: cheap, and enough to see "never right"
        warm = cfg.warmup == "on" or (cfg.warmup == "auto" and probe_reward == 0)
        print(f"probe reward {probe_reward:.3f} on 8 training questions -> warm-up {'on' if warm else 'off'}")
        n_warm = 0
        if warm:
            traces = scripted_traces(tok, parallel.shard(train[:cfg.warmup_questions]), retriever, rollout_cfg(cfg))
            n_warm = int(parallel.all_sum(len(traces)))
            stats = distill(policy, tok, traces, DistillConfig(method="sft", lr=cfg.warmup_lr, per_question_cap=1,
                                                                  seed=cfg.seed))
            bad = count_bad_steps(bad, stats, cfg.max_bad_steps, "warm-up")
            print(f"warm-up: cloned {n_warm} scripted traces, loss {stats['loss']:.3f}")
            sync()
        metrics, _ = evaluate_round(cfg, actor, tok, dev, test, retriever)
        metrics = {"round": 0, **metrics, "reward_mean": probe_reward, "kept": n_warm, "warmup": warm,
                   "seconds": round(time.time() - t0, 1)}
        if rank == 0: save_round(policy, tok, out, 0, metrics)  # noqa: E701
        print("round 0:", json.dumps(metrics))
        start = 0

    # the frozen reference is round_0 (post-warm-up) in the actor's dtype, also when resuming from a later round
    ref = None if cfg.kl_coef == 0 or cfg.grpo_steps == 0 else copy.deepcopy(actor) if fresh is None else \
        load_policy(str(out / "round_0"), cfg.device or None, "float32")[0].to(actor.dtype).eval()
    per_round = cfg.grpo_steps * cfg.grpo_questions + cfg.distill_questions
    for r in range(start + 1, cfg.rounds + 1):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1000 + r)
        lo = cursor + (r - 1) * per_round
        pool = [train[(lo + i) % len(train)] for i in range(per_round)]  # wraps around on long runs
        # 1) vanilla GRPO
        gcfg = GRPOConfig(lr=cfg.grpo_lr, kl_coef=cfg.kl_coef, seed=cfg.seed + r)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.grpo_lr, weight_decay=0.0)
        g_rewards, zero_groups = [], 0
        for s in range(cfg.grpo_steps):
            qs = parallel.shard(pool[s * cfg.grpo_questions:(s + 1) * cfg.grpo_questions])
            trajs = sample_trajectories(cfg, actor, tok, qs, retriever, cfg.seed + 100 * r + s, f"r{r} grpo {s + 1}")
            g_rewards.append(reward(trajs, gold))
            crash_point(f"rollouts:{r}")
            stats = grpo_step(policy, ref, opt, trajs, gcfg, tok.pad_token_id)
            bad = count_bad_steps(bad, stats, cfg.max_bad_steps, f"round {r} grpo step {s + 1}")
            zero_groups += int(parallel.all_sum(stats["n_zero_groups"]))
            sync()
        del opt  # its AdamW moments (2x the weights) must not sit beside distill()'s own
        # 2) the policy rolls out on its own training questions, then self-distils
        qs = parallel.shard(pool[cfg.grpo_steps * cfg.grpo_questions:])
        kept = 0
        d_reward = float("nan")
        if cfg.distill != "none" and parallel.all_sum(len(qs)):
            trajs = sample_trajectories(cfg, actor, tok, qs, retriever, cfg.seed + 100 * r + 99, f"r{r} rollouts")
            d_reward = reward(trajs, gold)
            dstats = distill(policy, tok, trajs, DistillConfig(method=cfg.distill, lr=cfg.distill_lr, kl_topk=cfg.kl_topk,
                                                                  seed=cfg.seed + r))
            kept = int(parallel.all_sum(dstats["n_pairs"] or dstats["n_kept"]))
            bad = count_bad_steps(bad, dstats, cfg.max_bad_steps, f"round {r} distill")
            sync()
            for t in trajs[::cfg.group_size][:cfg.show]:  # a few, so a student sees the agent change
                print(f"  Q: {t.question}\n  -> queries {t.queries} answer {t.answer!r} reward {t.reward}")
        crash_point(f"trained:{r}")
        # 3) evaluate and checkpoint
        metrics, records = evaluate_round(cfg, actor, tok, dev, test, retriever)
        all_rewards = g_rewards + ([d_reward] if d_reward == d_reward else [])
        metrics = {"round": r, **metrics, "reward_mean": sum(all_rewards) / max(len(all_rewards), 1),
                   "grpo_reward": g_rewards, "zero_adv_groups": zero_groups, "distill_reward": d_reward,
                   "kept": kept, "seconds": round(time.time() - t0, 1)}
        if rank == 0: save_round(policy, tok, out, r, metrics)  # noqa: E701
        print(f"round {r}: dev EM {metrics['dev_em']:.3f} test EM {metrics['test_em']:.3f} "
              f"reward {metrics['reward_mean']:.3f} kept {kept} searches/q {metrics['searches_per_q']:.2f} "
              f"({metrics['seconds']:.0f} s)")
    if rank:
        return None
    rows = rebuild_metrics(out)
    print(f"\n{'round':>5} {'dev EM':>7} {'test EM':>8} {'reward':>7} {'kept':>5} {'search/q':>8} {'s':>6}")
    for m in rows:
        print(f"{m['round']:>5} {m['dev_em']:>7.3f} {m['test_em']:>8.3f} {m['reward_mean']:>7.3f} "
              f"{m['kept']:>5} {m['searches_per_q']:>8.2f} {m['seconds']:>6.0f}")
    print(f"total {time.time() - t_start:.0f} s; checkpoints and metrics.jsonl in {out}/")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (RetrieverError, TrainingError) as e:
        sys.exit(f"stopped: {e}\nfinished rounds are kept in out_dir; rerun the same command to resume")
