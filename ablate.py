"""The ablation of Search-E1's loop: python ablate.py [--key=value ...]   (evolve.py's keys; out_dir is the root)

Which part of "GRPO rounds alternating with self-distillation" earns the gain? Every variant starts from the
same round 0 (the post-warm-up checkpoint, built once by the first variant and copied), uses the same seed,
the same rounds and the same number of training questions per round, and is evaluated on the same dev/test
questions. Only what a round does with its questions changes:

    warm-up only   round 0 itself
    sft            every question rolled out, then cross-entropy on the kept (correct) traces
    ofsd           every question rolled out, then the paper's self-distillation (distill.py)
    grpo           every question in GRPO steps (grpo_questions each), no distillation
    grpo+ofsd      Search-E1: evolve.py's default split between GRPO and self-distillation

Prints a markdown table (also written to <out_dir>/ablation.md). Each row's numbers are the last round's.
"""
import shutil
import sys
from pathlib import Path

import evolve


def variants(cfg: evolve.Config) -> dict[str, list[str]]:
    per_round = cfg.grpo_steps * cfg.grpo_questions + cfg.distill_questions  # the budget every variant gets
    steps = max(1, round(per_round / cfg.grpo_questions))  # GRPO alone: as many steps, of the same size or so
    return {"grpo+ofsd": ["--distill=ofsd"],
            "sft": ["--grpo_steps=0", "--distill=sft", f"--distill_questions={per_round}"],
            "ofsd": ["--grpo_steps=0", "--distill=ofsd", f"--distill_questions={per_round}"],
            "grpo": [f"--grpo_steps={steps}", f"--grpo_questions={-(-per_round // steps)}", "--distill=none",
                     "--distill_questions=0"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = evolve.parse_config(argv)
    root = Path(cfg.out_dir if any(a.startswith("--out_dir=") for a in argv) else "runs/ablation")
    passed = [a for a in argv if not a.startswith("--out_dir=")]
    rows = {}
    for name, extra in variants(cfg).items():
        out = root / name.replace("+", "_")
        first = root / "grpo_ofsd"
        if out != first and not (out / "round_0").exists():  # share round 0: same start, built once
            shutil.copytree(first / "round_0", out / "round_0")
        print(f"\n===== {name}: evolve.py {' '.join(passed + extra)}", flush=True)
        rows[name] = evolve.main([*passed, *extra, f"--out_dir={out}"])
    base = rows["grpo+ofsd"][0]
    lines = ["| variant | test EM | Δ test vs warm-up | dev EM | searches/q | gen tokens/q | seconds (rounds) |",
             "|---|---|---|---|---|---|---|",
             f"| warm-up only (round 0) | {base['test_em']:.3f} | — | {base['dev_em']:.3f} | "
             f"{base['searches_per_q']:.2f} | {base['gen_tokens_per_q']:.0f} | — |"]
    for name, ms in rows.items():
        last = ms[-1]
        lines.append(f"| {name} | {last['test_em']:.3f} | {last['test_em'] - base['test_em']:+.3f} | "
                     f"{last['dev_em']:.3f} | {last['searches_per_q']:.2f} | {last['gen_tokens_per_q']:.0f} | "
                     f"{sum(m['seconds'] for m in ms[1:]):.0f} |")
    table = "\n".join(lines)
    print(f"\n{table}")
    (root / "ablation.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
