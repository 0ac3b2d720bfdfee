"""The engine's logits on the default model equal transformers' on the same GGUF.

transformers loads the GGUF itself and dequantises it to float32, so both sides hold the same
weights; only the float32 summation order differs. Tolerance (issue #2):
|Δlogit| <= 1e-3 * max(1, |logit|) at every position.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LENGTHS = [1, 2, 9, 128, 300, 512]


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    )
    return model.eval()


def reference_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, dtype=np.int64))[None]).logits[0].numpy()


def assert_close(ours: np.ndarray, theirs: np.ndarray, what: str):
    assert ours.shape == theirs.shape, what
    err = np.abs(ours - theirs) / np.maximum(1.0, np.abs(theirs))
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= 1e-3, f"{what}: relative error {err.max():.2e} at position {worst[0]}, token {worst[1]}"


@pytest.mark.parametrize("length", LENGTHS)
def test_random_token_logits_equal_transformers(smollm2, reference, length):
    ids = np.random.default_rng(length).integers(0, smollm2.vocab_size, size=length)
    [ours] = smollm2.forward_logits([ids])
    assert_close(ours, reference_logits(reference, ids), f"length {length}")


def test_chat_prompt_logits_equal_transformers(smollm2, reference):
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    [ours] = smollm2.forward_logits([ids])
    assert_close(ours, reference_logits(reference, ids), "chat prompt")


def test_greedy_next_token_is_sensible(smollm2):
    """A wrong RoPE pairing gives plausible logits but garbage text: check real language."""
    tok = smollm2.tokenizer
    ids = tok.encode("The capital of France is")
    [logits] = smollm2.forward_logits([ids])
    assert tok.decode([int(logits[-1].argmax())]).strip() == "Paris"


def test_packed_batch_equals_sequences_alone(smollm2):
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, smollm2.vocab_size, size=n) for n in (5, 1, 64, 33)]
    batched = smollm2.forward_logits(seqs)
    for seq, got in zip(seqs, batched):
        [alone] = smollm2.forward_logits([seq])
        # the GEMMs block differently for other row counts: summation order only
        assert np.max(np.abs(got - alone) / np.maximum(1.0, np.abs(alone))) <= 1e-4
