"""Training the default model on a small supervised set lowers the loss steadily, and the trained
adapter changes what the model predicts in the intended direction."""

from __future__ import annotations

import numpy as np

from tinker._training import LoraAdapter

EXAMPLES = [
    ("Translate to Pig Latin: banana", " anana-bay"),
    ("Translate to Pig Latin: hello world", " ello-hay orld-way"),
    ("Translate to Pig Latin: coffee break", " offee-cay eak-bray"),
    ("Translate to Pig Latin: machine learning", " achine-may earning-lay"),
]


def supervised_datum(tokenizer, prompt: str, completion: str):
    """Tinker's layout: input = full[:-1], targets = full[1:], weight 1 on completion tokens only."""
    p = tokenizer.encode(prompt)
    c = tokenizer.encode(completion) + [tokenizer.eos_token_id]
    full = p + c
    weights = np.array([0.0] * (len(p) - 1) + [1.0] * len(c), dtype=np.float32)
    return (np.array(full[:-1]), {"target_tokens": np.array(full[1:]), "weights": weights})


def test_loss_falls_steadily(smollm2):
    data = [supervised_datum(smollm2.tokenizer, p, c) for p, c in EXAMPLES]
    adapter = LoraAdapter(smollm2, rank=16, seed=0)
    losses = []
    for _ in range(8):
        losses.append(adapter.forward_backward(data).metrics["loss:sum"])
        adapter.optim_step(learning_rate=5e-4)
    final = adapter.forward(data).metrics["loss:sum"]
    steps = losses + [final]
    assert all(b < a for a, b in zip(steps, steps[1:])), f"loss did not fall at every step: {steps}"
    assert final < 0.25 * losses[0], f"loss fell only from {losses[0]:.2f} to {final:.2f}"
    # the completion has become likely: mean per-token logprob of the completions rose well above the start
    n = sum(d[1]["weights"].sum() for d in data)
    assert -final / n > -losses[0] / n + 1.0
