"""distill.py: sibling selection, which trajectories become students, the teacher's privileged context,
the KL itself, and kept-trace SFT. Trajectories are built by hand from the real tokenizer, not rolled out."""
import copy

import pytest
import torch

from distill import (DistillConfig, distill, kept_traces, ofsd_loss, ofsd_pairs, privileged_hint,
                     select_sibling, sft_loss, teacher_prompt_ids)
from grpo import split
from model import pack, response_logits
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
    pairs = ofsd_pairs(tok, solved + unsolved, DistillConfig())
    assert [p.student for p in pairs] == [solved[0], solved[1], solved[3]]  # the incorrect one included
    assert all(p.sibling is solved[2] for p in pairs)
    assert ofsd_pairs(tok, unsolved, DistillConfig()) == []


def test_privileged_hint_sits_inside_the_user_turn(tok):
    sib = group(tok)[2]
    hint = privileged_hint(tok, sib)
    assert hint == "\nA correct and efficient solution searched for: 'france capital' and answered: Paris.\n"
    text = tok.decode(teacher_prompt_ids(tok, Q, hint))
    assert text.index(hint.strip()) < text.index("<|im_start|>assistant")
    assert "<information>" in privileged_hint(tok, sib, "full")
    plain = tok(build_prompt(tok, Q), add_special_tokens=False).input_ids
    assert teacher_prompt_ids(tok, Q, privileged_hint(tok, sib, "none")) == plain


@pytest.fixture(scope="module")
def peaked(tiny):
    """The tiny random model with sharper output and stronger attention, so that context (the privileged
    hint) changes its next-token distribution measurably; the plain one is nearly uniform everywhere."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(5)
    return model


def test_kl_is_zero_when_teacher_and_student_contexts_are_equal(tok, peaked):
    pairs = ofsd_pairs(tok, group(tok), DistillConfig(teacher_shows="none"))
    kl, n = ofsd_loss(peaked, pairs, tok.pad_token_id)
    assert n > 0 and abs(kl.item()) / n <= 1e-6
    kl, n = ofsd_loss(peaked, ofsd_pairs(tok, group(tok), DistillConfig()), tok.pad_token_id)
    assert kl.item() / n > 1e-3  # the privileged hint really changes the teacher


def test_topk_kl_renormalises_the_teacher_only(tok, peaked):
    """With kl_topk the teacher is renormalised over its top-k and the student is not, so at equal
    contexts the KL is -log(student mass on those k tokens), not 0: it also sharpens the student."""
    pairs = ofsd_pairs(tok, group(tok), DistillConfig(teacher_shows="none"))
    kl, n = ofsd_loss(peaked, pairs, tok.pad_token_id, topk=20, autocast_bf16=False)
    ids, attn, mask = pack(*zip(*(split(p.student) for p in pairs)), tok.pad_token_id)
    with torch.no_grad():
        p = response_logits(peaked, ids, attn, mask.shape[1])[mask.bool()].float().softmax(-1)
    expected = -p.topk(20, -1).values.sum(-1).log().sum()
    torch.testing.assert_close(kl.detach(), expected, rtol=1e-4, atol=1e-4)


def test_topk_one_is_cross_entropy_on_the_privileged_teachers_greedy_token(tok, peaked):
    """evolve.py's default: at every student position, -log student(the token the hinted teacher ranks first)."""
    pairs = ofsd_pairs(tok, group(tok), DistillConfig())
    kl, n = ofsd_loss(peaked, pairs, tok.pad_token_id, topk=1, autocast_bf16=False)
    s_ids, s_attn, mask = pack(*zip(*(split(p.student) for p in pairs)), tok.pad_token_id)
    _, resp, masks = zip(*(split(p.student) for p in pairs))
    t_ids, t_attn, _ = pack([p.teacher_prompt for p in pairs], resp, masks, tok.pad_token_id)
    keep, R = mask.bool(), mask.shape[1]
    with torch.no_grad():
        greedy = response_logits(peaked, t_ids, t_attn, R)[keep].argmax(-1)
        s_logp = response_logits(peaked, s_ids, s_attn, R)[keep].float().log_softmax(-1)
    assert n == int(keep.sum())
    torch.testing.assert_close(kl.detach(), -s_logp.gather(-1, greedy[:, None]).sum(), rtol=1e-4, atol=1e-4)


def test_kl_counts_only_the_students_policy_tokens_and_only_the_student_has_gradient(tok, tiny):
    pairs = ofsd_pairs(tok, group(tok), DistillConfig())
    seen = []
    handle = tiny.get_output_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    try:
        kl, n = ofsd_loss(tiny, pairs, tok.pad_token_id)
    finally:
        handle.remove()
    assert n == sum(sum(p.student.loss_mask) for p in pairs)
    assert seen == [False, True]  # teacher forward under no_grad, then the student's
    assert kl.requires_grad


def test_a_few_ofsd_steps_lower_the_kl(tok, peaked):
    policy = copy.deepcopy(peaked)
    cfg = DistillConfig(lr=1e-3, epochs=3, micro_batch=2, progress=False)
    stats = distill(policy, tok, group(tok), cfg)
    assert stats["n_pairs"] == 3 and stats["steps"] == 3 and stats["n_skipped"] == 0
    assert stats["kl_before"] == stats["epoch_loss"][0] > 1e-3
    assert stats["epoch_loss"][-1] < 0.5 * stats["epoch_loss"][0]


def test_sft_gradient_is_zero_at_positions_whose_target_is_masked(tok, tiny):
    policy = copy.deepcopy(tiny)
    kept = []

    def keep_hidden(module, inputs, out):
        out.retain_grad()
        kept.append(out)
    policy.get_decoder().norm.register_forward_hook(keep_hidden)  # the last hidden state, before the head
    trajs = group(tok)[:2]  # different lengths: right padding in the response too
    loss, n = sft_loss(policy, trajs, tok.pad_token_id, autocast_bf16=False)
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
        loss, _ = sft_loss(model, group(tok), tok.pad_token_id, autocast_bf16=False)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
