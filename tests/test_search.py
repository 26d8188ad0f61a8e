"""Tests for search.py: the numpy BM25 against the real rank_bm25, the corpus loader, the Search-R1
rendering, and the HTTP client against a real local server (no mocks)."""
import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from search import (BM25, Doc, HTTPRetriever, ReferenceBM25, RetrieverError, format_docs, information,  # noqa: E402
                    get_retriever, load_corpus, split_title, tokenize)

REAL_CORPUS = ROOT / "data/cache/corpus.jsonl"

# "the" and "is" are in more than half the docs, so their idf is negative and gets the epsilon
# floor; docs 28/29 duplicate docs 0/1 so exact score ties must break by corpus position.
SMALL = [
    ("Paris", "Paris is the capital of France and its largest city."),
    ("Berlin", "Berlin is the capital of Germany."),
    ("Rome", "Rome is the capital of Italy; the Eternal City."),
    ("Madrid", "Madrid is the capital and largest city of Spain."),
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron tower in Paris."),
    ("Colosseum", "The Colosseum is an amphitheatre in the centre of Rome."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare."),
    ("Macbeth", "Macbeth is a tragedy by Shakespeare about a Scottish king."),
    ("William Shakespeare", "Shakespeare was an English playwright, poet and actor."),
    ("Python (language)", "Python is a programming language created by Guido van Rossum."),
    ("NumPy", "NumPy is the fundamental package for array computing in Python."),
    ("Moon", "The Moon is the only natural satellite of the Earth."),
    ("Mars", "Mars is the fourth planet from the Sun, the red planet."),
    ("Jupiter", "Jupiter is the largest planet in the Solar System."),
    ("Sun", "The Sun is the star at the centre of the Solar System."),
    ("Water", "Water is H2O, a liquid at room temperature."),
    ("Gold", "Gold is a chemical element with the symbol Au."),
    ("Iron", "Iron is a chemical element with the symbol Fe; wrought iron is worked iron."),
    ("Amazon River", "The Amazon is the largest river by discharge volume of water."),
    ("Nile", "The Nile is a major river in northeastern Africa."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level."),
    ("Beethoven", "Ludwig van Beethoven was a German composer and pianist."),
    ("Mozart", "Wolfgang Amadeus Mozart was a prolific composer of the Classical period."),
    ("Tokyo", "Tokyo is the capital of Japan."),
    ("Café", "A café is an establishment that serves coffee; Café Müller is in Köln."),
    ("Piano", "The piano is a keyboard instrument; Beethoven and Mozart wrote for the piano."),
    ("Chess", "Chess is a board game for two players."),
    ("Go (game)", "Go is an abstract strategy board game for two players."),
    ("Paris", "Paris is the capital of France and its largest city."),
    ("Berlin", "Berlin is the capital of Germany."),
]

SMALL_QUERIES = [
    "", "   ", "?!.", "capital of France", "the the the", "capital capital", "Paris paris PARIS",
    "xyzzy", "xyzzy plugh", "xyzzy capital", "who wrote Hamlet?", "largest planet in the solar system",
    "café müller köln", "CAFÉ", "board game for two players", "the", "is", "the is a",
    "wrought iron tower", "Beethoven Mozart piano composer", "river water volume", "H2O",
] + [t for t, _ in SMALL] + [x for _, x in SMALL]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_docs(tmp_path_factory):
    rows = [{"id": f"d{i}", "contents": f'"{t}"\n{x}'} for i, (t, x) in enumerate(SMALL)]
    return load_corpus(write_jsonl(tmp_path_factory.mktemp("c") / "small.jsonl", rows))


@pytest.fixture(scope="module")
def small_bm25(small_docs):
    return BM25(small_docs)


def assert_same_results(got, want):
    assert len(got) == len(want)
    for q_got, q_want in zip(got, want):
        assert [d.id for d in q_got] == [d.id for d in q_want]
        assert [d.score for d in q_got] == pytest.approx([d.score for d in q_want], abs=1e-6, rel=0)


@pytest.mark.parametrize("k", [1, 3, 5, 30, 50])
def test_fast_bm25_matches_rank_bm25_on_small_corpus(small_docs, small_bm25, k):
    assert_same_results(small_bm25.search(SMALL_QUERIES, k=k), ReferenceBM25(small_docs).search(SMALL_QUERIES, k=k))


def test_fast_bm25_scores_equal_rank_bm25_scores_for_every_doc(small_docs, small_bm25):
    ref = ReferenceBM25(small_docs).bm25
    for q in SMALL_QUERIES:
        assert small_bm25.scores(q).tolist() == pytest.approx(ref.get_scores(tokenize(q)).tolist(), abs=1e-9)


def test_ties_break_by_corpus_position(small_bm25):
    (hits,) = small_bm25.search(["capital of Germany"], k=2)
    assert [d.id for d in hits] == ["d1", "d29"] and hits[0].score == hits[1].score


def test_repeated_query_token_counts_twice(small_bm25):
    once, twice = small_bm25.scores("hamlet"), small_bm25.scores("hamlet hamlet")
    assert twice.max() == pytest.approx(2 * once.max())


def test_empty_and_unknown_queries_return_no_docs(small_docs, small_bm25):
    for q in ["", "   ", "xyzzy", "?!"]:
        assert small_bm25.search([q], k=3) == [[]]
        assert ReferenceBM25(small_docs).search([q], k=3) == [[]]


def test_fast_bm25_matches_rank_bm25_on_real_corpus():
    if not REAL_CORPUS.exists():
        pytest.skip(f"{REAL_CORPUS} missing; run python data/prepare.py")
    docs = load_corpus(REAL_CORPUS)
    rng = random.Random(0)
    queries = ["", "qqzxnotaword"]
    for _ in range(198):
        title, text = split_title(rng.choice(docs)["contents"])
        sentences = re.split(r"(?<=[.!?])\s+", text)
        queries.append(rng.choice([title, rng.choice(sentences), title + " zzunknownzz " + title]))
    assert_same_results(BM25(docs).search(queries, k=3), ReferenceBM25(docs).search(queries, k=3))


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("Who wrote 'Hamlet'? (1603)") == ["who", "wrote", "hamlet", "1603"]
    assert tokenize("Café Müller, KÖLN!") == ["café", "müller", "köln"]
    assert tokenize("") == [] and tokenize(" .,;! ") == []


def test_split_title_strips_quotes_and_handles_missing_title():
    assert split_title('"Paris"\nParis is a city.\nMore.') == ("Paris", "Paris is a city.\nMore.")
    assert split_title("no title line") == ("", "no title line")


def test_load_corpus_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "a", "contents": "x"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(p))}:2: invalid JSON"):
        load_corpus(p)


