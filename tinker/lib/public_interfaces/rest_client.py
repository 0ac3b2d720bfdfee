"""RestClient: Tinker's REST API (training runs, checkpoints, archives, sessions) over the local store.

Tinker's calling conventions are kept: a sync method returns an APIFuture (`.result()` or `await`;
it is also a `concurrent.futures.Future`, as these methods returned before 0.36), and its `*_async`
twin is a coroutine that returns the value (one await). The work is local file I/O, so a sync
method does it at call time and returns a completed future (errors, malformed paths included, are
raised by `.result()` / `await`); an async twin runs it in a worker thread.

`RestClient()` works on its own (0.36+): the store is this machine's, so it needs no ServiceClient,
and `base_url` / `api_key` are accepted and have no effect.

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
import getpass
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Literal

from ... import _checkpoints as ckpt
from ... import _deprecation as deprecation
from ..experimental import ExperimentalWarning, experimental
from ..._exceptions import BadRequestError, InvalidArgumentError, NotFoundError
from ..._engine import optional_str_arg
from ..._futures import ConcurrentAPIFuture, completed_future
from ...types.checkpoints import CHECKPOINT_TYPE_OF_KIND
from ...types import (
    Checkpoint, CheckpointArchiveUrlResponse, CheckpointsListResponse, ClientSessionFinished,
    CurrentCheckpointStorageUsageItem, CurrentCheckpointStorageUsageResponse, Cursor, ExternalWeightsUrlsResponse,
    GetSamplerResponse, GetServerCapabilitiesResponse, GetSessionResponse, ListSessionsResponse, SessionActive,
    SessionSearchCursor, SessionSearchRequest, SessionSearchResponse, SessionSummary, TrainingRun,
    TrainingRunsResponse, WeightsInfoResponse, WhoamiResponse,
)  # fmt: skip
from .service_client import server_capabilities, session_status

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


# Runs `fn` now and returns a completed future holding its value or its exception (delivered
# through the future, as the service's errors are).
_completed = completed_future


def _at(path: str, fn: Callable, *args):
    """Calls fn(run_id, kind, name, *args) on a tinker:// path (ValueError when malformed)."""
    return fn(*ckpt.parse_path(path), *args)


def _split_checkpoint_id(checkpoint_id: str) -> tuple[str, str]:
    """(kind, name) of a checkpoint id such as "weights/0010" (ValueError when malformed)."""
    kind, sep, name = checkpoint_id.partition("/") if isinstance(checkpoint_id, str) else ("", "", "")
    if not sep or kind not in ckpt.KINDS:
        raise InvalidArgumentError(f"invalid checkpoint id {checkpoint_id!r}: expected '<weights|sampler_weights>/<name>'")
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
    return _valid(names)


def _valid(names) -> list[str]:
    """The names that are valid ids, sorted."""
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
        user_metadata=_metadata(manifest.get("user_metadata")),
        expires_at=None if expires is None else datetime.fromtimestamp(float(expires), timezone.utc),
    )  # fmt: skip


def _metadata(value) -> dict[str, str] | None:
    """A stored user_metadata dict as str -> str (None when absent or not a dict)."""
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None


