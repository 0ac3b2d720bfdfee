"""The Tinker cookbook (tinker-cookbook 0.6.1) runs unchanged against this project.

Each test runs one of the cookbook's own recipes, as its ``main`` is called by its command line, on
the default model (SmolLM2-135M-Instruct, a ChatML model: the cookbook's ``qwen3_instruct``
renderer renders exactly its template) for a few steps, offline. What the recipes would fetch from
the Hugging Face Hub comes from this process instead (never from a change to the cookbook):

- the tokenizer: the model's own, registered with the cookbook's ``register_tokenizer``;
- datasets: small local files under ``tests/fixtures/cookbook`` in place of
  ``datasets.load_dataset`` (patched in this test process only);
- the renderer name for the recipes that always ask ``model_info`` for it (sl_loop, rl_loop), whose
  table has no SmolLM2 row.

Every test checks that the recipe finished (its final checkpoint is in ``checkpoints.jsonl``),
that the metrics it logged are finite, and that training moved the right way where a few steps can
show it (the loss went down, the reward went up; guess_number's small model never answers in the
game's format in a few steps, so there its test checks the multi-turn rollouts and that a group
with equal returns gives no gradient). None of them may meet one of 0.38's deprecation warnings
except where the cookbook itself calls a deprecated method (create_rest_client, on resume).
"""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import re
import warnings

import pytest

pytest.importorskip("tinker_cookbook", reason="needs `pip install --no-deps tinker-cookbook==0.6.1` (see README)")

import datasets  # noqa: E402  (the cookbook's dependency)
from tinker_cookbook import model_info, tokenizer_utils  # noqa: E402

from tinker._models import DEFAULT_MODEL  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "cookbook"
RENDERER = "qwen3_instruct"


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


# Hub dataset name -> local fixture file (rows in the dataset's own schema).
_DATASETS = {
    "HuggingFaceH4/no_robots": "chat.jsonl",
    "openai/gsm8k": "gsm8k.jsonl",
    "Anthropic/hh-rlhf": "hh_rlhf.jsonl",
}


def _load_dataset(path, name=None, *, split=None, **kwargs):
    if path not in _DATASETS:
        raise AssertionError(f"test fixture missing for dataset {path!r} (offline)")
    rows = datasets.Dataset.from_list(_jsonl(_DATASETS[path]))
    dd = datasets.DatasetDict({"train": rows, "test": rows.select(range(min(8, len(rows))))})
    return dd if split is None else dd[split]


