"""The reference side of the sampling tests: transformers generation, teacher-forced logits, the
support of top-k / top-p / min-p, a chi-square goodness-of-fit test, stop strings across tokens.

- `greedy_generate(model, prompt, n, eos)`: transformers' `generate(do_sample=False)` from a fresh
  GenerationConfig (nothing inherited from the model's, so it stops only on `eos`, or never when
  eos is None), returning the new tokens and the raw logits of every step.
- `continuation_logits(model, prompt, tokens)`: logits [len(tokens), V] that predicted each token
  of `tokens` after `prompt` (one teacher-forced forward, no cache).
- `check_greedy(...)`: the engine's greedy continuation against generate's, token for token; where
  they diverge the reference's top-2 gap there must be <= TIE_TOL, and from there on every engine
  token must still be a reference argmax (within TIE_TOL) given the engine's own prefix.
- `allowed_top_k / allowed_top_p / allowed_min_p`: the tokens a correct sampler may draw, from the
  reference logits, with a small margin for float32 noise (engine logits differ from transformers'
  by ~6e-5 on SmolLM2).
- `chi_square(counts, probs)`: Pearson's statistic over bins of expected count >= 5 (the rest
  pooled) and its exact p-value (closed forms of the chi-square survival function, no scipy).
- `boundary_stop_string(tokenizer, tokens)`: a stop string whose first occurrence in the decoded
  continuation spans two tokens.
- `llama_from_gguf(path)`: a float32 transformers Llama holding a llama GGUF's dequantised weights,
  read with gguf-py (the same values as `from_pretrained(gguf_file=...)`, which test_forward_smollm2
  uses, in ~4 s instead of ~15 s: transformers parses the file's 49k-token vocabulary twice and builds
  a tensor-name map per tensor).
"""

from __future__ import annotations

import math

import numpy as np
import torch

TIE_TOL = 1e-3  # a greedy divergence is accepted only where the reference's top-2 logit gap is <= this


def llama_from_gguf(path):
    """A float32 eager-attention LlamaForCausalLM with the dequantised weights of a llama GGUF file."""
    import gguf
    import tiny_models as tm
    from transformers import AutoModelForCausalLM

    reader = gguf.GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama", "llama_from_gguf reads llama GGUF files only"
    tensors = {t.name: t for t in reader.tensors}
    heads, kv_heads = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    config = tm.tiny_config(
        "llama", hidden=int(field("llama.embedding_length")), layers=int(field("llama.block_count")), heads=heads,
        kv_heads=kv_heads, intermediate=int(field("llama.feed_forward_length")),
        vocab=int(tensors["token_embd.weight"].shape[-1]), max_positions=int(field("llama.context_length")),
        rope_theta=float(field("llama.rope.freq_base")),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        tied="output.weight" not in tensors)  # fmt: skip
    config.bos_token_id = int(field("tokenizer.ggml.bos_token_id"))
    config.eos_token_id = int(field("tokenizer.ggml.eos_token_id"))
    state = {}
    for hf_name, gguf_name in tm._hf_to_gguf_names("llama", config).items():
        t = tensors[gguf_name]
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        values = values.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if ".self_attn.q_proj." in hf_name:
            values = tm.unpermute_qk(values, heads)
        elif ".self_attn.k_proj." in hf_name:
            values = tm.unpermute_qk(values, kv_heads)
        state[hf_name] = torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy
    try:  # every weight is overwritten below: skip the random init (2 s for 135M parameters)
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def _ids(tokens) -> torch.Tensor:
    return torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)


