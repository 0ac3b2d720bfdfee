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
- A `concurrent.futures.Future` (from `SamplingClient.sample`, or `APIFuture.future()`) is
  completed by a small daemon thread. The thread runs only while such futures are pending and
  polls the same fd.

What the SDK returns where (0.38): training calls return an APIFuture; `sample`,
`compute_logprobs` and the RestClient's methods return a `ConcurrentAPIFuture`, which is both an
APIFuture and a `concurrent.futures.Future` (code written when they returned a plain Future keeps
working); client factories return a client future (`ClientFuture`) that is also the client.

Nothing here is bound to one event loop, so nothing breaks when loops come and go.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import inspect
import select
import threading
import warnings
import weakref
from abc import ABC, abstractmethod
from typing import Any, Callable, Generic, TypeVar

from ._deprecation import future_as_client, reading_from_client_future
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
    """The result of a queued operation: `.result(timeout)`, `await fut`, `await fut.result_async()`,
    `fut.future()` (a `concurrent.futures.Future`) or `fut.coroutine()` (for `asyncio.create_task`)."""

    @abstractmethod
    def result(self, timeout: float | None = None) -> T:
        """Blocks until the result is ready; raises TimeoutError after `timeout` seconds."""

    @abstractmethod
    async def result_async(self, timeout: float | None = None) -> T:
        """Waits without blocking the event loop; raises asyncio.TimeoutError after `timeout` seconds."""

    def future(self) -> concurrent.futures.Future:
        """A `concurrent.futures.Future` completed with this future's value or error (for
        `concurrent.futures.wait`, `as_completed`, `add_done_callback`)."""
        # Generic fallback: a helper thread waits on result(). The engine-backed futures override
        # this with their completion hooks, so it is only used by futures built elsewhere.
        out: concurrent.futures.Future = concurrent.futures.Future()
        out.set_running_or_notify_cancel()

        def wait():
            try:
                out.set_result(self.result())
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                out.set_exception(e)

        threading.Thread(target=wait, name="tinker-future", daemon=True).start()
        return out

    async def coroutine(self) -> T:
        """This future as a coroutine, for APIs that take coroutines (`asyncio.create_task`)."""
        return await self.result_async()

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

    def future(self) -> concurrent.futures.Future:
        out: concurrent.futures.Future = concurrent.futures.Future()
        out.set_running_or_notify_cancel()
        completions.on_done(self._request, lambda: _settle(out, self._finish))
        return out


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

    def future(self) -> concurrent.futures.Future:
        out: concurrent.futures.Future = concurrent.futures.Future()
        _settle(out, self.result)
        return out


def _settle(out: concurrent.futures.Future, get: Callable[[], Any]) -> None:
    """Completes `out` with get()'s value, or with the exception it raises."""
    try:
        out.set_result(get())
    except Exception as e:  # noqa: BLE001 - delivered through the future
        out.set_exception(e)


async def _await_concurrent(future: concurrent.futures.Future, timeout: float | None):
    # shield: a cancelled or timed-out await must not cancel the shared future itself (others may
    # still wait on it, and the work behind it goes on regardless)
    return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)


class ConcurrentAPIFuture(concurrent.futures.Future, APIFuture[T]):
    """A `concurrent.futures.Future` that is also an APIFuture: what `SamplingClient.sample` and
    `compute_logprobs` and the RestClient's methods return. Before 0.38 they returned a plain
    Future, so `.result()`, `done()`, `add_done_callback` and `concurrent.futures.wait` keep
    working; 0.38 code awaits it or calls `.result_async()` / `.future()`."""

    async def result_async(self, timeout: float | None = None) -> T:
        return await _await_concurrent(self, timeout)

    def future(self) -> concurrent.futures.Future:
        return self

    def __await__(self):
        return APIFuture.__await__(self)


