"""Sampling (tinker._sampling) against transformers / peft in float32 on the same weights.

What is checked, and how:
1. Greedy (temperature 0) continuations equal transformers' `generate(do_sample=False,
   max_new_tokens=64)` token for token, on SmolLM2 (chat-template and plain-text prompts) and on
   tiny random llama / qwen2 / qwen3 checkpoints, with and without a LoRA adapter holding random
   non-zero A and B (reference: peft with the same values). Both sides stop only on the model's EOS
   (SmolLM2: <|im_end|>, the tiny checkpoints: config eos_token_id 2), which is included in tokens.
   SmolLM2 and tiny Q4_0 / Q4_1 / Q8_0 GGUF files (no tokenizer, so no EOS: 64 tokens) decode
   through the quantized weight copies (test_decode_kernel.py), 1 to 11 sequences a step.
   A divergence is accepted only where the reference's top-2 logit gap is <= 1e-3 (reported as a
   warning), and every later engine token must still be a reference argmax (within 1e-3) given the
   engine's own prefix. Greedy logprobs are under the temperature-1 distribution, within 1e-3.
2. prompt_logprobs and topk_prompt_logprobs equal transformers' log_softmax within 1e-3 absolute
   (entry 0 None; top-k sorted descending; ids equal to the reference's except ties within 1e-3).
3. Sampled-token logprobs equal log_softmax(logits / temperature) of the reference at that step
   (teacher-forced on prompt + generated prefix), within 1e-3, at temperatures 0.7 and 1.3. The
   empirical first-token distribution of 512 draws matches the reference distribution by Pearson's
   chi-square test (bins of expected count >= 5, the rest pooled; fails at p < 1e-4, exact p-value),
   at temperature 1, at 0.7 and with top_k 5 (renormalised). top_k / top_p / min_p: every drawn
   first token lies in the allowed set computed from the reference logits.
4. Stop strings spanning token boundaries (str and list), ending exactly at a token boundary or
   inside a token; stop token ids; EOS; max_tokens 0 and 1; 64 samples in one call; the context
   limit on a tiny model with 32 positions; bad requests raise BadRequestError and the engine keeps
   serving.
5. Seeds: the same seed gives the same output, other seeds differ. A snapshot taken before training
   keeps sampling the same after the adapter trains; the live adapter's output changes.
6. Concurrency: 64 single-sample requests submitted before any result is read (tiny qwen2, mixed
   settings, base / live adapter / snapshot) and sample() from 64 threads (tiny llama) and 16 threads
   (SmolLM2) equal the same requests run one by one: identical tokens and stop reasons, logprobs
   within 1e-4 (a batched pass may sum in another order).

The engine's logits differ from transformers' by ~4e-5 on SmolLM2 (sampled and prompt logprobs by
~2e-5), so every 1e-3 bound above has a wide margin. The chi-square test at 512 draws rejects a
sampler whose temperature is off by 15% in ~97% of seeds (measured with numpy draws), and a correct
one with probability 1e-4; the seeds are fixed, so the outcome is deterministic.

The SmolLM2 reference is `reference_sampling.llama_from_gguf` (identical weights to transformers'
own GGUF loader, 3x faster); the tiny checkpoints get a word-level tokenizer whose EOS is the
config's (id 2), as a real checkpoint would have. The reference runs with one torch thread (decode
steps are tiny GEMVs; on a loaded 2-core machine two OpenMP threads made generate() 5x slower).
"""

from __future__ import annotations

import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import reference_sampling as rs  # noqa: E402
import reference_training as rt  # noqa: E402
import tiny_models as tm  # noqa: E402

from tinker import _sampling, _training  # noqa: E402
from tinker._engine import load_model  # noqa: E402
from tinker._exceptions import BadRequestError  # noqa: E402

LP_TOL = 1e-3  # |engine logprob - reference logprob|
CONCURRENT_LP_TOL = 1e-4  # the same request alone vs batched with others
CHI2_ALPHA = 1e-4  # a correct sampler fails a goodness-of-fit test with this probability (seeds fixed: never)
GREEDY_TOKENS = 64

SMOL_PROMPTS = {
    "chat_capital": ("chat", "What is the capital of France?"),
    "chat_haiku": ("chat", "Write a haiku about the sea."),
    "text_story": ("text", "Once upon a time, in a small village,"),
    "text_code": ("text", "def fibonacci(n):\n"),
}
SMOL_GREEDY_PROMPTS = ("chat_capital", "chat_haiku", "text_story")
SMOL_LORA_PROMPTS = ("text_code",)
SMOL_LORA_RANK, SMOL_LORA_GAIN = 8, 0.1
DIST_PROMPT = "My favorite color is"  # next-token entropy ~4.4 nats on SmolLM2: many bins

TINY_SEEDS = {"llama": 41, "qwen2": 42, "qwen3": 43}
# tiny GGUF files whose projections decode through the quantized kernel (Q4_0 / Q4_1 / Q8_0 blocks), one
# where the fused q|k|v cannot (q Q8_0, k and v Q4_1) and decodes through float32 beside the others:
# name -> (arch, seed, make_hf_model keyword arguments, tensor type or mix)
TINY_GGUF = {
    "gguf_llama_Q4_1": ("llama", 45, dict(vocab=500), "Q4_1"),  # lm_head rows not a multiple of 16
    "gguf_llama_tied_smollm2_mix": ("llama", 46, dict(tied=True), tm.smollm2_mix),  # Q8_0 head = embedding
    "gguf_qwen2_Q4_0": ("qwen2", 47, {}, "Q4_0"),
    "gguf_qwen3_Q8_0": ("qwen3", 48, {}, "Q8_0"),
    "gguf_llama_q_apart": ("llama", 49, {}, lambda name, shape: "Q8_0" if "attn_q" in name else "Q4_1"),
    # 12 query heads on one kv head: decode attention splits a kv head's query heads into tasks
    "gguf_llama_gqa12": ("llama", 50, dict(hidden=96, heads=12, kv_heads=1), "Q8_0"),
}
TINY_EOS = 2  # tiny_models.tiny_config
TINY_LORA_RANK, TINY_LORA_GAIN = 4, 0.3
SHORT_CONTEXT = 32


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def sample(model, prompt, **kwargs):
    return _sampling.sample(model, list(map(int, prompt)), **kwargs)


