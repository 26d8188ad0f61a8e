"""Self-distillation, Search-E1's step after each GRPO round (paper, Sec. 3.3): OFSD in the paper's v1, OPSD in
its v2. Also kept-trace SFT, the control that asks whether a teacher is needed at all.

After a GRPO round the policy rolls out on its own training questions (rollout.py; the caller sets t.reward by
exact match). For each question with a correct trajectory, the most efficient correct one is the sibling. The
teacher is the same weights frozen for the whole phase (the post-GRPO policy), reading a privileged context:
the prompt with the sibling's solution shown inside the user turn. On each student trajectory's own generated
tokens (<information> masked) a token-level forward KL(teacher || student) over the full vocabulary pulls the
policy's plain-context distribution toward its own privileged one. Gradient flows only through the student.
The teacher is a frozen fp32 copy taken when the phase starts (train.frozen_copy), run under the student's autocast,
and both distributions are at the sampling temperature: with no hint, teacher and student are the same function
of the same tokens, so the KL and its gradient are exactly 0.
    python distill.py --explain [--model DIR] [--question ID]    shows it, token by token (explain.py)

The paper's code is not public, so the unknowns are options; each default is this project's choice:
- sibling_rule: "efficient" = fewest searches, then fewest generated tokens, then first index; "shortest" =
  fewest tokens first; "searched" = "efficient" among correct trajectories that searched at least once (a lucky
  no-search guess is no demonstration of searching).
- student_rule: "less_efficient" = every trajectory the sibling outdoes: a wrong one, or a correct one that the
  sibling rule ranks strictly after it (a tie is no student: the teacher must show a MORE efficient solution);
  "all" = every other trajectory, ties included; "most_different" = one student among the less efficient, the
  one least like the sibling (Jaccard of generated token ids), a wrong one first (a secondary summary's reading).
- teacher_shows: "queries" (the sibling's queries and answer), "full" (its decoded response, documents
  included), "none" (no hint: the control for "is it the privileged information?"; its KL and gradient are exactly 0).
- loss: "kl" (the paper's) | "top1_ce" (cross-entropy on the hinted teacher's argmax token: not 0 when the
  teacher sees no hint, so it also sharpens the policy onto its own greedy token). kl_clip: a per-entry clip of
  the KL's terms (reported by the summary; 0 = off).
kept-trace SFT: cross-entropy on the trajectories the sibling rule accepts, at most per_question_cap per question,
most efficient first.
"""
import itertools
import re
from dataclasses import dataclass

import torch

from model import chat_prompt, pack, response_logits, token_logp
from rollout import AGENT_PROMPT, Trajectory
from train import autocast, frozen_copy, make_optimizer, split, train

HINT_QUERIES = "\nA correct and efficient solution {how}: {answer}.\n"
HINT_FULL = "\nA correct and efficient solution to this question:\n{text}\n"
SPANS = ("think", "query", "answer", "tag")  # where a generated token sits, for the per-span diagnostics
TAG = re.compile(r"</?(?:think|search|answer)>")


@dataclass
class DistillConfig:
    method: str = "opsd"           # opsd (the paper) | sft (kept traces)
    loss: str = "kl"               # kl (the paper) | top1_ce
    kl_clip: float = 0.0           # clip each vocabulary entry's KL term to [-kl_clip, kl_clip]; 0 = off
    temperature: float = 1.0       # the rollouts' sampling temperature: both distributions are taken at it
    lr: float = 1e-5
    warmup_steps: int = 0          # linear lr ramp over this optimizer's first steps (train.set_lr)
    per_question_cap: int = 2      # sft: kept traces per question, so easy questions don't dominate
    sibling_rule: str = "efficient"
    student_rule: str = "less_efficient"
    teacher_shows: str = "queries"  # queries | full | none
    steps: int = 0                 # optimizer steps per epoch, the rows split evenly; 0 = by batch_size
    batch_size: int = 16           # rows (pairs or kept traces) per optimizer step when steps == 0
    micro_batch: int = 2           # rows per forward: bounds activation memory
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
    labels: list[int]              # span_labels of the student's response (diagnostics)


