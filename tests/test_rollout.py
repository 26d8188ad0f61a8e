"""rollout.py: the multi-turn search agent. A tiny model is taught one search-then-answer trajectory so that it
really searches and answers; the loss mask is then checked token by token.

What a tiny model writes where it was not taught depends on float rounding (the CPU's vector unit, the thread
count), so a test here either checks only what holds whatever it writes, compares two runs on one machine, or
drives the rollout with ScriptedLM (tests/scripted.py), whose every token is fixed by a script."""
import dataclasses

import pytest
import torch

import model as M
from rollout import RolloutConfig, SlotCache, Trajectory, _act, build_prompt, feed, last_tag, rollout
from scripted import ScriptedLM
from search import Doc

QUESTION = {"id": "q1", "question": "What is the capital of France?", "golden_answers": ["Paris"]}
DOCS = [Doc("7", "Paris", "Paris is the capital of France.", 3.0)]
TURN1 = "<think> I need to look it up. </think>\n<search> capital of france </search>"
TURN2 = "<think> The document says Paris. </think>\n<answer> Paris </answer>"


class ScriptedRetriever:
    def __init__(self, docs=DOCS, fail=False):
        self.docs, self.fail, self.calls = docs, fail, []

    def search(self, queries, k=3):
        self.calls.append(list(queries))
        if self.fail:
            raise ConnectionError("retriever down")
        return [self.docs[:k] for _ in queries]


def scripted_ids(tok, retriever):
    """prompt + TURN1 + the observation rollout.py appends + TURN2, as rollout.py tokenizes them."""
    from search import format_docs
    prompt = tok(build_prompt(tok, QUESTION["question"]), add_special_tokens=False).input_ids
    obs = f"\n\n<information>{format_docs(retriever.docs).strip()}</information>\n\n"
    parts = [(prompt, 0), (tok(TURN1, add_special_tokens=False).input_ids, 1),
             (tok(obs, add_special_tokens=False).input_ids, 0), (tok(TURN2, add_special_tokens=False).input_ids, 1)]
    return parts


def teach(model, rows: list[tuple[list[int], list[int]]], steps=150, lr=3e-3) -> float:
    """Overfit the tiny model on (token ids, mask) rows: it learns to write each token whose mask is 1 after the
    tokens before it. Rows are right-padded (a causal model's earlier positions never see the padding), and only
    the masked positions go through the vocabulary-sized head, so this takes seconds. Returns the last loss."""
    n = max(len(ids) for ids, _ in rows)
    x = torch.tensor([ids + [0] * (n - len(ids)) for ids, _ in rows])
    keep = torch.tensor([mask[1:] + [0] * (n - len(mask)) for _, mask in rows], dtype=torch.bool)  # j predicts j+1
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        hidden = model.get_decoder()(input_ids=x).last_hidden_state[:, :-1][keep]
        loss = torch.nn.functional.cross_entropy(model.get_output_embeddings()(hidden), x[:, 1:][keep])
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    return loss.item()