def check_result(res, num_samples: int, max_tokens: int, vocab: int, eos: int | None = None, stop_ids=()):
    """The shape and invariants every SampleResult must have."""
    assert len(res.sequences) == num_samples, f"{len(res.sequences)} sequences for num_samples={num_samples}"
    for i, seq in enumerate(res.sequences):
        tokens = [int(t) for t in seq.tokens]
        assert seq.logprobs is not None and len(seq.logprobs) == len(tokens), (
            f"sequence {i}: {None if seq.logprobs is None else len(seq.logprobs)} logprobs for {len(tokens)} tokens")
        assert all(0 <= t < vocab for t in tokens), f"sequence {i}: token outside [0, {vocab}): {tokens}"
        lps = np.asarray(seq.logprobs, dtype=np.float64)
        assert np.all(np.isfinite(lps)) and np.all(lps <= 1e-6), f"sequence {i}: logprobs {lps}"
        assert len(tokens) <= max_tokens, f"sequence {i}: {len(tokens)} tokens > max_tokens {max_tokens}"
        if seq.stop_reason == "length":
            assert len(tokens) == max_tokens, f"sequence {i}: stop_reason 'length' after {len(tokens)}/{max_tokens}"
        else:
            assert seq.stop_reason == "stop", f"sequence {i}: stop_reason {seq.stop_reason!r}"
        enders = set(stop_ids) | ({eos} if eos is not None else set())
        if enders:
            early = [t for t in tokens[:-1] if t in enders]
            assert not early, f"sequence {i}: stop/EOS token {early[0]} inside the sequence did not stop it"


# ---- models -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_ref(smollm2_gguf_path):
    return rs.llama_from_gguf(smollm2_gguf_path)  # = from_pretrained(gguf_file=...), 3x faster


@pytest.fixture(scope="module")
def smol_eos(smollm2):
    eos = smollm2.tokenizer.eos_token_id
    assert eos is not None
    return int(eos)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference decodes one token at a time: tiny GEMVs, where a second OpenMP thread only adds
    synchronisation, and on a loaded 2-core machine makes generate() ~5x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)  # fmt: skip
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def smol_prompt(smollm2, name: str) -> list[int]:
    kind, text = SMOL_PROMPTS[name]
    tok = smollm2.tokenizer
    return chat_ids(tok, text) if kind == "chat" else list(tok.encode(text))


class LoraPair:
    """An engine adapter holding random non-zero A and B, and a peft model with the same values."""

    def __init__(self, engine_model, reference, rank: int, gain: float, seed: int):
        self.shapes = rt.expected_tensor_shapes(reference.config, rank)
        self.values = rt.random_adapter_values(self.shapes, seed, gain=gain)
        self.adapter = _training.LoraAdapter(engine_model, rank=rank, seed=seed)
        got = {k: tuple(np.shape(v)) for k, v in self.adapter.parameters().items()}
        assert got == self.shapes, "engine adapter tensors differ from peft's names/shapes"
        self.adapter.set_parameters(self.values)
        self.peft = rt.peft_model(reference, rank)
        rt.load_adapter_values(self.peft, self.values)


@pytest.fixture(scope="module")
def smol_lora(smollm2, smol_ref):
    return LoraPair(smollm2, smol_ref, SMOL_LORA_RANK, SMOL_LORA_GAIN, seed=11)