RULES = {"efficient": lambda t: (len(t.queries), t.n_generated),
         "shortest": lambda t: (t.n_generated, len(t.queries)),
         "searched": lambda t: (len(t.queries), t.n_generated)}


def is_correct(t) -> bool:
    return t.reward == 1.0         # exact match: the paper's only reward


def by_question(trajs) -> dict[str, list]:
    groups = {}
    for t in trajs:
        groups.setdefault(t.qid, []).append(t)
    return groups


def can_be_sibling(t, rule: str) -> bool:
    return is_correct(t) and (rule != "searched" or bool(t.queries))


def select_sibling(group: list, rule: str = "efficient"):
    """The most efficient correct trajectory of one question's group, or None. min() keeps the first of equals."""
    return min((t for t in group if can_be_sibling(t, rule)), key=RULES[rule], default=None)


def similarity(a, b) -> float:
    """Jaccard similarity of two trajectories' generated token ids."""
    x, y = ({i for i, m in zip(t.token_ids, t.loss_mask) if m} for t in (a, b))
    return len(x & y) / max(len(x | y), 1)


def outdone(t, sibling, rule: str = "efficient") -> bool:
    """The sibling shows t a better way: t is wrong, or is no sibling candidate, or ranks strictly after it."""
    return not can_be_sibling(t, rule) or RULES[rule](t) > RULES[rule](sibling)


def select_students(group: list, sibling, rule: str = "less_efficient", sibling_rule: str = "efficient") -> list:
    others = [t for t in group if t is not sibling]
    if rule == "all":
        return others
    worse = [t for t in others if outdone(t, sibling, sibling_rule)]
    if rule == "less_efficient":
        return worse
    if rule == "most_different":
        return sorted(worse, key=lambda t: (is_correct(t), similarity(t, sibling)))[:1]
    raise ValueError(f"student_rule must be less_efficient | all | most_different, not {rule!r}")


def kept_traces(trajs: list, cap: int = 2, rule: str = "efficient") -> list:
    """The trajectories the sibling rule accepts (correct; for "searched", also searching), at most cap per
    question, the most efficient first (stable sort: ties by index)."""
    return [t for g in by_question(trajs).values()
            for t in sorted((t for t in g if can_be_sibling(t, rule)), key=RULES[rule])[:cap]]


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


def opsd_pairs(tok, trajs: list, cfg: DistillConfig) -> list[Pair]:
    """(student, privileged prompt, sibling) for every question that has a correct trajectory."""
    pairs = []
    for group in by_question(trajs).values():
        sib = select_sibling(group, cfg.sibling_rule)
        if sib is None:
            continue                   # no correct trajectory: nothing to distil from
        prompt = teacher_prompt_ids(tok, sib.question, privileged_hint(tok, sib, cfg.teacher_shows))
        pairs += [Pair(t, prompt, sib, span_labels(tok, t))
                  for t in select_students(group, sib, cfg.student_rule, cfg.sibling_rule)]
    return pairs


# The objectives: pure functions of logits, one row per trained token, to set beside the paper's equations.
class _ForwardKL(torch.autograd.Function):
    """KL(p_T || softmax(s)) per row with its exact gradient in s, p_S - p_T: exactly 0 at equal logits. Autograd's
    own is p_S sum(p_T) - p_T, and sum(p_T) misses 1 by float error that Adam would scale up to a full step."""
    @staticmethod
    def forward(ctx, t_logp, s_logits):
        s_logp = s_logits.log_softmax(-1)
        ctx.save_for_backward(t_logp, s_logp)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        t_logp, s_logp = ctx.saved_tensors
        return None, grad[:, None] * (s_logp.exp() - t_logp.exp())


