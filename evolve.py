"""Search-E1's self-evolution loop: python evolve.py [--key=value ...]

Read top to bottom, this is the paper's Algorithm: rounds of vanilla GRPO alternate with self-distillation
(OFSD in the paper's v1, OPSD in v2), and the only signal is exact match against the training questions' answers.

    warm-up (only when the policy cannot follow the protocol; this project's addition: warmup.py)
    for round r = 1..R:
        GRPO: grpo_steps steps of G rollouts per question, EM reward, PPO-clip     (grpo.py)
        rollouts on the round's own training questions, EM reward                 (rollout.py, metrics.py)
        self-distillation on them: opsd (paper) or sft on kept traces             (distill.py)
        evaluate on dev (test at round 0 and the last round only), save out_dir/round_r, log metrics.jsonl

One budget per round, whatever the variant (ablate.py): the same questions (round_questions), G rollouts each, grpo_steps +
distill_steps optimizer steps, one learning rate. GRPO and distillation each have their own AdamW, kept across
rounds and saved with each round (train.py says why); distillation's has no weight decay: decay would be the one
force on the weights where the KL gradient is 0 (the no-hint control), and would make that control's KL non-zero.
The teacher of self-distillation is the post-GRPO policy, frozen for the phase (distill.py). torchrun
--nproc_per_node=N evolve.py ...: each process takes a shard of every batch of questions, training equals one
process's on all of them (parallel.py).

Precision: the trainable policy keeps fp32 weights (updates of 1e-5 vanish in bf16); rollouts run on the actor, a
copy re-synced after every update. Where bf16 is fast (GPUs, CPUs with AMX or AVX-512 BF16) the actor is bf16 and
training runs under bf16 autocast; elsewhere both stay fp32 (model.bf16_is_faster). The GRPO reference and the
distillation teacher are fp32 copies run under the policy's autocast: one precision for every KL and log-ratio.
"""
import copy
import ctypes
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

import parallel
from checkpoint import crash_point, finished_rounds, phase, print_summary, rebuild_metrics, save_round
from config import Config, parse_config
from data.load import QUESTIONS_DIR, load_qa, training_order
from data.prepare import ensure_all
from distill import DistillConfig, distill
from eval import by_hop, evaluate, summarize
from grpo import GRPOConfig, grpo_step
from metrics import exact_match
from model import load_policy, machine, pick_device_dtype
from rollout import RolloutConfig, Trajectory, rollout
from search import RetrieverError, get_retriever
from train import TrainingError, count_bad_steps, load_optimizer, make_optimizer
from warmup import warm_up


def rollout_cfg(cfg: Config, **kw) -> RolloutConfig:
    keys = ("max_turns", "topk", "max_turn_tokens", "max_obs_tokens", "max_total_tokens", "temperature",
            "batch_size", "on_search_error")
    return RolloutConfig(**{**{k: getattr(cfg, k) for k in keys}, **kw})


def reward(trajs: list[Trajectory], gold: dict[str, list[str]]) -> float:
    """Exact match, and nothing else: the paper's point. Returns the mean over every process's trajectories."""
    for t in trajs:
        t.reward = exact_match(t.answer, gold[t.qid])
    return parallel.all_sum(sum(t.reward for t in trajs)) / max(parallel.all_sum(len(trajs)), 1)


def sample_trajectories(cfg, actor, tok, questions, retriever, seed, desc, m: dict, name: str):
    """G rollouts per question; m gets the phase's time and its generated and context (prefilled) tokens."""
    from tqdm import tqdm
    with phase(m, name), tqdm(total=len(questions) * cfg.group_size, desc=desc, unit="traj", leave=False,
                              disable=None) as bar:
        trajs = rollout(actor, tok, questions, retriever, rollout_cfg(cfg, group_size=cfg.group_size, seed=seed),
                        progress=bar)
    gen = int(parallel.all_sum(sum(t.n_generated for t in trajs)))
    m[f"{name}_gen_tokens"] = m.get(f"{name}_gen_tokens", 0) + gen
    m[f"{name}_ctx_tokens"] = m.get(f"{name}_ctx_tokens", 0) + int(
        parallel.all_sum(sum(len(t.token_ids) for t in trajs))) - gen
    return trajs


