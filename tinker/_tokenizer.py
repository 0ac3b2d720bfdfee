"""Tokenizers for the models tinker loads: rebuilt from GGUF metadata, or read from a local checkpoint.

A GGUF file carries no ``tokenizer.json``; its tokenizer lives in metadata (``tokenizer.ggml.*``:
vocab, merges, token types, special ids, flags, chat template). transformers' own GGUF path is not
a faithful copy for every model (for SmolLM2 it omits the digit split; 4.4x also adds BOS and
mislabels EOS), so ``build_gguf_tokenizer`` rebuilds the byte-level BPE tokenizer the model was
trained with, using the ``tokenizers`` library, and wraps it in a
``transformers.PreTrainedTokenizerFast`` so that user code (``encode``, ``decode``,
``apply_chat_template``) works as with the original. A local Hugging Face checkpoint already has
its tokenizer files: ``load_hf_tokenizer`` loads them with ``AutoTokenizer``.
"""

from __future__ import annotations

import os
from functools import lru_cache

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ._quiet import import_transformers

transformers = import_transformers()  # without the notices it would print (see _quiet)

__all__ = ["build_gguf_tokenizer", "load_hf_tokenizer", "token_bytes"]

_SPECIAL_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}

# tokenizer.ggml.token_type values (gguf constants.py)
_CONTROL = 3
_USER_DEFINED = 4

# Split regexes, as in the models' own tokenizer.json (llama.cpp uses case-expanded equivalents).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer factory, normalizer factory, ignore_merges, default add_bos)
# ignore_merges and the add_bos default follow llama.cpp (llama-vocab.cpp) and the HF tokenizer.json.
_PRE_TOKENIZERS = {
    "default": (_gpt2_byte_level, None, False, False),
    "gpt2": (_gpt2_byte_level, None, False, False),
    "smollm": (
        lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _gpt2_byte_level()]
        ),
        None,
        False,
        False,
    ),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_REGEX), None, True, True),
    "qwen2": (lambda: _split_then_bytes(_QWEN2_REGEX), normalizers.NFC, False, False),
}


def build_gguf_tokenizer(meta: dict, name_or_path: str = "") -> transformers.PreTrainedTokenizerFast:
    """Build the tokenizer a GGUF file describes from its metadata (key -> plain Python value)."""
    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model tokenizer.ggml.model={model_type!r}: "
            "only 'gpt2' (byte-level BPE) is supported"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; "
            f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    make_pre, make_normalizer, ignore_merges, default_add_bos = _PRE_TOKENIZERS[pre]
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string keeps its first id
    bpe = models.BPE(
        vocab,
        [tuple(m.split(" ", 1)) for m in merges],
        unk_token=None,  # bytes with no token are dropped, as by the original tokenizer
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=ignore_merges,
    )
    tok = Tokenizer(bpe)
    if make_normalizer is not None:
        tok.normalizer = make_normalizer()
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special; user-defined ones are plain added tokens. Both are matched whole in text.
    typed = list(zip(tokens, token_types))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == _USER_DEFINED])

    ids = {name: meta.get(f"tokenizer.ggml.{key}_token_id") for name, key in _SPECIAL_IDS.items()}
    ids = {name: i for name, i in ids.items() if isinstance(i, int) and 0 <= i < len(tokens)}
    specials = {name: tokens[i] for name, i in ids.items()}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)) and "bos_token" in ids
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in ids
    if add_bos or add_eos:
        def template(seq: str, type_id: int) -> list[str]:
            return (
                [f"{specials['bos_token']}:{type_id}"] * add_bos
                + [f"${seq}:{type_id}"]
                + [f"{specials['eos_token']}:{type_id}"] * add_eos
            )

        used = [name for name, on in (("bos_token", add_bos), ("eos_token", add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=template("A", 0),
            pair=template("A", 0) + template("B", 1),
            special_tokens=list({specials[name]: ids[name] for name in used}.items()),
        )

    extra = {}
    context_length = meta.get(f"{meta.get('general.architecture')}.context_length")
    if isinstance(context_length, int):
        extra["model_max_length"] = context_length
    if meta.get("tokenizer.chat_template"):
        extra["chat_template"] = meta["tokenizer.chat_template"]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        name_or_path=name_or_path,
        add_bos_token=add_bos,  # transformers 5 rebuilds the post-processor from these two
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,  # decode must give back the text, as the original does
        **specials,
        **extra,
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_hf_tokenizer(directory: str):
    """The tokenizer of a local Hugging Face checkpoint directory (never downloads)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory {directory!r} does not exist")
    if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {directory!r}: expected one of {', '.join(_TOKENIZER_FILES)}; "
            "copy the tokenizer files of the checkpoint into that directory"
        )
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """Each token id's bytes (byte-level BPE pieces mapped back to bytes; other pieces as UTF-8)."""
    decoder = _byte_decoder()
    out = []
    for piece in tokenizer.convert_ids_to_tokens(list(range(vocab_size))):
        if piece is None:
            out.append(b"")
        elif all(ch in decoder for ch in piece):
            out.append(bytes(decoder[ch] for ch in piece))
        else:
            out.append(tokenizer.convert_tokens_to_string([piece]).encode("utf-8"))
    return out