def forward_kl(teacher_logits, student_logits, clip: float = 0.0) -> torch.Tensor:
    """Per token: KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)), each term clipped to [-clip, clip] if
    clip > 0. Equal logits give exactly 0, and (unclipped) exactly 0 gradient."""
    t_logp = teacher_logits.float().log_softmax(-1).detach()
    if not clip:
        return _ForwardKL.apply(t_logp, student_logits.float())
    terms = t_logp.exp() * (t_logp - student_logits.float().log_softmax(-1))
    return terms.clamp(-clip, clip).sum(-1)


def top1_cross_entropy(teacher_logits, student_logits) -> torch.Tensor:
    """Per token: -log p_S(argmax p_T)."""
    return -token_logp(student_logits, teacher_logits.argmax(-1))


def span_labels(tok, t) -> list[int]:
    """Per response token, its index in SPANS: 1 if it overlaps a query (the text inside <search>..</search>),
    2 an answer, else 3 if it overlaps a protocol tag, else 0: reasoning and <information> (masked anyway)."""
    pieces = tok.batch_decode([[i] for i in t.token_ids[t.prompt_len:]])
    text, ends = "".join(pieces), list(itertools.accumulate(map(len, pieces)))
    spans = [(m.start(1) + len(m[1]) - len(m[1].lstrip()), m.end(1) - len(m[1]) + len(m[1].rstrip()), k)
             for k, tag in ((1, "search"), (2, "answer")) for m in re.finditer(rf"<{tag}>(.*?)</{tag}>", text, re.S)]
    spans += [(m.start(), m.end(), 3) for m in TAG.finditer(text)]  # after the contents: they win a shared token
    return [next((k for s, e, k in spans if a < e and b > s), 0) for a, b in zip([0] + ends[:-1], ends)]


def pair_logits(policy, teacher, pairs: list[Pair], pad_id: int, autocast_bf16: bool = True, temperature: float = 1.0):
    """(teacher logits, student logits, (B, R) trained-token mask) at the students' policy-generated tokens, both
    divided by the sampling temperature (the distributions the rollouts drew from).
    pack() puts response token j at column P_T + j in the teacher batch and P_S + j in the student batch, and
    response_logits returns exactly the positions predicting them, so the (N, V) rows line up."""
    prompts, resp, masks = zip(*(split(p.student) for p in pairs))
    s_ids, s_attn, mask = pack(prompts, resp, masks, pad_id, policy.device)
    t_ids, t_attn, _ = pack([p.teacher_prompt for p in pairs], resp, masks, pad_id, policy.device)
    R, sel = mask.shape[1], mask.bool()    # only the policy's own tokens; no <information>, no padding
    with torch.no_grad(), autocast(teacher, autocast_bf16):
        t_logits = response_logits(teacher, t_ids, t_attn, R, sel).float() / temperature
    with autocast(policy, autocast_bf16):
        s_logits = response_logits(policy, s_ids, s_attn, R, sel).float() / temperature
    return t_logits, s_logits, mask


def opsd_loss(policy, teacher, pairs: list[Pair], pad_id: int, cfg: DistillConfig, diag: dict | None = None):
    """Summed per-token loss over the students' generated tokens; diag (if given) accumulates the KL per span
    and the count of tokens where teacher and student disagree on the argmax."""
    t_logits, s_logits, mask = pair_logits(policy, teacher, pairs, pad_id, cfg.autocast_bf16, cfg.temperature)
    kl = forward_kl(t_logits, s_logits, cfg.kl_clip)
    loss = kl if cfg.loss == "kl" else top1_cross_entropy(t_logits, s_logits)
    if diag is not None:
        spans = torch.tensor([lab + [0] * (mask.shape[1] - len(lab)) for lab in (p.labels for p in pairs)])
        spans = spans.to(mask.device)[mask.bool()]
        diag["disagree"] += int((t_logits.argmax(-1) != s_logits.detach().argmax(-1)).sum())
        for k, name in enumerate(SPANS):
            diag[f"kl_{name}"] += float(kl.detach()[spans == k].sum())
            diag[f"n_{name}"] += int((spans == k).sum())
    return loss.sum()


