"""Vanilla GRPO: the reinforcement-learning rounds of Search-E1, run as Search-R1 runs them (paper, Sec. 3.2).

In a GRPO round the policy samples G trajectories per question (rollout.py), each is rewarded by exact match
alone (eval.py; the caller sets t.reward), rewards are normalised within each question's group, and the policy
takes PPO-clip steps on the tokens it wrote itself (rollout.py's loss_mask: prompt and <information> tokens
get no gradient). The objective is grpo_token_loss, a pure function; train.py turns it into updates.

From the paper / Search-R1 (verl): clip 0.2, KL to a frozen reference with coefficient 0.001 and verl's
"low_var_kl" (the k3 estimator of KL(policy || ref), clamped to [-10, 10]), group std as torch.std (unbiased,
n-1), token-mean loss aggregation, gradient clipping at 1.0; log-probs at the sampling temperature (verl
divides the logits by it), so the gradient belongs to the policy that sampled.
As verl: every trajectory of the batch is in the loss and its token-mean, those of groups whose rewards are all
equal too (their advantage is 0, so they carry only the KL term). This project's choices: the token-mean is
exact over each optimizer mini-batch (verl averages per-micro-batch means); a row with advantage 0 is not
forwarded when there is no KL term (its loss is exactly 0); the reference runs in the policy's precision (fp32
weights under the same bf16 autocast: train.frozen_copy), so at equal weights the KL is exactly 0.
At the defaults (one epoch, one mini-batch) the old log-probs are the current ones detached: the ratio is 1,
PPO-clip never acts, and the step is REINFORCE with a group-normalised baseline (plus the KL term).
"""
from dataclasses import dataclass

import torch

from model import pack, response_logits, token_logp
from parallel import all_sum
from train import autocast, chunks, split, train


@dataclass
class GRPOConfig:
    lr: float = 1e-6            # the paper's (3B); a 135M model on a few steps needs far more (evolve.py)
    warmup_steps: int = 0       # linear lr ramp over the run's first optimizer steps (train.set_lr)
    clip_eps: float = 0.2
    kl_coef: float = 0.001      # k3 KL to the frozen reference; 0 (or ref=None) = no reference forward at all
    temperature: float = 1.0    # the rollouts' sampling temperature: log-probs are taken at it
    ppo_epochs: int = 1
    minibatch: int = 0          # trajectories per optimizer step; 0 = all trained trajectories in one step
    micro_batch: int = 2        # rows per forward; gradients accumulate across micro-batches (bounds memory)
    autocast_bf16: bool = True  # forward under bf16 autocast, weights (and the optimizer) stay fp32
    max_grad_norm: float = 1.0  # 0 = no clipping
    adv_eps: float = 1e-6
    seed: int = 0               # mini-batch shuffling


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(n_questions, G) rewards -> (r - group mean) / (group std + eps). The std is the unbiased (n-1) one,
    as verl's GRPO (torch.std), which Search-R1 trains with. A group whose rewards are all equal carries no
    signal and gets exactly 0 (also for G == 1, where the unbiased std is undefined)."""
    rewards = rewards.float()
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    same = (rewards == rewards[:, :1]).all(-1, keepdim=True)
    return torch.where(same, torch.zeros_like(rewards), (rewards - mean) / (std + eps))


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from tokens the policy sampled: e^d - d - 1 with d = log ref - log
    policy (>= 0, unbiased, low variance); clamped as verl does."""
    d = ref_logp - logp
    return (d.exp() - d - 1).clamp(-10, 10)


def grpo_token_loss(logp, old_logp, adv, clip_eps: float = 0.2, ref_logp=None, kl_coef: float = 0.0):
    """The GRPO objective per token (to minimise): max(-A r, -A clip(r, 1-eps, 1+eps)) + kl_coef k3,
    r = p / p_old. logp, old_logp, ref_logp: per-token log-probs; adv: the token's trajectory's advantage.
    Returns (loss per token, whether the clip was active)."""
    ratio = torch.exp(logp - old_logp)
    pg, pg_clip = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = torch.maximum(pg, pg_clip)
    if ref_logp is not None and kl_coef:
        loss = loss + kl_coef * k3(logp, ref_logp)
    return loss, pg_clip > pg