class AwaitableConcurrentFuture(APIFuture[T]):
    """An APIFuture over a `concurrent.futures.Future` (the SDK's public name for this adapter)."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        return await _await_concurrent(self._future, timeout)

    def future(self) -> concurrent.futures.Future:
        return self._future


def completed_future(fn: Callable[..., T], *args) -> ConcurrentAPIFuture[T]:
    """Runs `fn(*args)` now; the returned future holds its value or the exception it raised."""
    out: ConcurrentAPIFuture = ConcurrentAPIFuture()
    out.set_running_or_notify_cancel()
    _settle(out, lambda: fn(*args))
    return out


class ClientFuture(APIFuture[T]):
    """A future of a client that can also be used as the client: what the client factories return
    since 0.38 (`create_lora_training_client(...)`, `save_weights_and_get_sampling_client()`, ...).

    0.38 code calls `.result()` or awaits it; older code, and the getting-started guide, use it as
    the client directly, which keeps working with 0.38's FutureWarning (forward_client_methods). A subclass pairs this class with the client class (see
    BackcompatTrainingClientFuture), so the client's methods are its methods and isinstance checks
    hold. It keeps no client state of its own: every instance attribute those methods read or
    write is the finished client's (waiting for it if need be), so the two views never diverge.
    """

    def __init__(self, source: APIFuture[T]):
        object.__setattr__(self, "_source", source)

    def result(self, timeout: float | None = None) -> T:
        return self._source.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        return await self._source.result_async(timeout)

    def future(self) -> concurrent.futures.Future:
        return self._source.future()

    def __getattr__(self, name: str):
        # Only reached for names not found on the class: the client's instance attributes.
        if name == "_source":  # not set up (e.g. a bare copy): nothing to delegate to
            raise AttributeError(name)
        if not name.startswith("_"):  # deprecated in 0.38, as the client's methods are (forward_client_methods)
            warnings.warn(reading_from_client_future(name), FutureWarning, stacklevel=2)
        return getattr(self._source.result(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._source.result(), name, value)

    def __repr__(self) -> str:
        if not self._source.done():
            return f"<{type(self).__name__}: pending>"
        try:
            return repr(self._source.result())
        except Exception as e:  # noqa: BLE001 - a failed creation shows its error
            return f"<{type(self).__name__}: failed: {e!r}>"


def forward_client_methods(future_cls: type, client_cls: type, what: str) -> None:
    """Gives `future_cls` (a ClientFuture paired with `client_cls`) each public method of the
    client, run on the finished client (waiting for it), with the FutureWarning 0.38 gives for
    using the future as the client. Sync methods wait with `.result()`, async ones await the
    client."""
    warn = future_as_client(what)
    for name, member in vars(client_cls).items():
        if name.startswith("_") or not callable(member) or isinstance(member, (staticmethod, classmethod, type)):
            continue
        setattr(future_cls, name, warn(_forwarder(name, inspect.iscoroutinefunction(inspect.unwrap(member)), member)))


def _forwarder(name: str, is_async: bool, member: Callable) -> Callable:
    if is_async:
        async def forward(self, *args, **kwargs):
            return await getattr(await self.result_async(), name)(*args, **kwargs)
    else:
        def forward(self, *args, **kwargs):
            return getattr(self.result(), name)(*args, **kwargs)
    functools.update_wrapper(forward, member)  # the client method's name, doc and signature
    return forward


_creator: concurrent.futures.ThreadPoolExecutor | None = None
_creator_lock = threading.Lock()


def in_background(fn: Callable[..., T], *args) -> AwaitableConcurrentFuture[T]:
    """Runs `fn(*args)` (creating a client: loading a model, reading a checkpoint) on a worker
    thread and returns its future at once, so `await` does not block the event loop and errors
    come out of the future, as the service's do."""
    global _creator
    with _creator_lock:
        if _creator is None:
            _creator = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tinker-create")
    return AwaitableConcurrentFuture(_creator.submit(fn, *args))


class CancellableFuture(ConcurrentAPIFuture[T]):
    """The future of a sample or compute_logprobs request: `cancel()` (or cancelling the asyncio task that
    awaits it, or dropping the future unread) stops the request between decoding steps and frees its place in
    the batch for others. Only these requests are stopped when dropped: they change nothing, so an unread
    result is a wasted one (a training call's future, dropped, still runs: its effect is the point)."""

    def __init__(self, request):
        super().__init__()
        self._request = request
        # garbage-collected while pending: nobody can read the result any more
        weakref.finalize(self, request.cancel).atexit = False

    def cancel(self) -> bool:
        cancelled = super().cancel()  # False once the result is in
        if cancelled:
            self._request.cancel()
        return cancelled

    async def result_async(self, timeout: float | None = None) -> T:
        try:
            return await _await_concurrent(self, timeout)
        except asyncio.CancelledError:
            self.cancel()  # the awaiting task was cancelled: nobody wants this result
            raise


def concurrent_future(request, convert: Callable[[], T], cancellable: bool = False) -> ConcurrentAPIFuture[T]:
    """The future `sample` returns, completed when `request` finishes; a `cancellable` one stays pending
    until then, so `cancel()` works on it (concurrent.futures cannot cancel a running future)."""
    out: ConcurrentAPIFuture = CancellableFuture(request) if cancellable else ConcurrentAPIFuture()
    if not cancellable:
        out.set_running_or_notify_cancel()
    # the completion holds a cancellable future weakly, so that dropping it cancels the request
    held = weakref.ref(out) if cancellable else (lambda: out)

    def complete():
        out = held()
        if out is None or (cancellable and not out.set_running_or_notify_cancel()):
            return  # dropped, or cancelled: the request stopped (or finished unread)
        try:
            out.set_result(convert())
        except Exception as e:  # noqa: BLE001 - delivered through the future
            out.set_exception(engine_error(e))

    completions.on_done(request, complete)
    return out


def failed_concurrent_future(error: BaseException) -> ConcurrentAPIFuture:
    out: ConcurrentAPIFuture = ConcurrentAPIFuture()
    out.set_exception(error)
    return out


class BackgroundFuture(AwaitableConcurrentFuture[T]):
    """An APIFuture over a concurrent future that completes without anyone waiting (checkpoint
    writes: a save happens even if its future is never read)."""


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


def background_work_done() -> APIFuture[None]:
    """A future that completes once the background work queued so far (checkpoint writes) is done."""
    pending = list(_unfinished)
    if not pending:
        return DoneFuture(None)
    return in_background(lambda: concurrent.futures.wait(pending) and None)
