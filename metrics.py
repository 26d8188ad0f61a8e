"""Answer metrics: exact match (the only reward, as in Search-R1 and Search-E1) and token F1.

The reward in Search-E1 (arXiv 2605.22511) is exact match against the gold answers and nothing else: no
format bonus. Normalisation follows SQuAD / FlashRAG: NFKC, lowercase, strip punctuation, drop a/an/the,
collapse spaces. A leaf: the question generator (data/questions.py), the trainers and eval.py all score
answers with these functions, so it imports nothing from the project.
"""
import re
import string
import unicodedata
from collections import Counter

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).lower().translate(_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str | None, golden_answers: list[str]) -> float:
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golden_answers))


def f1_score(prediction: str | None, golden_answers: list[str]) -> float:
    """Token-overlap F1, max over gold answers (FlashRAG's definition)."""
    if prediction is None:
        return 0.0
    best = 0.0
    p_toks = normalize_answer(prediction).split()
    for g in golden_answers:
        g_toks = normalize_answer(g).split()
        common = sum((Counter(p_toks) & Counter(g_toks)).values())
        if common == 0:
            continue
        prec, rec = common / len(p_toks), common / len(g_toks)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best
