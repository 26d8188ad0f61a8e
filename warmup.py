"""The warm-up: this project's addition, not the paper's. It teaches a model the Search-R1 protocol when it
cannot follow it at all.

Search-E1's 3B models follow the protocol zero-shot. SmolLM2-135M never emits a valid <search>, so every
reward would be 0 and no round could learn anything. evolve.py therefore clones the policy on scripted
traces of *training* questions only: search the article names the question is about (the question's
ideal_queries), read the real BM25 results, answer with the training answer, and only when that answer can
be read in the results. Dev and test answers are never seen. The traces are tokenized exactly as rollout.py
would have produced them, so the warm-up trains on the same masks and layout as every later round.
"""
from distill import DistillConfig, distill
from metrics import exact_match
from rollout import RolloutConfig, Trajectory, build_prompt
from search import information, safe_search


def scripted_traces(tok, questions: list[dict], retriever, rcfg: RolloutConfig) -> list[Trajectory]:
    """Warm-up traces, tokenized exactly as rollout.py would have produced them. Training questions only."""
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    traces = []
    for q in questions:
        queries = q.get("ideal_queries") or [q["question"]]
        t = Trajectory(q["id"], q["question"], enc(build_prompt(tok, q["question"])), [], 0, reward=1.0)
        t.prompt_len, t.loss_mask = len(t.token_ids), [0] * len(t.token_ids)
        seen = ""
        for i, query in enumerate(queries):
            think = "I need to search for" if i == 0 else "Now I need to search for"
            docs = safe_search(retriever, [query], rcfg.topk, rcfg.on_search_error)[0]
            obs = information(enc, docs, rcfg.max_obs_tokens)
            seen += tok.decode(obs)
            for ids, m in ((enc(f"<think> {think} {query}. </think>\n<search> {query} </search>"), 1), (obs, 0)):
                t.token_ids += ids; t.loss_mask += [m] * len(ids)
            t.queries.append(query)
        answer = q["golden_answers"][0]
        if exact_match(answer, [answer]) and answer.lower() in seen.lower():  # only clone answers it can read
            ids = enc(f"<think> The documents give the answer. </think>\n<answer> {answer} </answer>")
            t.token_ids += ids; t.loss_mask += [1] * len(ids)
            t.answer, t.finished, t.n_generated = answer, True, sum(t.loss_mask)
            traces.append(t)
    return traces


def warm_up(policy, tok, optimizer, questions: list[dict], retriever, rcfg: RolloutConfig, cfg: DistillConfig) -> dict:
    """Clone the policy on the scripted traces of these training questions (cross-entropy, distill.py's sft);
    distill()'s stats, whose n_kept is the number of traces cloned."""
    return distill(policy, tok, scripted_traces(tok, questions, retriever, rcfg), cfg, optimizer)
