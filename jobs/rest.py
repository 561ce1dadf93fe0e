"""Plain-HTTP readers of the Ray job API and of MLflow's REST API, for the commands that must
answer at once (`list`, `status`, `logs`, `cancel`, `queue`).

``import ray.job_submission`` costs about 0.9 s and ``import mlflow`` 1.4-2.9 s on a 2-core
machine, more than everything these commands do. So they talk HTTP with the standard library
(urllib, json) and read back only the fields they print:

- :class:`RayJobs`: the part of ``ray.job_submission.JobSubmissionClient`` they use
  (``list_jobs``, ``get_job_info``, ``get_job_logs``, ``stop_job``) over the dashboard's job REST
  API (``GET /api/jobs/``, ``/api/jobs/<id>``, ``/api/jobs/<id>/logs``, ``POST
  /api/jobs/<id>/stop``), with the cluster's auth headers (``Authorization: Bearer <token>``,
  what Ray's client sends). Errors read as Ray's (``Request failed with status code 404: ...``),
  so ``jobs.client.is_not_found`` works on both; a refused token is a :class:`AuthRefused`.
- :class:`MlflowRest`: the part of ``MlflowClient`` they use (``search_experiments``, the run
  search over all pages, ``get_run``, ``get_metric_history``, ``set_tag``, ``set_terminated``; and
  for the sweep's driver, until its trials run, ``update_run`` and several tags at once)
  over ``/api/2.0/mlflow/...``, with the login MLflow's own client would send
  (MLFLOW_TRACKING_USERNAME / _PASSWORD, set for the embedded server by
  ``jobs.record.use_mlflow_credentials``, or MLFLOW_TRACKING_TOKEN). Runs come back as small
  objects with MLflow's attribute names (``run.info.run_id``, ``.status``, ``.start_time``,
  ``run.data.tags``, ``.params``, ``.metrics``).

Both carry ``lite = True``; :func:`search_all`, :func:`job_runs`, :func:`end_job_runs` and
:func:`trial_rows` take either a lite client or MLflow's own (then they are jobs.tracking's).
:func:`mlflow_reader` falls back to MLflow's own client where plain HTTP would not do what it
does (a non-HTTP tracking URI, TLS or auth-plugin settings in the environment).

Imports neither Ray, MLflow nor torch.
"""
from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from jobs.client import JobUsageError
from jobs.contract import ROLE_TRIAL

TIMEOUT_S = 30.0
PAGE_SIZE = 1000
#: Settings of MLflow's client that plain HTTP here would not honour: with any of them set, the
#: readers use MLflow's own client.
MLFLOW_CLIENT_ONLY_VARS = ("MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                           "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4")


class AuthRefused(JobUsageError):
    """The server refused the credentials sent (401/403): a usage error, exit code 2."""


class HttpFailure(RuntimeError):
    """A request that got an answer other than 200 (``status``) or none (``status`` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def is_lite(client: Any) -> bool:
    return getattr(client, "lite", False) is True


def _request(method: str, url: str, headers: dict[str, str], body: Any = None,
             timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """(status, text) of one request; an HTTP error comes back as its status (no answer: OSError)."""
    data = None
    headers = dict(headers)
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


# ------------------------------------------------------------------------------------- Ray

class RayJob:
    """A job as the dashboard's job API returns it (the fields of Ray's ``JobDetails``)."""

    FIELDS = ("type", "job_id", "submission_id", "driver_info", "status", "entrypoint", "message", "error_type",
              "start_time", "end_time", "metadata", "runtime_env", "driver_agent_http_address",
              "driver_node_id", "driver_exit_code")

    def __init__(self, d: dict[str, Any]):
        for name in self.FIELDS:
            setattr(self, name, d.get(name))

    def __repr__(self) -> str:
        return f"RayJob(submission_id={self.submission_id!r}, status={self.status!r})"


class RayJobs:
    """The dashboard's job REST API: what `list`, `status`, `logs` and `cancel` read and do."""

    lite = True

    def __init__(self, dashboard_url: str, headers: dict[str, str]):
        self.url, self.headers = dashboard_url.rstrip("/"), dict(headers)

    def _do(self, method: str, path: str) -> tuple[int, str]:
        try:
            status, text = _request(method, self.url + path, self.headers)
        except (OSError, ValueError) as exc:
            from jobs.cluster import UnreachableError

            detail = " ".join(str(getattr(exc, "reason", exc)).split())
            raise UnreachableError(f"Cannot use the Ray job API at {self.url}: {detail}") from None
        if status in (401, 403):
            raise AuthRefused(
                f"The Ray dashboard at {self.url} refused the request ({status}: {' '.join(text.split())[:200]}): "
                f"{'no token was sent' if status == 401 else 'the token sent is not its token'}. The embedded "
                f"cluster's token is <home>/ray_auth_token; for another cluster set RAY_AUTH_TOKEN, "
                f"RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")
        return status, text

    def _json(self, method: str, path: str) -> Any:
        status, text = self._do(method, path)
        if status != 200:
            raise RuntimeError(f"Request failed with status code {status}: {text}.")  # Ray's own words
        return json.loads(text)

    def list_jobs(self) -> list[RayJob]:
        return [RayJob(d) for d in self._json("GET", "/api/jobs/")]

    def get_job_info(self, job_id: str) -> RayJob:
        return RayJob(self._json("GET", f"/api/jobs/{urllib.parse.quote(job_id, safe='')}"))

    def get_job_logs(self, job_id: str) -> str:
        return self._json("GET", f"/api/jobs/{urllib.parse.quote(job_id, safe='')}/logs").get("logs", "")

    def stop_job(self, job_id: str) -> bool:
        return bool(self._json("POST", f"/api/jobs/{urllib.parse.quote(job_id, safe='')}/stop").get("stopped"))


