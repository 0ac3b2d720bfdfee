"""RestClient over the local checkpoint store: every method in its sync (completed Future) and async
(one await) form, listing order and pages, TTL expiry, set-ttl, deletion, archives fetched with
urllib as the cookbook does, weights info, sessions, and the errors: malformed or escaping paths,
missing checkpoints, service-only operations."""

from __future__ import annotations

import asyncio
import concurrent.futures
import getpass
import hashlib
import json
import os
import tarfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import tinker
from tinker import _checkpoints as ckpt
from tinker import types
from tinker.lib.public_interfaces.rest_client import RestClient, UnsupportedOperationError


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


pytestmark = pytest.mark.usefixtures("store")  # each test gets its own checkpoint store


@pytest.fixture(scope="module")
def base(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture
def service():
    return tinker.ServiceClient(user_metadata={"renderer_name": "role_colon"})


@pytest.fixture
def rc(service) -> RestClient:
    return service.create_rest_client()


def step(tc, seed: int = 0) -> None:
    """One optimizer step, so that later saves hold different weights."""
    tokens = [(seed * 7 + i) % 500 for i in range(12)]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 11})
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()


def paths_of(response) -> list[str]:
    return [c.tinker_path for c in response.checkpoints]


def completed(future):
    """A sync RestClient method's return: a stdlib Future, already completed."""
    assert isinstance(future, concurrent.futures.Future)
    assert future.done()
    return future.result()


# ---- training runs ---------------------------------------------------------------------------------


