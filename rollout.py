"""Rollouts: the multi-turn search agent of Search-R1, batched, returning trainable trajectories.

Every stage of Search-E1 starts here: GRPO samples G trajectories per question, self-distillation
rolls the policy out on its own training questions, and evaluation is a greedy rollout. The policy
writes <think>...</think>, then either <search> q </search> (we append the top-k documents as
<information>...</information>, tokens the policy did not write and so must never be trained on)
or <answer> a </answer>. A Trajectory carries the token ids, a loss mask that is 1 exactly on the
policy's own tokens, and what happened (queries, answer), so trainers use it as is.

Why the decode loop is shaped as it is (CPU throughput; see bench.py):
- one KV cache for the whole batch, kept across turns: an observation is appended to the cache, the
  context is never re-encoded;
- all rows advance together; a row that is waiting for its search results feeds a masked pad, so
  rows are never re-packed mid-turn, and finished rows are dropped from the batch between turns;
- "holes" (pads) in the middle of rows are masked out and positions count real tokens only, so a
  row's logits are the same as if it had been run alone;
- the cache grows in place (GrowingLayer) instead of torch.cat per step, which copies everything;
- stop strings are detected on token ids; text is decoded only for tokens that contain '>'.
"""
import re
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from model import chat_prompt, sample
from search import format_docs

# Search-R1's instruction, verbatim except for the question slot.
AGENT_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
    "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine "
    "by <search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
    "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n")
DIRECT_PROMPT = ("Answer the given question. Provide the answer inside <answer> and </answer>, without detailed "
                 "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n")
RAG_PROMPT = ("Answer the given question using the documents below. Provide the answer inside <answer> and "
              "</answer>, without detailed illustrations. For example, <answer> Beijing </answer>.\n"
              "Documents:\n{docs}Question: {question}\n")
INVALID = ("\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
           "</search>. If I want to give the final answer, I should put the answer between <answer> and "
           "</answer>. Let me try again.\n")
LAST_TURN = "\nNo more searches are allowed. Give the final answer now.\n"


@dataclass
class RolloutConfig:
    mode: str = "agent"            # agent | direct (no search) | rag (top-k for the question, then answer)
    group_size: int = 1            # G samples per question (GRPO's group)
    max_turns: int = 4             # searches allowed; then one last turn with search disabled
    topk: int = 3
    max_turn_tokens: int = 160     # per generation turn
    max_obs_tokens: int = 320      # an <information> block is cut to this many tokens (Search-R1 does too)
    max_total_tokens: int = 1024   # generated + observation tokens per trajectory
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 32           # rows decoded together
    seed: int = 0


@dataclass
class Trajectory:
    qid: str
    question: str
    token_ids: list[int]           # prompt + response
    loss_mask: list[int]           # 1 on policy-generated tokens, 0 on prompt and <information> tokens
    prompt_len: int
    queries: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    answer: str | None = None
    turns: int = 0                 # generation turns
    n_generated: int = 0
    finished: bool = False         # ended with </answer>
    truncated: bool = False        # ran out of max_total_tokens
    invalid_actions: int = 0
    reward: float = 0.0


class GrowingLayer(DynamicLayer):
    """KV cache layer with amortised growth: DynamicLayer concatenates (copies) the whole cache every step."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.n = 0
        t = key_states.shape[-2]
        if self.keys.numel() == 0 or self.n + t > self.keys.shape[-2]:
            cap = max(2 * (self.n + t), 256)
            grow = lambda old, new: torch.cat([old[..., :self.n, :], new.new_zeros(
                *new.shape[:2], cap - self.n, new.shape[-1])], dim=-2) if old.numel() else new.new_zeros(
                *new.shape[:2], cap, new.shape[-1])
            self.keys, self.values = grow(self.keys, key_states), grow(self.values, value_states)
        self.keys[..., self.n:self.n + t, :] = key_states
        self.values[..., self.n:self.n + t, :] = value_states
        self.n += t
        return self.keys[..., :self.n, :], self.values[..., :self.n, :]

    def get_seq_length(self) -> int:
        return getattr(self, "n", 0)

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]


def build_prompt(tok, question: str, mode: str = "agent", docs: str = "") -> str:
    """The user turn for a mode, in the model's chat template. docs: rendered results, for rag."""
    templates = {"agent": AGENT_PROMPT, "direct": DIRECT_PROMPT, "rag": RAG_PROMPT}
    if mode not in templates:
        raise ValueError(f"unknown mode {mode!r}: expected one of {sorted(templates)}")
    return chat_prompt(tok, templates[mode].format(question=question, docs=docs))


