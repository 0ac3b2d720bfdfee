"""The `tinker` command line over the local store: every command in table and JSON form, the delete
confirmation, safe archive extraction, and errors as one line on stderr with exit status 1."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import tinker
from tinker import _checkpoints as ckpt
from tinker.cli import cli
from tinker.lib.public_interfaces.rest_client import RestClient
from tinker.types import CheckpointArchiveUrlResponse

import tiny_models as tm

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


pytestmark = pytest.mark.usefixtures("store")  # each test gets its own checkpoint store


@pytest.fixture(scope="module")
def base(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture
def run(base):
    """A training run with a state, a sampler checkpoint (TTL one hour) and its paths."""
    tc = tinker.ServiceClient(user_metadata={"recipe": "sl"}).create_lora_training_client(base, rank=2)
    state = tc.save_state("a").result().path
    sampler = tc.save_weights_for_sampler("s", ttl_seconds=3600).result().path
    return tc.model_id, state, sampler


def invoke(capsys, *argv, status: int = 0) -> str:
    """Runs the CLI in-process; checks the exit status, and that nothing but an error line went to stderr."""
    code = cli(list(argv))
    out, err = capsys.readouterr()
    assert code == status, (out, err)
    if status == 0:
        assert err == ""
    return out


def error_of(capsys, *argv) -> str:
    """Runs a failing command: exit status 1 and one line on stderr, no traceback."""
    code = cli(list(argv))
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def columns(line: str, headers: list[str]) -> list[int]:
    return [line.index(h) for h in headers]


# ---- version and store -------------------------------------------------------------------------------


def test_version(capsys):
    assert invoke(capsys, "version") == f"tinker {tinker.__version__}\n"
    assert json.loads(invoke(capsys, "--format", "json", "version")) == {"version": tinker.__version__}
    assert json.loads(invoke(capsys, "version", "-f", "json")) == {"version": tinker.__version__}
    assert json.loads(invoke(capsys, "-f", "table", "store", "-f", "json"))["store"]  # the later one wins


def test_python_dash_m_runs_the_cli(tmp_path):
    env = {**os.environ, "TINKER_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "tinker.cli", "version"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"tinker {tinker.__version__}\n"
    failed = subprocess.run([sys.executable, "-m", "tinker.cli", "checkpoint", "info", "nope"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("tinker: error: ") and "Traceback" not in failed.stderr


def test_console_script_entry_point(capsys, monkeypatch):
    """pyproject's `tinker = "tinker.cli.__main__:main"`: exits with cli()'s status."""
    from tinker.cli.__main__ import main

    monkeypatch.setattr(sys, "argv", ["tinker", "version"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0 and capsys.readouterr().out == f"tinker {tinker.__version__}\n"
    monkeypatch.setattr(sys, "argv", ["tinker", "run", "info", "nobody:train:0"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1


def test_store(capsys, store):
    assert invoke(capsys, "store") == f"{store}\n"
    assert json.loads(invoke(capsys, "-f", "json", "store")) == {"store": str(store)}


def test_usage(capsys):
    assert cli(["--help"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    for argv in ([], ["bogus"], ["checkpoint"], ["checkpoint", "list", "--limit", "-3"], ["-f", "yaml", "version"],
                 ["checkpoint", "set-ttl", "tinker://r/weights/a"],
                 ["checkpoint", "set-ttl", "tinker://r/weights/a", "--ttl", "5", "--remove"]):
        error_of(capsys, *argv)


# ---- checkpoint list / info ----------------------------------------------------------------------------


def test_checkpoint_list(capsys, run):
    run_id, state, sampler = run
    out = invoke(capsys, "checkpoint", "list")
    lines = out.splitlines()
    assert lines[0] == "2 checkpoints"
    headers = ["CHECKPOINT ID", "TYPE", "SIZE", "CREATED", "EXPIRES", "PATH"]
    starts = columns(lines[1], headers)
    assert lines[2].startswith("sampler_weights/s") and lines[3].startswith("weights/a")  # newest first
    for line, path, kind in ((lines[2], sampler, "sampler"), (lines[3], state, "training")):
        assert line[starts[1]:].startswith(kind) and line[starts[5]:] == path  # aligned columns
    assert "never" in lines[3] and "never" not in lines[2]

    data = json.loads(invoke(capsys, "-f", "json", "checkpoint", "list"))
    assert data["total_count"] == 2
    assert [c["tinker_path"] for c in data["checkpoints"]] == [sampler, state]
    assert data["checkpoints"][1]["checkpoint_type"] == "training" and data["checkpoints"][1]["size_bytes"] > 0

    out = invoke(capsys, "checkpoint", "list", "--limit", "1")
    assert out.splitlines()[0] == "1 checkpoint (1 more not shown; --limit 0 shows all)" and state not in out
    assert len(json.loads(invoke(capsys, "checkpoint", "list", "--limit", "0", "-f", "json"))["checkpoints"]) == 2

    by_run = json.loads(invoke(capsys, "checkpoint", "list", "--run-id", run_id, "-f", "json"))
    assert [c["tinker_path"] for c in by_run["checkpoints"]] == [sampler, state]
    assert "not found" in error_of(capsys, "checkpoint", "list", "--run-id", "nobody:train:0")
    assert "invalid training run id" in error_of(capsys, "checkpoint", "list", "--run-id", "../..")


def test_checkpoint_list_empty(capsys):
    assert invoke(capsys, "checkpoint", "list") == "No checkpoints found\n"
    assert json.loads(invoke(capsys, "-f", "json", "checkpoint", "list")) == {"checkpoints": [], "total_count": 0}


def test_checkpoint_info(capsys, run, base):
    run_id, state, sampler = run
    out = invoke(capsys, "checkpoint", "info", state)
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["Checkpoint ID"] == "weights/a" and rows["Tinker path"] == state
    assert rows["Training run"] == run_id and rows["Base model"] == base and rows["LoRA rank"] == "2"
    assert rows["Trains"] == "attn, mlp, unembed" and rows["Expires"] == "never"
    value_column = {line.index(v) for line, v in zip(out.splitlines(), rows.values())}
    assert len(value_column) == 1  # values aligned

    data = json.loads(invoke(capsys, "-f", "json", "checkpoint", "info", sampler))
    assert data["tinker_path"] == sampler and data["checkpoint_type"] == "sampler"
    assert data["base_model"] == base and data["lora_rank"] == 2 and data["expires_at"] is not None
    assert "not found" in error_of(capsys, "checkpoint", "info", f"tinker://{run_id}/weights/zzz")
    assert "Invalid tinker path" in error_of(capsys, "checkpoint", "info", "tinker://x/weights/../a")


# ---- delete -------------------------------------------------------------------------------------------


def test_checkpoint_delete_with_yes(capsys, run):
    run_id, state, sampler = run
    assert invoke(capsys, "checkpoint", "delete", state, "-y") == f"Deleted {state}\n"
    assert not ckpt.checkpoint_dir(run_id, "weights", "a").exists()
    assert json.loads(invoke(capsys, "-f", "json", "checkpoint", "delete", "--yes", sampler)) == {"deleted": [sampler]}
    assert "not found" in error_of(capsys, "checkpoint", "delete", "-y", state)


def test_checkpoint_delete_reports_each_failure(capsys, run):
    run_id, state, sampler = run
    missing = f"tinker://{run_id}/weights/missing"
    code = cli(["checkpoint", "delete", "-y", missing, sampler])
    out, err = capsys.readouterr()
    assert code == 1 and out == f"Deleted {sampler}\n" and "missing" in err and "Traceback" not in err


def test_checkpoint_delete_validates_every_path_first(capsys, run):
    run_id, state, sampler = run
    assert "Invalid tinker path" in error_of(capsys, "checkpoint", "delete", "-y", state, "tinker://../weights/x")
    assert ckpt.checkpoint_dir(run_id, "weights", "a").is_dir()


def test_checkpoint_delete_needs_confirmation(capsys, run, monkeypatch):
    run_id, state, sampler = run
    assert "pass -y" in error_of(capsys, "checkpoint", "delete", state)  # not a terminal: refuse
    assert ckpt.checkpoint_dir(run_id, "weights", "a").is_dir()

    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["n", "y"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    out = invoke(capsys, "checkpoint", "delete", state)
    assert state in out and "Nothing deleted." in out
    assert ckpt.checkpoint_dir(run_id, "weights", "a").is_dir()
    out = invoke(capsys, "checkpoint", "delete", state)
    assert out.endswith(f"Deleted {state}\n")
    assert not ckpt.checkpoint_dir(run_id, "weights", "a").exists()


# ---- download -----------------------------------------------------------------------------------------


def test_checkpoint_download(capsys, run, tmp_path, monkeypatch):
    run_id, state, sampler = run
    out = invoke(capsys, "checkpoint", "download", state, "-o", str(tmp_path / "models"))
    target = tmp_path / "models" / f"{run_id}_weights_a"
    assert str(target) in out
    source = ckpt.checkpoint_dir(run_id, "weights", "a")
    assert sorted(p.name for p in target.iterdir()) == [*ADAPTER_FILES, "checkpoint_complete"]
    for name in ADAPTER_FILES:
        assert (target / name).read_bytes() == (source / name).read_bytes()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "models").iterdir())

    assert "--force" in error_of(capsys, "checkpoint", "download", state, "-o", str(tmp_path / "models"))
    (target / "stale.txt").write_text("old")
    data = json.loads(invoke(capsys, "-f", "json", "checkpoint", "download", state, "-o", str(tmp_path / "models"),
                             "--force"))
    assert data["destination"] == str(target.resolve()) and data["file_size_bytes"] > 0
    assert not (target / "stale.txt").exists()

    monkeypatch.chdir(tmp_path)  # default: the current directory
    invoke(capsys, "checkpoint", "download", sampler)
    assert (tmp_path / f"{run_id}_sampler_weights_s" / "adapter_model.safetensors").is_file()
    assert "not found" in error_of(capsys, "checkpoint", "download", f"tinker://{run_id}/weights/nope")


def malicious_tar(path: Path, kind: str) -> None:
    with tarfile.open(path, "w") as tar:
        def add(info, data=b""):
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(tarfile.TarInfo("adapter_config.json"), b"{}")
        if kind == "traversal":
            add(tarfile.TarInfo("../../evil.txt"), b"pwned")
        elif kind == "absolute":
            add(tarfile.TarInfo(str(path.parent / "evil.txt")), b"pwned")
        elif kind in ("symlink", "hardlink"):
            link = tarfile.TarInfo("adapter_model.safetensors")
            link.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            link.linkname = "/etc/passwd"
            add(link)
        elif kind == "device":
            dev = tarfile.TarInfo("dev")
            dev.type = tarfile.CHRTYPE
            add(dev)


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "hardlink", "device"])
def test_download_refuses_unsafe_archives(capsys, run, tmp_path, monkeypatch, kind):
    run_id, state, _ = run
    evil = tmp_path / "evil" / "checkpoint.tar"
    evil.parent.mkdir()
    malicious_tar(evil, kind)

    def fake(self, path):
        future = concurrent.futures.Future()
        future.set_result(CheckpointArchiveUrlResponse(url=evil.as_uri(), expires="2100-01-01T00:00:00Z"))
        return future

    monkeypatch.setattr(RestClient, "get_checkpoint_archive_url_from_tinker_path", fake)
    out_dir = tmp_path / "out" / "deep"
    assert "unsafe entry" in error_of(capsys, "checkpoint", "download", state, "-o", str(out_dir))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "evil" / "evil.txt").exists()
    assert list(out_dir.iterdir()) == []  # neither the target nor the staging directory is left


def test_download_of_a_non_archive_is_an_error(capsys, run, tmp_path, monkeypatch):
    run_id, state, _ = run
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 100)

    def fake(self, path):
        future = concurrent.futures.Future()
        future.set_result(CheckpointArchiveUrlResponse(url=junk.as_uri(), expires="2100-01-01T00:00:00Z"))
        return future

    monkeypatch.setattr(RestClient, "get_checkpoint_archive_url_from_tinker_path", fake)
    assert "not a readable tar" in error_of(capsys, "checkpoint", "download", state, "-o", str(tmp_path / "o"))


# ---- set-ttl -----------------------------------------------------------------------------------------


def test_checkpoint_set_ttl(capsys, run):
    run_id, state, sampler = run
    out = invoke(capsys, "checkpoint", "set-ttl", state, "--ttl", "600")
    assert out.startswith(f"{state} expires: ") and "never" not in out
    manifest = json.loads((ckpt.checkpoint_dir(run_id, "weights", "a") / "checkpoint.json").read_text())
    assert abs(manifest["expires_at"] - (time.time() + 600)) < 30

    data = json.loads(invoke(capsys, "-f", "json", "checkpoint", "set-ttl", state, "--remove"))
    assert data["tinker_path"] == state and data["expires_at"] is None
    assert invoke(capsys, "checkpoint", "set-ttl", sampler, "--remove") == f"{sampler} expires: never\n"
    assert "ttl_seconds" in error_of(capsys, "checkpoint", "set-ttl", state, "--ttl", "0")

    invoke(capsys, "checkpoint", "set-ttl", state, "--ttl", "1")
    time.sleep(1.2)
    assert state not in invoke(capsys, "checkpoint", "list")
    assert "not found" in error_of(capsys, "checkpoint", "info", state)  # the listing deleted it


# ---- runs ----------------------------------------------------------------------------------------------


def test_run_list_and_info(capsys, run, base):
    run_id, state, sampler = run
    other = tinker.ServiceClient().create_lora_training_client(base, rank=2)
    other.save_state("x").result()

    lines = invoke(capsys, "run", "list").splitlines()
    assert lines[0] == "2 training runs"
    headers = ["RUN ID", "BASE MODEL", "RANK", "LAST REQUEST", "LAST CHECKPOINT"]
    starts = columns(lines[1], headers)
    assert lines[2].startswith(other.model_id) and lines[3].startswith(run_id)  # most recent first
    assert lines[3][starts[1]:].startswith(base) and lines[3][starts[2]:].startswith("2 ")
    assert lines[3][starts[4]:].startswith("weights/a")

    data = json.loads(invoke(capsys, "-f", "json", "run", "list", "--limit", "1"))
    assert data["total_count"] == 2 and [r["training_run_id"] for r in data["training_runs"]] == [other.model_id]
    assert "1 more not shown" in invoke(capsys, "run", "list", "--limit", "1")

    out = invoke(capsys, "run", "info", run_id)
    assert f"Run ID                   {run_id}" in out
    assert f"Last checkpoint          {state}" in out and f"Last sampler checkpoint  {sampler}" in out
    assert "recipe=sl" in out
    info = json.loads(invoke(capsys, "run", "info", run_id, "--format", "json"))
    assert info["training_run_id"] == run_id and info["lora_rank"] == 2 and info["user_metadata"] == {"recipe": "sl"}
    assert info["last_checkpoint"]["tinker_path"] == state
    assert "not found" in error_of(capsys, "run", "info", "nobody:train:0")
    assert "invalid training run id" in error_of(capsys, "run", "info", "../etc")


def test_run_list_empty(capsys):
    assert invoke(capsys, "run", "list") == "No training runs found\n"


def test_checkpoint_export(tmp_path, capsys, monkeypatch):
    """`tinker checkpoint export` writes the PEFT adapter, or with --merge a transformers checkpoint."""
    monkeypatch.setenv("TINKER_HOME", str(tmp_path / "store"))
    base, _ = tm.make_hf_checkpoint(tmp_path / "llama", "llama", seed=5)
    tc = tinker.ServiceClient().create_lora_training_client(str(base), rank=2)
    path = tc.save_weights_for_sampler("x").result().path
    assert cli(["checkpoint", "export", path, "-o", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and "PEFT adapter" in capsys.readouterr().out
    assert cli(["-f", "json", "checkpoint", "export", path, "-o", str(tmp_path / "merged"), "--merge"]) == 0
    assert json.loads(capsys.readouterr().out)["destination"].endswith("merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "config.json").is_file()
    assert cli(["checkpoint", "export", path, "-o", str(tmp_path / "merged"), "--merge"]) == 1
    assert "already exists" in capsys.readouterr().err