def sft_loss(policy, trajs: list, pad_id: int, autocast_bf16: bool = True, temperature: float = 1.0):
    """Summed cross-entropy on the trajectories' policy-generated tokens, at the sampling temperature."""
    ids, attn, mask = pack(*zip(*map(split, trajs)), pad_id, policy.device)
    R, keep = mask.shape[1], mask.bool()
    with autocast(policy, autocast_bf16):
        logits = response_logits(policy, ids, attn, R, keep)
    return -token_logp(logits.float() / temperature, ids[:, -R:][keep]).sum()


def distill(policy, tok, trajs: list, cfg: DistillConfig | None = None, optimizer=None, teacher=None) -> dict:
    """One self-distillation phase over the policy's own rollouts (t.reward set). The teacher is the policy as
    this phase finds it (after GRPO: the post-GRPO policy), frozen for the phase: train.frozen_copy, taken here
    (teacher, if given, replaces it: explain.py's view). Without an optimizer, a fresh train.make_optimizer()."""
    cfg = cfg or DistillConfig()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    optimizer = optimizer or make_optimizer(policy)
    groups = by_question(trajs)
    stats = dict(method=cfg.method, n_questions=len(groups), n_pairs=0, n_kept=0,
                 n_questions_with_correct=sum(any(map(is_correct, g)) for g in groups.values()),
                 format_valid=sum(t.finished and not t.invalid_actions for t in trajs) / max(len(trajs), 1))
    if cfg.method == "opsd":
        items = opsd_pairs(tok, trajs, cfg)
        teacher = teacher if teacher is not None else frozen_copy(policy)
        diag = dict(disagree=0, **{f"{k}_{s}": 0 for k in ("kl", "n") for s in SPANS})
        # diagnostics over the first pass only (each batch just before its own step): until every token is counted
        in_first_pass = lambda: sum(diag[f"n_{s}"] for s in SPANS) < n_total
        loss_fn = lambda rows: opsd_loss(policy, teacher, [items[i] for i in rows], pad_id, cfg,
                                         diag if in_first_pass() else None)
        traj_of = lambda p: p.student
        stats["n_pairs"] = len(items)
    elif cfg.method == "sft":
        items = kept_traces(trajs, cfg.per_question_cap, cfg.sibling_rule)
        loss_fn = lambda rows: sft_loss(policy, [items[i] for i in rows], pad_id, cfg.autocast_bf16, cfg.temperature)
        traj_of = lambda t: t
        stats["n_kept"] = len(items)
    else:
        raise ValueError(f"method must be opsd | sft, not {cfg.method!r}")
    n_tok = [sum(split(traj_of(x))[2]) for x in items]
    n_total = sum(n_tok)
    length = [len(traj_of(x).token_ids) for x in items]
    stats["tokens"] = n_total
    stats.update(train(policy, optimizer, len(items), loss_fn, n_tok, length, cfg.lr, cfg.batch_size,
                       cfg.micro_batch, cfg.max_grad_norm, cfg.epochs, cfg.warmup_steps, cfg.seed, cfg.method,
                       cfg.progress, cfg.steps))
    if cfg.method == "opsd" and n_total:   # no pairs, no KL measured: left out (None), not 0
        n = sum(diag[f"n_{s}"] for s in SPANS)
        stats.update(kl_before=sum(diag[f"kl_{s}"] for s in SPANS) / n, disagree_rate=diag["disagree"] / n,
                     **{f"kl_{s}": diag[f"kl_{s}"] / max(diag[f"n_{s}"], 1) for s in SPANS})
    return stats


if __name__ == "__main__":  # python distill.py --explain ...: explain.py's view of this step. runpy, not an import:
    import runpy            # explain imports this file, and tests/test_layering.py forbids the cycle an import makes
    import sys
    from pathlib import Path
    if sys.argv[1:2] != ["--explain"]:
        sys.exit("usage: python distill.py --explain [--model DIR] [--question ID] [--html FILE] [--seed N]")
    sys.exit(runpy.run_path(str(Path(__file__).with_name("explain.py")))["main"](sys.argv[2:]))
