"""Export a draft into a format vLLM's own speculative decoding loads, exactly or not at all.

`hf` — the Llama draft (`draft.kind: llama`) as a plain HF checkpoint for `method: draft_model`. vLLM's Llama
has no LM-head bias (`ParallelLMHead(bias=False)`) and needs the target's vocabulary size, so a draft with a
reduced vocabulary (`draftalign.vocab`: q = 0 outside N of V ids) cannot push the other rows to −∞. What it can
do exactly: vLLM drafts by argmax (`draft_sample_method: greedy`, its default; `torch.argmax` returns the first
maximum), so every row outside the vocabulary becomes a copy of the row of the smallest id inside it, d = min(vocab):

    logit_o(h) = W_d · h  for every o ∉ vocab  ⇒  argmax_full(h) = argmax over vocab,

since a copy never exceeds row d and loses the tie to it whenever o > d. That needs every outside id above d,
i.e. token 0 in the vocabulary (the special tokens are always in it). The head is untied (the input embedding
keeps every row). Exact for argmax drafting only: under `draft_sample_method: probabilistic` the copies would
carry probability, so the engine pins greedy drafting (`vllm_speculative_config`).

`eagle` — the feature-level head (`draft.kind: fspad`, `learner.fspad`) as EAGLE-1 for `method: eagle`
(vLLM `model_executor/models/llama_eagle.py`): a LlamaConfig with one layer; `fc.weight` (H, 2H) over
[embedding; feature] with no bias; `layers.0.*` with no input norm; no final norm; no embedding or LM head
(vLLM shares the target's); the feature is the target's post-norm last hidden state and the fed-back feature the
layer's un-normed output. Our head matches all of that except two things, each refused with its reason: the
bias of `fc` (vLLM's `fc` has none; a head whose bias is exactly zero exports) and a reduced vocabulary (EAGLE-1
drafts with the target's full, shared LM head).

`eagle3` — the EAGLE-3 head (`draft.kind: eagle3`, `learner.eagle3`) as a speculators-format checkpoint for
`method: eagle3` (vLLM `llama_eagle3.py`, config read by `transformers_utils/configs/speculators`): config.json
with `speculators_model_type: eagle3`, `transformer_layer_config` (a one-layer Llama at the target's shape),
`draft_vocab_size`, `target_hidden_size`, `norm_before_residual` (written out: vLLM's default when absent is
true), `eagle_aux_hidden_state_layer_ids` (written out: vLLM's default (2, N//2, N−3) is not ours on a shallow
target); weights named as vLLM maps them: `fc.weight` (H, n·H), `layers.0.*` (q/k/v over 2H,
`hidden_norm`, `input_layernorm`), `norm.weight`, `lm_head.weight` (n_d, H) and, with a reduced vocabulary,
`d2t` (n_d,) int64 — draft row j is target id j + d2t[j] — and `t2d` (V,) bool. No embedding: vLLM shares the
target's, which is the head's frozen one. Every piece maps one to one: the export is exact. An FSPAD head is
refused (its feature is the post-norm last state, its layer has no hidden_norm: another architecture), and
`eagle` refuses an EAGLE-3 head.

Every export writes `draftalign_export.json` ({format, method, source, ...}) beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftalign.io import atomic_dir
from draftalign.models import ModelError, load_draft, load_tokenizer
from draftalign.vocab import load_draft_vocab
from learner.fspad import WEIGHTS_FILE, is_fspad_head, read_config

FORMATS = ("hf", "eagle", "eagle3")
METHOD = {"hf": "draft_model", "eagle": "eagle", "eagle3": "eagle3"}  # vLLM speculative_config["method"]
EXPORT_FILE = "draftalign_export.json"
# the FSPAD head's layout, as its config.json states it (learner.fspad.FSPADHead.write), that EAGLE-1 shares
EAGLE1_ARCHITECTURE = {"fusion": "linear [e; f] 2H -> H", "decoder_layers": 1, "input_layernorm": False,
                       "final_norm": False, "feature": "target last_hidden_state (post final norm)"}


class ExportRefused(ModelError):
    """The draft cannot be expressed exactly in the asked format; the message says why."""


def full_vocab_head(weight: torch.Tensor, vocab: list[int]) -> torch.Tensor:
    """(V, H) LM head → (V, H) head whose argmax over all V rows equals the argmax over `vocab`'s rows (ties to the
    lowest id): every row outside `vocab` is a copy of the row of d = min(vocab). Needs every outside id > d."""
    V = weight.shape[0]
    d = min(vocab)
    outside = torch.ones(V, dtype=torch.bool)
    outside[torch.tensor(vocab)] = False
    first_out = int(outside.nonzero()[0]) if outside.any() else None
    if first_out is not None and first_out < d:
        raise ExportRefused(f"token {first_out} is outside the draft vocabulary and below its smallest id {d}: vLLM's "
                            f"Llama LM head has no bias, so rows outside the vocabulary can only be kept from winning "
                            f"the argmax as copies of row {d} that lose ties to it (argmax keeps the first maximum), "
                            f"which needs every outside id above {d}")
    out = weight.detach().clone()
    out[outside] = weight[d].detach()
    return out  # (V, H)


def export_hf(draft_path: str | Path, out: str | Path, target_path: str) -> Path:
    """The Llama draft at `draft_path` as a plain HF checkpoint covering the target's vocabulary (module doc)."""
    if is_fspad_head(draft_path):
        raise ExportRefused(f"{draft_path} is an FSPAD head (draft.kind=fspad): export it with --format eagle")
    from learner.eagle3 import is_eagle3_head

    if is_eagle3_head(draft_path):
        raise ExportRefused(f"{draft_path} is an EAGLE-3 head (draft.kind=eagle3): export it with --format eagle3")
    tok = load_tokenizer(target_path)
    from transformers import AutoConfig

    V = AutoConfig.from_pretrained(target_path).vocab_size
    model = load_draft(str(draft_path), tok, torch.float32, "cpu", V)
    vocab = load_draft_vocab(draft_path, V)
    meta = {"format": "hf", "method": METHOD["hf"], "source": str(Path(draft_path).resolve()),
            "draft_vocab_size": None if vocab is None else len(vocab), "vocab_size": V}
    if vocab is not None and len(vocab) < V:
        head = full_vocab_head(model.get_output_embeddings().weight, vocab)
        model.config.tie_word_embeddings = False
        model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
        model.lm_head.weight = torch.nn.Parameter(head)
        meta |= {"outside_rows": f"copies of row {min(vocab)}",
                 "exact_for": "argmax drafting (vLLM speculative_config draft_sample_method=greedy)"}
    else:
        meta["exact_for"] = "every draft_sample_method (the draft's own full-vocabulary head)"

    def write(d: Path) -> None:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        (d / EXPORT_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    return atomic_dir(Path(out), write)


def eagle_refusals(cfg: dict, state: dict[str, torch.Tensor], vocab: list[int] | None) -> list[str]:
    """Why an FSPAD head (config.json `cfg`, own weights `state`) is not exactly an EAGLE-1 head; [] when it is."""
    why = []
    arch = cfg.get("architecture") or {}
    for key, want in EAGLE1_ARCHITECTURE.items():
        if arch.get(key) != want:
            why.append(f"its architecture has {key}={arch.get(key)!r}, EAGLE-1 {want!r}")
    if vocab is not None and len(vocab) < cfg["target"]["vocab_size"]:
        why.append(f"it drafts from a reduced vocabulary ({len(vocab)} of {cfg['target']['vocab_size']} ids), but "
                   f"EAGLE-1 drafts with the target's full LM head, which vLLM shares with it (EAGLE-3's d2t "
                   f"carries a reduced vocabulary: --format eagle3)")
    bias = state.get("fc.bias")
    if bias is not None and bool(bias.abs().max() > 0):
        why.append(f"its fusion fc has a bias (max |b| = {float(bias.abs().max()):.3g}), but vLLM's EAGLE-1 fc "
                   f"(llama_eagle.py: ReplicatedLinear(2H, H, bias=False)) has none and would not load it; a head "
                   f"built without it (or with b = 0) exports exactly")
    extra = sorted(k for k in state if k not in ("fc.weight", "fc.bias") and not k.startswith("layer."))
    if extra:
        why.append(f"it holds weights EAGLE-1 has no place for: {', '.join(extra[:5])}")
    if any(k.startswith("layer.input_layernorm") for k in state):
        why.append("its layer has an input norm; EAGLE-1's layer 0 has none")
    return why


def speculators_config(head, target_config, target_path: str, gamma: int = 3) -> dict:
    """The config.json of an EAGLE-3 head's speculators checkpoint (module docstring)."""
    from learner.fspad import layer_config

    layer = layer_config(head.shape, getattr(target_config, "max_position_embeddings", 32768))
    layer.architectures = ["LlamaForCausalLM"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(layer, key, getattr(target_config, key, None))
    layer_dict = layer.to_dict()
    layer_dict.pop("_attn_implementation_internal", None)
    layer_dict["model_type"] = "llama"
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            "speculators_version": "draftalign", "speculators_config": {
                "algorithm": "eagle3", "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": gamma}],
                "verifier": {"name_or_path": str(target_path),
                             "architectures": list(getattr(target_config, "architectures", None) or [])}},
            "transformer_layer_config": layer_dict, "draft_vocab_size": head.lm_head.out_features,
            "target_hidden_size": head.shape["hidden_size"], "norm_before_residual": head.norm_before_residual,
            "norm_before_fc": False, "fc_norm": False, "norm_output": False,
            "eagle_aux_hidden_state_layer_ids": list(head.aux_layers), "torch_dtype": "float32"}