def test_load_corpus_missing_contents_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "contents": "x"}, {"id": "b", "text": "y"}])
    with pytest.raises(ValueError, match=rf'{re.escape(str(p))}:2: .*"contents"'):
        load_corpus(p)


def test_load_corpus_non_object_line_and_non_string_contents_name_file_and_line(tmp_path):
    for bad in ('"just a string"', '{"id": "b", "contents": 7}'):
        p = tmp_path / "c.jsonl"
        p.write_text('{"id": "a", "contents": "x"}\n\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf'{re.escape(str(p))}:3: expected an object with a string "contents"'):
            load_corpus(p)


def test_load_corpus_names_file_and_line_of_bytes_that_are_not_utf8(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"id": "a", "contents": "x"}\n{"id": "b", "contents": "Caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(p))}:2: not UTF-8"):
        load_corpus(p)


def test_load_corpus_empty_file_errors(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n")
    with pytest.raises(ValueError, match="empty corpus"):
        load_corpus(p)


def test_load_corpus_duplicate_ids_name_both_lines(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "contents": "x"}, {"id": "b", "contents": "y"}, {"id": "a", "contents": "z"}])
    with pytest.raises(ValueError, match=r":3: duplicate id 'a' \(first seen at line 1\)"):
        load_corpus(p)


def test_load_corpus_missing_id_uses_position(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"contents": "x"}, {"contents": "y"}])
    assert [d["id"] for d in load_corpus(p)] == ["0", "1"]


def test_format_docs_renders_search_r1_lines():
    docs = [Doc("1", "Paris", "Paris is a city.", 2.0), Doc("2", "Rome", "Rome too.", 1.0)]
    assert format_docs(docs) == 'Doc 1(Title: "Paris") Paris is a city.\nDoc 2(Title: "Rome") Rome too.\n'
    assert format_docs([]) == "No results found.\n"


def test_a_cut_information_block_keeps_its_closing_tag(tok):
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    short = information(enc, "Doc 1(Title: \"Paris\") Paris is a city.\n", 256)
    assert short == enc("\n\n<information>Doc 1(Title: \"Paris\") Paris is a city.</information>\n\n")  # uncut: as is
    docs = "Doc 1(Title: \"Rome\") " + "Rome is old. " * 200
    assert "</information>" not in tok.decode(enc(f"\n\n<information>{docs}</information>\n\n")[:64])  # a plain cut
    cut = tok.decode(information(enc, docs, 64))
    assert len(information(enc, docs, 64)) == 64 and cut.startswith("\n\n<information>Doc 1(Title: \"Rome\") Rome")
    assert cut.endswith("</information>\n\n") and cut.count("</information>") == 1


