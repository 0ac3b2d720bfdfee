"""Futures over the engine's C completion queue (DESIGN.md §3).

Every engine request gets its id when it is submitted, at call time, and the engine's worker runs
requests strictly in submission order. Finishing a request does two things in C: it signals the
request's own condition variable, and it appends the id to the completion list and writes the
engine's wake fd (an eventfd).

Three kinds of waiter use this:
- A blocking `APIFuture.result()` waits on the request itself in C, with the GIL released and
  Ctrl-C still honoured. No thread or event loop is involved.
- An awaiting coroutine registers with the process-wide `_Completions` dispatcher. The dispatcher
  watches the wake fd with `loop.add_reader` on the coroutine's own running loop, only while
  that loop has waiters. Several loops (one per thread, a new one per `asyncio.run`, Jupyter's)
  can watch at once. Whoever drains the list hands each finished id to its waiters, on their own
  loops.
- A `concurrent.futures.Future` (from `SamplingClient.sample`) is completed by a small daemon
  thread. The thread runs only while such futures are pending and polls the same fd.

Nothing here is bound to one event loop, so nothing breaks when loops come and go.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import select
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Generic, TypeVar

from ._engine import get_engine
from ._exceptions import BadRequestError, RequestFailedError
from .types import RequestErrorCategory

T = TypeVar("T")


def engine_error(e: BaseException) -> BaseException:
    """The Tinker exception for an engine failure: bad input is a BadRequestError (what the service
    answers with HTTP 400); anything else failed while running, a RequestFailedError."""
    if isinstance(e, (BadRequestError, RequestFailedError)):
        return e
    if isinstance(e, ValueError):
        return BadRequestError(str(e))
    return RequestFailedError(f"{type(e).__name__}: {e}", request_id=None, category=RequestErrorCategory.Server)


class _Completions:
    """Hands finished request ids to the coroutines and concurrent futures waiting for them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loop_waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._loop_counts: dict[asyncio.AbstractEventLoop, int] = {}  # loops watching the fd: their waiters
        self._thread_waiters: dict[int, list[Callable[[], None]]] = {}
        self._thread: threading.Thread | None = None

    # ---- draining -------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Drains the finished ids and wakes their waiters. Safe from any thread."""
        ids = get_engine().drain()
        if not ids:
            return
        with self._lock:
            loop_waiters = [w for i in ids for w in self._loop_waiters.pop(i, ())]
            callbacks = [c for i in ids for c in self._thread_waiters.pop(i, ())]
        for loop, fut in loop_waiters:
            _wake(loop, fut)
        for callback in callbacks:
            callback()

    # ---- coroutines -----------------------------------------------------------------------

    async def wait(self, request) -> None:
        """Returns once `request` is done, without blocking the running loop."""
        if request.done():
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._loop_waiters.setdefault(request.id, []).append((loop, fut))
            first = self._loop_counts.get(loop, 0) == 0
            self._loop_counts[loop] = self._loop_counts.get(loop, 0) + 1
        if first:
            loop.add_reader(get_engine().wake_fd(), self.dispatch)
        try:
            # Registered before this check, so a finish in between is not missed: either the
            # drain sees our waiter, or we see done() here.
            if request.done():
                return
            await fut
        finally:
            self._forget(request.id, loop, fut)

    def _forget(self, request_id: int, loop, fut) -> None:
        with self._lock:
            waiters = self._loop_waiters.get(request_id)
            if waiters and (loop, fut) in waiters:
                waiters.remove((loop, fut))
                if not waiters:
                    del self._loop_waiters[request_id]
            self._loop_counts[loop] -= 1
            last = self._loop_counts[loop] == 0
            if last:
                del self._loop_counts[loop]
        if last and not loop.is_closed():
            loop.remove_reader(get_engine().wake_fd())

    # ---- concurrent futures ---------------------------------------------------------------

    def on_done(self, request, callback: Callable[[], None]) -> None:
        """Calls `callback()` (on some thread) once `request` is done."""
        with self._lock:
            self._thread_waiters.setdefault(request.id, []).append(callback)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="tinker-completions", daemon=True)
                self._thread.start()
        if request.done():  # finished before we registered: run it now (at most once)
            self._run_thread_waiters(request.id)

    def _run_thread_waiters(self, request_id: int) -> None:
        with self._lock:
            callbacks = self._thread_waiters.pop(request_id, ())
        for callback in callbacks:
            callback()

    def _watch(self) -> None:
        fd = get_engine().wake_fd()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            poller.poll(200)  # the timeout only bounds how long an idle thread lingers
            self.dispatch()
            with self._lock:
                if not self._thread_waiters:
                    self._thread = None
                    return


