"""Retrieval for nano-search-e1: the search engine behind the agent's `<search> q </search>` calls.

Search-E1 (arXiv 2605.22511) follows Search-R1's protocol: every query the policy emits is answered
with the top-k passages, rendered as "Doc 1(Title: ...) text" lines inside <information>. This file
serves that part of the paper: a local BM25 over a FlashRAG-style jsonl corpus, and a client for
Search-R1's retrieval server (POST {"queries", "topk", "return_scores"}) when one is running.

BM25 is an exact, vectorised re-implementation of rank_bm25.BM25Okapi (same idf, same epsilon floor,
same floats): per-term weights are precomputed in an inverted index, so a query is a few array adds.
Results: the k highest-scoring docs with score > 0, ties broken by corpus position (lower first).
Docs with score <= 0 are never returned, so an empty query or one of only unknown words gives [].
Layering: above data/load.py only (read_jsonl); the agent (rollout.py) and the question generator sit above.
Run: python search.py "who wrote hamlet" [--corpus PATH] [--url URL] [-k 3]
"""
import argparse
import http.client
import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.load import read_jsonl

DEFAULT_CORPUS = Path(__file__).resolve().parent / "data/cache/corpus.jsonl"


@dataclass
class Doc:
    id: str
    title: str
    text: str
    score: float


def tokenize(text: str) -> list[str]:
    """Lowercase, keep unicode word runs (\\w+: letters, digits, _), drop everything else. No stemming
    or stopwords: BM25's idf (and its epsilon floor) already discounts the common words."""
    return re.findall(r"\w+", text.lower())


def split_title(contents: str) -> tuple[str, str]:
    """'"Title"\\ntext' -> ("Title", "text"). No newline -> ("", contents): a passage without a
    title line is all text, which is what the reader of the rendered docs needs."""
    title, newline, text = contents.partition("\n")
    if not newline:
        return "", contents
    return (title[1:-1] if len(title) >= 2 and title[0] == title[-1] == '"' else title), text


def load_corpus(path) -> list[dict]:
    """Read a jsonl corpus of {"id", "contents"} objects. Blank lines are skipped. A missing "id"
    becomes the record's 0-based position in the returned list, as a string. Every problem (bytes that
    are not UTF-8, invalid JSON, no string "contents", a duplicate id, no documents at all) is a
    ValueError naming the file and line."""
    docs, seen = [], {}
    for lineno, where, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("contents"), str):
            raise ValueError(f'{where}: expected an object with a string "contents" field, got {json.dumps(obj)[:80]!r}')
        obj["id"] = str(obj.get("id", len(docs)))
        if obj["id"] in seen:
            raise ValueError(f"{where}: duplicate id {obj['id']!r} (first seen at line {seen[obj['id']]})")
        seen[obj["id"]] = lineno
        docs.append(obj)
    if not docs:
        raise ValueError(f'{path}: empty corpus; expected jsonl lines like {{"id": "0", "contents": "\\"Title\\"\\ntext"}}')
    return docs