def test_get_retriever_missing_corpus_points_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="data/prepare.py"):
        get_retriever(corpus=str(tmp_path / "nope.jsonl"))
    assert isinstance(get_retriever(url="http://127.0.0.1:1/retrieve"), HTTPRetriever)


def test_cli_prints_top_k(tmp_path, small_docs):
    p = write_jsonl(tmp_path / "c.jsonl", small_docs)
    out = subprocess.run([sys.executable, str(ROOT / "search.py"), "who wrote hamlet", "--corpus", str(p), "-k", "2"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith('Doc 1(Title: "Hamlet") Hamlet is a tragedy') and out.stdout.count("\n") == 2
    assert "index" in out.stderr and "query" in out.stderr


# --- HTTPRetriever against a real server speaking Search-R1's /retrieve protocol ---------------

@contextlib.contextmanager
def serve(bm25, mode="ok", fail_first=0, delay=0.0):
    """Start a ThreadingHTTPServer on a free port. mode: ok | noscores | garbage | 400."""
    state = {"requests": 0}
    by_id = {d["id"]: d for d in bm25.docs}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            state["requests"] += 1
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(delay)
            if state["requests"] <= fail_first:
                return self.reply(500, b"boom")
            if mode == "400":
                return self.reply(400, b"bad request")
            if mode == "garbage":
                return self.reply(200, b'{"result": [[{"document"')
            hits = bm25.search(req["queries"], k=req["topk"])
            results = [[{"document": by_id[d.id], "score": d.score} for d in h] for h in hits]
            if mode == "noscores":
                results = [[r["document"] for r in hits] for hits in results]
            self.reply(200, json.dumps({"result": results}).encode())

        def reply(self, code, body):
            try:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timeout test)
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve", state
    finally:
        server.shutdown()
        server.server_close()


QUERIES = ["capital of France", "who wrote hamlet", "xyzzy", ""]


def test_http_retriever_returns_same_docs_as_local_bm25(small_bm25):
    with serve(small_bm25) as (url, _):
        assert HTTPRetriever(url).search(QUERIES, k=3) == small_bm25.search(QUERIES, k=3)


def test_http_retriever_accepts_results_without_scores(small_bm25):
    with serve(small_bm25, mode="noscores") as (url, _):
        got = HTTPRetriever(url).search(QUERIES, k=3)
    assert [[d.id for d in h] for h in got] == [[d.id for d in h] for h in small_bm25.search(QUERIES, k=3)]


def test_http_retriever_retries_server_errors_then_succeeds(small_bm25):
    with serve(small_bm25, fail_first=2) as (url, state):
        assert HTTPRetriever(url, retries=3, backoff=0.001).search(QUERIES) == small_bm25.search(QUERIES)
    assert state["requests"] == 3


def test_http_retriever_malformed_json_raises_after_retries(small_bm25):
    with serve(small_bm25, mode="garbage") as (url, state):
        with pytest.raises(RetrieverError, match=re.escape(url) + ".*3 attempts.*malformed"):
            HTTPRetriever(url, retries=2, backoff=0.001).search(QUERIES)
    assert state["requests"] == 3


def test_http_retriever_client_error_fails_without_retry(small_bm25):
    with serve(small_bm25, mode="400") as (url, state):
        with pytest.raises(RetrieverError, match="HTTP 400"):
            HTTPRetriever(url, retries=3, backoff=0.001).search(QUERIES)
    assert state["requests"] == 1


def test_http_retriever_refused_connection_raises():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed on exit: nothing listens there afterwards
    url = f"http://127.0.0.1:{port}/retrieve"
    with pytest.raises(RetrieverError, match=re.escape(url)):
        HTTPRetriever(url, retries=2, backoff=0.001).search(QUERIES)


def test_http_retriever_timeout_is_retried_then_raises(small_bm25):
    with serve(small_bm25, delay=0.5) as (url, state):
        t0 = time.perf_counter()
        with pytest.raises(RetrieverError, match=re.escape(url) + ".*2 attempts"):
            HTTPRetriever(url, timeout=0.1, retries=1, backoff=0.001).search(QUERIES)
        assert time.perf_counter() - t0 < 0.45
        assert state["requests"] == 2
