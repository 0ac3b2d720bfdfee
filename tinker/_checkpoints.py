"""The local store of training runs and checkpoints.

Layout, under `store_root()` ($TINKER_HOME, else ~/.cache/tinker, or $XDG_CACHE_HOME/tinker):

    runs/<run_id>/run.json                           the run: base model, LoRA config, user metadata
    runs/<run_id>/weights/<name>/                    save_state: adapter + Adam moments + step
    runs/<run_id>/sampler_weights/<name>/            save_weights_for_sampler: adapter only
    runs/<run_id>/external_weights/<name>/           save_weights_external: adapter only, each file
                                                     age-encrypted (<file>.age) when recipients are given

Every checkpoint directory is a standard PEFT LoRA adapter (adapter_config.json and
adapter_model.safetensors in float32, with PEFT's key names), so peft loads it as it is. Beside it
sit checkpoint.json (what it is, when it expires, and the size and SHA-256 of every file) and, for
`weights`, optimizer.safetensors (the Adam moments by the engine's tensor names).

Crash safety: a checkpoint is written into a hidden temporary directory, fsynced, and renamed
into place in one step. A killed save leaves only the temporary directory, which is never listed
or loaded and is swept on the next save. Overwriting swaps the new directory with the old one in one
step (renameat2 RENAME_EXCHANGE) where the file system can; elsewhere the old copy is first renamed to
`.old-<name>`, which readers use while `<name>` is missing, so a kill between the two renames still
leaves the name resolving to a complete checkpoint. Loading checks every file against checkpoint.json, so a
corrupt or truncated checkpoint raises a clear error instead of loading. Every field of checkpoint.json,
run.json and a PEFT adapter_config.json is checked where it is read (`_fields`): a hand-edited or damaged
one is a BadRequestError naming the file and the field; a listing shows a checkpoint whose manifest is
damaged from its files, with a warning, and lists the others as usual.

Security: run ids and names are single path components from a small alphabet. Every path is
resolved and checked to lie inside the store, so `..`, absolute paths, separators and symlinks
cannot reach outside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import _arch
from . import _fields as F
from ._exceptions import BadRequestError, ConflictError, InvalidArgumentError, NotFoundError
from .types import ParsedCheckpointTinkerPath

KINDS = ("weights", "sampler_weights", "external_weights")
FORMAT = "tinker-local-checkpoint"
VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.safetensors"
MANIFEST = "checkpoint.json"
LORA_ALPHA = 32.0
MAX_RANK = 256
MAX_STEP = 2**53  # an optimizer step count; the engine counts in int64 and computes powers in double
MAX_UNIX_TIME = 253402300799  # 9999-12-31T23:59:59Z: the last time datetime can represent

_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=-]{0,199}")
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_[AB])\.weight")


def store_root() -> Path:
    if os.environ.get("TINKER_HOME"):
        return Path(os.environ["TINKER_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tinker"


def check_component(what: str, value) -> str:
    """A run id or checkpoint name: one path component, letters, digits and `_ . : @ + = -`."""
    if not isinstance(value, str) or not _SAFE.fullmatch(value) or value.endswith(".") or ".." in value:
        raise InvalidArgumentError(f"invalid {what} {value!r}: use 1-200 letters, digits and _ . : @ + = - (not starting "
                         f"with '.' or '-', no '..', no path separators)")
    return value


def _inside(path: Path, root: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise InvalidArgumentError(f"{path} is outside the checkpoint store {root}")
    return resolved


def run_dir(run_id: str) -> Path:
    root = store_root() / "runs"
    return _inside(root / check_component("training run id", run_id), root)


def _slot(run_id: str, kind: str, name: str) -> Path:
    """Where the checkpoint `name` is written: runs/<run_id>/<kind>/<name>."""
    if kind not in KINDS:
        raise InvalidArgumentError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    return _inside(run_dir(run_id) / kind / check_component("checkpoint name", name), store_root() / "runs")


def _old_copy(slot: Path) -> Path:
    """Where an overwrite keeps the previous copy between its two renames (see the module docstring)."""
    return slot.parent / f".old-{slot.name}"


def checkpoint_dir(run_id: str, kind: str, name: str) -> Path:
    """The directory the checkpoint is read from: its slot, or the previous copy an overwrite killed between
    its two renames left (then the slot is missing)."""
    slot = _slot(run_id, kind, name)
    old = _old_copy(slot)
    if not slot.exists() and old.is_dir():
        return old
    return slot


def checkpoint_names(run_id: str, kind: str) -> list[str]:
    """Names of the checkpoints of one kind in a run (unvalidated directory names; hidden leftovers of
    interrupted saves skipped, an interrupted overwrite's previous copy listed under its name)."""
    try:
        entries = {e.name for e in os.scandir(run_dir(run_id) / kind) if e.is_dir(follow_symlinks=False)}
    except FileNotFoundError:
        return []
    names = {n for n in entries if not n.startswith(".")}
    names |= {n[len(".old-"):] for n in entries if n.startswith(".old-")}
    return sorted(names)


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{kind}/{name}"


def parse_path(path: str) -> tuple[str, str, str]:
    """(run_id, kind, name) of a tinker:// checkpoint path; ValueError when malformed."""
    parsed = ParsedCheckpointTinkerPath.from_tinker_path(path)
    kind, name = parsed.checkpoint_id.split("/", 1)
    check_component("training run id", parsed.training_run_id)
    check_component("checkpoint name", name)
    return parsed.training_run_id, kind, name


# ---- PEFT format ---------------------------------------------------------------------------------


# Engine LoRA tensor names (lora.c): "layers.{l}.{target}.lora_A|B" and "{target}.lora_A|B" for a model-wide
# target (the unembedding); the PEFT module each target wraps comes from the architecture descriptor.


def split_engine_name(name: str) -> tuple[str, int, str]:
    """(target, layer, "lora_A" / "lora_B") of an engine LoRA tensor name; layer -1 for a model-wide target."""
    parts = name.split(".")
    if parts[0] == "layers":
        return parts[2], int(parts[1]), parts[3]
    return parts[0], -1, parts[1]


def peft_key(name: str, arch: str) -> str:
    """The PEFT state-dict key of one engine LoRA tensor ("layers.3.q.lora_A" -> ...q_proj.lora_A.weight)."""
    target, layer, ab = split_engine_name(name)
    return f"base_model.model.{_arch.peft_module(arch, target, layer)}.{ab}.weight"


def engine_name(key: str, arch: str | None = None) -> str | None:
    """The engine tensor name of a PEFT key (of the given architecture, else of any), or None when the engine
    has no such LoRA tensor."""
    m = _PEFT_KEY.fullmatch(key)
    found = _arch.target_of_peft_module(m.group(1), arch) if m else None
    if found is None:
        return None
    target, layer = found
    return f"layers.{layer}.{target}.{m.group(2)}" if layer >= 0 else f"{target}.{m.group(2)}"


def adapter_config(base_model: str, arch: str, rank: int, train_attn: bool, train_mlp: bool,
                   train_unembed: bool) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "target_modules": _arch.peft_target_modules(arch, train_attn, train_mlp, train_unembed),
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }  # fmt: skip


