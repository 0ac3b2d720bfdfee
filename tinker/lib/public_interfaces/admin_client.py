"""AdminClient: Tinker's organization-admin REST operations (0.38), answered for this machine.

The SDK's AdminClient reads an organization's billing usage, its checkpoint storage and its audit
log from the service. Here there is no organization and no service:
- `get_current_checkpoint_storage_usage` reports the checkpoints in the local store and their size
  (no cost: nothing is billed), as RestClient's method of that name does;
- `get_billing_usage` and `get_audit_log` cannot mean anything locally (running here is not billed,
  and no service logs who accessed what): their futures raise UnsupportedOperationError (a
  BadRequestError, so the `except tinker.BadRequestError` that guards a refused admin request
  catches it; also a NotImplementedError).

As everywhere in 0.38, each method returns an APIFuture (`.result()` or `await`), and its `_async`
twin is deprecated. `AdminClient()` needs no arguments; `base_url` and `api_key` are accepted and
have no effect.
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime
from typing import Literal

from pydantic import TypeAdapter

from ... import _deprecation as deprecation
from ..._futures import ConcurrentAPIFuture, completed_future
from ...types import AuditLogResponse, BillingUsageResponse, CurrentCheckpointStorageUsageResponse
from .rest_client import _storage_usage, _unsupported

AuditEventType = Literal["all", "checkpoints", "projects", "teams", "organizations"]

_audit_log = _unsupported("get_audit_log", "there is no service, so there is no audit log of its accesses")
_billing = _unsupported("get_billing_usage", "running locally is not billed")
_instant = TypeAdapter(datetime)


class AdminClient:
    """Organization-admin operations: checkpoint storage usage (local values), billing usage and
    the audit log (not available locally: UnsupportedOperationError)."""

    def __init__(self, _holder=None, *, base_url: str | None = None, api_key: str | None = None):
        if _holder is not None and (base_url is not None or api_key is not None):
            raise ValueError("AdminClient takes either a holder or base_url/api_key, not both: a holder already "
                             "carries its own base URL and credentials")
        self.holder = _holder

    def __repr__(self) -> str:
        return "AdminClient(local)"

    def get_telemetry(self):
        return None

    # ---- audit log -----------------------------------------------------------------------

    def get_audit_log(self, event_type: AuditEventType = "all", day: date | None = None
                      ) -> ConcurrentAPIFuture[AuditLogResponse]:
        """Not available locally: the future raises UnsupportedOperationError."""
        return completed_future(_audit_log)

    @deprecation.awaitable_twin("AdminClient", "get_audit_log")
    async def get_audit_log_async(self, event_type: AuditEventType = "all", day: date | None = None
                                  ) -> AuditLogResponse:
        return await self.get_audit_log(event_type=event_type, day=day)

    # ---- billing -------------------------------------------------------------------------

    def get_billing_usage(self, starting_on: datetime | str, ending_before: datetime | str
                          ) -> ConcurrentAPIFuture[BillingUsageResponse]:
        """Not available locally (nothing is billed): the future raises UnsupportedOperationError.
        As in the SDK, arguments that are not datetimes or RFC 3339 strings raise a pydantic
        ValidationError at the call."""
        _instant.validate_python(starting_on)
        _instant.validate_python(ending_before)
        return completed_future(_billing)

    @deprecation.awaitable_twin("AdminClient", "get_billing_usage")
    async def get_billing_usage_async(self, starting_on: datetime | str, ending_before: datetime | str
                                      ) -> BillingUsageResponse:
        return await self.get_billing_usage(starting_on=starting_on, ending_before=ending_before)

    # ---- storage -------------------------------------------------------------------------

    def get_current_checkpoint_storage_usage(self, project_id: str | None = None
                                             ) -> ConcurrentAPIFuture[CurrentCheckpointStorageUsageResponse]:
        """The live checkpoints in the local store and their size, one entry per project (of
        `project_id` only, if given); no cost or rate, as nothing is billed."""
        return completed_future(_storage_usage, project_id)

    @deprecation.awaitable_twin("AdminClient", "get_current_checkpoint_storage_usage")
    async def get_current_checkpoint_storage_usage_async(self, project_id: str | None = None
                                                         ) -> CurrentCheckpointStorageUsageResponse:
        return await asyncio.to_thread(_storage_usage, project_id)


__all__ = ["AdminClient"]
