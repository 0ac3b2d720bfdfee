"""Tinker's getting-started flow, run locally on the default model.

Teaches SmolLM2-135M-Instruct Pig Latin with a LoRA adapter: builds supervised examples, trains for a
few steps (printing the loss per completion token), samples 8 completions of a new prompt, and
reads prompt logprobs and top-k prompt logprobs. The code is the Tinker documentation's, apart from
the base_model name, in SDK 0.38's style (a client factory's future is resolved with `.result()` or
`await` before use): it runs unchanged against the Tinker service too.

    python examples/getting_started.py            # sync API
    python examples/getting_started.py --async    # the same flow, awaiting the same methods' futures
"""

import argparse
import asyncio
import time

import numpy as np

import tinker
from tinker import types

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
STEPS = 8

EXAMPLES = [
    {"input": "banana split", "output": "anana-bay plit-say"},
    {"input": "quantum physics", "output": "uantum-qay ysics-phay"},
    {"input": "donut shop", "output": "onut-day op-shay"},
    {"input": "pickle jar", "output": "ickle-pay ar-jay"},
    {"input": "space exploration", "output": "ace-spay exploration-way"},
    {"input": "rubber duck", "output": "ubber-ray uck-day"},
    {"input": "coding wizard", "output": "oding-cay izard-way"},
]


def process_example(example: dict, tokenizer) -> types.Datum:
    """Prompt tokens get weight 0, completion tokens weight 1; inputs and targets are shifted by one."""
    prompt = f"English: {example['input']}\nPig Latin:"
    prompt_tokens = tokenizer.encode(prompt, add_special_tokens=True)
    completion_tokens = tokenizer.encode(f" {example['output']}\n\n", add_special_tokens=False)
    tokens = prompt_tokens + completion_tokens
    weights = [0] * len(prompt_tokens) + [1] * len(completion_tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens=tokens[:-1]),
        loss_fn_inputs=dict(weights=weights[1:], target_tokens=tokens[1:]),
    )


def loss_per_token(fwdbwd_result, data) -> float:
    logprobs = np.concatenate([output["logprobs"].tolist() for output in fwdbwd_result.loss_fn_outputs])
    weights = np.concatenate([datum.loss_fn_inputs["weights"].tolist() for datum in data])
    return float(-np.dot(logprobs, weights) / weights.sum())


def show_samples(result, tokenizer) -> None:
    for i, seq in enumerate(result.sequences):
        print(f"  {i}: {tokenizer.decode(seq.tokens)!r}  ({seq.stop_reason})")


def show_prompt_logprobs(prompt_tokens, logprobs, topk, tokenizer) -> None:
    print("  token            logprob   top-3 next-token candidates")
    for i, token in enumerate(prompt_tokens):
        lp = "     -" if logprobs[i] is None else f"{logprobs[i]:8.3f}"
        cands = "" if topk[i] is None else ", ".join(f"{tokenizer.decode([t])!r} {p:.2f}" for t, p in topk[i][:3])
        print(f"  {tokenizer.decode([token])!r:15} {lp}   {cands}")


def run_sync() -> None:
    t0 = time.perf_counter()
    service_client = tinker.ServiceClient()
    training_client = service_client.create_lora_training_client(base_model=BASE_MODEL, rank=32).result()
    tokenizer = training_client.get_tokenizer()
    print(f"Loaded {BASE_MODEL} and a rank-32 LoRA adapter in {time.perf_counter() - t0:.1f} s")

    processed_examples = [process_example(ex, tokenizer) for ex in EXAMPLES]
    n_tokens = sum(d.model_input.length for d in processed_examples)
    print(f"Training on {len(processed_examples)} examples ({n_tokens} tokens) for {STEPS} steps")
    for step in range(STEPS):
        t = time.perf_counter()
        # Submitted back to back: the optimizer step queues behind the gradients it applies.
        fwdbwd_future = training_client.forward_backward(processed_examples, "cross_entropy")
        optim_future = training_client.optim_step(types.AdamParams(learning_rate=1e-3))
        fwdbwd_result = fwdbwd_future.result()
        optim_future.result()
        print(f"  step {step + 1}/{STEPS}: loss per token {loss_per_token(fwdbwd_result, processed_examples):.4f}"
              f"  ({time.perf_counter() - t:.2f} s)")

    sampling_client = training_client.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("English: coffee break\nPig Latin:"))
    params = types.SamplingParams(max_tokens=20, temperature=0.0, stop=["\n"])
    result = sampling_client.sample(prompt=prompt, sampling_params=params, num_samples=8).result()
    print("8 greedy samples of 'English: coffee break\\nPig Latin:'")
    show_samples(result, tokenizer)

    params = types.SamplingParams(max_tokens=20, temperature=0.7, stop=["\n"], seed=0)
    result = sampling_client.sample(prompt=prompt, sampling_params=params, num_samples=8).result()
    print("8 samples at temperature 0.7")
    show_samples(result, tokenizer)

    question = tokenizer.encode("How many r's are in the word strawberry?")
    response = sampling_client.sample(prompt=types.ModelInput.from_ints(question), num_samples=1,
                                      sampling_params=types.SamplingParams(max_tokens=1),
                                      include_prompt_logprobs=True, topk_prompt_logprobs=5).result()
    print("Prompt logprobs and top-k prompt logprobs:")
    show_prompt_logprobs(question, response.prompt_logprobs, response.topk_prompt_logprobs, tokenizer)
    print(f"Done in {time.perf_counter() - t0:.1f} s")


async def run_async() -> None:
    t0 = time.perf_counter()
    service_client = tinker.ServiceClient()
    training_client = await service_client.create_lora_training_client(base_model=BASE_MODEL, rank=32)
    tokenizer = training_client.get_tokenizer()
    processed_examples = [process_example(ex, tokenizer) for ex in EXAMPLES]
    print(f"Training (async) on {len(processed_examples)} examples for {STEPS} steps")
    for step in range(STEPS):
        # Both submitted before either is awaited: the optimizer step queues behind the gradients.
        fwdbwd_future = training_client.forward_backward(processed_examples, "cross_entropy")
        optim_future = training_client.optim_step(types.AdamParams(learning_rate=1e-3))
        fwdbwd_result = await fwdbwd_future
        await optim_future
        print(f"  step {step + 1}/{STEPS}: loss per token {loss_per_token(fwdbwd_result, processed_examples):.4f}")

    sampling_client = await training_client.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(tokenizer.encode("English: coffee break\nPig Latin:"))
    params = types.SamplingParams(max_tokens=20, temperature=0.0, stop=["\n"])
    result = await sampling_client.sample(prompt=prompt, sampling_params=params, num_samples=8)
    print("8 greedy samples")
    show_samples(result, tokenizer)
    logprobs = await sampling_client.compute_logprobs(prompt)
    print(f"compute_logprobs: {len(logprobs)} entries, first {logprobs[0]}, sum {sum(logprobs[1:]):.3f}")
    print(f"Done in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--async", dest="use_async", action="store_true", help="await the futures (asyncio)")
    args = parser.parse_args()
    if args.use_async:
        asyncio.run(run_async())
    else:
        run_sync()


if __name__ == "__main__":
    main()
