"""The tokenizer rebuilt from the default model's GGUF metadata must encode and decode exactly like
SmolLM2's original tokenizer.json (the `tokenizers` library is the reference)."""

from __future__ import annotations

import pathlib
import random

import pytest

from tinker._tokenizer import build_gguf_tokenizer, load_hf_tokenizer

FIXTURE_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "smollm2-tokenizer"

# SmolLM2's chat format (tokenizer.chat_template), written out by hand.
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]  # fmt: skip

# Published vectors quoted in fixtures/smollm2-tokenizer/SOURCE.md (llm-inference-cpp tokenizer_test.cpp).
PUBLISHED_VECTORS = [
    ("Hello, world!", [19556, 28, 905, 17]),
    ("The year 2026 had 365 days.", [504, 713, 216, 34, 32, 34, 38, 761, 216, 35, 38, 37, 2009, 30]),
    ("I'm here, they're not  ", [57, 5248, 1535, 28, 502, 2316, 441, 256]),
    ("<|im_start|>user\nHi<|im_end|>", [1, 4093, 198, 26843, 2]),
    ("naïve café 東京 🙂", [3546, 46494, 37366, 17097, 247, 126, 16736, 122, 47526]),
    ("   leading and trailing   ", [256, 2899, 284, 35079, 333]),
    ("x\n\n\ny", [104, 1116, 198, 105]),
    ("int main() { return 0; }", [591, 1085, 1000, 1662, 1003, 216, 32, 43, 4029]),
    ("", []),
    ("a\x04b\x00c", [81, 82, 190, 83]),  # \x04 has no byte token and is dropped
]

CORPUS = [
    "Hello world! 123",
    "The capital of France is",
    "Ελληνικά, русский язык, עברית, العربية, हिन्दी, ไทย, 한국어, 日本語のテキスト, 中文字符",
    "emoji 👩‍👩‍👧‍👦 🇫🇷 🏳️‍🌈 👍🏽 ❤️ 🤖",
    "3.14159265358979 1,000,000 -42 1e-10 0x1F 007 ١٢٣ ४५६ １２３ ½ ² Ⅻ",
    "12345678901234567890123456789012345678901234567890",
    "def f(x):\n\treturn {'a': [x**2 for x in range(10)]}  # comment\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 1 << 3); return 0; }",
    "    \n\n\t\t  \r\n \u00a0 \u2003\u3000x   ",
    "\t\tindented\n\t\t\tmore\n",
    " ",
    "\n",
    "                                                  ",
    "I'm, you're, he's, she'd, we'll, they've, don't, can't, 'S 'T 'RE 'VE 'M 'LL 'D",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|endoftext|><|endoftext|>",
    "<|im_start|<|im_end|> <|im_start|>x<|im_end",
    "<repo_name>owner/repo<file_sep>path.py<gh_stars>10<jupyter_code>print(1)<empty_output>",
    "a\x04b\x00c",
    "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x7f",
    "\u0300\u0301 e\u0301 ñ vs n\u0303, ﬁ ﬂ Å Å",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "\U00040000\U0004abcd\U00080000 planes 4-11 lose their UTF-8 lead byte",
    "\U0010ffff\U000e0041 tags and the last code point",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "!!!???... --- *** ((())) [[[]]] {{{}}} <<<>>> ~~~ ```",
    "CamelCaseIdentifier snake_case_identifier SCREAMING_CASE kebab-case",
    "ALL CAPS SHOUTING AND lower case whisper",
    "a . b , c ! d ? e 's f n't I 'm we 're",  # decode must not "clean up" spaces
    "$\\sum_{i=0}^{n} x_i^2 = \\frac{a}{b}$ ∀x∈ℝ: x²≥0 ∮ ∇·E = ρ/ε₀",
    "a" * 500,
    "🙂" * 50,
]


