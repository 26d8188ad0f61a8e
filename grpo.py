"""Vanilla GRPO: the reinforcement-learning rounds of Search-E1, run as Search-R1 runs them.

Search-E1 alternates GRPO rounds with self-distillation rounds (distill.py). In a GRPO round the policy
samples G trajectories per question (rollout.py), each is rewarded by exact match alone (eval.py; the
caller sets t.reward), rewards are normalised within each question's group, and the policy takes PPO-clip
steps on the tokens it wrote itself (rollout.py's loss_mask: prompt and <information> tokens get no gradient).

From the paper / Search-R1 (verl): lr 1e-6, clip 0.2, KL to a frozen reference with coefficient 0.001 and
verl's "low_var_kl" (the k3 estimator, clamped to [-10, 10]), group std as torch.std (unbiased, n-1),
token-mean loss aggregation, gradient clipping at 1.0.
This project's choices: the token-mean is exact over each optimizer mini-batch (verl averages per-micro-batch
means, which depends on the micro-batch size); groups whose rewards are all equal are skipped before any
forward pass; with one epoch and one mini-batch the old log-probs are the current ones detached (identical
values, one forward pass fewer); bf16 autocast on by default (CPU: 252 vs 150 tok/s for fwd+bwd here).

The helpers up top (optimizer_step, chunks, autocast, split) are shared with distill.py. Under torchrun each
process passes its own groups; parallel.py makes the step equal to one process's step on all of them.
"""
import itertools
import math
import random
import sys
from dataclasses import dataclass

import torch

from model import response_logits, token_logp, pack
from parallel import all_sum, batches, sum_grads


@dataclass
class GRPOConfig:
    lr: float = 1e-6            # the paper's; read by the caller when it builds the optimizer. A tiny CPU model needs far more.
    clip_eps: float = 0.2
    kl_coef: float = 0.001      # k3 KL to the frozen reference; 0 (or ref=None) = no reference forward at all
    ppo_epochs: int = 1
    minibatch: int = 0          # trajectories per optimizer step; 0 = all trained trajectories in one step
    micro_batch: int = 2        # rows per forward; gradients accumulate across micro-batches (bounds memory)
    autocast_bf16: bool = True  # forward under bf16 autocast, weights (and the optimizer) stay fp32
    max_grad_norm: float = 1.0  # 0 = no clipping
    adv_eps: float = 1e-6
    seed: int = 0               # mini-batch shuffling


def chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), max(n, 1))]


def autocast(model, enabled: bool):
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=enabled)


def split(t):
    """A trajectory as (prompt ids, response ids, response loss mask)."""
    return t.token_ids[:t.prompt_len], t.token_ids[t.prompt_len:], t.loss_mask[t.prompt_len:]


