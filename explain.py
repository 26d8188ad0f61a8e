"""Self-distillation, token by token: a classroom view of distill.py's step (paper, Sec. 3.3). No weights change.

    python distill.py --explain [--model DIR] [--question ID] [--html FILE] [--seed N]   (= python explain.py ...)

For one training question, what a round of evolve.py does before its distillation update: G rollouts at evolve's
settings (temperature 1), rewarded by exact match; the sibling (distill.select_sibling); the privileged prompt the
teacher reads, hint marked. Then, on the first student's own tokens, the per-token KL(teacher || student) that
distill.opsd_loss sums, token by token in colour, <information> greyed (masked: not trained); both top-5s where
the KL is largest; one summary line over all the question's pairs. The numbers are distill.py's (opsd_pairs,
pair_logits, forward_kl), the teacher a frozen fp32 copy, as in training. Question: the first in evolve's shuffled order
(seed 0), from where its rounds draw (after the warm-up's quarter), with a correct rollout (BATCH at a time, at
most --tries). Model: --model, else the latest runs/evolve/round_*, else the embedded SmolLM2, almost never right
before the warm-up: then it says so and exits with status 1.
"""
import argparse
import copy
import html
import itertools
import sys

import torch

from data.load import QUESTIONS_DIR, load_qa, training_order
from data.prepare import ensure_all
from distill import (DistillConfig, by_question, forward_kl, opsd_pairs, pair_logits, privileged_hint, select_sibling,
                     select_students)
from evolve import Config, rollout_cfg
from metrics import exact_match
from model import EMBEDDED, ROOT, load_policy, pick_device_dtype
from rollout import rollout
from search import get_retriever
from train import frozen_copy

BATCH = 4  # questions rolled out together (G rows each): continuous batching keeps the rows busy
RULE_WHY = {"efficient": "fewest searches, then fewest tokens, then the first", "searched": "'efficient' among "
            "the correct ones that searched", "shortest": "fewest tokens, then fewest searches, then the first"}
# KL colour scale: (upper bound, xterm-256 background, the same colour in HTML); below 0.01 no colour
SCALE = ((0.01, None, None), (0.1, 230, "#ffffd7"), (0.3, 228, "#ffff87"), (1.0, 214, "#ffaf00"),
         (3.0, 202, "#ff5f00"), (float("inf"), 196, "#ff0000"))
MARKS = {"masked": ("\x1b[38;5;245m", "\x1b[0m", "«", "»"), "hint": ("\x1b[1;30;43m", "\x1b[0m", ">>>", "<<<")}


def shade(kl: float):
    return next((ansi, hexa) for hi, ansi, hexa in SCALE if kl < hi)


def analyse(policy, teacher, tok, group: list, cfg: DistillConfig) -> dict | None:
    """distill.py's step on one question's rollouts (t.reward set), without the update: its pairs, the mean
    per-token KL and the argmax disagreement over all of them, and the first pair's per-token KL and
    teacher / student distributions. None when no trajectory is correct (no sibling, nothing to distil)."""
    pairs = opsd_pairs(tok, group, cfg)
    if not pairs:
        return None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():  # the same logits opsd_loss computes; no backward here
        t_logits, s_logits, mask = pair_logits(policy, teacher, pairs, pad, cfg.autocast_bf16, cfg.temperature)
        kl = forward_kl(t_logits, s_logits, cfg.kl_clip)
    n0 = int(mask[0].sum())  # rows are (pair, position) in order: the first pair's trained tokens come first
    return dict(pairs=pairs, n_pairs=len(pairs), n_tokens=len(kl), mean_kl=kl.mean().item(),
                disagree=(t_logits.argmax(-1) != s_logits.argmax(-1)).float().mean().item(), kl=kl[:n0].tolist(),
                p_teacher=t_logits[:n0].float().softmax(-1), p_student=s_logits[:n0].float().softmax(-1))


def summary_line(res: dict) -> str:
    return (f"pairs {res['n_pairs']}, mean KL {res['mean_kl']:.4g}, "
            f"argmax differs on {100 * res['disagree']:.1f}% of tokens")


