"""Rollouts: the multi-turn search agent of Search-R1, batched, returning trainable trajectories.

Every stage of Search-E1 starts here: GRPO samples G trajectories per question, self-distillation rolls the
policy out on its own training questions, and evaluation is a greedy rollout. The policy writes <think>...</think>,
then either <search> q </search> (we append the top-k documents as <information>...</information>, tokens the
policy did not write and so must never be trained on) or <answer> a </answer>. A Trajectory carries the token
ids, a loss mask that is 1 exactly on the policy's own tokens, and what happened (queries, answer).

Why the decode loop is shaped as it is (CPU throughput; see bench.py). A decode step of a 135M model costs
~30 ms of fixed overhead plus ~1 ms per row, so what matters is keeping many rows busy on every step:
- continuous batching: each trajectory owns a slot of one KV cache (SlotCache) with its own length, so a
  slot that ends a turn is prefilled with its <information> while the others keep decoding, and a finished
  slot takes the next trajectory at once; nobody waits for the slowest row of a turn or of a batch;
- the context is never re-encoded: prompts and observations are appended to the slot's cache, and the G
  siblings of a question prefill their shared prompt once (the others copy its keys and values);
- decode steps feed every slot (a view of the cache, no copy); only the few slots being prefilled are copied;
- stop strings are detected on token ids; text is decoded only for tokens that contain '>'.
"""
import re
from dataclasses import dataclass, field

import torch

from model import chat_prompt, sample
from search import information, safe_search

