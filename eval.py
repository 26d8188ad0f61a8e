"""Evaluation: greedy rollouts scored by exact match, per question kind and per hop, and the eval CLI.

Search-E1 (arXiv 2605.22511) reports exact match on Search-R1's seven benchmarks, single-hop (NQ, TriviaQA,
PopQA) and multi-hop (HotpotQA, 2Wiki, MuSiQue, Bamboogle), fetched here by name (--data nq,hotpotqa,...)
from FlashRAG's hub copies. On the generated splits, whose rows carry a "kind", the CLI also prints EM and
searches per question for each kind and for 1-hop vs 2-hop kinds (data/questions.py:TWO_HOP_KINDS): the
bridges need a second search, which is what self-evolution must teach a small policy.
Layering: the metrics (metrics.py), data loading, BM25, the policy and the agent (rollout.py) all sit
below this file; the trainers' loop (evolve.py) and ablate.py sit above it.
"""
import argparse
import dataclasses
import json
import os
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from data.load import QUESTIONS_DIR, SPLITS, load_qa
from data.prepare import ensure_all
from data.questions import TWO_HOP_KINDS, contains
from metrics import exact_match, f1_score
from model import EMBEDDED, OFFLINE, load_policy
from rollout import RolloutConfig, rollout
from search import format_docs, get_retriever

# Search-R1's (and Search-E1's) evaluation splits: test where FlashRAG has one, dev otherwise
BENCHMARKS = {"nq": "test", "triviaqa": "test", "popqa": "test", "hotpotqa": "dev", "2wikimultihopqa": "dev",
              "musique": "dev", "bamboogle": "test"}
FLASHRAG_URL = "https://huggingface.co/datasets/RUC-NLPIR/FlashRAG_datasets/resolve/main/{name}/{split}.jsonl"
BENCH_DIR = Path(__file__).resolve().parent / "data" / "cache" / "benchmarks"


def readable(t, golden_answers: list[str], tok, kind: str | None = None) -> dict:
    """One trajectory as a student would want to read it. kind: the question's, if its file has one."""
    return {"id": t.qid, "question": t.question, "kind": kind, "golden_answers": golden_answers, "answer": t.answer,
            "em": exact_match(t.answer, golden_answers), "f1": f1_score(t.answer, golden_answers),
            "searches": [{"query": q, "results": o} for q, o in zip(t.queries, t.observations)],
            "turns": t.turns, "generated_tokens": t.n_generated, "finished": t.finished,
            "truncated": t.truncated, "invalid_actions": t.invalid_actions,
            "response": tok.decode(t.token_ids[t.prompt_len:])}


def evaluate(model, tok, questions: list[dict], retriever, mode: str = "agent", cfg=None, desc=None):
    """Greedy rollouts of one mode over questions -> (metrics dict, readable records)."""
    from tqdm import tqdm  # deferred: only a run with rollouts draws a progress bar
    cfg = dataclasses.replace(cfg or RolloutConfig(), mode=mode, group_size=1, temperature=0.0)
    t0 = time.time()
    with tqdm(total=len(questions), desc=desc or mode, unit="q", leave=False, disable=None) as bar:
        trajs = rollout(model, tok, questions, retriever, cfg, progress=bar)
    records = [readable(t, q["golden_answers"], tok, q.get("kind")) for t, q in zip(trajs, questions)]
    return summarize(records, time.time() - t0), records


def summarize(records: list[dict], seconds: float = 0.0) -> dict:
    """The metrics of a list of readable() records (no records, e.g. a torchrun process's empty shard: zeros)."""
    n, d = len(records), max(len(records), 1)
    return {"n": n, "em": sum(r["em"] for r in records) / d, "f1": sum(r["f1"] for r in records) / d,
            "searches_per_q": sum(len(r["searches"]) for r in records) / d,
            "gen_tokens_per_q": sum(r["generated_tokens"] for r in records) / d,
            "answered": sum(r["answer"] is not None for r in records) / d,
            "invalid_actions": sum(r["invalid_actions"] for r in records),
            "truncated": sum(r["truncated"] for r in records), "seconds": round(seconds, 1)}