def _to_doc(d: dict, score: float) -> Doc:
    title, text = split_title(d["contents"])
    return Doc(id=str(d["id"]), title=title, text=text, score=float(score))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best positive scores, score desc then index asc. argpartition alone would
    pick ties at the cut arbitrarily, so take everything >= the k-th value and sort that exactly."""
    pos = np.flatnonzero(scores > 0)
    if len(pos) > k:
        kth = np.partition(scores[pos], len(pos) - k)[len(pos) - k]
        pos = pos[scores[pos] >= kth]
    order = np.lexsort((pos, -scores[pos]))
    return pos[order[:k]]


class BM25:
    """BM25Okapi as an inverted index of precomputed weights: term -> (doc ids, idf * tf-part)."""

    def __init__(self, docs: list[dict], k1=1.5, b=0.75, epsilon=0.25):
        if not docs:
            raise ValueError("BM25 needs at least one document")
        self.docs = docs
        vocab, term_ids, doc_lens = {}, [], []
        for d in docs:
            toks = tokenize(d["contents"])
            # ids in first-seen order reproduce rank_bm25's dict order, so the idf sum below is
            # accumulated in the same order and the epsilon floor is the same float
            term_ids.append(np.fromiter((vocab.setdefault(t, len(vocab)) for t in toks), np.int64, len(toks)))
            doc_lens.append(len(toks))
        n, V, doc_len = len(docs), len(vocab), np.array(doc_lens, dtype=np.int64)
        tok_doc = np.repeat(np.arange(n, dtype=np.int64), doc_len)
        # sorting (term, doc) keys turns the token stream into CSR postings with tf counts in one go
        keys, tf = np.unique(np.concatenate(term_ids) * n + tok_doc, return_counts=True)
        term, doc = keys // n, keys % n
        df = np.bincount(term, minlength=V)
        self.avgdl = int(doc_len.sum()) / n
        idf = [math.log(n - f + 0.5) - math.log(f + 0.5) for f in df.tolist()]  # math.log, as rank_bm25
        idf_sum = 0.0
        for x in idf:  # a plain running sum like rank_bm25's (Python >= 3.12 sum() compensates)
            idf_sum += x
        eps = epsilon * (idf_sum / V) if V else 0.0
        idf = np.array([x if x >= 0 else eps for x in idf], dtype=np.float64)
        # the exact expression and operation order of BM25Okapi.get_scores, so weights match bit for bit
        dl = doc_len[doc]
        self.weights = idf[term] * (tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / self.avgdl)))
        self.doc_ids, self.offsets, self.vocab = doc, np.concatenate([[0], np.cumsum(df)]).tolist(), vocab
        # common words (df >= n/16) also get a dense row: adding 10k floats beats scattering into
        # most of them; the zeros elsewhere add exactly nothing, so scores stay bit-identical
        self.dense = {}
        for t in np.flatnonzero(df * 16 >= n).tolist():
            s, e = self.offsets[t], self.offsets[t + 1]
            self.dense[t] = row = np.zeros(n)
            row[doc[s:e]] = self.weights[s:e]

    @classmethod
    def from_jsonl(cls, path) -> "BM25":
        return cls(load_corpus(path))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every doc. Terms are added one by one in query order, as rank_bm25's
        running sum does, so the floats are identical; a repeated token counts twice, unknown 0."""
        scores = np.zeros(len(self.docs))
        for t in (self.vocab.get(w) for w in tokenize(query)):
            if t is None:
                continue
            if t in self.dense:
                scores += self.dense[t]
            else:  # doc ids are unique within a posting list, so plain fancy-index += is safe
                s, e = self.offsets[t], self.offsets[t + 1]
                scores[self.doc_ids[s:e]] += self.weights[s:e]
        return scores

    def search(self, queries: list[str], k: int = 3) -> list[list[Doc]]:
        # one query at a time: scoring is a per-token loop either way, and np.partition over a
        # (batch, n_docs) matrix measured slower than per-row partitions on the 10k corpus
        return [[_to_doc(self.docs[i], s[i]) for i in _top_k(s, k)] for s in map(self.scores, queries)]


class ReferenceBM25:
    """rank_bm25.BM25Okapi with our tokenizer and result rule: the yardstick for tests and bench."""

    def __init__(self, docs: list[dict], k1=1.5, b=0.75, epsilon=0.25):
        from rank_bm25 import BM25Okapi
        self.docs = docs
        self.bm25 = BM25Okapi([tokenize(d["contents"]) for d in docs], k1=k1, b=b, epsilon=epsilon)

    def search(self, queries: list[str], k: int = 3) -> list[list[Doc]]:
        out = []
        for s in (self.bm25.get_scores(tokenize(q)) for q in queries):
            order = np.argsort(-s, kind="stable")  # stable: equal scores keep corpus order
            out.append([_to_doc(self.docs[i], s[i]) for i in order[:k] if s[i] > 0])
        return out


class RetrieverError(RuntimeError):
    """The retrieval server could not answer (after retries, or at once for an HTTP 4xx)."""


class _Retry(Exception):
    """A failure worth another attempt: timeout, refused connection, HTTP 5xx, malformed JSON."""