def min_margin(model, ids: list[int], mask: list[int]) -> float:
    """The smallest lead, in logits, of each masked token over the runner-up, given the tokens before it."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(ids[1:])[:, None]
    lead = logits.gather(1, target)[:, 0] - logits.scatter(1, target, -float("inf")).max(1).values
    return lead[torch.tensor(mask[1:], dtype=torch.bool)].min().item()


@pytest.fixture(scope="module")
def taught(tok):
    """A tiny model that has memorised one search-then-answer trajectory, each of its own tokens by a margin
    that float rounding (~1e-5 here) cannot overturn: greedy decoding reproduces it on any CPU."""
    model = M.tiny_model("llama", vocab_size=len(tok), seed=1)
    parts = scripted_ids(tok, ScriptedRetriever())
    ids, mask = [i for p, _ in parts for i in p], [m for p, m in parts for _ in p]
    assert teach(model, [(ids, mask)]) < 0.05 and min_margin(model, ids, mask) > 1.0
    return model


@pytest.fixture(scope="module")
def scripted(tok):
    """Per question, a search turn then an answer turn: the same tokens on every CPU."""
    return ScriptedLM(tok, {QUESTION["question"]: [TURN1, TURN2],
                            "Who painted the Mona Lisa?": ["<search> mona lisa </search>",
                                                           "<answer> Leonardo da Vinci </answer>"]})


def test_loss_mask_is_one_exactly_on_policy_tokens(tok, taught):
    retriever = ScriptedRetriever()
    parts = scripted_ids(tok, retriever)
    all_ids = [i for ids, _ in parts for i in ids]
    model = taught
    cfg = RolloutConfig(temperature=0, max_turns=2)
    [t] = rollout(model, tok, [QUESTION], retriever, cfg)
    expected_mask = [m for ids, m in parts for _ in ids]
    n = len(expected_mask)
    assert t.token_ids[:n] == all_ids
    assert t.loss_mask[:n] == expected_mask
    assert t.queries == ["capital of france"] and retriever.calls == [["capital of france"]]
    assert t.answer == "Paris" and t.finished and t.turns == 2
    assert t.n_generated == sum(t.loss_mask) and len(t.token_ids) == n


def test_retriever_failure_becomes_an_observation_not_a_crash(tok, scripted):
    retriever = ScriptedRetriever(fail=True)
    [t] = rollout(scripted, tok, [QUESTION], retriever, RolloutConfig(temperature=0, max_turns=2))
    assert len(t.observations) == 1 and t.observations[0].startswith("Search failed: ConnectionError")
    assert t.finished and t.answer == "Paris"  # the rollout went on to the next turn
    assert "Search failed" in tok.decode([i for i, m in zip(t.token_ids, t.loss_mask) if m == 0])


def test_empty_search_result_is_reported_as_no_results(tok, scripted):
    retriever = ScriptedRetriever(docs=[])
    [t] = rollout(scripted, tok, [QUESTION], retriever, RolloutConfig(temperature=0, max_turns=2))
    assert t.observations == ["No results found.\n"]


def test_slot_cache_gives_each_slot_the_logits_of_running_it_alone(tiny):
    """Slots of different lengths, prefills of a few slots while others wait, decode steps where some slots
    feed nothing, then dropping a slot: each slot's next-token logits equal a plain forward of its tokens."""
    torch.manual_seed(0)
    rows = [torch.randint(5, 200, (n,)).tolist() for n in (7, 12, 3)]
    cache = SlotCache(3)
    feed(tiny, cache, [0, 1, 2], rows, pad_id=0)
    feed(tiny, cache, [0, 1, 2], [[11], [], [12]], pad_id=0)     # slot 1 waits
    logits = feed(tiny, cache, [2, 0], [[13, 14, 15], [16]], pad_id=0)  # a prefill of two slots, in any order
    full = [rows[0] + [11, 16], rows[1], rows[2] + [12, 13, 14, 15]]
    for j, i in enumerate([2, 0]):
        ref = tiny(input_ids=torch.tensor([full[i]])).logits[0, -1]
        torch.testing.assert_close(logits[j], ref, atol=1e-4, rtol=1e-4)
    cache.keep([0, 2])  # dropping a finished slot keeps the others intact
    logits = feed(tiny, cache, [0, 1], [[20], [21]], pad_id=0)
    for j, (i, tokn) in enumerate([(0, 20), (2, 21)]):
        ref = tiny(input_ids=torch.tensor([full[i] + [tokn]])).logits[0, -1]
        torch.testing.assert_close(logits[j], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["tiny", "taught", "scripted"])
