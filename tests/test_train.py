"""train.py, the shared training base: a fixed number of steps per phase, the lr ramp counted per optimizer, and
optimizer state that loads only into the model it was saved from."""
import pytest
import torch

import model as M
from train import load_optimizer, make_optimizer, save_optimizer, set_lr, train


def run(model, opt, n_rows, **kw):
    """train() on a loss that pulls every weight toward 0 (each row: the sum of squares, one token a row)."""
    lrs, rows_seen, per_step = [], [], []
    real_step = opt.step

    def step(*a, **k):                   # the lr each optimizer step really used, and the rows it was given
        lrs.append(opt.param_groups[0]["lr"])
        per_step.append(len(rows_seen) - sum(per_step))
        return real_step(*a, **k)
    opt.step = step

    def loss(rows):
        rows_seen.extend(rows)
        return len(rows) * sum((p ** 2).sum() for p in model.parameters())
    stats = train(model, opt, n_rows, loss, [1] * n_rows, [1] * n_rows, lr=0.1, batch_size=4, micro_batch=2, **kw)
    stats["rows_per_step"] = per_step
    return stats, lrs


def test_a_fixed_number_of_steps_whatever_the_rows_and_none_without_rows():
    model = torch.nn.Linear(3, 2)
    for n_rows in (1, 5, 30):            # fewer rows than steps: they repeat, so every step has some
        stats, lrs = run(model, make_optimizer(model), n_rows, steps=3)
        assert stats["steps"] == 3 and len(lrs) == 3 and min(stats["rows_per_step"]) >= 1
        assert sum(stats["rows_per_step"]) == max(n_rows, 3)
    stats, _ = run(model, make_optimizer(model), 10)   # by batch size: ceil(10 / 4)
    assert stats["steps"] == 3
    opt = make_optimizer(model)
    before = [p.clone() for p in model.parameters()]
    stats, lrs = run(model, opt, 0, steps=3)           # no rows: no step, no momentum replayed
    assert stats["steps"] == 0 and lrs == [] and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_lr_ramp_counts_its_own_optimizers_steps():
    """A phase's ramp starts at its own first step, however many steps another optimizer (the warm-up's) took."""
    model = torch.nn.Linear(3, 2)
    warm = make_optimizer(model)
    _, warm_lrs = run(model, warm, 6, steps=6, warmup_steps=5)
    assert warm_lrs == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    fresh = make_optimizer(model)
    _, lrs = run(model, fresh, 3, steps=3, warmup_steps=5)
    assert lrs == pytest.approx([0.02, 0.04, 0.06])
    _, lrs = run(model, make_optimizer(model), 3, steps=3)  # no ramp: the phase's lr from the first step
    assert lrs == pytest.approx([0.1, 0.1, 0.1])
    set_lr(warm, 0.1, 5)
    assert warm.param_groups[0]["lr"] == pytest.approx(0.1)


def test_optimizer_state_loads_only_into_the_model_it_was_saved_from(tmp_path):
    llama, qwen = M.tiny_model("llama", vocab_size=64), M.tiny_model("qwen2", vocab_size=64)
    opt = make_optimizer(llama)
    run(llama, opt, 2, steps=1)
    save_optimizer(opt, llama, tmp_path / "opt.safetensors")
    with pytest.raises(ValueError, match=r"in the model but not saved \['model.layers.0.self_attn.q_proj.bias'"):
        load_optimizer(make_optimizer(qwen), qwen, tmp_path / "opt.safetensors")
    other = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"saved but not in the model \['model.embed_tokens.weight'"):
        load_optimizer(make_optimizer(other), other, tmp_path / "opt.safetensors")
    again = make_optimizer(llama)
    load_optimizer(again, llama, tmp_path / "opt.safetensors")      # the same model: every name matches
    assert len(again.state) == len(list(llama.parameters()))
    save_optimizer(make_optimizer(qwen), qwen, tmp_path / "fresh.safetensors")
    fresh = make_optimizer(qwen)
    load_optimizer(fresh, qwen, tmp_path / "fresh.safetensors")      # a fresh optimizer's empty file: fresh again
    assert not fresh.state
    with pytest.raises(FileNotFoundError, match="no optimizer state to resume from"):
        load_optimizer(fresh, qwen, tmp_path / "optimizer.safetensors")  # an earlier version's single file
