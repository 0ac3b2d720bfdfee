"""Kills overwriting saves at random moments and checks the name after each kill (run by
tests/test_robustness_overwrite.py in its own process, so the engine's threads are never forked).

    python overwrite_killer.py <tinker path> <architecture> <kills> <seed> <exchange: 1|0>

A forked child overwrites the checkpoint at <tinker path> in a loop, each save with a new step, through
the same save_checkpoint the clients' saves call; the parent kills it with SIGKILL after a random delay,
then loads the name with every file checked against its manifest. Prints one JSON line: the number of
kills, how many of them landed after the child had saved at least once, and the failures (empty when the
name always resolved to a complete checkpoint).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

from tinker import _checkpoints as ckpt


def widen_windows(rng: random.Random) -> None:
    """A save's steps take microseconds, too short for a kill to land between two renames by chance: each
    rename and fsync (in this child only) is followed by a random pause of up to 2 ms."""
    for name in ("rename", "fsync"):
        step = getattr(os, name)

        def paused(*args, _step=step, **kwargs):
            result = _step(*args, **kwargs)
            time.sleep(rng.uniform(0, 0.002))
            return result

        setattr(os, name, paused)


def overwrite_forever(path: str, arch: str, first_step: int, ready_fd: int) -> None:
    widen_windows(random.Random(first_step))
    run_id, kind, name = ckpt.parse_path(path)
    loaded = ckpt.load_checkpoint(path, with_optimizer=kind == "weights")
    moments = (loaded.exp_avg, loaded.exp_avg_sq) if kind == "weights" else None
    run = ckpt.read_run(run_id)
    step = first_step
    while True:
        ckpt.save_checkpoint(run, kind, name, loaded.params, step, moments, None, True, arch=arch)
        if step == first_step:
            os.write(ready_fd, b"1")
        step += 1


def main() -> None:
    path, arch, kills, seed, exchange = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    ckpt.USE_EXCHANGE = exchange
    rng = random.Random(seed)
    failures, saved_before_kill, step = [], 0, 1_000_000
    for k in range(kills):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the saving child: never returns
            os.close(ready_r)
            try:
                overwrite_forever(path, arch, step, ready_w)
            finally:
                os._exit(1)
        os.close(ready_w)
        # half the kills at any moment of a save (the first one included), half after one complete overwrite
        if k % 2:
            saved_before_kill += len(os.read(ready_r, 1)) > 0
        time.sleep(rng.uniform(0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        step += 1_000_000
        try:
            loaded = ckpt.load_checkpoint(path, with_optimizer=ckpt.parse_path(path)[1] == "weights")
            if not loaded.params:
                failures.append(f"kill {k}: no tensors")
        except Exception as e:  # noqa: BLE001 - reported to the test
            failures.append(f"kill {k}: {type(e).__name__}: {e}")
    print(json.dumps({"kills": kills, "after_a_save": saved_before_kill, "failures": failures}))


if __name__ == "__main__":
    main()
