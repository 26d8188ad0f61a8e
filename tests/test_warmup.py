"""warmup.py: scripted traces of training questions, laid out exactly as rollout.py lays out a trajectory."""
from data.load import QUESTIONS_DIR, load_qa
from rollout import RolloutConfig
from search import get_retriever
from warmup import scripted_traces


def test_scripted_warmup_traces_mask_only_the_policy_part_and_answer_only_what_they_read(tok):
    qs = load_qa(QUESTIONS_DIR / "train.jsonl", limit=20)
    traces = scripted_traces(tok, qs, get_retriever(), RolloutConfig(max_obs_tokens=256))
    assert traces, "some training answers must be readable in the retrieved documents"
    for t in traces:
        policy_text = tok.decode([i for i, m in zip(t.token_ids, t.loss_mask) if m])
        assert "<information>" not in policy_text and f"<answer> {t.answer} </answer>" in policy_text
        observed = tok.decode([i for i, m in zip(t.token_ids[t.prompt_len:], t.loss_mask[t.prompt_len:]) if not m])
        assert t.answer.lower() in observed.lower()  # the answer it clones was in the documents it read
        assert t.reward == 1.0 and t.queries and t.n_generated == sum(t.loss_mask)
