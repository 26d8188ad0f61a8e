"""Self-distillation rounds of Search-E1: OFSD (the paper's method) and kept-trace SFT (the design card's loop).

After each GRPO round the policy rolls out on its own training questions (rollout.py; the caller sets
t.reward by exact match) and learns from its own best trajectories, with no external teacher:

- ofsd (the paper): for each question with at least one correct trajectory, the most efficient correct
  trajectory is the sibling. The teacher is the same weights under torch.no_grad(), reading a privileged
  context: the prompt with the sibling's solution shown inside the user turn. Every other trajectory of the
  question, correct or not, is a student trajectory; on its policy-generated tokens a token-level forward
  KL(teacher || student) aligns the policy's normal (inference-time) distribution to its own distribution
  under the privileged context. Gradient flows only through the student.
- sft (the design card's loop): cross-entropy on the kept traces (correct trajectories, at most
  per_question_cap per question, the most efficient first) on their policy-generated tokens.

The paper's code is not public, so the unknowns are options; each default is this project's guess:
- sibling_rule: "efficient" = fewest searches, then fewest generated tokens, then first index;
  "shortest" = fewest generated tokens, then fewest searches, then first index.
- teacher_shows: "queries" (the sibling's queries and answer, HINT wording below), "full" (its decoded
  response, retrieved documents included), "none" (no hint: teacher == student, KL == 0; a sanity check).
  The hint goes at the end of the user turn, before the assistant turn.
- kl_topk: 0 = the full vocabulary; k = the teacher's top-k tokens only, the teacher renormalised over
  them, the student's full-vocabulary log-probs as they are. The sum stays >= 0 but is not 0 when teacher ==
  student: it is then -log(student mass on the top-k), so this option also sharpens the student onto them.
  k=1 is cross-entropy on the hinted teacher's greedy token at each student position; evolve.py uses it
  because the full KL collapsed SmolLM2-135M (README, "Why kl_topk=1"): the hinted teacher is a little less
  sure of the format tokens ('think' after '</'), a small but systematic pull that Adam's per-parameter
  steps made full-size, and a few steps at lr 3e-5 turned every '</think>' into '</<<<'.
Also this project's: lr 1e-5, token-mean over each optimizer batch, one optimizer step per batch_size rows.
"""
import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from grpo import autocast, chunks, optimizer_step, split
from model import chat_prompt, pack, response_logits, token_logp
from parallel import all_sum, batches
from rollout import AGENT_PROMPT, Trajectory

HINT_QUERIES = "\nA correct and efficient solution {how}: {answer}.\n"
HINT_FULL = "\nA correct and efficient solution to this question:\n{text}\n"


@dataclass
class DistillConfig:
    method: str = "ofsd"           # ofsd (the paper) | sft (kept traces)
    lr: float = 1e-5               # used only when distill() builds the optimizer (135M model, few steps)
    per_question_cap: int = 2      # sft: kept traces per question, so easy questions don't dominate
    sibling_rule: str = "efficient"
    teacher_shows: str = "queries"  # queries | full | none
    kl_topk: int = 0               # 0 = full-vocabulary KL
    batch_size: int = 16           # rows (pairs or kept traces) per optimizer step
    micro_batch: int = 2           # rows per forward: bounds activation memory (evolve peaks under 6 GB)
    epochs: int = 1
    autocast_bf16: bool = True
    max_grad_norm: float = 1.0
    seed: int = 0                  # batch shuffling
    progress: bool | None = None   # tqdm bar; None = only on a terminal


@dataclass
class Pair:
    student: Trajectory
    teacher_prompt: list[int]      # privileged prompt ids; the teacher reads these + the student's response
    sibling: Trajectory


RULES = {"efficient": lambda t: (len(t.queries), t.n_generated),
         "shortest": lambda t: (t.n_generated, len(t.queries))}


def is_correct(t) -> bool:
    return t.reward == 1.0         # exact match: the paper's only reward