def speculators_weights(head) -> dict[str, torch.Tensor]:
    """The head's own weights under the speculators names (they are its own names), plus d2t and t2d."""
    w = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    d2t = head.d2t()
    if d2t is not None:
        t2d = torch.zeros(head.shape["vocab_size"], dtype=torch.bool)
        t2d[head.vocab.ids] = True
        w |= {"d2t": d2t.contiguous(), "t2d": t2d}
    return w


def export_eagle3(head_path: str | Path, out: str | Path, target_path: str) -> Path:
    """The EAGLE-3 head at `head_path` as a speculators checkpoint for vLLM (`method: eagle3`), or ExportRefused."""
    from transformers import AutoConfig

    from draftalign.models import load_causal_lm
    from learner.eagle3 import EAGLE3Head, check_target, is_eagle3_head
    from learner.eagle3 import read_config as read_eagle3

    p = Path(head_path).expanduser()
    if not is_eagle3_head(p):
        kind = "an FSPAD head (its feature is the target's post-norm last state, one layer, no hidden_norm or own " \
               "LM head: not EAGLE-3's architecture; --format eagle)" if is_fspad_head(p) else "not an EAGLE-3 head"
        raise ExportRefused(f"{head_path} is {kind}: --format eagle3 exports draft.kind=eagle3 heads")
    target_config = AutoConfig.from_pretrained(target_path)
    check_target(read_eagle3(p), target_config, str(p))
    head = EAGLE3Head.load(p, load_causal_lm(target_path))
    meta = {"format": "eagle3", "method": METHOD["eagle3"], "source": str(p.resolve()),
            "feature": "target aux hidden states (pre final norm)", "aux_layers": head.aux_layers,
            "draft_vocab_size": head.lm_head.out_features, "shared_with_target": ["embed_tokens"],
            "exact_for": "every draft_sample_method (the head's own law over its vocabulary, -inf elsewhere)"}

    def write(d: Path) -> None:
        from safetensors.torch import save_file

        save_file(speculators_weights(head), str(d / "model.safetensors"))
        cfg = speculators_config(head, target_config, target_path)
        (d / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        load_tokenizer(target_path).save_pretrained(d)
        (d / EXPORT_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    return atomic_dir(Path(out), write)


def export_eagle(head_path: str | Path, out: str | Path, target_path: str) -> Path:
    """The FSPAD head at `head_path` as an EAGLE-1 checkpoint for vLLM (`method: eagle`), or ExportRefused."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from learner.eagle3 import is_eagle3_head
    from learner.fspad import check_target, layer_config

    p = Path(head_path).expanduser()
    if is_eagle3_head(p):
        raise ExportRefused(f"{head_path} is an EAGLE-3 head (fused aux states, own norm and LM head): EAGLE-1 has "
                            f"no place for them; export it with --format eagle3")
    if not is_fspad_head(p):
        raise ExportRefused(f"{head_path} is not an FSPAD head: --format eagle exports draft.kind=fspad heads; a "
                            f"Llama draft exports with --format hf")
    cfg = read_config(p)
    target_config = AutoConfig.from_pretrained(target_path)
    check_target(cfg["target"], target_config, str(p))
    state = load_file(str(p / WEIGHTS_FILE))
    vocab = load_draft_vocab(p, cfg["target"]["vocab_size"])
    why = eagle_refusals(cfg, state, vocab)
    if why:
        raise ExportRefused(f"FSPAD head {p} is not exactly an EAGLE-1 head: " + "; ".join(why))
    weights = {"fc.weight": state["fc.weight"]} | {
        "layers.0." + k.removeprefix("layer."): v for k, v in state.items() if k.startswith("layer.")}
    llama = layer_config(cfg["target"], getattr(target_config, "max_position_embeddings", 32768))
    llama.architectures = ["LlamaForCausalLM"]  # vLLM's EAGLEConfig maps it to EagleLlamaForCausalLM
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(llama, key, getattr(target_config, key, None))
    meta = {"format": "eagle", "method": METHOD["eagle"], "source": str(p.resolve()),
            "feature": EAGLE1_ARCHITECTURE["feature"], "shared_with_target": ["embed_tokens", "lm_head"],
            "exact_for": "every draft_sample_method (the head's own full-vocabulary law)"}

    def write(d: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.float().contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
        cfg_dict = llama.to_dict()
        cfg_dict.pop("_attn_implementation_internal", None)
        (d / "config.json").write_text(json.dumps(cfg_dict, indent=1) + "\n")
        load_tokenizer(target_path).save_pretrained(d)
        (d / EXPORT_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    return atomic_dir(Path(out), write)


def export_draft(draft_path: str | Path, out: str | Path, fmt: str, target_path: str) -> Path:
    """`draftalign export`: `draft_path` in format `fmt` (FORMATS) at `out`, for the target at `target_path`."""
    if fmt not in FORMATS:
        raise ModelError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not Path(draft_path).expanduser().exists():
        raise ModelError(f"draft {draft_path} does not exist")
    if Path(out).expanduser().resolve() == Path(draft_path).expanduser().resolve():
        raise ModelError(f"export destination {out} is the draft itself: give another directory")
    return {"hf": export_hf, "eagle": export_eagle, "eagle3": export_eagle3}[fmt](draft_path, out, target_path)


def read_export(path: str | Path) -> dict | None:
    """An export's draftalign_export.json, or None when `path` is not a draftalign export."""
    f = Path(path) / EXPORT_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def export_for_vllm(draft_path: str, target_path: str, cache: Path) -> tuple[Path, str]:
    """(a directory vLLM loads, its speculative method) for any draft the engine serves: an existing export as it
    is; else the draft exported once into `cache` (keyed by the draft's path and file times), or ExportRefused."""
    meta = read_export(draft_path)
    if meta is not None:
        return Path(draft_path), meta["method"]
    p = Path(draft_path).expanduser().resolve()
    from learner.eagle3 import is_eagle3_head

    fmt = "eagle3" if is_eagle3_head(p) else "eagle" if is_fspad_head(p) else "hf"
    import hashlib

    stamp = "|".join(f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in sorted(p.iterdir())
                     if f.is_file())
    dest = cache / f"{p.name}-{fmt}-{hashlib.md5(f'{p}|{target_path}|{stamp}'.encode()).hexdigest()[:12]}"
    if read_export(dest) is None:  # atomic_dir replaces a half-written or foreign directory
        export_draft(p, dest, fmt, target_path)
    return dest, METHOD[fmt]


def vllm_speculative_config(export_dir: str | Path, method: str, gamma: int) -> dict:
    """vLLM's speculative_config for an export: greedy (argmax) drafting, which the hf export's copies of one row
    are exact for, and γ draft tokens per round."""
    return {"method": method, "model": str(export_dir), "num_speculative_tokens": gamma,
            "draft_sample_method": "greedy"}
