"""The shared training base: how any per-token loss becomes an update. Both of Search-E1's trainers use it
(GRPO, grpo.py; self-distillation and SFT, distill.py), and so does the warm-up.

The trainers only define a loss over a few rows (a pure function of log-probs or logits); everything that
turns it into an update lives here, once:
- train(): rows in optimizer batches (a fixed number of steps, or a batch size), each in micro-batches of
  similar length with gradient accumulation, the loss a token-mean over the whole batch (exact, whatever the
  micro-batch size), gradients summed over processes (parallel.py), clipped, one step; a non-finite loss or
  gradient skips the step.
- one AdamW per trainer (make_optimizer): GRPO's and distillation's are each kept across rounds and saved with
  every round as safetensors (no pickles), so a killed run resumes exactly; the warm-up's is dropped after it.
  One optimizer shared by the phases would start each distillation phase with GRPO's moments, so its first
  steps would be partly GRPO steps, even where the distillation gradient is exactly 0 (the no-hint control).
- set_lr(): the phase's learning rate, ramped linearly over its own optimizer's first warmup_steps steps.
  Weight decay (decoupled, AdamW) is 0.01 for GRPO and the warm-up (verl's actor default, which Search-R1 trains
  with); distillation uses 0 (evolve.py says why).
"""
import copy
import math
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from parallel import all_sum, batches, sum_grads

WEIGHT_DECAY = 0.01


class TrainingError(RuntimeError):
    """Training cannot go on safely: too many non-finite steps in a row, or non-finite weights to save."""


def chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), max(n, 1))]


def autocast(model, enabled: bool):
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=enabled)


def split(t):
    """A trajectory as (prompt ids, response ids, response loss mask)."""
    return t.token_ids[:t.prompt_len], t.token_ids[t.prompt_len:], t.loss_mask[t.prompt_len:]


def frozen_copy(model):
    """A frozen copy with the model's own (fp32) weights, for a teacher or a reference: run under the same autocast
    as the model, the two differ only where their weights do (a bf16 copy would not give a KL of 0 at equal
    weights)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def make_optimizer(model, weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=weight_decay)


def steps_taken(optimizer) -> int:
    return int(next(iter(optimizer.state.values())).get("step", 0)) if optimizer.state else 0


def set_lr(optimizer, lr: float, warmup_steps: int = 0):
    """The phase's lr, times a linear ramp over this optimizer's first warmup_steps steps."""
    ramp = min(1.0, (steps_taken(optimizer) + 1) / warmup_steps) if warmup_steps else 1.0
    for g in optimizer.param_groups:
        g["lr"] = lr * ramp


def save_optimizer(optimizer, model, path):
    """AdamW's moments and step count per parameter name, as safetensors."""
    names = {p: n for n, p in model.named_parameters()}
    save_file({f"{names[p]}.{k}": v.detach().contiguous() for p, s in optimizer.state.items() for k, v in s.items()},
              str(path))