def test_continuous_batching_gives_the_same_greedy_trajectories_as_one_row_at_a_time(tok, which, request):
    """Slots that search, wait, finish and are refilled at different steps change nothing in what is sampled.
    (Both runs are on this machine; the scripted model makes the same trajectories on every machine.)"""
    policy = request.getfixturevalue(which)
    qs = [QUESTION, {**QUESTION, "id": "q2", "question": "Who painted the Mona Lisa?"}, {**QUESTION, "id": "q3"}]
    cfg = RolloutConfig(group_size=2, max_turn_tokens=30, max_total_tokens=120, temperature=0, max_turns=2)
    together = rollout(policy, tok, qs, ScriptedRetriever(), dataclasses.replace(cfg, batch_size=4))
    alone = rollout(policy, tok, qs, ScriptedRetriever(), dataclasses.replace(cfg, batch_size=1))
    assert [t.token_ids for t in together] == [t.token_ids for t in alone]
    assert [t.loss_mask for t in together] == [t.loss_mask for t in alone]
    # the taught model really searched where it was taught to (q1 and q3 ask its question; q2 is untaught)
    assert which == "tiny" or all(t.queries for t in together if t.question == QUESTION["question"])
    if which == "scripted":  # every slot wrote its own question's script
        assert [t.answer for t in together] == ["Paris"] * 2 + ["Leonardo da Vinci"] * 2 + ["Paris"] * 2


def test_a_slot_copied_from_a_sibling_continues_exactly_like_it(tiny):
    """SlotCache.copy: a slot that starts from its sibling's cached prompt predicts what the sibling predicts."""
    prompt = torch.randint(0, 256, (17,)).tolist()
    cache = SlotCache(2)
    want = feed(tiny, cache, [0], [prompt], 0)[0]
    cache.copy(0, 1, len(prompt) - 1)                      # all but the last token, which slot 1 feeds itself
    torch.testing.assert_close(feed(tiny, cache, [1], [prompt[-1:]], 0)[0], want)
    both = feed(tiny, cache, [0, 1], [[5], [5]], 0)
    torch.testing.assert_close(both[0], both[1])


class FirstQueryGetsMoreRetriever(ScriptedRetriever):
    """The first query of each call gets a long result, so that trajectory runs out of tokens and ends first."""

    def search(self, queries, k=3):
        return [DOCS * 12 if i == 0 else DOCS for i, _ in enumerate(queries)]


def test_siblings_prefill_their_shared_prompt_once(tok, scripted, monkeypatch):
    """Four trajectories share one prompt, three slots. The three admitted together prefill it once; the fourth,
    admitted when the first ends while the others still run, copies a running sibling's keys and values, and
    then decodes exactly what a trajectory that prefilled the prompt itself decodes. (The scripted model reads
    its prompt back from the cache to choose its script: a bad copy would make it write something else.)"""
    import rollout as R
    fed = []
    monkeypatch.setattr(R, "feed", lambda m, c, slots, chunks, pad: fed.append(chunks) or feed(m, c, slots, chunks, pad))
    cfg = RolloutConfig(group_size=4, max_turn_tokens=30, max_total_tokens=90, temperature=0, batch_size=3)
    trajs = rollout(scripted, tok, [QUESTION], FirstQueryGetsMoreRetriever(), cfg)
    prompt = trajs[0].token_ids[:trajs[0].prompt_len]
    assert sum(c == prompt for chunks in fed for c in chunks) == 1
    assert trajs[0].truncated and trajs[1].finished        # the long result ended the first one early
    assert trajs[3].token_ids == trajs[0].token_ids        # searched alone: first in its call, so a long result
    assert trajs[1].token_ids == trajs[2].token_ids


def test_random_model_is_bounded_by_the_token_budget_and_never_answers_from_the_prompt(tok, tiny):
    cfg = RolloutConfig(group_size=3, max_turn_tokens=20, max_total_tokens=50, temperature=1.0)
    trajs = rollout(tiny, tok, [QUESTION, {**QUESTION, "id": "q2"}], ScriptedRetriever(), cfg)
    assert [t.qid for t in trajs] == ["q1"] * 3 + ["q2"] * 3
    for t in trajs:
        assert isinstance(t, Trajectory)
        assert len(t.token_ids) - t.prompt_len <= cfg.max_total_tokens
        assert t.answer is None  # the prompt's "<answer> Beijing </answer>" example is never taken
        assert len(t.token_ids) == len(t.loss_mask) and sum(t.loss_mask) == t.n_generated


