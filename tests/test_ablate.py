"""ablate.py: the same question budget per round, one shared round 0, cached resumable runs, the bootstrap CI, and
eval.answerable (the filter of the baselines' real questions)."""
import json

import numpy as np
import pytest

import ablate
import evolve
import model as M
from data.load import QUESTIONS_DIR
from eval import answerable
from search import Doc
from test_evolve import TINY_RUN

KEYS = ("variant", "seed", "dev_em", "test_em", "hop2_em", "hop2_searches_per_q", "searches_per_q",
        "gen_tokens_per_q", "invalid_actions")


@pytest.mark.parametrize("argv", [[], TINY_RUN])
def test_variants_share_one_budget_questions_rollouts_steps_and_lr(argv):
    """Every variant takes the default's questions each round (the same ones: evolve.round_questions), G rollouts
    of each, as many optimizer steps and one lr."""
    cfg = evolve.parse_config(argv)
    train = [{"id": str(i)} for i in range(1000)]
    questions = lambda c, r: [q["id"] for qs in evolve.round_questions(train, 100, r, c)[0] for q in qs] + \
        [q["id"] for q in evolve.round_questions(train, 100, r, c)[1] if c.distill != "none"]
    steps = lambda c: c.grpo_steps + (c.distill_steps if c.distill != "none" else 0)
    table = ablate.variants(cfg)
    assert list(table) == ["grpo", "grpo+opsd", "grpo+opsd-nohint", "grpo+sft", "opsd", "sft"]
    for name, extra in table.items():
        v = evolve.parse_config([*argv, *extra])
        for r in (1, 2, 3):
            assert sorted(questions(v, r)) == sorted(questions(cfg, r)), (name, r)
        assert (steps(v), v.group_size, v.grpo_lr, v.distill_lr) == (steps(cfg), cfg.group_size, cfg.grpo_lr,
                                                                    cfg.distill_lr), name
    assert evolve.parse_config(table["grpo+opsd-nohint"]).teacher_shows == "none"
    with pytest.raises(SystemExit, match="split evenly"):
        ablate.variants(evolve.parse_config([*argv, "--distill_steps=2"]))  # 40 questions into 3 GRPO steps
    with pytest.raises(SystemExit, match="--grpo_lr must equal --distill_lr"):
        ablate.variants(evolve.parse_config([*argv, "--distill_lr=1e-4"]))


def test_round_questions_are_disjoint_within_and_across_rounds():
    cfg = evolve.parse_config([])
    train = [{"id": str(i)} for i in range(1000)]
    seen = []
    for r in (1, 2, 3):
        grpo, dist = evolve.round_questions(train, 250, r, cfg)
        ids = [q["id"] for qs in grpo for q in qs] + [q["id"] for q in dist]
        assert len(ids) == len(set(ids)) == 40 and len(dist) == 24
        seen += ids
    assert len(set(seen)) == 120 and min(int(i) for i in seen) == 250  # after the warm-up's share


def test_paired_bootstrap_collapses_on_equal_gains_and_centres_on_the_mean():
    assert ablate.paired_bootstrap([0.25] * 50) == pytest.approx((0.25, 0.25, 0.25))
    gains = np.array([1.0] * 30 + [0.0] * 70)  # mean 0.3, std err ~0.046
    mean, lo, hi = ablate.paired_bootstrap(gains)
    assert mean == pytest.approx(0.3) and lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert ablate.paired_bootstrap(gains) == (mean, lo, hi)  # a fixed seed: the same CI every time


def test_kind_em_groups_cached_per_question_em_by_kind_and_the_table_averages_seeds():
    test = [{"id": "a", "kind": "x"}, {"id": "b", "kind": "x"}, {"id": "c", "kind": "y"}, {"id": "d"}]
    ev = lambda *em: {"em": dict(zip("abcd", em))}
    assert ablate.kind_em(ev(1.0, 0.0, 1.0, 1.0), test) == {"x": 0.5, "y": 1.0}  # "d" has no kind: left out
    rows = [{"variant": "round0", "kind_em": ablate.kind_em(ev(0.0, 0.0, 1.0, 0.0), test)},
            {"variant": "v", "kind_em": ablate.kind_em(ev(1.0, 1.0, 0.0, 0.0), test)},
            {"variant": "v", "kind_em": ablate.kind_em(ev(1.0, 0.0, 0.0, 0.0), test)}]
    md = ablate.kind_table(rows, ["v", "w"], test)  # w has no rows: no column
    assert md.splitlines()[0] == "| kind | n | round0 | v |"
    assert md.splitlines()[2:] == ["| x | 2 | 0.00 | 0.75 |", "| y | 1 | 1.00 | 0.00 |"]


def test_answerable_keeps_questions_whose_answer_is_in_the_top_k():
    class Stub:
        def search(self, queries, k):
            return [[Doc("1", "Paris", "The capital of France since 508.", 1.0)]] * len(queries)
    qs = [{"question": "q1", "golden_answers": ["paris"]}, {"question": "q2", "golden_answers": ["Lyon", "508"]},
          {"question": "q3", "golden_answers": ["Pari"]}]  # whole words only: "Pari" is not in "Paris"
    assert [q["question"] for q in answerable(qs, Stub())] == ["q1", "q2"]


