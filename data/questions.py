"""The question generator: default train/dev/test QA for the self-evolution loop, built from the corpus.

Search-E1 (arXiv 2605.22511) trains on NQ/HotpotQA-style questions whose answers must be looked up; none
ship offline, so we generate them from the vital-article summaries, phrased from the articles' short
descriptions. Every gold answer is checked to appear in its source article(s), so reading the right
documents suffices. Most answers are spans (years, names, countries), not titles: with title answers,
"search the question, answer the top title" scores ~90% and leaves self-evolution nothing to learn.
  birth_year, death_year, took_office, event_start, work_year   "In what year was Bertolt Brecht born?"
  creator "Who wrote the novel Moby-Dick?"   country "In which country is Rosario?" -> Argentina
  capital, riddle (title answers)  "Who was the German playwright and poet born in the 1890s?"
  riddle_year   "In what year did the German playwright and poet born in the 1890s die?" -> 1956
  bridge_birth_year, bridge_death_year (2 searches: work -> creator) "In what year was the author of
      the novel Moby-Dick born?";  bridge_capital (place -> country) "What is the capital of the country
      where Rosario is?" -> Buenos Aires
Splits are by article: articles linked by a question (a work and its creator; a place, its country and
the capital) form one cluster, so no article's facts appear in two splits and bridges never straddle.
Layering: above data/load.py (summaries, article_text), metrics.py and search.py (the table's rule agent
and oracle); data/prepare.py runs it and writes the splits.
Run: python data/prepare.py   (builds the splits, prints the per-split table: counts, rule-agent EM, oracle)
"""
import hashlib
import random
import re
import unicodedata
from collections import Counter, defaultdict

from data.load import article_text, interleave_kinds, load_qa
from metrics import exact_match
from search import BM25

SEED = 1234
DEV_TEST_SIZE = 300       # eval splits are capped: an eval of a CPU policy must stay cheap
TRAIN_CAP_PER_KIND = 500  # so that no single template dominates what the policy learns from
BIG_CLUSTER = 15          # clusters this big (China and its cities) go to train: eval must not hinge on one country
# the kinds that take two searches, one per hop (work -> creator, place -> country): their ideal_queries hold
# two queries. eval.py reports them apart (by_hop) since multi-hop search is what self-evolution must learn.
TWO_HOP_KINDS = frozenset({"bridge_birth_year", "bridge_death_year", "bridge_capital"})

LIFE = re.compile(r"^(?P<desc>[^()\d;]*?),? \((?:born (?P<b1>\d{3,4})|(?P<b>\d{3,4})\s?[–-]\s?(?P<d>\d{3,4}))\)$")
# after an office ("Sultan of the Ottoman Empire (1520–1566)") the parentheses are a reign, not a life
REIGN = re.compile(r"^(King|Queen|Emperor|Empress|Sultan|Tsar|Pope|Caliph|Shah|Pharaoh|Duke|Grand|Prince|Princess|"
                   r"Khan|President|Archbishop|Patriarch|Count|Elector|Doge|Shogun)\b")
NOT_PERSON = re.compile(r"\b(dynasty|band|group|family|empire|conflict|depression|emergence|war|house|duo)\b", re.I)
WORK = re.compile(r"^(?P<year>\d{4}) (?P<type>[\w' -]+?) (?:(?:directed|written|composed|painted) )?by "
                  r"(?P<who>[A-Z][\w.'-]*(?: (?:[A-Z][\w.'-]*|de|da|van|von|der|del|du|la|le|y|ibn|al-\w+))*)$")
OFFICE = re.compile(r"^(?P<role>(?:King|Queen|Emperor|Empress|President|Prime Minister|Tsar|Sultan|Pope|"
                    r"Chancellor|Shah|Pharaoh|Caliph|Khan|Leader|Ruler|Supreme Leader|Grand Prince)\b.*?) "
                    r"from (?P<a>\d{3,4}) to \d{3,4}$")
EVENT = re.compile(r"(?:^(?P<a1>\d{4})(?:[–-]\d{4})? |\((?P<a2>\d{4})[–-]\d{4}\)$|from (?P<a3>\d{4}) to \d{4}$)")
EVENT_WORDS = re.compile(r"\b(War|Wars|Revolution|Battle|Siege|Crisis|Rebellion|Uprising|Invasion|Conquest|"
                         r"Famine|crisis|war|Reformation|Crusade|Campaign|Fall|Sack|Massacre|Revolt)\b")