def evaluate_round(cfg, actor, tok, dev, test, retriever) -> dict:
    """Dev, the per-round monitor, and test (given only at round 0 and the last round), in one greedy rollout
    call: more rows decode together (rollout.py)."""
    _, records = evaluate(actor, tok, parallel.shard(dev + test), retriever, "agent", rollout_cfg(cfg), desc="eval")
    test_ids = {q["id"] for q in test}
    on = lambda split: [r for r in records if (r["id"] in test_ids) == (split == "test")]
    m_dev, m_test = (parallel.merge_metrics(summarize(on(s))) for s in ("dev", "test"))
    hop2 = parallel.merge_metrics(by_hop(on("dev")).get("hop2") or summarize([]))  # {} when questions lack kinds
    return {"dev_em": m_dev["em"], "test_em": m_test["em"] if test else None,
            "test_f1": m_test["f1"] if test else None, "dev_hop2_em": hop2["em"],
            "dev_hop2_searches_per_q": hop2["searches_per_q"], "searches_per_q": m_dev["searches_per_q"],
            "gen_tokens_per_q": m_dev["gen_tokens_per_q"], "invalid_actions": m_dev["invalid_actions"],
            "truncated": m_dev["truncated"], "eval_gen_tokens": int(m_dev["gen_tokens_per_q"] * m_dev["n"] +
                                                                     m_test["gen_tokens_per_q"] * m_test["n"])}


def make_optimizers(policy) -> dict:
    """One AdamW per trainer (train.py): GRPO's as Search-R1's (decay 0.01), distillation's without decay (above)."""
    return {"grpo": make_optimizer(policy), "distill": make_optimizer(policy, weight_decay=0.0)}


def round_questions(train: list[dict], cursor: int, r: int, cfg: Config) -> tuple[list[list[dict]], list[dict]]:
    """Round r's training questions: one list per GRPO step, then the distillation phase's, all disjoint; each
    round takes the next round_questions of the fixed order (after the warm-up's [:cursor]), wrapping around."""
    n = cfg.grpo_steps * cfg.grpo_questions + cfg.distill_questions
    pool = [train[(cursor + (r - 1) * n + i) % len(train)] for i in range(n)]
    g = cfg.grpo_questions
    return [pool[s * g:(s + 1) * g] for s in range(cfg.grpo_steps)], pool[cfg.grpo_steps * g:]