def test_same_seed_gives_the_same_trajectories(tok, tiny):
    cfg = RolloutConfig(group_size=2, max_turn_tokens=10, max_total_tokens=30, seed=3)
    a = rollout(tiny, tok, [QUESTION], ScriptedRetriever(), cfg)
    b = rollout(tiny, tok, [QUESTION], ScriptedRetriever(), cfg)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]


def test_last_tag_takes_the_last_closed_tag():
    assert last_tag("<answer> a </answer> x <answer>b</answer>", "answer") == "b"
    assert last_tag("<answer> unclosed", "answer") is None


def test_every_policy_token_is_the_greedy_choice_given_its_full_recorded_prefix(tok):
    """The cache must hold exactly what the trajectory records, across turns and observations. "The greedy
    choice" up to 1e-3 in logits: the cached and the full forward round differently, so a near tie (the top two
    can be 1e-4 apart) may go either way; a wrong cache puts the written token far below the top (the logits
    here have a spread of ~2.4, the top two are typically 0.3 apart)."""
    model = M.tiny_model("llama", vocab_size=len(tok), seed=2)
    with torch.no_grad():  # sharper weights, so the argmax depends on context
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    cfg = RolloutConfig(temperature=0, max_turns=2, max_turn_tokens=8, max_total_tokens=200)
    [t] = rollout(model, tok, [QUESTION], ScriptedRetriever(docs=[]), cfg)
    ids = torch.tensor([t.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    policy = [j for j, m in enumerate(t.loss_mask) if m]
    assert t.turns >= 2 and policy
    assert all(logits[j - 1, t.token_ids[j]] >= logits[j - 1].max() - 1e-3 for j in policy)


# ----------------------------------------------------------------------------- bad model output

CFG = RolloutConfig(max_turns=2, max_total_tokens=200)


def fresh():
    return Trajectory("q1", QUESTION["question"], [0] * 10, [0] * 10, 10)


@pytest.mark.parametrize("text", [
    "<think> I should look. </think>\n<search> capital of fr",   # unclosed search (cut by max_turn_tokens)
    "<think> sure </think>\n<answer> Paris",                     # unclosed answer
    "<search> </search>",                                         # empty query
    "<search>\n\t</search>",                                      # whitespace-only query
    "<think> no tags at all",                                     # neither
])
def test_unclosed_tags_and_empty_queries_are_counted_invalid_actions(text):
    t = fresh()
    assert _act(t, text, CFG) == "invalid"
    assert t.invalid_actions == 1 and t.queries == [] and t.answer is None and not t.finished


def test_a_2000_character_query_is_searched_cut_to_300_characters():
    t, query = fresh(), ("capital of france " * 120)[:2000]
    assert _act(t, f"<search> {query} </search>", CFG) == "search"
    assert t.queries == [query.strip()[:300]] and t.invalid_actions == 0


def test_an_answer_before_any_search_ends_the_trajectory_as_answered():
    t = fresh()
    assert _act(t, "<think> I know it. </think>\n<answer> Paris </answer>", CFG) == "answer"
    assert t.answer == "Paris" and t.finished and t.queries == [] and t.turns == 1


def test_out_of_turns_ends_without_answer_and_out_of_tokens_is_truncated():
    t = fresh()
    t.turns = CFG.max_turns                # the last, search-disabled turn
    assert _act(t, "<search> more </search>", CFG) == "end" and t.answer is None and not t.truncated
    t = fresh()
    t.token_ids += [1] * (CFG.max_total_tokens - 5)  # 5 tokens of room left
    assert _act(t, "<search> more </search>", CFG) == "end" and t.truncated and t.queries == []


def test_a_model_that_only_emits_empty_searches_is_stopped_by_max_turns_and_counted(tok):
    """A model that answers every turn with "<search> </search>": no search, no crash, every bad turn counted."""
    from eval import evaluate
    model = ScriptedLM(tok, {QUESTION["question"]: ["<search> </search>"] * 3})  # max_turns, then the last turn
    retriever = ScriptedRetriever()
    cfg = RolloutConfig(max_turns=2, max_turn_tokens=20, max_total_tokens=200)
    metrics, records = evaluate(model, tok, [QUESTION, {**QUESTION, "id": "q2"}], retriever, "agent", cfg)
    assert retriever.calls == [] and metrics["searches_per_q"] == 0 and metrics["em"] == 0
    assert metrics["invalid_actions"] == 2 * 2 and metrics["truncated"] == 0  # max_turns invalid turns each
    assert all(r["turns"] == 3 and r["answer"] is None and not r["finished"] for r in records)
    assert all(r["response"].startswith("<search> </search>") for r in records)


def test_a_model_that_never_stops_is_truncated_by_the_token_budget_and_counted(tok):
    from eval import evaluate
    model = ScriptedLM(tok, {QUESTION["question"]: ["<think> " + "and then " * 100]})  # no stop in 200 tokens
    cfg = RolloutConfig(max_turns=4, max_turn_tokens=500, max_total_tokens=60)
    metrics, records = evaluate(model, tok, [QUESTION, {**QUESTION, "id": "q2"}], ScriptedRetriever(), "agent", cfg)
    assert metrics["truncated"] == 2 and metrics["answered"] == 0
    assert all(r["generated_tokens"] <= cfg.max_total_tokens and r["turns"] == 1 for r in records)


def test_retriever_http_errors_are_observed_or_stop_the_rollout_as_configured(tok, scripted):
    """Against a real local server (tests/test_search.py) that rejects every request."""
    from search import BM25, HTTPRetriever, RetrieverError
    from test_search import serve
    bm25 = BM25([{"id": "7", "contents": '"Paris"\nParis is the capital of France.'}])
    cfg = RolloutConfig(temperature=0, max_turns=2)
    with serve(bm25, mode="400") as (url, state):
        retriever = HTTPRetriever(url, retries=0)
        [t] = rollout(scripted, tok, [QUESTION], retriever, cfg)
        assert t.observations[0].startswith(f"Search failed: RetrieverError: retriever {url} rejected the request: "
                                            "HTTP 400")
        with pytest.raises(RetrieverError, match="HTTP 400"):
            rollout(scripted, tok, [QUESTION], retriever, dataclasses.replace(cfg, on_search_error="stop"))
    assert state["requests"] == 2


def test_the_baselines_take_an_untagged_reply_as_the_answer_the_agent_does_not(tok):
    """As FlashRAG's generation baselines: a direct (or RAG) reply without <answer> tags is the answer, special
    tokens stripped; the agent's protocol stays strict."""
    from eval import evaluate
    q2 = {"id": "q2", "question": "Who painted the Mona Lisa?", "golden_answers": ["Leonardo da Vinci"]}
    replies = {QUESTION["question"]: ["Paris"], q2["question"]: ["<answer> Leonardo da Vinci </answer>"]}
    cfg = RolloutConfig(max_turn_tokens=20, max_total_tokens=60)
    metrics, records = evaluate(ScriptedLM(tok, replies, "direct"), tok, [QUESTION, q2], ScriptedRetriever(),
                                "direct", cfg)
    assert [r["answer"] for r in records] == ["Paris", "Leonardo da Vinci"] and metrics["em"] == 1.0
    _, records = evaluate(ScriptedLM(tok, {QUESTION["question"]: ["<search> </search>", "Paris"]}), tok, [QUESTION],
                          ScriptedRetriever(), "agent", RolloutConfig(max_turns=1, max_turn_tokens=20,
                                                                      max_total_tokens=80))
    assert records[0]["turns"] == 2 and records[0]["response"].endswith("Paris<|im_end|>")  # an untagged last turn
    assert records[0]["answer"] is None and records[0]["em"] == 0.0