def by_question(trajs) -> dict[str, list]:
    groups = {}
    for t in trajs:
        groups.setdefault(t.qid, []).append(t)
    return groups


def select_sibling(group: list, rule: str = "efficient"):
    """The most efficient correct trajectory of one question's group, or None if none is correct.
    min() keeps the first of equals, hence 'then first index'."""
    return min((t for t in group if is_correct(t)), key=RULES[rule], default=None)


def kept_traces(trajs: list, cap: int = 2, rule: str = "efficient") -> list:
    """Correct trajectories, at most cap per question, the most efficient first (stable sort: ties by index)."""
    return [t for g in by_question(trajs).values() for t in sorted(filter(is_correct, g), key=RULES[rule])[:cap]]


def privileged_hint(tok, sibling, shows: str = "queries") -> str:
    if shows == "none":
        return ""
    if shows == "full":
        text = tok.decode(sibling.token_ids[sibling.prompt_len:], skip_special_tokens=True).strip()
        return HINT_FULL.format(text=text)
    if shows == "queries":
        how = ("searched for: " + "; ".join(f"'{q}'" for q in sibling.queries) + " and answered"
               if sibling.queries else "answered without searching")
        return HINT_QUERIES.format(how=how, answer=sibling.answer)
    raise ValueError(f"teacher_shows must be queries | full | none, not {shows!r}")


def teacher_prompt_ids(tok, question: str, hint: str) -> list[int]:
    """rollout.build_prompt's agent prompt with the hint inside the user turn; hint '' gives the same ids."""
    return tok(chat_prompt(tok, AGENT_PROMPT.format(question=question) + hint), add_special_tokens=False).input_ids


def ofsd_pairs(tok, trajs: list, cfg: DistillConfig) -> list[Pair]:
    """Every non-sibling trajectory of a question that has a correct one, with its privileged teacher prompt."""
    pairs = []
    for group in by_question(trajs).values():
        sib = select_sibling(group, cfg.sibling_rule)
        if sib is None:
            continue                   # no correct trajectory: nothing to distil from
        prompt = teacher_prompt_ids(tok, sib.question, privileged_hint(tok, sib, cfg.teacher_shows))
        pairs += [Pair(t, prompt, sib) for t in group if t is not sib]
    return pairs


def ofsd_loss(policy, pairs: list[Pair], pad_id: int, topk: int = 0, autocast_bf16: bool = True):
    """(summed token-level KL(teacher || student), token count) over the students' policy-generated tokens.
    pack() puts response token j at column P_T + j in the teacher batch and P_S + j in the student batch,
    and response_logits returns exactly the positions predicting them, so both (N, V) line up."""
    _, resp, masks = zip(*(split(p.student) for p in pairs))
    s_ids, s_attn, mask = pack([split(p.student)[0] for p in pairs], resp, masks, pad_id, policy.device)
    t_ids, t_attn, _ = pack([p.teacher_prompt for p in pairs], resp, masks, pad_id, policy.device)
    R, sel = mask.shape[1], mask.bool()    # only the policy's own tokens; no <information>, no padding
    with torch.no_grad(), autocast(policy, autocast_bf16):
        t_logits = response_logits(policy, t_ids, t_attn, R, sel).float()
        idx = t_logits.topk(topk, -1).indices if topk else None
        t_logp = (t_logits.gather(-1, idx) if topk else t_logits).log_softmax(-1)  # top-k: renormalised
        t_p = t_logp.exp()
        neg_entropy = (t_p * t_logp).sum(-1)  # constant w.r.t. the student
        del t_logits, t_logp
    with autocast(policy, autocast_bf16):
        s_logp = response_logits(policy, s_ids, s_attn, R, sel).float().log_softmax(-1)
    if topk:
        s_logp = s_logp.gather(-1, idx)
    # per token, the same reduction as neg_entropy: identical contexts cancel exactly
    kl = neg_entropy - (t_p * s_logp).sum(-1)
    return kl.sum(), int(sel.sum())