def safe_search(retriever, queries: list[str], k: int) -> list[str]:
    """Rendered results per query; a retriever failure becomes an observation, never a crashed batch."""
    try:
        return [format_docs(docs) for docs in retriever.search(queries, k)]
    except Exception as e:  # noqa: BLE001 - any backend fault is reported to the agent as text
        return [f"Search failed: {type(e).__name__}: {str(e)[:200]}\n"] * len(queries)


def last_tag(text: str, tag: str) -> str | None:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
    return found[-1].strip() if found else None


class _Stepper:
    """Feeds ragged chunks of tokens to the batch's KV cache; returns next-token logits per row."""

    def __init__(self, model, pad_id: int, n_rows: int):
        self.model, self.pad_id = model, pad_id
        self.cache = Cache(layer_class_to_replicate=GrowingLayer)
        self.mask = torch.zeros(n_rows, 0, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(n_rows, dtype=torch.long, device=model.device)  # real tokens so far per row

    @torch.no_grad()
    def feed(self, chunks: list[list[int]]) -> torch.Tensor:
        dev, T = self.model.device, max(len(c) for c in chunks)
        ids = torch.full((len(chunks), T), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros(len(chunks), T, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
            new_mask[i, :len(c)] = 1
        ids, new_mask = ids.to(dev), new_mask.to(dev)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        position_ids = self.pos[:, None] + (new_mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=self.mask, position_ids=position_ids,
                                          cache=self.cache, use_cache=True).last_hidden_state
        last = (new_mask.sum(1) - 1).clamp(min=0)
        self.pos += new_mask.sum(1)
        return self.model.get_output_embeddings()(hidden[torch.arange(len(chunks), device=dev), last]).float()

    def keep(self, rows: list[int]):
        idx = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos = self.mask[idx], self.pos[idx]


def rollout(model, tok, questions: list[dict], retriever, cfg: RolloutConfig, progress=None) -> list[Trajectory]:
    """questions: dicts with "id" and "question". Returns len(questions) * G trajectories, grouped by question."""
    gen = torch.Generator().manual_seed(cfg.seed)
    docs = safe_search(retriever, [q["question"] for q in questions], cfg.topk) if cfg.mode == "rag" else None
    trajs = []
    for n, q in enumerate(questions):
        ids = tok(build_prompt(tok, q["question"], cfg.mode, docs[n] if docs else ""),
                  add_special_tokens=False).input_ids
        for _ in range(cfg.group_size):
            trajs.append(Trajectory(str(q["id"]), q["question"], list(ids), [0] * len(ids), len(ids)))
    # similar prompt lengths in one batch waste less padding; trajs keeps the original order
    order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].token_ids))
    for start in range(0, len(order), cfg.batch_size):
        chunk = [trajs[i] for i in order[start:start + cfg.batch_size]]
        _run_batch(model, tok, chunk, retriever, cfg, gen)
        if progress is not None:
            progress.update(len(chunk))
    return trajs