def test_engine_reader_metadata_equals_gguf_package(smollm2_gguf_metadata, smollm2_gguf_path):
    """The tokenizer is built from metadata read by the engine's C reader (conftest); it must equal
    what the gguf package reads, value for value."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(smollm2_gguf_path)
    theirs = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert set(smollm2_gguf_metadata) == set(theirs)
    for key, value in theirs.items():
        ours = smollm2_gguf_metadata[key]
        if isinstance(value, float):
            assert ours == pytest.approx(value, rel=1e-7), key
        else:
            assert ours == value, key


@pytest.fixture(scope="module")
def tok(smollm2_gguf_metadata):
    return build_gguf_tokenizer(smollm2_gguf_metadata, "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def ref():
    if not FIXTURE_DIR.is_dir():
        pytest.skip(f"reference tokenizer fixture directory {FIXTURE_DIR} is absent")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(FIXTURE_DIR / "tokenizer.json"))


def _golden_cases() -> list[tuple[str, list[int]]]:
    cases = []
    for line in (FIXTURE_DIR / "golden_smollm2.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            hex_text, _, ids = line.partition("\t")
            cases.append((bytes.fromhex(hex_text).decode("utf-8"), [int(i) for i in ids.split()]))
    return cases


def _random_texts(n: int, seed: int = 20240601) -> list[str]:
    """Strings over many scripts, whitespace, digits, controls, emoji and special tokens."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E, 30), (0x00, 0x1F, 3), (0x7F, 0xFF, 4), (0x100, 0x24F, 3), (0x300, 0x36F, 2),
        (0x370, 0x3FF, 2), (0x400, 0x4FF, 3), (0x590, 0x5FF, 2), (0x600, 0x6FF, 3), (0x900, 0x97F, 3),
        (0xE00, 0xE7F, 2), (0x1100, 0x11FF, 1), (0x2000, 0x206F, 3), (0x2190, 0x23FF, 2),
        (0x3000, 0x30FF, 3), (0x4E00, 0x9FFF, 5), (0xAC00, 0xD7A3, 3), (0xE000, 0xF8FF, 1),
        (0xFB00, 0xFFFD, 2), (0x1F300, 0x1FAFF, 4), (0x10000, 0x3FFFF, 1), (0x40000, 0xBFFFF, 1),
        (0xE0000, 0x10FFFF, 1),
    ]  # fmt: skip
    weights = [w for _, _, w in ranges]
    pieces = [" ", "  ", "\n", "\t", "\r\n", "'s", "'ll", "0123456789", "<|im_start|>", "<|im_end|>",
              "<|endoftext|>", "<jupyter_code>", "<|im_", "\u200d", "\ufe0f"]  # fmt: skip
    texts = []
    for _ in range(n):
        out = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.12:
                out.append(rng.choice(pieces))
            else:
                lo, hi, _ = rng.choices(ranges, weights)[0]
                out.append(chr(rng.randint(lo, hi)))
        texts.append("".join(out))
    return texts


def _assert_same_as_reference(tok, ref, texts):
    mismatches = []
    for text in texts:
        want = ref.encode(text, add_special_tokens=False).ids
        got = tok.encode(text, add_special_tokens=False)
        if got != want:
            mismatches.append(("encode", text, got, want))
            continue
        want_text = ref.decode(want, skip_special_tokens=False)
        got_text = tok.decode(got, skip_special_tokens=False)
        if got_text != want_text:
            mismatches.append(("decode", text, got_text, want_text))
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first ones: {mismatches[:5]}"


def test_golden_vectors(tok, ref):
    cases = _golden_cases()
    assert len(cases) == 38
    for text, ids in cases:
        assert ref.encode(text, add_special_tokens=False).ids == ids, f"fixture disagrees with itself on {text!r}"
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text, text
    _assert_same_as_reference(tok, ref, [text for text, _ in cases])


def test_published_vectors(tok, ref):
    for text, ids in PUBLISHED_VECTORS:
        assert tok.encode(text) == ids, text
    _assert_same_as_reference(tok, ref, [text for text, _ in PUBLISHED_VECTORS])


def test_dropped_bytes_are_dropped(tok):
    # 21 byte values have no token; the reference drops them silently (SOURCE.md).
    assert tok.encode("a\x04b\x00c") == [81, 82, 190, 83]
    assert tok.decode(tok.encode("a\x04b\x00c")) == "ab\x00c"
    assert tok.encode("\x04\x06\x13\x14\x16\x1d") == []
    # U+40000 is F1 80 80 80 in UTF-8: the lead byte F1 is one of the missing ones.
    assert tok.decode(tok.encode("\U00040000")) != "\U00040000"


def test_corpus(tok, ref):
    _assert_same_as_reference(tok, ref, CORPUS)


def test_random_strings(tok, ref):
    _assert_same_as_reference(tok, ref, _random_texts(3000))