def _newest_first(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    return sorted(checkpoints, key=lambda c: (c.time, c.tinker_path), reverse=True)


def _run_checkpoints(run_id: str) -> list[Checkpoint]:
    found = []
    for kind in ckpt.KINDS:
        for name in _valid(ckpt.checkpoint_names(run_id, kind)):
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
    return TrainingRun(
        training_run_id=run_id, base_model=record.get("base_model", ""),
        model_owner=record.get("model_owner", "local"), is_lora=record.get("is_lora", True),
        lora_rank=record.get("lora_rank"),
        last_request_time=_time(record.get("last_request_time"), ckpt.run_dir(run_id) / "run.json"),
        last_checkpoint=training[0] if training else None, last_sampler_checkpoint=sampler[0] if sampler else None,
        user_metadata=_metadata(record.get("user_metadata")),
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
    optimizer = ckpt.read_run(run_id).get("optimizer_config")  # absent in runs saved before 0.38: AdamW
    return WeightsInfoResponse(base_model=m["base_model"], is_lora=True, lora_rank=m.get("lora_rank"),
                               train_unembed=m.get("train_unembed"), train_mlp=m.get("train_mlp"),
                               train_attn=m.get("train_attn"),
                               **({} if optimizer is None else {"optimizer_config": optimizer}))


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


def _session_runs(session_id: str) -> list[dict]:
    """The readable run records of a session, most recently used first."""
    records = []
    for run_id in _run_ids():
        if _session_of(run_id) == session_id:
            try:
                records.append(ckpt.read_run(run_id))
            except BadRequestError as e:  # unreadable run.json (NotFoundError included: deleted meanwhile)
                logger.warning("%s", e)
    return sorted(records, key=lambda r: str(r.get("last_request_time", "")), reverse=True)


def _get_session(session_id: str, current: str | None) -> GetSessionResponse:
    if not isinstance(session_id, str) or not session_id:
        raise InvalidArgumentError(f"invalid session id {session_id!r}")
    runs = [r for r in _run_ids() if _session_of(r) == session_id]
    if not runs and session_id != current:
        raise NotFoundError(f"session {session_id!r} not found: no training run in the checkpoint store "
                            f"{ckpt.store_root()} belongs to it")
    records = _session_runs(session_id)  # what the session's runs recorded about it
    latest = records[0] if records else {}
    return GetSessionResponse(training_run_ids=runs, sampler_ids=[], display_name=latest.get("session_display_name"),
                              user_metadata=_metadata(latest.get("session_user_metadata")))


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


def _copy_weights(path: str, project_id: str | None, ttl_seconds) -> str:
    """Copies the checkpoint at `path` into a new run of a new session (as the service does); the
    copy keeps its kind and name. Returns the copy's tinker:// path."""
    run_id, kind, name = ckpt.parse_path(path)
    project_id = optional_str_arg("destination_project_id", project_id)  # written into the copy's run.json
    _live_manifest(run_id, kind, name)  # NotFoundError for a missing or expired source
    ttl = ckpt.check_ttl(ttl_seconds)
    source = ckpt.read_run(run_id)
    copy_run = f"{uuid.uuid4()}:train:0"
    record = {**source, "training_run_id": copy_run, "project_id": project_id, "copied_from": path}
    return ckpt.copy_checkpoint(run_id, kind, name, record, ttl)


def _storage_usage(project_id: str | None) -> CurrentCheckpointStorageUsageResponse:
    """Live checkpoints and their bytes, by the project of their run (nothing is billed here)."""
    totals: dict[str | None, list[int]] = {}
    for run_id in _run_ids():
        try:
            project = ckpt.read_run(run_id).get("project_id")
        except BadRequestError:
            continue
        if project_id is not None and project != project_id:
            continue
        checkpoints = _run_checkpoints(run_id)
        count_size = totals.setdefault(project, [0, 0])
        count_size[0] += len(checkpoints)
        count_size[1] += sum(c.size_bytes or 0 for c in checkpoints)
    user = _whoami().user_urn
    items = [CurrentCheckpointStorageUsageItem(project_id=project, org_user_urn=user, checkpoint_count=count,
                                               size_bytes=size, size_gigabytes=size / 1e9)
             for project, (count, size) in sorted(totals.items(), key=lambda kv: str(kv[0]))]
    return CurrentCheckpointStorageUsageResponse(data=items)


def _session_status(session_id: str):
    """Active or client-finished for this process's sessions; None (unknown) for others."""
    if session_id not in session_status:
        return None
    finish = session_status[session_id]
    return SessionActive() if finish is None else ClientSessionFinished(reason={"type": finish})


def _session_summaries() -> list[SessionSummary]:
    """Every session with a run in the store, newest first."""
    by_session: dict[str, list[str]] = {}
    for run_id in _run_ids():
        session = _session_of(run_id)
        if session is not None:
            by_session.setdefault(session, []).append(run_id)
    owner = _whoami().user_urn
    summaries = []
    for session, run_ids in by_session.items():
        records = _session_runs(session)
        checkpoints = [c for r in run_ids for c in _run_checkpoints(r)]
        times = [_time(r.get("last_request_time"), ckpt.run_dir(r["training_run_id"]) / "run.json") for r in records]
        times += [c.time for c in checkpoints]
        if not times:
            continue
        latest = records[0] if records else {}
        summaries.append(SessionSummary(
            session_id=session, created_at=min(times), owner=owner, project_id=latest.get("project_id") or "",
            status=_session_status(session), checkpoints_count=len(checkpoints),
            display_name=latest.get("session_display_name"),
            user_metadata=_metadata(latest.get("session_user_metadata")),
            checkpoint_storage_bytes=sum(c.size_bytes or 0 for c in checkpoints)))
    return sorted(summaries, key=lambda s: (s.created_at, s.session_id), reverse=True)


def _matches(summary: SessionSummary, request: SessionSearchRequest, owner: str) -> bool:
    if request.session_id is not None or request.display_name is not None:
        by_id = request.session_id is not None and summary.session_id == request.session_id
        name = (summary.display_name or "").lower()
        by_name = request.display_name is not None and all(w in name for w in request.display_name.lower().split())
        if not (by_id or by_name):
            return False
    if request.project_ids is not None and summary.project_id not in request.project_ids:
        return False
    metadata = summary.user_metadata or {}
    if any(metadata.get(k) != v for k, v in request.user_metadata.items()):
        return False
    if request.owner.type == "user" and owner not in request.owner.owner_urns:
        return False
    if request.statuses is not None:
        status = summary.status
        if status is None or not any(_status_matches(status, query) for query in request.statuses):
            return False
    return True


def _status_matches(status, query) -> bool:
    if status.type != query.type:
        return False
    return query.type != "client_finished" or query.reasons is None or status.reason["type"] in query.reasons


def _search_sessions(request: SessionSearchRequest) -> SessionSearchResponse:
    if not isinstance(request, SessionSearchRequest):
        raise BadRequestError(f"search_sessions takes a tinker.types.SessionSearchRequest, got "
                              f"{type(request).__name__}")
    owner = _whoami().user_urn
    found = [s for s in _session_summaries() if _matches(s, request, owner)]
    if request.cursor is not None:  # newest first: the page starts after the cursor's session
        after = (request.cursor.last_created_at, request.cursor.last_session_id)
        found = [s for s in found if (s.created_at, s.session_id) < after]
    page = found[:request.limit]
    more = len(found) > request.limit
    cursor = SessionSearchCursor(last_created_at=page[-1].created_at, last_session_id=page[-1].session_id) \
        if more else None
    return SessionSearchResponse(sessions=page, next_cursor=cursor)


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
_assign_project = _unsupported("assign_session_project", "there are no service projects locally")
_export_trace = _unsupported("export_session_trace", "the local engine records no service-side session traces")


# ---- the client ----------------------------------------------------------------------------------


class RestClient:
    """Lists, inspects, archives, copies and deletes the training runs and checkpoints in the local
    store (`$TINKER_HOME`, see `tinker._checkpoints`). `tinker.RestClient()` needs no arguments;
    `ServiceClient.create_rest_client()` gives one that knows its session."""

    def __init__(self, _holder=None, *, base_url: str | None = None, api_key: str | None = None):
        self.holder = _holder

    def get_server_capabilities(self) -> ConcurrentAPIFuture[GetServerCapabilitiesResponse]:
        """The base models that load here, with their context lengths."""
        return _completed(server_capabilities)

    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        return await asyncio.to_thread(server_capabilities)

    def __repr__(self) -> str:
        return f"RestClient(store={str(ckpt.store_root())!r})"

    @property
    def _session_id(self) -> str | None:
        return getattr(self.holder, "session_id", None)

    # ---- training runs ---------------------------------------------------------------------

    def get_training_run(self, training_run_id: str, access_scope: AccessScope = "owned"
                         ) -> ConcurrentAPIFuture[TrainingRun]:
        """The run's base model, LoRA rank, user metadata and latest checkpoints."""
        return _completed(_training_run, training_run_id)

    @deprecation.awaitable_twin("RestClient", "get_training_run")
    async def get_training_run_async(self, training_run_id: str, access_scope: AccessScope = "owned") -> TrainingRun:
        return await asyncio.to_thread(_training_run, training_run_id)

    def get_training_run_by_tinker_path(self, tinker_path: str, access_scope: AccessScope = "owned"
                                        ) -> ConcurrentAPIFuture[TrainingRun]:
        """The training run a checkpoint path belongs to."""
        return _completed(lambda: _training_run(ckpt.parse_path(tinker_path)[0]))

    @deprecation.awaitable_twin("RestClient", "get_training_run_by_tinker_path")
    async def get_training_run_by_tinker_path_async(self, tinker_path: str, access_scope: AccessScope = "owned"
                                                    ) -> TrainingRun:
        return await asyncio.to_thread(lambda: _training_run(ckpt.parse_path(tinker_path)[0]))

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> ConcurrentAPIFuture[WeightsInfoResponse]:
        """The base model and LoRA configuration a checkpoint was saved with."""
        return _completed(_at, tinker_path, _weights_info)

    def get_external_weights_urls(self, tinker_path: str) -> ConcurrentAPIFuture[ExternalWeightsUrlsResponse]:
        """Download URLs (file:// here) of the files of a tinker://<run>/external_weights/<name>
        checkpoint, keyed by file name (`<file>.age` when it was saved for age recipients)."""
        return _completed(_at, tinker_path, _external_urls)

    @deprecation.awaitable_twin("RestClient", "get_external_weights_urls")
    async def get_external_weights_urls_async(self, tinker_path: str) -> ExternalWeightsUrlsResponse:
        return await asyncio.to_thread(_at, tinker_path, _external_urls)

    def list_training_runs(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned",
                           project_id: str | None = None) -> ConcurrentAPIFuture[TrainingRunsResponse]:
        """Runs, most recently used first; `cursor.total_count` counts them all."""
        return _completed(_list_training_runs, limit, offset)

    @deprecation.awaitable_twin("RestClient", "list_training_runs")
    async def list_training_runs_async(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned",
                                       project_id: str | None = None) -> TrainingRunsResponse:
        return await asyncio.to_thread(_list_training_runs, limit, offset)

    # ---- checkpoints -----------------------------------------------------------------------

    def list_checkpoints(self, training_run_id: str) -> ConcurrentAPIFuture[CheckpointsListResponse]:
        """The run's live checkpoints of both kinds, newest first."""
        return _completed(_list_checkpoints, training_run_id)

    @deprecation.awaitable_twin("RestClient", "list_checkpoints")
    async def list_checkpoints_async(self, training_run_id: str) -> CheckpointsListResponse:
        return await asyncio.to_thread(_list_checkpoints, training_run_id)

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0
                              ) -> ConcurrentAPIFuture[CheckpointsListResponse]:
        """Checkpoints of every run, newest first, one page of them."""
        return _completed(_list_user_checkpoints, limit, offset)

    @deprecation.awaitable_twin("RestClient", "list_user_checkpoints")
    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0) -> CheckpointsListResponse:
        return await asyncio.to_thread(_list_user_checkpoints, limit, offset)

    def get_checkpoint_archive_url(self, training_run_id: str, checkpoint_id: str
                                   ) -> ConcurrentAPIFuture[CheckpointArchiveUrlResponse]:
        """A file:// URL of a .tar of the checkpoint's PEFT adapter (checkpoint_id: "weights/<name>")."""
        return _completed(_by_id, training_run_id, checkpoint_id, _archive_url)

    async def get_checkpoint_archive_url_async(self, training_run_id: str, checkpoint_id: str
                                               ) -> CheckpointArchiveUrlResponse:
        return await asyncio.to_thread(_by_id, training_run_id, checkpoint_id, _archive_url)

    def get_checkpoint_archive_url_from_tinker_path(self, tinker_path: str
                                                    ) -> ConcurrentAPIFuture[CheckpointArchiveUrlResponse]:
        return _completed(_at, tinker_path, _archive_url)

    async def get_checkpoint_archive_url_from_tinker_path_async(self, tinker_path: str
                                                                ) -> CheckpointArchiveUrlResponse:
        return await asyncio.to_thread(_at, tinker_path, _archive_url)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> ConcurrentAPIFuture[None]:
        """Deletes the checkpoint (and its archive); NotFoundError if there is none."""
        return _completed(_by_id, training_run_id, checkpoint_id, _delete)

    @deprecation.awaitable_twin("RestClient", "delete_checkpoint")
    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        await asyncio.to_thread(_by_id, training_run_id, checkpoint_id, _delete)

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> ConcurrentAPIFuture[None]:
        return _completed(_at, tinker_path, _delete)

    @deprecation.awaitable_twin("RestClient", "delete_checkpoint_from_tinker_path")
    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await asyncio.to_thread(_at, tinker_path, _delete)

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None
                                            ) -> ConcurrentAPIFuture[None]:
        """Makes the checkpoint expire `ttl_seconds` from now; None keeps it forever."""
        return _completed(_at, tinker_path, _set_ttl, ttl_seconds)

    @deprecation.awaitable_twin("RestClient", "set_checkpoint_ttl_from_tinker_path")
    async def set_checkpoint_ttl_from_tinker_path_async(self, tinker_path: str, ttl_seconds: int | None) -> None:
        await asyncio.to_thread(_at, tinker_path, _set_ttl, ttl_seconds)

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> ConcurrentAPIFuture[None]:
        """Not available locally: raises UnsupportedOperationError (a BadRequestError)."""
        return _completed(_publish)

    @deprecation.awaitable_twin("RestClient", "publish_checkpoint_from_tinker_path")
    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        _publish()

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> ConcurrentAPIFuture[None]:
        """Not available locally: raises UnsupportedOperationError (a BadRequestError)."""
        return _completed(_unpublish)

    @deprecation.awaitable_twin("RestClient", "unpublish_checkpoint_from_tinker_path")
    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        _unpublish()

    def copy_weights(self, path: str, destination_project_id: str | None = None, *, ttl_seconds: int | None = None,
                     weights_access_token: str | None = None) -> ConcurrentAPIFuture[str]:
        """Copies a checkpoint into a new training run (of a new session) in `destination_project_id`
        (default: TINKER_PROJECT_ID; projects are just labels here). The future gives the copy's
        tinker:// path; the copy keeps the checkpoint's kind and name."""
        if destination_project_id is None:
            destination_project_id = os.environ.get("TINKER_PROJECT_ID") or None
        return _completed(_copy_weights, path, destination_project_id, ttl_seconds)

    @deprecation.awaitable_twin("RestClient", "copy_weights")
    async def copy_weights_async(self, path: str, destination_project_id: str | None = None, *,
                                 ttl_seconds: int | None = None, weights_access_token: str | None = None) -> str:
        return await self.copy_weights(path, destination_project_id, ttl_seconds=ttl_seconds)

    @deprecation.moved_to_admin("get_current_checkpoint_storage_usage")
    def get_current_checkpoint_storage_usage(self, project_id: str | None = None
                                             ) -> ConcurrentAPIFuture[CurrentCheckpointStorageUsageResponse]:
        """Deprecated (0.38): AdminClient.get_current_checkpoint_storage_usage, which this calls."""
        return self._admin_client().get_current_checkpoint_storage_usage(project_id)

    @deprecation.moved_to_admin_twin("get_current_checkpoint_storage_usage")
    async def get_current_checkpoint_storage_usage_async(self, project_id: str | None = None
                                                         ) -> CurrentCheckpointStorageUsageResponse:
        return await self._admin_client().get_current_checkpoint_storage_usage(project_id)

    # ---- sessions, samplers, user ----------------------------------------------------------

    @experimental("RestClient.search_sessions is experimental: it may change or be removed in any release without "
                  "a deprecation period.", category=ExperimentalWarning)
    def search_sessions(self, request: SessionSearchRequest) -> ConcurrentAPIFuture[SessionSearchResponse]:
        """Sessions with runs in the store that match `request`, newest first, one page of them
        (pass `next_cursor` back as `cursor` for the next)."""
        return _completed(_search_sessions, request)

    def get_session(self, session_id: str, access_scope: AccessScope = "owned"
                    ) -> ConcurrentAPIFuture[GetSessionResponse]:
        """The training runs a session (a ServiceClient's session_id) created. Sampler ids are not
        recorded locally, so `sampler_ids` is empty."""
        return _completed(_get_session, session_id, self._session_id)

    @deprecation.awaitable_twin("RestClient", "get_session")
    async def get_session_async(self, session_id: str, access_scope: AccessScope = "owned") -> GetSessionResponse:
        return await asyncio.to_thread(_get_session, session_id, self._session_id)

    def list_sessions(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
                      ) -> ConcurrentAPIFuture[ListSessionsResponse]:
        """Sessions that saved checkpoints, most recently active first."""
        return _completed(_list_sessions, limit, offset)

    @deprecation.awaitable_twin("RestClient", "list_sessions")
    async def list_sessions_async(self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned"
                                  ) -> ListSessionsResponse:
        return await asyncio.to_thread(_list_sessions, limit, offset)

    def get_sampler(self, sampler_id: str) -> ConcurrentAPIFuture[GetSamplerResponse]:
        """Always NotFoundError: live sampling clients are objects in their process, not registered."""
        return _completed(_get_sampler, sampler_id)

    @deprecation.awaitable_twin("RestClient", "get_sampler")
    async def get_sampler_async(self, sampler_id: str) -> GetSamplerResponse:
        return _get_sampler(sampler_id)

    def whoami(self) -> ConcurrentAPIFuture[WhoamiResponse]:
        """The local user, as `urn:tinker:local:user:<login name>`."""
        return _completed(_whoami)

    async def whoami_async(self) -> WhoamiResponse:
        return _whoami()

    # ---- service-only ----------------------------------------------------------------------

    def _admin_client(self):
        from .admin_client import AdminClient

        return AdminClient(self.holder)

    @deprecation.moved_to_admin("get_audit_log")
    def get_audit_log(self, event_type: str = "all", day=None) -> ConcurrentAPIFuture:
        """Deprecated (0.38): AdminClient.get_audit_log, which this calls (UnsupportedOperationError)."""
        return self._admin_client().get_audit_log(event_type, day)

    @deprecation.moved_to_admin_twin("get_audit_log")
    async def get_audit_log_async(self, event_type: str = "all", day=None):
        return await self._admin_client().get_audit_log(event_type, day)

    def assign_session_project(self, session_id: str, project_id: str) -> ConcurrentAPIFuture:
        return _completed(_assign_project)

    @deprecation.awaitable_twin("RestClient", "assign_session_project")
    async def assign_session_project_async(self, session_id: str, project_id: str):
        _assign_project()

    def export_session_trace(self, session_id: str) -> ConcurrentAPIFuture:
        return _completed(_export_trace)

    @deprecation.awaitable_twin("RestClient", "export_session_trace")
    async def export_session_trace_async(self, session_id: str):
        _export_trace()

    @deprecation.moved_to_admin("get_billing_usage")
    def get_billing_usage(self, starting_on, ending_before) -> ConcurrentAPIFuture:
        """Deprecated (0.38): AdminClient.get_billing_usage, which this calls (UnsupportedOperationError)."""
        return self._admin_client().get_billing_usage(starting_on, ending_before)

    @deprecation.moved_to_admin_twin("get_billing_usage")
    async def get_billing_usage_async(self, starting_on, ending_before):
        return await self._admin_client().get_billing_usage(starting_on, ending_before)

    def get_telemetry(self):
        return None


__all__ = ["RestClient", "UnsupportedOperationError"]