# ---- writing ---------------------------------------------------------------------------------------


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()})


def _write_file(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep_temporaries(parent: Path) -> None:
    """Removes what killed saves left behind (hidden .tmp-* directories older than a minute)."""
    for tmp in parent.glob(".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > 60:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
    for old in parent.glob(".old-*"):  # stale once its slot is back (a kill after an overwrite's second rename)
        if (parent / old.name[len(".old-"):]).exists():
            shutil.rmtree(old, ignore_errors=True)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` in one step: a reader sees the old file or the new one, never a torn one."""
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_run(run_id: str, record: dict) -> None:
    directory = run_dir(run_id)
    directory.mkdir(parents=True, exist_ok=True)
    write_file_atomic(directory / "run.json", json.dumps(record, indent=2).encode())


def read_run(run_id: str) -> dict:
    """The run's record (run.json), its fields checked: NotFoundError when absent, BadRequestError when
    unreadable or damaged."""
    path = run_dir(run_id) / "run.json"
    try:
        record = F.read_json(path)
    except FileNotFoundError:
        raise NotFoundError(f"training run {run_id!r} not found in the checkpoint store {store_root()}") from None
    except (OSError, ValueError) as e:
        raise BadRequestError(f"{path}: cannot read the training run record: {e}") from None
    fields = F.Fields(f"training run {run_id!r} is damaged: {path}")
    fields.object(record)
    fields.get(record, "training_run_id", F.Kind(f"{run_id!r}, the name of its directory", lambda v: v == run_id))
    for name, kind in _RUN_FIELDS.items():
        fields.get(record, name, kind, None)
    return record


_RUN_FIELDS = {  # what RestClient reads of a run record, besides its id (optional: it fills in defaults)
    "base_model": F.STRING, "model_owner": F.STRING, "is_lora": F.BOOL,
    "lora_rank": F.optional(F.integer(1, MAX_RANK, f"an integer from 1 to {MAX_RANK}")),
    "last_request_time": F.ISO_TIME, "user_metadata": F.optional(F.OBJECT), "project_id": F.optional(F.STRING),
    "session_display_name": F.optional(F.STRING), "session_user_metadata": F.optional(F.OBJECT),
    "optimizer_config": F.optional(F.OBJECT),
}  # fmt: skip


def save_destination(run_id: str, kind: str, name: str, overwrite: bool) -> Path:
    """The directory a new checkpoint goes to: ValueError for a bad name, ConflictError when it
    exists and may not be replaced."""
    final = _slot(run_id, kind, name)
    if checkpoint_dir(run_id, kind, name).exists() and not overwrite:
        raise ConflictError(f"checkpoint {tinker_path(run_id, kind, name)} already exists; pass overwrite=True "
                            f"to replace it or choose another name")
    return final


def save_checkpoint(run: dict, kind: str, name: str, params: dict[str, np.ndarray], step: int,
                    moments: tuple[dict, dict] | None, ttl_seconds: int | None, overwrite: bool, *, arch: str,
                    user_metadata: dict[str, str] | None = None, encrypt=None) -> str:
    """Writes one checkpoint atomically and returns its tinker:// path; `arch` (the base model's
    architecture) names the PEFT modules; `user_metadata` is kept in the manifest. `encrypt(bytes) ->
    bytes`, when given, turns every data file into `<file>.age` (external weights for age recipients)."""

    def write(files: dict, file_name: str, data: bytes) -> None:
        if encrypt is not None:
            file_name, data = file_name + ".age", encrypt(data)
        files[file_name] = _write_file(tmp / file_name, data)

    run_id = run["training_run_id"]
    final = save_destination(run_id, kind, name, overwrite)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(parent)
    write_run(run_id, {**run, "last_request_time": _now().isoformat()})
    tmp = parent / f".tmp-{name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        config = adapter_config(run["base_model"], arch, run["lora_rank"], run["train_attn"], run["train_mlp"],
                                run["train_unembed"])
        files: dict = {}
        write(files, ADAPTER_CONFIG, json.dumps(config, indent=2).encode())
        write(files, ADAPTER_WEIGHTS, _safetensors_bytes({peft_key(k, arch): v for k, v in params.items()}))
        if moments is not None:
            exp_avg, exp_avg_sq = moments
            tensors = {**{f"exp_avg.{k}": v for k, v in exp_avg.items()},
                       **{f"exp_avg_sq.{k}": v for k, v in exp_avg_sq.items()}}
            write(files, OPTIMIZER, _safetensors_bytes(tensors))
        created = _now()
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": kind, "name": name, "training_run_id": run_id,
            "base_model": run["base_model"], "lora_rank": run["lora_rank"], "train_attn": run["train_attn"],
            "train_mlp": run["train_mlp"], "train_unembed": run["train_unembed"], "step": int(step),
            "created": created.isoformat(), "encrypted": encrypt is not None,
            "expires_at": None if ttl_seconds is None else (created.timestamp() + ttl_seconds),
            "user_metadata": user_metadata,
            "files": files,
        }  # fmt: skip
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tinker_path(run_id, kind, name)


def copy_checkpoint(run_id: str, kind: str, name: str, new_run: dict, ttl_seconds: int | None) -> str:
    """Copies a checkpoint into the run `new_run` describes (same kind and name; the files are hard
    links where the file system allows, as the service shares the copy's storage) and returns the
    copy's tinker:// path. The copy is written atomically, like a save."""
    source = checkpoint_dir(run_id, kind, name)
    copy_run = new_run["training_run_id"]
    final = save_destination(copy_run, kind, name, overwrite=False)
    final.parent.mkdir(parents=True, exist_ok=True)
    write_run(copy_run, {**new_run, "last_request_time": _now().isoformat()})
    tmp = final.parent / f".tmp-{name}-{uuid.uuid4().hex}"
    try:
        shutil.copytree(source, tmp, copy_function=_link_or_copy)
        manifest = json.loads((tmp / MANIFEST).read_text())
        created = _now()
        manifest.update(training_run_id=copy_run, created=created.isoformat(),
                        expires_at=None if ttl_seconds is None else created.timestamp() + ttl_seconds)
        (tmp / MANIFEST).unlink()  # a link to the source's: replace it, never write through it
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tinker_path(copy_run, kind, name)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_dir(new: Path, final: Path) -> None:
    """Puts the directory `new` in place of `final`, which always resolves to a complete checkpoint."""
    old = _old_copy(final)
    if old.exists() and final.exists():  # stale: an earlier overwrite was killed after its second rename
        shutil.rmtree(old)
    if final.exists() and _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # it holds the previous copy now
        return
    if final.exists():
        os.rename(final, old)  # until the next rename, checkpoint_dir reads the previous copy here
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


USE_EXCHANGE = True  # tests turn it off to run the two-rename path on file systems that can exchange


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the platform or the
    file system cannot, and nothing changed."""
    if not USE_EXCHANGE:
        return False
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


MAX_TTL_SECONDS = 100 * 365 * 24 * 3600  # expiry times stay dates every platform's time_t can hold


def check_ttl(ttl_seconds) -> int | None:
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, (bool, np.bool_)) or not isinstance(ttl_seconds, (int, float, np.integer, np.floating)) \
            or not ttl_seconds > 0:  # NaN fails the comparison
        raise BadRequestError(f"ttl_seconds must be a positive number of seconds or None, got {ttl_seconds!r}")
    if ttl_seconds > MAX_TTL_SECONDS:  # inf and ints past float too
        raise BadRequestError(f"ttl_seconds is {ttl_seconds!r}; it must be at most {MAX_TTL_SECONDS} (100 years). "
                              f"Pass None for a checkpoint that never expires")
    return math.ceil(ttl_seconds)  # rounded up: 0.5 s must not hand out a path that has already expired


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ---- reading ---------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    manifest: dict
    params: dict[str, np.ndarray]                 # engine tensor names
    exp_avg: dict[str, np.ndarray] | None = None
    exp_avg_sq: dict[str, np.ndarray] | None = None

    @property
    def step(self) -> int:
        return self.manifest.get("step", 0)  # checked by read_manifest


def _read_safetensors(path: Path, data: bytes) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise BadRequestError(f"{path}: not a readable safetensors file ({e})") from None
    for key, value in tensors.items():
        if value.dtype not in (np.float32, np.float16) and value.dtype.name != "bfloat16":
            raise BadRequestError(f"{path}: tensor {key!r} has dtype {value.dtype}; expected float32")
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def read_verified(directory: Path, name: str, entry) -> bytes:
    """A checkpoint file's bytes, checked against the size and SHA-256 its manifest recorded."""
    if not isinstance(entry, dict):
        raise BadRequestError(f"checkpoint {directory}: the manifest lists no {name}")
    path = directory / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadRequestError(f"checkpoint {directory}: cannot read {name}: {e}") from None
    if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise BadRequestError(f"checkpoint {directory} is corrupt: {name} is {len(data)} bytes and does not match "
                              f"the size and checksum recorded when it was saved ({entry.get('size')} bytes)")
    return data


def read_manifest(directory: Path, path_text: str) -> dict:
    """The checkpoint's manifest, every field checked (`check_manifest`): NotFoundError when the checkpoint
    does not exist, BadRequestError when its manifest is unreadable or damaged."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise NotFoundError(f"checkpoint {path_text} not found (no {directory})")
    try:
        manifest = F.read_json(manifest_path)
    except (OSError, ValueError) as e:
        raise BadRequestError(f"checkpoint {path_text} is corrupt or incomplete: cannot read {manifest_path}: {e}") \
            from None
    return check_manifest(manifest, path_text, manifest_path)


_STEP = F.integer(0, MAX_STEP, "a non-negative integer (at most 2**53)")
_MANIFEST_FIELDS = {  # name: (kind, default; MISSING when required)
    "base_model": (F.NAME, F.MISSING),
    "lora_rank": (F.integer(1, MAX_RANK, f"an integer from 1 to {MAX_RANK}"), F.MISSING),
    "train_attn": (F.BOOL, F.MISSING), "train_mlp": (F.BOOL, F.MISSING), "train_unembed": (F.BOOL, F.MISSING),
    "step": (_STEP, 0),
    "created": (F.ISO_TIME, None),
    "encrypted": (F.BOOL, False),
    "expires_at": (F.optional(F.number(0, MAX_UNIX_TIME, "a unix time in seconds")), None),
    "user_metadata": (F.optional(F.STRING_MAP), None),
    "kind": (F.optional(F.STRING), None), "name": (F.optional(F.STRING), None),
    "training_run_id": (F.optional(F.STRING), None),
}  # fmt: skip


def check_manifest(manifest, path_text: str, manifest_path: Path) -> dict:
    """`manifest` itself, once every field it has (or must have) holds what the readers of a checkpoint expect:
    the listing, the loaders, TTLs, archives and exports then read it without further checks."""
    fields = F.Fields(f"checkpoint {path_text} is damaged: {manifest_path}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise fields.fail("not a tinker checkpoint manifest (a JSON object with format "
                          f"{FORMAT!r}){'' if isinstance(manifest, dict) else f'; it holds {F.describe(manifest)}'}")
    version = fields.get(manifest, "version", F.integer(0, 2**31, "a format version number"), 0)
    if version > VERSION:
        raise BadRequestError(f"checkpoint {path_text} was written by a newer version of tinker "
                              f"(format {version}); upgrade tinker to load it")
    for name, (kind, default) in _MANIFEST_FIELDS.items():
        fields.get(manifest, name, kind, default)
    files = fields.get(manifest, "files", F.OBJECT)
    for file_name, entry in files.items():
        if file_name == MANIFEST or not _SAFE.fullmatch(file_name) or ".." in file_name:
            raise fields.fail(f"field 'files' lists {F.describe(file_name)}; expected the names of the files beside "
                              f"it in the checkpoint directory")
        label = f"field 'files'[{file_name!r}]"
        fields.object(entry, label)
        fields.get(entry, "size", F.integer(0, 2**63 - 1, "a size in bytes"), label=f"{label}['size']")
        fields.get(entry, "sha256", F.SHA256, label=f"{label}['sha256']")
    return manifest


def expired(manifest: dict) -> bool:
    """Whether the (checked) manifest's expires_at has passed."""
    expires = manifest.get("expires_at")
    return expires is not None and time.time() >= expires


def load_checkpoint(path: str, with_optimizer: bool = False) -> LoadedCheckpoint:
    """Reads and verifies the checkpoint at a tinker:// path."""
    run_id, kind, name = parse_path(path)
    directory = checkpoint_dir(run_id, kind, name)
    manifest = read_manifest(directory, path)
    if expired(manifest):
        delete_checkpoint(run_id, kind, name)
        raise NotFoundError(f"checkpoint {path} has expired (its ttl_seconds ran out) and was deleted")
    files = manifest["files"]
    if ADAPTER_WEIGHTS not in files:
        raise BadRequestError(f"checkpoint {path}: the manifest lists no {ADAPTER_WEIGHTS}")
    peft = _read_safetensors(directory / ADAPTER_WEIGHTS, read_verified(directory, ADAPTER_WEIGHTS,
                                                                         files[ADAPTER_WEIGHTS]))
    params = {}
    for key, value in peft.items():
        engine = engine_name(key)
        if engine is None:
            raise BadRequestError(f"checkpoint {path}: unexpected tensor {key!r} in {ADAPTER_WEIGHTS}")
        params[engine] = value
    loaded = LoadedCheckpoint(manifest, params)
    if with_optimizer:
        if OPTIMIZER not in files:
            raise BadRequestError(f"checkpoint {path} holds no optimizer state: it was saved with "
                                  f"save_weights_for_sampler; load it with load_state, or save with save_state")
        moments = _read_safetensors(directory / OPTIMIZER, read_verified(directory, OPTIMIZER, files[OPTIMIZER]))
        loaded.exp_avg = {k[len("exp_avg."):]: v for k, v in moments.items() if k.startswith("exp_avg.")}
        loaded.exp_avg_sq = {k[len("exp_avg_sq."):]: v for k, v in moments.items() if k.startswith("exp_avg_sq.")}
    return loaded


def archive_dir(run_id: str, kind: str, name: str) -> Path:
    """Where the RestClient keeps a checkpoint's download archives."""
    checkpoint_dir(run_id, kind, name)  # validates all three
    root = store_root() / "archives"
    return _inside(root / run_id / kind / name, root)


def delete_checkpoint(run_id: str, kind: str, name: str) -> None:
    """Deletes a checkpoint (atomically: gone in one rename, then the files go) and its archives."""
    directory = checkpoint_dir(run_id, kind, name)
    if not directory.is_dir():
        raise NotFoundError(f"checkpoint {tinker_path(run_id, kind, name)} not found")
    for gone in (_old_copy(_slot(run_id, kind, name)), directory):  # a stale previous copy must not come back
        if gone.is_dir():
            trash = gone.parent / f".tmp-del-{name}-{uuid.uuid4().hex}"
            os.rename(gone, trash)
            shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(archive_dir(run_id, kind, name), ignore_errors=True)


# ---- PEFT adapter directories (not made by tinker) ----------------------------------------------------


@dataclass
class PeftAdapter:
    base_model: str | None
    rank: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    params: dict[str, np.ndarray]  # engine tensor names, B rescaled to the engine's alpha 32


def _unreadable_key(path: Path, key: str) -> str:
    if re.fullmatch(r"base_model\.model\..*\.mlp\.experts\.(base_layer\.)?lora_[AB]\.weight", key):
        return (f"{path}: tensor {key!r} is a LoRA on fused expert parameters (peft target_parameters on "
                f"the fused experts' gate-up and down tensors): one independent pair per expert, stacked [r * experts, ...], "
                f"and over gate and up jointly. The engine trains Tinker's expert layout (gate, up and down apart; "
                f"A shared by the experts for gate and up, B for down), into which such an adapter does not convert; "
                f"merge it into the base model with peft, or save it with per-expert modules "
                f"(mlp.experts.{{e}}.gate_proj ...), which convert where their shared factors agree")
    return (f"{path}: tensor {key!r} is not a LoRA weight of q/k/v/o, gate/up/down (per expert or in Tinker's "
            f"expert layout) or lm_head, which is what the engine trains")


def _shared_outer(per_expert: dict, path: Path, rank: int, n_experts: int | None) -> dict[str, np.ndarray]:
    """Per-expert PEFT pairs ({(target, layer): {expert: {"lora_A": [r, in], "lora_B": [out, r]}}}, the cookbook's
    build_lora_adapter output or a transformers 4.x PEFT model's) in Tinker's shared-outer layout: the factor the
    target shares (A of gate and up, B of down) must be the same array in every expert, and is kept once
    ([1, r, in] / [1, out, r]); the other is stacked over the experts ([E, ...]), zero for an expert the file
    lacks (no delta). E: n_experts, else one past the highest expert index."""
    out = {}
    for (target, layer), experts in sorted(per_expert.items()):
        found = next(t for a in _arch.ARCHS.values() for t in a["lora"] if t["name"] == target)
        shared_ab = "lora_B" if found["a_per_expert"] else "lora_A"
        own_ab = "lora_A" if shared_ab == "lora_B" else "lora_B"
        count = n_experts if n_experts is not None else max(experts) + 1
        what = f"the experts' {found['role']} adapters of layer {layer}"
        if max(experts) >= count:
            raise BadRequestError(f"{path}: {what} include expert {max(experts)}, but the model has {count} experts")
        shapes = set()
        for e, pair in experts.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise BadRequestError(f"{path}: {what}: expert {e} has only {', '.join(pair)}")
            a, b = pair["lora_A"], pair["lora_B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise BadRequestError(f"{path}: {what}: expert {e} has lora_A {a.shape}, lora_B {b.shape}; expected "
                                      f"[{rank}, in] and [out, {rank}] for rank {rank}")
            shapes.add((a.shape, b.shape))
        if len(shapes) > 1:
            raise BadRequestError(f"{path}: {what} differ in shape between experts: {sorted(shapes)}")
        first = min(experts)
        sharing = "A for gate_proj and up_proj" if shared_ab == "lora_A" else "B for down_proj"
        for e in sorted(experts):
            if not np.array_equal(experts[e][shared_ab], experts[first][shared_ab]):
                raise BadRequestError(
                    f"{path}: {what}: expert {e}'s {shared_ab} differs from expert {first}'s. Tinker's expert LoRA "
                    f"shares one factor across the experts ({sharing}), so an adapter with independent per-expert "
                    f"{shared_ab} factors cannot be expressed in it; merge it into the base model with peft instead")
        own = np.zeros((count, *experts[first][own_ab].shape), np.float32)
        for e, pair in experts.items():
            own[e] = pair[own_ab]
        prefix = f"layers.{layer}.{target}"
        out[f"{prefix}.{shared_ab}"] = np.asarray(experts[first][shared_ab], np.float32)[None]
        out[f"{prefix}.{own_ab}"] = own
    return out


def read_peft_dir(directory: Path, arch: str | None = None, n_experts: int | None = None) -> PeftAdapter:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) from any source, with
    the PEFT module names of `arch` (else of any architecture the engine runs). Experts' adapters may come in
    Tinker's layout (its w1 / w2 / w3 expert modules) or per expert (one gate/up/down module per expert, converted where
    they fit Tinker's layout, see _shared_outer; n_experts: the model's expert count).

    The engine's scale is 32 / r; PEFT's is lora_alpha / r (or lora_alpha / sqrt(r) with rslora),
    so B is multiplied by the ratio and the adapter computes the same function. q/k/v/o go together
    (train_attn) and gate/up/down (train_mlp): a module the adapter lacks starts with B = 0, and so
    changes nothing until trained."""
    config_path = directory / ADAPTER_CONFIG
    try:
        config = F.read_json(config_path)
    except (OSError, ValueError) as e:
        raise BadRequestError(f"{directory}: not a PEFT adapter directory: cannot read {ADAPTER_CONFIG}: {e}") from None
    rank, alpha, rslora, base = _check_adapter_config(config, F.Fields(str(config_path)))
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    weights_path = directory / ADAPTER_WEIGHTS
    try:
        data = weights_path.read_bytes()
    except OSError as e:
        raise BadRequestError(f"{directory}: cannot read {ADAPTER_WEIGHTS}: {e}") from None
    params, per_expert = {}, {}
    for key, value in _read_safetensors(weights_path, data).items():
        key = key.replace(".default.weight", ".weight")
        name = engine_name(key, arch)
        if name is not None:
            params[name] = value
            continue
        m = _PEFT_KEY.fullmatch(key)
        found = _arch.target_of_expert_peft_module(m.group(1), arch) if m else None
        if found is None:
            raise BadRequestError(_unreadable_key(weights_path, key))
        target, layer, expert = found
        per_expert.setdefault((target, layer), {}).setdefault(expert, {})[m.group(2)] = value
    for name, value in _shared_outer(per_expert, weights_path, rank, n_experts).items():
        if name in params:
            raise BadRequestError(f"{weights_path}: holds the experts of {name} both in Tinker's layout and per "
                                  f"expert")
        params[name] = value
    for name in [n for n in params if n.endswith("lora_B")]:
        params[name] = params[name] * np.float32(scale / (LORA_ALPHA / rank))
    flags = {_arch.trained_by(split_engine_name(n)[0], arch) for n in params}
    return PeftAdapter(base or None, rank,
                       train_attn="train_attn" in flags, train_mlp="train_mlp" in flags,
                       train_unembed="train_unembed" in flags, params=params)


_ALPHA = F.number(0, 1e6, "a positive number (at most 1e6)", open_low=True)
_TARGET_MODULES = F.optional(F.Kind("a module name pattern (a string) or a list of module names",
                                    lambda v: isinstance(v, str) or F.STRINGS.accepts(v)))


def _check_adapter_config(config, fields: F.Fields) -> tuple[int, float, bool, str | None]:
    """(r, lora_alpha, use_rslora, base_model_name_or_path) of a PEFT adapter_config.json, every field
    the engine reads checked, and refused when it asks for what the engine cannot do."""
    fields.object(config)
    if fields.get(config, "peft_type", F.STRING, "LORA") != "LORA":
        raise fields.fail(f"peft_type is {F.describe(config['peft_type'])}; only LoRA adapters (peft_type LORA) are "
                          f"supported")
    rank = fields.get(config, "r", F.integer(1, MAX_RANK, f"an integer from 1 to {MAX_RANK}"))
    alpha = float(fields.get(config, "lora_alpha", _ALPHA, 8))
    flags = {name: fields.get(config, name, F.optional(F.BOOL), None)
             for name in ("use_rslora", "fan_in_fan_out", "use_dora")}
    bias = fields.get(config, "bias", F.STRING, "none")
    if flags["fan_in_fan_out"] or flags["use_dora"] or bias != "none":
        raise fields.fail("fan_in_fan_out, DoRA and LoRA biases are not supported")
    fields.get(config, "target_modules", _TARGET_MODULES, None)
    base = fields.get(config, "base_model_name_or_path", F.optional(F.STRING), None)
    return rank, alpha, bool(flags["use_rslora"]), base