def test_training_run_sync_and_async(service, rc, base):
    tc = service.create_lora_training_client(base, rank=2, user_metadata={"git_rev": "abc"})
    state = tc.save_state("a").result().path
    sampler = tc.save_weights_for_sampler("s").result().path
    run_id = tc.model_id

    run = completed(rc.get_training_run(run_id))
    assert isinstance(run, tinker.TrainingRun)
    assert run.training_run_id == run_id and run.base_model == base and run.model_owner == "local"
    assert run.is_lora is True and run.lora_rank == 2 and run.corrupted is False
    assert run.user_metadata == {"renderer_name": "role_colon", "git_rev": "abc"}
    assert run.last_request_time.tzinfo is not None
    assert abs(run.last_request_time - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert run.last_checkpoint.tinker_path == state and run.last_checkpoint.checkpoint_type == "training"
    assert run.last_sampler_checkpoint.tinker_path == sampler

    assert asyncio.run(rc.get_training_run_async(run_id)) == run
    assert completed(rc.get_training_run_by_tinker_path(sampler)) == run
    # the cookbook's resume path: checkpoint_utils reads the renderer from the run's metadata
    by_path = asyncio.run(rc.get_training_run_by_tinker_path_async(state))
    assert by_path.user_metadata.get("renderer_name") == "role_colon"


def test_missing_training_run_is_not_found(rc):
    with pytest.raises(tinker.NotFoundError, match="not found"):
        rc.get_training_run("nobody:train:0").result()
    with pytest.raises(tinker.NotFoundError):
        asyncio.run(rc.get_training_run_async("nobody:train:0"))
    with pytest.raises(tinker.NotFoundError):
        rc.list_checkpoints("nobody:train:0").result()
    with pytest.raises(tinker.NotFoundError):
        rc.get_training_run_by_tinker_path("tinker://nobody:train:0/weights/a").result()


def test_list_training_runs_newest_first_with_pages(service, rc, base):
    clients = [service.create_lora_training_client(base, rank=2) for _ in range(3)]
    for tc in clients:
        tc.save_weights_for_sampler("s").result()
    ids = [tc.model_id for tc in clients]

    response = completed(rc.list_training_runs())
    assert isinstance(response, types.TrainingRunsResponse)
    assert [r.training_run_id for r in response.training_runs] == ids[::-1]
    assert response.cursor == types.Cursor(offset=0, limit=20, total_count=3)

    clients[0].save_state("again").result()  # a request moves the run to the front
    assert [r.training_run_id for r in rc.list_training_runs().result().training_runs] == [ids[0], ids[2], ids[1]]

    page = asyncio.run(rc.list_training_runs_async(limit=1, offset=1, access_scope="owned", project_id=None))
    assert [r.training_run_id for r in page.training_runs] == [ids[2]]
    assert page.cursor == types.Cursor(offset=1, limit=1, total_count=3)
    assert rc.list_training_runs(limit=5, offset=3).result().training_runs == []
    for bad in ({"limit": -1}, {"offset": -2}, {"limit": 1.5}):
        with pytest.raises(tinker.BadRequestError, match="non-negative"):
            rc.list_training_runs(**bad).result()


# ---- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_records(service, rc, base, store):
    tc = service.create_lora_training_client(base, rank=2)
    state = tc.save_state("a").result().path
    sampler = tc.save_weights_for_sampler("s", ttl_seconds=3600).result().path
    response = completed(rc.list_checkpoints(tc.model_id))
    assert isinstance(response, types.CheckpointsListResponse)
    assert paths_of(response) == [sampler, state]  # newest first
    assert response.cursor.total_count == 2

    s, a = response.checkpoints
    assert isinstance(a, tinker.Checkpoint)
    assert (a.checkpoint_id, a.checkpoint_type, a.expires_at, a.public) == ("weights/a", "training", None, False)
    assert (s.checkpoint_id, s.checkpoint_type) == ("sampler_weights/s", "sampler")
    assert abs(s.expires_at - (datetime.now(timezone.utc) + timedelta(seconds=3600))) < timedelta(minutes=1)
    assert a.time <= s.time and a.time.tzinfo is not None
    a_dir = ckpt.checkpoint_dir(tc.model_id, "weights", "a")
    expected = sum((a_dir / f).stat().st_size for f in (*ADAPTER_FILES, "optimizer.safetensors"))
    assert a.size_bytes == expected
    assert asyncio.run(rc.list_checkpoints_async(tc.model_id)) == response


def test_list_user_checkpoints_across_runs(service, rc, base):
    first = service.create_lora_training_client(base, rank=2)
    second = service.create_lora_training_client(base, rank=2)
    saved = [first.save_state("a").result().path, second.save_state("b").result().path,
             first.save_weights_for_sampler("c").result().path, second.save_weights_for_sampler("d").result().path]

    response = completed(rc.list_user_checkpoints())
    assert paths_of(response) == saved[::-1]
    assert response.cursor == types.Cursor(offset=0, limit=100, total_count=4)
    page = asyncio.run(rc.list_user_checkpoints_async(limit=2, offset=1))
    assert paths_of(page) == saved[::-1][1:3]
    assert page.cursor == types.Cursor(offset=1, limit=2, total_count=4)
    assert rc.list_user_checkpoints(limit=0).result().checkpoints == []
    with pytest.raises(tinker.BadRequestError):
        rc.list_user_checkpoints(offset=-1).result()


def test_an_empty_store_lists_nothing(rc):
    assert rc.list_user_checkpoints().result().checkpoints == []
    assert rc.list_training_runs().result().cursor.total_count == 0
    assert rc.list_sessions().result().sessions == []


def test_hidden_temporaries_are_ignored(service, rc, base, store):
    tc = service.create_lora_training_client(base, rank=2)
    path = tc.save_state("a").result().path
    (store / "runs" / ".tmp-run-1234").mkdir()
    (store / "runs" / ".tmp-run-1234" / "run.json").write_text("{}")
    half = ckpt.run_dir(tc.model_id) / "weights" / ".tmp-b-0123"  # what a killed save leaves
    half.mkdir()
    (half / "adapter_config.json").write_text("{")
    (ckpt.run_dir(tc.model_id) / "weights" / "stray-file").write_text("not a checkpoint")
    assert paths_of(rc.list_user_checkpoints().result()) == [path]
    assert paths_of(rc.list_checkpoints(tc.model_id).result()) == [path]
    assert [r.training_run_id for r in rc.list_training_runs().result().training_runs] == [tc.model_id]


def test_a_corrupt_manifest_is_listed_reported_and_deletable(service, rc, base):
    tc = service.create_lora_training_client(base, rank=2)
    path = tc.save_state("a").result().path
    (ckpt.checkpoint_dir(tc.model_id, "weights", "a") / "checkpoint.json").write_text("{not json")
    [listed] = rc.list_checkpoints(tc.model_id).result().checkpoints
    assert listed.tinker_path == path and listed.size_bytes > 0
    with pytest.raises(tinker.BadRequestError, match="corrupt"):
        rc.get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.BadRequestError, match="corrupt"):
        rc.get_checkpoint_archive_url_from_tinker_path(path).result()
    rc.delete_checkpoint_from_tinker_path(path).result()
    assert rc.list_checkpoints(tc.model_id).result().checkpoints == []

    path = tc.save_state("b").result().path
    manifest_path = ckpt.checkpoint_dir(tc.model_id, "weights", "b") / "checkpoint.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "expires_at": "soon"}))
    assert paths_of(rc.list_checkpoints(tc.model_id).result()) == [path]
    with pytest.raises(tinker.BadRequestError, match="expires_at"):
        rc.set_checkpoint_ttl_from_tinker_path(path, 10).result()