def _run_batch(model, tok, batch: list[Trajectory], retriever, cfg: RolloutConfig, gen):
    stops = _StopDetector(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stepper = _Stepper(model, pad, len(batch))
    rows = list(batch)                                  # rows still running, aligned with the cache
    logits = stepper.feed([t.token_ids for t in rows])  # prefill
    while rows:
        # one generation turn: every row decodes until it stops (</search>, </answer>, eos, budget)
        turn = [[] for _ in rows]
        stopped = [False] * len(rows)
        while True:
            nxt = sample(logits, cfg.temperature, cfg.top_p, gen).tolist()
            for i, t in enumerate(rows):
                if stopped[i]:
                    continue
                turn[i].append(nxt[i])
                t.token_ids.append(nxt[i]); t.loss_mask.append(1); t.n_generated += 1
                stopped[i] = (stops(turn[i]) or len(turn[i]) >= cfg.max_turn_tokens
                              or len(t.token_ids) - t.prompt_len >= cfg.max_total_tokens)
            if all(stopped):
                break
            logits = stepper.feed([[] if s else [turn[i][-1]] for i, s in enumerate(stopped)])
        # act on each row's turn: answer, search, or correct an invalid action
        keep, to_search, notes = [], [], {}
        for i, t in enumerate(rows):
            t.turns += 1
            text = tok.decode(turn[i])
            query, answer = last_tag(text, "search"), last_tag(text, "answer")
            closing = max(("</search>", "</answer>"), key=text.rfind)
            room = cfg.max_total_tokens - (len(t.token_ids) - t.prompt_len)
            if answer is not None and closing == "</answer>" and text.rfind(closing) >= 0:
                t.answer, t.finished = answer, True
            elif room < 16:
                t.answer, t.truncated = answer, True
            elif cfg.mode != "agent" or t.turns > cfg.max_turns:
                t.answer = answer            # no search allowed in this turn and no answer: it ends here
            elif query and closing == "</search>":
                t.queries.append(query[:300])  # bound absurd queries; the tokens stay as the model wrote them
                to_search.append(i)
                keep.append(i)
            else:
                t.invalid_actions += 1
                notes[i] = INVALID
                keep.append(i)
        results = safe_search(retriever, [rows[i].queries[-1] for i in to_search], cfg.topk) if to_search else []
        for i, res in zip(to_search, results):
            rows[i].observations.append(res)
        results = dict(zip(to_search, results))
        if not keep:
            break
        chunks = []
        for i in keep:
            t = rows[i]
            if i in results:
                ids = tok(f"\n\n<information>{results[i].strip()}</information>\n\n",
                          add_special_tokens=False).input_ids[:cfg.max_obs_tokens]
            else:
                ids = tok(notes[i], add_special_tokens=False).input_ids
            if t.turns == cfg.max_turns:  # the next turn is the last: search is disabled there
                ids += tok(LAST_TURN, add_special_tokens=False).input_ids
            room = cfg.max_total_tokens - (len(t.token_ids) - t.prompt_len)
            ids = ids[:room - 8]  # leave the policy a few tokens to answer in
            t.token_ids += ids; t.loss_mask += [0] * len(ids)
            chunks.append([turn[i][-1]] + ids)  # the turn's last sampled token is not in the cache yet
        rows = [rows[i] for i in keep]
        stepper.keep(keep)
        logits = stepper.feed(chunks)


class _StopDetector:
    """True when a turn's last token completes </search> or </answer>, or is end-of-sequence.
    Only tokens containing '>' can complete a tag, so only they trigger a (short) decode."""

    def __init__(self, tok):
        self.tok = tok
        self.eos = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                                tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None and i != tok.unk_token_id}
        self.has_gt = _has_gt(tok)

    def __call__(self, turn: list[int]) -> bool:
        last = turn[-1]
        if last in self.eos:
            return True
        if not self.has_gt[last]:
            return False
        count = lambda s: s.count("</search>") + s.count("</answer>")
        return count(self.tok.decode(turn[-8:])) > count(self.tok.decode(turn[-8:-1]))


_GT_CACHE = {}


def _has_gt(tok) -> list[bool]:
    if id(tok) not in _GT_CACHE:
        _GT_CACHE[id(tok)] = [">" in s for s in tok.batch_decode([[i] for i in range(len(tok))])]
    return _GT_CACHE[id(tok)]