# ---------------------------------------------------------------------------------- MLflow

class _Obj:
    def __init__(self, **kw: Any):
        self.__dict__.update(kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__!r})"


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def run_of(d: dict[str, Any]) -> _Obj:
    """An MLflow REST ``Run`` as an object with MlflowClient's attribute names."""
    info, data = d.get("info") or {}, d.get("data") or {}
    return _Obj(
        info=_Obj(run_id=info.get("run_id") or info.get("run_uuid"), run_name=info.get("run_name"),
                  experiment_id=str(info.get("experiment_id")), status=info.get("status"),
                  start_time=_int_or_none(info.get("start_time")), end_time=_int_or_none(info.get("end_time")),
                  lifecycle_stage=info.get("lifecycle_stage"), user_id=info.get("user_id"),
                  artifact_uri=info.get("artifact_uri")),
        data=_Obj(tags={t["key"]: t.get("value", "") for t in data.get("tags") or []},
                  params={p["key"]: p.get("value", "") for p in data.get("params") or []},
                  metrics={m["key"]: float(m["value"]) for m in data.get("metrics") or []}))


class MlflowRest:
    """MLflow's REST API (``/api/2.0/mlflow``) for the fast commands."""

    lite = True

    def __init__(self, tracking_uri: str, headers: dict[str, str] | None = None, *, patience: float = 0.0):
        self.tracking_uri = tracking_uri.rstrip("/")
        self.headers = dict(headers) if headers is not None else login_headers()
        self.patience = patience  # s to retry a server that is away or busy (0: one try, the CLI's way)

    def _send(self, method: str, url: str, body: dict[str, Any] | None) -> tuple[int, str]:
        """One request; with ``patience``, retried with backoff (1, 2, 4 ... 10 s) while the server
        does not answer or answers 429 / 5xx, as MLflow's own client retries (a 4xx is final)."""
        deadline, delay = time.monotonic() + self.patience, 1.0
        while True:
            try:
                status, text = _request(method, url, self.headers, body)
                if status != 429 and status < 500:
                    return status, text
                failure: BaseException | None = None
            except OSError as exc:  # refused, reset, timed out (urllib's URLError is one)
                status, text, failure = 0, "", exc
            if time.monotonic() + delay > deadline:
                if failure is not None:
                    raise failure
                return status, text
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _call(self, endpoint: str, *, body: dict[str, Any] | None = None,
              query: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.tracking_uri}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        status, text = self._send("POST" if body is not None else "GET", url, body)
        if status != 200:  # the words of MLflow's own client
            raise HttpFailure(f"API request to endpoint /api/2.0/mlflow/{endpoint} failed with error code "
                              f"{status} != 200. Response body: '{text[:500]}'", status)
        return json.loads(text) if text.strip() else {}

    def search_experiments(self) -> list[_Obj]:
        """Every active experiment (all pages)."""
        out, token = [], None
        while True:
            page = self._call("experiments/search", body={"max_results": PAGE_SIZE, "view_type": "ACTIVE_ONLY",
                                                          **({"page_token": token} if token else {})})
            out += [_Obj(experiment_id=str(e["experiment_id"]), name=e.get("name", ""),
                         lifecycle_stage=e.get("lifecycle_stage")) for e in page.get("experiments") or []]
            token = page.get("next_page_token")
            if not token:
                return out

    def search_all(self, experiment_ids: list[str], filter_string: str = "") -> list[_Obj]:
        """Every active run of ``experiment_ids`` matching ``filter_string`` (the server's order)."""
        if not experiment_ids:
            return []
        out, token = [], None
        while True:
            body = {"experiment_ids": [str(e) for e in experiment_ids], "filter": filter_string,
                    "run_view_type": "ACTIVE_ONLY", "max_results": PAGE_SIZE}
            if token:
                body["page_token"] = token
            page = self._call("runs/search", body=body)
            out += [run_of(r) for r in page.get("runs") or []]
            token = page.get("next_page_token")
            if not token:
                return out

    def get_run(self, run_id: str) -> _Obj:
        return run_of(self._call("runs/get", query={"run_id": run_id})["run"])

    def get_metric_history(self, run_id: str, key: str) -> list[_Obj]:
        out, token = [], None
        while True:
            page = self._call("metrics/get-history", query={"run_id": run_id, "metric_key": key,
                                                            "max_results": 25000, "page_token": token})
            out += [_Obj(key=m.get("key", key), value=float(m["value"]), timestamp=int(m.get("timestamp", 0)),
                         step=int(m.get("step", 0))) for m in page.get("metrics") or []]
            token = page.get("next_page_token")
            if not token:
                return out

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self._call("runs/set-tag", body={"run_id": run_id, "key": key, "value": str(value)})

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Several tags in one request (``runs/log-batch``, as ``MlflowClient.log_batch(tags=...)``)."""
        if tags:
            self._call("runs/log-batch", body={"run_id": run_id,
                                               "tags": [{"key": k, "value": str(v)} for k, v in tags.items()]})

    def update_run(self, run_id: str, status: str | None = None) -> None:
        """``MlflowClient.update_run``: the run's status (no end time: RUNNING, SCHEDULED)."""
        self._call("runs/update", body={"run_id": run_id, "run_uuid": run_id,
                                        **({"status": status} if status else {})})

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._call("runs/update", body={"run_id": run_id, "status": status or "FINISHED",
                                        "end_time": end_time or int(time.time() * 1000)})


