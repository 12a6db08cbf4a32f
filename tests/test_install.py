"""The checkout's top-level kernels/ folder is installed as calft.kernels and must never shadow
Hugging Face's `kernels` package (transformers >= 5.25 imports it) when Python runs from the
repository root, as `python -m calft.train` and `python -m pytest` do."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.find_spec("kernels")
import transformers.activations  # imports HF kernels where transformers depends on it
import calft.kernels.sparse_kl, calft.kernels.linear_sparse_kl
try:
    from importlib.metadata import distribution
    hf_kernels = str(distribution("kernels").locate_file(""))
except Exception:  # older transformers do not depend on it
    hf_kernels = None
print(json.dumps({"kernels": None if spec is None else (spec.origin, list(spec.submodule_search_locations or [])),
                  "hf_kernels_installed": hf_kernels is not None,
                  "sparse_kl": calft.kernels.sparse_kl.__file__, "path0": sys.path[0]}))
"""


def run_probe(args, cwd):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_folder_does_not_shadow_hf_kernels_from_repo_root(tmp_path):
    # `python -m` puts the working directory first on sys.path, like `python -m calft.train`.
    out = run_probe(["-c", PROBE], ROOT)
    assert out["path0"] == ""  # the working directory (the repository root) comes first
    checkout_kernels = ROOT / "kernels"
    if out["hf_kernels_installed"]:
        # find_spec must resolve to the installed package, not to the checkout's folder
        origin, locations = out["kernels"]
        assert origin is not None and Path(origin).resolve().parent != checkout_kernels.resolve()
        assert all(Path(p).resolve() != checkout_kernels.resolve() for p in locations)
    elif out["kernels"] is not None:
        # without HF kernels installed, the checkout's folder can show up only as a namespace
        # portion: no loader, nothing executed, and transformers' version check says "absent"
        assert out["kernels"][0] is None
    assert not (checkout_kernels / "__init__.py").exists()  # a regular package would shadow
    assert Path(out["sparse_kl"]).resolve() == (checkout_kernels / "sparse_kl.py").resolve()


def test_calft_kernels_importable_from_elsewhere(tmp_path):
    out = run_probe(["-c", PROBE], tmp_path)
    assert out["sparse_kl"].endswith("sparse_kl.py")


def test_lora_wrapping_and_adapter_loading_print_no_deprecation_warning(tiny_model_dir, tmp_path):
    """transformers 5.25 deprecated a property that PEFT reads whenever it wraps a model: the main
    job must not print that FutureWarning (nor any other deprecation) on the newest versions."""
    import warnings

    from peft import PeftModel

    from calft.models import add_lora, load_model, quiet_peft

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model = add_lora(load_model(str(tiny_model_dir)), dropout=0.0)
        model.save_pretrained(str(tmp_path / "adapter"))
        with quiet_peft():
            PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(tmp_path / "adapter"))