CAPITAL = re.compile(r"^Capital(?: city| municipality| and (?:the )?(?:largest|most populous) city)? (?:of|in) "
                     r"(?:the )?(?P<of>.+)$")
PLACE = re.compile(r"^(?:City|Town|Metropolis|Capital|Largest city|River|Island|Mountain|Lake|University|"
                   r"Province|State|Region|Port city|Municipality|Prefecture|Commune|Volcano|Desert)\b.* "
                   r"(?:in|of) (?:the )?(?:[^,]+, )?(?P<country>[^,]+)$")
# work type's last word -> (verb for "who", verb for "when", role noun for the bridge)
WORK_TYPES = {**dict.fromkeys("novel novella book poem play tragedy comedy essay treatise epic story dialogue".split(),
                              ("wrote", "published", "author")),
              "film": ("directed", "released", "director"),
              **dict.fromkeys("painting fresco mural".split(), ("painted", "painted", "painter")),
              **dict.fromkeys("opera ballet composition symphony concerto oratorio suite".split(),
                              ("composed", "composed", "composer")),
              **dict.fromkeys("album single song".split(), ("recorded", "released", "performer"))}
COUNTRY_ALIASES = {"U.S.": "United States", "US": "United States", "UK": "United Kingdom"}
THE_WORDS = re.compile(r"\b(War|Wars|Revolution|Battle|Siege|Crisis|crisis|Rebellion|Uprising|Invasion|Conquest|"
                       r"Famine|Empire|Kingdom|Republic|dynasty|Caliphate|Sultanate|Reformation|Crusade|Campaign|"
                       r"Fall|Sack|Massacre|Revolt|war|period|United|Islands|Netherlands|Philippines|Mountains|Desert|"
                       r"River|Sea|Plateau|Plain|Peninsula|Basin|Range|Strait|Gulf|Canal|Alps)\b")


def bare(title: str) -> str:
    """'Jaws (film)' -> 'Jaws': disambiguators never appear in questions or answers."""
    return re.sub(r" \([^)]*\)$", "", title)


def with_the(name: str) -> str:
    """'Seven Years' War' -> 'the Seven Years' War'; 'World War II' and 'Lisbon' take no article."""
    return name if name.startswith(("The ", "World War", "Operation ", "Lake ", "Mount ")) or \
        not THE_WORDS.search(name) else "the " + name


def _words(s: str) -> str:
    """metrics.normalize_answer, except that EVERY non-word character becomes a space: it strips ASCII
    punctuation only, so "(1898–1956)" would stay one token. Inlined because normalize_answer is slow
    on whole passages; normalize_answer(_words(s)).strip() == _words(s).strip() holds by construction."""
    s = re.sub(r"[^\w\s]|_", " ", unicodedata.normalize("NFKC", s).lower())
    return " " + " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split()) + " "


def contains(text: str, answer: str) -> bool:
    """Does the answer occur in the text as whole words, after SQuAD normalisation?"""
    return _words(answer) in _words(text)