def optimizer_step(model, optimizer, loss_value: float, max_grad_norm: float):
    """Sum gradients over processes, clip and step. A non-finite loss (summed over processes too) or gradient
    norm skips the step and drops its gradients, so one bad batch never poisons the weights. Returns
    (stepped, grad_norm)."""
    sum_grads(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    ok = math.isfinite(loss_value) and bool(torch.isfinite(norm))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok, float(norm)


class TrainingError(RuntimeError):
    """Training cannot go on safely: too many non-finite steps in a row, or non-finite weights to save."""


def count_bad_steps(bad: int, stats: dict, limit: int, where: str) -> int:
    """Consecutive skipped steps after one grpo_step / distill call's stats (its skips count as its last
    steps: an upper bound). Logs skips; raises TrainingError at limit, so a run that cannot recover stops
    before it saves anything."""
    bad = bad + stats["n_skipped"] if stats["steps"] == 0 else stats["n_skipped"]
    if stats["n_skipped"]:
        print(f"{where}: skipped {stats['n_skipped']} of {stats['steps'] + stats['n_skipped']} optimizer steps "
              f"(non-finite loss or gradient); {bad} in a row", file=sys.stderr)
    if bad >= limit:
        raise TrainingError(f"{where}: {bad} optimizer steps in a row had a non-finite loss or gradient "
                            f"(max_bad_steps={limit}); stopping without saving this round")
    return bad


def check_finite(model, where: str):
    """Refuse to save a poisoned checkpoint."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"{where}: non-finite weights in {len(bad)} tensors (e.g. {bad[0]}); not saving them")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(n_questions, G) rewards -> (r - group mean) / (group std + eps). The std is the unbiased (n-1) one,
    as verl's GRPO (torch.std), which Search-R1 trains with. A group whose rewards are all equal carries no
    signal and gets exactly 0 (also for G == 1, where the unbiased std is undefined)."""
    rewards = rewards.float()
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    same = (rewards == rewards[:, :1]).all(-1, keepdim=True)
    return torch.where(same, torch.zeros_like(rewards), (rewards - mean) / (std + eps))


def _logp(model, rows, pad_id, cfg):
    """(B, R) log-probs of the rows' response tokens, 0 off the loss mask (only policy tokens need the head)."""
    ids, attn, mask = pack(*zip(*map(split, rows)), pad_id, model.device)
    R, keep = mask.shape[1], mask.bool()
    with autocast(model, cfg.autocast_bf16):
        logits = response_logits(model, ids, attn, R, keep)
    return mask.masked_scatter(keep, token_logp(logits, ids[:, -R:][keep])), mask


def _fill(vals, like):
    """Per-trajectory 1-D tensors into like's shape; pad positions take like's own values (ratio 1, KL 0)."""
    out = like.detach().clone()
    for k, v in enumerate(vals):
        out[k, :len(v)] = v
    return out


def grpo_step(policy, ref, optimizer, trajs: list, cfg: GRPOConfig, pad_id: int) -> dict:
    """One GRPO update on a batch of trajectories, grouped G consecutive per question (same qid), t.reward set.
    Loss per token: max(-A r, -A clip(r, 1-eps, 1+eps)) + kl_coef * k3(ref || policy), r = p / p_old,
    averaged over the mini-batch's policy-generated tokens (token-mean)."""
    groups = [list(g) for _, g in itertools.groupby(range(len(trajs)), key=lambda i: trajs[i].qid)]
    adv, active, n_zero = torch.zeros(len(trajs)), [], 0
    for g in groups:
        r = torch.tensor([[float(trajs[i].reward) for i in g]])
        adv[g] = group_advantages(r, cfg.adv_eps)[0]
        if bool((r == r[0, 0]).all()):
            n_zero += 1                 # all right or all wrong: nothing to learn from this group
        else:
            active += g
    rewards = [float(t.reward) for t in trajs]
    stats = dict(loss=0.0, kl=0.0, clip_frac=0.0, n_groups=len(groups), n_zero_groups=n_zero,
                 reward_mean=sum(rewards) / max(len(rewards), 1), n_trained=len(active),
                 tokens=sum(sum(split(trajs[i])[2]) for i in active), steps=0, n_skipped=0, skipped=False,
                 grad_norm=0.0)
    n_active = all_sum(len(active))  # over every process: all of them step, or none
    if not n_active:
        return stats
    resp_len = lambda i: len(trajs[i].token_ids) - trajs[i].prompt_len
    mb_size = cfg.minibatch or n_active

    @torch.no_grad()
    def per_traj(model):  # log-probs frozen before any update, one 1-D tensor per trajectory
        out = {}
        for micro in chunks(sorted(active, key=resp_len), cfg.micro_batch):
            lp, _ = _logp(model, [trajs[i] for i in micro], pad_id, cfg)
            out.update({i: lp[k, :resp_len(i)] for k, i in enumerate(micro)})
        return out

    use_ref = ref is not None and cfg.kl_coef > 0
    ref_lp = per_traj(ref) if use_ref else None
    old_lp = per_traj(policy) if cfg.ppo_epochs > 1 or mb_size < n_active else None
    rng, losses, sums = random.Random(cfg.seed), [], dict(kl=0.0, clip=0.0, tok=0.0)
    optimizer.zero_grad(set_to_none=True)
    for epoch in range(cfg.ppo_epochs):
        order = list(active)
        if old_lp is not None:
            rng.shuffle(order)
        for mini in batches(order, mb_size):
            denom = all_sum(sum(sum(split(trajs[i])[2]) for i in mini))  # the global token-mean
            total = 0.0
            for micro in chunks(sorted(mini, key=resp_len), cfg.micro_batch):  # similar lengths: less padding
                lp, mask = _logp(policy, [trajs[i] for i in micro], pad_id, cfg)
                old = lp.detach() if old_lp is None else _fill([old_lp[i] for i in micro], lp)
                a = adv[micro].to(lp.device)[:, None]
                ratio = torch.exp(lp - old)
                pg, pg_clip = -a * ratio, -a * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
                per_tok = torch.maximum(pg, pg_clip)
                if use_ref:
                    d = _fill([ref_lp[i] for i in micro], lp) - lp
                    k3 = (d.exp() - d - 1).clamp(-10, 10)
                    per_tok = per_tok + cfg.kl_coef * k3
                    sums["kl"] += float((k3.detach() * mask).sum())
                loss = (per_tok * mask).sum() / max(denom, 1)
                loss.backward()
                total += float(loss.detach())
                sums["clip"] += float(((pg_clip > pg).float() * mask).sum())
                sums["tok"] += float(mask.sum())
            total = all_sum(total)
            ok, stats["grad_norm"] = optimizer_step(policy, optimizer, total, cfg.max_grad_norm)
            stats["steps"] += ok
            stats["n_skipped"] += not ok
            losses.append(total)
    stats.update(loss=sum(losses) / len(losses), kl=sums["kl"] / max(sums["tok"], 1),
                 clip_frac=sums["clip"] / max(sums["tok"], 1), skipped=stats["n_skipped"] > 0)
    return stats
