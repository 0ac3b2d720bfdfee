"""RestClient: Tinker's REST API (training runs, checkpoints, archives, sessions) over the local store.

Tinker's calling conventions are kept: a sync method returns a `concurrent.futures.Future`
(`.result()`), its `*_async` twin is a coroutine that returns the value (one await), and
`get_weights_info_by_tinker_path`, `get_sampler` and `whoami` return an APIFuture. The work is
local file I/O, so a sync method does it at call time and returns a completed Future (errors,
malformed paths included, are raised by `.result()`); an async twin runs it in a worker thread.

TTLs are honoured lazily: a checkpoint whose `expires_at` has passed is deleted the moment any
call meets it, and is never listed or returned. Run ids and checkpoint names only reach the file
system through the store's validating helpers, so no argument can name a path outside the store.

Archives: `get_checkpoint_archive_url*` builds a `.tar` of the checkpoint's PEFT adapter
(adapter_config.json, adapter_model.safetensors and an empty checkpoint_complete marker at the
root, as Tinker's archives hold) under `<store>/archives/`, and returns its `file://` URL, which
`urllib.request.urlretrieve` fetches like the service's signed URL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import getpass
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Literal

from ... import _checkpoints as ckpt
from ..._exceptions import BadRequestError, NotFoundError
from ..._futures import APIFuture, DoneFuture
from ...types.checkpoints import CHECKPOINT_TYPE_OF_KIND
from ...types import (
    Checkpoint, CheckpointArchiveUrlResponse, CheckpointsListResponse, Cursor, ExternalWeightsUrlsResponse,
    GetSamplerResponse,
    GetSessionResponse, ListSessionsResponse, TrainingRun, TrainingRunsResponse, WeightsInfoResponse,
    WhoamiResponse,
)  # fmt: skip

logger = logging.getLogger("tinker")

_ARCHIVE_MEMBERS = (ckpt.ADAPTER_CONFIG, ckpt.ADAPTER_WEIGHTS)
_COMPLETE_MARKER = "checkpoint_complete"
_ARCHIVE_URL_LIFETIME = timedelta(hours=1)

AccessScope = Literal["owned", "accessible"]


class UnsupportedOperationError(BadRequestError, NotImplementedError):
    """A service-only operation (publishing, billing, audit logs, traces, projects) that has no
    meaning for checkpoints kept in local files.

    A BadRequestError, because that is what Tinker code already catches for a request the service
    refuses (and a TinkerError, which the cookbook catches around RestClient calls); also a
    NotImplementedError, so generic code that probes optional features recognises it."""


# ---- calling conventions -------------------------------------------------------------------------


def _completed(fn: Callable, *args) -> concurrent.futures.Future:
    """Runs `fn` now and returns a completed Future holding its value or its exception."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 - delivered through the future, as the service's errors are
        future.set_exception(e)
    return future


def _done(fn: Callable, *args) -> APIFuture:
    """As _completed, as an APIFuture (for the methods Tinker types that way)."""
    try:
        return DoneFuture(fn(*args))
    except Exception as e:  # noqa: BLE001
        return DoneFuture(error=e)


def _at(path: str, fn: Callable, *args):
    """Calls fn(run_id, kind, name, *args) on a tinker:// path (ValueError when malformed)."""
    return fn(*ckpt.parse_path(path), *args)


def _split_checkpoint_id(checkpoint_id: str) -> tuple[str, str]:
    """(kind, name) of a checkpoint id such as "weights/0010" (ValueError when malformed)."""
    kind, sep, name = checkpoint_id.partition("/") if isinstance(checkpoint_id, str) else ("", "", "")
    if not sep or kind not in ckpt.KINDS:
        raise ValueError(f"invalid checkpoint id {checkpoint_id!r}: expected '<weights|sampler_weights>/<name>'")
    return kind, ckpt.check_component("checkpoint name", name)


def _by_id(run_id: str, checkpoint_id: str, fn: Callable, *args):
    ckpt.check_component("training run id", run_id)
    return fn(run_id, *_split_checkpoint_id(checkpoint_id), *args)