AGENT_PROMPT = (  # Search-R1's instruction, verbatim except for the question slot
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
    mode: str = "agent"            # agent | direct (no search) | rag (top-k, then answer; untagged reply = answer)
    group_size: int = 1            # G samples per question (GRPO's group)
    max_turns: int = 4             # searches allowed; then one last turn with search disabled
    topk: int = 3
    max_turn_tokens: int = 96      # per generation turn
    max_obs_tokens: int = 256      # an <information> block is cut to this many tokens (search.information)
    max_total_tokens: int = 640    # generated + observation tokens per trajectory
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 64           # slots decoded together (continuous batching)
    seed: int = 0
    on_search_error: str = "observe"  # observe: a "Search failed: ..." observation | stop: raise (the run stops)


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


def build_prompt(tok, question: str, mode: str = "agent", docs: str = "") -> str:
    """The user turn for a mode, in the model's chat template. docs: rendered results, for rag."""
    templates = {"agent": AGENT_PROMPT, "direct": DIRECT_PROMPT, "rag": RAG_PROMPT}
    if mode not in templates:
        raise ValueError(f"unknown mode {mode!r}: expected one of {sorted(templates)}")
    return chat_prompt(tok, templates[mode].format(question=question, docs=docs))


def last_tag(text: str, tag: str) -> str | None:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
    return found[-1].strip() if found else None


class SlotCache:
    """The batch's KV cache: one slot per running trajectory, each with its own length, written at its own
    offset (no holes: positions are cache indices). HF's attention layers only call update(); the 4D mask
    that feed() passes tells SDPA which entries each slot may see."""

    def __init__(self, n_slots: int):
        self.k, self.v = {}, {}                                  # layer -> (slots, kv_heads, capacity, head_dim)
        self.n = torch.zeros(n_slots, dtype=torch.long)          # tokens held per slot
        self.rows = self.length = None                           # set by feed() for one forward

    def update(self, key, value, layer: int, **_):
        rows, T = self.rows, key.shape[2]
        if layer not in self.k or self.k[layer].shape[2] < self.length:  # grows in steps of 256, not per token
            cap = -(-self.length // 256) * 256     # no doubling: 64 slots x 30 layers of slack is gigabytes
            for store, new in ((self.k, key), (self.v, value)):
                old = store.get(layer)
                grown = new.new_zeros(len(self.n), new.shape[1], cap, new.shape[3])
                if old is not None:
                    grown[:, :, :old.shape[2]] = old
                store[layer] = grown
        pos = self.n[rows][:, None] + torch.arange(T)             # (b, T): each slot writes at its own end
        K, V = self.k[layer], self.v[layer]
        K[rows[:, None], :, pos] = key.transpose(1, 2)
        V[rows[:, None], :, pos] = value.transpose(1, 2)
        if len(rows) == len(self.n):                             # decode steps feed every slot: a view, no copy
            return K[:, :, :self.length], V[:, :, :self.length]
        return K[rows, :, :self.length], V[rows, :, :self.length]  # a prefill of a few slots: a small copy

    def copy(self, src: int, dst: int, m: int):
        """Slot dst starts as src's first m tokens: siblings share their prompt's keys and values."""
        for store in (self.k, self.v):
            for t in store.values():
                t[dst, :, :m] = t[src, :, :m]
        self.n[dst] = m

    def get_seq_length(self) -> int:
        return int(self.n.max())

    def keep(self, slots: list[int]):
        idx = torch.tensor(slots, dtype=torch.long)
        self.k = {i: t[idx] for i, t in self.k.items()}
        self.v = {i: t[idx] for i, t in self.v.items()}
        self.n = self.n[idx]


@torch.no_grad()
def feed(model, cache: SlotCache, slots: list[int], chunks: list[list[int]], pad_id: int) -> torch.Tensor:
    """Append each chunk to its slot's cache (an empty chunk appends nothing); next-token logits per slot.
    slots must be every slot (decode) or a few (prefill): see SlotCache.update."""
    dev, T = model.device, max(max(len(c) for c in chunks), 1)
    ids = torch.full((len(chunks), T), pad_id, dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    rows, lens = torch.tensor(slots, dtype=torch.long), torch.tensor([len(c) for c in chunks])
    start = cache.n[rows]
    pos = start[:, None] + torch.arange(T)                      # (b, T)
    cache.rows, cache.length = rows, int((start + T).max())
    j = torch.arange(cache.length)
    # causal within the slot's own tokens; an empty chunk still sees one entry, so no row is all-masked (NaN)
    mask = (j <= pos[:, :, None]) & (j < (start + lens.clamp(min=1))[:, None, None])
    hidden = model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask[:, None].to(dev),
                                 position_ids=pos.to(dev), cache=cache, use_cache=True).last_hidden_state
    cache.n[rows] += lens
    last = (lens - 1).clamp(min=0).to(dev)
    return model.get_output_embeddings()(hidden[torch.arange(len(chunks), device=dev), last]).float()


def rollout(model, tok, questions: list[dict], retriever, cfg: RolloutConfig, progress=None) -> list[Trajectory]:
    """questions: dicts with "id" and "question". Returns len(questions) * G trajectories, grouped by question."""
    gen = torch.Generator(model.device).manual_seed(cfg.seed)  # sampling draws on the model's device
    docs = (safe_search(retriever, [q["question"] for q in questions], cfg.topk, cfg.on_search_error)
            if cfg.mode == "rag" else None)
    trajs = []
    for n, q in enumerate(questions):
        ids = tok(build_prompt(tok, q["question"], cfg.mode, docs[n] if docs else ""),
                  add_special_tokens=False).input_ids
        for _ in range(cfg.group_size):
            trajs.append(Trajectory(str(q["id"]), q["question"], list(ids), [0] * len(ids), len(ids)))
    _run(model, tok, trajs, retriever, cfg, gen, progress)
    return trajs


def _run(model, tok, trajs: list[Trajectory], retriever, cfg: RolloutConfig, gen, progress):
    """Continuous batching over cfg.batch_size slots. Each step: prefill the slots that have pending tokens
    (a prompt, or the last turn token + an observation), sample one token for every running slot, act on the
    turns that ended (answer -> free the slot; search -> batch the queries), then one decode forward."""
    stops, pad = _StopDetector(tok), (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    waiting = list(reversed(trajs))                    # pop() takes them in order
    S = min(cfg.batch_size, len(trajs))
    cache = SlotCache(S)
    slot = [None] * S                                  # the trajectory in each slot
    pending, turn, logits = [None] * S, [None] * S, [None] * S
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    invalid_ids, last_turn_ids = enc(INVALID), enc(LAST_TURN)  # constants: tokenized once, not once a turn

    def observe(s: int, ids: list[int]):             # tokens the policy did not write, then its next turn
        t = slot[s]
        if t.turns == cfg.max_turns:                   # the next turn is the last: search is disabled there
            ids = ids + last_turn_ids
        ids = ids[:cfg.max_total_tokens - (len(t.token_ids) - t.prompt_len) - 8]  # room left to answer in
        t.token_ids += ids; t.loss_mask += [0] * len(ids)
        pending[s], turn[s] = [turn[s][-1]] + ids, []  # the turn's last token is not in the cache yet

    while True:
        for s in range(S):                             # admit: a free slot takes the next trajectory
            if slot[s] is None and waiting:
                t = slot[s] = waiting.pop()
                turn[s], cache.n[s], pending[s] = [], 0, list(t.token_ids)
                d = next((d for d in range(S) if slot[d] is not None and cache.n[d] >= t.prompt_len
                          and slot[d].token_ids[:t.prompt_len] == t.token_ids[:t.prompt_len]), None)
                if d is not None:                      # a running sibling holds this prompt: copy, feed 1 token
                    cache.copy(d, s, t.prompt_len - 1)
                    pending[s] = t.token_ids[-1:]
        running = [s for s in range(S) if slot[s] is not None]
        if not running:
            break
        if not waiting and len(running) <= S // 2:    # the tail: stop paying for empty slots
            cache.keep(running)
            slot, pending, turn, logits = ([x[s] for s in running] for x in (slot, pending, turn, logits))
            S, running = len(running), list(range(len(running)))
        pre = [s for s in running if pending[s]]
        if pre:                                        # siblings admitted together: prefill their prompt once
            first = {}
            for s in pre:
                if cache.n[s] == 0:
                    first.setdefault(tuple(pending[s]), s)
            own = [s for s in pre if cache.n[s] > 0 or first[tuple(pending[s])] == s]
            for s, lg in zip(own, feed(model, cache, own, [pending[s] for s in own], pad)):
                logits[s], pending[s] = lg, None
            for s in pre:
                if pending[s]:                         # same keys, values and next-token logits as its sibling
                    d = first[tuple(pending[s])]
                    cache.copy(d, s, len(pending[s]))
                    logits[s], pending[s] = logits[d], None
        nxt = sample(torch.stack([logits[s] for s in running]), cfg.temperature, cfg.top_p, gen).tolist()
        to_search, decoding = [], set()
        for s, x in zip(running, nxt):
            t = slot[s]
            turn[s].append(x)
            t.token_ids.append(x); t.loss_mask.append(1); t.n_generated += 1
            if not (stops(turn[s]) or len(turn[s]) >= cfg.max_turn_tokens
                    or len(t.token_ids) - t.prompt_len >= cfg.max_total_tokens):
                decoding.add(s)
                continue
            action = _act(t, tok.decode(turn[s]), cfg)
            if action == "end" and cfg.mode != "agent" and t.answer is None:  # as FlashRAG's baselines: the reply
                t.answer = tok.decode(turn[s], skip_special_tokens=True).strip() or None
            if action == "search":
                to_search.append(s)
            elif action == "invalid":
                observe(s, invalid_ids)
            else:                                      # answered, or out of turns or tokens: free the slot
                slot[s] = None
                if progress is not None:
                    progress.update(1)
        if to_search:                                  # one retriever call for every query of this step
            queries = [slot[s].queries[-1] for s in to_search]
            for s, res in zip(to_search, safe_search(retriever, queries, cfg.topk, cfg.on_search_error)):
                slot[s].observations.append(res)
                observe(s, information(enc, res, cfg.max_obs_tokens))
        if decoding:                                   # every slot takes part (a view of the cache, no copy)
            out = feed(model, cache, list(range(S)), [[turn[s][-1]] if s in decoding else [] for s in range(S)], pad)
            logits = [out[s] if s in decoding else lg for s, lg in enumerate(logits)]


def _act(t: Trajectory, text: str, cfg: RolloutConfig) -> str:
    """What a finished turn does: "answer" (done), "end" (no more turns or tokens), "search" or "invalid"."""
    t.turns += 1
    query, answer = last_tag(text, "search"), last_tag(text, "answer")
    closing = max(("</search>", "</answer>"), key=text.rfind)
    room = cfg.max_total_tokens - (len(t.token_ids) - t.prompt_len)
    if answer is not None and closing == "</answer>" and text.rfind(closing) >= 0:
        t.answer, t.finished = answer, True
        return "answer"
    if room < 16:
        t.answer, t.truncated = answer, True
        return "end"
    if cfg.mode != "agent" or t.turns > cfg.max_turns:
        t.answer = answer                  # no search allowed in this turn and no answer: it ends here
        return "end"
    if query and closing == "</search>":
        t.queries.append(query[:300])      # bound absurd queries; the tokens stay as the model wrote them
        return "search"
    t.invalid_actions += 1
    return "invalid"


class _StopDetector:
    """True when a turn's last token completes </search> or </answer>, or is end-of-sequence.
    Only tokens containing '>' can complete a tag, so only they trigger a (short) decode."""
    HAS_GT = {}                                # id(tokenizer) -> per token id: does its text contain '>'

    def __init__(self, tok):
        self.tok = tok
        self.eos = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                                tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None and i != tok.unk_token_id}
        if id(tok) not in self.HAS_GT:         # built once per tokenizer: decoding 49k tokens takes ~0.2 s
            self.HAS_GT[id(tok)] = [">" in s for s in tok.batch_decode([[i] for i in range(len(tok))])]
        self.has_gt = self.HAS_GT[id(tok)]

    def __call__(self, turn: list[int]) -> bool:
        last = turn[-1]
        if last in self.eos:
            return True
        if not self.has_gt[last]:
            return False
        count = lambda s: s.count("</search>") + s.count("</answer>")
        return count(self.tok.decode(turn[-8:])) > count(self.tok.decode(turn[-8:-1]))