def by_kind(records: list[dict]) -> dict[str, dict]:
    """{kind: summarize(that kind's records)}, kinds sorted. Records without a kind (a FlashRAG file) are left out."""
    groups = defaultdict(list)
    for r in records:
        if r.get("kind") is not None:
            groups[r["kind"]].append(r)
    return {kind: summarize(groups[kind]) for kind in sorted(groups)}


def by_hop(records: list[dict]) -> dict[str, dict]:
    """{"hop1": summarize(one-search kinds), "hop2": summarize(TWO_HOP_KINDS)}: does the policy learn the second
    search? Both keys whenever some record has a kind (n may be 0); {} when none has (nothing to split on)."""
    kinded = [r for r in records if r.get("kind") is not None]
    if not kinded:
        return {}
    return {"hop1": summarize([r for r in kinded if r["kind"] not in TWO_HOP_KINDS]),
            "hop2": summarize([r for r in kinded if r["kind"] in TWO_HOP_KINDS])}


def answerable(questions: list[dict], retriever, k: int = 3) -> list[dict]:
    """The questions whose gold answer is in the top-k documents retrieved for the raw question (whole words after
    SQuAD normalisation, data/questions.py:contains): on a corpus not built for them (EfficientQA over the 10k
    articles) most of the rest have no answer in the corpus at all, and EM on them would measure the corpus."""
    found = retriever.search([q["question"] for q in questions], k)
    return [q for q, docs in zip(questions, found)
            if any(contains(f"{d.title}\n{d.text}", a) for d in docs for a in q["golden_answers"])]


def rule_agent(questions: list[dict], retriever) -> tuple[dict, list[dict]]:
    """The no-model baseline: search the raw question, answer the top document's title. Its records have
    readable()'s fields, so summarize, by_kind and by_hop read them like an agent's."""
    t0 = time.time()
    results = retriever.search([q["question"] for q in questions], 1)
    records = []
    for q, docs in zip(questions, results):
        a = docs[0].title if docs else None
        records.append({"id": q["id"], "question": q["question"], "kind": q.get("kind"),
                        "golden_answers": q["golden_answers"], "answer": a, "em": exact_match(a, q["golden_answers"]),
                        "f1": f1_score(a, q["golden_answers"]),
                        "searches": [{"query": q["question"], "results": format_docs(docs)}],
                        "turns": 1, "generated_tokens": 0, "finished": True, "truncated": False, "invalid_actions": 0})
    return summarize(records, time.time() - t0), records


