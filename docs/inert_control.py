"""A diagnosis, not part of the method: what moved the no-hint control's weights before each trainer had its own
AdamW, measured on the real policy.

    python docs/inert_control.py [--round0=runs/ablation/round0/round_0] [--seed=0]

From a study's round 0, it takes round 1's GRPO step as evolve.py does (its own AdamW), rolls out the round's
distillation questions, then runs the no-hint distillation phase (teacher_shows=none: the teacher reads exactly
what the student reads) five ways, each from the same post-GRPO weights:
  this code         the distillation AdamW (fresh moments, no decay), a frozen fp32 teacher, the KL's exact gradient
  shared AdamW      GRPO's AdamW, moments and decay 0.01 included (one optimizer for every phase: the earlier code)
  decay 0.01        the distillation AdamW with GRPO's weight decay
  autograd KL       autograd's gradient of the KL, p_S sum(p_T) - p_T: float error where sum(p_T) != 1
  bf16 teacher      the bf16 rollout copy as the teacher (the earlier code, on a CPU or GPU with fast bf16)
and prints, for each, the phase's kl_before and how far the weights moved (largest change, share changed).
"""
import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, run from anywhere
import distill as D  # noqa: E402
import evolve  # noqa: E402
from data.load import QUESTIONS_DIR, load_qa, training_order  # noqa: E402
from grpo import GRPOConfig, grpo_step  # noqa: E402
from model import load_policy, pick_device_dtype  # noqa: E402
from search import get_retriever  # noqa: E402
from train import frozen_copy, make_optimizer  # noqa: E402


def autograd_kl(teacher_logits, student_logits, clip=0.0):
    t, s = teacher_logits.float().log_softmax(-1), student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--round0", default="runs/ablation/round0/round_0")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cfg = evolve.parse_config([f"--seed={a.seed}", "--teacher_shows=none"])
    policy, tok = load_policy(a.round0, None, "float32")
    policy.train()
    actor = copy.deepcopy(policy).to(pick_device_dtype(None, cfg.rollout_dtype)[1]).eval()
    bf16 = actor.dtype == torch.bfloat16
    train, cursor = training_order(load_qa(QUESTIONS_DIR / "train.jsonl"))
    gold = {q["id"]: q["golden_answers"] for q in train}
    retriever, m, opts = get_retriever(), {}, evolve.make_optimizers(policy)
    grpo_qs, distill_qs = evolve.round_questions(train, cursor, 1, cfg)
    torch.manual_seed(cfg.seed * 1000 + 1)
    trajs = evolve.sample_trajectories(cfg, actor, tok, grpo_qs[0], retriever, cfg.seed + 100, "grpo", m, "g")
    evolve.reward(trajs, gold)
    grpo_step(policy, frozen_copy(policy), opts["grpo"], trajs,
              GRPOConfig(lr=cfg.grpo_lr, kl_coef=cfg.kl_coef, autocast_bf16=bf16, seed=cfg.seed + 1), tok.pad_token_id)
    actor.load_state_dict(policy.state_dict())
    trajs = evolve.sample_trajectories(cfg, actor, tok, distill_qs, retriever, cfg.seed + 199, "distill", m, "d")
    evolve.reward(trajs, gold)
    dcfg = D.DistillConfig(teacher_shows="none", lr=cfg.distill_lr, steps=cfg.distill_steps, autocast_bf16=bf16,
                           seed=cfg.seed + 1, progress=False)
    print(f"actor {actor.dtype}; {len(D.opsd_pairs(tok, trajs, dcfg))} no-hint pairs; distillation: "
          f"{cfg.distill_steps} steps at lr {cfg.distill_lr}")
    ways = {"this code": {}, "shared AdamW": {"opt": "grpo"}, "decay 0.01": {"opt": "decay"},
            "autograd KL": {"kl": autograd_kl}, "bf16 teacher": {"teacher": actor}}
    print(f"{'way':<14} {'kl_before':>10} {'max |dw|':>10} {'weights changed':>16}")
    for name, way in ways.items():
        p = copy.deepcopy(policy)
        opt = {"grpo": make_optimizer(p), "decay": make_optimizer(p)}.get(way.get("opt"), make_optimizer(p, 0.0))
        if way.get("opt") == "grpo":   # GRPO's moments, mapped onto the copy's parameters
            opt.load_state_dict(opts["grpo"].state_dict())
        real = D.forward_kl
        D.forward_kl = way.get("kl", real)
        try:
            stats = D.distill(p, tok, trajs, dataclasses.replace(dcfg), opt, teacher=way.get("teacher"))
        finally:
            D.forward_kl = real
        dw = torch.cat([(x - y).abs().flatten() for x, y in zip(p.parameters(), policy.parameters())])
        print(f"{name:<14} {stats['kl_before']:>10.2e} {float(dw.max()):>10.2e} {float((dw > 0).float().mean()):>16.1%}")


if __name__ == "__main__":
    main()
