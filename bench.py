"""Throughput of nano-search-e1 on this machine: one process, one run, one `name: value` line per figure.

Rollouts dominate every round's cost (GRPO samples G trajectories per question, self-distillation rolls out
again, evaluation is a rollout), so the headline is generated tokens/s of rollout.py's batched multi-turn
agent against a naive per-sample HF `generate` loop that re-encodes the whole context every turn. The naive
loop lives here only as the yardstick (and as a greedy correctness check: both paths must emit the same
tokens). Each rollout is also held against its roofline: no forward step (a rollout.feed call, timed here) can
beat its FLOPs over the matmul peak or its bytes (weights, KV cache) over the memory bandwidth, both measured in
this run. Also: BM25 against rank_bm25, and the training step of self-distillation (kept-trace SFT and OPSD).
Progress goes to stderr; only the figures go to stdout.
Run: python bench.py [--quick]     (the CPU may be shared: only ratios from one run count)
"""
import argparse
import contextlib
import random
import resource
import sys
import time
from collections import namedtuple

import numpy as np
import torch

import rollout as rollout_module
from data.load import CORPUS_PATH, QUESTIONS_DIR, load_qa
from data.prepare import ensure_all
from distill import DistillConfig, opsd_loss, opsd_pairs, sft_loss
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
    """a @ b.T, the layout nn.Linear runs (x @ W.T): without native bf16 (AVX2), PyTorch's bf16 a @ b is ~10x
    slower than its a @ b.T, so plain a @ b would not be the ceiling the model's matmuls can reach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b.T                                                      # warm-up
    return 2 * n ** 3 / min(timed(lambda: a @ b.T)[1] for _ in range(reps)) / 1e9


def memory_gbs(mb: int = 512, reps: int = 5) -> float:
    """Bytes read per second by a sum over an fp32 tensor far larger than the last-level cache: a rollout's
    traffic is reads (weights, KV cache), and a sum reads every byte once and writes nothing."""
    a = torch.ones(mb * 2 ** 20 // 4)
    a.sum()                                                      # warm-up
    return a.nbytes / min(timed(a.sum)[1] for _ in range(reps)) / 1e9


# what a forward step's least cost depends on: parameters every token goes through (the decoder less its input
# embedding), the vocabulary head's (feed() runs it on one position per row), and attention's shape
Arch = namedtuple("Arch", "body head layers heads kv_heads head_dim")


def arch_of(model) -> Arch:
    c, body = model.config, sum(p.numel() for p in model.get_decoder().parameters())
    return Arch(body - model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel(),
                c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                getattr(c, "head_dim", c.hidden_size // c.num_attention_heads))


def step_cost(a: Arch, starts: list[int], lens: list[int], wsize: int, kvsize: int) -> tuple[int, int]:
    """(FLOPs, bytes) one feed() step cannot avoid, for rows holding starts[i] tokens that append lens[i] more
    (a row with nothing to append does no work). FLOPs: 2 per weight per token, the head once per row, and
    attention at 2 per multiply-add (QK^T and AV, every head), the token at position p seeing p + 1 keys.
    Bytes: every weight once (wsize bytes each), plus per layer each row's keys and values read over its attended
    length (starts + lens) and written for its new tokens (kvsize bytes each). Activations are left out."""
    rows = [(s, n) for s, n in zip(starts, lens) if n]
    tokens, pairs = sum(n for _, n in rows), sum(n * s + n * (n + 1) // 2 for s, n in rows)
    flops = 2 * a.body * tokens + 2 * a.head * len(rows) + 4 * a.layers * a.heads * a.head_dim * pairs
    kv = 2 * a.layers * a.kv_heads * a.head_dim * kvsize          # one position's keys + values, every layer
    return flops, (a.body + a.head) * wsize + kv * sum(s + 2 * n for s, n in rows)


@contextlib.contextmanager
def timed_feed(steps: list):
    """While active, every rollout.feed call appends (starts, lens, seconds) to steps. rollout.py is untouched:
    its loop looks feed up in its module on every call, so the module's name is swapped here, then restored."""
    inner = rollout_module.feed

    def feed(model, cache, slots, chunks, pad_id):
        starts = cache.n[torch.tensor(slots)].tolist()
        out, seconds = timed(lambda: inner(model, cache, slots, chunks, pad_id))
        steps.append((starts, [len(c) for c in chunks], seconds))
        return out
    rollout_module.feed = feed
    try:
        yield steps
    finally:
        rollout_module.feed = inner