def test_study_shares_round_0_caches_runs_and_tabulates_seeds(tmp_path, tok, monkeypatch, capsys):
    tiny, qdir, root = tmp_path / "tiny", tmp_path / "questions", tmp_path / "abl"
    M.save_policy(M.tiny_model("llama", vocab_size=len(tok)), tok, tiny)
    qdir.mkdir()
    for split, n in (("train", 200), ("dev", 4), ("test", 6)):  # a small test split: it is evaluated whole
        lines = (QUESTIONS_DIR / f"{split}.jsonl").read_text().splitlines()[:n]
        (qdir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    eqa = tmp_path / "eqa.jsonl"  # stands in for ../shared's EfficientQA: a few real rows of the test split
    eqa.write_text((qdir / "test.jsonl").read_text())
    monkeypatch.setattr(ablate, "EFFICIENTQA", eqa)
    argv = [f"--model={tiny}", f"--out_dir={root}", "--rollout_dtype=float32", f"--questions={qdir}", *TINY_RUN,
            "--variants=grpo,grpo+opsd", "--seeds=0,1"]
    calls = []
    real_main = evolve.main
    monkeypatch.setattr(evolve, "main", lambda a: calls.append(a) or real_main(a))
    rows = ablate.main([*argv, "--baselines"])
    assert len(calls) == 5 and sum("--rounds=0" in a for a in calls) == 1  # round 0 once, then 2 x 2 runs
    assert [(r["variant"], r["seed"]) for r in rows] == [("round0", None), ("grpo", 0), ("grpo", 1),
                                                         ("grpo+opsd", 0), ("grpo+opsd", 1)]
    assert json.loads((root / "ablation.json").read_text()) == rows
    base = (root / "round0" / "round_0" / "model.safetensors").read_bytes()
    for r in rows:
        assert all(k in r for k in KEYS) and r["n_test"] == 6 and r["round"] == (0 if r["seed"] is None else 1)
        assert r["machine"] == M.machine("cpu") and r["precision"].startswith("actor float32")
        if r["seed"] is not None:   # one budget; a random model has no correct rollout, so no pair and no KL
            assert r["budget"]["grpo_lr"] == r["budget"]["distill_lr"] and r["kl_before"] is None
            assert r["optimizer_steps"] == (4 if r["variant"] == "grpo" else 1)
        if r["seed"] is not None:
            run = ablate.run_dir(root, r["variant"], r["seed"])
            assert (run / "round_0" / "model.safetensors").read_bytes() == base  # one start for every run
            assert len(json.loads((run / "round_1" / "eval_test.json").read_text())["em"]) == 6  # per question
    md = md_full = (root / "ablation.md").read_text()
    assert md in capsys.readouterr().out + "\n"
    assert md.count("\n| grpo |") == 1 and md.count("\n| grpo+opsd |") == 2  # the ablation and the baselines
    assert md.split("\n| grpo |")[1].splitlines()[0].count("] (seeds 0,1) |") == 1  # vs the paper's step, paired
    assert "test rag EM" in md and "eqa direct EM" in md
    kinds = {json.loads(line)["kind"] for line in (qdir / "test.jsonl").read_text().splitlines()}
    assert all(set(r["kind_em"]) == kinds for r in rows) and "| kind | n | round0 | grpo | grpo+opsd |" in md

    # a rerun trains nothing and rewrites no checkpoint: every (variant, seed) is cached
    files = lambda: {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "ablation" not in p.name}
    stamps = files()
    monkeypatch.setattr(evolve, "main", lambda a: pytest.fail(f"retrained: {a}"))
    assert ablate.main(argv) == rows
    assert files() == stamps
    out = capsys.readouterr().out
    assert out.count(": cached") == 5 and "started" not in out

    # --report tabulates what is finished and notes the rest
    ablate.main([*argv[:-2], "--variants=grpo,sft", "--seeds=0,1", "--report"])
    md = (root / "ablation.md").read_text()
    assert "\n| grpo |" in md and "\n| sft |" not in md and "left out): sft seed 0,1" in md

    # --keep: the study's small files alone (no weights) give the same table again, nothing evaluated twice
    kept = tmp_path / "kept"
    unfinished = ablate.run_dir(root, "sft", 7)  # a run still training, not in the table: not kept
    (unfinished / "round_0").mkdir(parents=True)
    (unfinished / "metrics.jsonl").write_text("{}\n")
    ablate.main([*argv, "--baselines", "--report", f"--keep={kept}"])
    assert not list(kept.rglob("*.safetensors")) and (kept / "ablation.md").read_text() == md_full
    assert not (kept / unfinished.relative_to(root)).exists()
    monkeypatch.setattr(ablate, "load_policy", lambda *a: pytest.fail("evaluated again"))
    again = ablate.main([a.replace(f"--out_dir={root}", f"--out_dir={kept}") for a in argv] + ["--baselines", "--report"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "checkpoint"} for r in rs]
    assert strip(again) == strip(rows) and (kept / "ablation.md").read_text() == md_full

    # a study resumes only on the machine class its round 0 was built on (rows of one table: one class)
    m0 = root / "round0" / "round_0" / "metrics.json"
    m0.write_text(json.dumps({**json.loads(m0.read_text()), "machine": {"device": "elsewhere", "class": "cpu-other"}}))
    with pytest.raises(SystemExit, match=r"built on elsewhere \(cpu-other\); this machine is"):
        ablate.main(argv)
    ablate.main([*argv, "--report"])   # reading what is finished needs no particular machine
