"""PostgreSQL, for real: a throwaway PostgreSQL 15 server (Debian's `postgresql` package: initdb
and pg_ctl in a temp folder, as the unprivileged `postgres` user when we are root: PostgreSQL
refuses to run as root), the embedded MLflow server on it (the backend_store_uri of an
mlflow/server.yaml-style settings file, basic-auth on as by default), a 2-trial sweep submitted
through the CLI (through the queue), and the runs, their metrics and (once trials register
their models) the registered models and their @best alias read back from PostgreSQL itself with
psycopg2.

Skips with the reason when PostgreSQL's binaries or psycopg2 (`pip install .[postgres]`) are
missing; `make test` and .ci/run install the package (scripts/ensure-postgresql.sh).
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from _service_helpers import TINY, job_id_of, mlflow_client, run_cli

PG_VERSION = "15"


def _pg_bin() -> Path | None:
    """PostgreSQL 15's bin folder (else the newest installed one), or None."""
    preferred = Path(f"/usr/lib/postgresql/{PG_VERSION}/bin")
    if (preferred / "initdb").is_file():
        return preferred
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_db_user() -> list[str]:
    """The command prefix that runs PostgreSQL as an unprivileged user: `runuser -u postgres --`
    when we are root, nothing otherwise."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as "
                    "(Debian's postgresql package creates it: apt-get install postgresql)")
    runuser = shutil.which("runuser")
    return [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]


def _run(prefix: list[str], cmd: list[str], **kw) -> subprocess.CompletedProcess:
    if prefix[:1] == ["su"]:
        import shlex

        cmd = [shlex.join(cmd)]
    out = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, **kw)
    assert out.returncode == 0, f"{cmd[0]} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def postgres():
    """A running throwaway PostgreSQL with an empty database `mlflow`; yields its URI."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH); "
                    "`make test` installs Debian's postgresql package (scripts/ensure-postgresql.sh)")
    psycopg2 = pytest.importorskip("psycopg2", reason="the PostgreSQL driver is the optional extra: "
                                                      "pip install '.[postgres]' (psycopg2-binary)")
    from jobs.services import free_port

    prefix = _as_db_user()
    root = Path(tempfile.mkdtemp(prefix="mnistjobs-pg-"))
    if prefix:  # the folder must belong to the user PostgreSQL runs as
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
    root.chmod(0o700)
    data, password = root / "data", secrets.token_hex(12)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if prefix:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    port = free_port()
    _run(prefix, [str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", f"--pwfile={pwfile}",
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8"])
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    _run(prefix, [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60",
                  "start"])
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", password=password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield {"uri": f"postgresql+psycopg2://mlflow:{password}@127.0.0.1:{port}/mlflow", "port": port,
               "password": password, "version": (bindir / "..").resolve().name}
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _query(pg, sql: str, *args) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=pg["port"], user="mlflow", password=pg["password"],
                            dbname="mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.slow
def test_a_sweep_on_postgresql(postgres, synthetic_dir, tmp_path):
    from jobs import services
    from jobs.contract import ROLE_TRIAL, TAG_JOB, TAG_ROLE

    home = tmp_path / "home"
    settings = tmp_path / "server.yaml"
    settings.write_text(f'backend_store_uri: "{postgres["uri"]}"\n'
                        'artifacts_destination: "{home}/mlflow/artifacts"\n')
    rec = services.up(home, ray_port=0, dashboard_port=0, mlflow_port=0, num_cpus=2, mlflow_settings=settings)
    try:
        assert rec.mlflow_user  # basic-auth stays on (its own users' database is SQLite in the state folder)
        assert "--backend-store-uri" in rec.mlflow_command
        assert rec.mlflow_command[rec.mlflow_command.index("--backend-store-uri") + 1] == postgres["uri"]
        experiment = "pg-sweep"
        result = run_cli(["submit", "--models", "v0,v2", "--epochs", 1, *TINY, "--data-dir", synthetic_dir,
                          "--experiment", experiment, "--wait"], home=home)
        assert result.exit_code == 0, result.output
        job = job_id_of(result.output)
        help_text = run_cli(["submit", "--help"]).output
        registers = "--no-register" in help_text
        mlf = mlflow_client(rec)  # the server's view, for comparison with the database's
        exp = mlf.get_experiment_by_name(experiment)
        assert exp is not None
    finally:
        services.down(home, grace=3.0)
        left = services.service_pids(rec)
        shutil.rmtree(rec.temp_dir, ignore_errors=True)
    assert not left, f"processes left running after down(): {sorted(left)}"
    assert not (home / "mlflow" / "mlflow.db").exists()  # nothing went to the SQLite default

    # Straight from PostgreSQL: the experiment, the job's runs, FINISHED, with their metrics.
    assert _query(postgres, "SELECT name FROM experiments WHERE experiment_id = %s", int(exp.experiment_id)) == [
        (experiment,)]
    runs = _query(postgres, "SELECT r.run_uuid, r.name, r.status, role.value FROM runs r "
                            "JOIN tags j ON j.run_uuid = r.run_uuid AND j.key = %s AND j.value = %s "
                            "JOIN tags role ON role.run_uuid = r.run_uuid AND role.key = %s "
                            "WHERE r.experiment_id = %s ORDER BY r.name",
                  TAG_JOB, job, TAG_ROLE, int(exp.experiment_id))
    trials = [r for r in runs if r[3] == ROLE_TRIAL]
    assert sorted(r[1] for r in trials) == ["v0-cosine-s1", "v2-cosine-s1"], runs
    assert len(runs) == 3 and all(r[2] == "FINISHED" for r in runs), runs  # the sweep's run and its trials
    for run_uuid, name, _, _ in trials:
        acc = _query(postgres, "SELECT value, step FROM metrics WHERE run_uuid = %s AND key = 'test_acc' "
                               "ORDER BY step", run_uuid)
        assert acc and acc[-1][1] == 1 and 0.0 <= acc[-1][0] <= 100.0, (name, acc)
        assert _query(postgres, "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train_loss'",
                      run_uuid)[0][0] >= 1
        params = dict(_query(postgres, "SELECT key, value FROM params WHERE run_uuid = %s", run_uuid))
        assert params.get("epochs") == "1", params

    # The registry (once trials log and register their models: `submit --no-register` exists).
    models = _query(postgres, "SELECT name FROM registered_models WHERE name LIKE 'mnistjobs-%%' ORDER BY name")
    if not registers:  # said in the output (-rA / -s); the runs and metrics above were checked
        print(f"\nruns and metrics are in PostgreSQL {postgres['version']}; the registry part waits for trials "
              f"to register their models (no `submit --no-register` yet; registered: {models})")
        return
    assert [m[0] for m in models] == ["mnistjobs-v0", "mnistjobs-v2"], models
    for (name,) in models:
        versions = _query(postgres, "SELECT version, run_id FROM model_versions WHERE name = %s", name)
        alias = _query(postgres, "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'best'",
                       name)
        assert alias and alias[0][0] in [v for v, _ in versions], (name, versions, alias)
        assert {run for _, run in versions} <= {t[0] for t in trials}, (name, versions)
