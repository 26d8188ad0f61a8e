"""ScriptedLM: a stand-in policy that writes a fixed text per turn, for tests of the rollout's control flow.

Why not a tiny trained model? It writes what it was taught, but what it writes anywhere else (after an
observation it never saw, for a question it was not taught) is decided by float rounding, which differs between
CPUs (AVX2, AVX-512, AMX) and thread counts. A test of what the rollout does with searches, invalid actions and
budgets must not depend on that, so it drives the rollout with this model, whose every next token is fixed.

It is still a real user of rollout.py's KV cache: like a Hugging Face attention layer it hands the keys and values
of the tokens it is fed to cache.update(), and reads back what each position may attend to (feed()'s mask). Its
"value" is the token id itself, so what it writes follows from what its slot's cache really holds: a cache that
garbles a slot's prompt makes it write end-of-sequence instead of its script.
"""
from types import SimpleNamespace

import torch

from rollout import build_prompt

MARGIN = 1e4  # exp(-1e4) is 0 in float32: greedy and sampled decoding both pick the scripted token


class ScriptedLM(torch.nn.Module):
    def __init__(self, tok, scripts: dict[str, list[str]], mode: str = "agent"):
        """scripts: question -> the text of each of its turns. A turn should end where rollout.py ends one
        (</search>, </answer>, or cut by a token budget); after its last turn the model writes end-of-sequence.
        mode: the prompt it is scripted for (agent or direct)."""
        super().__init__()
        enc = lambda s: tok(s, add_special_tokens=False).input_ids
        self.scripts = {tuple(enc(build_prompt(tok, q, mode))): [enc(t) for t in turns] for q, turns in scripts.items()}
        self.vocab, self.eos = len(tok), tok.eos_token_id
        self.register_buffer("here", torch.zeros(0))  # only so that .device works

    @property
    def device(self):
        return self.here.device

    def next_token(self, seen: list[int]) -> int:
        """Which prompt the slot holds, then the first of its turns not yet written in full: continue it from
        where the slot's last tokens leave off, or start it (after a prompt or an observation)."""
        prompt = next((p for p in self.scripts if tuple(seen[:len(p)]) == p), None)
        if prompt is None:                 # inside a prompt still being fed, or a prompt with no script
            return self.eos
        rest, start = seen[len(prompt):], 0
        for turn in self.scripts[prompt]:
            at = find(rest, turn, start)
            if at is None:
                break
            start = at + len(turn)
        else:
            return self.eos                # every turn written
        for n in range(min(len(turn) - 1, len(rest) - start), 0, -1):
            if rest[len(rest) - n:] == turn[:n]:
                return turn[n]
        return turn[0]

    def decode(self, input_ids, attention_mask, cache, **_):
        """The decoder's interface as feed() calls it: (b, T) ids and a (b, 1, T, L) mask -> (b, T, 1) "hidden
        states", each the id of the token that comes next."""
        ids = input_ids.float()[:, None, :, None]            # (b, heads, T, head_dim): the value is the id
        _, values = cache.update(ids, ids, 0)                  # (b, heads, L, head_dim): what each row may see
        hidden = torch.full((*input_ids.shape, 1), float(self.eos))
        shortest = min(map(len, self.scripts))
        for i, mask in enumerate(attention_mask[:, 0]):
            held = values[i, 0, :, 0].long().tolist()
            for t in (mask.sum(-1) >= shortest).nonzero().flatten().tolist():  # the others see no whole prompt
                hidden[i, t, 0] = self.next_token([held[j] for j in mask[t].nonzero().flatten().tolist()])
        return SimpleNamespace(last_hidden_state=hidden)

    def get_decoder(self):
        return self.decode

    def get_output_embeddings(self):
        """(N, 1) next-token ids -> (N, vocab) logits: 0, and MARGIN on the scripted token."""
        return lambda hidden: torch.zeros(len(hidden), self.vocab).scatter_(1, hidden.long(), MARGIN)


def find(seq: list[int], part: list[int], start: int) -> int | None:
    """The first index >= start where part occurs in seq."""
    return next((i for i in range(start, len(seq) - len(part) + 1) if seq[i:i + len(part)] == part), None)