def _page(limit: int, offset: int) -> None:
    for what, value in (("limit", limit), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequestError(f"{what} must be a non-negative integer, got {value!r}")


# ---- reading the store ---------------------------------------------------------------------------


def _entries(directory: Path) -> list[str]:
    """Names of the subdirectories that are runs or checkpoints: hidden `.tmp-*` leftovers of
    interrupted saves and anything that is not a valid id are skipped."""
    try:
        names = [e.name for e in os.scandir(directory)  # symlinks are skipped: nothing may lead outside
                 if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    valid = []
    for name in names:
        try:
            valid.append(ckpt.check_component("name", name))
        except ValueError:
            pass
    return sorted(valid)


def _time(text, fallback: Path) -> datetime:
    try:
        value = datetime.fromisoformat(text)
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return datetime.fromtimestamp(fallback.stat().st_mtime, timezone.utc)


def _live_manifest(run_id: str, kind: str, name: str) -> tuple[Path, dict]:
    """The checkpoint's directory and manifest; NotFoundError when it is missing or expired (an
    expired one is deleted here)."""
    directory = ckpt.checkpoint_dir(run_id, kind, name)
    path = ckpt.tinker_path(run_id, kind, name)
    manifest = ckpt.read_manifest(directory, path)
    if ckpt.expired(manifest):
        _delete(run_id, kind, name, missing_ok=True)
        raise NotFoundError(f"checkpoint {path} has expired (its ttl_seconds ran out) and was deleted")
    return directory, manifest


def _checkpoint(run_id: str, kind: str, name: str) -> Checkpoint | None:
    """The Checkpoint record, or None if it expired (and was deleted) or vanished meanwhile. A
    checkpoint whose manifest is unreadable is still listed (from the files themselves), so the
    user can find and delete it."""
    try:
        directory, manifest = _live_manifest(run_id, kind, name)
    except NotFoundError:
        return None
    except BadRequestError as e:
        logger.warning("%s", e)
        directory = ckpt.checkpoint_dir(run_id, kind, name)
        files = [p for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []
        return Checkpoint(checkpoint_id=f"{kind}/{name}", checkpoint_type=CHECKPOINT_TYPE_OF_KIND[kind],
                          time=_time(None, directory), tinker_path=ckpt.tinker_path(run_id, kind, name),
                          size_bytes=sum(p.stat().st_size for p in files))
    expires = manifest.get("expires_at")
    return Checkpoint(
        checkpoint_id=f"{kind}/{name}", checkpoint_type=CHECKPOINT_TYPE_OF_KIND[kind],
        time=_time(manifest.get("created"), directory / ckpt.MANIFEST),
        tinker_path=ckpt.tinker_path(run_id, kind, name),
        size_bytes=sum(int(f.get("size", 0)) for f in manifest["files"].values()),
        expires_at=None if expires is None else datetime.fromtimestamp(float(expires), timezone.utc),
    )  # fmt: skip


def _newest_first(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    return sorted(checkpoints, key=lambda c: (c.time, c.tinker_path), reverse=True)


def _run_checkpoints(run_id: str) -> list[Checkpoint]:
    found = []
    for kind in ckpt.KINDS:
        for name in _entries(ckpt.run_dir(run_id) / kind):
            checkpoint = _checkpoint(run_id, kind, name)
            if checkpoint is not None:
                found.append(checkpoint)
    return _newest_first(found)


def _run_ids() -> list[str]:
    return _entries(ckpt.store_root() / "runs")


def _training_run(run_id: str) -> TrainingRun:
    record = ckpt.read_run(run_id)
    checkpoints = _run_checkpoints(run_id)
    training = [c for c in checkpoints if c.checkpoint_type == "training"]
    sampler = [c for c in checkpoints if c.checkpoint_type == "sampler"]
    metadata = record.get("user_metadata")
    return TrainingRun(
        training_run_id=run_id, base_model=record.get("base_model", ""),
        model_owner=record.get("model_owner", "local"), is_lora=record.get("is_lora", True),
        lora_rank=record.get("lora_rank"),
        last_request_time=_time(record.get("last_request_time"), ckpt.run_dir(run_id) / "run.json"),
        last_checkpoint=training[0] if training else None, last_sampler_checkpoint=sampler[0] if sampler else None,
        user_metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else None,
    )  # fmt: skip


def _all_training_runs() -> list[TrainingRun]:
    """Every readable run, most recently used first (an unreadable run.json is skipped, with a warning)."""
    runs = []
    for run_id in _run_ids():
        try:
            runs.append(_training_run(run_id))
        except NotFoundError:
            pass  # a directory without run.json: deleted meanwhile, or not a run
        except BadRequestError as e:
            logger.warning("%s", e)
    return sorted(runs, key=lambda r: (r.last_request_time, r.training_run_id), reverse=True)


def _list_training_runs(limit: int, offset: int) -> TrainingRunsResponse:
    _page(limit, offset)
    runs = _all_training_runs()
    return TrainingRunsResponse(training_runs=runs[offset:offset + limit],
                                cursor=Cursor(offset=offset, limit=limit, total_count=len(runs)))


def _list_checkpoints(run_id: str) -> CheckpointsListResponse:
    if not (ckpt.run_dir(run_id) / "run.json").is_file():
        ckpt.read_run(run_id)  # raises the store's NotFoundError
    checkpoints = _run_checkpoints(run_id)
    count = len(checkpoints)
    return CheckpointsListResponse(checkpoints=checkpoints, cursor=Cursor(offset=0, limit=count, total_count=count))


def _list_user_checkpoints(limit: int, offset: int) -> CheckpointsListResponse:
    _page(limit, offset)
    checkpoints = _newest_first([c for run_id in _run_ids() for c in _run_checkpoints(run_id)])
    return CheckpointsListResponse(checkpoints=checkpoints[offset:offset + limit],
                                   cursor=Cursor(offset=offset, limit=limit, total_count=len(checkpoints)))


def _weights_info(run_id: str, kind: str, name: str) -> WeightsInfoResponse:
    _, m = _live_manifest(run_id, kind, name)
    return WeightsInfoResponse(base_model=m["base_model"], is_lora=True, lora_rank=m.get("lora_rank"),
                               train_unembed=m.get("train_unembed"), train_mlp=m.get("train_mlp"),
                               train_attn=m.get("train_attn"))


# ---- changing the store --------------------------------------------------------------------------


def _delete(run_id: str, kind: str, name: str, missing_ok: bool = False) -> None:
    """Deletes the checkpoint (atomically, in the store) and its archives."""
    try:
        ckpt.delete_checkpoint(run_id, kind, name)
    except NotFoundError:
        if not missing_ok:
            raise
        shutil.rmtree(ckpt.archive_dir(run_id, kind, name), ignore_errors=True)


def _set_ttl(run_id: str, kind: str, name: str, ttl_seconds) -> None:
    """Sets the checkpoint to expire `ttl_seconds` from now, or never (None)."""
    ttl = ckpt.check_ttl(ttl_seconds)
    directory, manifest = _live_manifest(run_id, kind, name)
    manifest["expires_at"] = None if ttl is None else time.time() + ttl
    ckpt.write_file_atomic(directory / ckpt.MANIFEST, json.dumps(manifest, indent=2).encode())


def _tar_bytes(files: dict[str, bytes], mtime: float) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _archive(run_id: str, kind: str, name: str) -> Path:
    """The checkpoint's archive, built (verified against the manifest, written atomically) unless
    one of the same adapter files exists. Named by the files' checksums, so an overwritten
    checkpoint gets a new archive; older ones are removed."""
    directory, manifest = _live_manifest(run_id, kind, name)
    sums = "".join(str(manifest["files"].get(m, {}).get("sha256")) for m in _ARCHIVE_MEMBERS)
    folder = ckpt.archive_dir(run_id, kind, name)
    target = folder / f"{hashlib.sha256(sums.encode()).hexdigest()[:20]}.tar"
    if not target.is_file():
        files = {m: ckpt.read_verified(directory, m, manifest['files'].get(m)) for m in _ARCHIVE_MEMBERS}
        files[_COMPLETE_MARKER] = b""
        created = _time(manifest.get("created"), directory / ckpt.MANIFEST).timestamp()
        folder.mkdir(parents=True, exist_ok=True)
        ckpt.write_file_atomic(target, _tar_bytes(files, created))
    for stale in folder.iterdir():
        old_tmp = stale.name.startswith(".tmp-") and time.time() - stale.stat().st_mtime > 60
        if stale != target and (stale.suffix == ".tar" and not stale.name.startswith(".") or old_tmp):
            stale.unlink(missing_ok=True)
    return target


def _archive_url(run_id: str, kind: str, name: str) -> CheckpointArchiveUrlResponse:
    target = _archive(run_id, kind, name)
    expires = datetime.now(timezone.utc) + _ARCHIVE_URL_LIFETIME
    checkpoint = _checkpoint(run_id, kind, name)
    if checkpoint is not None and checkpoint.expires_at is not None:
        expires = min(expires, checkpoint.expires_at)
    return CheckpointArchiveUrlResponse(url=target.as_uri(), expires=expires)


def _external_urls(run_id: str, kind: str, name: str) -> ExternalWeightsUrlsResponse:
    """file:// URLs of an external_weights checkpoint's files (not its manifest), checked first."""
    if kind != "external_weights":
        raise BadRequestError(f"{ckpt.tinker_path(run_id, kind, name)} is not an external weights checkpoint "
                              f"(tinker://<run>/external_weights/<name>, from TrainingClient.save_weights_external)")
    directory, manifest = _live_manifest(run_id, kind, name)
    urls = {}
    for file_name, entry in sorted(manifest.get("files", {}).items()):
        ckpt.read_verified(directory, file_name, entry)  # a corrupt file fails here, not after the download
        urls[file_name] = (directory / file_name).as_uri()
    expires = datetime.now(timezone.utc) + _ARCHIVE_URL_LIFETIME
    checkpoint = _checkpoint(run_id, kind, name)
    if checkpoint is not None and checkpoint.expires_at is not None:
        expires = min(expires, checkpoint.expires_at)
    return ExternalWeightsUrlsResponse(urls=urls, expires=expires, encrypted=bool(manifest.get("encrypted")))


# ---- sessions, samplers, user ------------------------------------------------------------------


def _session_of(run_id: str) -> str | None:
    session, sep, _ = run_id.rpartition(":train:")
    return session if sep else None


def _get_session(session_id: str, current: str | None) -> GetSessionResponse:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"invalid session id {session_id!r}")
    runs = [r for r in _run_ids() if _session_of(r) == session_id]
    if not runs and session_id != current:
        raise NotFoundError(f"session {session_id!r} not found: no training run in the checkpoint store "
                            f"{ckpt.store_root()} belongs to it")
    return GetSessionResponse(training_run_ids=runs, sampler_ids=[])


def _list_sessions(limit: int, offset: int) -> ListSessionsResponse:
    _page(limit, offset)
    sessions = []
    for run in _all_training_runs():  # most recent first, so each session is placed by its latest run
        session = _session_of(run.training_run_id)
        if session is not None and session not in sessions:
            sessions.append(session)
    return ListSessionsResponse(sessions=sessions[offset:offset + limit])


def _get_sampler(sampler_id: str) -> GetSamplerResponse:
    raise NotFoundError(f"sampler {sampler_id!r} not found: the local engine keeps no registry of live sampling "
                        f"clients; ask the SamplingClient itself (get_base_model(), or the model_path you made it "
                        f"with)")


def _whoami() -> WhoamiResponse:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return WhoamiResponse(user_urn=f"urn:tinker:local:user:{user}")


def _unsupported(operation: str, why: str) -> Callable[..., Any]:
    def fail(*_args):
        raise UnsupportedOperationError(f"{operation} does not apply to the local engine: {why}")

    return fail


_LOCAL = "checkpoints are files in this machine's store"
_publish = _unsupported("publish_checkpoint_from_tinker_path",
                        f"{_LOCAL}, visible to whoever can read them; share the directory, or the archive from "
                        f"get_checkpoint_archive_url_from_tinker_path, instead")
_unpublish = _unsupported("unpublish_checkpoint_from_tinker_path",
                          f"{_LOCAL}; nothing is ever published (control access with file permissions)")
_audit_log = _unsupported("get_audit_log", "there is no service, so there is no audit log of its accesses")
_assign_project = _unsupported("assign_session_project", "there are no service projects locally")
_export_trace = _unsupported("export_session_trace", "the local engine records no service-side session traces")
_billing = _unsupported("get_billing_usage", "running locally is not billed")


# ---- the client ----------------------------------------------------------------------------------


class RestClient:
    """Lists, inspects, archives and deletes the training runs and checkpoints in the local store
    (`$TINKER_HOME`, see `tinker._checkpoints`). Made by `ServiceClient.create_rest_client()`."""

    def __init__(self, holder=None):
        self.holder = holder

    def __repr__(self) -> str:
        return f"RestClient(store={str(ckpt.store_root())!r})"

    @property
    def _session_id(self) -> str | None:
        return getattr(self.holder, "session_id", None)

    # ---- training runs ---------------------------------------------------------------------

    def get_training_run(self, training_run_id: str, access_scope: AccessScope = "owned"
                         ) -> concurrent.futures.Future[TrainingRun]:
        """The run's base model, LoRA rank, user metadata and latest checkpoints."""
        return _completed(_training_run, training_run_id)

    async def get_training_run_async(self, training_run_id: str, access_scope: AccessScope = "owned") -> TrainingRun:
        return await asyncio.to_thread(_training_run, training_run_id)

    def get_training_run_by_tinker_path(self, tinker_path: str, access_scope: AccessScope = "owned"
                                        ) -> concurrent.futures.Future[TrainingRun]:
        """The training run a checkpoint path belongs to."""
        return _completed(lambda: _training_run(ckpt.parse_path(tinker_path)[0]))

    async def get_training_run_by_tinker_path_async(self, tinker_path: str, access_scope: AccessScope = "owned"
                                                    ) -> TrainingRun:
        return await asyncio.to_thread(lambda: _training_run(ckpt.parse_path(tinker_path)[0]))

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        """The base model and LoRA configuration a checkpoint was saved with."""
        return _done(_at, tinker_path, _weights_info)

    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[ExternalWeightsUrlsResponse]:
        """Download URLs (file:// here) of the files of a tinker://<run>/external_weights/<name>
        checkpoint, keyed by file name (`<file>.age` when it was saved for age recipients)."""
        return _done(_at, tinker_path, _external_urls)

    async def get_external_weights_urls_async(self, tinker_path: str) -> ExternalWeightsUrlsResponse:
        return await asyncio.to_thread(_at, tinker_path, _external_urls)

    def list_training_runs(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned",
                           project_id: str | None = None) -> concurrent.futures.Future[TrainingRunsResponse]:
        """Runs, most recently used first; `cursor.total_count` counts them all."""
        return _completed(_list_training_runs, limit, offset)

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned",
                                       project_id: str | None = None) -> TrainingRunsResponse:
        return await asyncio.to_thread(_list_training_runs, limit, offset)

    # ---- checkpoints -----------------------------------------------------------------------

    def list_checkpoints(self, training_run_id: str) -> concurrent.futures.Future[CheckpointsListResponse]:
        """The run's live checkpoints of both kinds, newest first."""
        return _completed(_list_checkpoints, training_run_id)

    async def list_checkpoints_async(self, training_run_id: str) -> CheckpointsListResponse:
        return await asyncio.to_thread(_list_checkpoints, training_run_id)

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0
                              ) -> concurrent.futures.Future[CheckpointsListResponse]:
        """Checkpoints of every run, newest first, one page of them."""
        return _completed(_list_user_checkpoints, limit, offset)

    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0) -> CheckpointsListResponse:
        return await asyncio.to_thread(_list_user_checkpoints, limit, offset)

    def get_checkpoint_archive_url(self, training_run_id: str, checkpoint_id: str
                                   ) -> concurrent.futures.Future[CheckpointArchiveUrlResponse]:
        """A file:// URL of a .tar of the checkpoint's PEFT adapter (checkpoint_id: "weights/<name>")."""
        return _completed(_by_id, training_run_id, checkpoint_id, _archive_url)

    async def get_checkpoint_archive_url_async(self, training_run_id: str, checkpoint_id: str
                                               ) -> CheckpointArchiveUrlResponse:
        return await asyncio.to_thread(_by_id, training_run_id, checkpoint_id, _archive_url)

    def get_checkpoint_archive_url_from_tinker_path(self, tinker_path: str
                                                    ) -> concurrent.futures.Future[CheckpointArchiveUrlResponse]:
        return _completed(_at, tinker_path, _archive_url)

    async def get_checkpoint_archive_url_from_tinker_path_async(self, tinker_path: str
                                                                ) -> CheckpointArchiveUrlResponse:
        return await asyncio.to_thread(_at, tinker_path, _archive_url)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> concurrent.futures.Future[None]:
        """Deletes the checkpoint (and its archive); NotFoundError if there is none."""
        return _completed(_by_id, training_run_id, checkpoint_id, _delete)

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        await asyncio.to_thread(_by_id, training_run_id, checkpoint_id, _delete)

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> concurrent.futures.Future[None]:
        return _completed(_at, tinker_path, _delete)

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await asyncio.to_thread(_at, tinker_path, _delete)

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None
                                            ) -> concurrent.futures.Future[None]:
        """Makes the checkpoint expire `ttl_seconds` from now; None keeps it forever."""
        return _completed(_at, tinker_path, _set_ttl, ttl_seconds)

    async def set_checkpoint_ttl_from_tinker_path_async(self, tinker_path: str, ttl_seconds: int | None) -> None:
        await asyncio.to_thread(_at, tinker_path, _set_ttl, ttl_seconds)

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> concurrent.futures.Future[None]:
        """Not available locally: raises UnsupportedOperationError (a BadRequestError)."""
        return _completed(_publish)

    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        _publish()

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> concurrent.futures.Future[None]:
        """Not available locally: raises UnsupportedOperationError (a BadRequestError)."""
        return _completed(_unpublish)

    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        _unpublish()

    # ---- sessions, samplers, user ----------------------------------------------------------

    def get_session(self, session_id: str, access_scope: AccessScope = "owned"
                    ) -> concurrent.futures.Future[GetSessionResponse]:
        """The training runs a session (a ServiceClient's session_id) created. Sampler ids are not
        recorded locally, so `sampler_ids` is empty."""
        return _completed(_get_session, session_id, self._session_id)

    async def get_session_async(self, session_id: str, access_scope: AccessScope = "owned") -> GetSessionResponse:
        return await asyncio.to_thread(_get_session, session_id, self._session_id)

    def list_sessions(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
                      ) -> concurrent.futures.Future[ListSessionsResponse]:
        """Sessions that saved checkpoints, most recently active first."""
        return _completed(_list_sessions, limit, offset)

    async def list_sessions_async(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
                                  ) -> ListSessionsResponse:
        return await asyncio.to_thread(_list_sessions, limit, offset)

    def get_sampler(self, sampler_id: str) -> APIFuture[GetSamplerResponse]:
        """Always NotFoundError: live sampling clients are objects in their process, not registered."""
        return _done(_get_sampler, sampler_id)

    async def get_sampler_async(self, sampler_id: str) -> GetSamplerResponse:
        return _get_sampler(sampler_id)

    def whoami(self) -> APIFuture[WhoamiResponse]:
        """The local user, as `urn:tinker:local:user:<login name>`."""
        return _done(_whoami)

    async def whoami_async(self) -> WhoamiResponse:
        return _whoami()

    # ---- service-only ----------------------------------------------------------------------

    def get_audit_log(self, event_type: str = "all", day=None) -> concurrent.futures.Future:
        return _completed(_audit_log)

    async def get_audit_log_async(self, event_type: str = "all", day=None):
        _audit_log()

    def assign_session_project(self, session_id: str, project_id: str) -> concurrent.futures.Future:
        return _completed(_assign_project)

    async def assign_session_project_async(self, session_id: str, project_id: str):
        _assign_project()

    def export_session_trace(self, session_id: str) -> concurrent.futures.Future:
        return _completed(_export_trace)

    async def export_session_trace_async(self, session_id: str):
        _export_trace()

    def get_billing_usage(self, starting_on, ending_before) -> concurrent.futures.Future:
        return _completed(_billing)

    async def get_billing_usage_async(self, starting_on, ending_before):
        _billing()

    def get_telemetry(self):
        return None


__all__ = ["RestClient", "UnsupportedOperationError"]
