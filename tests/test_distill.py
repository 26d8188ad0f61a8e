"""distill.py: sibling selection, which trajectories become students, the teacher's privileged context,
the KL itself, and kept-trace SFT. Trajectories are built by hand from the real tokenizer, not rolled out."""
import copy
import dataclasses
import math

import pytest
import torch

from distill import (SPANS, DistillConfig, distill, forward_kl, kept_traces, opsd_loss, opsd_pairs, pair_logits,
                     privileged_hint, select_sibling, select_students, sft_loss, span_labels, teacher_prompt_ids,
                     top1_cross_entropy)
from model import pack, response_logits
from train import load_optimizer, make_optimizer, save_optimizer, split
from rollout import Trajectory, build_prompt

Q = "What is the capital of France?"
OBS = "\n\n<information>Doc 1 (Paris): Paris is the capital of France.</information>\n\n"


def make_traj(tok, qid, queries, answer, reward, think="ok", question=Q):
    """prompt + one search turn per query (each followed by an <information> block) + an answer turn."""
    prompt = tok(build_prompt(tok, question), add_special_tokens=False).input_ids
    parts = [(f"<think> {think} </think>\n<search> {q} </search>", 1) for q in queries]
    parts = [p for turn in parts for p in (turn, (OBS, 0))] + [(f"<think> {think} </think>\n<answer> {answer} </answer>", 1)]
    ids, mask = list(prompt), [0] * len(prompt)
    for text, m in parts:
        part = tok(text, add_special_tokens=False).input_ids
        ids += part
        mask += [m] * len(part)
    return Trajectory(qid, question, ids, mask, len(prompt), queries=list(queries), answer=answer,
                      n_generated=sum(mask), finished=True, reward=reward)


def group(tok, qid="q1"):
    """Two searches right; one search right but verbose; one search right and terse; one search wrong."""
    return [make_traj(tok, qid, ["capital of france", "paris france"], "Paris", 1.0),
            make_traj(tok, qid, ["france capital"], "Paris", 1.0, think="let me think about this carefully first"),
            make_traj(tok, qid, ["france capital"], "Paris", 1.0),
            make_traj(tok, qid, ["france"], "Lyon", 0.0)]


def test_select_sibling_takes_fewest_searches_then_fewest_tokens(tok):
    g = group(tok)
    assert select_sibling(g) is g[2]
    assert select_sibling(g, rule="shortest") is g[2]
    assert select_sibling([g[0], g[3]]) is g[0]
    assert select_sibling([g[3]]) is None
    twins = [make_traj(tok, "q", ["a"], "Paris", 1.0), make_traj(tok, "q", ["a"], "Paris", 1.0)]
    assert select_sibling(twins) is twins[0]  # ties: the first


def test_students_are_every_other_trajectory_and_unsolved_questions_yield_nothing(tok):
    solved = group(tok, "q1")
    unsolved = [make_traj(tok, "q2", ["x"], "Lyon", 0.0), make_traj(tok, "q2", [], "Nice", 0.0)]
    pairs = opsd_pairs(tok, solved + unsolved, DistillConfig())
    assert [p.student for p in pairs] == [solved[0], solved[1], solved[3]]  # the incorrect one included
    assert all(p.sibling is solved[2] for p in pairs)
    assert opsd_pairs(tok, unsolved, DistillConfig()) == []


def test_privileged_hint_sits_inside_the_user_turn(tok):
    sib = group(tok)[2]
    hint = privileged_hint(tok, sib)
    assert hint == "\nA correct and efficient solution searched for: 'france capital' and answered: Paris.\n"
    text = tok.decode(teacher_prompt_ids(tok, Q, hint))
    assert text.index(hint.strip()) < text.index("<|im_start|>assistant")
    assert "<information>" in privileged_hint(tok, sib, "full")
    plain = tok(build_prompt(tok, Q), add_special_tokens=False).input_ids
    assert teacher_prompt_ids(tok, Q, privileged_hint(tok, sib, "none")) == plain


def test_forward_kl_hand_example():
    """p_T = (1/2, 1/2), p_S = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3); clipped terms; equal logits give 0."""
    t, s = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(forward_kl(t, s), torch.tensor([0.5 * math.log(2) + 0.5 * math.log(2 / 3)]))
    s2 = torch.log(torch.tensor([[0.4, 0.6]]))  # terms 0.5 log 1.25 = 0.112 (clipped to 0.1) and 0.5 log(5/6)
    torch.testing.assert_close(forward_kl(t, s2, clip=0.1), torch.tensor([0.1 + 0.5 * math.log(5 / 6)]))
    assert forward_kl(s, s).item() == 0.0
    torch.testing.assert_close(top1_cross_entropy(torch.tensor([[0.0, 1.0]]), s), torch.tensor([-math.log(0.75)]))


