"""bench.py: the yardstick's bookkeeping (its timings are measured by running it, never in a test)."""
import rollout as rollout_module
from bench import Arch, arch_of, attended_pairs, first_diff, needed_tokens, roofline, step_cost, timed_feed
from model import tiny_model
from rollout import RolloutConfig, Trajectory, rollout

# a made-up model: 100 weights every token goes through, a 20-weight head, 2 layers of 4 query heads sharing
# 2 key-value heads of size 8. One position's keys + values over all layers: 2 x 2 layers x 2 kv heads x 8 = 64
# numbers; one multiply-add of attention for one query-key pair over all heads and layers: 2 x 4 x 8 = 64.
A = Arch(body=100, head=20, layers=2, heads=4, kv_heads=2, head_dim=8)


def test_needed_tokens_counts_a_shared_prompt_once_and_every_response_token():
    prompt = [1, 2, 3, 4]
    siblings = [Trajectory("q1", "?", prompt + [5, 6], [0] * 4 + [1, 1], 4),
                Trajectory("q1", "?", prompt + [7, 8, 9], [0] * 4 + [1, 0, 1], 4)]
    other = Trajectory("q2", "?", [1, 2] + [5], [0, 0, 1], 2)
    assert needed_tokens(siblings) == 4 + 2 + 3
    assert needed_tokens(siblings + [other]) == 4 + 2 + 3 + 2 + 1


def test_attended_pairs_counts_each_needed_token_against_itself_and_every_earlier_token():
    prompt = [1, 2, 3]
    siblings = [Trajectory("q1", "?", prompt + [5], [0] * 3 + [1], 3),
                Trajectory("q1", "?", prompt + [7, 8], [0] * 3 + [1, 1], 3)]
    # the shared prompt once: 1 + 2 + 3; then position 3 sees 4 keys, and positions 3, 4 see 4 + 5
    assert attended_pairs(siblings) == (1 + 2 + 3) + 4 + (4 + 5)


def test_a_decode_step_costs_its_tokens_head_rows_and_attended_cache():
    # 3 slots holding 5, 0 and 10 tokens; the middle one is idle (appends nothing), the others decode 1 token
    flops, nbytes = step_cost(A, [5, 0, 10], [1, 0, 1], wsize=4, kvsize=2)
    # 2 tokens through the body, the head on 2 rows; the token at position 5 sees 6 keys, the one at 10 sees 11
    assert flops == 2 * 100 * 2 + 2 * 20 * 2 + 4 * 2 * 4 * 8 * (6 + 11) == 4832
    # every weight once in 4 bytes; the cache in 2 bytes a number, 64 numbers a position: each row reads its
    # 6 and 11 attended positions and writes its 1 new one; the idle row moves nothing
    assert nbytes == (100 + 20) * 4 + 64 * 2 * ((6 + 1) + (11 + 1)) == 2912


def test_a_prefill_step_counts_causal_pairs_within_its_chunk():
    # one slot holding 3 tokens appends 4: positions 3..6 see 4, 5, 6 and 7 keys; the head runs once (one row)
    flops, nbytes = step_cost(A, [3], [4], wsize=4, kvsize=4)
    assert flops == 2 * 100 * 4 + 2 * 20 + 4 * 2 * 4 * 8 * (4 + 5 + 6 + 7) == 6472
    assert nbytes == (100 + 20) * 4 + 64 * 4 * (7 + 4) == 3296


def test_roofline_sums_least_step_times_and_splits_the_measured_time(capsys):
    # the two steps above, in 4-byte numbers, at 10^4 FLOP/s and 10^4 B/s: the decode step moves
    # 480 + 256 * 19 = 5344 bytes (0.5344 s > 0.4832 s of FLOPs: memory-bound), the prefill step does 6472 FLOPs
    # (0.6472 s > 0.3296 s of bytes). Each took 1 s of a 4 s rollout; the other 2 s were outside feed.
    steps = [([5, 0, 10], [1, 0, 1], 1.0), ([3], [4], 1.0)]
    roofline(steps, 4.0, A, 4, peak_flops=1e4, bandwidth=1e4, tag="_x")
    said = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    assert said == {"rollout_fraction_of_roofline_x": f"{(0.5344 + 0.6472) / 4:.4f}",
                    "rollout_decode_fraction_of_roofline_x": "0.5344",
                    "rollout_decode_share_x": "0.2500", "rollout_prefill_share_x": "0.2500",
                    "rollout_outside_feed_share_x": "0.5000"}


def test_arch_of_counts_the_tied_embedding_once_as_the_head():
    # tiny_model: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 kv heads, vocabulary 256, tied embedding.
    # A layer: q 64x64 + k, v 64x32 each + o 64x64 + MLP 3 x 64x128 + 2 norms of 64 = 36,992; then a final norm.
    assert arch_of(tiny_model()) == Arch(2 * 36992 + 64, 256 * 64, 2, 4, 2, 16)


class NoDocs:
    def search(self, queries, k=3):
        return [[] for _ in queries]


def test_timed_feed_records_every_forward_step_and_puts_feed_back(tok, tiny):
    original = rollout_module.feed
    cfg = RolloutConfig(group_size=2, max_turns=1, max_turn_tokens=8, max_total_tokens=40, seed=3)
    with timed_feed([]) as steps:
        trajs = rollout(tiny, tok, [{"id": "q1", "question": "Who wrote Hamlet?"}], NoDocs(), cfg)
    assert rollout_module.feed is original
    # the first step prefills the siblings' shared prompt once, into one empty slot
    assert steps[0][:2] == ([0], [trajs[0].prompt_len])
    # every needed token is fed once, except each trajectory's last sampled token (it ends the trajectory)
    assert sum(sum(lens) for _, lens, _ in steps) == needed_tokens(trajs) - len(trajs)
    assert all(seconds > 0 for _, _, seconds in steps)


def test_first_diff_is_the_first_differing_index_or_the_shorter_length():
    assert first_diff([1, 2, 3], [1, 9, 3]) == 1
    assert first_diff([1, 2], [1, 2, 3]) == 2
