"""Tinker's exception hierarchy (names and bases as in the Tinker SDK).

The SDK's HTTP-flavoured constructors take an httpx request/response, in the same positions here;
a local engine has none, so those arguments are optional (given one, as a test's mock may, the
error takes its request and status code as the SDK's does). The API layer uses these
classes for every error a user can cause.
"""

from __future__ import annotations

__all__ = [
    "TinkerError", "APIError", "APIStatusError", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "UnprocessableEntityError",
    "RateLimitError", "InternalServerError", "APIConnectionError", "APITimeoutError",
    "APIResponseValidationError", "InvalidArgumentError", "ModelLoadError", "BillingError", "RequestFailedError", "SidecarError",
    "SidecarStartupError", "SidecarDiedError", "SidecarIPCError",
]  # fmt: skip


class TinkerError(Exception):
    def __reduce__(self):
        # Subclass constructors differ; rebuild without calling them (pickling across processes).
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    obj = cls.__new__(cls)
    Exception.__init__(obj, *args)
    obj.__dict__.update(state)
    return obj


class APIError(TinkerError):
    def __init__(self, message: str, request=None, *, body=None):
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


def _from_response(error: APIError, response) -> None:
    """What the SDK reads off an httpx response given to an error (a mock's, here): the request
    and the status code."""
    error.response = response
    try:
        error.request = response.request
    except (AttributeError, RuntimeError):  # None, or an httpx.Response built without a request
        pass
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        error.status_code = status


class APIStatusError(APIError):
    status_code: int = 0

    def __init__(self, message: str, response=None, body=None):
        super().__init__(message, None, body=body)
        _from_response(self, response)


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class BillingError(APIStatusError):
    status_code = 402


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    status_code = 500


class APIConnectionError(APIError):
    def __init__(self, request=None, message: str = "Connection error."):
        super().__init__(message, request, body=None)


class APITimeoutError(APIConnectionError):
    def __init__(self, request=None):
        super().__init__(message="Request timed out.", request=request)


class APIResponseValidationError(APIError):
    def __init__(self, response=None, body=None, message: str | None = None):
        super().__init__(message or "Data returned by API invalid for expected schema.", None, body=body)
        _from_response(self, response)


class InvalidArgumentError(BadRequestError, ValueError):
    """A malformed argument that Tinker's SDK refuses with a ValueError (a tinker:// path, a run or checkpoint id,
    a checkpoint name, empty data): a BadRequestError, as every other refused request here, and still a ValueError
    for code written against the SDK."""


class ModelLoadError(BadRequestError, ValueError):
    """A base model could not be found or its files could not be loaded.

    Also a ValueError, so code that guards model names with `except ValueError` keeps working.
    """


class RequestFailedError(TinkerError):
    """A queued request failed while running (raised by its future's `.result()`).

    `category` is a `tinker.types.RequestErrorCategory`: User for a bad request, Server for an
    engine failure, Unknown otherwise (a matching string is converted).
    """

    def __init__(self, message: str, request_id: str | None = None, category=None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = _category(category)


def _category(category):
    from .types.responses import RequestErrorCategory

    if isinstance(category, RequestErrorCategory):
        return category
    if isinstance(category, str):
        for member in RequestErrorCategory:
            if category.lower() == member.value:
                return member
    return RequestErrorCategory.Unknown


class SidecarError(TinkerError):
    """A problem with the subprocess that serves sampling (TINKER_SUBPROCESS_SAMPLING)."""


class SidecarStartupError(SidecarError):
    """The sampling subprocess failed to start."""


class SidecarDiedError(SidecarError):
    """The sampling subprocess exited while requests were pending."""


class SidecarIPCError(SidecarError):
    """Communication with the sampling subprocess failed."""
