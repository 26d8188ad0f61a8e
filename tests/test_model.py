"""model.py: loading, saving, prompts, sampling and log-probs; one test runs the real embedded model."""
import shutil

import pytest
import torch

import model as M
from data.load import ensure_gguf


def test_embedded_default_answers_the_paris_check_offline():
    policy, tok = M.load_policy(M.EMBEDDED, device="cpu", dtype="float32")
    ids = tok(M.chat_prompt(tok, "What is the capital of France? Answer briefly."), return_tensors="pt",
              add_special_tokens=False).input_ids
    out = policy.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_embedded_default_is_a_plain_safetensors_hf_folder():
    folder = M.EMBEDDED_DIR
    M.resolve(M.EMBEDDED)
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_a_conversion_another_process_finished_first_keeps_that_folder_and_leaves_no_temp(tmp_path):
    out = tmp_path / "model"  # two first runs convert at once; the slower one finds the folder already there
    shutil.copytree(M.resolve(M.EMBEDDED), out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert M.convert_gguf(ensure_gguf(), out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp and list(tmp_path.iterdir()) == [out]


def test_chat_prompt_wraps_the_question_in_the_chat_template(tok):
    text = M.chat_prompt(tok, "Question: who?")
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "Question: who?" in text


def test_tiny_qwen2_and_llama_save_and_reload_identically(tmp_path, tok):
    for arch in ("llama", "qwen2"):
        m = M.tiny_model(arch, vocab_size=len(tok))
        M.save_policy(m, tok, tmp_path / arch)
        assert (tmp_path / arch / "model.safetensors").exists()
        m2, tok2 = M.load_policy(str(tmp_path / arch), device="cpu", dtype="float32")
        x = torch.randint(0, len(tok), (2, 9))
        torch.testing.assert_close(m(input_ids=x).logits, m2(input_ids=x).logits)
        assert tok2.pad_token_id is not None


def test_packed_batches_score_each_response_token_as_an_unpadded_forward_would(tiny):
    prompts, responses = [[5, 6, 7, 8], [9]], [[10, 11], [12, 13, 14]]
    ids, attn, loss = M.pack(prompts, responses, [[1, 0], [1, 1, 1]], pad_id=0)
    assert loss.tolist() == [[1, 0, 0], [1, 1, 1]]  # response masks are right-aligned with padding
    logp = M.token_logp(M.response_logits(tiny, ids, attn, R=3), ids[:, -3:])
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        ref = torch.log_softmax(tiny(input_ids=seq).logits[0, :-1], -1)[torch.arange(len(seq[0]) - 1), seq[0, 1:]]
        torch.testing.assert_close(logp[i, :len(r)], ref[-len(r):], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_keep_runs_the_head_only_on_kept_positions_with_the_same_logits(tok, arch):
    m = M.tiny_model(arch, vocab_size=len(tok))
    ids, attn, loss = M.pack([[5, 6, 7, 8], [9]], [[10, 11], [12, 13, 14]], [[1, 0], [0, 1, 1]], pad_id=0)
    full = M.response_logits(m, ids, attn, R=3)
    torch.testing.assert_close(M.response_logits(m, ids, attn, R=3, keep=loss.bool()), full[loss.bool()])


def test_sampling_is_greedy_at_temperature_zero_and_respects_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert M.sample(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([M.sample(logits, 1.0, top_p=0.5, generator=g) for _ in range(50)])
    assert (draws[:, 0] == 1).all() and (draws[:, 1] == 0).all()  # only the top token holds >= 50% mass


def test_checkpoints_load_from_safetensors_only_never_from_pickle(tmp_path, tok):
    import pytest
    tiny = M.tiny_model("llama", vocab_size=len(tok))
    tiny.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy format: a pickle
    with pytest.raises(OSError, match="no file named model.safetensors"):
        M.load_policy(str(tmp_path), "cpu")


def test_no_code_unpickles_or_trusts_remote_code_by_default():
    """torch.load only with weights_only=True, no pickle, remote code only when a caller asks for it."""
    import inspect
    import re
    from pathlib import Path
    root = Path(M.__file__).resolve().parent
    sources = [p for p in root.rglob("*.py") if not any(part.startswith(".") or part == "cache" for part in p.parts)]
    assert len(sources) > 10
    for path in sources:
        src = path.read_text(encoding="utf-8")
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"^\s*(import|from) (pickle|dill|cloudpickle)\b", src, re.M), path.name
        assert not re.search(r"trust_remote_code\s*=\s*True", src), path.name
    assert inspect.signature(M.load_policy).parameters["trust_remote_code"].default is False
