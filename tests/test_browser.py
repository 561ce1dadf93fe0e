"""What a user sees: headless Chromium renders the MLflow UI of a finished sweep and finds its run
names, and the Ray dashboard's job API (with the token) lists the job.

The embedded MLflow server runs MLflow's basic-auth app, so the browser logs in: Chromium is
driven over the DevTools protocol (``--remote-debugging-pipe``: JSON messages on fds 3 and 4,
no extra package) and sends the HTTP Basic ``Authorization`` header with every request
(``Network.setExtraHTTPHeaders``), as a browser does once the user typed the login. Credentials
in the URL (``http://admin:PW@host/``) do not work: the page loads, but the UI's own
``fetch("ajax-api/...")`` calls are then refused by Chromium ("Request cannot be constructed
from a URL that includes credentials"). Without the login the page is MLflow's 401.

Uses the session's shared services and its finished tiny sweep (``embedded``, ``finished_sweep``
in conftest.py). Chromium is Debian's ``chromium`` ($CHROMIUM overrides it); when it is missing,
scripts/ensure-chromium.sh tries to install it, and the test skips only when that fails.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
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
# The React app fetches the runs by AJAX after it loads: the page's text is read until it holds
# what is wanted, for at most this long.
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


class DevTools:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (Chromium reads commands on its
    fd 3 and writes answers on fd 4, each a JSON text ended by a NUL byte)."""

    def __init__(self, binary: str, profile: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Copies above 10, so that placing them on 3 and 4 in the child cannot clobber each other.
        hi_r, hi_w = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)

        def place_fds():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=place_fds,
                                     pass_fds=(3, 4, hi_r, hi_w))
        for fd in (to_chrome_r, from_chrome_w, hi_r, hi_w):
            os.close(fd)
        self._buf, self._next_id, self.session = b"", 0, None

    def call(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 30) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, left))
                if not ready:
                    raise AssertionError(f"Chromium did not answer {method} within {timeout:.0f} s")
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise AssertionError(f"Chromium closed its DevTools pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:  # anything else is an event
                if "error" in answer:
                    raise AssertionError(f"Chromium refused {method}: {answer['error']}")
                return answer.get("result", {})

    def open_page(self, headers: dict[str, str]) -> None:
        """Attach to a new tab that sends ``headers`` with each of its requests."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.call("Network.enable")
        self.call("Network.setExtraHTTPHeaders", {"headers": headers})
        self.call("Page.enable")

    def text(self) -> str:
        result = self.call("Runtime.evaluate", {"expression": "document.body ? document.body.innerText : ''",
                                                "returnByValue": True})
        return str(result.get("result", {}).get("value") or "")

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except (AssertionError, OSError):
            pass
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()


def _render_logged_in(binary: str, url: str, wanted: list[str], headers: dict[str, str],
                      screenshot: Path | None = None) -> str:
    """Open ``url`` in a tab that sends ``headers`` (the login), until its visible text holds
    every string in ``wanted``; then save a screenshot when asked. Returns the text."""
    with tempfile.TemporaryDirectory(prefix="mnistjobs-chromium-") as profile:
        browser = DevTools(binary, profile)
        try:
            browser.open_page(headers)
            browser.call("Page.navigate", {"url": url})
            deadline = time.monotonic() + DEADLINE_S
            text = ""
            while time.monotonic() < deadline:
                text = browser.text()
                if all(w in text for w in wanted):
                    break
                time.sleep(1)
            else:
                missing = [w for w in wanted if w not in text]
                raise AssertionError(f"Chromium never rendered {missing} at {url}; the page read: {text[:1500]!r}")
            if screenshot is not None:
                shot = browser.call("Page.captureScreenshot", {"format": "png"})
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return text
        finally:
            browser.close()


def _rendered_text(dom: str) -> str:
    """The visible text of a DOM dump: no scripts, styles or tags."""
    text = re.sub(r"<(script|style|noscript)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs_of_the_experiment(embedded, finished_sweep, chromium, tmp_path):
    from jobs import tracking

    sweep = finished_sweep
    # The experiment page as `submit` prints it: the app loads and shows the experiment by name.
    page = tracking.experiment_url(embedded.mlflow_url, sweep.experiment_id)
    assert page.endswith(f"/#/experiments/{sweep.experiment_id}/runs?workflowType=machine_learning")
    login = embedded.mlflow_headers
    assert login, "the embedded MLflow server runs without its basic-auth app"
    _render_logged_in(chromium, page, [sweep.experiment], login)

    # Its runs table. MLflow 3 nests child runs under their (collapsed) parent when sorted by
    # time; sorted by name the table lists every run, so each name must be in the rendered rows.
    query = urllib.parse.urlencode({"orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"})
    runs_page = f"{page}&{query}"
    names = [f"sweep-{sweep.job_id}", *sweep.run_names]
    # A screenshot for whoever debugs a failure (pytest keeps the last few tmp dirs).
    text = _render_logged_in(chromium, runs_page, names, login, screenshot=tmp_path / "runs.png")
    assert sweep.experiment in text
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Without the login the browser gets MLflow's 401 and no run name.
    dom = _rendered_text(_chromium(chromium, runs_page, budget_ms=5_000, timeout=60, out=["--dump-dom"]))
    assert not any(name in dom for name in names), dom[:500]


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