def sft_loss(policy, trajs: list, pad_id: int, autocast_bf16: bool = True):
    """(summed cross-entropy on the trajectories' policy-generated tokens, token count)."""
    ids, attn, mask = pack(*zip(*map(split, trajs)), pad_id, policy.device)
    R, keep = mask.shape[1], mask.bool()
    with autocast(policy, autocast_bf16):
        logits = response_logits(policy, ids, attn, R, keep)
    return -token_logp(logits, ids[:, -R:][keep]).sum(), int(mask.sum())


def distill(policy, tok, trajs: list, cfg: DistillConfig | None = None, optimizer=None) -> dict:
    """One self-distillation round over the policy's own rollouts (grouped by qid, t.reward set).
    Rows are shuffled into ceil(rows / batch_size) even batches (one optimizer step each, token-mean loss), each in
    micro-batches of similar length with gradient accumulation. Without an optimizer, AdamW(lr=cfg.lr)."""
    cfg = cfg or DistillConfig()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    optimizer = optimizer or torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    groups = by_question(trajs)
    if cfg.method == "ofsd":
        items = ofsd_pairs(tok, trajs, cfg)
        loss_fn = lambda rows: ofsd_loss(policy, rows, pad_id, cfg.kl_topk, cfg.autocast_bf16)
        traj_of = lambda p: p.student
    elif cfg.method == "sft":
        items = kept_traces(trajs, cfg.per_question_cap, cfg.sibling_rule)
        loss_fn = lambda rows: sft_loss(policy, rows, pad_id, cfg.autocast_bf16)
        traj_of = lambda t: t
    else:
        raise ValueError(f"method must be ofsd | sft, not {cfg.method!r}")
    n_tok = [sum(split(traj_of(x))[2]) for x in items]
    length = lambda i: len(traj_of(items[i]).token_ids)
    stats = dict(method=cfg.method, n_questions=len(groups), n_pairs=len(items) if cfg.method == "ofsd" else 0,
                 n_kept=len(items) if cfg.method == "sft" else 0,
                 n_questions_with_correct=sum(any(map(is_correct, g)) for g in groups.values()),
                 tokens=sum(n_tok), epoch_loss=[], steps=0, n_skipped=0)
    rng = random.Random(cfg.seed)
    bar = tqdm(total=cfg.epochs * math.ceil(len(items) / cfg.batch_size), desc=cfg.method,
               disable=None if cfg.progress is None else not cfg.progress)
    optimizer.zero_grad(set_to_none=True)
    for _ in range(cfg.epochs):
        order = list(range(len(items)))
        rng.shuffle(order)             # batches mix questions
        ep_sum, ep_tok = 0.0, 0
        for batch in batches(order, cfg.batch_size):   # under torchrun: this process's share of each batch
            denom = all_sum(sum(n_tok[i] for i in batch))
            total = 0.0
            for micro in chunks(sorted(batch, key=length), cfg.micro_batch):
                loss_sum, _ = loss_fn([items[i] for i in micro])
                (loss_sum / max(denom, 1)).backward()
                total += float(loss_sum.detach())
            total = all_sum(total)
            ok, _ = optimizer_step(policy, optimizer, total, cfg.max_grad_norm)
            stats["steps"] += ok
            stats["n_skipped"] += not ok
            if ok:                     # per-token means over the batches actually stepped on
                ep_sum, ep_tok = ep_sum + total, ep_tok + denom
            bar.update(1)
            bar.set_postfix(loss=f"{total / max(denom, 1):.4f}")
        stats["epoch_loss"].append(ep_sum / ep_tok if ep_tok else float("nan"))
    bar.close()
    stats["loss"] = stats["epoch_loss"][-1] if stats["epoch_loss"] else float("nan")
    if cfg.method == "ofsd":           # measured on the fly: each batch just before its own update
        stats["kl_before"] = stats["epoch_loss"][0] if stats["epoch_loss"] else float("nan")
    return stats