def write_tiny_tokenizer(directory, vocab: int) -> None:
    """A word-level tokenizer for a tiny checkpoint: id i is the word "t{i}", 1 is <s>, 2 is </s> (the
    config's bos / eos), so the engine finds the checkpoint's EOS the way it does for a real one."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 1 << 20}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


class TinyModels:
    """Tiny random checkpoints, built on first use: (engine model, float32 reference)."""

    def __init__(self, root):
        self.root = root
        self.models = {}
        self.loras = {}

    def get(self, name: str):
        if name not in self.models and name in TINY_GGUF:
            arch, seed, kwargs, tensor_type = TINY_GGUF[name]
            path, ref = tm.write_gguf(self.root / f"{name}.gguf", tm.make_hf_model(arch, seed=seed, **kwargs), arch,
                                      tensor_type)  # fmt: skip
            ref.generation_config.eos_token_id = None  # the file has no tokenizer, so no EOS: neither side stops
            self.models[name] = (load_model(str(path)), ref)
        if name not in self.models:
            if name == "short":
                path, ref = tm.make_hf_checkpoint(self.root / name, "llama", seed=44, max_positions=SHORT_CONTEXT)
            else:
                path, ref = tm.make_hf_checkpoint(self.root / name, name, seed=TINY_SEEDS[name])
            write_tiny_tokenizer(path, ref.config.vocab_size)  # the engine reads the EOS from the tokenizer
            self.models[name] = (load_model(str(path)), ref)
        return self.models[name]

    def lora(self, name: str) -> LoraPair:
        if name not in self.loras:
            engine, ref = self.get(name)
            self.loras[name] = LoraPair(engine, ref, TINY_LORA_RANK, TINY_LORA_GAIN, seed=_seed("lora", name))
        return self.loras[name]

    def prompt(self, name: str, length: int, salt: int = 0) -> list[int]:
        vocab = self.get(name)[1].config.vocab_size
        rng = np.random.default_rng(_seed(name, length, salt))
        return rng.integers(3, vocab, size=length).tolist()  # no BOS / EOS inside prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("sampling_models"))


# ---- 1. greedy ------------------------------------------------------------------------------------


def check_greedy_run(what, engine_model, reference, prompt, eos, adapter=None, num_samples=1):
    res = sample(engine_model, prompt, num_samples=num_samples, max_tokens=GREEDY_TOKENS, temperature=0.0,
                 adapter=adapter)  # fmt: skip
    check_result(res, num_samples, GREEDY_TOKENS, engine_model.vocab_size, eos)
    seq = res.sequences[0]
    for other in res.sequences[1:]:
        assert list(other.tokens) == list(seq.tokens), f"{what}: greedy samples of one request differ"
    ref_tokens, ref_logits = rs.greedy_generate(reference, prompt, GREEDY_TOKENS, eos)
    if [int(t) for t in seq.tokens] == ref_tokens:
        teacher = ref_logits  # the same prefixes: generate's own logits (one forward pass saved)
    else:
        teacher = rs.continuation_logits(reference, prompt, seq.tokens)
    notes = rs.check_greedy(what, seq.tokens, seq.logprobs, seq.stop_reason, ref_tokens, ref_logits, teacher,
                            GREEDY_TOKENS, eos)  # fmt: skip
    for note in notes:
        warnings.warn(note)
    return seq, ref_tokens


@pytest.fixture(scope="module")
def smol_greedy(smollm2, smol_ref, smol_eos):
    """check_greedy_run on SmolLM2 (no adapter) by prompt name, each run once per module."""
    runs = {}

    def run(name):
        if name not in runs:
            runs[name] = check_greedy_run(f"SmolLM2 {name}", smollm2, smol_ref, smol_prompt(smollm2, name), smol_eos)
        return runs[name]

    return run


@pytest.mark.parametrize("name", SMOL_GREEDY_PROMPTS)
def test_greedy_smollm2_equals_transformers(smol_greedy, name):
    smol_greedy(name)


@pytest.mark.parametrize("name", SMOL_LORA_PROMPTS)
def test_greedy_smollm2_lora_equals_peft(smollm2, smol_lora, smol_eos, name):
    prompt = smol_prompt(smollm2, name)
    seq, _ = check_greedy_run(f"SmolLM2 + LoRA {name}", smollm2, smol_lora.peft, prompt, smol_eos,
                              adapter=smol_lora.adapter)  # fmt: skip
    base = sample(smollm2, prompt, max_tokens=8, temperature=0.0).sequences[0]
    assert not np.allclose(base.logprobs, seq.logprobs[:8], atol=1e-3) or list(base.tokens) != list(seq.tokens[:8]), (
        f"{name}: the adapter did not change the greedy continuation or its logprobs")


def test_greedy_stops_at_eos_and_includes_it(smol_greedy, smol_eos):
    seq, ref_tokens = smol_greedy("chat_capital")
    assert ref_tokens[-1] == smol_eos and len(ref_tokens) < GREEDY_TOKENS, "precondition: the reference stops at EOS"
    assert seq.stop_reason == "stop" and int(seq.tokens[-1]) == smol_eos


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("arch", list(TINY_SEEDS))
def test_greedy_tiny_equals_transformers(tiny, arch, lora):
    engine, ref = tiny.get(arch)
    adapter = None
    if lora:
        pair = tiny.lora(arch)
        ref, adapter = pair.peft, pair.adapter
    for length in (1, 7, 40):
        prompt = tiny.prompt(arch, length)
        check_greedy_run(f"tiny {arch}{' + LoRA' if lora else ''}, prompt of {length}", engine, ref, prompt, TINY_EOS,
                         adapter=adapter, num_samples=2 if length == 7 else 1)  # fmt: skip


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("name", list(TINY_GGUF))
def test_greedy_tiny_gguf_equals_transformers(tiny, name, lora):
    """Decoding through the quantized weight copies (and the float32 LoRA terms beside them); 11 samples
    decode 11 rows per step."""
    engine, ref = tiny.get(name)
    assert engine.handle.quantized_bytes > 0, f"{name}: the model has no quantized copy to decode with"
    adapter = None
    if lora:
        pair = tiny.lora(name)
        ref, adapter = pair.peft, pair.adapter
    for length, num_samples in ((1, 1), (7, 2), (40, 11)):
        check_greedy_run(f"tiny {name}{' + LoRA' if lora else ''}, prompt of {length}", engine, ref,
                         tiny.prompt(name, length), None, adapter=adapter, num_samples=num_samples)  # fmt: skip


# ---- 2. prompt logprobs -----------------------------------------------------------------------------


def check_prompt_logprobs(what, res, prompt, ref_logits, k: int):
    ref = rs.log_softmax(ref_logits)  # [len(prompt), V], row i predicts prompt[i + 1]
    pl = res.prompt_logprobs
    assert pl is not None and len(pl) == len(prompt), (
        f"{what}: prompt_logprobs of length {None if pl is None else len(pl)} for a prompt of {len(prompt)}")
    assert pl[0] is None, f"{what}: prompt_logprobs[0] must be None, got {pl[0]!r}"
    want = np.array([ref[i - 1, prompt[i]] for i in range(1, len(prompt))])
    got = np.array(pl[1:], dtype=np.float64)
    err = np.abs(got - want)
    if err.size:
        i = int(np.argmax(err))
        assert err[i] <= LP_TOL, (f"{what}: prompt_logprobs[{i + 1}] = {got[i]:.6f}, transformers {want[i]:.6f} "
                                  f"(|diff| {err[i]:.2e} > {LP_TOL:g})")  # fmt: skip
    if k == 0:
        assert res.topk_prompt_logprobs is None, f"{what}: topk_prompt_logprobs without topk_prompt_logprobs > 0"
        return
    top = res.topk_prompt_logprobs
    assert top is not None and len(top) == len(prompt), f"{what}: topk_prompt_logprobs has the wrong length"
    assert top[0] is None, f"{what}: topk_prompt_logprobs[0] must be None, got {top[0]!r}"
    for pos in range(1, len(prompt)):
        entry = top[pos]
        assert entry is not None and len(entry) == k, f"{what}: position {pos} has {entry!r}, expected {k} pairs"
        ids = [int(t) for t, _ in entry]
        lps = np.array([float(lp) for _, lp in entry])
        assert len(set(ids)) == k, f"{what}: position {pos}: repeated ids {ids}"
        assert np.all(np.diff(lps) <= 0), f"{what}: position {pos}: logprobs not descending {lps}"
        row = ref[pos - 1]
        ref_ids = np.argsort(-row, kind="stable")[:k]
        assert np.all(np.abs(lps - row[ids]) <= LP_TOL), (
            f"{what}: position {pos}: top-k logprobs {lps} vs transformers {row[ids]} for ids {ids}")
        assert np.all(np.abs(lps - row[ref_ids]) <= LP_TOL), (
            f"{what}: position {pos}: top-k values {lps} vs transformers' top-k {row[ref_ids]}")
        for j, (a, b) in enumerate(zip(ids, ref_ids)):
            assert a == b or abs(row[a] - row[b]) <= LP_TOL, (
                f"{what}: position {pos} rank {j}: id {a} (logprob {row[a]:.6f}), transformers {b} "
                f"({row[b]:.6f}); only ties within {LP_TOL:g} may reorder")


def test_prompt_logprobs_smollm2(smollm2, smol_ref):
    tok = smollm2.tokenizer
    prompt = chat_ids(tok, "Name three rivers in Europe.") + list(tok.encode(" The Danube, the Rhine and"))
    res = sample(smollm2, prompt, max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=5, seed=0)
    check_result(res, 1, 1, smollm2.vocab_size)
    check_prompt_logprobs("SmolLM2", res, prompt, rs.full_logits(smol_ref, prompt), 5)


def test_prompt_logprobs_smollm2_lora(smollm2, smol_lora):
    prompt = smol_prompt(smollm2, "text_story")
    res = sample(smollm2, prompt, max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=3,
                 adapter=smol_lora.adapter, seed=0)  # fmt: skip
    check_prompt_logprobs("SmolLM2 + LoRA", res, prompt, rs.full_logits(smol_lora.peft, prompt), 3)


@pytest.mark.parametrize("arch", list(TINY_SEEDS))
def test_prompt_logprobs_tiny(tiny, arch):
    engine, ref = tiny.get(arch)
    pair = tiny.lora(arch)
    prompt = tiny.prompt(arch, 50, salt=1)
    res = sample(engine, prompt, max_tokens=2, include_prompt_logprobs=True, topk_prompt_logprobs=0, seed=0)
    check_prompt_logprobs(f"tiny {arch}", res, prompt, rs.full_logits(ref, prompt), 0)
    res = sample(engine, prompt, max_tokens=2, include_prompt_logprobs=True, topk_prompt_logprobs=8, seed=0,
                 adapter=pair.adapter)  # fmt: skip
    check_prompt_logprobs(f"tiny {arch} + LoRA", res, prompt, rs.full_logits(pair.peft, prompt), 8)


def test_prompt_logprobs_absent_unless_asked(tiny):
    engine, _ = tiny.get("llama")
    res = sample(engine, tiny.prompt("llama", 5), max_tokens=2, seed=1)
    assert res.prompt_logprobs is None and res.topk_prompt_logprobs is None
    res = sample(engine, tiny.prompt("llama", 5), max_tokens=2, seed=1, topk_prompt_logprobs=2)
    assert res.prompt_logprobs is None and res.topk_prompt_logprobs is not None


def test_prompt_logprobs_of_a_one_token_prompt(tiny):
    engine, _ = tiny.get("llama")
    res = sample(engine, [5], max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=3, seed=1)
    assert res.prompt_logprobs == [None] and res.topk_prompt_logprobs == [None]


# ---- 3. sampled logprobs, distributions, truncation ---------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("which", ["smollm2", "tiny_qwen3_lora"])
def test_sampled_logprobs_are_temperature_scaled(smollm2, smol_ref, tiny, which, temperature):
    if which == "smollm2":
        engine, ref, adapter = smollm2, smol_ref, None
        prompt = smol_prompt(smollm2, "text_story")
    else:
        engine, _ = tiny.get("qwen3")
        pair = tiny.lora("qwen3")
        ref, adapter = pair.peft, pair.adapter
        prompt = tiny.prompt("qwen3", 12, salt=2)
    res = sample(engine, prompt, num_samples=4, max_tokens=16, temperature=temperature, seed=7, adapter=adapter)
    check_result(res, 4, 16, engine.vocab_size)
    for i, seq in enumerate(res.sequences):
        tokens = [int(t) for t in seq.tokens]
        logits = rs.continuation_logits(ref, prompt, tokens)
        want = rs.log_softmax(logits, temperature)[np.arange(len(tokens)), tokens]
        err = np.abs(np.asarray(seq.logprobs, dtype=np.float64) - want)
        j = int(np.argmax(err))
        assert err[j] <= LP_TOL, (
            f"{which}, T={temperature}, sample {i}, token {j}: logprob {seq.logprobs[j]:.6f}, "
            f"log_softmax(logits / T) = {want[j]:.6f} (|diff| {err[j]:.2e}); at T=1 it would be "
            f"{rs.log_softmax(logits)[j, tokens[j]]:.6f}")


def first_tokens(engine, prompt, calls: int, per_call: int = 64, base_seed: int = 1000, **kwargs) -> list[int]:
    out = []
    for c in range(calls):
        res = sample(engine, prompt, num_samples=per_call, max_tokens=1, seed=base_seed + c, **kwargs)
        check_result(res, per_call, 1, engine.vocab_size)
        out += [int(s.tokens[0]) for s in res.sequences]
    return out


@pytest.fixture(scope="module")
def dist_case(smollm2, smol_ref):
    prompt = list(smollm2.tokenizer.encode(DIST_PROMPT))
    return prompt, rs.full_logits(smol_ref, prompt)[-1].astype(np.float64)


@pytest.mark.parametrize("temperature,top_k", [(1.0, -1), (0.7, -1), (1.0, 5)])
def test_first_token_distribution_matches_the_model(smollm2, dist_case, temperature, top_k):
    prompt, logits = dist_case
    draws = first_tokens(smollm2, prompt, calls=8, temperature=temperature, top_k=top_k,
                         base_seed=_seed(temperature, top_k) % 100000)  # fmt: skip
    lp = rs.log_softmax(logits, temperature)
    if top_k > 0:
        keep = np.argsort(-logits)[:top_k]
        masked = np.full_like(lp, -np.inf)
        masked[keep] = lp[keep]
        lp = masked - np.log(np.exp(lp[keep]).sum())
        assert set(draws) <= set(keep.tolist()), f"top_k {top_k}: drew {sorted(set(draws) - set(keep.tolist()))}"
    probs = np.exp(lp)
    counts = {t: draws.count(t) for t in set(draws)}
    stat, df, p, table = rs.chi_square(counts, probs)
    assert df >= 3, f"too few bins ({table})"
    assert p >= CHI2_ALPHA, (
        f"T={temperature}, top_k={top_k}: {len(draws)} first tokens do not follow the model's distribution: "
        f"chi-square {stat:.1f} on {df} df, p = {p:.2e} < {CHI2_ALPHA:g}; (observed, expected) per bin: {table}")


SUPPORT_CASES = {
    "top_k=1": dict(top_k=1),
    "top_k=3": dict(top_k=3),
    "top_p=0.5": dict(top_p=0.5),
    "top_p=0.9": dict(top_p=0.9),
    "min_p=0.3": dict(min_p=0.3),
    "min_p=0.05": dict(min_p=0.05),
}


@pytest.mark.parametrize("case", list(SUPPORT_CASES))
def test_truncation_restricts_the_support(smollm2, dist_case, case):
    prompt, logits = dist_case
    kwargs = SUPPORT_CASES[case]
    if "top_k" in kwargs:
        allowed = rs.allowed_top_k(logits, kwargs["top_k"])
    elif "top_p" in kwargs:
        allowed = rs.allowed_top_p(logits, kwargs["top_p"])
    else:
        allowed = rs.allowed_min_p(logits, kwargs["min_p"])
    draws = first_tokens(smollm2, prompt, calls=2, temperature=1.0, base_seed=_seed(case) % 100000, **kwargs)
    outside = sorted(set(draws) - allowed)
    tok = smollm2.tokenizer
    assert not outside, (f"{case}: drew tokens outside the allowed set {sorted(allowed)}: "
                         f"{[(t, tok.decode([t])) for t in outside]}")  # fmt: skip
    # the support is not narrower than allowed: with enough mass beside the top token, others are drawn
    probs = np.exp(rs.log_softmax(logits))
    allowed_list = sorted(allowed)
    mass = probs[allowed_list] / probs[allowed_list].sum()
    p_only_top = mass.max() ** len(draws)
    if p_only_top < 1e-9:
        assert len(set(draws)) >= 2, f"{case}: {len(draws)} draws all {draws[0]}, allowed {allowed_list}"


# ---- 4. stops, lengths, limits, errors -------------------------------------------------------------------


STOP_PROMPTS = ("The mitochondria is", "Quantum entanglement describes", "Photosynthesis is the process by which")


@pytest.fixture(scope="module")
def story_greedy(smollm2):
    """A greedy continuation with a word split across tokens (technical words split into subwords)."""
    tok = smollm2.tokenizer
    for text in STOP_PROMPTS:
        prompt = list(tok.encode(text))
        tokens = [int(t) for t in sample(smollm2, prompt, max_tokens=48, temperature=0.0).sequences[0].tokens]
        if rs.boundary_stop_string(tok, tokens)[0] and rs.boundary_stop_string(tok, tokens, right=2)[0]:
            return prompt, tokens
    pytest.fail(f"no greedy continuation of {STOP_PROMPTS} has a word split across tokens")


@pytest.mark.parametrize("form", ["str", "list"])
def test_stop_string_across_tokens(smollm2, story_greedy, form):
    prompt, tokens = story_greedy
    tok = smollm2.tokenizer
    stop, k = rs.boundary_stop_string(tok, tokens)
    assert stop is not None, f"no word split across tokens in {tok.decode(tokens)!r}"
    stop_arg = stop if form == "str" else ["\u2603never\u2603", stop, "zzzzqqq"]
    res = sample(smollm2, prompt, max_tokens=48, temperature=0.0, stop=stop_arg)
    check_result(res, 1, 48, smollm2.vocab_size)
    seq = res.sequences[0]
    got = [int(t) for t in seq.tokens]
    text = tok.decode(got)
    assert got == tokens[:k + 1] and seq.stop_reason == "stop", (
        f"stop {stop!r} (completed by new token {k}): got {len(got)} tokens ({seq.stop_reason}) {text!r}, "
        f"expected {k + 1}: {tok.decode(tokens[:k + 1])!r}")
    assert text.endswith(stop) and text.count(stop) == 1, f"{text!r} should end with its only {stop!r}"


def test_stop_string_ending_inside_a_token(smollm2, story_greedy):
    prompt, tokens = story_greedy
    tok = smollm2.tokenizer
    stop, k = rs.boundary_stop_string(tok, tokens, right=2)
    assert stop is not None, f"no suitable split word in {tok.decode(tokens)!r}"
    seq = sample(smollm2, prompt, max_tokens=48, temperature=0.0, stop=[stop]).sequences[0]
    got = [int(t) for t in seq.tokens]
    text = tok.decode(got)
    assert got == tokens[:k + 1] and seq.stop_reason == "stop", (
        f"stop {stop!r} ends inside new token {k}: got {len(got)} tokens {text!r}, expected the token that "
        f"completes it to be the last: {tok.decode(tokens[:k + 1])!r}")
    assert text.count(stop) == 1 and not text.endswith(stop)


def test_stop_token_ids(smollm2, story_greedy):
    prompt, tokens = story_greedy
    k = next(i for i in range(5, len(tokens)) if tokens[i] not in tokens[:i])
    other = next(t for t in range(100, 200) if t not in tokens)
    n = k + 4
    for stop in ([tokens[k]], [other, tokens[k]]):
        res = sample(smollm2, prompt, max_tokens=n, temperature=0.0, stop=stop)
        check_result(res, 1, n, smollm2.vocab_size, stop_ids=stop)
        seq = res.sequences[0]
        assert [int(t) for t in seq.tokens] == tokens[:k + 1] and seq.stop_reason == "stop", (
            f"stop={stop}: got {list(seq.tokens)}, expected to end at new token {k} ({tokens[:k + 1]})")
    res = sample(smollm2, prompt, max_tokens=n, temperature=0.0, stop=[other])
    assert [int(t) for t in res.sequences[0].tokens] == tokens[:n] and res.sequences[0].stop_reason == "length"


def test_stop_strings_in_random_sampling(smollm2):
    """Every sampled sequence that stops on a string contains it exactly once, completed by its last token."""
    tok = smollm2.tokenizer
    prompt = list(tok.encode("Here is a list of fruits, one per line:\n"))
    stops = ["\n", "."]
    res = sample(smollm2, prompt, num_samples=16, max_tokens=24, temperature=1.0, seed=3, stop=stops)
    check_result(res, 16, 24, smollm2.vocab_size, smollm2.tokenizer.eos_token_id)
    stopped = 0
    for seq in res.sequences:
        toks = [int(t) for t in seq.tokens]
        text, head = tok.decode(toks), tok.decode(toks[:-1])
        assert not any(s in head for s in stops), f"{text!r}: a stop string occurs before the last token"
        if seq.stop_reason == "stop" and toks[-1] != tok.eos_token_id:
            assert any(s in text for s in stops), f"{text!r}: stop_reason 'stop' with no stop string or EOS"
            stopped += 1
    assert stopped >= 8, f"only {stopped} of 16 sequences stopped on a stop string"


@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_max_tokens_zero_and_one(smollm2, tiny, which):
    engine = smollm2 if which == "smollm2" else tiny.get("qwen2")[0]
    prompt = [1, 504, 3100, 314] if which == "smollm2" else tiny.prompt("qwen2", 6)
    res = sample(engine, prompt, num_samples=3, max_tokens=0, seed=0)
    check_result(res, 3, 0, engine.vocab_size)
    for seq in res.sequences:
        assert list(seq.tokens) == [] and list(seq.logprobs) == [] and seq.stop_reason == "length"
    res = sample(engine, prompt, num_samples=3, max_tokens=1, seed=0)
    check_result(res, 3, 1, engine.vocab_size)
    for seq in res.sequences:
        assert len(seq.tokens) == 1 and len(seq.logprobs) == 1
    zero = sample(engine, prompt, max_tokens=0, include_prompt_logprobs=True, seed=0)
    one = sample(engine, prompt, max_tokens=1, include_prompt_logprobs=True, seed=0)
    assert zero.prompt_logprobs is not None and len(zero.prompt_logprobs) == len(prompt)
    assert np.allclose(np.array(zero.prompt_logprobs[1:], float), np.array(one.prompt_logprobs[1:], float),
                       atol=1e-5)  # fmt: skip


def test_many_samples_are_distinct_streams(tiny):
    engine, _ = tiny.get("llama")
    prompt = tiny.prompt("llama", 10, salt=3)
    res = sample(engine, prompt, num_samples=64, max_tokens=8, temperature=1.0, seed=5)
    check_result(res, 64, 8, engine.vocab_size, TINY_EOS)
    seqs = [tuple(int(t) for t in s.tokens) for s in res.sequences]
    for s, seq in zip(seqs, res.sequences):
        assert len(s) == 8 or (seq.stop_reason == "stop" and s[-1] == TINY_EOS), f"sequence {s} ({seq.stop_reason})"
    # the tiny model's next-token distributions have ~5.5 nats of entropy: two equal 8-token streams
    # would have probability ~e^-40 unless the streams share random numbers
    assert len(set(seqs)) == 64, f"only {len(set(seqs))} distinct sequences of 64"
    firsts = [s[0] for s in seqs]
    assert len(set(firsts)) >= 20, f"64 first tokens take only {len(set(firsts))} values"
    big = sample(engine, prompt, num_samples=256, max_tokens=1, seed=6)
    check_result(big, 256, 1, engine.vocab_size, TINY_EOS)


def test_prompt_at_the_context_limit(tiny):
    engine, ref = tiny.get("short")
    assert engine.max_context_length == SHORT_CONTEXT
    prompt = tiny.prompt("short", SHORT_CONTEXT - 1)
    res = sample(engine, prompt, max_tokens=1, temperature=0.0)
    check_result(res, 1, 1, engine.vocab_size, TINY_EOS)
    logits = rs.full_logits(ref, prompt)[-1]
    t = int(res.sequences[0].tokens[0])
    assert logits.max() - logits[t] <= rs.TIE_TOL, f"greedy token {t}, reference argmax {int(logits.argmax())}"
    res = sample(engine, prompt[:-1], num_samples=2, max_tokens=2, seed=0)  # fills the context exactly
    check_result(res, 2, 2, engine.vocab_size, TINY_EOS)
    for p, n in ((prompt, 2), (prompt + [5], 1), (prompt + [5, 6], 0), (prompt[:-1], 3)):
        with pytest.raises(BadRequestError):
            sample(engine, p, max_tokens=n)
        ok = sample(engine, prompt, max_tokens=1, temperature=0.0)  # still serving
        assert [int(x) for x in ok.sequences[0].tokens] == [t]


BAD_REQUESTS = {
    "empty prompt": (lambda v: [], {}),
    "token id = vocab": (lambda v: [5, v, 6], {}),
    "negative token id": (lambda v: [5, -1, 6], {}),
    "negative max_tokens": (lambda v: [5, 6], dict(max_tokens=-1)),
    "num_samples 0": (lambda v: [5, 6], dict(num_samples=0)),
    "num_samples 257": (lambda v: [5, 6], dict(num_samples=257)),
    "negative temperature": (lambda v: [5, 6], dict(temperature=-0.5)),
    "nan temperature": (lambda v: [5, 6], dict(temperature=float("nan"))),
    "top_p 1.5": (lambda v: [5, 6], dict(top_p=1.5)),
    "top_p negative": (lambda v: [5, 6], dict(top_p=-0.1)),
    "top_k -2": (lambda v: [5, 6], dict(top_k=-2)),
    "prompt + max_tokens past the context": (lambda v: [5, 6], dict(max_tokens=10**6)),
}


@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_bad_requests_raise_and_engine_keeps_serving(smollm2, tiny, which):
    engine = smollm2 if which == "smollm2" else tiny.get("qwen3")[0]
    good = [1, 2, 3] if which == "tiny" else [1, 504, 3100]
    want = sample(engine, good, max_tokens=1, temperature=0.0).sequences[0].tokens
    for name, (make_prompt, kwargs) in BAD_REQUESTS.items():
        with pytest.raises(BadRequestError) as info:
            sample(engine, make_prompt(engine.vocab_size), **{"max_tokens": 4, **kwargs})
        assert str(info.value), f"{name}: empty error message"
        with pytest.raises(BadRequestError):  # the async path rejects it too (at submit or at result)
            _sampling.submit_sample(engine, make_prompt(engine.vocab_size), **{"max_tokens": 4, **kwargs}).result()
        got = sample(engine, good, max_tokens=1, temperature=0.0).sequences[0].tokens
        assert list(got) == list(want), f"after the bad request {name!r} the engine samples differently"


# ---- 5. seeds and snapshots ---------------------------------------------------------------------------


def test_same_seed_same_output(smollm2):
    prompt = smol_prompt(smollm2, "text_story")
    a = sample(smollm2, prompt, num_samples=3, max_tokens=8, temperature=1.0, seed=123)
    b = sample(smollm2, prompt, num_samples=3, max_tokens=8, temperature=1.0, seed=123)
    c = sample(smollm2, prompt, num_samples=3, max_tokens=8, temperature=1.0, seed=124)
    ta = [list(map(int, s.tokens)) for s in a.sequences]
    assert ta == [list(map(int, s.tokens)) for s in b.sequences], "the same seed gave different tokens"
    assert [list(s.logprobs) for s in a.sequences] == [list(s.logprobs) for s in b.sequences]
    assert ta != [list(map(int, s.tokens)) for s in c.sequences], "seeds 123 and 124 gave the same samples"
    assert len({tuple(t) for t in ta}) == 3, f"the 3 samples of one request are not all different: {ta}"


def test_unseeded_requests_differ(tiny):
    engine, _ = tiny.get("llama")
    prompt = tiny.prompt("llama", 4, salt=9)
    a = sample(engine, prompt, max_tokens=8, temperature=1.0).sequences[0].tokens
    b = sample(engine, prompt, max_tokens=8, temperature=1.0).sequences[0].tokens
    assert list(a) != list(b), "two unseeded requests gave the same 8 tokens"


def test_snapshot_is_frozen_while_the_adapter_trains(tiny):
    engine, ref = tiny.get("llama")
    pair = LoraPair(engine, ref, TINY_LORA_RANK, TINY_LORA_GAIN, seed=77)
    adapter = pair.adapter
    snap = adapter.snapshot()
    prompt = tiny.prompt("llama", 9, salt=4)

    def outputs(which):
        greedy = sample(engine, prompt, max_tokens=16, temperature=0.0, adapter=which).sequences[0]
        sampled = sample(engine, prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=31, adapter=which)
        return ([int(t) for t in greedy.tokens], [[int(t) for t in s.tokens] for s in sampled.sequences],
                np.concatenate([greedy.logprobs] + [s.logprobs for s in sampled.sequences]), greedy)

    live_before, snap_before = outputs(adapter), outputs(snap)
    assert live_before[:2] == snap_before[:2]
    # the snapshot samples like peft with the values it was taken from
    greedy = snap_before[3]
    ref_tokens, ref_logits = rs.greedy_generate(pair.peft, prompt, 16, TINY_EOS)
    rs.check_greedy("snapshot", greedy.tokens, greedy.logprobs, greedy.stop_reason, ref_tokens, ref_logits,
                    rs.continuation_logits(pair.peft, prompt, greedy.tokens), 16, TINY_EOS)  # fmt: skip
    # train the live adapter towards another continuation
    target = tiny.prompt("llama", 16, salt=5)
    tokens = prompt + target
    datum = (np.array(tokens[:-1]), {"target_tokens": np.array(tokens[1:]),
                                      "weights": np.r_[np.zeros(len(prompt) - 1), np.ones(len(target))]})
    for _ in range(5):
        adapter.forward_backward([datum])
        adapter.optim_step(learning_rate=0.05)
    live_after, snap_after = outputs(adapter), outputs(snap)
    assert snap_after[:2] == snap_before[:2], "the snapshot's samples changed when the adapter trained"
    assert np.array_equal(snap_after[2], snap_before[2]), "the snapshot's logprobs changed when the adapter trained"
    assert live_after[:2] != live_before[:2], "training did not change the live adapter's samples"


# ---- 6. concurrency ------------------------------------------------------------------------------------


def same_results(what, got, want):
    assert len(got.sequences) == len(want.sequences)
    for a, b in zip(got.sequences, want.sequences):
        assert [int(t) for t in a.tokens] == [int(t) for t in b.tokens], f"{what}: tokens differ"
        assert a.stop_reason == b.stop_reason, f"{what}: stop_reason {a.stop_reason} vs {b.stop_reason}"
        err = np.max(np.abs(np.asarray(a.logprobs) - np.asarray(b.logprobs)), initial=0.0)
        assert err <= CONCURRENT_LP_TOL, f"{what}: logprobs differ by {err:.2e}"


def test_concurrent_submissions_equal_sequential(tiny):
    engine, _ = tiny.get("qwen2")
    pair = tiny.lora("qwen2")
    snap = pair.adapter.snapshot()
    requests = []
    for i in range(64):
        kwargs = dict(max_tokens=1 + i % 12, seed=1000 + i, temperature=(0.0, 0.8, 1.0, 1.3)[i % 4],
                      adapter=(None, pair.adapter, snap)[i % 3])  # fmt: skip
        if i % 5 == 1:
            kwargs["top_k"] = 20
        if i % 7 == 2:
            kwargs["top_p"] = 0.8
        if i % 11 == 3:
            kwargs.update(include_prompt_logprobs=True, topk_prompt_logprobs=2)
        requests.append((tiny.prompt("qwen2", 1 + (i * 7) % 40, salt=i), kwargs))
    pending = [_sampling.submit_sample(engine, p, **kw) for p, kw in requests]  # all in flight at once
    results = [p.result() for p in pending]
    for i, ((prompt, kw), res) in enumerate(zip(requests, results)):
        check_result(res, 1, kw["max_tokens"], engine.vocab_size, TINY_EOS)
        alone = sample(engine, prompt, **kw)
        same_results(f"request {i} ({kw})", res, alone)
        if kw.get("include_prompt_logprobs"):
            a = np.array(res.prompt_logprobs[1:], float)
            b = np.array(alone.prompt_logprobs[1:], float)
            assert np.max(np.abs(a - b), initial=0.0) <= CONCURRENT_LP_TOL


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_threaded_sampling_equals_sequential(smollm2, tiny, which):
    """sample() from many threads at once (64 on a tiny model, 16 on SmolLM2) equals one by one."""
    if which == "tiny":
        engine = tiny.get("llama")[0]
        prompts = [tiny.prompt("llama", 1 + (i * 5) % 30, salt=100 + i) for i in range(64)]
        lengths = [1 + i % 10 for i in range(64)]
    else:
        engine, tok = smollm2, smollm2.tokenizer
        texts = ["The sun", "Water is", "My dog", "In 1990,", "Python is a", "Hello! How", "The best pizza", "Rain"]
        prompts = [list(tok.encode(texts[i % len(texts)])) for i in range(16)]
        lengths = [1 + i % 4 for i in range(16)]
    requests = [(p, dict(max_tokens=n, seed=i, temperature=(0.0, 1.0)[i % 2])) for i, (p, n) in
                enumerate(zip(prompts, lengths))]  # fmt: skip
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(lambda r: sample(engine, r[0], **r[1]), requests))
    eos = engine.tokenizer.eos_token_id
    for i, ((prompt, kw), res) in enumerate(zip(requests, results)):
        check_result(res, 1, kw["max_tokens"], engine.vocab_size, eos)
        same_results(f"{which} thread {i} ({kw})", res, sample(engine, prompt, **kw))
