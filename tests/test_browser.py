"""What a user sees: headless Chromium renders the MLflow UI of a finished sweep and finds its run
names, and the Ray dashboard's job API (with the token) lists the job.

Uses the session's shared services and its finished tiny sweep (``embedded``, ``finished_sweep``
in conftest.py). Chromium is Debian's ``chromium`` ($CHROMIUM overrides it); when it is missing,
scripts/ensure-chromium.sh tries to install it, and the test skips only when that fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENSURE = REPO / "scripts" / "ensure-chromium.sh"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,900"]
# The React app fetches the runs by AJAX after it loads: give it virtual time, more on each try.
BUDGETS_MS = (5_000, 10_000, 20_000, 30_000, 30_000)
DEADLINE_S = 150


def _find_chromium() -> str | None:
    if os.environ.get("CHROMIUM") and os.access(os.environ["CHROMIUM"], os.X_OK):
        return os.environ["CHROMIUM"]
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _find_chromium()
    if path is None and ENSURE.is_file():
        subprocess.run(["bash", str(ENSURE)], timeout=1500, check=False)
        path = _find_chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed and scripts/ensure-chromium.sh could not install it "
                    "(needs root and apt-get); install Debian's `chromium` or set CHROMIUM")
    return path


def _chromium(binary: str, url: str, *, budget_ms: int, timeout: float, out: list[str]) -> str:
    """Run Chromium headless on ``url`` with a fresh profile; return its stdout (the DOM, for
    --dump-dom). The whole process group is killed on timeout: no browser outlives the test."""
    with tempfile.TemporaryDirectory(prefix="mnistjobs-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *out, url]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                start_new_session=True, text=True)
        try:
            dom, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            dom = ""
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        return dom or ""


def _rendered_text(dom: str) -> str:
    """The visible text of a DOM dump: no scripts, styles or tags."""
    text = re.sub(r"<(script|style|noscript)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


def _render_until(binary: str, url: str, wanted: list[str]) -> str:
    """Load ``url`` until the rendered text holds every string in ``wanted`` (bounded retries)."""
    deadline = time.monotonic() + DEADLINE_S
    text = ""
    for budget in BUDGETS_MS:
        left = deadline - time.monotonic()
        if left <= 5:
            break
        text = _rendered_text(_chromium(binary, url, budget_ms=budget, timeout=min(left, 60 + budget / 1000),
                                        out=["--dump-dom"]))
        if all(w in text for w in wanted):
            return text
        time.sleep(1)
    missing = [w for w in wanted if w not in text]
    raise AssertionError(f"Chromium never rendered {missing} at {url}; the page read: {text[:1500]!r}")


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs_of_the_experiment(embedded, finished_sweep, chromium, tmp_path):
    from jobs import tracking

    sweep = finished_sweep
    # The experiment page as `submit` prints it: the app loads and shows the experiment by name.
    page = tracking.experiment_url(embedded.mlflow_url, sweep.experiment_id)
    assert page.endswith(f"/#/experiments/{sweep.experiment_id}/runs?workflowType=machine_learning")
    _render_until(chromium, page, [sweep.experiment])

    # Its runs table. MLflow 3 nests child runs under their (collapsed) parent when sorted by
    # time; sorted by name the table lists every run, so each name must be in the rendered rows.
    query = urllib.parse.urlencode({"orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"})
    runs_page = f"{page}&{query}"
    names = [f"sweep-{sweep.job_id}", *sweep.run_names]
    text = _render_until(chromium, runs_page, names)
    assert sweep.experiment in text
    # A screenshot for whoever debugs a failure (pytest keeps the last few tmp dirs).
    _chromium(chromium, runs_page, budget_ms=10_000, timeout=90, out=[f"--screenshot={tmp_path / 'runs.png'}"])


@pytest.mark.slow
def test_ray_dashboard_job_api_lists_the_job(embedded, finished_sweep):
    from jobs.client import META_EXPERIMENT, META_JOB_ID, SPEC_VAR

    url = f"{embedded.dashboard_url}/api/jobs/"
    with urllib.request.urlopen(urllib.request.Request(url, headers=embedded.headers), timeout=10) as r:
        assert r.status == 200
        jobs = json.load(r)
    mine = [j for j in jobs if j.get("submission_id") == finished_sweep.job_id]
    assert len(mine) == 1, [j.get("submission_id") for j in jobs]
    job = mine[0]
    assert job["status"] == "SUCCEEDED"
    assert f"--job-id {finished_sweep.job_id}" in job["entrypoint"]
    assert job["metadata"][META_JOB_ID] == finished_sweep.job_id
    assert job["metadata"][META_EXPERIMENT] == finished_sweep.experiment
    assert f"--experiment-id {finished_sweep.experiment_id}" in job["entrypoint"]  # created at submit time
    # The spec goes to the job once: in its environment, not again in its metadata.
    assert SPEC_VAR in job["runtime_env"]["env_vars"]
    assert not any("spec" in key for key in job["metadata"])
    # The same API without the token is refused: the dashboard's token authentication is on.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
