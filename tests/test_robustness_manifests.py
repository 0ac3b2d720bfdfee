"""Hand-edited and damaged files in the checkpoint store and in adapter / model directories (issue: hostile
input and damaged stores, items 4 and 5).

Every field a load reads from checkpoint.json, adapter_config.json, run.json or a model's config.json is
checked: a wrong type, a missing field, a huge integer, NaN or infinity, a non-numeric string, or JSON
nested too deeply to parse is reported as the tinker error the load raises for a bad file, through the
future, naming the file and the field. The same clients keep working afterwards. A listing meets damaged
manifests and lists them from their files (with a warning), and still lists the good checkpoints."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

import tinker
from tinker import _checkpoints as ckpt
from tinker import types
from tinker._exceptions import ModelLoadError
from tinker.cli import cli
from tinker.lib.public_interfaces.rest_client import RestClient

from robustness import make_clients, still_works  # noqa: E402

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError on this



@pytest.fixture(scope="module")
def clients(tiny_llama):
    return make_clients(tiny_llama)



DELETE = object()  # a field to remove


def rewrite(path: Path, change) -> None:
    """Applies `change` to the JSON object in `path`: a dict of new values (DELETE removes the field), or a
    str that replaces the whole file."""
    if isinstance(change, str):
        path.write_text(change)
        return
    doc = json.loads(path.read_text())
    for key, value in change.items():
        if value is DELETE:
            doc.pop(key, None)
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))  # NaN and Infinity are written as JSON's NaN / Infinity literals


def manifest_of(path: str) -> Path:
    return ckpt.checkpoint_dir(*ckpt.parse_path(path)) / "checkpoint.json"


def field_error(field: str | None, file: Path) -> str:
    """The pattern of an error that names the file and the field (or, for unparsable JSON, why)."""
    return re.escape(str(file)) + ".*" + (rf"field '{field}'" if field else "nested too deeply")


# (change to checkpoint.json, the field the error names; None: the file does not parse)
MANIFEST_DAMAGE = [
    pytest.param({"version": "1"}, "version", id="wrong-type-version-string"),
    pytest.param({"files": ["adapter_model.safetensors"]}, "files", id="list-for-dict-files"),
    pytest.param({"user_metadata": ["a", "b"]}, "user_metadata", id="list-for-dict-metadata"),
    pytest.param({"step": 10**30}, "step", id="huge-int-step"),
    pytest.param({"step": 2**63}, "step", id="int64-overflow-step"),
    pytest.param({"step": "abc"}, "step", id="non-numeric-step"),
    pytest.param({"lora_rank": "2"}, "lora_rank", id="numeric-string-rank"),
    pytest.param({"lora_rank": DELETE}, "lora_rank", id="missing-rank"),
    pytest.param({"base_model": DELETE}, "base_model", id="missing-base-model"),
    pytest.param({"base_model": None}, "base_model", id="null-base-model"),
    pytest.param({"train_attn": "yes"}, "train_attn", id="wrong-type-flag"),
    pytest.param({"expires_at": float("nan")}, "expires_at", id="nan-expiry"),
    pytest.param({"expires_at": float("inf")}, "expires_at", id="inf-expiry"),
    pytest.param({"expires_at": 1e300}, "expires_at", id="huge-expiry"),
    pytest.param({"created": 5}, "created", id="wrong-type-created"),
    pytest.param({"step": [[[[[[1]]]]]]}, "step", id="nested-value"),
    pytest.param(DEEP, None, id="deeply-nested-file"),
    pytest.param('{"format": "tinker-local-checkpoint", "files": ' + DEEP + "}", None, id="deeply-nested-field"),
]


@pytest.mark.parametrize("change, field", MANIFEST_DAMAGE)
def test_damaged_manifest_is_reported_through_the_future(clients, store, change, field):
    sc, tc, sampler = clients
    path = tc.save_state("damaged").result().path
    manifest = manifest_of(path)
    rewrite(manifest, change)
    pattern = field_error(field, manifest)
    futures = {  # each call returns its future: the error is the future's, not the call's
        "load_state": tc.load_state(path),
        "load_state_with_optimizer": tc.load_state_with_optimizer(path),
        "create_training_client_from_state": sc.create_training_client_from_state(path),
        "create_training_client_from_state_with_optimizer": sc.create_training_client_from_state_with_optimizer(path),
        "create_sampling_client": sc.create_sampling_client(model_path=path),
        "TrainingClient.create_sampling_client": tc.create_sampling_client(path),
        "get_weights_info_by_tinker_path": RestClient().get_weights_info_by_tinker_path(path),
    }
    for name, future in futures.items():
        with pytest.raises(tinker.BadRequestError, match=pattern):
            future.result()
    still_works(tc, sampler)


def test_manifest_within_bounds_still_loads(clients, store):
    """The checks refuse only what is wrong: the largest step, the edge of expiry and string metadata load."""
    sc, tc, sampler = clients
    path = tc.save_state("edge").result().path
    rewrite(manifest_of(path), {"step": 2**53, "expires_at": 253402300799.0, "user_metadata": {"k": "v"}})
    resumed = sc.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.optim_step(types.AdamParams(learning_rate=1e-3)).result() is not None
    [listed] = RestClient().list_checkpoints(tc.model_id).result().checkpoints
    assert listed.user_metadata == {"k": "v"} and listed.expires_at.year == 9999
    still_works(tc, sampler)


# ---- PEFT adapter_config.json ------------------------------------------------------------------------------

ADAPTER_DAMAGE = [
    pytest.param({"r": "2"}, "r", id="numeric-string-r"),
    pytest.param({"r": DELETE}, "r", id="missing-r"),
    pytest.param({"r": None}, "r", id="null-r"),
    pytest.param({"r": 10**30}, "r", id="huge-int-r"),
    pytest.param({"r": 2.5}, "r", id="float-r"),
    pytest.param({"lora_alpha": "abc"}, "lora_alpha", id="non-numeric-alpha"),
    pytest.param({"lora_alpha": float("nan")}, "lora_alpha", id="nan-alpha"),
    pytest.param({"lora_alpha": float("inf")}, "lora_alpha", id="inf-alpha"),
    pytest.param({"lora_alpha": 10**400}, "lora_alpha", id="huge-int-alpha"),
    pytest.param({"target_modules": {"q_proj": 1}}, "target_modules", id="dict-target-modules"),
    pytest.param({"target_modules": [1, 2]}, "target_modules", id="int-list-target-modules"),
    pytest.param({"base_model_name_or_path": ["x"]}, "base_model_name_or_path", id="list-base-model"),
    pytest.param({"use_rslora": "false"}, "use_rslora", id="string-flag"),
    pytest.param({"bias": 0}, "bias", id="wrong-type-bias"),
    pytest.param({"peft_type": ["LORA"]}, "peft_type", id="wrong-type-peft-type"),
    pytest.param(DEEP, None, id="deeply-nested-file"),
    pytest.param('{"r": 2, "target_modules": ' + DEEP + "}", None, id="deeply-nested-field"),
]


@pytest.fixture
def adapter_dir(clients, store, tmp_path):
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) of the rank-2 client."""
    _, tc, _ = clients
    source = ckpt.checkpoint_dir(*ckpt.parse_path(tc.save_weights_for_sampler("peft").result().path))
    directory = tmp_path / "adapter"
    directory.mkdir()
    for name in (ckpt.ADAPTER_CONFIG, ckpt.ADAPTER_WEIGHTS):
        shutil.copyfile(source / name, directory / name)
    return directory


