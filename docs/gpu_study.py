"""The GPU study, prepared before a GPU comes: the Qwen tier's grpo, grpo+opsd and grpo+opsd-nohint, 3 seeds each,
sized from a short timing call to a budget of GPU minutes, resumable across GPU windows.

    python docs/gpu_study.py [--minutes=10] [--parallel=3] [--rounds=3] [--out_dir=runs/gpu_study] [--key=value ...]

Every --key=value it does not know goes to ablate.py / evolve.py (the defaults: --model=qwen2.5-coder-0.5b,
--device=cuda). Steps, each ablate.py's, so each is cached and a second window goes on where the first stopped:
1. round 0, built once (the tier's warm-up and its eval);
2. a timing call: evolve.py from that round 0, one round with one GRPO step (QUESTIONS questions x G) and one
   distillation step, seed 99, in <out_dir>/timing;
3. the plan, written once to <out_dir>/plan.json (later windows keep it, so every run has one budget): k GRPO steps
   and k distillation steps a round, the largest k for which 3 variants x 3 seeds x `rounds` rounds (and each final
   test eval) fit in the minutes left, `parallel` processes side by side (assumed to share the GPU without loss:
   the plan is an upper bound on the speed);
4. the study: `parallel` ablate.py processes side by side (one per seed), then one --report into <out_dir>.
"""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = "grpo,grpo+opsd,grpo+opsd-nohint"
SEEDS = (0, 1, 2)
QUESTIONS = 8                                 # questions per GRPO step and per distillation step
OWN = ("--minutes", "--parallel", "--out_dir", "--rounds")


def ablate(args: list[str], log: Path | None = None):
    """ablate.py in its own process (CUDA state and memory are freed when it exits); a Popen if log is given."""
    cmd = [sys.executable, str(ROOT / "ablate.py"), *args]
    if log is None:
        return subprocess.run(cmd, cwd=ROOT, check=True)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def budget(k: int, rounds: int) -> list[str]:
    """evolve.py's flags for k GRPO and k distillation steps a round; GRPO alone takes 2k steps of QUESTIONS."""
    return [f"--grpo_steps={k}", f"--grpo_questions={QUESTIONS}", f"--distill_steps={k}",
            f"--distill_questions={k * QUESTIONS}", f"--rounds={rounds}"]


def plan(out: Path, passed: list[str], minutes: float, parallel: int, rounds: int, t0: float) -> dict:
    path = out / "plan.json"
    if path.exists():
        return json.loads(path.read_text())
    timing = out / "timing"
    if not (timing / "round_0").exists():   # the timing call starts from the study's round 0 (hard links)
        timing.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(out / "round0" / "round_0"), str(timing)], check=True)
    subprocess.run([sys.executable, str(ROOT / "evolve.py"), *passed, *budget(1, 1), "--seed=99",
                    f"--out_dir={timing}"], cwd=ROOT, check=True)
    m = json.loads((timing / "round_1" / "metrics.json").read_text())
    pair = m["seconds"] - m["eval_seconds"]                  # one GRPO + one distillation step, their rollouts
    per_q = m["eval_seconds"] / 120                          # its eval: 60 dev + 60 test questions
    run = lambda k: rounds * k * pair + (rounds * 60 + 60 + 300) * per_q  # + ablate's 300-question test eval
    runs = len(VARIANTS.split(",")) * len(SEEDS)
    left = minutes * 60 - (time.time() - t0)
    k = max(1, math.floor((left * parallel / runs - run(0)) / (rounds * pair)))
    p = {"k": k, "seconds_per_step_pair": pair, "eval_seconds_per_question": per_q, "seconds_left": left,
         "expected_seconds": runs * run(k) / parallel, "flags": budget(k, rounds)}
    path.write_text(json.dumps(p, indent=1))
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = {a[2:].partition("=")[0]: a.partition("=")[2] for a in argv if a.split("=")[0] in OWN}
    passed = [a for a in argv if a.split("=")[0] not in OWN]
    keys = {a.split("=")[0] for a in passed}
    passed = [*(["--model=qwen2.5-coder-0.5b"] if "--model" not in keys else []),
              *(["--device=cuda"] if "--device" not in keys else []), *passed]
    out = Path(opts.get("out_dir", "runs/gpu_study")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0, parallel, rounds = time.time(), int(opts.get("parallel", 3)), int(opts.get("rounds", 3))
    ablate([*passed, *budget(1, rounds), "--variants=grpo+opsd", "--seeds=", f"--out_dir={out}"])  # round 0 only
    p = plan(out, passed, float(opts.get("minutes", 10)), parallel, rounds, t0)
    print(f"[gpu_study] plan: k={p['k']} GRPO + {p['k']} distillation steps a round, about "
          f"{p['expected_seconds'] / 60:.1f} min for the study", flush=True)
    procs, seeds = [], list(SEEDS)
    while seeds or procs:
        while seeds and len(procs) < parallel:
            s = seeds.pop(0)
            procs.append(ablate([*passed, *p["flags"], f"--variants={VARIANTS}", f"--seeds={s}", f"--out_dir={out}"],
                                out / f"seed{s}.log"))
        procs[0].wait()
        procs = [q for q in procs if q.poll() is None]
    ablate([*passed, *p["flags"], f"--variants={VARIANTS}", f"--seeds={','.join(map(str, SEEDS))}", "--report",
            f"--out_dir={out}"])
    print(f"[gpu_study] done in {(time.time() - t0) / 60:.1f} min; {out}/ablation.md", flush=True)


if __name__ == "__main__":
    main()