def _wake(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> None:
    def set_done():
        if not fut.done():
            fut.set_result(None)

    try:
        if loop is _running_loop():
            set_done()
        else:
            loop.call_soon_threadsafe(set_done)
    except RuntimeError:  # that loop has closed; its waiter went with it
        pass


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


completions = _Completions()


class APIFuture(ABC, Generic[T]):
    """The result of a queued training operation: `.result(timeout)`, `await fut.result_async()` or
    `await fut`."""

    @abstractmethod
    def result(self, timeout: float | None = None) -> T:
        """Blocks until the result is ready; raises TimeoutError after `timeout` seconds."""

    @abstractmethod
    async def result_async(self, timeout: float | None = None) -> T:
        """Waits without blocking the event loop; raises asyncio.TimeoutError after `timeout` seconds."""

    def __await__(self):
        return self.result_async().__await__()


class EngineFuture(APIFuture[T]):
    """An engine request and how to turn its raw result into the public type (run once, cached)."""

    def __init__(self, request, convert: Callable[[], T]):
        self._request = request
        self._convert = convert
        self._lock = threading.Lock()
        self._value: Any = None
        self._error: BaseException | None = None
        self._ready = False

    @property
    def request_id(self) -> int:
        return self._request.id

    def done(self) -> bool:
        return self._request.done()

    def _finish(self) -> T:
        with self._lock:
            if not self._ready:
                try:
                    self._value = self._convert()
                except Exception as e:  # noqa: BLE001 - every failure is re-raised to each caller
                    self._error = engine_error(e)
                self._ready = True
                self._convert = None
        if self._error is not None:
            raise self._error
        return self._value

    def result(self, timeout: float | None = None) -> T:
        if not self._request.wait(timeout):
            raise TimeoutError(f"request {self._request.id} did not finish within {timeout} s")
        completions.dispatch()  # keeps the completion list short when nobody awaits
        return self._finish()

    async def result_async(self, timeout: float | None = None) -> T:
        if timeout is None:
            await completions.wait(self._request)
        else:
            await asyncio.wait_for(completions.wait(self._request), timeout)
        return self._finish()


class DoneFuture(APIFuture[T]):
    """A future that already holds its value or error (e.g. input rejected before queueing)."""

    def __init__(self, value: T = None, error: BaseException | None = None):
        self._value = value
        self._error = error

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> T:
        if self._error is not None:
            raise self._error
        return self._value

    async def result_async(self, timeout: float | None = None) -> T:
        return self.result()


def concurrent_future(request, convert: Callable[[], T]) -> concurrent.futures.Future:
    """A stdlib Future (what Tinker's sampling methods return) completed when `request` finishes."""
    out: concurrent.futures.Future = concurrent.futures.Future()
    out.set_running_or_notify_cancel()

    def complete():
        try:
            out.set_result(convert())
        except Exception as e:  # noqa: BLE001 - delivered through the future
            out.set_exception(engine_error(e))

    completions.on_done(request, complete)
    return out


def failed_concurrent_future(error: BaseException) -> concurrent.futures.Future:
    out: concurrent.futures.Future = concurrent.futures.Future()
    out.set_exception(error)
    return out


class BackgroundFuture(APIFuture[T]):
    """An APIFuture over a concurrent future that completes without anyone waiting (checkpoint
    writes: a save happens even if its future is never read)."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)), timeout)


_unfinished: set[concurrent.futures.Future] = set()  # background work to finish before the process exits


def background_future(request, convert: Callable[[], T]) -> BackgroundFuture[T]:
    future = concurrent_future(request, convert)
    _unfinished.add(future)
    future.add_done_callback(_unfinished.discard)
    return BackgroundFuture(future)


@atexit.register
def _finish_background_work() -> None:
    """A script that ends right after `save_state(...)` without reading the result still gets its
    checkpoint: exit waits for queued saves (the engine and the completion thread still run)."""
    for future in list(_unfinished):
        try:
            future.result(timeout=300)
        except BaseException:  # noqa: BLE001 - reported through the future; nothing to do at exit
            pass