def test_adapter_directory_loads_before_damage(clients, adapter_dir):
    sc, tc, sampler = clients
    tc.load_state(str(adapter_dir)).result()
    sc.create_training_client_from_state(str(adapter_dir)).result()
    tc.create_sampling_client(str(adapter_dir)).result()
    still_works(tc, sampler)


@pytest.mark.parametrize("change, field", ADAPTER_DAMAGE)
def test_damaged_adapter_config_is_reported_through_the_future(clients, adapter_dir, change, field):
    sc, tc, sampler = clients
    config = adapter_dir / ckpt.ADAPTER_CONFIG
    rewrite(config, change)
    source = str(adapter_dir)
    pattern = field_error(field, config) if field else re.escape(str(adapter_dir)) + ".*nested too deeply"
    futures = {
        "load_state": tc.load_state(source),
        "create_training_client_from_state": sc.create_training_client_from_state(source),
        "TrainingClient.create_sampling_client": tc.create_sampling_client(source),
    }
    for name, future in futures.items():
        with pytest.raises(tinker.BadRequestError, match=pattern):
            future.result()
    from tinker._export import export_adapter

    with pytest.raises(tinker.BadRequestError, match=pattern):
        export_adapter(source, adapter_dir.parent / "out")
    still_works(tc, sampler)


