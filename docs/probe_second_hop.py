"""A diagnosis, not part of the method: can this model form a two-hop question's second query from what its
first search returned, and can it read the answer once the right article is in front of it?

    python docs/probe_second_hop.py --model runs/ablation/grpo_opsd/seed0/round_3 [--split=dev] [--out=FILE]

For every two-hop question of the split (dev by default: settings are chosen on dev), greedy, layout and
tokenization as rollout.py writes them:
  own     the agent as it is: its first turn, the first <information>, then whatever it does next
  forced  the same first turn and <information>, then the warm-up's second-hop opening
          "<think> Now I need to search for" is written for it: does its query name the bridge (the question's
          second source, e.g. the novel's author), does BM25's top-3 for it hold the gold answer, and its answer
  oracle  the same, with the warm-up's whole second turn written for it (the bridge's own article as query):
          what reading alone gives when the right documents are there; for a question it answers without
          searching, after the warm-up's first turn written for it too
No weights change.
"""
import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, run from anywhere
from data.load import QUESTIONS_DIR, load_qa  # noqa: E402
from data.questions import TWO_HOP_KINDS, contains  # noqa: E402
from metrics import exact_match  # noqa: E402
from model import load_policy  # noqa: E402
from rollout import RolloutConfig, build_prompt, last_tag  # noqa: E402
from search import get_retriever, information, safe_search  # noqa: E402


@torch.no_grad()
def turn(model, tok, ids: list[int], max_new: int) -> list[int]:
    """One greedy turn: up to </search>, </answer> or end of sequence, as rollout.py stops it."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, tokenizer=tok,
                         stop_strings=["</search>", "</answer>"], attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def probe(model, tok, q: dict, retriever, rcfg: RolloutConfig) -> dict:
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    docs = functools.lru_cache(lambda query: safe_search(retriever, [query], rcfg.topk)[0])  # each query searched once
    obs = lambda query: information(enc, docs(query), rcfg.max_obs_tokens)  # as rollout.py: a cut keeps its tag
    has_gold = lambda query: any(contains(docs(query), g) for g in gold)
    gold, bridge = q["golden_answers"], q["sources"][1]
    em = lambda text: float(exact_match(last_tag(text, "answer") or "", gold))
    ids = enc(build_prompt(tok, q["question"]))
    first = turn(model, tok, ids, rcfg.max_turn_tokens)
    q1 = last_tag(tok.decode(first), "search")
    r = {"id": q["id"], "kind": q["kind"], "q1": q1}
    if q1 is None:  # answered (or failed) without searching: its own hops cannot be probed, its reading can, with
        r |= {"own_em": em(tok.decode(first)), "own_second_search": False}  # the warm-up's first turn scripted
        q1 = (q.get("ideal_queries") or q["sources"])[0]
        ids = ids + enc(f"<think> I need to search for {q1}. </think>\n<search> {q1} </search>") + obs(q1)
        return r | oracle(model, tok, ids, bridge, obs, has_gold, em, rcfg)
    ids = ids + first + obs(q1)
    own = tok.decode(turn(model, tok, ids, rcfg.max_turn_tokens))
    opening = enc("<think> Now I need to search for")
    forced_ids = opening + turn(model, tok, ids + opening, rcfg.max_turn_tokens)
    forced = tok.decode(forced_ids)
    q2 = last_tag(forced, "search")
    r |= {"own": own, "forced": forced, "own_second_search": last_tag(own, "search") is not None, "own_em": em(own), "q2": q2,
          "thought_names_bridge": contains(forced.split("</think>")[0], bridge),
          "q2_names_bridge": bool(q2) and contains(q2, bridge),
          "q2_top3_has_gold": bool(q2) and has_gold(q2)}
    if q2:
        after = ids + forced_ids + obs(q2)
        r["forced_em"] = em(tok.decode(turn(model, tok, after, rcfg.max_turn_tokens)))
    return r | oracle(model, tok, ids, bridge, obs, has_gold, em, rcfg)


def oracle(model, tok, ids, bridge, obs, has_gold, em, rcfg) -> dict:
    """The warm-up's second turn written for the model (the bridge's article as its query), then its answer."""
    script = tok(f"<think> Now I need to search for {bridge}. </think>\n<search> {bridge} </search>",
                 add_special_tokens=False).input_ids + obs(bridge)
    read = tok.decode(turn(model, tok, ids + script, rcfg.max_turn_tokens))
    return {"oracle_top3_has_gold": has_gold(bridge), "oracle_em": em(read), "oracle_answer": last_tag(read, "answer")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--out", default=None, help="per-question records as jsonl")
    a = ap.parse_args(argv)
    model, tok = load_policy(a.model, device="cpu", dtype="float32")
    model.eval()
    questions = [q for q in load_qa(QUESTIONS_DIR / f"{a.split}.jsonl") if q.get("kind") in TWO_HOP_KINDS]
    retriever, rcfg = get_retriever(), RolloutConfig()
    rows = []
    for n, q in enumerate(questions):
        rows.append(probe(model, tok, q, retriever, rcfg))
        print(f"{n + 1}/{len(questions)} {json.dumps(rows[-1])}", flush=True)
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = lambda k: sum(float(r.get(k) or 0) for r in rows) / len(rows)
    print(f"{a.model}: {len(rows)} two-hop {a.split} questions, {sum(r['q1'] is not None for r in rows)} searched first")
    for k in ("own_second_search", "own_em", "thought_names_bridge", "q2_names_bridge", "q2_top3_has_gold", "forced_em",
              "oracle_top3_has_gold", "oracle_em"):
        print(f"  {k:22s} {mean(k):.3f}")


if __name__ == "__main__":
    main()