class HTTPRetriever:
    """Client for Search-R1's retrieval server; `url` is the full endpoint, e.g.
    http://127.0.0.1:8000/retrieve. `retries` is the number of retries after the first attempt."""

    def __init__(self, url: str, timeout: float = 10.0, retries: int = 3, backoff: float = 0.5):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff

    def _post(self, queries: list[str], k: int):
        body = json.dumps({"queries": queries, "topk": k, "return_scores": True}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            if e.code >= 500:  # server trouble may pass; a 4xx is our request and will not
                raise _Retry(f"HTTP {e.code}") from None
            raise RetrieverError(f"retriever {self.url} rejected the request: HTTP {e.code} {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # URLError, refused, timeouts, resets
            raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        try:
            result = json.loads(raw)["result"]
            if not isinstance(result, list) or len(result) != len(queries):
                raise ValueError("expected one result list per query")
            # with return_scores each hit is {"document": {...}, "score": s}; without, a bare document
            return [[_to_doc(h.get("document", h), h.get("score", 0.0)) for h in hits] for hits in result]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _Retry(f"malformed response ({type(e).__name__}: {e}): {raw[:120]!r}") from None

    def search(self, queries: list[str], k: int = 3) -> list[list[Doc]]:
        for attempt in range(self.retries + 1):
            try:
                return self._post(list(queries), k)
            except _Retry as e:
                last = str(e)
                if attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
        raise RetrieverError(f"retriever {self.url} failed after {self.retries + 1} attempts; last error: {last}")


_CACHE: dict = {}


def get_retriever(corpus: str | None = None, url: str | None = None):
    """HTTPRetriever if url is given, else a BM25 over the corpus (built once per process)."""
    if url:
        return HTTPRetriever(url)
    path = Path(corpus) if corpus else DEFAULT_CORPUS
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} not found; run `python data/prepare.py` to build it, or pass --corpus")
    key = str(path.resolve())
    return _CACHE[key] if key in _CACHE else _CACHE.setdefault(key, BM25.from_jsonl(path))


def format_docs(docs: list[Doc]) -> str:
    """Render as Search-R1's _passages2string does. Search-R1 takes the raw first line of "contents"
    as the title, quotes included, so the quotes are put back: 'Doc 1(Title: "Paris") text'.
    No docs -> "No results found.\\n", so the policy sees an explicit answer, not an empty block."""
    return "".join(f'Doc {i}(Title: "{d.title}") {d.text}\n' for i, d in enumerate(docs, 1)) or "No results found.\n"


def information(enc, docs: str, max_tokens: int) -> list[int]:
    """A search's <information> block as token ids, at most max_tokens; a cut keeps the closing tag (departure:
    Search-R1 cuts the tag too; here most blocks are cut, and a trained policy answers an unclosed block with a
    stray </answer>, docs/experiments.md)."""
    whole = enc(f"\n\n<information>{docs.strip()}</information>\n\n")
    if len(whole) <= max_tokens:  # the common case tokenizes once, exactly as before the cut rule
        return whole
    tail = enc("</information>\n\n")
    return enc(f"\n\n<information>{docs.strip()}")[:max_tokens - len(tail)] + tail


def safe_search(retriever, queries: list[str], k: int, on_error: str = "observe") -> list[str]:
    """Rendered results per query. A retriever failure becomes an observation, never a crashed batch, unless
    on_error is "stop": then it is raised, since a run whose every search fails trains on noise."""
    try:
        return [format_docs(docs) for docs in retriever.search(queries, k)]
    except Exception as e:  # noqa: BLE001 - any backend fault is reported to the agent as text
        if on_error == "stop":
            raise
        return [f"Search failed: {type(e).__name__}: {str(e)[:200]}\n"] * len(queries)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="query the BM25 index (or a retrieval server)")
    ap.add_argument("query")
    ap.add_argument("--corpus", default=None, help=f"jsonl corpus (default {DEFAULT_CORPUS})")
    ap.add_argument("--url", default=None, help="Search-R1 retrieval endpoint, e.g. http://127.0.0.1:8000/retrieve")
    ap.add_argument("-k", type=int, default=3)
    args = ap.parse_args()
    try:
        t0 = time.perf_counter()
        retriever = get_retriever(args.corpus, args.url)
        t1 = time.perf_counter()
        (docs,), t2 = retriever.search([args.query], k=args.k), time.perf_counter()
    except (FileNotFoundError, ValueError, RetrieverError) as e:
        sys.exit(f"error: {e}")
    print(format_docs(docs), end="")
    print(f"[index {t1 - t0:.2f}s, query {(t2 - t1) * 1000:.1f}ms]", file=sys.stderr)
