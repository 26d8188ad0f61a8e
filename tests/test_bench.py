"""bench.py: the yardstick's bookkeeping (its timings are measured by running it, never in a test)."""
from bench import attended_pairs, first_diff, needed_tokens
from rollout import Trajectory


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


def test_first_diff_is_the_first_differing_index_or_the_shorter_length():
    assert first_diff([1, 2, 3], [1, 9, 3]) == 1
    assert first_diff([1, 2], [1, 2, 3]) == 2