def fetch_benchmark(name: str, cache_dir: Path = BENCH_DIR, timeout: float = 60) -> Path:
    """FlashRAG's jsonl of a benchmark, in Search-R1's split, downloaded once into cache_dir."""
    split = BENCHMARKS[name]
    path, url = Path(cache_dir) / f"{name}_{split}.jsonl", FLASHRAG_URL.format(name=name, split=split)
    if not path.exists():
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                raw = r.read()
        except OSError as e:  # URLError, HTTPError, timeouts
            raise RuntimeError(f"--data {name} needs network access to download {url} ({e}). Offline, pass a local "
                               f"FlashRAG jsonl path as --data, or put the file at {path}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_bytes(raw)
        os.replace(path.with_suffix(".tmp"), path)  # atomic: a cut download is never mistaken for the file
    return path


def print_benchmarks(results: dict[str, dict[str, dict]]) -> None:
    """The paper's table: EM per benchmark (columns) and their average, one row per mode."""
    names, modes = list(results), list(next(iter(results.values())))
    print(f"\n{'EM':<8}" + "".join(f"{n[:15]:>16}" for n in names) + f"{'avg':>8}")
    for mode in modes:
        ems = [results[n][mode]["em"] for n in names]
        print(f"{mode:<8}" + "".join(f"{e:>16.3f}" for e in ems) + f"{sum(ems) / len(ems):>8.3f}")


def print_table(results: dict[str, dict], title: str = "") -> None:
    print(f"\n{title}\n{'mode':<8} {'EM':>6} {'F1':>6} {'search/q':>9} {'gen tok/q':>10} {'seconds':>8}")
    for mode, m in results.items():
        print(f"{mode:<8} {m['em']:>6.3f} {m['f1']:>6.3f} {m['searches_per_q']:>9.2f} "
              f"{m['gen_tokens_per_q']:>10.1f} {m['seconds']:>8.1f}")


def print_kinds(records: dict[str, list[dict]]) -> None:
    """EM and searches per question for each question kind, then 1-hop vs 2-hop: a column pair per mode."""
    tables = {mode: {**by_kind(rs), **by_hop(rs)} for mode, rs in records.items()}
    first = next(iter(tables.values()))
    print(f"\n{'kind':<18} {'n':>4}" + "".join(f"{mode + ' EM':>12} {'search/q':>9}" for mode in tables))
    for row, m in first.items():
        print(f"{row:<18} {m['n']:>4}" + "".join(f"{t[row]['em']:>12.3f} {t[row]['searches_per_q']:>9.2f}"
                                                 for t in tables.values()))


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a policy on a FlashRAG-format QA file "
                                            "({id, question, golden_answers} jsonl) in several modes.")
    p.add_argument("--model", default=EMBEDDED, help="hub id, HF folder (e.g. a round_<r> checkpoint), or an "
                   f"offline model's name: {', '.join(OFFLINE)}")
    p.add_argument("--data", default=None, help="QA jsonl path(s), the generated splits' names (train, dev, test) "
                   f"or benchmark name(s), comma-separated: {','.join(BENCHMARKS)} (fetched from the hub); "
                   "default: test, the project's held-out split")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--modes", default="rule,direct,rag,agent", help="comma list of rule, direct, rag, agent")
    p.add_argument("--corpus", default=None, help="corpus jsonl {id, contents} for local BM25")
    p.add_argument("--retriever_url", default=None, help="Search-R1 /retrieve endpoint instead of local BM25")
    p.add_argument("--out_dir", default=None, help="where trajectories go; default runs/eval_<data name> "
                   "(several --data: out_dir/eval_<data name> each)")
    p.add_argument("--max_turns", type=int, default=RolloutConfig.max_turns)
    p.add_argument("--batch_size", type=int, default=RolloutConfig.batch_size)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto: bf16 where this device runs it fast, "
                   "as evolve.py's rollouts")
    args = p.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("rule", "direct", "rag", "agent")]
    if bad:
        p.error(f"unknown mode(s) {bad}: choose from rule, direct, rag, agent")
    if args.data is None or (args.corpus is None and args.retriever_url is None):
        ensure_all()
    names = [str(QUESTIONS_DIR / f"{d}.jsonl") if d in SPLITS else d
             for d in (d.strip() for d in (args.data or "test").split(",")) if d]
    unknown = [n for n in names if n not in BENCHMARKS and not Path(n).exists()]
    if unknown:
        p.error(f"--data {','.join(unknown)}: no such file, and not a split ({', '.join(SPLITS)}) or a benchmark "
                f"name ({', '.join(BENCHMARKS)})")
    try:
        paths = {n: fetch_benchmark(n) if n in BENCHMARKS and not Path(n).exists() else Path(n) for n in names}
    except RuntimeError as e:
        p.error(str(e))
    retriever = get_retriever(args.corpus, args.retriever_url)
    model = tok = None
    if set(modes) - {"rule"}:
        model, tok = load_policy(args.model, device=args.device, dtype=args.dtype)
    cfg = RolloutConfig(max_turns=args.max_turns, batch_size=args.batch_size)
    every = {}
    for name, data in paths.items():
        questions = load_qa(data, limit=args.limit)
        one = args.out_dir and len(paths) == 1
        out_dir = Path(args.out_dir) if one else Path(args.out_dir or "runs") / f"eval_{data.stem}"
        out_dir.mkdir(parents=True, exist_ok=True)
        results = every[name if name in BENCHMARKS else data.stem] = {}
        kept = {}  # mode -> records, for the per-kind table
        for mode in modes:
            if mode == "rule":
                results[mode], records = rule_agent(questions, retriever)
            else:
                results[mode], records = evaluate(model, tok, questions, retriever, mode, cfg)
            kept[mode] = records
            with open(out_dir / f"{mode}.jsonl", "w") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print_table(results, f"{args.model} on {data} (n={len(questions)}); trajectories in {out_dir}/")
        if any(q.get("kind") is not None for q in questions):
            print_kinds(kept)
    if len(every) > 1:
        print_benchmarks(every)
    results = every if len(every) > 1 else results  # one file: {mode: metrics}; several: {name: {mode: ...}}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
