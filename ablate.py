"""The ablation of Search-E1's alternation (the paper's variants table): what does self-distillation add to GRPO?

    python ablate.py [--variants=a,b] [--seeds=0,1,2] [--baselines] [--report] [--keep=DIR] [--key=value ...]

Every other --key=value goes to evolve.py; --out_dir is the study's root (default runs/ablation). Every variant
spends one budget per round: the same training questions, G rollouts of each, grpo_steps + distill_steps
optimizer steps at one lr; only what a round does with them changes. What a variant cannot match is what it is:
SFT trains on at most 2 correct trajectories a question, self-distillation on every one its sibling outdoes.

    grpo               GRPO steps only (the same questions and steps, each step on its share of the questions)
    grpo+opsd          evolve.py's default: the paper's loop
    grpo+opsd-nohint   the same loss with no sibling in the teacher's context: is it the privileged information?
    grpo+sft           GRPO, then cross-entropy on the kept (correct) traces instead of self-distillation
    opsd, sft          self-distillation alone, kept-trace SFT alone, on the whole budget

Every (variant, seed) starts from ONE round 0 (built once at seed 0 in <root>/round0/round_0; a study trains only
on the machine class it was built on) and draws the same questions each round; the seed changes sampling and batch
order. A finished run is not rerun, a half-finished one resumes; --report tabulates what is finished. Round 0 and
each final checkpoint are evaluated once on the whole test split, cached per question (eval_test.json). Writes
<root>/ablation.json (a row per run: test EM, budget, machine, precision) and <root>/ablation.md (mean +- std over
seeds, paired bootstrap CIs, EM per question kind). --baselines adds direct and naive-RAG EM for round 0 and
grpo+opsd, on test and the answerable part of ../shared/data/efficientqa_dev.jsonl (if present). --keep=DIR copies
the small files (no weights) into DIR, which --report --out_dir=DIR tabulates again (docs/ablation/).
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import evolve
from data.load import QUESTIONS_DIR, load_qa
from data.prepare import ensure_all
from eval import answerable, by_hop, evaluate, summarize
from model import load_policy, machine
from search import get_retriever

EFFICIENTQA = Path(__file__).resolve().parent.parent / "shared" / "data" / "efficientqa_dev.jsonl"
DEFAULT = "grpo+opsd"
OWN = ("--variants", "--seeds", "--baselines", "--report", "--out_dir", "--keep")  # ablate.py's options, not evolve.py's


def variants(cfg: evolve.Config) -> dict[str, list[str]]:
    """Each variant's evolve.py flags, all on the default's budget (questions and optimizer steps per round)."""
    per_round = cfg.grpo_steps * cfg.grpo_questions + cfg.distill_questions
    steps = cfg.grpo_steps + cfg.distill_steps
    if per_round % steps or cfg.grpo_lr != cfg.distill_lr:
        sys.exit(f"one budget for every variant: {per_round} questions a round must split evenly into {steps} GRPO "
                 f"steps, and --grpo_lr must equal --distill_lr (got {cfg.grpo_lr} and {cfg.distill_lr})")
    alone = ["--grpo_steps=0", f"--distill_questions={per_round}", f"--distill_steps={steps}"]
    return {"grpo": [f"--grpo_steps={steps}", f"--grpo_questions={per_round // steps}", "--distill=none",
                     "--distill_questions=0", "--distill_steps=0"],
            "grpo+opsd": ["--distill=opsd"],
            "grpo+opsd-nohint": ["--distill=opsd", "--teacher_shows=none"],
            "grpo+sft": ["--distill=sft"],
            "opsd": [*alone, "--distill=opsd"],
            "sft": [*alone, "--distill=sft"]}


def run_dir(root: Path, name: str, seed: int) -> Path:
    return root / name.replace("+", "_") / f"seed{seed}"


def build_round0(root: Path, passed: list[str], cfg: evolve.Config, report: bool) -> Path:
    """The shared start: evolve.py's round 0 (warm-up + its eval) at seed 0, built once (not by --report). A study
    trains on only the machine class its round 0 was built on: rows of one table come from one class."""
    r0 = root / "round0" / "round_0"
    if not report:
        print(f"[ablate] round 0: {'cached' if (r0 / 'metrics.json').exists() else 'building'}", flush=True)
        if not (r0 / "metrics.json").exists():
            evolve.main([*passed, "--rounds=0", "--seed=0", f"--out_dir={r0.parent}"])
    if not (r0 / "metrics.json").exists():
        sys.exit(f"no round 0 in {r0.parent}: run without --report first")
    built, here = json.loads((r0 / "metrics.json").read_text()).get("machine", {}), machine(cfg.device or None)
    if not report and built.get("class") != here["class"]:
        sys.exit(f"this study's round 0 was built on {built.get('device')} ({built.get('class')}); this machine is "
                 f"{here['device']} ({here['class']}), which rounds differently: resume it on its class, or start "
                 "another study (--out_dir)")
    return r0


def link(src, dst):
    """Round 0 is never written again: a hard link, not 1.6 GB of weights and optimizer state per run."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)           # another filesystem: copy


