"""ablate.py: every variant starts from the same round 0 and gets the same training questions per round."""
import ablate
import evolve
import model as M
from data.load import QUESTIONS_DIR
from test_evolve import TINY_RUN


def test_variants_share_the_question_budget_of_the_default_split():
    cfg = evolve.parse_config([])
    per_round = cfg.grpo_steps * cfg.grpo_questions + cfg.distill_questions
    for name, extra in ablate.variants(cfg).items():
        v = evolve.parse_config(extra)
        assert v.grpo_steps * v.grpo_questions + (v.distill_questions if v.distill != "none" else 0) >= per_round
        assert v.grpo_steps * v.grpo_questions + v.distill_questions <= per_round + v.grpo_steps, name


def test_ablation_builds_round_0_once_and_prints_one_row_per_variant(tmp_path, tok, capsys):
    tiny, qdir = tmp_path / "tiny", tmp_path / "questions"
    M.save_policy(M.tiny_model("llama", vocab_size=len(tok)), tok, tiny)
    qdir.mkdir()
    for split, n in (("train", 200), ("dev", 4), ("test", 6)):  # a small test split: it is evaluated whole
        lines = (QUESTIONS_DIR / f"{split}.jsonl").read_text().splitlines()[:n]
        (qdir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    rows = ablate.main([f"--model={tiny}", f"--out_dir={tmp_path / 'abl'}", "--rollout_dtype=float32",
                        f"--questions={qdir}", *TINY_RUN])
    assert list(rows) == ["grpo+ofsd", "sft", "ofsd", "grpo"]
    base = (tmp_path / "abl" / "grpo_ofsd" / "round_0" / "model.safetensors").read_bytes()
    for name, metrics in rows.items():
        assert [m["round"] for m in metrics] == [0, 1]
        round0 = tmp_path / "abl" / name.replace("+", "_") / "round_0" / "model.safetensors"
        assert round0.read_bytes() == base  # the same start for every variant
        assert (round0.parent.parent / "round_1" / "test_all.json").exists()  # the whole test split, cached
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert table.count("\n") == 7 and "warm-up only" in table and table in capsys.readouterr().out + "\n"