@torch.no_grad()
def greedy_generate(model, prompt, max_new_tokens: int, eos_token_id: int | None):
    """transformers greedy decoding: (new tokens, raw logits [steps, V] float32)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0,
                              eos_token_id=eos_token_id, pad_token_id=0 if eos_token_id is None else eos_token_id,
                              output_logits=True, return_dict_in_generate=True, use_cache=True,
                              repetition_penalty=1.0, num_beams=1)  # fmt: skip
    ids = _ids(prompt)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logits = torch.stack([x[0] for x in out.logits]).to(torch.float32).numpy()
    assert len(logits) == len(tokens)
    return tokens, logits


@torch.no_grad()
def full_logits(model, tokens) -> np.ndarray:
    return model(input_ids=_ids(tokens), use_cache=False).logits[0].to(torch.float32).numpy()


def continuation_logits(model, prompt, tokens) -> np.ndarray:
    """Logits [len(tokens), V]: row i is the distribution that predicted tokens[i] after prompt + tokens[:i]."""
    prompt, tokens = list(prompt), list(tokens)
    if not tokens:
        return np.zeros((0, model.config.vocab_size), dtype=np.float32)
    logits = full_logits(model, prompt + tokens)
    return logits[len(prompt) - 1:len(prompt) + len(tokens) - 1]


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64) / temperature
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def check_greedy(what: str, got_tokens, got_logprobs, got_stop: str, ref_tokens, ref_step_logits,
                 teacher_logits, max_tokens: int, eos: int | None) -> list[str]:  # fmt: skip
    """Asserts the engine's greedy continuation is the reference's; returns notes on accepted ties.

    ref_tokens / ref_step_logits: generate's output; teacher_logits: continuation_logits of the
    reference model on the engine's tokens (checks every step, after a divergence too); eos: the
    token that stops both (None: the reference never stops)."""
    got_tokens = [int(t) for t in got_tokens]
    notes = []
    assert len(got_logprobs) == len(got_tokens), f"{what}: {len(got_logprobs)} logprobs for {len(got_tokens)} tokens"
    assert got_stop in ("stop", "length"), f"{what}: stop_reason {got_stop!r}"
    if got_stop == "length":
        assert len(got_tokens) == max_tokens, f"{what}: stop_reason 'length' after {len(got_tokens)} of {max_tokens}"
    else:
        assert eos is not None and got_tokens and got_tokens[-1] == eos, (
            f"{what}: stop_reason 'stop' without a stop condition: last token "
            f"{got_tokens[-1] if got_tokens else None}, eos {eos}")
    if eos is not None:
        assert eos not in got_tokens[:-1], f"{what}: EOS {eos} at {got_tokens.index(eos)} did not stop the sequence"
    # 1. token for token against generate(), up to the first divergence
    diverged = None
    for i, (g, r) in enumerate(zip(got_tokens, ref_tokens)):
        if g != r:
            diverged = i
            break
    if diverged is None:
        if eos is None:  # the reference never stops; the engine may only stop at its EOS
            assert got_tokens == ref_tokens[:len(got_tokens)], what
        else:
            assert got_tokens == ref_tokens, (
                f"{what}: the engine produced {len(got_tokens)} tokens ({got_stop}), transformers {len(ref_tokens)}; "
                f"engine {got_tokens[-5:]} vs reference {ref_tokens[len(got_tokens) - 2:len(got_tokens) + 3]}")
    else:
        step = ref_step_logits[diverged]
        gap = float(step[ref_tokens[diverged]] - step[got_tokens[diverged]])
        assert gap <= TIE_TOL, (
            f"{what}: greedy diverges from transformers at new token {diverged}: engine {got_tokens[diverged]}, "
            f"transformers {ref_tokens[diverged]}, whose logit is larger by {gap:.3g} (a divergence is accepted only "
            f"where the reference's top-2 logit gap is <= {TIE_TOL:g})")
        notes.append(f"{what}: tie at new token {diverged} (reference top-2 gap {gap:.2e} <= {TIE_TOL:g})")
    # 2. every engine token is a reference argmax given the engine's own prefix; logprobs at temperature 1
    teacher = np.asarray(teacher_logits, dtype=np.float64)
    assert teacher.shape[0] == len(got_tokens)
    idx = np.arange(len(got_tokens))
    gaps = teacher.max(axis=-1) - teacher[idx, got_tokens]
    if gaps.size:
        worst = int(np.argmax(gaps))
        assert gaps[worst] <= TIE_TOL, (
            f"{what}: new token {worst} = {got_tokens[worst]} is not the reference's argmax "
            f"({int(teacher[worst].argmax())}, larger by {gaps[worst]:.3g}; ties are accepted up to {TIE_TOL:g})")
        want = log_softmax(teacher)[idx, got_tokens]
        err = np.abs(np.asarray(got_logprobs, dtype=np.float64) - want)
        worst = int(np.argmax(err))
        assert err[worst] <= 1e-3, (
            f"{what}: greedy logprob of new token {worst} is {got_logprobs[worst]:.6f}, the reference "
            f"log_softmax (temperature 1) gives {want[worst]:.6f} (|diff| {err[worst]:.2e} > 1e-3)")
    return notes


# ---- support of the truncated distributions ------------------------------------------------------

SUPPORT_LOGIT_TOL = 1e-3  # float32 noise between engine and reference logits is ~1e-4 at most


def allowed_top_k(logits, k: int) -> set[int]:
    x = np.asarray(logits, dtype=np.float64)
    kth = np.sort(x)[::-1][k - 1]
    return set(np.flatnonzero(x >= kth - SUPPORT_LOGIT_TOL).tolist())


def allowed_top_p(logits, p: float, temperature: float = 1.0) -> set[int]:
    """Tokens of the smallest set whose probability reaches p (a token is kept when the mass of the
    tokens clearly more likely than it is still below p)."""
    x = np.asarray(logits, dtype=np.float64)
    probs = np.exp(log_softmax(x, temperature))
    order = np.argsort(-x)
    sorted_x, cum = x[order], np.cumsum(probs[order])
    out = set()
    for t in range(x.size):
        above = np.searchsorted(-sorted_x, -(x[t] + SUPPORT_LOGIT_TOL), side="left")  # count of x > x[t] + tol
        mass_before = cum[above - 1] if above else 0.0
        if mass_before < p + 1e-6:
            out.add(t)
    return out


def allowed_min_p(logits, min_p: float, temperature: float = 1.0) -> set[int]:
    lp = log_softmax(logits, temperature)
    return set(np.flatnonzero(lp >= np.log(min_p) + lp.max() - SUPPORT_LOGIT_TOL / temperature).tolist())


# ---- goodness of fit -------------------------------------------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df), df a positive integer (exact closed forms)."""
    if x <= 0:
        return 1.0
    h = x / 2.0
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= h / k
            total += term
        return min(1.0, math.exp(-h) * total)
    s = math.sqrt(x)
    total = math.erfc(s / math.sqrt(2.0))
    term = math.sqrt(2.0 / math.pi) * math.exp(-h) * s  # the j = 1 term: 2 phi(s) s
    for j in range(1, (df - 1) // 2 + 1):
        total += term
        term *= x / (2 * j + 1)
    return min(1.0, total)


def chi_square(counts: dict[int, int], probs: np.ndarray, min_expected: float = 5.0):
    """Pearson's goodness of fit of observed token counts to probabilities `probs` ([V], sums to 1).

    Tokens with expected count >= min_expected are bins of their own, the rest one pooled bin
    (merged into the smallest bin if it is itself too small). Returns (statistic, df, p-value, table)."""
    n = sum(counts.values())
    probs = np.asarray(probs, dtype=np.float64)
    expected = n * probs
    big = np.flatnonzero(expected >= min_expected)
    observed = np.zeros(probs.size)
    for t, c in counts.items():
        observed[t] += c
    obs = [observed[t] for t in big]
    exp = [expected[t] for t in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= min_expected or not exp:
        obs.append(rest_obs)
        exp.append(rest_exp)
    else:
        j = int(np.argmin(exp))
        obs[j] += rest_obs
        exp[j] += rest_exp
    obs, exp = np.array(obs), np.array(exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return stat, df, chi2_sf(stat, df) if df > 0 else 1.0, list(zip(obs.tolist(), exp.round(1).tolist()))


# ---- stop strings ---------------------------------------------------------------------------------------


def token_texts(tokenizer, tokens) -> list[str]:
    """The text each token adds to the decoded continuation (decoding prefixes, as a detokenizer does)."""
    prefixes = [tokenizer.decode(list(tokens[:k])) for k in range(len(tokens) + 1)]
    out = []
    for k in range(len(tokens)):
        assert prefixes[k + 1].startswith(prefixes[k]), "decoded prefixes are not prefix-closed (non-ASCII text?)"
        out.append(prefixes[k + 1][len(prefixes[k]):])
    return out


def boundary_stop_string(tokenizer, tokens, start: int = 3, left: int = 2, right: int | None = None):
    """(stop string, index of the token that completes it) where the string's first occurrence in the
    decoded continuation starts inside token k-1 (its last `left` characters) and ends in token k
    (all of it when right is None: the text then ends exactly with the string; else its first `right`
    characters, strictly inside the token). Only letters on both sides of the boundary."""
    texts = token_texts(tokenizer, tokens)
    for k in range(start, len(tokens)):
        a, b = texts[k - 1], texts[k]
        if len(a) < left or not a[-left:].isalpha():
            continue
        head = b if right is None else b[:right]
        stop = a[-left:] + head
        if not head.isalpha() or (right is not None and len(b) <= right) or len(stop) < 3:
            continue
        before = "".join(texts[:k - 1]) + a  # text through token k-1
        upto = before + b
        if stop in before or upto.count(stop) != 1:
            continue
        return stop, k
    return None, None
