"""A diagnosis, not part of the method: on questions about when someone was born or died, which of the two years
in the article's "(1844–1929)" does the agent answer?

    python docs/which_year.py runs/eval_dev/agent.jsonl [more agent.jsonl ...] [--questions=FILE]

Reads eval.py's trajectories (`python eval.py --model CKPT --data data/cache/questions/dev.jsonl --modes agent
--out_dir DIR` writes DIR/agent.jsonl) and, for the kinds birth_year, death_year and riddle_year (a death year
too), counts answers that are the person's birth year, death year, or neither. Settings are chosen on dev: pass
dev trajectories. No model runs.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, run from anywhere
from data.load import QUESTIONS_DIR, load_summaries, read_jsonl  # noqa: E402
from data.questions import LIFE  # noqa: E402
from metrics import exact_match  # noqa: E402

KINDS = ("birth_year", "death_year", "riddle_year")


def lifespans() -> dict[str, tuple[str, str]]:
    """title -> (birth year, death year), read from each article's description as data/questions.py reads it."""
    life = {t: LIFE.match(a.get("description", "").strip()) for t, a in load_summaries().items()}
    return {t: (m["b"], m["d"]) for t, m in life.items() if m and m["b"] and m["d"]}


def which_year(records: list[dict], questions: dict[str, dict], life: dict) -> dict[str, Counter]:
    counts = {k: Counter() for k in KINDS}
    for r in records:
        q = questions[r["id"]]
        if q.get("kind") in KINDS and q["sources"][0] in life:
            born, died = life[q["sources"][0]]
            ans = r.get("answer") or ""
            counts[q["kind"]]["birth" if exact_match(ans, [born]) else "death" if exact_match(ans, [died]) else
                              "other"] += 1
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", help="eval.py agent.jsonl files")
    p.add_argument("--questions", default=str(QUESTIONS_DIR / "dev.jsonl"))
    args = p.parse_args(argv)
    questions, life = {q["id"]: q for *_, q in read_jsonl(args.questions)}, lifespans()
    print(f"{'records':<40} " + " ".join(f"{k + ' (birth/death/other)':>34}" for k in KINDS))
    for path in args.records:
        c = which_year([r for *_, r in read_jsonl(path)], questions, life)
        cells = [f"{c[k]['birth']:>22} / {c[k]['death']:>3} / {c[k]['other']:>3}" for k in KINDS]
        print(f"{path:<40} " + " ".join(cells))


if __name__ == "__main__":
    main()