def roofline(steps, seconds: float, a: Arch, size: int, peak_flops: float, bandwidth: float, tag: str = ""):
    """Says the rollout's fraction of its roofline and where its measured time went. A decode step appends one
    token per row (an admitted sibling's 1-token prefill looks the same and counts as one)."""
    costs = [(f / peak_flops, b / bandwidth) for f, b in (step_cost(a, s, n, size, size) for s, n, _ in steps)]
    least, decode = [max(c) for c in costs], [max(n) <= 1 for _, n, _ in steps]
    t_dec, t_pre = (sum(t for (_, _, t), d in zip(steps, decode) if d == kind) for kind in (True, False))
    say(f"rollout_fraction_of_roofline{tag}", f"{sum(least) / seconds:.4f}")  # every step's least time / measured
    dec_least = sum(l for l, d in zip(least, decode) if d)
    say(f"rollout_decode_fraction_of_roofline{tag}", f"{dec_least / t_dec:.4f}")  # the same, decode steps alone
    # shares of the rollout's measured time: decode steps, prefill steps, and outside feed (Python, sampling, search)
    for part, t in (("decode", t_dec), ("prefill", t_pre), ("outside_feed", seconds - t_dec - t_pre)):
        say(f"rollout_{part}_share{tag}", f"{t / seconds:.4f}")
    log(f"{tag or '_fp32'}: {sum(decode)} of {len(steps)} steps decode, {sum(b > f for f, b in costs)} memory-bound")


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

    # ---- the roofline's two ceilings, measured here: matmul peak per dtype and memory bandwidth
    peak = {dt: peak_gflops(dt, 1024 if quick else 2048) for dt in (torch.float32, torch.bfloat16)}
    bandwidth = memory_gbs()
    say("peak_gflops_fp32", f"{peak[torch.float32]:.1f}")          # best fp32 n x n matmul, GFLOP/s
    say("peak_gflops_bf16", f"{peak[torch.bfloat16]:.1f}")         # the same in bf16
    say("memory_bandwidth_gbs", f"{bandwidth:.1f}")                # GB/s read by a 512 MB fp32 sum, best of 5

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
    say("bm25_ref_qps", f"{nq / t_ref:.1f}")                       # queries/s, top-3, rank_bm25
    say("bm25_fast_qps", f"{nq / t_fast:.1f}")                     # queries/s, top-3, search.BM25
    say("bm25_speedup", f"{t_ref / t_fast:.1f}")                   # the ratio of the two
    say("bm25_identical", same)

    # ---- rollouts: greedy (so both paths follow one deterministic protocol), real BM25, agent mode.
    # The naive loop runs one row at a time, so its tok/s does not depend on how many rows it is given: it runs a
    # few. rollout.py runs a round-sized batch (continuous batching only pays off with many rows). quick shrinks
    # the budget too (one search then the last turn), else the naive loop alone takes minutes.
    # The full run is a default GRPO round's rollout: 16 questions x G=4 in 64 slots (evolve.Config).
    n_naive, n_questions, G = (2, 8, 2) if quick else (4, 16, 4)
    cfg = RolloutConfig(group_size=G, temperature=0.0, seed=0,
                        **(dict(max_turns=1, max_turn_tokens=64, max_total_tokens=320) if quick else {}))
    questions = train[:n_questions]
    model, tok = load_policy("smollm2", dtype="float32")
    a = arch_of(model.eval())
    eos = sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                              tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None and i != tok.unk_token_id})
    warm = RolloutConfig(temperature=0.0, max_turns=0, max_turn_tokens=2)  # first-call costs (vocab scans) aside
    naive_rollout(model, tok, questions[0]["question"], fast, warm, eos)
    naive, t_naive = timed(lambda: [naive_rollout(model, tok, q["question"], fast, cfg, eos)
                                    for q in questions[:n_naive]])
    naive_tokens = sum(g for _, g, _ in naive)
    log(f"naive: {n_naive} rows, {naive_tokens} tokens, {t_naive:.1f} s")

    def timed_rollout(m, name):                                    # (trajectories, seconds, feed steps)
        rollout(m, tok, questions[:1], fast, warm)
        with timed_feed([]) as steps:
            trajs, seconds = timed(lambda: rollout(m, tok, questions, fast, cfg))
        log(f"rollout {name}: {len(trajs)} rows, {needed_tokens(trajs)} needed tokens, {len(steps)} feed steps, "
            f"{seconds:.1f} s")
        return trajs, seconds, steps
    trajs, t_roll, steps = timed_rollout(model, "fp32")
    trajs16, t_roll16, steps16 = timed_rollout(load_policy("smollm2", dtype="bfloat16")[0].eval(), "bf16")

    roll_tokens, roll16_tokens, needed = (sum(t.n_generated for t in trajs), sum(t.n_generated for t in trajs16),
                                          needed_tokens(trajs))
    naive_tok_s, roll_tok_s, roll16_tok_s = naive_tokens / t_naive, roll_tokens / t_roll, roll16_tokens / t_roll16
    say("naive_tok_s", f"{naive_tok_s:.1f}")                       # generated tok/s, naive loop, fp32, 1 row
    say("rollout_tok_s", f"{roll_tok_s:.1f}")                      # generated tok/s, rollout.py, fp32
    say("rollout_tok_s_bf16", f"{roll16_tok_s:.1f}")               # the same in bf16
    say("rollout_speedup", f"{roll_tok_s / naive_tok_s:.2f}")      # rollout.py fp32 over the naive loop
    say("rollout_speedup_bf16", f"{roll16_tok_s / naive_tok_s:.2f}")  # rollout.py bf16 over the naive loop
    # MFU: FLOPs of the tokens the model must process (needed_tokens; 2 per weight per token, the head only where a
    # token is sampled) per second over the peak. Generated tokens alone leave out prompts and <information> (~80%).
    flops = lambda needed, generated: 2 * a.body * needed + 2 * a.head * generated
    mfu = lambda fl, seconds, dt: f"{fl / seconds / (peak[dt] * 1e9):.4f}"
    say("rollout_fraction_of_peak", mfu(flops(needed, roll_tokens), t_roll, torch.float32))
    say("rollout_fraction_of_peak_bf16", mfu(flops(needed_tokens(trajs16), roll16_tokens), t_roll16, torch.bfloat16))
    # the narrowest count: 2 x parameters x generated tokens only
    say("rollout_fraction_of_peak_generated", mfu(flops(roll_tokens, roll_tokens), t_roll, torch.float32))
    say("rollout_generated_share", f"{roll_tokens / needed:.4f}")
    # PaLM's MFU: attention's FLOPs too (2 a multiply-add, QK^T and AV, every head of every layer)
    attn = 4 * a.layers * a.heads * a.head_dim * attended_pairs(trajs)
    say("rollout_fraction_of_peak_with_attention", mfu(flops(needed, roll_tokens) + attn, t_roll, torch.float32))
    roofline(steps, t_roll, a, 4, peak[torch.float32] * 1e9, bandwidth * 1e9)
    roofline(steps16, t_roll16, a, 2, peak[torch.bfloat16] * 1e9, bandwidth * 1e9, "_bf16")

    # correctness: every fp32 rollout row against the naive row of its question (whole response: generated
    # and observation tokens, so a protocol difference shows up too)
    by_q = {str(q["id"]): r for q, r in zip(questions, naive)}
    checked = [t for t in trajs if t.qid in by_q]
    differ = [t for t in checked if t.token_ids != by_q[t.qid][0]]
    for t in differ:
        ctx = by_q[t.qid][0]
        i = first_diff(t.token_ids, ctx)
        log(f"row {t.qid} differs at response token {i - t.prompt_len} (of {len(t.token_ids) - t.prompt_len} / "
            f"{len(ctx) - t.prompt_len}): rollout {tok.decode(t.token_ids[i:i + 1])!r} vs naive "
            f"{tok.decode(ctx[i:i + 1])!r} after {tok.decode(ctx[max(t.prompt_len, i - 12):i])!r}")
    say("greedy_agreement", f"{1 - len(differ) / len(checked):.3f}")
    say("greedy_rows_differ", f"{len(differ)}/{len(checked)}")
    say("answer_agreement", f"{sum(t.answer == by_q[t.qid][2] for t in checked) / len(checked):.3f}")

    # ---- training step (forward + backward), on the fp32 rollout, under bf16 autocast (DistillConfig's default) only
    # where the bf16 matmul peak above beats fp32's: without native bf16 (AVX2) PyTorch's fallback is ~6x slower.
    # Rewards are made up so that each question has siblings: the shortest trajectory of each question is
    # "correct". A throughput measurement, not learning: no optimizer step.
    dcfg = DistillConfig(method="opsd", autocast_bf16=peak[torch.bfloat16] > peak[torch.float32])
    say("train_autocast_bf16", dcfg.autocast_bf16)
    for t in trajs:
        t.reward = float(t.qid in by_q and t is min((u for u in trajs if u.qid == t.qid), key=lambda u: u.n_generated))
    model.train()
    n_rows, mb, pad_id = (4 if quick else 8), dcfg.micro_batch, tok.pad_token_id

    def fwd_bwd(items, loss) -> float:                             # seconds, in micro-batches as distill runs
        _, seconds = timed(lambda: [loss(items[i:i + mb]).backward() for i in range(0, len(items), mb)])
        model.zero_grad(set_to_none=True)
        return seconds
    # SFT: any trajectory costs per token what a kept trace does, so the first rows (by length, as distill
    # batches them) stand in for kept traces. tokens = real (unpadded) tokens of the forwarded sequences.
    rows = sorted(trajs, key=lambda t: len(t.token_ids))[:n_rows]
    t_sft = fwd_bwd(rows, lambda b: sft_loss(model, b, pad_id, dcfg.autocast_bf16))
    say("train_tok_s", f"{sum(len(t.token_ids) for t in rows) / t_sft:.1f}")  # SFT fwd+bwd tokens/s
    # OPSD: tokens = student sequence + teacher sequence (privileged prompt + the student's response). The
    # teacher is the policy itself here (distill's is a frozen copy of the same weights; no gradient either way).
    pairs = sorted(opsd_pairs(tok, trajs, dcfg), key=lambda p: len(p.student.token_ids))[:n_rows]
    t_opsd = fwd_bwd(pairs, lambda b: opsd_loss(model, model, b, pad_id, dcfg))
    opsd_tokens = sum(2 * len(p.student.token_ids) - p.student.prompt_len + len(p.teacher_prompt) for p in pairs)
    say("opsd_tok_s", f"{opsd_tokens / t_opsd:.1f}")               # OPSD fwd+bwd tokens/s, teacher + student

    say("peak_rss_gb", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f}")
    say("seconds", f"{time.perf_counter() - t_start:.1f}")         # the whole benchmark, wall-clock


if __name__ == "__main__":
    main()
