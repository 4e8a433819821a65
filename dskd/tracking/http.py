"""Talking to a tracking server that may be down: short HTTP settings, and telling "unreachable" from "rejected".

Contracts:
  - `short_http()` sets MLflow's HTTP variables for the calls inside it only (MLflow reads them on every request)
    and never overrides a variable the user set; nested blocks keep the outer block's values.
  - `unavailable(exc)` is True only for failures worth buffering and retrying (no answer, a 5xx/408/429, retries
    exhausted); a request the server answered and rejected, or a local error, is False: the caller raises it.
  - `TrackingUnavailable` is a ConfigError: the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import requests
from mlflow.exceptions import MlflowException, RestException

from dskd.config import ConfigError

# The HTTP settings of the calls a run makes while it trains (metrics, params, tags, text and table artifacts,
# run status; file and model uploads, which may legitimately take long, only for a probing request first):
# MLflow's defaults retry 7 times with exponential backoff, ~4 minutes per call on a dead server. A variable the
# user set wins.
SHORT_HTTP = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false"}
# Uploads (files, models with the requests MLflow's model logging makes around them) keep MLflow's timeout, which
# bounds each read of the server's answer and not the upload (a proxied artifact store answers after it stored the
# file), but never retry: retries are what costs minutes when the server died mid-upload.
UPLOAD_HTTP = {k: v for k, v in SHORT_HTTP.items() if k != "MLFLOW_HTTP_REQUEST_TIMEOUT"}


class TrackingUnavailable(ConfigError):
    """The tracking server cannot be reached when a run opens (a ConfigError: the CLI prints it and exits 2)."""


class StillDown(Exception):
    """A replay stopped because the server cannot be reached; what was not sent stays buffered."""

    def __init__(self, cause: BaseException):
        super().__init__(brief(cause))
        self.cause = cause


@contextmanager
def short_http(settings: dict[str, str] = SHORT_HTTP) -> Iterator[None]:
    """`settings` (`SHORT_HTTP` or `UPLOAD_HTTP`) for the calls inside (MLflow reads these variables on every
    request); nested blocks keep the outer block's values."""
    added = [k for k in settings if k not in os.environ]
    os.environ.update({k: settings[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def unavailable(exc: BaseException) -> bool:
    """True when the tracking server could not be reached or could not answer (worth buffering and retrying);
    False for a request it answered and rejected, and for local errors (a missing file): those still raise."""
    if isinstance(exc, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                        requests.exceptions.Timeout)):
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        server_side = status >= 500 or status in (408, 429)
        if isinstance(exc, RestException):  # the server (or a proxy) answered with an error document
            return server_side
        # MLflow's REST layer wraps transport failures, exhausted retries (urllib3 retries 5xx) and non-JSON
        # error pages as "API request to ... failed with ..." (a 5xx, or the 4xx of the page).
        return str(exc.message).startswith("API request to") and server_side
    return False


def answered(exc: BaseException) -> bool:
    """The server (or a proxy) answered, with an error status: it is reachable."""
    text = str(exc)
    return isinstance(exc, RestException) or "error responses" in text or "failed with error code" in text


def brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 240 else text[:240] + "..."


def probe(client, run_id: str) -> None:
    """A cheap request that fails fast when the server cannot be reached."""
    with short_http():
        client.get_run(run_id)


def raise_if_down(client, run_id: str, exc: BaseException) -> None:
    """Re-raise `exc` if it says the server cannot be reached: at once when nothing answered (a second request
    would only wait again), after a probe when the server answered with an error status (a server that answers
    a probe is up, and the record itself is the problem). Any answer to the probe, even an error, means up."""
    if not unavailable(exc):
        return
    if not answered(exc):
        raise exc
    try:
        probe(client, run_id)
    except Exception as probe_exc:
        if unavailable(probe_exc):
            raise exc from probe_exc