def test_the_kl_gradient_is_the_exact_one_and_zero_at_equal_logits():
    """forward_kl's gradient in the student's logits is p_S - p_T (autograd's, up to float error), exactly 0 when
    the logits are equal (autograd's own is float error there, which Adam scales up to a full step)."""
    t, s = torch.randn(3, 11, generator=torch.Generator().manual_seed(0)), torch.randn(3, 11)
    s.requires_grad_(True)
    forward_kl(t, s).sum().backward()
    torch.testing.assert_close(s.grad, s.detach().softmax(-1) - t.softmax(-1))
    same = t.clone().requires_grad_(True)
    forward_kl(t, same).sum().backward()
    assert (same.grad == 0).all()


def no_hint_and_hinted(tok):
    return (opsd_pairs(tok, group(tok), DistillConfig(teacher_shows=s)) for s in ("none", "queries"))


def test_the_no_hint_control_changes_only_the_teachers_context(tok):
    none, hinted = no_hint_and_hinted(tok)
    assert [(p.student, p.sibling) for p in none] == [(p.student, p.sibling) for p in hinted]
    plain = tok(build_prompt(tok, Q), add_special_tokens=False).input_ids
    assert all(p.teacher_prompt == plain for p in none)
    assert all(p.teacher_prompt != plain for p in hinted)


def test_at_the_start_of_a_phase_the_kl_is_zero_without_a_hint_and_positive_with_one(tok, peaked):
    """distill()'s default loss, measured on each batch before its update, with the frozen snapshot teacher."""
    kl = {}
    for shows in ("none", "queries"):
        cfg = DistillConfig(teacher_shows=shows, lr=1e-3, batch_size=16, progress=False)
        kl[shows] = distill(copy.deepcopy(peaked), tok, group(tok), cfg)["kl_before"]
    assert abs(kl["none"]) <= 1e-6 and kl["queries"] > 1e-3


def test_the_teacher_is_the_policy_as_the_phase_found_it_frozen_for_the_whole_phase(tok, peaked, monkeypatch):
    """Every batch's teacher holds the weights the policy had when distill() was called, while the policy moves."""
    import distill as D
    policy = copy.deepcopy(peaked).train()
    start = [p.detach().clone() for p in policy.parameters()]
    seen = []
    real = D.pair_logits

    def spy(pol, teacher, *a, **k):
        seen.append((teacher is pol, [p.detach().clone() for p in teacher.parameters()],
                     [p.detach().clone() for p in pol.parameters()]))
        return real(pol, teacher, *a, **k)
    monkeypatch.setattr(D, "pair_logits", spy)
    stats = distill(policy, tok, group(tok), DistillConfig(lr=1e-3, steps=3, micro_batch=8, progress=False))
    assert stats["steps"] == 3 and len(seen) == 3
    for is_policy, teacher_w, _ in seen:
        assert not is_policy and all(torch.equal(a, b) for a, b in zip(teacher_w, start))
    assert not all(torch.equal(a, b) for a, b in zip(seen[2][2], start))  # the student has moved by batch 3


@pytest.mark.parametrize("bf16", [False, True])
def test_the_no_hint_control_changes_no_weight_after_a_grpo_step(tok, peaked, bf16):
    """evolve's optimizers and teacher: a GRPO step (its own AdamW), then a no-hint distillation phase. The
    teacher is the policy itself in the same precision, so every KL and gradient is 0, and the distillation
    AdamW (no leftover moments, no decay) moves no weight at all: the control is inert, in fp32 and in bf16."""
    import evolve
    from grpo import GRPOConfig, grpo_step
    policy = copy.deepcopy(peaked).train()
    opts = evolve.make_optimizers(policy)
    trajs = group(tok)
    stats = grpo_step(policy, None, opts["grpo"], trajs, GRPOConfig(lr=1e-3, kl_coef=0, autocast_bf16=bf16),
                      tok.pad_token_id)
    assert stats["steps"] == 1 and opts["grpo"].state
    before = [p.detach().clone() for p in policy.parameters()]
    cfg = DistillConfig(teacher_shows="none", lr=1e-3, steps=3, autocast_bf16=bf16, progress=False)
    d = distill(policy, tok, trajs, cfg, opts["distill"])
    assert d["n_pairs"] == 3 and d["steps"] == 3 and d["kl_before"] == 0.0 and d["losses"] == [0.0] * 3
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_both_distributions_are_taken_at_the_sampling_temperature(tok, peaked):
    pairs = opsd_pairs(tok, group(tok), DistillConfig())
    teacher = copy.deepcopy(peaked)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
        t, s, _ = pair_logits(peaked, teacher, pairs, tok.pad_token_id, False)
        cfg = DistillConfig(temperature=2.0, autocast_bf16=False)
        loss = opsd_loss(peaked, teacher, pairs, tok.pad_token_id, cfg)
    torch.testing.assert_close(loss, forward_kl(t / 2, s / 2).sum(), rtol=1e-4, atol=1e-6)
    assert abs(float(loss - forward_kl(t, s).sum())) > 1e-3 * float(loss)  # not the temperature-1 KL


