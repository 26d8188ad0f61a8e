"""Throughput of nano-search-e1 on this machine: one process, one run, one `name: value` line per figure.

Rollouts dominate every round's cost (GRPO samples G trajectories per question, self-distillation rolls out
again, evaluation is a rollout), so the headline is generated tokens/s of rollout.py's batched multi-turn
agent against a naive per-sample HF `generate` loop that re-encodes the whole context every turn. The naive
loop lives here only as the yardstick (and as a greedy correctness check: both paths must emit the same
tokens). Also: matmul peak (to put tok/s in proportion), BM25 against rank_bm25, and the training step of
self-distillation (kept-trace SFT and OFSD). Progress goes to stderr; only the figures go to stdout.
Run: python bench.py [--quick]     (the CPU may be shared: only ratios from one run count)
"""
import argparse
import random
import resource
import sys
import time

import numpy as np
import torch

from data.load import CORPUS_PATH, QUESTIONS_DIR, load_qa
from data.prepare import ensure_all
from distill import DistillConfig, ofsd_loss, ofsd_pairs, sft_loss
from model import load_policy
from rollout import INVALID, LAST_TURN, RolloutConfig, build_prompt, last_tag, rollout
from search import BM25, ReferenceBM25, load_corpus, safe_search


def say(name, value):
    print(f"{name}: {str(value).lower() if isinstance(value, bool) else value}", flush=True)


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def peak_gflops(dtype, n: int, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b                                                        # warm-up
    return 2 * n ** 3 / min(timed(lambda: a @ b)[1] for _ in range(reps)) / 1e9


def naive_rollout(model, tok, question: str, retriever, cfg: RolloutConfig, eos: list[int]):
    """The "before" picture: one row, HF generate on the whole context every turn (no cache kept across turns),
    the same protocol as rollout.py. Returns (prompt + response ids, generated count, answer)."""
    ctx = tok(build_prompt(tok, question, "agent"), add_special_tokens=False).input_ids
    P, n_gen = len(ctx), 0
    for turn in range(1, cfg.max_turns + 2):
        x = torch.tensor([ctx])
        out = model.generate(x, attention_mask=torch.ones_like(x), stop_strings=["</search>", "</answer>"],
                             tokenizer=tok, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                             max_new_tokens=min(cfg.max_turn_tokens, cfg.max_total_tokens - (len(ctx) - P)))
        new = out[0, len(ctx):].tolist()
        ctx, n_gen = ctx + new, n_gen + len(new)
        text = tok.decode(new)
        query, answer = last_tag(text, "search"), last_tag(text, "answer")
        closing = max(("</search>", "</answer>"), key=text.rfind)
        room = cfg.max_total_tokens - (len(ctx) - P)
        if (answer is not None and closing == "</answer>" and text.rfind(closing) >= 0) or room < 16 \
                or turn > cfg.max_turns:
            break
        if query and closing == "</search>":
            obs = safe_search(retriever, [query[:300]], cfg.topk)[0]
            ids = tok(f"\n\n<information>{obs.strip()}</information>\n\n",
                      add_special_tokens=False).input_ids[:cfg.max_obs_tokens]
        else:
            ids = tok(INVALID, add_special_tokens=False).input_ids
        if turn == cfg.max_turns:
            ids += tok(LAST_TURN, add_special_tokens=False).input_ids
        ctx += ids[:room - 8]
    return ctx, n_gen, answer


def needed_tokens(trajs) -> int:
    """Tokens a rollout must run through the model at least once: each distinct prompt once (G siblings share
    it), and every response token, generated or observed, once. Re-encoding (the naive loop) is not counted."""
    prompts = {tuple(t.token_ids[:t.prompt_len]) for t in trajs}
    return sum(map(len, prompts)) + sum(len(t.token_ids) - t.prompt_len for t in trajs)


def attended_pairs(trajs) -> int:
    """Query-key pairs causal attention scores for needed_tokens: the token at position p sees p + 1 keys."""
    tri = lambda n: n * (n + 1) // 2
    prompts = {tuple(t.token_ids[:t.prompt_len]) for t in trajs}
    return sum(tri(len(p)) for p in prompts) + sum(tri(len(t.token_ids)) - tri(t.prompt_len) for t in trajs)


def first_diff(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller everything (< 1 min)")
    quick = ap.parse_args().quick
    t_start = time.perf_counter()
    random.seed(0); np.random.seed(0); torch.manual_seed(0)
    ensure_all()

    # ---- matmul peak: the ceiling tok/s is measured against
    n = 1024 if quick else 2048
    peak = {dt: peak_gflops(dt, n) for dt in (torch.float32, torch.bfloat16)}
    say("peak_gflops_fp32", f"{peak[torch.float32]:.1f}")
    say("peak_gflops_bf16", f"{peak[torch.bfloat16]:.1f}")

    # ---- search: the fast inverted index against rank_bm25, on question texts as queries
    docs = load_corpus(CORPUS_PATH)
    train = load_qa(QUESTIONS_DIR / "train.jsonl")
    nq = 200 if quick else 1000
    queries = [train[i % len(train)]["question"] for i in range(nq)]
    fast, ref = BM25(docs), ReferenceBM25(docs)
    ref_res, t_ref = timed(lambda: ref.search(queries, 3))
    fast_res, t_fast = timed(lambda: fast.search(queries, 3))
    same = all(len(a) == len(b) and all(x.id == y.id and abs(x.score - y.score) <= 1e-6 for x, y in zip(a, b))
               for a, b in zip(ref_res, fast_res))
    say("bm25_ref_qps", f"{nq / t_ref:.1f}")
    say("bm25_fast_qps", f"{nq / t_fast:.1f}")
    say("bm25_speedup", f"{t_ref / t_fast:.1f}")
    say("bm25_identical", same)

    # ---- rollouts: greedy (so both paths follow one deterministic protocol), real BM25, agent mode.
    # The naive loop runs one row at a time, so its tok/s does not depend on how many rows it is given: it runs
    # a few. rollout.py runs a round-sized batch (continuous batching only pays off with many rows).
    # quick shrinks the budget too (one search then the last turn), else the naive loop alone takes minutes.
    # The full run is a default GRPO round's rollout: 16 questions x G=4 in 64 slots (evolve.Config).
    n_naive, n_questions, G = (2, 8, 2) if quick else (4, 16, 4)
    cfg = RolloutConfig(group_size=G, temperature=0.0, seed=0,
                        **(dict(max_turns=1, max_turn_tokens=64, max_total_tokens=320) if quick else {}))
    questions = train[:n_questions]
    model, tok = load_policy("smollm2", dtype="float32")
    model.eval()
    # forward FLOPs: 2 per weight per token through the layers; the vocabulary-sized head only where a token is
    # sampled (feed() keeps the last position of a prefill). Attention is counted apart (attn_flops): the issue's
    # figure leaves it out, PaLM's MFU counts it (2 FLOPs a multiply-add, QK^T and AV, every head of every layer).
    body = sum(p.numel() for p in model.get_decoder().parameters()) - model.get_input_embeddings().weight.numel()
    c = model.config
    attn_flops = lambda trajs: 4 * c.num_hidden_layers * c.num_attention_heads * \
        getattr(c, "head_dim", c.hidden_size // c.num_attention_heads) * attended_pairs(trajs)
    rollout_flops = lambda needed, generated: 2 * body * needed + 2 * model.get_output_embeddings().weight.numel() * generated
    eos = sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                              tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None and i != tok.unk_token_id})
    warm = RolloutConfig(temperature=0.0, max_turns=0, max_turn_tokens=2)  # first-call costs (vocab scans) aside
    rollout(model, tok, questions[:1], fast, warm)
    naive_rollout(model, tok, questions[0]["question"], fast, warm, eos)

    naive, t_naive = timed(lambda: [naive_rollout(model, tok, q["question"], fast, cfg, eos)
                                    for q in questions[:n_naive]])
    naive_tokens = sum(g for _, g, _ in naive)
    log(f"naive: {n_naive} rows, {naive_tokens} tokens, {t_naive:.1f} s")
    trajs, t_roll = timed(lambda: rollout(model, tok, questions, fast, cfg))
    roll_tokens, needed = sum(t.n_generated for t in trajs), needed_tokens(trajs)
    log(f"rollout fp32: {len(trajs)} rows, {roll_tokens} generated / {needed} needed tokens, {t_roll:.1f} s")
    model_bf16, _ = load_policy("smollm2", dtype="bfloat16")
    model_bf16.eval()
    rollout(model_bf16, tok, questions[:1], fast, warm)
    trajs16, t_roll16 = timed(lambda: rollout(model_bf16, tok, questions, fast, cfg))
    roll16_tokens = sum(t.n_generated for t in trajs16)
    log(f"rollout bf16: {len(trajs16)} rows, {roll16_tokens} tokens, {t_roll16:.1f} s")
    del model_bf16

    naive_tok_s, roll_tok_s, roll16_tok_s = naive_tokens / t_naive, roll_tokens / t_roll, roll16_tokens / t_roll16
    say("naive_tok_s", f"{naive_tok_s:.1f}")
    say("rollout_tok_s", f"{roll_tok_s:.1f}")
    say("rollout_tok_s_bf16", f"{roll16_tok_s:.1f}")
    say("rollout_speedup", f"{roll_tok_s / naive_tok_s:.2f}")
    say("rollout_speedup_bf16", f"{roll16_tok_s / naive_tok_s:.2f}")
    # Model FLOPs utilisation: the FLOPs of the tokens the model must process (needed_tokens) per second, over
    # the peak. Counting generated tokens only would leave out most of the work: prompts and <information>
    # blocks are ~80% of it, so that figure can't pass generated_share even at 100% of peak.
    mfu = lambda flops, seconds, dt: f"{flops / seconds / (peak[dt] * 1e9):.4f}"
    say("rollout_fraction_of_peak", mfu(rollout_flops(needed, roll_tokens), t_roll, torch.float32))
    say("rollout_fraction_of_peak_bf16", mfu(rollout_flops(needed_tokens(trajs16), roll16_tokens), t_roll16,
                                             torch.bfloat16))
    # the first definition: 2 x parameters x generated tokens only
    say("rollout_fraction_of_peak_generated", mfu(rollout_flops(roll_tokens, roll_tokens), t_roll, torch.float32))
    say("rollout_generated_share", f"{roll_tokens / needed:.4f}")
    say("rollout_fraction_of_peak_with_attention", mfu(rollout_flops(needed, roll_tokens) + attn_flops(trajs), t_roll,
                                                       torch.float32))

    # correctness: every fp32 rollout row against the naive row of its question (whole response: generated
    # and observation tokens, so a protocol difference shows up too)
    by_q = {str(q["id"]): r for q, r in zip(questions, naive)}
    checked = [t for t in trajs if t.qid in by_q]
    differ = 0
    for t in checked:
        ctx, _, answer = by_q[t.qid]
        if t.token_ids != ctx:
            differ += 1
            i = first_diff(t.token_ids, ctx)
            log(f"row {t.qid} differs at response token {i - t.prompt_len} (of {len(t.token_ids) - t.prompt_len} / "
                f"{len(ctx) - t.prompt_len}): rollout {tok.decode(t.token_ids[i:i + 1])!r} vs naive "
                f"{tok.decode(ctx[i:i + 1])!r} after {tok.decode(ctx[max(t.prompt_len, i - 12):i])!r}")
    say("greedy_agreement", f"{1 - differ / len(checked):.3f}")
    say("greedy_rows_differ", f"{differ}/{len(checked)}")
    say("answer_agreement", f"{sum(t.answer == by_q[t.qid][2] for t in checked) / len(checked):.3f}")

    # ---- training step (forward + backward, bf16 autocast as DistillConfig's default), on the fp32 rollout.
    # Rewards are made up so that each question has siblings: the shortest trajectory of each question is
    # "correct". A throughput measurement, not learning: no optimizer step.
    dcfg = DistillConfig(method="ofsd")
    for t in trajs:
        t.reward = 0.0
    for qid in by_q:
        min((t for t in trajs if t.qid == qid), key=lambda t: t.n_generated).reward = 1.0
    model.train()
    pad_id = tok.pad_token_id
    mb = dcfg.micro_batch
    n_rows = 4 if quick else 8
    # SFT: any trajectory costs per token what a kept trace does, so the first rows (by length, as distill
    # batches them) stand in for kept traces. tokens = real (unpadded) tokens of the forwarded sequences.
    rows = sorted(trajs, key=lambda t: len(t.token_ids))[:n_rows]

    def sft():
        for i in range(0, len(rows), mb):
            sft_loss(model, rows[i:i + mb], pad_id, dcfg.autocast_bf16)[0].backward()
    _, t_sft = timed(sft)
    say("train_tok_s", f"{sum(len(t.token_ids) for t in rows) / t_sft:.1f}")
    model.zero_grad(set_to_none=True)
    # OFSD: tokens = student sequence + teacher sequence (privileged prompt + the student's response)
    pairs = sorted(ofsd_pairs(tok, trajs, dcfg), key=lambda p: len(p.student.token_ids))[:n_rows]

    def ofsd():
        for i in range(0, len(pairs), mb):
            ofsd_loss(model, pairs[i:i + mb], pad_id, dcfg.kl_topk, dcfg.autocast_bf16)[0].backward()
    _, t_ofsd = timed(ofsd)
    ofsd_tokens = sum(2 * len(p.student.token_ids) - p.student.prompt_len + len(p.teacher_prompt) for p in pairs)
    say("ofsd_tok_s", f"{ofsd_tokens / t_ofsd:.1f}")
    model.zero_grad(set_to_none=True)

    say("peak_rss_gb", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f}")
    say("seconds", f"{time.perf_counter() - t_start:.1f}")


if __name__ == "__main__":
    main()