def release_freed_memory():
    """glibc keeps freed tensors (RSS only grows across rounds); a 1 MB mmap threshold returns big ones (glibc only)."""
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
    train, cursor = training_order(splits["train"], cfg.balance_kinds)  # the warm-up uses train[:cursor]

    # metrics.jsonl may lag a round killed after its rename; only rank 0 rewrites it
    done = [m["round"] for m in rebuild_metrics(out)] if rank == 0 else finished_rounds(out)
    start = done[-1] if done else None
    policy, tok = load_policy(str(out / f"round_{start}") if done else cfg.model, cfg.device or None, "float32")
    policy.train()
    if cfg.checkpointing:         # same gradients (the forward is recomputed exactly); keeps the run under 6 GB
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    opts = make_optimizers(policy)
    for name, opt in opts.items():
        if done:
            load_optimizer(opt, policy, out / f"round_{start}" / f"optimizer_{name}.safetensors")
    bad = 0  # optimizer steps skipped in a row (train.count_bad_steps)
    actor = copy.deepcopy(policy).to(pick_device_dtype(cfg.device or None, cfg.rollout_dtype)[1]).eval()
    bf16 = actor.dtype == torch.bfloat16  # where bf16 is slow (CPUs with AVX2 only), training stays fp32 too
    where = {"machine": machine(cfg.device or None), "precision": f"actor {str(actor.dtype).removeprefix('torch.')}"
             f", training fp32{' under bf16 autocast' if bf16 else ''}", "budget": {
                 k: getattr(cfg, k) for k in ("grpo_steps", "grpo_questions", "distill", "distill_questions",
                                              "distill_steps", "group_size", "grpo_lr", "distill_lr")}}
    print(f"rollouts in {actor.dtype} on {actor.device}; training in fp32{' under bf16 autocast' if bf16 else ''}")
    sync = lambda: actor.load_state_dict(policy.state_dict())

    if start is None:  # round 0: warm-up if needed, then the baseline every later round is compared with
        t0, m = time.time(), {}
        with phase(m, "warmup"):
            probe_m, _ = evaluate(actor, tok, parallel.shard(train[cursor:cursor + 8]), retriever, "agent",  # greedy
                                  rollout_cfg(cfg, max_turns=2), desc="probe")  # on 8: enough to see "never right"
            probe_reward = parallel.merge_metrics(probe_m)["em"]
            warm = cfg.warmup == "on" or (cfg.warmup == "auto" and probe_reward == 0)
            print(f"probe reward {probe_reward:.3f} on 8 training questions -> warm-up {'on' if warm else 'off'}")
            n_warm = 0
            if warm:          # its own AdamW, dropped after it: the rounds' optimizers start fresh
                stats = warm_up(policy, tok, make_optimizer(policy), parallel.shard(train[:cfg.warmup_questions]),
                                retriever, rollout_cfg(cfg), DistillConfig(
                                    method="sft", lr=cfg.warmup_lr, per_question_cap=1, temperature=cfg.temperature,
                                    epochs=cfg.warmup_epochs, warmup_steps=cfg.lr_warmup_steps, autocast_bf16=bf16,
                                    seed=cfg.seed))
                n_warm = int(parallel.all_sum(stats["n_kept"]))
                bad = count_bad_steps(bad, stats, cfg.max_bad_steps, "warm-up")
                print(f"warm-up: cloned {n_warm} scripted traces, loss {stats['loss']:.3f}")
                sync()
        with phase(m, "eval"):
            m.update(evaluate_round(cfg, actor, tok, dev, test, retriever))
        metrics = {"round": 0, **m, "reward_mean": probe_reward, "kept": n_warm, "warmup": warm,
                   "seconds": round(time.time() - t0, 1), **where}
        if rank == 0: save_round(policy, opts, tok, out, 0, metrics)  # noqa: E701
        print("round 0:", json.dumps(metrics))
        start = 0
    parallel.all_sum(0)  # a barrier: round 0 is on disk before any process reads it as GRPO's reference
    gcfg = GRPOConfig(lr=cfg.grpo_lr, kl_coef=cfg.kl_coef, temperature=cfg.temperature, autocast_bf16=bf16)
    dcfg = DistillConfig(method=cfg.distill, loss=cfg.distill_loss, kl_clip=cfg.kl_clip, lr=cfg.distill_lr,
                         temperature=cfg.temperature, steps=cfg.distill_steps, sibling_rule=cfg.sibling_rule,
                         student_rule=cfg.student_rule, teacher_shows=cfg.teacher_shows, autocast_bf16=bf16)
    for r in range(start + 1, cfg.rounds + 1):
        t0, m = time.time(), {}
        torch.manual_seed(cfg.seed * 1000 + r)
        grpo_qs, distill_qs = round_questions(train, cursor, r, cfg)
        # 1) vanilla GRPO, its KL to round 0: fp32 like the policy, in memory for this phase only (as the teacher is
        # for its own): one frozen copy at a time keeps a 0.5B model's run inside 24 GB
        ref = load_policy(str(out / "round_0"), cfg.device or None, "float32")[0].eval().requires_grad_(False) \
            if cfg.kl_coef and grpo_qs else None
        g_rewards, g_kl, zero_groups, steps = [], [], 0, 0
        for s, qs in enumerate(grpo_qs):
            trajs = sample_trajectories(cfg, actor, tok, parallel.shard(qs), retriever, cfg.seed + 100 * r + s,
                                        f"r{r} grpo {s + 1}", m, "rollout_grpo")
            g_rewards.append(reward(trajs, gold))
            crash_point(f"rollouts:{r}")
            with phase(m, "train_grpo"):
                stats = grpo_step(policy, ref, opts["grpo"], trajs, dataclasses.replace(gcfg, seed=cfg.seed + r),
                                  tok.pad_token_id)
                bad = count_bad_steps(bad, stats, cfg.max_bad_steps, f"round {r} grpo step {s + 1}")
                zero_groups += int(parallel.all_sum(stats["n_zero_groups"]))
                g_kl.append(stats["kl"])
                steps += stats["steps"]
                sync()
        del ref
        # 2) the policy rolls out on its own training questions, then self-distils from its frozen post-GRPO self
        qs = parallel.shard(distill_qs)
        kept, d_reward, diag = 0, float("nan"), {}
        if cfg.distill != "none" and parallel.all_sum(len(qs)):
            trajs = sample_trajectories(cfg, actor, tok, qs, retriever, cfg.seed + 100 * r + 99, f"r{r} rollouts",
                                        m, "rollout_distill")
            d_reward = reward(trajs, gold)
            with phase(m, "train_distill"):
                dstats = distill(policy, tok, trajs, dataclasses.replace(dcfg, seed=cfg.seed + r), opts["distill"])
                kept = int(parallel.all_sum(dstats["n_pairs"] or dstats["n_kept"]))
                bad = count_bad_steps(bad, dstats, cfg.max_bad_steps, f"round {r} distill")
                steps += dstats["steps"]
                sync()
            diag = {k: dstats[k] for k in ("format_valid", "kl_before", "disagree_rate", "kl_think", "kl_query",
                                           "kl_answer", "kl_tag") if k in dstats}
            for t in trajs[::cfg.group_size][:cfg.show]:  # a few, so a student sees the agent change
                print(f"  Q: {t.question}\n  -> queries {t.queries} answer {t.answer!r} reward {t.reward}")
        crash_point(f"trained:{r}")
        # 3) evaluate (dev every round; test at the last round only) and checkpoint
        with phase(m, "eval"):
            m.update(evaluate_round(cfg, actor, tok, dev, test if r == cfg.rounds else [], retriever))
        all_rewards = g_rewards + ([d_reward] if d_reward == d_reward else [])
        metrics = {"round": r, **m, "reward_mean": sum(all_rewards) / max(len(all_rewards), 1),
                   "grpo_reward": g_rewards, "grpo_kl": g_kl, "zero_adv_groups": zero_groups,
                   "distill_reward": d_reward, "kept": kept, "optimizer_steps": steps, **diag,
                   "seconds": round(time.time() - t0, 1), **where}
        if rank == 0: save_round(policy, opts, tok, out, r, metrics)  # noqa: E701
        print(f"round {r}: dev EM {metrics['dev_em']:.3f} (2-hop {metrics['dev_hop2_em']:.3f}) reward "
              f"{metrics['reward_mean']:.3f} kept {kept} searches/q {metrics['searches_per_q']:.2f} "
              f"({metrics['seconds']:.0f} s)")
    if rank:
        return None
    rows = rebuild_metrics(out)
    print_summary(rows)
    print(f"total {time.time() - t_start:.0f} s; checkpoints and metrics.jsonl in {out}/")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (RetrieverError, TrainingError) as e:
        sys.exit(f"stopped: {e}\nfinished rounds are kept in out_dir; rerun the same command to resume")
