"""Data parallelism for `torchrun --nproc_per_node=N evolve.py ...`: every process holds the whole policy and
works on its own shard of the round's questions (a question's G rollouts stay together, so GRPO groups and
OFSD siblings are complete on one process). Training stays exactly single-process training on the union of
the shards: each loss is divided by the GLOBAL token count, gradients are summed over processes before
clipping, and every process takes the same number of optimizer steps. Alone (no torchrun), every helper is
the identity. gloo on CPU, nccl on CUDA.
"""
import math
import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment; (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # then "cuda" means this rank's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard(xs: list) -> list:
    rank, n = world()
    return xs[rank::n]


def all_sum(x: float) -> float:
    """A Python number summed over processes."""
    if world()[1] == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item()


def sum_grads(model):
    """Sum every gradient over processes (a process with no rows in this batch adds zeros)."""
    if world()[1] == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def batches(order: list, batch_size: int = 0, n: int = 0) -> list[list]:
    """This process's rows in optimizer batches: n of them (or ceil(global rows / batch_size)) on every process,
    so steps stay in lockstep; the local rows are split evenly (a process may get empty batches)."""
    n = n or math.ceil(all_sum(len(order)) / max(batch_size, 1))
    return [order[i * len(order) // n:(i + 1) * len(order) // n] for i in range(n)]


def merge_metrics(m: dict) -> dict:
    """evaluate() metrics of this process's questions -> over every process's: int counts summed, float
    means (seconds too, roughly the wall time) weighted by each process's n."""
    if world()[1] == 1:
        return m
    n = all_sum(m["n"])
    return {k: int(all_sum(v)) if isinstance(v, int) else all_sum(v * m["n"]) / max(n, 1) for k, v in m.items()}
