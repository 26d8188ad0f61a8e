"""evolve.py: the whole loop end to end on a tiny random model and the real BM25 + question set."""
import json

import pytest
import torch

import evolve

TINY_RUN = ["--rounds=1", "--warmup_questions=6", "--grpo_steps=1", "--grpo_questions=2", "--group_size=2",
            "--distill_questions=2", "--eval_questions=3", "--max_turn_tokens=12", "--max_total_tokens=120",
            "--max_obs_tokens=40", "--kl_coef=0.001", "--show=0"]


@pytest.mark.parametrize("bad, message", [
    (["--nope=1"], "bad argument '--nope=1': use --key=value with a key from:\n  model, settings, out_dir, "),
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


def one_right_per_group(trajs, gold):
    """The tiny random model never earns an exact match, so distillation would have no sibling: these tests hand
    each question's first rollout the reward, the rest 0 (the reward itself is tested in test_metrics)."""
    seen = set()
    for t in trajs:
        t.reward, _ = float(t.qid not in seen), seen.add(t.qid)
    return sum(t.reward for t in trajs) / len(trajs)


def spy_round(monkeypatch):
    """Records what one round does: each phase's question ids, the weights after each GRPO step, and around the
    distillation phase the weights, its stats and the teacher's weights at every batch."""
    import distill as D
    log = {"qids": {}, "after_grpo": [], "teacher": []}
    weights = lambda m: [p.detach().clone() for p in m.parameters()]
    real_sample, real_grpo, real_distill, real_pair = (evolve.sample_trajectories, evolve.grpo_step, evolve.distill,
                                                       D.pair_logits)

    def sample(cfg, actor, tok, questions, *a):
        log["qids"].setdefault(a[-1], []).extend(q["id"] for q in questions)
        return real_sample(cfg, actor, tok, questions, *a)

    def grpo(policy, ref, opt, *a):
        out = real_grpo(policy, ref, opt, *a)
        log["after_grpo"].append(weights(policy))
        log["grpo_lr"] = opt.param_groups[0]["lr"]       # the lr its last step used
        return out

    def distill(policy, tok, trajs, cfg, opt):
        log["before"] = weights(policy)
        log["stats"] = real_distill(policy, tok, trajs, cfg, opt)
        log["after"], log["distill_lr"] = weights(policy), opt.param_groups[0]["lr"]
        return log["stats"]

    def pair_logits(policy, teacher, *a):
        log["teacher"].append(weights(teacher))
        return real_pair(policy, teacher, *a)
    monkeypatch.setattr(evolve, "reward", one_right_per_group)
    for mod, name, fn in ((evolve, "sample_trajectories", sample), (evolve, "grpo_step", grpo),
                          (evolve, "distill", distill), (D, "pair_logits", pair_logits)):
        monkeypatch.setattr(mod, name, fn)
    return log


same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_the_loop_the_no_hint_phase_changes_no_weight_and_grpo_starts_at_its_reference(tmp_path, tiny_dir,
                                                                                          monkeypatch, dtype):
    """After a GRPO step (its own AdamW, with moments), the no-hint distillation phase takes its steps and moves
    no weight: no leftover momentum, no decay, teacher and student in one precision. The round's GRPO and
    distillation questions are disjoint, and the first GRPO step's KL to round 0 is exactly 0."""
    log = spy_round(monkeypatch)
    rows = evolve.main([f"--model={tiny_dir}", f"--out_dir={tmp_path}", f"--rollout_dtype={dtype}", *TINY_RUN,
                        "--teacher_shows=none"])
    stats = log["stats"]
    assert stats["n_pairs"] > 0 and stats["steps"] == 3 and stats["kl_before"] == 0.0
    assert same(log["before"], log["after"]) and same(log["before"], log["after_grpo"][-1])
    assert rows[1]["optimizer_steps"] == 1 + 3 and rows[1]["grpo_kl"] == [0.0]
    assert log["grpo_lr"] == log["distill_lr"] == 2e-5   # one lr, no ramp: the warm-up's ramp is its own
    grpo_ids, distill_ids = log["qids"]["rollout_grpo"], log["qids"]["rollout_distill"]
    assert len(grpo_ids) == 2 and len(distill_ids) == 2 and not set(grpo_ids) & set(distill_ids)


def test_in_the_loop_the_teacher_is_the_post_grpo_policy_frozen_for_the_phase(tmp_path, tiny_dir, monkeypatch):
    log = spy_round(monkeypatch)
    evolve.main([f"--model={tiny_dir}", f"--out_dir={tmp_path}", "--rollout_dtype=float32", *TINY_RUN,
                 "--distill_lr=1e-3"])
    assert log["stats"]["steps"] == 3 and len(log["teacher"]) == 3
    assert same(log["before"], log["after_grpo"][-1])                # the policy as GRPO left it ...
    assert all(same(t, log["before"]) for t in log["teacher"])        # ... is every batch's teacher
    assert not same(log["after"], log["before"])                      # while the student moves


def test_the_model_picks_its_named_settings_and_a_flag_still_wins(tmp_path):
    from transformers import AutoConfig
    from config import SETS, size_class
    qwen = evolve.parse_config(["--model=qwen2.5-coder-0.5b"])
    assert qwen.settings == "0.5b" and all(getattr(qwen, k) == v for k, v in SETS["0.5b"].items())
    assert SETS["0.5b"]["warmup_lr"] != evolve.Config.warmup_lr         # not the 135M rate
    mine = evolve.parse_config(["--model=qwen2.5-coder-0.5b", "--warmup_lr=0.001"])
    assert mine.warmup_lr == 0.001 and mine.grpo_lr == qwen.grpo_lr
    assert evolve.parse_config([]).settings == "135m" and evolve.parse_config(["--settings=3b"]).grpo_lr == 1e-6
    for hidden, layers, expected in ((896, 24, "0.5b"), (2048, 36, "3b"), (576, 30, "135m")):  # by parameter count
        cfg = AutoConfig.for_model("qwen2", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=151936 if hidden > 576
                                   else 49152, tie_word_embeddings=hidden != 896)
        cfg.save_pretrained(tmp_path / expected)
        assert size_class(str(tmp_path / expected)) == expected
    assert size_class(str(tmp_path / "nowhere")) == "3b"   # unknown size: the documented large-model set
    with pytest.raises(SystemExit, match="settings is one of 135m, 0.5b, 3b"):
        evolve.parse_config(["--settings=7b"])
