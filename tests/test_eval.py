"""eval.py and metrics.py: SQuAD/FlashRAG exact match and F1, per-kind and per-hop metrics, the CLI's tables and
trajectories, and its errors."""
import json

import pytest

from data.load import load_qa
from eval import BENCHMARKS, by_hop, by_kind, fetch_benchmark, main
from metrics import exact_match, f1_score, normalize_answer


def test_normalisation_lowercases_strips_punctuation_and_articles():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("theory") == "theory"  # 'the' only as a whole word


def test_exact_match_takes_any_gold_answer():
    assert exact_match("the Beatles", ["Beatles", "The Fab Four"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match(None, ["Paris"]) == 0.0


def test_unicode_is_normalised_before_matching():
    assert exact_match("Göbekli Tepe", ["göbekli tepe"]) == 1.0
    assert exact_match("ﬁve", ["five"]) == 1.0  # NFKC folds the ligature


def test_f1_is_token_overlap_max_over_gold():
    assert f1_score("Stanley Kubrick", ["Kubrick"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("the cat sat", ["a dog", "cat sat down"]) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert f1_score("nothing", ["else"]) == 0.0 and f1_score(None, ["x"]) == 0.0


def test_cli_prints_the_table_writes_readable_trajectories_and_ends_with_json(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "question": "In what year was Ada Lovelace born?", "golden_answers": ["1815"]},
        {"id": "b", "question": "What is the capital of Peru?", "golden_answers": ["Lima"]}]) + "\n")
    results = main(["--data", str(data), "--modes", "rule,direct", "--out_dir", str(tmp_path / "run")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == results
    for mode in ("rule", "direct"):
        assert {"em", "f1", "n", "searches_per_q"} <= set(results[mode]) and results[mode]["n"] == 2
        rec = json.loads((tmp_path / "run" / f"{mode}.jsonl").read_text().splitlines()[0])
        assert {"question", "answer", "golden_answers", "em"} <= set(rec)


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "question": "q?"}\n', "golden_answers"),
    ('{"id": "a", "question": "q?", "golden_answers": ["x"]}\nnot json\n', ":2"),
    ("", "empty"),
])
def test_cli_rejects_bad_data_naming_the_file_and_line(tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    with pytest.raises(ValueError, match=message):
        main(["--data", str(data), "--modes", "rule", "--out_dir", str(tmp_path / "run")])


def test_benchmark_names_use_search_r1_splits_and_offline_fail_naming_the_fix(tmp_path):
    assert {n for n, split in BENCHMARKS.items() if split == "dev"} == {"hotpotqa", "2wikimultihopqa", "musique"}
    assert len(BENCHMARKS) == 7
    try:
        path = fetch_benchmark("bamboogle", cache_dir=tmp_path, timeout=10)
    except RuntimeError as e:  # this machine has no network: the message says what to do instead
        assert "needs network access" in str(e) and "local" in str(e) and "bamboogle/test.jsonl" in str(e)
        assert not list(tmp_path.iterdir())  # nothing half-written
    else:  # with network: Search-R1's Bamboogle test split, 125 questions, readable as is
        assert path.name == "bamboogle_test.jsonl" and len(load_qa(path)) == 125


def test_unknown_data_name_is_rejected_listing_the_benchmarks(capsys):
    with pytest.raises(SystemExit):
        main(["--data", "nq2", "--modes", "rule"])
    assert "musique" in capsys.readouterr().err


def test_several_data_files_print_the_papers_table_one_column_each_and_the_average(tmp_path, capsys):
    rows = {"easy": ("Victor Hugo", "Victor Hugo"), "hard": ("Victor Hugo", "nobody")}  # rule: top title
    for name, (question, gold) in rows.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": "1", "question": question,
                                                            "golden_answers": [gold]}) + "\n")
    data = f"{tmp_path / 'easy.jsonl'},{tmp_path / 'hard.jsonl'}"
    results = main(["--data", data, "--modes", "rule", "--out_dir", str(tmp_path / "run")])
    assert results["easy"]["rule"]["em"] == 1.0 and results["hard"]["rule"]["em"] == 0.0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("EM "))
    assert out[header].split() == ["EM", "easy", "hard", "avg"]
    assert out[header + 1].split() == ["rule", "1.000", "0.000", "0.500"]
    assert (tmp_path / "run" / "eval_easy" / "rule.jsonl").exists()


def _record(kind, em, n_searches):
    return {"kind": kind, "em": em, "f1": em, "answer": "x", "searches": [{}] * n_searches, "generated_tokens": 10,
            "invalid_actions": 0, "truncated": False}


def test_per_kind_and_per_hop_metrics_by_hand():
    records = [_record("birth_year", 1.0, 1), _record("birth_year", 0.0, 2), _record("bridge_capital", 1.0, 2),
               _record("bridge_birth_year", 0.0, 3), _record(None, 1.0, 0)]  # the last: a row without a kind
    kinds = by_kind(records)
    assert list(kinds) == ["birth_year", "bridge_birth_year", "bridge_capital"]
    assert [(m["n"], m["em"], m["searches_per_q"]) for m in kinds.values()] == [(2, 0.5, 1.5), (1, 0.0, 3.0),
                                                                                 (1, 1.0, 2.0)]
    hops = by_hop(records)
    assert (hops["hop1"]["n"], hops["hop1"]["em"], hops["hop1"]["searches_per_q"]) == (2, 0.5, 1.5)
    assert (hops["hop2"]["n"], hops["hop2"]["em"], hops["hop2"]["searches_per_q"]) == (2, 0.5, 2.5)
    assert by_hop(records[:2])["hop2"]["n"] == 0 and by_hop(records[-1:]) == {} and by_kind(records[-1:]) == {}


def test_cli_prints_em_and_searches_per_kind_and_per_hop_when_questions_have_kinds(tmp_path, capsys):
    data = tmp_path / "kinds.jsonl"  # the rule agent answers the top title: right for the first only
    data.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "question": "Victor Hugo", "golden_answers": ["Victor Hugo"], "kind": "riddle"},
        {"id": "b", "question": "Victor Hugo", "golden_answers": ["nobody"], "kind": "bridge_capital"}]) + "\n")
    main(["--data", str(data), "--modes", "rule", "--out_dir", str(tmp_path / "run")])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["kind"] == ["n", "rule", "EM", "search/q"]
    assert rows["riddle"] == ["1", "1.000", "1.00"] and rows["bridge_capital"] == ["1", "0.000", "1.00"]
    assert rows["hop1"] == ["1", "1.000", "1.00"] and rows["hop2"] == ["1", "0.000", "1.00"]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "run" / "rule.jsonl").read_text().splitlines()]
    assert kinds == ["riddle", "bridge_capital"]


def test_the_generated_splits_are_named_by_split(capsys):
    from data.load import QUESTIONS_DIR
    results = main(["--data", "dev", "--modes", "rule", "--limit", "5"])
    assert results["rule"]["n"] == 5
    dev = load_qa(QUESTIONS_DIR / "dev.jsonl", limit=5)
    assert f"on {QUESTIONS_DIR / 'dev.jsonl'} (n=5)" in capsys.readouterr().out and dev[0]["id"].startswith("dv")
    with pytest.raises(SystemExit):
        main(["--data", "valid", "--modes", "rule"])
    assert "not a split (train, dev, test)" in capsys.readouterr().err