@pytest.fixture
def cookbook(store, monkeypatch, tmp_path):
    """Offline cookbook: the model's tokenizer, local datasets, SmolLM2's renderer; a fresh store."""
    from tinker._engine import load_model

    tokenizer_utils.register_tokenizer(DEFAULT_MODEL, lambda: load_model(DEFAULT_MODEL).tokenizer)
    monkeypatch.setattr(datasets, "load_dataset", _load_dataset)
    real = model_info.get_recommended_renderer_name
    monkeypatch.setattr(
        model_info,
        "get_recommended_renderer_name",
        lambda model_name: RENDERER if model_name == DEFAULT_MODEL else real(model_name),
    )
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=_DEPRECATION, category=FutureWarning)
        yield tmp_path / "log"
    # The cookbook (written for 0.38) calls nothing 0.38 deprecates but create_rest_client (when it
    # resumes, as with the SDK), and tinker calls no deprecated method on its behalf.
    deprecations = {str(w.message) for w in caught if re.match(_DEPRECATION, str(w.message))}
    assert all(m.startswith("DEPRECATED: ServiceClient.create_rest_client()") for m in deprecations), deprecations
    for w in caught:  # the rest go on to pytest's summary, as they would have
        if not re.match(_DEPRECATION, str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


# The FutureWarnings of 0.38's deprecations (tinker/_deprecation.py)
_DEPRECATION = r"DEPRECATED: \S+ is deprecated|Using the future as the|Reading `"


def _metrics(log_path: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows, "the recipe logged no metrics"
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), f"{key}={value} in {row}"
    return rows


def _checkpoints(log_path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines() if line.strip()]


def _finished(log_path: pathlib.Path) -> None:
    names = [c["name"] for c in _checkpoints(log_path)]
    assert "final" in names, names


def _series(rows: list[dict], key: str) -> list[float]:
    values = [row[key] for row in rows if key in row]
    assert values, f"no {key} logged: {rows[:1]}"
    return values


def test_sl_loop(cookbook):
    from tinker_cookbook.recipes import sl_loop

    sl_loop.main(
        sl_loop.Config(
            log_path=str(cookbook),
            model_name=DEFAULT_MODEL,
            batch_size=8,
            learning_rate=1e-3,
            lora_rank=8,
            save_every=0,
        )
    )
    _finished(cookbook)
    nll = _series(_metrics(cookbook), "train_mean_nll")
    assert len(nll) == 6
    assert nll[-1] < 0.7 * nll[0], nll



def test_rl_loop(cookbook, caplog):
    """GSM8K-style RL with the recipe's default loss (stable_reinforce, with sampled provenance)."""
    from tinker_cookbook.recipes import rl_loop

    rl_loop.main(
        rl_loop.Config(
            log_path=str(cookbook),
            model_name=DEFAULT_MODEL,
            batch_size=2,
            group_size=8,
            max_tokens=48,
            learning_rate=1e-4,
            lora_rank=8,
            max_steps=3,
            save_every=2,
        )
    )
    _finished(cookbook)
    rows = _metrics(cookbook)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # Some groups had both right and wrong answers, so the recipe trained on them.
    skipped = [r for r in caplog.records if "all advantages zero" in r.getMessage()]
    assert len(skipped) < 3
    assert [c["name"] for c in _checkpoints(cookbook)] == ["000002", "final"]


def _chat_sl(log_path, **overrides):
    from tinker_cookbook.recipes.chat_sl import train

    config = dict(
        log_path=str(log_path),
        model_name=DEFAULT_MODEL,
        renderer_name=RENDERER,
        dataset="no_robots",
        batch_size=8,
        learning_rate=1e-3,
        lora_rank=8,
        save_every=3,
        eval_every=3,
        behavior_if_log_dir_exists="resume",
    )
    config.update(overrides)
    train.cli_main(train.CLIConfig(**config))


def test_chat_sl(cookbook):
    _chat_sl(cookbook)
    _finished(cookbook)
    rows = _metrics(cookbook)
    nll = _series(rows, "train_mean_nll")
    assert len(nll) == 6
    assert nll[-1] < 0.7 * nll[0], nll
    test_nll = _series(rows, "test/nll")
    assert test_nll[-1] < test_nll[0], test_nll


def test_chat_sl_resume(cookbook, monkeypatch):
    """Stopped after step 3's save, then run again: it resumes from checkpoints.jsonl's last state."""
    _chat_sl(cookbook, max_steps=4)
    first = _series(_metrics(cookbook), "train_mean_nll")
    assert [c["name"] for c in _checkpoints(cookbook)] == ["000003", "final"]
    # As if the run had been stopped after its step-3 save: only that state is left to resume from.
    path = cookbook / "checkpoints.jsonl"
    path.write_text(path.read_text().splitlines(keepends=True)[0])
    state_path = _checkpoints(cookbook)[0]["state_path"]

    import tinker

    resumed = []
    real = tinker.ServiceClient.create_training_client_from_state_with_optimizer

    def spy(self, path, *args, **kwargs):  # the recipe awaits what this returns (SDK 0.38)
        resumed.append(path)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(tinker.ServiceClient, "create_training_client_from_state_with_optimizer", spy)
    _chat_sl(cookbook)
    assert resumed == [state_path]
    _finished(cookbook)
    rows = _metrics(cookbook)
    assert [r["step"] for r in rows if "train_mean_nll" in r] == [0, 1, 2, 3, 4, 5]
    nll = _series(rows, "train_mean_nll")
    # Step 3 again, from the trained weights (the base model's loss would be near step 0's).
    assert nll[3] < 0.8 * nll[0] and first[3] < 0.8 * first[0], (first, nll)
    assert nll[-1] < 0.7 * nll[0], nll


@pytest.mark.parametrize("loss_fn", ["stable_reinforce", "importance_sampling", "ppo"])
def test_math_rl_arithmetic(cookbook, loss_fn):
    from tinker_cookbook.recipes.math_rl import train

    asyncio.run(
        train.cli_main(
            train.CLIConfig(
                log_path=str(cookbook),
                model_name=DEFAULT_MODEL,
                renderer_name=RENDERER,
                env="arithmetic",
                group_size=4,
                groups_per_batch=4,
                learning_rate=1e-4,
                lora_rank=8,
                max_tokens=5,
                loss_fn=loss_fn,
                eval_every=0,
                save_every=0,
                max_steps=3,
                behavior_if_log_dir_exists="delete",
            )
        )
    )
    _finished(cookbook)
    steps = [r for r in _metrics(cookbook) if "env/all/reward/total" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    # Each step trained on the groups whose rewards differed (the optimizer reports its gradient).
    assert all(r["grad_norm:mean"] > 0 for r in steps if r["env/all/by_group/frac_mixed"] > 0)


def test_dpo(cookbook):
    """DPO on HH-RLHF-style pairs: forward_backward_custom against a frozen reference sampler."""
    from tinker_cookbook.recipes.preference.dpo import train

    train.cli_main(
        train.CLIConfig(
            log_path=str(cookbook),
            model_name=DEFAULT_MODEL,
            renderer_name=RENDERER,
            dataset="hhh",
            batch_size=4,
            learning_rate=1e-4,
            dpo_beta=0.5,
            max_steps=5,
            behavior_if_log_dir_exists="delete",
        )
    )
    _finished(cookbook)
    rows = _metrics(cookbook)
    assert [r["step"] for r in rows if "dpo_loss" in r] == [0, 1, 2, 3, 4]
    loss = _series(rows, "dpo_loss")
    # Step 0: the policy is its reference, so the loss is log 2; then it learns the preferences.
    assert abs(loss[0] - math.log(2)) < 1e-3, loss
    assert loss[-1] < 0.75 * loss[0] and max(loss[1:]) < loss[0], loss
    assert _series(rows, "accuracy")[-1] > 0.5
    assert len(_series(rows, "test/nll")) >= 1


def test_preference_shorter(cookbook, monkeypatch):
    """Preference RL: each group's completions are ranked pairwise by the recipe's preference model
    (shorter wins), with a format penalty for completions cut off at max_tokens. The recipe samples without
    seeds, and in 6 steps whether it starts to learn depends on its first groups' draws (about one run in
    four drew no signal), so the engine's seeds for unseeded requests come from a fixed generator here."""
    import random

    from tinker_cookbook.recipes.preference.shorter import train

    import tinker._sampling

    monkeypatch.setattr(tinker._sampling.secrets, "randbits", random.Random(1234).getrandbits)

    train.cli_main(
        train.CLIConfig(
            log_path=str(cookbook),
            model_name=DEFAULT_MODEL,
            renderer_name=RENDERER,
            batch_size=2,
            group_size=8,
            learning_rate=1e-3,
            max_tokens=32,
            eval_every=0,
            max_steps=6,
            behavior_if_log_dir_exists="delete",
        )
    )
    _finished(cookbook)
    steps = [r for r in _metrics(cookbook) if "env/all/reward/total" in r]
    assert [r["step"] for r in steps] == list(range(6))
    # The recipe's compute_post_kl samples from the post-step weights through compute_logprobs.
    assert all("kl_pre_post_v2" in r for r in steps)
    # It learns to answer shorter, and so to end its answers before max_tokens.
    length = [r["env/all/ac_tokens_per_turn"] for r in steps]
    reward = [r["env/all/reward/total"] for r in steps]
    assert length[-1] < 0.5 * length[0], length
    assert reward[-1] > reward[0], reward


def test_guess_number(cookbook):
    """Multi-turn RL: the player guesses, the environment answers (too high, too low, correct, or a
    format reminder) and the conversation goes on for up to 10 turns, each turn sampled from the
    conversation so far."""
    from tinker_cookbook.recipes.multiplayer_rl.guess_number import train
    from tinker_cookbook.rl.train import main

    # The recipe's __main__: build_config, then rl.train.main.
    config = train.build_config(
        train.CLIConfig(
            log_path=str(cookbook),
            model_name=DEFAULT_MODEL,
            renderer_name=RENDERER,
            batch_size=1,
            group_size=2,
            learning_rate=1e-4,
            max_tokens=6,
            eval_every=0,
            save_every=0,
            max_steps=1,
        )
    )
    asyncio.run(main(config))
    _finished(cookbook)
    (step,) = [r for r in _metrics(cookbook) if "env/all/reward/total" in r]
    assert step["env/all/total_episodes"] == 2
    rollouts = [json.loads(line) for line in (cookbook / "iteration_000000" / "train_rollout_summaries.jsonl").open()]
    assert len(rollouts) == 2
    for rollout in rollouts:
        turns = rollout["steps"]
        assert 1 <= len(turns) <= 10
        assert turns[-1]["episode_done"] and (len(turns) == 10 or turns[-1]["logs"]["feedback"] == "Correct")
        # Each observation is the previous one plus the player's guess and the environment's answer.
        assert all(b["ob_len"] > a["ob_len"] + a["ac_len"] for a, b in zip(turns, turns[1:])), turns
        assert all(0 < t["ac_len"] <= 6 for t in turns)
        expected = {"Correct": 1.0, "Too low": 0.0, "Too high": 0.0}
        assert all(t["reward"] == expected.get(t["logs"]["feedback"], -1.0) for t in turns)
        assert rollout["total_reward"] == sum(t["reward"] for t in turns)
    # The whole conversation was trained on: a gradient where the group's returns differed, none
    # (zero advantages) where they were all the same.
    assert step["tokens/trained"] >= step["env/all/total_ob_tokens"]
    if step["env/all/by_group/frac_mixed"] > 0:
        assert step["grad_norm:mean"] > 0
    else:
        assert step["grad_norm:mean"] == 0