# ---- TTL -----------------------------------------------------------------------------------------


def test_expired_checkpoints_are_deleted_and_never_listed(service, rc, base):
    tc = service.create_lora_training_client(base, rank=2)
    keep = tc.save_state("keep").result().path
    short = tc.save_weights_for_sampler("short", ttl_seconds=1).result().path
    assert short in paths_of(rc.list_user_checkpoints().result())
    time.sleep(1.2)
    directory = ckpt.checkpoint_dir(tc.model_id, "sampler_weights", "short")
    assert directory.is_dir()  # nothing has met it yet
    assert paths_of(rc.list_user_checkpoints().result()) == [keep]
    assert not directory.exists()
    assert rc.get_training_run(tc.model_id).result().last_sampler_checkpoint is None

    gone = tc.save_state("gone", ttl_seconds=1).result().path
    time.sleep(1.2)
    with pytest.raises(tinker.NotFoundError, match="expired"):
        rc.get_checkpoint_archive_url_from_tinker_path(gone).result()
    assert not ckpt.checkpoint_dir(tc.model_id, "weights", "gone").exists()
    with pytest.raises(tinker.NotFoundError):
        rc.get_weights_info_by_tinker_path(gone).result()


def test_set_ttl_rewrites_the_manifest(service, rc, base):
    tc = service.create_lora_training_client(base, rank=2)
    path = tc.save_state("a").result().path
    directory = ckpt.checkpoint_dir(tc.model_id, "weights", "a")
    before = json.loads((directory / "checkpoint.json").read_text())

    assert completed(rc.set_checkpoint_ttl_from_tinker_path(path, 600)) is None
    after = json.loads((directory / "checkpoint.json").read_text())
    assert abs(after["expires_at"] - (time.time() + 600)) < 30
    assert {k: v for k, v in after.items() if k != "expires_at"} == {k: v for k, v in before.items()
                                                                      if k != "expires_at"}
    [listed] = rc.list_checkpoints(tc.model_id).result().checkpoints
    assert abs(listed.expires_at.timestamp() - after["expires_at"]) < 1e-3
    assert sorted(p.name for p in directory.iterdir()) == sorted([*ADAPTER_FILES, "checkpoint.json",
                                                                   "optimizer.safetensors"])  # no temporaries
    tc.load_state_with_optimizer(path).result()  # the verified load still accepts it

    asyncio.run(rc.set_checkpoint_ttl_from_tinker_path_async(path, None))
    assert json.loads((directory / "checkpoint.json").read_text())["expires_at"] is None
    assert rc.list_checkpoints(tc.model_id).result().checkpoints[0].expires_at is None

    for bad in (0, -5, "soon", float("inf"), True):
        with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
            rc.set_checkpoint_ttl_from_tinker_path(path, bad).result()
    rc.set_checkpoint_ttl_from_tinker_path(path, 1).result()
    time.sleep(1.2)
    assert rc.list_checkpoints(tc.model_id).result().checkpoints == []
    with pytest.raises(tinker.NotFoundError):
        rc.set_checkpoint_ttl_from_tinker_path(path, 100).result()


# ---- delete ----------------------------------------------------------------------------------------


def test_delete_then_not_found(service, rc, base):
    tc = service.create_lora_training_client(base, rank=2)
    a = tc.save_state("a").result().path
    b = tc.save_state("b").result().path
    s = tc.save_weights_for_sampler("s").result().path
    rc.get_checkpoint_archive_url_from_tinker_path(a).result()
    archives = ckpt.store_root() / "archives" / tc.model_id / "weights" / "a"
    assert archives.is_dir()

    assert completed(rc.delete_checkpoint(tc.model_id, "weights/a")) is None
    assert not ckpt.checkpoint_dir(tc.model_id, "weights", "a").exists() and not archives.exists()
    assert paths_of(rc.list_checkpoints(tc.model_id).result()) == [s, b]
    with pytest.raises(tinker.NotFoundError):
        rc.delete_checkpoint(tc.model_id, "weights/a").result()
    with pytest.raises(tinker.NotFoundError):
        rc.get_weights_info_by_tinker_path(a).result()
    with pytest.raises(tinker.NotFoundError):
        tc.load_state(a).result()

    assert completed(rc.delete_checkpoint_from_tinker_path(b)) is None
    asyncio.run(rc.delete_checkpoint_from_tinker_path_async(s))
    with pytest.raises(tinker.NotFoundError):
        asyncio.run(rc.delete_checkpoint_async(tc.model_id, "sampler_weights/s"))
    assert rc.list_checkpoints(tc.model_id).result().checkpoints == []