def test_top1_ce_is_cross_entropy_on_the_privileged_teachers_greedy_token(tok, peaked):
    pairs = opsd_pairs(tok, group(tok), DistillConfig())
    loss = opsd_loss(peaked, peaked, pairs, tok.pad_token_id, DistillConfig(loss="top1_ce", autocast_bf16=False))
    s_ids, s_attn, mask = pack(*zip(*(split(p.student) for p in pairs)), tok.pad_token_id)
    _, resp, masks = zip(*(split(p.student) for p in pairs))
    t_ids, t_attn, _ = pack([p.teacher_prompt for p in pairs], resp, masks, tok.pad_token_id)
    keep, R = mask.bool(), mask.shape[1]
    with torch.no_grad():
        greedy = response_logits(peaked, t_ids, t_attn, R)[keep].argmax(-1)
        s_logp = response_logits(peaked, s_ids, s_attn, R)[keep].float().log_softmax(-1)
    torch.testing.assert_close(loss.detach(), -s_logp.gather(-1, greedy[:, None]).sum(), rtol=1e-4, atol=1e-4)


def test_kl_counts_only_the_students_policy_tokens_and_only_the_student_has_gradient(tok, tiny):
    pairs = opsd_pairs(tok, group(tok), DistillConfig())
    teacher, seen = copy.deepcopy(tiny), []
    for m in (teacher, tiny):
        m.get_output_embeddings().register_forward_hook(lambda mod, i, out: seen.append((out.shape[0], out.requires_grad)))
    diag = dict(disagree=0, **{f"{k}_{s}": 0 for k in ("kl", "n") for s in SPANS})
    loss = opsd_loss(tiny, teacher, pairs, tok.pad_token_id, DistillConfig(), diag)
    n = sum(sum(p.student.loss_mask) for p in pairs)
    assert seen == [(n, False), (n, True)]  # the teacher under no_grad, then the student, on the same n tokens
    assert loss.requires_grad and sum(diag[f"n_{s}"] for s in SPANS) == n


def test_span_labels_mark_queries_and_answers(tok):
    t = group(tok)[3]  # one search "france", answer "Lyon"
    resp = t.token_ids[t.prompt_len:]
    # the policy's own tokens only: <information> is the retriever's
    own = [(i, lab) for i, lab, m in zip(resp, span_labels(tok, t), t.loss_mask[t.prompt_len:]) if m]
    by_span = {k: tok.decode([i for i, lab in own if lab == k]) for k in range(4)}
    assert by_span[1].strip() == "france" and by_span[2].strip().startswith("Lyon")
    assert "ok" in by_span[0] and "france" not in by_span[0] and "<" not in by_span[0]
    assert all(f"{tag}>" in by_span[3] for tag in ("<think", "</think", "<search", "</search", "<answer", "</answer"))


def test_student_rules_and_the_searched_sibling_rule(tok):
    g = group(tok)
    twin = make_traj(tok, "q1", ["france capital"], "Paris", 1.0)  # exactly as efficient as the sibling g[2]
    assert select_students(g + [twin], g[2]) == [g[0], g[1], g[3]]  # a tie is no student: nothing better to show
    assert select_students(g + [twin], g[2], "all") == [g[0], g[1], g[3], twin]
    assert select_students(g, g[2], "most_different") == [g[3]]  # the wrong one first
    assert select_students([g[2], twin], g[2], "most_different") == []
    lucky = make_traj(tok, "q1", [], "Paris", 1.0)  # right without searching
    assert select_sibling(g + [lucky]) is lucky and select_sibling(g + [lucky], "searched") is g[2]
    assert lucky in select_students(g + [lucky], g[2], sibling_rule="searched")  # a guess is shown the search
    assert lucky in kept_traces(g + [lucky], cap=10) and lucky not in kept_traces(g + [lucky], 10, "searched")