def test_adapter_config_that_is_not_an_object(clients, adapter_dir):
    sc, tc, sampler = clients
    (adapter_dir / ckpt.ADAPTER_CONFIG).write_text("[1, 2, 3]")
    with pytest.raises(tinker.BadRequestError, match=re.escape(str(adapter_dir / ckpt.ADAPTER_CONFIG)) +
                       re.escape(": the file holds [1, 2, 3] (list); expected a JSON object")):
        tc.load_state(str(adapter_dir)).result()
    still_works(tc, sampler)


# ---- a local Hugging Face checkpoint's config.json ------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_llama, directory)
    return directory


@pytest.mark.parametrize("change, field", [
    pytest.param({"tie_word_embeddings": "false"}, "tie_word_embeddings", id="string-bool"),
    pytest.param({"attention_bias": [False]}, "attention_bias", id="list-bool"),
    pytest.param({"hidden_act": ["silu"]}, "hidden_act", id="list-for-string"),
    pytest.param({"hidden_size": 10**30}, "hidden_size", id="huge-int"),
    pytest.param({"hidden_size": "64"}, "hidden_size", id="numeric-string"),
    pytest.param({"rms_norm_eps": float("nan")}, "rms_norm_eps", id="nan"),
    pytest.param({"rms_norm_eps": float("inf")}, "rms_norm_eps", id="inf"),
    pytest.param({"rope_scaling": {"rope_type": "default"}, "rope_parameters": [1, 2]}, "rope", id="list-rope"),
    pytest.param(DEEP, None, id="deeply-nested-file"),
])  # fmt: skip
def test_damaged_model_config_is_reported_through_the_future(clients, model_copy, change, field):
    sc, tc, sampler = clients
    config = model_copy / "config.json"
    rewrite(config, change)
    future = sc.create_lora_training_client(str(model_copy), rank=2)
    # the message names the file, the field and what it holds, with its type
    what = rf"{field}.* \((str|int|float|list)\)" if field else "nested too deeply"
    with pytest.raises(ModelLoadError, match=re.escape(str(config)) + ".*" + what):
        future.result()
    still_works(tc, sampler)


# ---- listing a store with damaged manifests -------------------------------------------------------------------


LISTING_DAMAGE = {  # checkpoint name: (change to its checkpoint.json, the field the warning names)
    "wrong-type": ({"version": "1"}, "version"),
    "list-for-dict": ({"files": ["x"]}, "files"),
    "huge-int": ({"step": 10**30}, "step"),
    "null": ({"lora_rank": None}, "lora_rank"),
    "missing": ({"train_mlp": DELETE}, "train_mlp"),
    "nan": ({"expires_at": float("nan")}, "expires_at"),
    "huge-expiry": ({"expires_at": 1e300}, "expires_at"),
    "bad-file-entry": ({"files": {"adapter_model.safetensors": {"size": "big", "sha256": "0" * 64}}}, "files"),
    "nested": (DEEP, None),
}