def train(root: Path, r0: Path, name: str, seed: int, passed: list[str], extra: list[str], rounds: int) -> Path:
    """One (variant, seed): copy round 0 in, then evolve.py resumes from it (or from its last finished round)."""
    out = run_dir(root, name, seed)
    if (out / f"round_{rounds}" / "metrics.json").exists():
        return print(f"[ablate] {name} seed {seed}: cached", flush=True) or out
    if not (out / "round_0").exists():  # copied under a temp name, then renamed: a cut copy is never a round 0
        shutil.rmtree(out / ".round_0.tmp", ignore_errors=True)
        shutil.copytree(r0, out / ".round_0.tmp", ignore=shutil.ignore_patterns("eval_*.json"), copy_function=link)
        (out / ".round_0.tmp").rename(out / "round_0")
    args = [*passed, *extra, f"--seed={seed}", f"--out_dir={out}"]
    print(f"[ablate] {name} seed {seed}: started, evolve.py {' '.join(args)}", flush=True)
    t0 = time.time(); evolve.main(args)  # noqa: E702
    print(f"[ablate] {name} seed {seed}: finished in {time.time() - t0:.0f} s", flush=True)
    return out


def eval_once(ckpt: Path, cfg: evolve.Config, questions: list[dict], mode: str, cache: str) -> dict:
    """A checkpoint's greedy metrics in one mode, computed once: summary, by_hop and each question's EM."""
    path = ckpt / cache
    if not path.exists():
        policy, tok = load_policy(str(ckpt), cfg.device or None, cfg.rollout_dtype)
        with torch.no_grad():
            _, recs = evaluate(policy.eval(), tok, questions, get_retriever(cfg.corpus or None, cfg.retriever_url
                               or None), mode, evolve.rollout_cfg(cfg), desc=f"{mode} {ckpt}")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # whole, then renamed: a kill never leaves half a cache
        tmp.write_text(json.dumps({"summary": summarize(recs), "by_hop": by_hop(recs),
                                   "em": {r["id"]: r["em"] for r in recs}}))
        os.replace(tmp, path)
    return json.loads(path.read_text())


def kind_em(ev: dict, test: list[dict]) -> dict[str, float]:
    """Test EM per question kind, from the cached per-question EM: which kinds a variant's gain comes from."""
    kinds = sorted({q["kind"] for q in test if q.get("kind") is not None})
    return {k: float(np.mean([ev["em"][q["id"]] for q in test if q.get("kind") == k])) for k in kinds}


def budget(ckpt: Path) -> dict:
    """What a run spent over rounds 1..R: optimizer steps summed, kl_before averaged (None without a teacher); its
    budget, machine and precision ("mixed" where its rounds disagree)."""
    R = int(ckpt.name.removeprefix("round_"))
    ms = [json.loads((ckpt.parent / f"round_{r}" / "metrics.json").read_text()) for r in range(R + 1)]
    kl = [m["kl_before"] for m in ms[1:] if m.get("kl_before") is not None]
    rounds = ms[1:] or ms
    one = lambda k: rounds[-1].get(k) if all(m.get(k) == rounds[-1].get(k) for m in rounds) else "mixed"
    return {"optimizer_steps": sum(m.get("optimizer_steps", 0) for m in ms[1:]),
            "kl_before": float(np.mean(kl)) if kl else None, "budget": one("budget"), "machine": one("machine"),
            "precision": one("precision")}


def row(name: str, seed, ckpt: Path, ev: dict, test: list[dict]) -> dict:
    s, m = ev["summary"], json.loads((ckpt / "metrics.json").read_text())
    hop = {k: h for k, h in ev["by_hop"].items() if h["n"]}  # no 2-hop questions: None, not an EM of 0
    return {"variant": name, "seed": seed, "round": m["round"], **budget(ckpt), "dev_em": m["dev_em"],
            "test_em": s["em"], "test_f1": s["f1"], "n_test": s["n"], "hop1_em": hop.get("hop1", {}).get("em"),
            "hop2_em": hop.get("hop2", {}).get("em"), "hop2_searches_per_q": hop.get("hop2", {}).get("searches_per_q"),
            "searches_per_q": s["searches_per_q"], "gen_tokens_per_q": s["gen_tokens_per_q"],
            "invalid_actions": s["invalid_actions"], "kind_em": kind_em(ev, test), "checkpoint": str(ckpt)}


