"""docs/gpu_study.py's CPU path, with a tiny random model: round 0, the timing call, the plan, the study's processes
side by side and the report; a second call (a second GPU window) trains nothing again."""
import json
import sys

import model as M
from data.load import QUESTIONS_DIR
from test_evolve import TINY_RUN

sys.path.insert(0, str(M.ROOT / "docs"))
import gpu_study  # noqa: E402


def test_gpu_study_plans_runs_three_variants_by_three_seeds_and_resumes(tmp_path, tok):
    tiny, qdir, out = tmp_path / "tiny", tmp_path / "questions", tmp_path / "study"
    M.save_policy(M.tiny_model("qwen2", vocab_size=len(tok)), tok, tiny)
    qdir.mkdir()
    for split, n in (("train", 300), ("dev", 3), ("test", 4)):
        lines = (QUESTIONS_DIR / f"{split}.jsonl").read_text().splitlines()[:n]
        (qdir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    flags = [a for a in TINY_RUN if a.split("=")[0] not in ("--rounds", "--grpo_steps", "--grpo_questions",
                                                             "--distill_questions")]
    argv = [f"--model={tiny}", "--device=cpu", "--rollout_dtype=float32", f"--questions={qdir}", *flags,
            "--rounds=1", "--minutes=0.1", "--parallel=3", f"--out_dir={out}"]
    gpu_study.main(argv)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["k"] == 1 and plan["seconds_per_step_pair"] > 0 and "--grpo_steps=1" in plan["flags"]
    rows = json.loads((out / "ablation.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in rows if r["seed"] is not None) == sorted(
        (v, s) for v in ("grpo", "grpo+opsd", "grpo+opsd-nohint") for s in (0, 1, 2))
    steps = {(r["variant"], r["optimizer_steps"]) for r in rows if r["seed"] is not None}
    assert steps == {("grpo", 2), ("grpo+opsd", 1), ("grpo+opsd-nohint", 1)}  # k + k; a random model has no pairs
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    gpu_study.main(argv)                                   # a second window: everything is cached
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == stamps
    assert json.loads((out / "plan.json").read_text()) == plan
