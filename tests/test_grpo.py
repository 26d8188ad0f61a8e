"""grpo.py: group advantages, which tokens and groups are trained, and that one step moves the right way.
Trajectories are built by hand (prompt + think/search/<information>/answer), not rolled out."""
import copy
import math

import pytest
import torch

from grpo import GRPOConfig, group_advantages, grpo_step, grpo_token_loss, k3, logprobs
from model import pack, response_logits
from rollout import Trajectory, build_prompt
from train import frozen_copy

TURN1 = "<think> I need to look it up. </think>\n<search> capital of france </search>"
OBS = "\n\n<information>Doc 1 (Paris): Paris is the capital of France.</information>\n\n"


def make_traj(tok, qid, answer, reward, question="What is the capital of France?"):
    prompt = tok(build_prompt(tok, question), add_special_tokens=False).input_ids
    parts = [(TURN1, 1), (OBS, 0), (f"<think> ok </think>\n<answer> {answer} </answer>", 1)]
    ids, mask = list(prompt), [0] * len(prompt)
    for text, m in parts:
        part = tok(text, add_special_tokens=False).input_ids
        ids += part
        mask += [m] * len(part)
    return Trajectory(qid, question, ids, mask, len(prompt), queries=["capital of france"], answer=answer,
                      n_generated=sum(mask), finished=True, reward=reward)


def batch(tok, rewards_per_q):
    return [make_traj(tok, f"q{n}", f"ans {g}", r) for n, rs in enumerate(rewards_per_q) for g, r in enumerate(rs)]


def seq_logp(model, tok, t):
    """Sum of log-probs of the trajectory's policy-generated tokens (fp32, no autocast)."""
    ids, attn, mask = pack([t.token_ids[:t.prompt_len]], [t.token_ids[t.prompt_len:]],
                           [t.loss_mask[t.prompt_len:]], tok.pad_token_id)
    R = mask.shape[1]
    with torch.no_grad():
        lp = response_logits(model, ids, attn, R).float().log_softmax(-1).gather(-1, ids[:, -R:, None])[..., 0]
    return float((lp * mask).sum())


def test_group_advantage_hand_example_uses_unbiased_std():
    adv = group_advantages(torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1]]))
    c = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # mean 0.5, unbiased std sqrt(4 * 0.25 / 3)
    torch.testing.assert_close(adv, torch.tensor([[c, -c, -c, c], [0.0, 0, 0, 0]]))
    assert (adv[1] == 0).all()  # exactly, not approximately
    assert (group_advantages(torch.tensor([[0.3, 0.3, 0.3]])) == 0).all()
    assert (group_advantages(torch.tensor([[1.0], [0.0]])) == 0).all()  # G == 1: no signal


