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

Prints a markdown table (also written to <out_dir>/ablation.md): the loop's own monitor (first 60 dev/test
questions) after the last round, and each final checkpoint on the whole test split (greedy, bf16, as eval.py;
cached in round_<R>/test_all.json), since 60 questions carry about +-6 points of noise.
"""
import json
import shutil
import sys
from pathlib import Path

import torch

import evolve
from data.load import QUESTIONS_DIR, load_qa
from eval import evaluate
from model import load_policy
from search import get_retriever


def test_all(ckpt: Path, cfg: evolve.Config) -> dict:
    """A checkpoint's agent metrics on the whole test split, computed once."""
    cache = ckpt / "test_all.json"
    if not cache.exists():
        policy, tok = load_policy(str(ckpt), cfg.device or None, cfg.rollout_dtype)
        test = load_qa(Path(cfg.questions or QUESTIONS_DIR) / "test.jsonl")
        with torch.no_grad():
            m, _ = evaluate(policy.eval(), tok, test, get_retriever(cfg.corpus or None, cfg.retriever_url or None),
                            "agent", evolve.rollout_cfg(cfg), desc=f"test {ckpt}")
        cache.write_text(json.dumps(m))
    return json.loads(cache.read_text())


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
    base, first = rows["grpo+ofsd"][0], root / "grpo_ofsd"
    full = {"warm-up only (round 0)": test_all(first / "round_0", cfg)}
    full.update({name: test_all(root / name.replace("+", "_") / f"round_{ms[-1]['round']}", cfg)
                 for name, ms in rows.items()})
    lines = ["| variant | test EM, all 300 | Δ vs warm-up | test EM, first 60 | dev EM, first 60 | searches/q | "
             "gen tokens/q | seconds (rounds) |", "|---|---|---|---|---|---|---|---|"]
    for name, ms in [("warm-up only (round 0)", [base]), *rows.items()]:
        last, f = ms[-1], full[name]
        lines.append(f"| {name} | {f['em']:.3f} | {f['em'] - full['warm-up only (round 0)']['em']:+.3f} | "
                     f"{last['test_em']:.3f} | {last['dev_em']:.3f} | {f['searches_per_q']:.2f} | "
                     f"{f['gen_tokens_per_q']:.0f} | {sum(m['seconds'] for m in ms[1:]):.0f} |")
    table = "\n".join(lines)
    print(f"\n{table}")
    (root / "ablation.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
