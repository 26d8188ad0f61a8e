"""evolve.py: the whole loop end to end on a tiny random model and the real BM25 + question set."""
import json

import pytest

import evolve
import model as M

TINY_RUN = ["--rounds=1", "--warmup_questions=6", "--grpo_steps=1", "--grpo_questions=2", "--group_size=2",
            "--distill_questions=2", "--eval_questions=3", "--max_turn_tokens=12", "--max_total_tokens=120",
            "--max_obs_tokens=40", "--kl_coef=0.001", "--show=0"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny")
    M.save_policy(M.tiny_model("llama", vocab_size=len(tok)), tok, path)
    return path


@pytest.mark.parametrize("bad, message", [
    (["--nope=1"], "bad argument '--nope=1': use --key=value with a key from:\n  model, out_dir, seed, "),
    (["rounds=2"], "bad argument 'rounds=2'"),
    (["--rounds=two"], "--rounds needs a int, got 'two'"),
    (["--grpo_lr=fast"], "--grpo_lr needs a float, got 'fast'"),
    (["--group_size=1"], "invalid config: GRPO needs group_size >= 2"),
    (["--distill=magic"], "invalid config: distill is one of opsd, sft, none"),
    (["--on_search_error=retry"], "invalid config: on_search_error is one of observe, stop"),
    (["--max_bad_steps=0"], "invalid config: max_bad_steps >= 1"),
    (["--teacher_shows=all"], "invalid config: teacher_shows is one of queries, full, none"),
])
def test_config_rejects_unknown_keys_bad_types_and_impossible_values_at_start_up(bad, message):
    with pytest.raises(SystemExit) as e:
        evolve.parse_config(bad)
    assert str(e.value).startswith(message)
    if "key from" in message:  # an unknown key lists every valid one
        assert all(f.name in str(e.value) for f in evolve.dataclasses.fields(evolve.Config))


def test_config_accepts_valid_values_and_group_size_1_without_grpo():
    cfg = evolve.parse_config(["--rounds=2", "--distill=sft", "--on_search_error=stop", "--group_size=1",
                               "--grpo_steps=0"])
    assert (cfg.rounds, cfg.distill, cfg.on_search_error, cfg.group_size) == (2, "sft", "stop", 1)


def test_evolve_runs_end_to_end_saves_rounds_and_resumes(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    rows = evolve.main([f"--model={tiny_dir}", f"--out_dir={out}", "--rollout_dtype=float32", *TINY_RUN])
    assert [r["round"] for r in rows] == [0, 1]
    for key in ("round", "dev_em", "test_em", "reward_mean", "kept", "searches_per_q", "seconds"):
        assert key in rows[1]
    assert rows[0]["warmup"] is True  # a random model earns no reward, so the warm-up switches on
    for r in (0, 1):
        assert (out / f"round_{r}" / "model.safetensors").exists()
    assert (out / "em_by_round.png").exists() or "matplotlib" in capsys.readouterr().err
    # a rerun with more rounds continues after the last finished round instead of starting over
    rows2 = evolve.main([f"--model={tiny_dir}", f"--out_dir={out}", "--rollout_dtype=float32", *TINY_RUN[1:],
                         "--rounds=2"])
    assert [r["round"] for r in rows2] == [0, 1, 2]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "round_2" / "metrics.json").read_text())["round"] == 2