def report(tok, group: list, res: dict, cfg: DistillConfig) -> list[tuple]:
    """The explanation as (text, kind, kl) pieces. kind: "" plain, "hint", "masked" (not trained), "tok" (a
    trained token with its KL), "key" (the colour scale)."""
    first, sib = res["pairs"][0], res["pairs"][0].sibling
    students = select_students(group, sib, cfg.student_rule, cfg.sibling_rule)
    out = [(f"question {sib.qid}: {sib.question}\n\n{len(group)} rollouts, exact-match reward:\n", "", 0.0)]
    for i, t in enumerate(group):
        role = (f"<- sibling ({cfg.sibling_rule}: {RULE_WHY[cfg.sibling_rule]})" if t is sib else
                "student (shown below)" if t is first.student else
                "student" if any(t is s for s in students) else "")
        out.append((f"  #{i} reward {t.reward:.0f}  searches {len(t.queries)}  generated {t.n_generated:3d}  answer "
                    f"{str(t.answer)[:20]!r:22} {role}\n      queries: {'; '.join(t.queries)[:90] or '-'}\n", "", 0.0))
    hint = privileged_hint(tok, sib, cfg.teacher_shows)
    text = tok.decode(first.teacher_prompt)
    head, found, tail = text.partition(hint) if hint else (text, "", "")
    out += [(f"\nthe teacher reads (teacher_shows={cfg.teacher_shows}; the student reads it without the hint):\n",
             "", 0.0), (head, "", 0.0), (found, "hint", 0.0), (tail + "\n", "", 0.0)]
    idx = next(i for i, t in enumerate(group) if t is first.student)
    out.append((f"\nstudent #{idx} (reward {first.student.reward:.0f}): each generated token coloured by its "
                f"KL(teacher || student); <information> greyed: masked, not trained\nscale:", "", 0.0))
    out += [(f" {lo:g}+ ", "key", lo) for lo in (0.0,) + tuple(hi for hi, *_ in SCALE[:-1])] + [("\n", "", 0.0)]
    s, kls = first.student, iter(res["kl"])
    resp, mask = s.token_ids[s.prompt_len:], s.loss_mask[s.prompt_len:]
    for trained, run in itertools.groupby(zip(resp, mask), key=lambda x: x[1]):
        ids = [i for i, _ in run]
        out += [(tok.decode([i]), "tok", next(kls)) for i in ids] if trained else [(tok.decode(ids), "masked", 0.0)]
    kl, gen = torch.tensor(res["kl"]), [i for i, m in zip(resp, mask) if m]
    out.append((f"\n\nthe student's {min(5, len(kl))} largest-KL tokens, top-5 probabilities there:\n", "", 0.0))
    for j in kl.topk(min(5, len(kl))).indices.tolist():
        out.append((f"  token {j} {tok.decode([gen[j]])!r}: KL {kl[j]:.3f}\n", "", 0.0))
        for who in ("teacher", "student"):
            v, ix = (x.tolist() for x in res[f"p_{who}"][j].topk(5))
            top = "  ".join(f"{tok.decode([i])!r} {x:.2f}" for x, i in zip(v, ix))
            out.append((f"    {who}: {top}\n", "", 0.0))
    return out + [("\n" + summary_line(res) + "\n", "", 0.0)]


def wrap(text: str, a: str, b: str) -> str:
    """a + text + b, with the text's leading and trailing newlines left outside (no colour runs past a line)."""
    core = text.strip("\n")
    lead = text[:len(text) - len(text.lstrip("\n"))]
    return lead + a + core + b + text[len(lead) + len(core):] if core else text


def to_text(pieces: list[tuple], color: bool) -> str:
    """ANSI 256-colour backgrounds for a terminal; else plain, each trained token followed by [its KL]."""
    out = []
    for text, kind, kl in pieces:
        if kind in ("tok", "key") and color:
            ansi = shade(kl)[0]
            out.append(wrap(text, f"\x1b[48;5;{ansi};38;5;16m", "\x1b[0m") if ansi else text)
        elif kind == "tok":
            core = text.rstrip("\n")
            out.append(f"{core}[{kl:.2f}]{text[len(core):]}")
        elif kind in ("masked", "hint"):
            out.append(wrap(text, *MARKS[kind][:2] if color else MARKS[kind][2:]))
        else:
            out.append(text)
    return "".join(out)


