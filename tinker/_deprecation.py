"""The deprecations of Tinker SDK 0.38, in its words.

0.38 deprecates, with a FutureWarning at each call: every `*_async` twin of a method that now returns
an awaitable future (await the sync method instead), `TrainingClient.load_state*` (make a new
training client from the checkpoint instead), `ServiceClient.create_rest_client()` and
`ServiceClient.get_server_capabilities()` (use `tinker.RestClient()`), the admin methods that moved
from RestClient to AdminClient, and using the future a client factory returns as the client itself
(call `.result()` or await it first). The deprecated calls keep working exactly as before; the
messages below are the SDK's, so that filters written for the SDK's warnings match ours.

Methods this project has and the SDK does not (e.g. `RestClient.whoami_async`) are not deprecated
here: the SDK says nothing about them.
"""

from __future__ import annotations

from typing_extensions import deprecated

__all__ = [
    "awaitable_twin", "client_factory_twin", "save_twin", "local_answer_twin", "moved_to_admin", "moved_to_admin_twin",
    "train_op_twin", "LOAD_STATE", "CREATE_REST_CLIENT", "GET_SERVER_CAPABILITIES", "GET_SERVER_CAPABILITIES_ASYNC",
    "future_as_client", "future_as_client_message", "reading_from_client_future", "unknown_service_arguments",
]  # fmt: skip

_REMOVED = "is deprecated and will be removed in a future tinker SDK version."


def _future_warning(message: str):
    """Decorates a method (sync or async) to give a FutureWarning with `message` at each call, at
    the caller's line (an async method warns when it is called, before it is awaited)."""
    return deprecated(message, category=FutureWarning)


def awaitable_twin(cls: str, method: str):
    """`cls.method_async()` whose sync `method()` returns an awaitable APIFuture."""
    return _future_warning(f"DEPRECATED: {cls}.{method}_async() {_REMOVED} Use `await {cls}.{method}(...)` "
                           f"instead; {method}() returns an APIFuture that can be awaited.")


def client_factory_twin(cls: str, method: str):
    """`cls.method_async()` whose sync `method()` returns a future of a client."""
    return _future_warning(f"DEPRECATED: {cls}.{method}_async() {_REMOVED} Use `await {cls}.{method}(...)` "
                           f"instead; it returns a future of the client that can be awaited.")


def save_twin(cls: str, method: str):
    """TrainingClient's save_*_async twins."""
    return _future_warning(f"DEPRECATED: {cls}.{method}_async() {_REMOVED} Use {cls}.{method}(...) instead: it "
                           f"returns an APIFuture that can be awaited (`await {cls}.{method}(...)`).")


def local_answer_twin(cls: str, method: str):
    """An `_async` twin of a method that answers without a request (get_info, get_base_model)."""
    return _future_warning(f"DEPRECATED: {cls}.{method}_async() {_REMOVED} Use {cls}.{method}() instead; it "
                           f"answers from the client without a request.")


def moved_to_admin(method: str):
    return _future_warning(f"DEPRECATED: RestClient.{method}() {_REMOVED} Use AdminClient.{method}() instead; "
                           f"AdminClient is constructed the same way as RestClient.")


def moved_to_admin_twin(method: str):
    return _future_warning(f"DEPRECATED: RestClient.{method}_async() {_REMOVED} Use `await AdminClient.{method}(...)` "
                           f"instead; AdminClient is constructed the same way as RestClient, and {method}() "
                           f"returns an APIFuture that can be awaited.")


_THEN_WAIT = ("`fwd_bwd_future = client.{fb}(...); optim_future = client.optim_step(...); await fwd_bwd_future; "
              "await optim_future` (or `.result()` on each).")


def train_op_twin(method: str):
    """TrainingClient's forward_async, forward_backward[_custom]_async and optim_step_async."""
    head = (f"DEPRECATED: TrainingClient.{method}_async() {_REMOVED} Use TrainingClient.{method}(...) instead: it "
            f"returns an APIFuture at once. ")
    if method == "forward":
        tail = ("Submit the requests that follow before waiting: `fwd_future = client.forward(...); ...; "
                "await fwd_future` (or `fwd_future.result()`).")
    elif method == "optim_step":
        tail = "Submit it right after forward_backward, then wait for both: " + _THEN_WAIT.format(fb="forward_backward")
    else:
        tail = "Submit the optimizer step before waiting: " + _THEN_WAIT.format(fb=method)
    return _future_warning(head + tail)


LOAD_STATE = _future_warning(
    "DEPRECATED: TrainingClient.load_state*() is deprecated and will NOT be supported in future tinker SDK "
    "versions. Migrate now: create a new training client from the checkpoint with "
    "ServiceClient.create_training_client_from_state() or "
    "ServiceClient.create_training_client_from_state_with_optimizer().")

CREATE_REST_CLIENT = _future_warning(
    f"DEPRECATED: ServiceClient.create_rest_client() {_REMOVED} Construct tinker.RestClient() directly instead; it "
    f"takes the same base_url and api_key and needs no ServiceClient.")

GET_SERVER_CAPABILITIES = _future_warning(
    f"DEPRECATED: ServiceClient.get_server_capabilities() {_REMOVED} Use "
    f"tinker.RestClient().get_server_capabilities() instead; it returns an APIFuture: call .result() on it, or "
    f"await it. RestClient needs no ServiceClient.")

GET_SERVER_CAPABILITIES_ASYNC = _future_warning(
    f"DEPRECATED: ServiceClient.get_server_capabilities_async() {_REMOVED} Use "
    f"`await tinker.RestClient().get_server_capabilities()` instead; RestClient needs no ServiceClient.")


def future_as_client_message(what: str) -> str:
    return (f"Using the future as the {what} is deprecated; call .result() on it, or await it, to get the {what} "
            f"first")


def future_as_client(what: str):
    """A method called on the future a client factory returned, as if it were the client."""
    return _future_warning(future_as_client_message(what))


def reading_from_client_future(name: str) -> str:
    return (f"Reading `.{name}` from the future returned by a client-creation method is deprecated and will stop "
            f"working in a future tinker SDK version. Call .result() on the future, or await it, to get the "
            f"client first.")


def unknown_service_arguments(names) -> str:
    return (f"ServiceClient ignores unsupported arguments: {', '.join(sorted(names))}. Passing them will be an "
            f"error in a future version of the Tinker SDK.")