def extract_facts(S: dict) -> list[dict]:
    """Every candidate question, from every article, in sorted-title order (deterministic)."""
    titles = sorted(S)
    text = {t: _words(f"{t}\n{article_text(S[t])}") for t in titles}  # the corpus passage, normalised once
    desc = {t: S[t].get("description", "").strip() for t in titles}
    countries = {t for t in titles if re.match(r"^(Island |Landlocked )?[Cc]ountry in ", desc[t])}
    life = {t: m for t in titles if (m := LIFE.match(desc[t])) and S[t].get("topic") in ("People", "Uncategorized")
            and not REIGN.match(desc[t]) and not NOT_PERSON.search(desc[t])}
    capital_of = defaultdict(list)  # country -> capitals, from the capitals' own descriptions
    for t in titles:
        if (m := CAPITAL.match(desc[t])) and m["of"] in countries:
            capital_of[m["of"]].append(t)
    by_bare = defaultdict(list)
    for t in life:
        by_bare[bare(t)].append(t)
    # riddles give the description and only the DECADE of birth: the year would match "(1898–1956)" in
    # the passage and make BM25 top-1 right ~93% of the time; with the decade the agent must read the
    # dates. Unique by construction: no other person with all the clue words was born in that decade.
    decade = {t: (m["b"] or m["b1"])[:-1] + "0s" for t, m in life.items()}
    # "the 1800s" reads as the century: say "between 1800 and 1809" for those decades
    era = {t: f"between {d[:-1]} and {d[:-2]}9" if d.endswith("00s") else f"in the {d}" for t, d in decade.items()}
    person_words = {t: set(text[t].split()) for t in life}
    by_decade = defaultdict(list)
    for t in life:
        by_decade[decade[t]].append(t)
    # "Who was the Last president of..." -> "the last president": lowercase a description's first word
    # when descriptions use it lowercase mid-phrase ("German" never is, so it stays)
    common = {w for t in titles for w in desc[t].split()[1:] if w.islower()}
    clue = {t: (m["desc"][0].lower() + m["desc"][1:] if m["desc"].split()[0].lower() in common else m["desc"])
            for t, m in life.items()}
    Q = []

    def add(kind, question, answers, sources, queries):
        # answerable (every gold answer is in some source's text) and not given away by the question
        if all(any(_words(a) in text[s] for s in sources) for a in answers) and \
                not any(contains(question, a) for a in answers):
            Q.append({"question": question, "golden_answers": list(dict.fromkeys(answers)), "kind": kind,
                      "sources": sources, "ideal_queries": queries})

    def unique_riddle(t, clue):
        words = set(_words(clue).split()) - {"and", "of", "in", "from", "to", "s"}
        return len(words) >= 2 and all(p == t or not words <= person_words[p] for p in by_decade[decade[t]])

    for t in titles:
        name, d = bare(t), desc[t]
        if m := life.get(t):
            add("birth_year", f"In what year was {name} born?", [m["b"] or m["b1"]], [t], [name])
            if m["d"]:
                add("death_year", f"In what year did {name} die?", [m["d"]], [t], [name])
            if unique_riddle(t, m["desc"]):
                who = f"the {clue[t]} born {era[t]}"
                add("riddle", f"Who was {who}?", [name], [t], [m["desc"]])
                if m["d"]:  # same clues, but a span to read instead of the title to copy
                    add("riddle_year", f"In what year did {who} die?", [m["d"]], [t], [m["desc"]])
        if m := OFFICE.match(d):
            add("took_office", f"In what year did {name} become {m['role']}?", [m["a"]], [t], [name])
        if (m := EVENT.search(d)) and EVENT_WORDS.search(t) and S[t].get("topic") not in ("People", "Arts"):
            add("event_start", f"In what year did {with_the(name)} begin?", [m["a1"] or m["a2"] or m["a3"]],
                [t], [name])
        if (m := WORK.match(d)) and (wt := WORK_TYPES.get(m["type"].split()[-1].lower())) \
                and not name.lower().startswith(m["type"].split()[-1].lower()):  # "Symphony No. 9": ambiguous
            who_verb, when_verb, role = wt
            typ = m["type"] if m["type"][0].isupper() and " " in m["type"] else m["type"].lower()  # "Japanese film"
            work = f"the {typ} {name}"
            obj = name if who_verb[:4] == typ.split()[-1][:4] else work  # not "painted the painting The Scream"
            cands = by_bare.get(m["who"]) or [c for c in life if c.split()[-1] == m["who"].split()[-1]
                                              and c[0] == m["who"][0]]  # "J.S. Bach" -> "Johann Sebastian Bach"
            creator = cands[0] if len(cands) == 1 else None
            add("creator", f"Who {who_verb} {obj}?", [m["who"]] + ([bare(creator)] if creator else []),
                [t] + ([creator] if creator else []), [name])
            add("work_year", f"In what year was {work} {when_verb}?", [m["year"]], [t], [name])
            if creator:
                cm = life[creator]
                add("bridge_birth_year", f"In what year was the {role} of {work} born?", [cm["b"] or cm["b1"]],
                    [t, creator], [name, bare(creator)])
                if cm["d"]:
                    add("bridge_death_year", f"In what year did the {role} of {work} die?", [cm["d"]],
                        [t, creator], [name, bare(creator)])
        if t in countries and len(capital_of[t]) == 1:  # a query "<country> country" finds the country page
            add("capital", f"What is the capital of {with_the(name)}?", [bare(capital_of[t][0])],
                [t, capital_of[t][0]], [f"{name} country"])
        if (m := PLACE.match(d)) and t not in countries and t not in life and "," not in name:
            country = COUNTRY_ALIASES.get(m["country"], m["country"])
            if country in countries:
                add("country", f"In which country is {with_the(name)}?", [country], [t], [name])
                caps = capital_of[country]
                if len(caps) == 1 and caps[0] != t and _words(bare(caps[0])) in text[country]:
                    add("bridge_capital", f"What is the capital of the country where {with_the(name)} is?",
                        [bare(caps[0])], [t, country], [name, f"{country} country"])
    return Q