def test_all_equal_groups_are_counted_and_never_forwarded(tok, tiny):
    policy = copy.deepcopy(tiny)
    calls = []
    policy.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    trajs = batch(tok, [[1, 1], [0, 0]])
    before = [p.clone() for p in policy.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stats = grpo_step(policy, None, opt, trajs, GRPOConfig(lr=1e-3, kl_coef=0), tok.pad_token_id)
    assert stats["n_groups"] == 2 and stats["n_zero_groups"] == 2 and stats["steps"] == 0
    assert stats["tokens"] == 0 and calls == []
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    # a mixed group next to an all-equal one: only the mixed group's tokens are trained
    trajs = batch(tok, [[1, 0], [1, 1]])
    stats = grpo_step(policy, None, opt, trajs, GRPOConfig(lr=1e-3, kl_coef=0, micro_batch=8), tok.pad_token_id)
    assert stats["n_zero_groups"] == 1 and stats["n_trained"] == 2 and stats["steps"] == 1
    assert stats["tokens"] == sum(trajs[0].loss_mask) + sum(trajs[1].loss_mask)
    assert len(calls) == 1  # one forward of the two active rows: no separate old-log-prob pass with ppo_epochs=1


def test_masked_tokens_get_zero_gradient_on_their_logits(tok, tiny):
    """d loss / d (last hidden state) is exactly 0 at every position whose target token is not the policy's own
    (<information> tokens, padding), and non-zero where it is: only policy tokens reach the head."""
    policy, ref = copy.deepcopy(tiny), copy.deepcopy(tiny)
    kept = []

    def keep_hidden(module, inputs, out):
        out.retain_grad()
        kept.append(out)
    policy.get_decoder().norm.register_forward_hook(keep_hidden)
    trajs = batch(tok, [[1, 0]])
    trajs[1].token_ids += trajs[1].token_ids[-3:]; trajs[1].loss_mask += [1, 1, 1]  # rows of different lengths
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    cfg = GRPOConfig(lr=1e-3, kl_coef=0.1, autocast_bf16=False, micro_batch=8)
    grpo_step(policy, ref, opt, trajs, cfg, tok.pad_token_id)
    [hidden] = kept
    _, _, mask = pack([t.token_ids[:t.prompt_len] for t in trajs], [t.token_ids[t.prompt_len:] for t in trajs],
                      [t.loss_mask[t.prompt_len:] for t in trajs], tok.pad_token_id)
    grad = hidden.grad[:, -mask.shape[1] - 1:-1].abs().sum(-1)  # (B, R): the position predicting response token j
    assert mask.shape == grad.shape and (mask == 0).any()
    assert (grad[mask == 0] == 0).all()
    assert (grad[mask == 1] > 0).all()


def test_one_step_with_positive_advantage_raises_that_trajectory_logprob(tok, tiny):
    policy = copy.deepcopy(tiny)
    good, bad = batch(tok, [[1, 0]])
    before = seq_logp(policy, tok, good), seq_logp(policy, tok, bad)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    stats = grpo_step(policy, None, opt, [good, bad], GRPOConfig(lr=1e-3, kl_coef=0), tok.pad_token_id)
    assert stats["steps"] == 1 and not stats["skipped"] and stats["clip_frac"] == 0  # ratio 1 at the first step
    assert seq_logp(policy, tok, good) > before[0]
    assert seq_logp(policy, tok, bad) < before[1]


def test_k3_averaged_over_the_policys_samples_is_kl_policy_to_reference_not_the_reverse():
    """E_{x~p}[k3(log p(x), log q(x))] = KL(p || q) exactly (E_p[q/p] = 1), so the expectation over the policy p
    of the per-token term is the KL verl penalises; with the log-ratio flipped it is neither KL."""
    p = torch.tensor([0.8, 0.15, 0.05])   # q / p stays below e^2.5: no per-token value reaches the clamp at 10
    q = torch.tensor([0.2, 0.2, 0.6])
    expected = (p * (p / q).log()).sum()
    reverse = (q * (q / p).log()).sum()
    got = (p * k3(p.log(), q.log())).sum()
    torch.testing.assert_close(got, expected)
    assert abs(float(got - reverse)) > 0.1   # the two directions differ by far more than rounding here


@pytest.mark.parametrize("bf16", [False, True])
def test_k3_is_exactly_zero_against_a_frozen_copy_in_the_policys_precision(tok, tiny, bf16):
    """evolve's reference is train.frozen_copy: fp32 weights under the policy's autocast, so at equal weights the
    KL is 0 exactly (a bf16 copy would not be), also under bf16 autocast."""
    policy = copy.deepcopy(tiny).train()
    ref = frozen_copy(policy)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    stats = grpo_step(policy, ref, opt, batch(tok, [[1, 0, 0], [1, 1]]),
                      GRPOConfig(lr=0.0, kl_coef=0.1, autocast_bf16=bf16, micro_batch=2), tok.pad_token_id)
    assert stats["kl"] == 0.0 and stats["tokens"] > 0 and stats["steps"] == 1


def test_groups_are_found_by_question_id_whatever_the_order(tok, tiny):
    """Interleaved rollouts (q0, q1, q0, q1, ...) form the same groups and take the same step as grouped ones."""
    grouped = batch(tok, [[1, 0, 0], [0, 1, 1]])
    interleaved = [grouped[i] for i in (0, 3, 1, 4, 2, 5)]
    weights, all_stats = [], []
    for trajs in (grouped, interleaved):
        policy = copy.deepcopy(tiny)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        all_stats.append(grpo_step(policy, None, opt, trajs, GRPOConfig(lr=1.0, kl_coef=0, autocast_bf16=False,
                                                                        micro_batch=8), tok.pad_token_id))
        weights.append(torch.cat([p.flatten() for p in policy.parameters()]))
    for stats in all_stats:
        assert (stats["n_groups"], stats["n_zero_groups"], stats["n_trained"], stats["steps"]) == (2, 0, 6, 1)
    torch.testing.assert_close(weights[1], weights[0])
    assert not torch.equal(weights[0], torch.cat([p.flatten() for p in tiny.parameters()]))


def test_all_equal_groups_carry_the_kl_term_and_count_in_the_token_mean(tok, tiny):
    """As verl: with a KL term, a group whose rewards are all equal is forwarded (for its KL alone) and every
    trajectory's tokens are in the token-mean; the loss is the hand-computed whole-batch mean."""
    policy, ref = copy.deepcopy(tiny), copy.deepcopy(tiny)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trajs = batch(tok, [[1, 0], [1, 1]])
    trajs[3].token_ids += trajs[3].token_ids[-4:]; trajs[3].loss_mask += [1] * 4  # more tokens in the equal group
    cfg = GRPOConfig(lr=0.0, kl_coef=0.5, autocast_bf16=False, micro_batch=8)
    calls = []
    policy.get_decoder().register_forward_hook(lambda mod, inp, out: calls.append(out.last_hidden_state.shape[0]))
    stats = grpo_step(policy, ref, torch.optim.SGD(policy.parameters(), lr=0.0), trajs, cfg, tok.pad_token_id)
    assert calls == [4] and stats["n_zero_groups"] == 1 and stats["n_trained"] == 2
    with torch.no_grad():
        lp, mask = logprobs(policy, trajs, tok.pad_token_id, cfg)
        ref_lp, _ = logprobs(ref, trajs, tok.pad_token_id, cfg)
    adv = torch.tensor([0.5, -0.5, 0.0, 0.0])[:, None] / (math.sqrt(0.5) + 1e-6)  # mean 1/2, unbiased std
    per_tok = -adv + 0.5 * k3(lp, ref_lp)            # ratio 1 at the first step
    expected = float((per_tok * mask).sum() / mask.sum())
    assert stats["tokens"] == int(mask.sum()) and stats["kl"] > 0
    assert stats["loss"] == pytest.approx(expected, rel=1e-4)


def test_ppo_epochs_and_minibatches_take_one_step_per_minibatch_and_clip(tok, tiny):
    """ppo_epochs > 1 uses old log-probs frozen before the first update, so later steps see ratio != 1."""
    policy = copy.deepcopy(tiny)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    stats = grpo_step(policy, None, opt, batch(tok, [[1, 0, 0]]),
                      GRPOConfig(lr=1e-3, kl_coef=0, ppo_epochs=2, minibatch=2, micro_batch=1), tok.pad_token_id)
    assert stats["steps"] == 4 and math.isfinite(stats["loss"]) and stats["clip_frac"] > 0


def test_nan_loss_skips_the_optimizer_step(tok, tiny):
    policy = copy.deepcopy(tiny)
    before = [p.clone() for p in policy.parameters()]
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    stats = grpo_step(policy, None, opt, batch(tok, [[float("nan"), 1.0]]), GRPOConfig(lr=1e-3, kl_coef=0), tok.pad_token_id)
    assert stats["skipped"] and stats["steps"] == 0 and stats["n_skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_grpo_token_loss_hand_example():
    """Two tokens, advantage +1 and -1, ratio e^0.5 (beyond 1 + 0.2) for both; k3 with d = -0.5 for the first."""
    logp, old = torch.tensor([-0.5, -0.5]), torch.tensor([-1.0, -1.0])
    adv, ref = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -0.5])
    loss, clipped = grpo_token_loss(logp, old, adv, 0.2, ref, kl_coef=0.1)
    r = math.exp(0.5)
    k3_first = math.exp(-0.5) + 0.5 - 1  # e^d - d - 1, d = log ref - log policy
    # A > 0: max(-r, -1.2) = -1.2 (clipped); A < 0: max(r, 1.2) = r (not clipped)
    torch.testing.assert_close(loss, torch.tensor([-1.2 + 0.1 * k3_first, r]))
    assert clipped.tolist() == [True, False]
    assert k3(torch.tensor([-2.0]), torch.tensor([-2.0])).item() == 0.0


def test_logprobs_are_taken_at_the_sampling_temperature(tok, tiny):
    """The policy that sampled at T is softmax(logits / T): GRPO's ratio and gradient must use that one."""
    t = make_traj(tok, "q0", "Paris", 1.0)
    ids, attn, mask = pack([t.token_ids[:t.prompt_len]], [t.token_ids[t.prompt_len:]],
                           [t.loss_mask[t.prompt_len:]], tok.pad_token_id)
    R = mask.shape[1]
    with torch.no_grad():
        logits = response_logits(tiny, ids, attn, R).float()
        got = {T: logprobs(tiny, [t], tok.pad_token_id, GRPOConfig(temperature=T, autocast_bf16=False))[0]
               for T in (1.0, 0.5)}
    for T in (1.0, 0.5):
        want = (logits / T).log_softmax(-1).gather(-1, ids[:, -R:, None])[..., 0] * mask
        torch.testing.assert_close(got[T], want, rtol=1e-4, atol=1e-4)
    assert (got[0.5] - got[1.0]).abs().max() > 1e-2  # the temperature really changes them
