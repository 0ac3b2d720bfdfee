"""The `tinker` command line, over the local checkpoint store (`$TINKER_HOME`).

    tinker [-f table|json] version
    tinker checkpoint list [--run-id ID] [--limit N]
    tinker checkpoint info PATH
    tinker checkpoint delete PATH... [-y]
    tinker checkpoint download PATH [-o DIR] [--force]
    tinker checkpoint set-ttl PATH (--ttl SECONDS | --remove)
    tinker run list [--limit N]
    tinker run info RUN_ID
    tinker store

Everything goes through the RestClient, as Tinker's CLI does, so the two agree on what exists
(expired checkpoints are deleted and never shown). A user error (a bad path, a missing checkpoint,
a refused archive) prints one line to stderr and exits with status 1; `--format json` prints
machine-readable JSON on stdout instead of aligned tables. argparse only: no extra dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Callable

from .. import _checkpoints as ckpt
from .. import __version__
from .._exceptions import TinkerError
from ..lib.public_interfaces.rest_client import RestClient
from ..types import Checkpoint

ALL = sys.maxsize  # --limit 0: no limit


class CliError(Exception):
    """A user error the command line reports in one line (no traceback)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with status 1 and one line, like every other error here."""

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- output --------------------------------------------------------------------------------------


def _table(headers: list[str] | None, rows: list[list[str]]) -> str:
    """Rows as left-aligned columns two spaces apart (the last column is not padded)."""
    lines = ([headers] if headers else []) + rows
    if not lines:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    padded = [[cell.ljust(w) for cell, w in zip(line[:-1], widths)] + [line[-1]] for line in lines]
    return "\n".join("  ".join(cells) for cells in padded)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _when(moment: datetime | None, never: str = "never") -> str:
    return never if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _emit(args, data, table: Callable[[], str]) -> None:
    """Prints `data` as JSON, or the table `table()` renders."""
    if args.format == "json":
        print(json.dumps(data, indent=2, default=str))
    else:
        print(table())


def _dump(model) -> dict:
    return model.model_dump(mode="json")


def _checkpoint_rows(checkpoints: list[Checkpoint]) -> list[list[str]]:
    return [[c.checkpoint_id, c.checkpoint_type, _size(c.size_bytes), _when(c.time), _when(c.expires_at),
             c.tinker_path] for c in checkpoints]


# ---- commands ------------------------------------------------------------------------------------


def _version(args, rc: RestClient) -> None:
    _emit(args, {"version": __version__}, lambda: f"tinker {__version__}")


def _store(args, rc: RestClient) -> None:
    root = str(ckpt.store_root())
    _emit(args, {"store": root}, lambda: root)


def _find_checkpoint(rc: RestClient, path: str) -> Checkpoint:
    run_id = ckpt.parse_path(path)[0]
    for checkpoint in rc.list_checkpoints(run_id).result().checkpoints:
        if checkpoint.tinker_path == path:
            return checkpoint
    raise CliError(f"checkpoint {path} not found")


def _checkpoint_list(args, rc: RestClient) -> None:
    limit = args.limit or ALL
    if args.run_id:
        checkpoints = rc.list_checkpoints(args.run_id).result().checkpoints
        total, checkpoints = len(checkpoints), checkpoints[:limit]
    else:
        response = rc.list_user_checkpoints(limit=limit, offset=0).result()
        total, checkpoints = response.cursor.total_count, response.checkpoints

    def table():
        if not checkpoints:
            return "No checkpoints found" + (f" for run {args.run_id}" if args.run_id else "")
        title = f"{len(checkpoints)} checkpoint{'s' * (len(checkpoints) != 1)}"
        if total > len(checkpoints):
            title += f" ({total - len(checkpoints)} more not shown; --limit 0 shows all)"
        headers = ["CHECKPOINT ID", "TYPE", "SIZE", "CREATED", "EXPIRES", "PATH"]
        return title + "\n" + _table(headers, _checkpoint_rows(checkpoints))

    _emit(args, {"checkpoints": [_dump(c) for c in checkpoints], "total_count": total}, table)


def _checkpoint_info(args, rc: RestClient) -> None:
    info = rc.get_weights_info_by_tinker_path(args.path).result()  # the precise error if missing/expired/corrupt
    checkpoint = _find_checkpoint(rc, args.path)
    run_id = ckpt.parse_path(args.path)[0]
    data = {**_dump(checkpoint), "training_run_id": run_id, **_dump(info)}
    trained = [m for m in ("attn", "mlp", "unembed") if getattr(info, f"train_{m}")]
    rows = [["Checkpoint ID", checkpoint.checkpoint_id], ["Type", checkpoint.checkpoint_type],
            ["Tinker path", checkpoint.tinker_path], ["Training run", run_id], ["Base model", info.base_model],
            ["LoRA rank", str(info.lora_rank)], ["Trains", ", ".join(trained) or "-"],
            ["Size", _size(checkpoint.size_bytes)], ["Created", _when(checkpoint.time)],
            ["Expires", _when(checkpoint.expires_at)]]  # fmt: skip
    _emit(args, data, lambda: _table(None, rows))


def _confirm(paths: list[str]) -> bool:
    """Asks on a terminal; anywhere else deleting needs -y (a script must say so explicitly)."""
    if not sys.stdin.isatty():
        raise CliError("not deleting without confirmation: stdin is not a terminal; pass -y to delete")
    print(f"Will delete {len(paths)} checkpoint(s) permanently:")
    for path in paths:
        print(f"  {path}")
    try:
        return input("Delete them? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _checkpoint_delete(args, rc: RestClient) -> int:
    for path in args.paths:  # all valid before any is deleted
        ckpt.parse_path(path)
    if not args.yes and not _confirm(args.paths):
        print("Nothing deleted.")
        return 0
    deleted, failed = [], 0
    for path in args.paths:
        try:
            rc.delete_checkpoint_from_tinker_path(path).result()
            deleted.append(path)
        except (TinkerError, ValueError, OSError) as e:
            failed += 1
            _report(e)
    _emit(args, {"deleted": deleted}, lambda: "\n".join(f"Deleted {p}" for p in deleted))
    return 1 if failed else 0


def _safe_members(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """The archive's members, refusing anything that could write outside `dest`: links, devices,
    absolute names and `..`."""
    members = tar.getmembers()
    for member in members:
        name = PurePosixPath(member.name)
        inside = (dest / member.name).resolve().is_relative_to(dest.resolve())
        if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts or not inside:
            raise CliError(f"refusing the checkpoint archive: unsafe entry {member.name!r} (only plain files and "
                           f"directories inside the target are extracted)")
    return members


def _extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            members = _safe_members(tar, dest)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: a second, independent check
                tar.extractall(dest, members=members, filter="data")
            else:
                tar.extractall(dest, members=members)
    except tarfile.TarError as e:
        raise CliError(f"the checkpoint archive is not a readable tar file: {e}") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _checkpoint_download(args, rc: RestClient) -> None:
    """Extracts into a hidden staging directory beside the target, then renames it into place, so
    the target never holds a partial download."""
    run_id, kind, name = ckpt.parse_path(args.path)
    parent = Path(args.output or ".")
    target = parent / f"{run_id}_{kind}_{name}"
    if (target.exists() or target.is_symlink()) and not args.force:
        raise CliError(f"{target} already exists; pass --force to replace it")
    url = rc.get_checkpoint_archive_url_from_tinker_path(args.path).result().url
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-download-", dir=parent))
    try:
        archive, extracted = staging / "checkpoint.tar", staging / "checkpoint"
        try:
            urllib.request.urlretrieve(url, archive)
        except urllib.error.URLError as e:
            raise CliError(f"cannot fetch the archive of {args.path}: {e.reason}") from None
        extracted.mkdir()
        _extract(archive, extracted)
        size = archive.stat().st_size
        if target.exists() or target.is_symlink():
            _remove(target)
        os.rename(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    data = {"checkpoint_path": args.path, "destination": str(target.resolve()), "file_size_bytes": size}
    _emit(args, data, lambda: f"Downloaded {args.path} to {target} ({_size(size)} archive)")


def _checkpoint_set_ttl(args, rc: RestClient) -> None:
    rc.set_checkpoint_ttl_from_tinker_path(args.path, None if args.remove else args.ttl).result()
    checkpoint = _find_checkpoint(rc, args.path)
    _emit(args, _dump(checkpoint), lambda: f"{args.path} expires: {_when(checkpoint.expires_at)}")


def _checkpoint_export(args, rc: RestClient) -> None:
    """A Hugging Face checkpoint of base + adapter merged (--merge), or the PEFT adapter alone."""
    from .._export import export_adapter, export_merged

    if args.merge:
        out = export_merged(args.path, args.output, base_model=args.base_model, dtype=args.dtype,
                            overwrite=args.force)
        what = "merged Hugging Face checkpoint"
    else:
        out = export_adapter(args.path, args.output, overwrite=args.force)
        what = "PEFT adapter"
    _emit(args, {"checkpoint_path": args.path, "destination": str(out), "kind": what},
          lambda: f"Wrote the {what} of {args.path} to {out}")


def _run_list(args, rc: RestClient) -> None:
    response = rc.list_training_runs(limit=args.limit or ALL, offset=0).result()
    runs, total = response.training_runs, response.cursor.total_count

    def table():
        if not runs:
            return "No training runs found"
        title = f"{len(runs)} training run{'s' * (len(runs) != 1)}"
        if total > len(runs):
            title += f" ({total - len(runs)} more not shown; --limit 0 shows all)"
        rows = [[r.training_run_id, r.base_model, str(r.lora_rank), _when(r.last_request_time),
                 r.last_checkpoint.checkpoint_id if r.last_checkpoint else "-",
                 r.last_sampler_checkpoint.checkpoint_id if r.last_sampler_checkpoint else "-"] for r in runs]
        headers = ["RUN ID", "BASE MODEL", "RANK", "LAST REQUEST", "LAST CHECKPOINT", "LAST SAMPLER CHECKPOINT"]
        return title + "\n" + _table(headers, rows)

    _emit(args, {"training_runs": [_dump(r) for r in runs], "total_count": total}, table)


def _run_info(args, rc: RestClient) -> None:
    run = rc.get_training_run(args.run_id).result()
    metadata = ", ".join(f"{k}={v}" for k, v in (run.user_metadata or {}).items())
    rows = [["Run ID", run.training_run_id], ["Base model", run.base_model], ["Owner", run.model_owner],
            ["LoRA rank", str(run.lora_rank) if run.is_lora else "not LoRA"],
            ["Last request", _when(run.last_request_time)],
            ["Last checkpoint", run.last_checkpoint.tinker_path if run.last_checkpoint else "-"],
            ["Last sampler checkpoint", run.last_sampler_checkpoint.tinker_path if run.last_sampler_checkpoint
             else "-"],
            ["User metadata", metadata or "-"]]  # fmt: skip
    _emit(args, _dump(run), lambda: _table(None, rows))


# ---- parser --------------------------------------------------------------------------------------


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    # -f works before the command (Tinker's CLI) and after it; the sub-level one overrides when given.
    fmt = _Parser(add_help=False)
    fmt.add_argument("-f", "--format", choices=("table", "json"), default=argparse.SUPPRESS,
                     help="output format (default: table)")
    parser = _Parser(prog="tinker", description="Inspect and manage the local Tinker checkpoint store.")
    parser.add_argument("-f", "--format", choices=("table", "json"), default="table",
                        help="output format (default: table)")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    def command(group, name: str, handler, help_text: str):
        sub = group.add_parser(name, parents=[fmt], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    command(commands, "version", _version, "print the tinker version")
    command(commands, "store", _store, "print the checkpoint store directory ($TINKER_HOME)")

    checkpoint = commands.add_parser("checkpoint", parents=[fmt], help="list, inspect, download and delete checkpoints")
    checkpoints = checkpoint.add_subparsers(title="commands", dest="subcommand", required=True, metavar="COMMAND")
    sub = command(checkpoints, "list", _checkpoint_list, "list checkpoints, newest first")
    sub.add_argument("--run-id", help="only this training run's checkpoints")
    sub.add_argument("--limit", type=_count, default=20, help="show at most N (default 20; 0 shows all)")
    sub = command(checkpoints, "info", _checkpoint_info, "show one checkpoint")
    sub.add_argument("path", metavar="PATH", help="tinker://<run-id>/<weights|sampler_weights>/<name>")
    sub = command(checkpoints, "delete", _checkpoint_delete, "delete checkpoints permanently")
    sub.add_argument("paths", metavar="PATH", nargs="+", help="tinker:// checkpoint paths")
    sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    sub = command(checkpoints, "download", _checkpoint_download,
                  "extract a checkpoint's PEFT adapter into DIR/<run-id>_<kind>_<name>/")
    sub.add_argument("path", metavar="PATH", help="tinker:// checkpoint path")
    sub.add_argument("-o", "--output", metavar="DIR", help="parent directory (default: the current directory)")
    sub.add_argument("--force", action="store_true", help="replace the target directory if it exists")
    sub = command(checkpoints, "export", _checkpoint_export,
                  "write the PEFT adapter, or with --merge a Hugging Face checkpoint of base + adapter, to DIR")
    sub.add_argument("path", metavar="PATH", help="tinker:// checkpoint path (or a PEFT adapter directory)")
    sub.add_argument("-o", "--output", metavar="DIR", required=True, help="the directory to write")
    sub.add_argument("--merge", action="store_true", help="merge the adapter into its base model's weights")
    sub.add_argument("--base-model", help="the base model (default: the one the checkpoint was trained on)")
    sub.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                     help="weight dtype of a merged checkpoint (default float32)")
    sub.add_argument("--force", action="store_true", help="replace DIR if it exists")
    sub = command(checkpoints, "set-ttl", _checkpoint_set_ttl, "set or remove a checkpoint's time to live")
    sub.add_argument("path", metavar="PATH", help="tinker:// checkpoint path")
    ttl = sub.add_mutually_exclusive_group(required=True)
    ttl.add_argument("--ttl", type=int, metavar="SECONDS", help="expire SECONDS from now")
    ttl.add_argument("--remove", action="store_true", help="never expire")

    run = commands.add_parser("run", parents=[fmt], help="list and inspect training runs")
    runs = run.add_subparsers(title="commands", dest="subcommand", required=True, metavar="COMMAND")
    sub = command(runs, "list", _run_list, "list training runs, most recently used first")
    sub.add_argument("--limit", type=_count, default=20, help="show at most N (default 20; 0 shows all)")
    sub = command(runs, "info", _run_info, "show one training run")
    sub.add_argument("run_id", metavar="RUN_ID")
    return parser


def _report(error: BaseException) -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"tinker: error: {message}", file=sys.stderr)


def cli(argv: list[str] | None = None) -> int:
    """Runs the command line on `argv` (default: sys.argv[1:]) and returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error already printed (1)
        return e.code if isinstance(e.code, int) else 1
    try:
        return args.handler(args, RestClient()) or 0
    except (CliError, TinkerError, ValueError, OSError) as e:
        _report(e)
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = ["cli", "CliError"]