@pytest.fixture
def damaged_store(clients, store, tiny_llama):
    """A run with one good checkpoint and one damaged one per LISTING_DAMAGE entry, and a second run with a good
    checkpoint whose run.json is damaged."""
    _, tc, _ = clients
    good = tc.save_state("good", user_metadata={"kept": "yes"}).result().path
    damaged = {}
    for name, (change, field) in LISTING_DAMAGE.items():
        path = tc.save_weights_for_sampler(name).result().path
        rewrite(manifest_of(path), change)
        damaged[path] = field
    other = tinker.ServiceClient().create_lora_training_client(tiny_llama, rank=2).result()
    other_good = other.save_weights_for_sampler("fine").result().path
    return tc.model_id, good, damaged, other.model_id, other_good


def check_warnings(caplog, damaged: dict) -> None:
    messages = [r.getMessage() for r in caplog.records if r.name == "tinker" and r.levelno == logging.WARNING]
    for path, field in damaged.items():
        pattern = field_error(field, manifest_of(path))
        assert any(re.search(pattern, m) for m in messages), (path, pattern, messages)


def test_listing_lists_good_and_damaged_checkpoints(clients, damaged_store, caplog):
    sc, tc, sampler = clients
    run_id, good, damaged, other_run, other_good = damaged_store
    rc = RestClient()
    with caplog.at_level(logging.WARNING, logger="tinker"):
        listed = {c.tinker_path: c for c in rc.list_checkpoints(run_id).result().checkpoints}
    assert set(listed) == {good, *damaged}
    assert listed[good].user_metadata == {"kept": "yes"}  # read from its manifest
    assert all(listed[p].size_bytes > 0 and listed[p].user_metadata is None for p in damaged)  # from the files
    check_warnings(caplog, damaged)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tinker"):
        response = rc.list_user_checkpoints(limit=100).result()
    assert {c.tinker_path for c in response.checkpoints} == {good, other_good, *damaged}
    assert response.cursor.total_count == len(damaged) + 2
    check_warnings(caplog, damaged)

    # the damaged ones are reported when used, and can be deleted
    some = next(iter(damaged))
    with pytest.raises(tinker.BadRequestError):
        rc.get_checkpoint_archive_url_from_tinker_path(some).result()
    rc.delete_checkpoint_from_tinker_path(some).result()
    assert some not in {c.tinker_path for c in rc.list_checkpoints(run_id).result().checkpoints}
    still_works(tc, sampler)


@pytest.mark.parametrize("change", [DEEP, {"base_model": ["x"]}, {"is_lora": "maybe"}, {"training_run_id": DELETE},
                                    {"session_display_name": 5}])
def test_listing_training_runs_skips_a_damaged_run_record(clients, damaged_store, caplog, change):
    run_id, _, _, other_run, _ = damaged_store
    run_json = ckpt.run_dir(other_run) / "run.json"
    rewrite(run_json, change)
    rc = RestClient()
    with caplog.at_level(logging.WARNING, logger="tinker"):
        runs = rc.list_training_runs(limit=100).result().training_runs
    assert [r.training_run_id for r in runs] == [run_id]
    assert any(str(run_json) in r.getMessage() for r in caplog.records)
    with pytest.raises(tinker.BadRequestError, match=re.escape(str(run_json))):
        rc.get_training_run(other_run).result()
    assert len(rc.list_checkpoints(other_run).result().checkpoints) == 1  # its checkpoints still list
    sessions = {s.session_id for s in rc.search_sessions(types.SessionSearchRequest()).result().sessions}
    assert {run_id.split(":train:")[0], other_run.split(":train:")[0]} <= sessions


def test_cli_checkpoint_list_with_damaged_manifests(clients, damaged_store, capsys, caplog):
    run_id, good, damaged, _, other_good = damaged_store
    with caplog.at_level(logging.WARNING, logger="tinker"):
        assert cli(["checkpoint", "list", "--limit", "0"]) == 0
    out, _ = capsys.readouterr()
    for path in (good, other_good, *damaged):
        assert path in out
    check_warnings(caplog, damaged)

    assert cli(["-f", "json", "checkpoint", "list", "--run-id", run_id]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {c["tinker_path"] for c in data["checkpoints"]} == {good, *damaged}

    path, field = next((p, f) for p, f in damaged.items() if f)
    assert cli(["checkpoint", "info", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinker: error: ") and f"field '{field}'" in err and "Traceback" not in err