def login_headers() -> dict[str, str]:
    """The HTTP auth MLflow's own client sends from the environment: Basic from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, else Bearer MLFLOW_TRACKING_TOKEN."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def mlflow_reader(tracking_uri: str | None, *, patience: float = 0.0):
    """A :class:`MlflowRest` for an http(s) tracking URI (with this process's MLflow login for it,
    as ``jobs.tracking.client`` sets it), else MLflow's own client. ``patience``: how long the
    plain-HTTP one retries a server that is away (the sweep's driver: as long as MLflow's client
    would); the CLI's commands try once."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if not uri or not uri.startswith(("http://", "https://")) or any(os.environ.get(v) for v in MLFLOW_CLIENT_ONLY_VARS):
        from jobs import tracking

        return tracking.client(uri)
    from jobs.record import use_mlflow_credentials

    use_mlflow_credentials(uri)
    return MlflowRest(uri, patience=patience)


# -------------------------------------------------- the readers, for either kind of client

def experiments(mlf) -> dict[str, str]:
    """{experiment id: name} of every active experiment."""
    if is_lite(mlf):
        return {e.experiment_id: e.name for e in mlf.search_experiments()}
    from mlflow.entities import ViewType

    return {e.experiment_id: e.name for e in mlf.search_experiments(view_type=ViewType.ACTIVE_ONLY)}


def search_all(mlf, experiment_ids: list[str], filter_string: str = "") -> list:
    if is_lite(mlf):
        return mlf.search_all(experiment_ids, filter_string)
    from jobs.mlflow_runs import search_all as search

    return search(mlf, experiment_ids, filter_string)


def job_runs(mlf, job_id: str, role: str | None = None, experiment_ids: list[str] | None = None) -> list:
    """``jobs.tracking.job_runs`` for either client."""
    if not is_lite(mlf):
        from jobs.mlflow_runs import job_runs as runs

        return runs(mlf, job_id, role=role, experiment_ids=experiment_ids)
    from jobs.mlflow_runs import job_filter

    if experiment_ids is None:
        experiment_ids = list(experiments(mlf))
    return mlf.search_all(experiment_ids, job_filter(job_id, role))


def end_job_runs(mlf, job_id: str, status: str = "KILLED", experiment_ids: list[str] | None = None,
                 role: str | None = None) -> int:
    """``jobs.tracking.end_job_runs`` for either client."""
    if not is_lite(mlf):
        from jobs import tracking

        return tracking.end_job_runs(mlf, job_id, status, experiment_ids=experiment_ids, role=role)
    n = 0
    for run in job_runs(mlf, job_id, role=role, experiment_ids=experiment_ids):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            mlf.set_terminated(run.info.run_id, status)
            n += 1
    return n


def trial_rows(mlf, job_id: str) -> list[dict[str, Any]]:
    """``jobs.tracking.trial_rows`` (the trial table of `status JOB`) for either client: the same
    rows, built by that function from this module's run search."""
    from jobs import tracking

    return tracking.trial_rows(mlf, job_id, runs=job_runs(mlf, job_id, role=ROLE_TRIAL))


__all__ = ["RayJobs", "RayJob", "MlflowRest", "AuthRefused", "HttpFailure", "is_lite", "mlflow_reader",
           "login_headers", "experiments", "search_all", "job_runs", "end_job_runs", "trial_rows"]