def assign_splits(titles: list[str], questions: list[dict]) -> dict[str, str]:
    """title -> split. Articles linked by a question form one cluster (union-find); a cluster's split is
    a stable hash of its smallest title: 80/10/10 train/dev/test (big clusters: train)."""
    parent = {t: t for t in titles}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for q in questions:
        for s in q["sources"][1:]:
            a, b = sorted((find(q["sources"][0]), find(s)))
            parent[b] = a
    members = defaultdict(list)
    for t in titles:
        members[find(t)].append(t)
    split = {}
    for ms in members.values():
        h = int(hashlib.sha256(min(ms).encode()).hexdigest(), 16) % 100
        split.update(dict.fromkeys(ms, "train" if len(ms) >= BIG_CLUSTER or h < 80 else "dev" if h < 90 else "test"))
    return split


def generate(summaries: dict) -> dict[str, list[dict]]:
    """{"train"|"dev"|"test": [FlashRAG rows]}; the same rows, byte for byte, on every run."""
    questions = extract_facts(summaries)
    split_of = assign_splits(sorted(summaries), questions)
    rng = random.Random(SEED)
    out = {}
    for split, prefix in (("train", "tr"), ("dev", "dv"), ("test", "te")):
        by_kind = defaultdict(list)
        for q in questions:
            if split_of[q["sources"][0]] == split:
                by_kind[q["kind"]].append(q)
        kinds = sorted(by_kind)
        for k in kinds:
            rng.shuffle(by_kind[k])
        if split == "train":
            rows = [q for k in kinds for q in by_kind[k][:TRAIN_CAP_PER_KIND]]
            rng.shuffle(rows)
        else:  # round-robin over kinds: rare kinds (the bridges) get their full share of the eval budget
            rows = interleave_kinds([q for k in kinds for q in by_kind[k]])[:DEV_TEST_SIZE]
        out[split] = [{"id": f"{prefix}{i:05d}", **q} for i, q in enumerate(rows)]
    return out


# ----------------------------------------------------------------------------- measurement

def rule_agent_answer(question: str, index) -> str:
    """The baseline to beat: search the raw question once, answer the top document's title (minus any
    disambiguator, to be generous). index: anything with search(queries, k) -> [[Doc]], e.g. search.BM25."""
    hits = index.search([question], k=1)[0]
    return bare(hits[0].title) if hits else ""


def split_stats(corpus_path, question_paths: dict, k: int = 3) -> dict:
    """{split: {kind|"ALL": {n, rule_em, oracle_raw, oracle_ideal}}}. oracle_* = share of questions whose
    gold answer is in the top-k docs: for the raw question (a one-search agent's ceiling) and for the
    ideal queries, one per hop (what a good multi-search agent can reach)."""
    index = BM25.from_jsonl(corpus_path)
    stats = {}
    for split, path in question_paths.items():
        rows = load_qa(path)
        raw = index.search([r["question"] for r in rows], k=k)  # top-1 of these = rule_agent_answer's doc
        ideal = iter(index.search([q for r in rows for q in r["ideal_queries"]], k=k))
        acc = defaultdict(Counter)
        for r, docs in zip(rows, raw):
            hop_docs = [d for _ in r["ideal_queries"] for d in next(ideal)]
            found = lambda ds: any(contains(f"{d.title}\n{d.text}", a) for d in ds for a in r["golden_answers"])
            for c in (acc[r["kind"]], acc["ALL"]):
                c["n"] += 1
                c["rule_em"] += exact_match(bare(docs[0].title) if docs else "", r["golden_answers"])
                c["oracle_raw"] += found(docs)
                c["oracle_ideal"] += found(hop_docs)
        stats[split] = {kind: {"n": c["n"], **{m: round(c[m] / c["n"], 3) for m in ("rule_em", "oracle_raw",
                        "oracle_ideal")}} for kind, c in sorted(acc.items(), key=lambda kv: (kv[0] == "ALL", kv[0]))}
    return stats


def format_stats(stats: dict) -> str:
    lines = [f"{'split':6s} {'kind':18s} {'n':>5s} {'rule EM':>8s} {'oracle@3 raw':>13s} {'oracle@3 ideal':>15s}"]
    for split, kinds in stats.items():
        lines += [f"{split:6s} {kind:18s} {s['n']:5d} {s['rule_em']:8.3f} {s['oracle_raw']:13.3f} "
                  f"{s['oracle_ideal']:15.3f}" for kind, s in kinds.items()]
    return "\n".join(lines)