def paired_bootstrap(gains, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of per-question gains, resampling questions with replacement. Paired: each gain is
    the same question's EM minus round 0's, so how hard the drawn questions are cancels out."""
    g = np.asarray(gains, dtype=float)
    means = g[np.random.default_rng(seed).integers(0, len(g), (n_boot, len(g)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(g.mean()), float(lo), float(hi)


def mean_std(vals, fmt: str = ".3f") -> str:
    vals = [v for v in vals if v is not None]  # ± the std over seeds
    return (f"{np.mean(vals):{fmt}}" + (f" ± {np.std(vals, ddof=1):{fmt}}" if len(vals) > 1 else "")) if vals else "—"


def pooled(evals: dict, name: str, seeds, qids) -> np.ndarray:
    """Each test question's EM averaged over the variant's given seeds: the unit the bootstrap resamples."""
    return np.mean([[evals[(name, k)]["em"][q] for q in qids] for k in seeds], axis=0)


def per_seed(rows: list[dict], key: str, fmt: str) -> str:
    return ", ".join("—" if r.get(key) is None else f"{r[key]:{fmt}}" for r in rows)


def table(rows: list[dict], evals: dict, names: list[str], seeds: list[int]) -> str:
    base = evals[("round0", None)]["em"]
    done = {n: [r["seed"] for r in rows if r["variant"] == n] for n in names}
    lines = ["| variant | seeds | test EM | Δ test EM vs round 0 [95% CI] | Δ vs grpo+opsd, same seeds [95% CI] | "
             "dev EM | 2-hop EM | searches/q | gen tokens/q | optimizer steps | kl_before | invalid actions |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    missing = [f"{n} seed {','.join(str(k) for k in seeds if k not in done[n])}" for n in names
               if len(done[n]) < len(seeds)]
    fmt = lambda d, lo, hi: f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    for name in ["round0", *names]:
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            continue
        gain = versus = "—"
        if name != "round0":
            gain = fmt(*paired_bootstrap(pooled(evals, name, done[name], base) - np.array(list(base.values()))))
            if name != DEFAULT and (common := [k for k in done[name] if k in done.get(DEFAULT, [])]):
                # seed for seed: the same seeds of both, so sampling luck is shared as far as it can be
                diff = pooled(evals, name, common, base) - pooled(evals, DEFAULT, common, base)
                versus = fmt(*paired_bootstrap(diff)) + f" (seeds {','.join(map(str, common))})"
        lines.append(f"| {name} | {len(rs) if name != 'round0' else '—'} | {mean_std([r['test_em'] for r in rs])} | "
                     f"{gain} | {versus} | {mean_std([r['dev_em'] for r in rs])} | "
                     f"{mean_std([r['hop2_em'] for r in rs])} | {mean_std([r['searches_per_q'] for r in rs], '.2f')} | "
                     f"{mean_std([r['gen_tokens_per_q'] for r in rs], '.1f')} | "
                     f"{per_seed(rs, 'optimizer_steps', 'd')} | {per_seed(rs, 'kl_before', '.1e')} | "
                     f"{per_seed(rs, 'invalid_actions', 'd')} |")
    n = rows[0]["n_test"]
    notes = [f"\nTest EM: the whole test split ({n} questions), greedy, final checkpoint; dev EM: the loop's own "
             f"monitor after its last round; ± is the std over seeds {','.join(map(str, seeds))}; the CIs are paired "
             "bootstraps over test questions (2000 resamples), seeds pooled per question."]
    where = sorted({f"{(r.get('machine') or {}).get('device')} ({(r.get('machine') or {}).get('class')}), "
                    f"{r.get('precision')}" for r in rows})  # more than one: the rows' "machine" tells which
    notes.append("Optimizer steps (summed over rounds 1..R), kl_before (each distillation batch's KL just before its "
                 "update, averaged over the phase and the rounds; — without a teacher) and invalid actions (test): "
                 f"per seed. Machine and precision: {'; '.join(where)}.")
    if missing:
        notes.append(f"Not finished yet (left out): {'; '.join(missing)}.")
    return "\n".join(lines + notes)


def kind_table(rows: list[dict], names: list[str], test: list[dict]) -> str:
    """Test EM per question kind, each variant's mean over its seeds: where the overall EM moves."""
    cols = [n for n in ["round0", *names] if any(r["variant"] == n for r in rows)]
    lines = ["| kind | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for k in rows[0]["kind_em"]:
        ems = [np.mean([r["kind_em"][k] for r in rows if r["variant"] == c]) for c in cols]
        n = sum(q.get("kind") == k for q in test)
        lines.append(f"| {k} | {n} | " + " | ".join(f"{e:.2f}" for e in ems) + " |")
    return "\n".join(lines)


def baselines(r0: Path, finals: list[Path], cfg: evolve.Config, test: list[dict]) -> str:
    """Agent vs direct (no search) vs naive RAG (top-3 for the raw question, one answer), for round 0 and the
    default variant's final checkpoints: does the agent beat retrieving once? Cached in each round folder."""
    sets, note = {"test": test}, f"{EFFICIENTQA} not found: EfficientQA columns skipped."
    if EFFICIENTQA.exists():  # real questions, only where BM25 over this corpus can find the answer at all
        eqa = load_qa(EFFICIENTQA)
        sets["eqa"] = answerable(eqa, get_retriever(cfg.corpus or None, cfg.retriever_url or None))
        note = f"EfficientQA dev: the {len(sets['eqa'])} of {len(eqa)} questions whose answer is in the BM25 top-3."
    cols = [(s, m) for s in sets for m in ("agent", "direct", "rag")]
    em = lambda ck, s, m: eval_once(ck, cfg, sets[s], m, "eval_test.json" if (s, m) == ("test", "agent")
                                    else f"eval_{s}_{m}.json")["summary"]["em"]
    lines = ["| checkpoint | " + " | ".join(f"{s} {m} EM" for s, m in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, cks in (("round0", [r0]), (DEFAULT, finals)):
        if cks:
            lines.append(f"| {name} | " + " | ".join(mean_std([em(ck, s, m) for ck in cks]) for s, m in cols) + " |")
    return "\n".join(lines + [f"\n{note}"])


def keep(root: Path, dest: Path, rows: list[dict]) -> None:
    """The reported runs' small files (metrics, per-question evals), a few KB a run; one still training stays out."""
    runs = {Path(r["checkpoint"]).parent for r in rows}
    found = [p for d in runs for pattern in ("metrics.json*", "eval_*.json") for p in d.rglob(pattern)]
    for src in [*found, root / "ablation.json", root / "ablation.md"]:
        if src.is_file():
            (dest / src.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / src.relative_to(root))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = {a[2:].partition("=")[0]: a.partition("=")[2] for a in argv if a.split("=")[0] in OWN}
    passed = [a for a in argv if a.split("=")[0] not in OWN]  # the rest is evolve.py's
    if any(a.startswith("--seed=") for a in passed):
        sys.exit("ablate.py takes --seeds=0,1,2 (one run per seed), not --seed")
    cfg = evolve.parse_config(passed)
    root = Path(opts.get("out_dir") or "runs/ablation")
    table_of = variants(cfg)
    names = [n for n in opts.get("variants", ",".join(table_of)).split(",") if n]
    if bad := [n for n in names if n not in table_of]:
        sys.exit(f"unknown variant(s) {bad}: choose from {', '.join(table_of)}")
    seeds = [int(s) for s in opts.get("seeds", "0,1,2").split(",") if s]
    flag = lambda k: k in opts and opts[k].lower() not in ("0", "false", "no")
    ensure_all()
    r0 = build_round0(root, passed, cfg, flag("report"))
    final = f"round_{cfg.rounds}"
    for name in names if not flag("report") else []:
        for seed in seeds:
            train(root, r0, name, seed, passed, table_of[name], cfg.rounds)
    test = load_qa(Path(cfg.questions or QUESTIONS_DIR) / "test.jsonl")
    evals = {("round0", None): eval_once(r0, cfg, test, "agent", "eval_test.json")}
    rows = [row("round0", None, r0, evals[("round0", None)], test)]
    for name in names:
        for seed in seeds:
            ck = run_dir(root, name, seed) / final
            if (ck / "metrics.json").exists():
                evals[(name, seed)] = eval_once(ck, cfg, test, "agent", "eval_test.json")
                rows.append(row(name, seed, ck, evals[(name, seed)], test))
    (root / "ablation.json").write_text(json.dumps(rows, indent=1))
    md = f"# Ablation: {cfg.rounds} round(s) from one round 0\n\n" + table(rows, evals, names, seeds)
    if rows[0]["kind_em"]:
        md += "\n\n## Test EM by question kind (mean over seeds)\n\n" + kind_table(rows, names, test)
    if flag("baselines"):
        finals = [Path(r["checkpoint"]) for r in rows if r["variant"] == DEFAULT]
        md += "\n\n## Agent vs direct vs naive RAG\n\n" + baselines(r0, finals, cfg, test)
    print(f"\n{md}")
    (root / "ablation.md").write_text(md + "\n")
    if opts.get("keep") and Path(opts["keep"]).resolve() != root.resolve():
        keep(root, Path(opts["keep"]), rows)
    return rows


if __name__ == "__main__":
    main()