def test_vocab_and_tokens_match_reference(tok, ref):
    assert len(tok) == ref.get_vocab_size() == 49152
    assert tok.get_vocab() == ref.get_vocab(with_added_tokens=True)
    assert tok.convert_ids_to_tokens(list(range(49152))) == [ref.id_to_token(i) for i in range(49152)]


def test_special_tokens(tok, ref):
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)
    specials = {i: t.content for i, t in tok.added_tokens_decoder.items() if t.special}
    assert specials == dict(enumerate(SPECIAL_TOKENS))
    for i, content in enumerate(SPECIAL_TOKENS):
        assert tok.encode(f"x{content}y") == [104, i, 105]
    ids = [1, 4093, 198, 26843, 2]
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True) == "user\nHi"
    assert tok.model_max_length == 8192


def test_add_special_tokens_adds_nothing(tok):
    for text in ["Hello, world!", "", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=False)
        assert tok(text)["input_ids"] == tok.encode(text, add_special_tokens=False)


def test_add_bos_and_eos_flags(smollm2_gguf_metadata):
    meta = dict(smollm2_gguf_metadata, **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    t = build_gguf_tokenizer(meta)
    assert t.encode("Hello, world!") == [1, 19556, 28, 905, 17, 2]
    assert t.encode("Hello, world!", add_special_tokens=False) == [19556, 28, 905, 17]


def test_chat_template(tok, ref, smollm2_gguf_metadata):
    assert tok.chat_template == smollm2_gguf_metadata["tokenizer.chat_template"]
    user_only = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True)
    assert text == DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = tok.apply_chat_template(conversation, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.encode(text)[:3] == [1, 9690, 198]  # <|im_start|> system \n


def test_unsupported_pre_tokenizer(smollm2_gguf_metadata):
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='no-such-pre'.*smollm"):
        build_gguf_tokenizer(dict(smollm2_gguf_metadata, **{"tokenizer.ggml.pre": "no-such-pre"}))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='llama'.*gpt2"):
        build_gguf_tokenizer(dict(smollm2_gguf_metadata, **{"tokenizer.ggml.model": "llama"}))


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        # Llama 3 groups digits by three and matches contractions case-insensitively.
        ("llama-bpe", ["Hello", "Ġ", "123", "45", "ĠI", "'M", "ĊĊ", "Ġx"]),
        ("qwen2", ["Hello", "Ġ", "1", "2", "3", "4", "5", "ĠI", "'M", "ĊĊ", "Ġx"]),
        ("gpt2", ["Hello", "Ġ12345", "ĠI", "'", "M", "ĊĊ", "Ġx"]),
        ("smollm", ["Hello", "Ġ", "1", "2", "3", "4", "5", "ĠI", "'", "M", "ĊĊ", "Ġx"]),
    ],
)
def test_pre_tokenizer_variants(smollm2_gguf_metadata, pre, pieces):
    t = build_gguf_tokenizer(dict(smollm2_gguf_metadata, **{"tokenizer.ggml.pre": pre}))
    split = t.backend_tokenizer.pre_tokenizer.pre_tokenize_str("Hello 12345 I'M\n\n x")
    assert [piece for piece, _ in split] == pieces


def test_llama_bpe_defaults_to_bos(smollm2_gguf_metadata):
    meta = {k: v for k, v in smollm2_gguf_metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    meta["tokenizer.ggml.pre"] = "llama-bpe"
    assert build_gguf_tokenizer(meta).encode("Hi")[0] == 1  # llama.cpp adds BOS for llama3 unless told not to


def test_load_hf_tokenizer(tmp_path, ref):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_hf_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_bytes((FIXTURE_DIR / "tokenizer.json").read_bytes())
    t = load_hf_tokenizer(str(tmp_path))
    for text, ids in PUBLISHED_VECTORS:
        assert t.encode(text, add_special_tokens=False) == ids


def test_user_defined_tokens_are_matched_but_not_special(smollm2_gguf_metadata):
    token_types = list(smollm2_gguf_metadata["tokenizer.ggml.token_type"])
    token_types[3] = 4  # <repo_name> as a user-defined token, e.g. Qwen's <think>
    t = build_gguf_tokenizer(dict(smollm2_gguf_metadata, **{"tokenizer.ggml.token_type": token_types}))
    assert t.encode("a<repo_name>b") == [81, 3, 82]
    assert t.decode([81, 3, 82, 2], skip_special_tokens=True) == "a<repo_name>b"