def test_a_few_opsd_steps_lower_the_kl(tok, peaked):
    """Toward a frozen teacher, at a small lr (at 1e-3 Adam's sign-sized first steps overshoot a KL of 0.004)."""
    policy = copy.deepcopy(peaked)
    cfg = DistillConfig(lr=1e-5, epochs=3, micro_batch=2, progress=False)
    stats = distill(policy, tok, group(tok), cfg)
    assert stats["n_pairs"] == 3 and stats["steps"] == 3 and stats["n_skipped"] == 0
    assert stats["kl_before"] == pytest.approx(stats["epoch_loss"][0]) and stats["kl_before"] > 1e-3
    assert stats["epoch_loss"][-1] < 0.5 * stats["epoch_loss"][0]


def test_optimizer_state_round_trips_so_training_resumes_bit_identically(tok, tiny, tmp_path):
    """Two steps in one go == one step, save weights and AdamW state, load both into fresh objects, one step."""
    cfg = DistillConfig(method="sft", lr=1e-3, epochs=1, batch_size=2, progress=False, autocast_bf16=False)
    a = copy.deepcopy(tiny).train()
    opt_a = make_optimizer(a)
    for seed in (1, 2):
        distill(a, tok, group(tok), dataclasses.replace(cfg, seed=seed), opt_a)
    b = copy.deepcopy(tiny).train()
    opt_b = make_optimizer(b)
    distill(b, tok, group(tok), dataclasses.replace(cfg, seed=1), opt_b)
    save_optimizer(opt_b, b, tmp_path / "optimizer.safetensors")
    c = copy.deepcopy(b)
    opt_c = make_optimizer(c)
    load_optimizer(opt_c, c, tmp_path / "optimizer.safetensors")
    distill(c, tok, group(tok), dataclasses.replace(cfg, seed=2), opt_c)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    fresh = copy.deepcopy(b)  # control: without the state the same step lands elsewhere
    distill(fresh, tok, group(tok), dataclasses.replace(cfg, seed=2))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), fresh.parameters()))


def test_sft_gradient_is_zero_at_positions_whose_target_is_masked(tok, tiny):
    policy = copy.deepcopy(tiny)
    kept = []

    def keep_hidden(module, inputs, out):
        out.retain_grad()
        kept.append(out)
    policy.get_decoder().norm.register_forward_hook(keep_hidden)  # the last hidden state, before the head
    trajs = group(tok)[:2]  # different lengths: right padding in the response too
    loss = sft_loss(policy, trajs, tok.pad_token_id, autocast_bf16=False)
    n = sum(sum(t.loss_mask) for t in trajs)
    (loss / n).backward()
    _, _, mask = pack([t.token_ids[:t.prompt_len] for t in trajs], [t.token_ids[t.prompt_len:] for t in trajs],
                      [t.loss_mask[t.prompt_len:] for t in trajs], tok.pad_token_id)
    grad = kept[0].grad[:, -mask.shape[1] - 1:-1].abs().sum(-1)
    assert grad.shape == mask.shape and n == int(mask.sum())
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] > 0).all()


def test_kept_traces_respect_the_per_question_cap_most_efficient_first(tok):
    g1, g2 = group(tok, "q1"), group(tok, "q2")
    kept = kept_traces(g1 + g2 + [make_traj(tok, "q3", [], "Lyon", 0.0)], cap=2)
    assert kept == [g1[2], g1[1], g2[2], g2[1]]
    assert kept_traces(g1, cap=1) == [g1[2]]
    assert all(t.reward == 1.0 for t in kept_traces(g1, cap=10)) and len(kept_traces(g1, cap=10)) == 3


def test_sft_round_trains_on_kept_traces(tok, tiny):
    policy = copy.deepcopy(tiny)
    stats = distill(policy, tok, group(tok), DistillConfig(method="sft", lr=1e-3, epochs=3, progress=False))
    assert stats["n_kept"] == 2 and stats["steps"] == 3
    assert stats["epoch_loss"][-1] < stats["epoch_loss"][0]


def test_activation_checkpointing_gives_the_same_gradients(tok, tiny):
    """evolve.py's --checkpointing recomputes each layer in backward to save memory; the update must not change."""
    grads = []
    for on in (False, True):
        model = copy.deepcopy(tiny).train()
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss = sft_loss(model, group(tok), tok.pad_token_id, autocast_bf16=False)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
