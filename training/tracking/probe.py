"""Is the tracking store there? One short request, without MLflow's retries (seven, about four minutes)."""

from __future__ import annotations

from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def unreachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the store at `uri` cannot be reached, or None when it answers. An `mlflow server` (http, https) is
    asked for `/health`; any answer below 500 counts (a proxy asking to log in is there). Local stores
    (sqlite, file) and hosted ones (databricks) are not probed: their failures are quick and explicit."""
    if urlparse(uri).scheme not in ("http", "https"):
        return None
    import requests

    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.ConnectionError as err:
        text = str(err)
        if "Name or service not known" in text or "nodename nor servname" in text or "resolve" in text:
            return "host not found"
        return "connection refused" if "refused" in text else "cannot connect"
    except requests.RequestException as err:
        return type(err).__name__
    return f"HTTP {answer.status_code}" if answer.status_code >= 500 else None


def require_tracking(uri: str) -> None:
    """Fail before any work when the store is down: one line naming it and the two ways out."""
    from training.errors import UserError

    reason = unreachable(uri)
    if reason:
        raise UserError(
            f"MLflow tracking server {uri} is not reachable ({reason}); run with tracking=false, "
            "or set MLFLOW_TRACKING_URI to a reachable server"
        )