def load_optimizer(optimizer, model, path):
    """save_optimizer's file back into optimizer. Every saved name must be a parameter of model and every
    parameter must be saved (an empty file is a fresh optimizer): a mismatch raises, never a silent fresh Adam."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no optimizer state to resume from (a round saved by an earlier version, "
                                "with one optimizer.safetensors, cannot resume here: start another out_dir)")
    flat = load_file(str(path), device=str(next(model.parameters()).device))
    saved, names = {k.rsplit(".", 1)[0] for k in flat}, [n for n, _ in model.named_parameters()]
    unknown, missing = sorted(saved - set(names)), [n for n in names if flat and n not in saved]
    if unknown or missing:
        raise ValueError(f"{path}: optimizer state does not match the model: saved but not in the model "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; in the model but not saved "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, p in model.named_parameters():
        state = {k.removeprefix(name + "."): v for k, v in flat.items() if k.rsplit(".", 1)[0] == name}
        if state:
            state["step"] = state["step"].cpu()  # AdamW keeps its step count on the CPU
            optimizer.state[p] = state


def optimizer_step(model, optimizer, loss_value: float, max_grad_norm: float):
    """Sum gradients over processes, clip and step. A non-finite loss (summed over processes too) or gradient
    norm skips the step and drops its gradients, so one bad batch never poisons the weights. Returns
    (stepped, grad_norm)."""
    sum_grads(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    ok = math.isfinite(loss_value) and bool(torch.isfinite(norm))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok, float(norm)


def train(model, optimizer, n_rows: int, loss_fn, n_tok: list[int], length: list[int], lr: float,
          batch_size: int, micro_batch: int, max_grad_norm: float = 1.0, epochs: int = 1, warmup_steps: int = 0,
          seed: int = 0, desc: str = "train", progress: bool | None = None, steps: int = 0) -> dict:
    """Rows 0..n_rows-1, shuffled into even batches per epoch, one optimizer step each at lr (set_lr): `steps`
    batches if steps > 0 (fewer rows than steps: the rows repeat, so every step has some), else
    ceil(n_rows / batch_size). No rows anywhere: no step. loss_fn(rows) -> summed loss over those rows' trained
    tokens; n_tok[i] is row i's trained-token count (the token-mean's denominator), length[i] its length
    (micro-batches of similar length pad less). stats["losses"]: each stepped batch's token-mean loss."""
    stats = dict(steps=0, n_skipped=0, epoch_loss=[], grad_norm=0.0, losses=[])
    rng = random.Random(seed)
    total_rows = all_sum(n_rows)
    n_batches = (steps if steps > 0 else math.ceil(total_rows / max(batch_size, 1))) if total_rows else 0
    bar = tqdm(total=epochs * n_batches, desc=desc, leave=False, disable=None if progress is None else not progress)
    optimizer.zero_grad(set_to_none=True)
    for _ in range(epochs if n_batches else 0):
        order = list(range(n_rows))
        rng.shuffle(order)             # batches mix questions
        if 0 < len(order) < n_batches:
            order = (order * n_batches)[:n_batches]
        ep_sum, ep_tok = 0.0, 0
        for batch in batches(order, n=n_batches):   # under torchrun: this process's share of each batch
            denom = all_sum(sum(n_tok[i] for i in batch))
            total = 0.0
            for micro in chunks(sorted(batch, key=lambda i: length[i]), micro_batch):
                loss_sum = loss_fn(micro)
                (loss_sum / max(denom, 1)).backward()
                total += float(loss_sum.detach())
            total = all_sum(total)
            set_lr(optimizer, lr, warmup_steps)
            ok, stats["grad_norm"] = optimizer_step(model, optimizer, total, max_grad_norm)
            stats["steps"] += ok
            stats["n_skipped"] += not ok
            if ok:                     # per-token means over the batches actually stepped on
                ep_sum, ep_tok = ep_sum + total, ep_tok + denom
                stats["losses"].append(total / max(denom, 1))
            bar.update(1)
            bar.set_postfix(loss=f"{total / max(denom, 1):.4f}")
        stats["epoch_loss"].append(ep_sum / ep_tok if ep_tok else float("nan"))
    bar.close()
    stats["loss"] = stats["epoch_loss"][-1] if stats["epoch_loss"] else float("nan")
    return stats


def count_bad_steps(bad: int, stats: dict, limit: int, where: str) -> int:
    """Consecutive skipped steps after one trainer call's stats (its skips count as its last steps: an upper
    bound). Logs skips; raises TrainingError at limit, so a run that cannot recover stops before it saves."""
    bad = bad + stats["n_skipped"] if stats["steps"] == 0 else stats["n_skipped"]
    if stats["n_skipped"]:
        print(f"{where}: skipped {stats['n_skipped']} of {stats['steps'] + stats['n_skipped']} optimizer steps "
              f"(non-finite loss or gradient); {bad} in a row", file=sys.stderr)
    if bad >= limit:
        raise TrainingError(f"{where}: {bad} optimizer steps in a row had a non-finite loss or gradient "
                            f"(max_bad_steps={limit}); stopping without saving this round")
    return bad


def check_finite(model, where: str):
    """Refuse to save a poisoned checkpoint."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"{where}: non-finite weights in {len(bad)} tensors (e.g. {bad[0]}); not saving them")
