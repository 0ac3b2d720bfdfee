"""Overwriting a checkpoint never leaves its name unresolvable (issue: hostile input, item 8).

An overwrite used to be two renames (old copy away, new copy in): a kill between them left nothing under
the name. Now the directories are swapped in one step where the file system can (renameat2
RENAME_EXCHANGE), and elsewhere the old copy waits under `.old-<name>`, which readers use while the name
is missing. A separate process overwrites save_state and save_weights_for_sampler checkpoints in a loop
and is killed with SIGKILL at random moments, at least 50 times per path; after every kill the name must
load with every file matching its manifest, and afterwards the public API lists, loads and samples it.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tinker
from tinker import _checkpoints as ckpt
from tinker import types

KILLER = pathlib.Path(__file__).resolve().parent / "overwrite_killer.py"
KILLS = 60


def kill_loop(path: str, exchange: bool, seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pathlib.Path(tinker.__file__).parents[1]),
                                                                        os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(KILLER), path, "llama", str(KILLS), str(seed), "1" if exchange else "0"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("exchange", [True, False], ids=["one-step-exchange", "two-renames"])
def test_killed_overwrites_always_leave_a_complete_checkpoint(store, tiny_llama, exchange):
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(tiny_llama, rank=2).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state = tc.save_state("ow").result().path
    sampler = tc.save_weights_for_sampler("ow").result().path

    for i, path in enumerate((state, sampler)):
        report = kill_loop(path, exchange, seed=i)
        assert report["failures"] == [], report["failures"][:5]
        assert report["kills"] >= 50 and report["after_a_save"] >= 25

    # leftovers of the kills are never listed as checkpoints; the names load and sample through the API
    listed = sc.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints
    assert sorted(c.tinker_path for c in listed) == sorted([state, sampler])
    tc.load_state_with_optimizer(state).result()
    out = sc.create_sampling_client(model_path=sampler).sample(
        types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2, stop=[])).result()
    assert len(out.sequences[0].tokens) == 2
    # the next overwrite through the API cleans up and lands
    assert tc.save_state("ow", overwrite=True).result().path == state
    assert np.isfinite(tc.forward([datum], "cross_entropy").result().metrics["loss:sum"])


def test_an_interrupted_overwrite_is_read_from_the_previous_copy(store, tiny_llama):
    """The state a kill between the two renames leaves: the name is missing, `.old-<name>` holds the copy."""
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(tiny_llama, rank=2).result()
    path = tc.save_state("mid").result().path
    slot = ckpt._slot(*ckpt.parse_path(path))
    os.rename(slot, ckpt._old_copy(slot))
    assert ckpt.load_checkpoint(path).params  # readers find the previous copy
    listed = sc.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints
    assert [c.tinker_path for c in listed] == [path]
    with pytest.raises(tinker.ConflictError):
        tc.save_state("mid").result()  # still taken
    tc.save_state("mid", overwrite=True).result()
    assert slot.is_dir() and not ckpt._old_copy(slot).exists()
    # a stale previous copy (killed after the second rename) never comes back after a delete
    os.makedirs(ckpt._old_copy(slot))
    sc.create_rest_client().delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        tc.load_state(path).result()
