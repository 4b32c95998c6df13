"""Typed errors. Each carries the contract's error `type`, a message, and the offending field where there is one.

The same classes serve the CLI (printed), the API (mapped to status codes) and failed jobs (`job.error`).
"""

from __future__ import annotations


class MergelineError(Exception):
    type = "internal"
    status_code = 500

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        out = {"type": self.type, "message": self.message}
        if self.param is not None:
            out["param"] = self.param
        return out

    @staticmethod
    def from_dict(error: dict) -> MergelineError:
        """The typed error that `to_dict` described (an error carried through a job record)."""
        pending, kinds = [MergelineError], {}
        while pending:
            kind = pending.pop()
            kinds.setdefault(kind.type, kind)
            pending += kind.__subclasses__()
        kind = kinds.get(error.get("type"), MergelineError)
        if kind is RateLimited:
            return RateLimited(error.get("message", ""), retry_after=1, param=error.get("param"))
        return kind(error.get("message", ""), param=error.get("param"))


class InvalidInput(MergelineError):
    """The spec or one of the files it names is unusable (bad format, wrong shape, NaN weights, ...)."""

    type = "invalid_input"
    status_code = 422


class IncompatibleCheckpoint(InvalidInput):
    """A task checkpoint does not have the base's architecture (keys or shapes differ)."""

    type = "incompatible_checkpoint"


class FetchFailed(MergelineError):
    """A URI could not be read: missing, unreachable, refused by policy, or cut off mid-transfer."""

    type = "fetch_failed"
    status_code = 422


class AccessDenied(FetchFailed):
    """A URI is outside what the configuration allows (file roots, private addresses, http disabled)."""

    type = "access_denied"


class Conflict(MergelineError):
    """The lineage moved under the job (head changed, a version was taken) or the base does not match."""

    type = "conflict"
    status_code = 409


class NotFound(MergelineError):
    type = "not_found"
    status_code = 404


class StoreUnavailable(MergelineError):
    """The object store could not be reached."""

    type = "store_unavailable"
    status_code = 503


class JobCancelled(MergelineError):
    type = "cancelled"
    status_code = 409


class BadRequest(MergelineError):
    """The request itself is malformed (not JSON, a bad query parameter or header)."""

    type = "invalid_request"
    status_code = 400


class Unauthorized(MergelineError):
    type = "unauthorized"
    status_code = 401


class RequestTooLarge(MergelineError):
    type = "request_too_large"
    status_code = 413


class RateLimited(MergelineError):
    """The tenant is over its request rate or its active-job cap; `retry_after` (seconds) goes in Retry-After."""

    type = "rate_limited"
    status_code = 429

    def __init__(self, message: str, *, retry_after: int, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after


class BrokerUnavailable(MergelineError):
    """Redis (job records and the Celery broker) could not be reached."""

    type = "broker_unavailable"
    status_code = 503