def logprobs(model, rows, pad_id, cfg: GRPOConfig):
    """(B, R) log-probs of the rows' response tokens at cfg.temperature, 0 off the loss mask; and the mask."""
    ids, attn, mask = pack(*zip(*map(split, rows)), pad_id, model.device)
    R, keep = mask.shape[1], mask.bool()
    with autocast(model, cfg.autocast_bf16):
        logits = response_logits(model, ids, attn, R, keep)  # only policy tokens need the head
    return mask.masked_scatter(keep, token_logp(logits.float() / cfg.temperature, ids[:, -R:][keep])), mask


def grpo_step(policy, ref, optimizer, trajs: list, cfg: GRPOConfig, pad_id: int) -> dict:
    """One GRPO update on a batch of trajectories, G per question (same qid, in any order), t.reward set."""
    groups = {}
    for i, t in enumerate(trajs):
        groups.setdefault(t.qid, []).append(i)
    adv, active, n_zero = torch.zeros(len(trajs)), set(), 0
    for g in groups.values():
        r = torch.tensor([[float(trajs[i].reward) for i in g]])
        adv[g] = group_advantages(r, cfg.adv_eps)[0]
        if bool((r == r[0, 0]).all()):
            n_zero += 1                 # all right or all wrong: no policy-gradient signal, only the KL term
        else:
            active.update(g)
    use_kl = ref is not None and cfg.kl_coef > 0
    forwarded = {i for i in range(len(trajs)) if use_kl or i in active}  # the rest has a loss of exactly 0
    rewards = [float(t.reward) for t in trajs]
    n_tok = [sum(split(t)[2]) for t in trajs]  # the token-mean is over every trajectory of the batch (verl)
    stats = dict(loss=0.0, kl=0.0, clip_frac=0.0, n_groups=len(groups), n_zero_groups=n_zero,
                 reward_mean=sum(rewards) / max(len(rewards), 1), n_trained=len(active),
                 tokens=sum(n_tok[i] for i in forwarded), steps=0, n_skipped=0, skipped=False, grad_norm=0.0)
    if not all_sum(len(forwarded)):  # over every process: all of them step, or none
        return stats                 # no gradient at all: a step would only replay Adam's momentum
    mb_size = cfg.minibatch or int(all_sum(len(trajs)))
    old_lp = None
    if cfg.ppo_epochs > 1 or mb_size < all_sum(len(trajs)):
        with torch.no_grad():       # per-row log-probs taken before any update
            old_lp = {}
            for micro in chunks(sorted(forwarded), cfg.micro_batch):
                lp, _ = logprobs(policy, [trajs[i] for i in micro], pad_id, cfg)
                old_lp.update({i: lp[k] for k, i in enumerate(micro)})
    sums = dict(kl=0.0, clip=0.0, tok=0.0)

    def loss_fn(micro):
        micro = [i for i in micro if i in forwarded]
        if not micro:
            return torch.zeros((), requires_grad=True)
        rows = [trajs[i] for i in micro]
        lp, mask = logprobs(policy, rows, pad_id, cfg)
        ref_lp = None
        if use_kl:                  # the same packed rows as the policy's: same shapes, same kernels
            with torch.no_grad():
                ref_lp, _ = logprobs(ref, rows, pad_id, cfg)
            sums["kl"] += float((k3(lp.detach(), ref_lp) * mask).sum())
        old = lp.detach() if old_lp is None else torch.stack(
            [torch.nn.functional.pad(old_lp[i], (0, lp.shape[1] - len(old_lp[i]))) for i in micro])
        a = adv[micro].to(lp.device)[:, None]
        per_tok, clipped = grpo_token_loss(lp, old, a, cfg.clip_eps, ref_lp, cfg.kl_coef)
        sums["clip"] += float((clipped.float() * mask).sum())
        sums["tok"] += float(mask.sum())
        return (per_tok * mask).sum()

    length = [len(t.token_ids) - t.prompt_len for t in trajs]
    t = train(policy, optimizer, len(trajs), loss_fn, n_tok, length, cfg.lr, mb_size, cfg.micro_batch,
              cfg.max_grad_norm, cfg.ppo_epochs, cfg.warmup_steps, cfg.seed, desc="grpo", progress=False)
    stats.update(loss=t["loss"] if t["steps"] else float("nan"), steps=t["steps"], n_skipped=t["n_skipped"],
                 skipped=t["n_skipped"] > 0, grad_norm=t["grad_norm"], kl=sums["kl"] / max(sums["tok"], 1),
                 clip_frac=sums["clip"] / max(sums["tok"], 1))
    return stats