def test_rolling_delete_as_the_cookbook_does(service, rc, base):
    """CheckpointManager's rolling saves: save a new state, delete the previous one (async)."""
    tc = service.create_lora_training_client(base, rank=2)

    async def rolling():
        previous = None
        for i in range(3):
            path = (await (await tc.save_state_async(f"{i:04d}", ttl_seconds=7 * 86400))).path
            if previous is not None:
                await rc.delete_checkpoint_from_tinker_path_async(previous)
            previous = path
        return previous

    last = asyncio.run(rolling())
    assert paths_of(rc.list_checkpoints(tc.model_id).result()) == [last]


# ---- archives ----------------------------------------------------------------------------------------


def extract(url: str, dest: Path) -> dict[str, bytes]:
    """What weights/_download.py does: urlretrieve the URL, then extract the tar."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "archive.tar"
    urllib.request.urlretrieve(url, archive)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert all(m.isfile() and "/" not in m.name for m in members)
        tar.extractall(dest / "out", filter="data")
    return {p.name: p.read_bytes() for p in (dest / "out").iterdir()}


def test_archive_holds_the_peft_adapter(service, rc, base, tmp_path):
    tc = service.create_lora_training_client(base, rank=2)
    step(tc)
    path = tc.save_state("a").result().path
    response = completed(rc.get_checkpoint_archive_url_from_tinker_path(path))
    assert isinstance(response, types.CheckpointArchiveUrlResponse)
    assert response.url.startswith("file://") and response.url.endswith(".tar")
    assert datetime.now(timezone.utc) < response.expires <= datetime.now(timezone.utc) + timedelta(hours=2)

    files = extract(response.url, tmp_path / "one")
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"]
    directory = ckpt.checkpoint_dir(tc.model_id, "weights", "a")
    for name in ADAPTER_FILES:
        assert files[name] == (directory / name).read_bytes()
    config = json.loads(files["adapter_config.json"])
    assert config["r"] == 2 and config["lora_alpha"] == 32.0 and config["base_model_name_or_path"] == base

    # the extracted directory is a PEFT adapter the store loads back
    fresh = service.create_training_client_from_state(str(tmp_path / "one" / "out"))
    assert fresh.get_info().lora_rank == 2


def test_archive_is_reused_and_rebuilt_when_the_checkpoint_changes(service, rc, base, tmp_path):
    tc = service.create_lora_training_client(base, rank=2)
    path = tc.save_weights_for_sampler("s").result().path
    first = rc.get_checkpoint_archive_url_from_tinker_path(path).result().url
    archive = Path(urllib.request.url2pathname(first.removeprefix("file://")))
    assert archive.is_file() and archive.resolve().is_relative_to((ckpt.store_root() / "archives").resolve())
    stamp = archive.stat().st_mtime_ns
    time.sleep(0.01)
    assert asyncio.run(rc.get_checkpoint_archive_url_from_tinker_path_async(path)).url == first
    assert completed(rc.get_checkpoint_archive_url(tc.model_id, "sampler_weights/s")).url == first
    assert archive.stat().st_mtime_ns == stamp  # reused, not rebuilt

    step(tc)
    tc.save_weights_for_sampler("s").result()  # overwrites with new weights
    second = asyncio.run(rc.get_checkpoint_archive_url_async(tc.model_id, "sampler_weights/s")).url
    assert second != first and not archive.exists()
    files = extract(second, tmp_path)
    current = ckpt.checkpoint_dir(tc.model_id, "sampler_weights", "s") / "adapter_model.safetensors"
    assert files["adapter_model.safetensors"] == current.read_bytes()


def test_archive_url_expires_with_its_checkpoint(service, rc, base):
    tc = service.create_lora_training_client(base, rank=2)
    path = tc.save_weights_for_sampler("s", ttl_seconds=60).result().path
    expires = rc.get_checkpoint_archive_url_from_tinker_path(path).result().expires
    assert expires <= datetime.now(timezone.utc) + timedelta(seconds=61)


def test_archive_of_a_tampered_checkpoint_is_refused(service, rc, base):
    tc = service.create_lora_training_client(base, rank=2)
    path = tc.save_weights_for_sampler("s").result().path
    weights = ckpt.checkpoint_dir(tc.model_id, "sampler_weights", "s") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(tinker.BadRequestError, match="corrupt"):
        rc.get_checkpoint_archive_url_from_tinker_path(path).result()
    assert not any((ckpt.store_root() / "archives").rglob("*.tar"))


# ---- weights info ------------------------------------------------------------------------------------


def test_weights_info(service, rc, base):
    tc = service.create_lora_training_client(base, rank=2, train_mlp=False)
    path = tc.save_state("a").result().path
    future = rc.get_weights_info_by_tinker_path(path)
    assert isinstance(future, tinker.APIFuture)
    info = future.result()
    assert isinstance(info, types.WeightsInfoResponse)
    assert (info.base_model, info.is_lora, info.lora_rank) == (base, True, 2)
    assert (info.train_attn, info.train_mlp, info.train_unembed) == (True, False, True)

    async def awaited():
        return await rc.get_weights_info_by_tinker_path(path), await future.result_async()

    assert asyncio.run(awaited()) == (info, info)


# ---- malformed and escaping paths --------------------------------------------------------------------

BAD_PATHS = [
    "", "tinker://", "tinker:///weights/a", "tinker://run/weights", "tinker://run/weights/", "tinker://run/bogus/a",
    "s3://run/weights/a", "/abs/run/weights/a", "tinker://run/weights/a/b", "tinker://../weights/a",
    "tinker://run/weights/..", "tinker://run/weights/.hidden", "tinker://run/weights/a..b", "tinker://run\0/weights/a",
    "tinker://run/weights/-rf", "tinker://%2e%2e/weights/a", "tinker://run/weights/a\\..\\..\\b", None, 7,
]  # fmt: skip


@pytest.mark.parametrize("path", BAD_PATHS)
def test_malformed_paths_raise_value_error(rc, path):
    calls = [rc.get_training_run_by_tinker_path, rc.get_checkpoint_archive_url_from_tinker_path,
             rc.delete_checkpoint_from_tinker_path, lambda p: rc.set_checkpoint_ttl_from_tinker_path(p, 10),
             rc.get_weights_info_by_tinker_path]
    for call in calls:
        future = call(path)  # sync methods never raise: the future carries the error
        with pytest.raises(ValueError):
            future.result()
    for call in (rc.get_training_run_by_tinker_path_async, rc.get_checkpoint_archive_url_from_tinker_path_async,
                 rc.delete_checkpoint_from_tinker_path_async):
        with pytest.raises(ValueError):
            asyncio.run(call(path))


@pytest.mark.parametrize("run_id, checkpoint_id", [
    ("..", "weights/a"), ("../..", "weights/a"), ("/etc", "weights/a"), ("a/b", "weights/a"), ("", "weights/a"),
    ("run", "weights/../../x"), ("run", "weights/.."), ("run", "other/a"), ("run", "weights"), ("run", "a"),
    ("run", "/weights/a"), ("run", "weights/a/b"), ("run", None),
])  # fmt: skip
def test_escaping_ids_are_rejected(rc, store, tmp_path, run_id, checkpoint_id):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    for future in (rc.delete_checkpoint(run_id, checkpoint_id), rc.get_checkpoint_archive_url(run_id, checkpoint_id)):
        with pytest.raises(ValueError):
            future.result()
    assert (victim / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("run_id", ["..", "../x", "/tmp", "a/b", "", ".hidden", "x" * 300])
def test_escaping_run_ids_are_rejected(rc, run_id):
    for future in (rc.get_training_run(run_id), rc.list_checkpoints(run_id)):
        with pytest.raises(ValueError):
            future.result()


def test_symlinks_out_of_the_store_are_not_followed(service, rc, base, store, tmp_path):
    outside = tmp_path / "outside"
    tc = service.create_lora_training_client(base, rank=2)
    path = tc.save_state("a").result().path
    real = ckpt.run_dir(tc.model_id)
    os.rename(real, outside)  # the run now lives outside; the store only links to it
    os.symlink(outside, real)
    assert rc.list_user_checkpoints().result().checkpoints == []
    assert rc.list_training_runs().result().training_runs == []
    for future in (rc.get_training_run(tc.model_id), rc.delete_checkpoint_from_tinker_path(path),
                   rc.get_checkpoint_archive_url_from_tinker_path(path)):
        with pytest.raises(ValueError, match="outside"):
            future.result()
    assert (outside / "weights" / "a" / "checkpoint.json").is_file()


# ---- sessions, samplers, user ------------------------------------------------------------------------


def test_sessions(service, rc, base):
    assert completed(rc.get_session(service.session_id)) == types.GetSessionResponse(training_run_ids=[],
                                                                                       sampler_ids=[])
    runs = [service.create_lora_training_client(base, rank=2) for _ in range(2)]
    for tc in runs:
        tc.save_weights_for_sampler("s").result()
    other = tinker.ServiceClient()
    other.create_lora_training_client(base, rank=2).save_state("x").result()

    session = rc.get_session(service.session_id).result()
    assert isinstance(session, types.GetSessionResponse)
    assert sorted(session.training_run_ids) == sorted(tc.model_id for tc in runs) and session.sampler_ids == []
    assert asyncio.run(rc.get_session_async(service.session_id)) == session
    with pytest.raises(tinker.NotFoundError):
        rc.get_session("no-such-session").result()

    sessions = completed(rc.list_sessions())
    assert isinstance(sessions, types.ListSessionsResponse)
    assert sessions.sessions == [other.session_id, service.session_id]  # most recently active first
    assert asyncio.run(rc.list_sessions_async(limit=1, offset=1)).sessions == [service.session_id]


def test_get_sampler_is_not_found(rc):
    future = rc.get_sampler("abc:sample:0")
    assert isinstance(future, tinker.APIFuture)
    with pytest.raises(tinker.NotFoundError, match="registry"):
        future.result()
    with pytest.raises(tinker.NotFoundError):
        asyncio.run(rc.get_sampler_async("abc:sample:0"))


def test_whoami(rc):
    future = rc.whoami()
    assert isinstance(future, tinker.APIFuture)
    me = future.result()
    assert isinstance(me, types.WhoamiResponse)
    assert me.user_urn == f"urn:tinker:local:user:{getpass.getuser()}" and me.email is None
    assert asyncio.run(rc.whoami_async()) == me


# ---- service-only operations ---------------------------------------------------------------------------


def test_service_only_operations_raise_a_clear_error(service, rc, base):
    path = service.create_lora_training_client(base, rank=2).save_state("a").result().path
    sync_calls = {
        "publish_checkpoint_from_tinker_path": lambda: rc.publish_checkpoint_from_tinker_path(path),
        "unpublish_checkpoint_from_tinker_path": lambda: rc.unpublish_checkpoint_from_tinker_path(path),
        "get_audit_log": lambda: rc.get_audit_log(event_type="checkpoints", day=None),
        "assign_session_project": lambda: rc.assign_session_project(service.session_id, "p"),
        "export_session_trace": lambda: rc.export_session_trace(service.session_id),
        "get_billing_usage": lambda: rc.get_billing_usage("2025-01-01", "2025-02-01"),
    }
    for name, call in sync_calls.items():
        with pytest.raises(UnsupportedOperationError, match=f"{name} does not apply to the local engine") as err:
            call().result()
        assert isinstance(err.value, tinker.BadRequestError) and isinstance(err.value, NotImplementedError)
        assert isinstance(err.value, tinker.TinkerError)
    for coroutine in (rc.publish_checkpoint_from_tinker_path_async(path),
                      rc.unpublish_checkpoint_from_tinker_path_async(path), rc.get_audit_log_async(),
                      rc.assign_session_project_async("s", "p"), rc.export_session_trace_async("s"),
                      rc.get_billing_usage_async("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z")):
        with pytest.raises(tinker.BadRequestError, match="local engine"):
            asyncio.run(coroutine)
    assert rc.get_weights_info_by_tinker_path(path).result().lora_rank == 2  # nothing was changed


def test_rest_client_without_a_service_client(service, base):
    path = service.create_lora_training_client(base, rank=2).save_state("a").result().path
    rc = RestClient(None)
    assert rc.get_training_run_by_tinker_path(path).result().lora_rank == 2
    digest = hashlib.sha256(path.encode()).hexdigest()  # any id not in the store
    with pytest.raises(tinker.NotFoundError):
        rc.get_session(digest).result()