def to_html(pieces: list[tuple]) -> str:
    """A standalone page: the same colours; hover a token to see its KL."""
    fmt = {"tok": '<span class="g" title="KL {kl:.4f}" style="background:{bg}">{t}</span>', "": "{t}",
           "key": '<span class="k" style="background:{bg}">{t}</span>', "hint": "<mark>{t}</mark>",
           "masked": '<span class="m" title="masked: not trained">{t}</span>'}
    body = [fmt[k].format(t=html.escape(x), kl=kl, bg=shade(kl)[1] or "none") for x, k, kl in pieces]
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>self-distillation, token by token</title>"
            "<style>body{font-family:monospace;white-space:pre-wrap;max-width:110ch;margin:2em auto}"
            ".m{color:#999}mark{background:#fd5;font-weight:bold}</style></head>\n<body>" + "".join(body) +
            "</body></html>\n")


def latest_round(out=ROOT / "runs" / "evolve"):
    rounds = [(int(p.name[6:]), p) for p in out.glob("round_*")
              if p.name[6:].isdigit() and (p / "config.json").exists()]
    return max(rounds)[1] if rounds else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python distill.py --explain", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a model folder (default: the latest runs/evolve/round_*, else the embedded one)")
    ap.add_argument("--question", help="a training question id (default: the first with a correct rollout)")
    ap.add_argument("--html", help="also write the view as a standalone HTML page")
    ap.add_argument("--seed", type=int, default=0, help="the rollouts' sampling seed")
    ap.add_argument("--tries", type=int, default=8, help="questions tried at most")
    args = ap.parse_args(argv)
    cfg = Config()  # evolve's defaults: G, rollout settings, sibling / student rules, what the teacher sees
    path = args.model or latest_round()
    print(f"model: {path} (--model)" if args.model else f"model: {path} (the latest evolve round, preferred)" if path
          else f"model: {EMBEDDED} (embedded, not warmed up: no runs/evolve/round_*)")
    ensure_all()
    policy, tok = load_policy(str(path or EMBEDDED), dtype="float32")
    actor = copy.deepcopy(policy).to(pick_device_dtype(None, cfg.rollout_dtype)[1]).eval()  # evolve's rollouts
    teacher = frozen_copy(policy)                                                         # and its teacher
    dcfg = DistillConfig(loss=cfg.distill_loss, kl_clip=cfg.kl_clip, sibling_rule=cfg.sibling_rule,  # evolve's:
                         student_rule=cfg.student_rule, teacher_shows=cfg.teacher_shows,  # bf16 autocast
                         temperature=cfg.temperature, autocast_bf16=actor.dtype == torch.bfloat16)  # iff a bf16 actor
    retriever, train = get_retriever(), load_qa(QUESTIONS_DIR / "train.jsonl")
    gold = {q["id"]: q["golden_answers"] for q in train}
    if args.question:
        qs = [q for q in train if q["id"] == args.question]
        if not qs:
            sys.exit(f"no training question with id {args.question!r}")
    else:
        order, cursor = training_order(train, cfg.balance_kinds)  # evolve.py's order
        qs = order[cursor:][:args.tries]
    for lo in range(0, len(qs), BATCH):
        trajs = rollout(actor, tok, qs[lo:lo + BATCH], retriever,
                        rollout_cfg(cfg, group_size=cfg.group_size, seed=args.seed))
        for t in trajs:
            t.reward = exact_match(t.answer, gold[t.qid])
        groups = by_question(trajs)
        print("rolled out", ", ".join(f"{k}: {sum(t.reward for t in g):.0f}/{len(g)} right" for k, g in groups.items()))
        group = next((g for g in groups.values() if select_sibling(g, dcfg.sibling_rule)), None)
        if group:
            break
    else:
        print(f"no sibling: none of the {cfg.group_size} rollouts of {len(qs)} question(s) is correct" +
              ("; the raw model needs the warm-up first: python evolve.py --rounds=0" if not path else
               "; try another --seed or --question"), file=sys.stderr)
        return 1
    pieces = report(tok, group, analyse(policy, teacher, tok, group, dcfg), dcfg)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(to_html(pieces))
        print(f"html: {args.html}")
    print(to_text(pieces, sys.stdout.isatty()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
