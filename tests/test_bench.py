"""bench.py: the yardstick's bookkeeping (its timings are measured by running it, never in a test)."""
from bench import first_diff, needed_tokens
from rollout import Trajectory


def test_needed_tokens_counts_a_shared_prompt_once_and_every_response_token():
    prompt = [1, 2, 3, 4]
    siblings = [Trajectory("q1", "?", prompt + [5, 6], [0] * 4 + [1, 1], 4),
                Trajectory("q1", "?", prompt + [7, 8, 9], [0] * 4 + [1, 0, 1], 4)]
    other = Trajectory("q2", "?", [1, 2] + [5], [0, 0, 1], 2)
    assert needed_tokens(siblings) == 4 + 2 + 3
    assert needed_tokens(siblings + [other]) == 4 + 2 + 3 + 2 + 1


def test_first_diff_is_the_first_differing_index_or_the_shorter_length():
    assert first_diff([1, 2, 3], [1, 9, 3]) == 1
    assert first_diff([1, 2], [1, 2, 3]) == 2
