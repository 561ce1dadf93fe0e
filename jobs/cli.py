"""The `mnistjobs` command line: one click group, one command per verb.

Commands that need Ray or MLflow import them lazily, so `mnistjobs models` and
`mnistjobs --help` start fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UsageFailure(click.ClickException):
    """A bad input: printed as one paragraph, exit code 2, nothing created."""

    exit_code = 2


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="mnistjobs")
def main() -> None:
    """mnistjobs: sweeps of compact MNIST CNNs as Ray jobs, tracked in MLflow.

    \b
    Quick start:
      mnistjobs submit --models all --wait   # a sweep on the embedded local Ray + MLflow
      mnistjobs compare                      # side-by-side epoch table from MLflow
      mnistjobs train --model v0             # one run in the foreground, no Ray, no MLflow
    """


# --- shared options ---------------------------------------------------------

def recipe_options(func):
    """The training-recipe options shared by `train` and `submit`.

    Defaults come from mnistnets.train (TrainConfig's defaults, MODEL_RECIPES' per-model settings),
    the one place the recipe lives; the "[default: ...]" texts below repeat them for --help without
    importing torch, and tests/test_cli_train.py checks that they agree. Each option's value reaches the command as a keyword of the same name
    (batch_size, optimizer, lr, ...), None meaning "the recipe's default".
    """
    options = [
        click.option("--epochs", type=int, default=None, help="Epochs per run  [default: 15]"),
        click.option("--batch-size", type=int, default=None, help="Training batch size  [default: 128; v0: 64]"),
        click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default=None,
                     help="Optimizer  [default: sgd, Nesterov momentum 0.9]"),
        click.option("--lr", type=float, default=None,
                     help="Base learning rate (the peak of the default onecycle); a schedule's max_lr overrides it  "
                          "[default: 0.1; v2: 0.3]"),
        click.option("--momentum", type=float, default=None, help="SGD momentum  [default: 0.9]"),
        click.option("--weight-decay", type=float, default=None, help="Weight decay  [default: 1e-4; v0: 5e-4, v2: 5e-5]"),
        click.option("--label-smoothing", type=float, default=None, help="Label smoothing  [default: 0; v0: 0.05]"),
        click.option("--dropout", type=float, default=None,
                     help="Rate of every Dropout2d layer (v1-v3)  [default: the model's own; v2: 0]"),
        click.option("--augment/--no-augment", default=None,
                     help="Random affine augmentation of training batches  [default: on]"),
        click.option("--clean-epochs", type=int, default=None, metavar="N",
                     help="Train the last N epochs on un-augmented images  [default: 0; v2: 2]"),
        click.option("--ema", type=float, default=None, metavar="DECAY",
                     help="Evaluate (and checkpoint) an exponential moving average of the weights "
                          "with this decay per step; 0 turns it off  [default: 0; v0, v2: 0.999]"),
        click.option("--tta", type=click.Choice(["none", "shift4", "shift8"]), default=None,
                     help="After the last epoch, also report test accuracy with test-time augmentation: "
                          "the mean prediction over the image and its 4 or 8 one-pixel shifts "
                          "(metric tta_test_acc)  [default: shift8]"),
        click.option("--train-limit", type=int, default=None, help="Train on the first N images only"),
        click.option("--test-limit", type=int, default=None, help="Test on the first N images only"),
        click.option("--data-dir", type=click.Path(file_okay=False), envvar="MNISTJOBS_DATA_DIR",
                     default=None, help="Folder with the four MNIST IDX files (.gz or raw)  "
                     "[env: MNISTJOBS_DATA_DIR; default: download once into the state folder]"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def recipe_overrides(**values) -> dict:
    """Map recipe option values (None = unset) to TrainConfig fields."""
    return {k: v for k, v in values.items() if v is not None}


home_option = click.option(
    "--home", type=click.Path(file_okay=False), envvar="MNISTJOBS_HOME", default=None,
    help="State folder for data, services, runs  [env: MNISTJOBS_HOME; default: ./.mnistjobs]")


# --- service commands begin
# submit, status, list, logs, cancel, resume, up, down: the job queue on Ray's job API, the
# embedded local Ray + MLflow (jobs.services), the sweep spec (jobs.spec), MLflow (jobs.tracking).

address_option = click.option(
    "--address", envvar="RAY_ADDRESS", default=None, metavar="URL",
    help="Ray dashboard (job API) address of a running cluster, e.g. http://head:8265, as for "
         "`ray job submit`; its token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
         "~/.ray/auth_token  [env: RAY_ADDRESS; default: the embedded local Ray of --home]")
tracking_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
    help="MLflow tracking server the jobs log to  [env: MLFLOW_TRACKING_URI; default: the "
         "embedded MLflow server of --home]")
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def _svc_call(func, *args, **kwargs):
    """Run a jobs.services call, mapping its errors to exit codes (2: bad input, 1: runtime)."""
    from jobs import services
    from jobs.cluster import UnreachableError

    try:
        return func(*args, **kwargs)
    except (services.PortInUseError, UnreachableError) as exc:
        raise UsageFailure(str(exc)) from None
    except services.ServiceError as exc:
        raise click.ClickException(str(exc)) from None


def _svc_connect(address, tracking_uri, home, *, start):
    from jobs import cluster as clusters

    def log(msg):
        click.echo(msg, err=True)

    cluster = _svc_call(clusters.connect, address, tracking_uri, home, start=start, log=log)
    if start and cluster.embedded and cluster.services is not None and not cluster.services.reused:
        click.echo(f"Started the embedded services in {cluster.services.home}: Ray dashboard "
                   f"{cluster.services.dashboard_url}, MLflow {cluster.services.mlflow_url}", err=True)
    return cluster


def _svc_job_info(client, cluster, job_id):
    """The Ray job's info; an unknown id is a usage error."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc).lower() or "not found" in str(exc).lower():
            raise UsageFailure(f"No job {job_id!r} on the Ray cluster at {cluster.dashboard_url}. "
                               f"`mnistjobs list` shows the jobs there.") from None
        raise click.ClickException(f"Cannot read job {job_id}: {exc}") from None


def _svc_status_text(info) -> str:
    return str(getattr(info.status, "value", info.status))


def _svc_when(ms) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _svc_duration(info) -> str:
    import time as _time

    if not info.start_time:
        return "-"
    end = info.end_time or _time.time() * 1000
    seconds = int((end - info.start_time) / 1000)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _svc_urls(cluster, info) -> list[str]:
    from jobs import tracking

    lines = [f"  Ray dashboard: {cluster.dashboard_url}/#/jobs/{info.submission_id}"]
    meta = info.metadata or {}
    uri = cluster.tracking_uri or meta.get("mnistjobs.tracking_uri")
    if uri and meta.get("mnistjobs.experiment_id"):
        lines.append(f"  MLflow:        {tracking.experiment_url(uri, meta['mnistjobs.experiment_id'])}")
    return lines


def _svc_trial_table(cluster, info) -> str | None:
    """The job's trials from MLflow (None when MLflow cannot be read)."""
    from jobs import tracking

    meta = info.metadata or {}
    uri = cluster.tracking_uri or meta.get("mnistjobs.tracking_uri")
    if not uri:
        return None
    try:
        rows = tracking.trial_rows(tracking.client(uri), meta.get("mnistjobs.job_id", info.submission_id))
    except Exception as exc:  # noqa: BLE001 - the table is informative only
        return f"  (MLflow at {uri} could not be read: {type(exc).__name__})"
    if not rows:
        return "  (no trial runs in MLflow yet)"
    width = max(len("trial"), *(len(r["name"] or "") for r in rows))
    lines = [f"  {'trial':<{width}}  {'status':<8}  {'epoch':>7}  {'test_acc':>8}  {'best':>6}  device"]
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"  {r['name']:<{width}}  {r['status']:<8}  {str(r['epoch']) + '/' + str(r['epochs']):>7}  "
                     f"{fmt(r['test_acc']):>8}  {fmt(r['best_acc']):>6}  {r['device'] or '-'}")
    return "\n".join(lines)


def _svc_follow(client, cluster, job_id, *, show_logs=True, poll=1.0):
    """Print the job's log as it grows until the job ends; return the final JobInfo."""
    import time as _time

    shown = 0
    while True:
        info = _svc_job_info(client, cluster, job_id)
        if show_logs:
            try:
                text = client.get_job_logs(job_id)
            except RuntimeError:
                text = ""
            if len(text) > shown:
                click.echo(text[shown:], nl=False)
                shown = len(text)
        if _svc_status_text(info) in TERMINAL_JOB_STATES:
            return info
        _time.sleep(poll)


def _svc_submit(client, cluster, spec, job_id, *, resume_of=None, ray_job_id=None):
    """Queue the sweep driver as a Ray job; return the submission id."""
    import shlex
    import sys as _sys

    from jobs import tracking

    uri = cluster.tracking_uri
    mlf = tracking.client(uri)
    experiment_id = tracking.get_or_create_experiment(mlf, spec.experiment)
    ray_job_id = ray_job_id or job_id
    python = _sys.executable if cluster.embedded else "python"
    entrypoint = (f"{shlex.quote(python)} -m jobs.sweep --job-id {shlex.quote(job_id)} "
                  f"--ray-job-id {shlex.quote(ray_job_id)}" + (" --resume" if resume_of else ""))
    env = {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", "MNISTJOBS_SPEC": spec.to_json()}
    if cluster.embedded and cluster.services is not None:
        env["MNISTJOBS_HOME"] = cluster.services.home
    metadata = {"mnistjobs.job_id": job_id, "mnistjobs.spec": spec.to_json(),
                "mnistjobs.summary": spec.summary(), "mnistjobs.experiment": spec.experiment,
                "mnistjobs.experiment_id": str(experiment_id), "mnistjobs.tracking_uri": uri}
    if resume_of:
        metadata["mnistjobs.resume_of"] = resume_of
    return client.submit_job(entrypoint=entrypoint, submission_id=ray_job_id,
                             runtime_env={"env_vars": env}, metadata=metadata)


def _svc_wait(client, cluster, ray_job_id):
    info = _svc_follow(client, cluster, ray_job_id)
    table = _svc_trial_table(cluster, info)
    if table:
        click.echo(table)
    status = _svc_status_text(info)
    if status != "SUCCEEDED":
        raise click.ClickException(f"Job {ray_job_id} ended {status}"
                                   + (f": {info.message}" if info.message else "")
                                   + ". Trials that failed are FAILED in MLflow; `mnistjobs resume "
                                   f"{ray_job_id}` continues the unfinished ones from their checkpoints.")
    click.echo(f"Job {ray_job_id} SUCCEEDED: every trial finished.")


@main.command("submit", context_settings=CONTEXT_SETTINGS)
@click.option("--models", multiple=True, metavar="NAMES",
              help="Models: 'all' or names separated by commas, e.g. v0,v2 (repeatable)  [default: all]")
@click.option("--schedules", multiple=True, metavar="SPECS",
              help="LR schedule specs, one grid axis: e.g. 'onecycle:max_lr=0.05,pct_start=0.2' "
                   "(repeat the option, or separate specs with ';' or a comma before the next "
                   "name: 'cosine,step:step_size=6')  [default: the recipe's onecycle]")
@click.option("--seeds", type=int, default=None, help="Seeds per (model, schedule): N runs seeds 1..N  [default: 1]")
@recipe_options
@click.option("--gpus-per-trial", type=float, default=None, metavar="FRACTION",
              help="Fraction of a GPU per trial, 0-1; 0.25 lets four trials share a GPU  "
                   "[default: 0.25 when the cluster has GPUs, else 0]")
@click.option("--cpus-per-trial", type=float, default=None, help="CPUs per trial  [default: 1]")
@click.option("--max-concurrent", type=int, default=None,
              help="At most this many trials at once (0: as many as resources allow)  [default: 0]")
@click.option("--max-failures", type=int, default=None,
              help="Retries of a failed trial from its last checkpoint (-1: forever)  [default: 2]")
@click.option("--experiment", default=None, metavar="NAME", help="MLflow experiment  [default: mnistjobs]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, metavar="YAML",
              help="Sweep spec file with the same settings (models, schedules, seeds, epochs, ..., and "
                   "`train:` for other recipe settings); options given here override it.")
@click.option("--dry-run", is_flag=True, help="Validate and print the trial table; submit nothing.")
@click.option("--wait", is_flag=True,
              help="Follow the job's log to its end; exit 1 unless every trial finished.")
@address_option
@tracking_option
@home_option
def submit(models, schedules, seeds, gpus_per_trial, cpus_per_trial, max_concurrent, max_failures,
           experiment, config_file, dry_run, wait, address, tracking_uri, home, **recipe):
    """Submit a sweep: one Ray Tune trial per (model, schedule, seed), tracked in MLflow.

    The spec is validated first: an unknown model, a bad schedule, epochs < 1, a GPU fraction
    outside 0-1 and the like exit with code 2 and create nothing. With no --address, the
    embedded local Ray head and MLflow server of the state folder are started (or reused).
    The job goes to Ray's job queue; `submit` prints its id, the dashboard URL and the MLflow
    experiment URL, and returns (or follows the job with --wait).

    \b
    Each trial trains with mnistnets.train.fit, logs params, per-epoch metrics (step = epoch)
    and artifacts (layer table, checkpoints, accuracy/loss plots) to its own MLflow run named
    like v2-onecycle-s1, and is retried from its last checkpoint if it fails.

    \b
    Examples:
      mnistjobs submit --models all --wait
      mnistjobs submit --models v0,v2 --schedules 'onecycle:max_lr=0.05' --schedules cosine --seeds 3
      mnistjobs submit --config sweep.yaml --epochs 20 --dry-run
    """
    from jobs.spec import SpecError, SweepSpec, format_trial_table
    from mnistnets.data import DataError

    train_keys = ("lr", "momentum", "weight_decay", "label_smoothing", "dropout", "clean_epochs", "ema", "tta")
    train = {k: recipe.pop(k) for k in train_keys if recipe.get(k) is not None}
    for k in train_keys:
        recipe.pop(k, None)
    try:
        spec = SweepSpec.from_yaml(config_file) if config_file else SweepSpec()
        spec.update({"models": list(models) or None, "schedules": list(schedules) or None, "seeds": seeds,
                     "gpus_per_trial": gpus_per_trial, "cpus_per_trial": cpus_per_trial,
                     "max_concurrent": max_concurrent, "max_failures": max_failures,
                     "experiment": experiment, "train": train or None, **recipe})
        if spec.data_dir and not address:
            spec.data_dir = str(Path(spec.data_dir).expanduser().resolve())
        spec.validate()
    except SpecError as exc:
        raise UsageFailure(str(exc)) from None
    if not address and spec.data_dir:
        from jobs.datadir import load_data

        try:
            load_data(spec.data_dir, train_limit=1, test_limit=1)
        except DataError as exc:
            raise UsageFailure(str(exc)) from None
    if dry_run:
        click.echo(f"Dry run, nothing submitted. {spec.summary()}, experiment {spec.experiment!r}:")
        click.echo(format_trial_table(spec))
        return
    if address and not tracking_uri:
        from jobs import cluster as clusters, services

        rec = services.load_record(home)
        if rec is None or rec.dashboard_url.rstrip("/") != clusters.dashboard_url_of(address):
            raise UsageFailure("With --address (RAY_ADDRESS), give --tracking-uri (MLFLOW_TRACKING_URI): "
                               "the MLflow server that the cluster's workers can reach.")
    from jobs import cluster as clusters

    if tracking_uri:
        _svc_call(clusters.check_tracking_uri, tracking_uri)
    cluster = _svc_connect(address, tracking_uri, home, start=True)
    client = _svc_call(clusters.job_client, cluster)
    import secrets

    job_id = f"mj-{secrets.token_hex(4)}"
    ray_job_id = _svc_submit(client, cluster, spec, job_id)
    info = _svc_job_info(client, cluster, ray_job_id)
    click.echo(f"Submitted job {ray_job_id}: {spec.summary()}")
    for line in _svc_urls(cluster, info):
        click.echo(line)
    if not wait:
        click.echo(f"  Follow it:     mnistjobs logs {ray_job_id} --follow   (or: mnistjobs status {ray_job_id})")
        return
    _svc_wait(client, cluster, ray_job_id)


@main.command("status", context_settings=CONTEXT_SETTINGS)
@click.argument("job", required=False)
@address_option
@tracking_option
@home_option
def status_cmd(job, address, tracking_uri, home):
    """Show a job (its state and a table of its trials from MLflow), or, with no JOB, the
    embedded services and the jobs on the cluster."""
    from jobs import cluster as clusters, services

    if job is None and not address:
        st = services.status(home)
        if st["ray"] is None:
            click.echo(f"Embedded services of {st['home']}: not running (start them with `mnistjobs up`).")
            return
        click.echo(f"Embedded services of {st['home']}:")
        click.echo(f"  Ray:    {'running' if st['ray']['running'] else 'NOT ANSWERING'}  "
                   f"dashboard {st['ray']['dashboard_url']}  (GCS {st['ray']['address']})")
        click.echo(f"  MLflow: {'running' if st['mlflow']['running'] else 'NOT ANSWERING'}  {st['mlflow']['url']}")
        if not st["running"]:
            return
    cluster = _svc_connect(address, tracking_uri, home, start=False)
    client = _svc_call(clusters.job_client, cluster)
    if job is None:
        _svc_print_jobs(client)
        return
    info = _svc_job_info(client, cluster, job)
    meta = info.metadata or {}
    click.echo(f"Job {job}: {_svc_status_text(info)}  (submitted {_svc_when(info.start_time)}, "
               f"{_svc_duration(info)})" + (f"  {meta['mnistjobs.summary']}" if "mnistjobs.summary" in meta else ""))
    if info.message and _svc_status_text(info) != "RUNNING":
        click.echo(f"  {info.message}")
    for line in _svc_urls(cluster, info):
        click.echo(line)
    table = _svc_trial_table(cluster, info)
    if table:
        click.echo(table)


def _svc_print_jobs(client):
    jobs_ = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs_:
        click.echo("No jobs.")
        return
    click.echo(f"{'job':<18} {'status':<10} {'submitted':<19}  {'time':>8}  sweep")
    for j in jobs_:
        meta = j.metadata or {}
        what = meta.get("mnistjobs.summary") or (j.entrypoint or "")[:60]
        if meta.get("mnistjobs.resume_of"):
            what = f"resume of {meta['mnistjobs.resume_of']}: {what}"
        click.echo(f"{(j.submission_id or j.job_id or '-'):<18} {_svc_status_text(j):<10} "
                   f"{_svc_when(j.start_time):<19}  {_svc_duration(j):>8}  {what}")


@main.command("list", context_settings=CONTEXT_SETTINGS)
@address_option
@home_option
def list_cmd(address, home):
    """List the jobs on the cluster: id, state, submission time, run time, sweep."""
    from jobs import cluster as clusters

    cluster = _svc_connect(address, None, home, start=False)
    _svc_print_jobs(_svc_call(clusters.job_client, cluster))


@main.command("logs", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the log grows, until the job ends.")
@address_option
@home_option
def logs_cmd(job, follow, address, home):
    """Print a job's log: the sweep driver's output, one line per trial epoch and event."""
    from jobs import cluster as clusters

    cluster = _svc_connect(address, None, home, start=False)
    client = _svc_call(clusters.job_client, cluster)
    _svc_job_info(client, cluster, job)
    if follow:
        info = _svc_follow(client, cluster, job)
        click.echo(f"[job {job} {_svc_status_text(info)}]", err=True)
    else:
        click.echo(client.get_job_logs(job), nl=False)


@main.command("cancel", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@address_option
@tracking_option
@home_option
def cancel_cmd(job, address, tracking_uri, home):
    """Stop a job: its trials end and its MLflow runs are marked KILLED (never left RUNNING)."""
    import time as _time

    from jobs import cluster as clusters, tracking

    cluster = _svc_connect(address, tracking_uri, home, start=False)
    client = _svc_call(clusters.job_client, cluster)
    info = _svc_job_info(client, cluster, job)
    before = _svc_status_text(info)
    if before not in TERMINAL_JOB_STATES:
        client.stop_job(job)
        deadline = _time.monotonic() + 60
        while _svc_status_text(info) not in TERMINAL_JOB_STATES and _time.monotonic() < deadline:
            _time.sleep(0.5)
            info = _svc_job_info(client, cluster, job)
    meta = info.metadata or {}
    uri = cluster.tracking_uri or meta.get("mnistjobs.tracking_uri")
    n = 0
    if uri:
        mlf = tracking.client(uri)
        exp_ids = [meta["mnistjobs.experiment_id"]] if meta.get("mnistjobs.experiment_id") else None
        n = tracking.end_job_runs(mlf, meta.get("mnistjobs.job_id", job), "KILLED", experiment_ids=exp_ids)
    state = _svc_status_text(info)
    if before in TERMINAL_JOB_STATES:
        click.echo(f"Job {job} had already ended ({before}); nothing to stop.")
    else:
        click.echo(f"Job {job}: {state}.")
    if n:
        click.echo(f"Marked {n} MLflow run(s) that were still RUNNING as KILLED.")


@main.command("resume", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@click.option("--wait", is_flag=True, help="Follow the resumed job to its end; exit 1 unless every trial finished.")
@address_option
@tracking_option
@home_option
def resume_cmd(job, wait, address, tracking_uri, home):
    """Finish a stopped or failed job: restore its Tune experiment and run what is left.

    Finished trials are not repeated; unfinished and failed ones continue from their last
    checkpoint in their own MLflow runs. The resumed run is a new Ray job (JOB-r1, ...)."""
    from jobs import cluster as clusters
    from jobs.spec import SpecError, SweepSpec

    cluster = _svc_connect(address, tracking_uri, home, start=False)
    client = _svc_call(clusters.job_client, cluster)
    info = _svc_job_info(client, cluster, job)
    state = _svc_status_text(info)
    if state not in TERMINAL_JOB_STATES:
        raise UsageFailure(f"Job {job} is {state}; resume it after it ends (or `mnistjobs cancel {job}`).")
    meta = info.metadata or {}
    if "mnistjobs.spec" not in meta:
        raise UsageFailure(f"Job {job} was not submitted by mnistjobs (its metadata has no sweep spec).")
    try:
        spec = SweepSpec.from_json(meta["mnistjobs.spec"])
    except SpecError as exc:
        raise UsageFailure(f"Job {job}'s stored spec is unusable: {exc}") from None
    logical = meta.get("mnistjobs.job_id", job)
    if not cluster.tracking_uri:
        cluster.tracking_uri = meta.get("mnistjobs.tracking_uri")
    taken = {j.submission_id for j in client.list_jobs()}
    n = 1
    while f"{logical}-r{n}" in taken:
        n += 1
    ray_job_id = _svc_submit(client, cluster, spec, logical, resume_of=job, ray_job_id=f"{logical}-r{n}")
    click.echo(f"Submitted job {ray_job_id}: resumes {job} ({spec.summary()})")
    for line in _svc_urls(cluster, _svc_job_info(client, cluster, ray_job_id)):
        click.echo(line)
    if wait:
        _svc_wait(client, cluster, ray_job_id)


@main.command("up", context_settings=CONTEXT_SETTINGS)
@click.option("--host", default=None, metavar="IP",
              help="Interface the dashboard and MLflow bind to. Anything but 127.0.0.1 exposes them "
                   "to the network  [default: 127.0.0.1]")
@click.option("--ray-port", type=int, envvar="MNISTJOBS_RAY_PORT", default=None,
              help="Ray head (GCS) port; 0 picks a free one  [env: MNISTJOBS_RAY_PORT; default: 6379]")
@click.option("--dashboard-port", type=int, envvar="MNISTJOBS_DASHBOARD_PORT", default=None,
              help="Ray dashboard and job API port  [env: MNISTJOBS_DASHBOARD_PORT; default: 8265]")
@click.option("--mlflow-port", type=int, envvar="MNISTJOBS_MLFLOW_PORT", default=None,
              help="MLflow server port  [env: MNISTJOBS_MLFLOW_PORT; default: 5000, see mlflow/server.yaml]")
@click.option("--num-cpus", type=int, default=None, help="CPUs Ray may use  [default: all]")
@click.option("--num-gpus", type=int, default=None, help="GPUs Ray may use  [default: Ray detects them]")
@home_option
def up_cmd(host, ray_port, dashboard_port, mlflow_port, num_cpus, num_gpus, home):
    """Start the embedded services: a local Ray head (dashboard, job API) and an MLflow server.

    Both bind 127.0.0.1 unless --host says otherwise. Ray's token authentication stays on: the
    token is in <home>/ray_auth_token (mode 0600); the dashboard asks for it (paste it in the
    browser, or send `Authorization: Bearer <token>`). Reuses the services when they run already.
    """
    from jobs import services

    if host and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"WARNING: --host {host}: the Ray dashboard and the MLflow server will accept "
                   f"connections from the network. Ray asks for its token; MLflow asks for nothing "
                   f"unless mlflow/server.yaml enables its basic-auth app.", err=True)
    rec = _svc_call(services.up, home, host=host, ray_port=ray_port, dashboard_port=dashboard_port,
                    mlflow_port=mlflow_port, num_cpus=num_cpus, num_gpus=num_gpus,
                    log=lambda m: click.echo(m, err=True))
    click.echo(("Already running" if rec.reused else "Started") + f" (state folder {rec.home}):")
    click.echo(f"  Ray dashboard: {rec.dashboard_url}   (token: {rec.token_path})")
    click.echo(f"  Ray address:   {rec.ray_address}")
    click.echo(f"  MLflow:        {rec.mlflow_url}")


@main.command("down", context_settings=CONTEXT_SETTINGS)
@home_option
def down_cmd(home):
    """Stop the embedded services (and any jobs still running on them)."""
    from jobs import services
    from jobs.state import resolve_home

    rec = _svc_call(services.down, home)
    if rec is None:
        click.echo(f"Nothing to stop: no embedded services are recorded in {resolve_home(home)}.")
    else:
        click.echo(f"Stopped the embedded Ray ({rec.dashboard_url}) and MLflow ({rec.mlflow_url}).")
# --- service commands end


# --- compare command begin
@main.command("compare", context_settings=CONTEXT_SETTINGS)
@click.option("--experiment", default="mnistjobs", show_default=True, metavar="NAME",
              help="MLflow experiment to read (the --experiment given at submit time).")
@click.option("--job", metavar="JOB", default=None,
              help="Only the trials of this job id (see `mnistjobs list`). Default: all jobs.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown"]),
              default="table", show_default=True,
              help="Output format: aligned text, CSV (one '# title' line per table), or "
                   "Markdown pipe tables.")
@click.option("--table", "which", type=click.Choice(["all", "epochs", "summary", "groups"]),
              default="all", show_default=True,
              help="Which tables: the side-by-side epoch table, the per-run summary, the "
                   "per-(model, schedule) seed statistics, or all of them.")
@click.option("--target", type=float, default=99.4, show_default=True, metavar="PCT",
              help="Test accuracy (percent) for the summary's 'first epoch >=' column.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
              metavar="FILE", help="Write the tables to FILE instead of standard output.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              metavar="PNG", help="Also write the train/test accuracy curves of all runs "
                                  "to this PNG file.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
              help="MLflow tracking server (or sqlite:///... store). [env: MLFLOW_TRACKING_URI; "
                   "default: the embedded server of --home, as started by `mnistjobs up`]")
@home_option
def compare(experiment, job, fmt, which, target, output, plot, tracking_uri, home):
    """Compare trial runs from MLflow: the seed-style epoch table and a summary per run.

    Reads the trial runs of one experiment (all jobs, or one with --job) from the MLflow
    tracking server and prints:

    \b
      - the side-by-side epoch table: "<run> Train Acc" / "<run> Test Acc" per epoch;
      - a summary per run: model, parameters, schedule, seed, status, final and best
        test accuracy, the first epoch reaching --target (99.4%), epochs, wall seconds;
      - mean/min/max final test accuracy over seeds, for each (model, schedule) with
        two or more finished runs (Runs; TTA Runs: how many have a TTA accuracy).

    \b
    Examples:
      mnistjobs compare
      mnistjobs compare --job raysubmit_XXXX --format markdown -o results.md
      mnistjobs compare --table summary --format csv -o summary.csv --plot accuracy.png
    """
    from jobs import report, services

    home = home or ".mnistjobs"
    if not tracking_uri:
        tracking_uri = services.tracking_uri_for(home)  # the embedded default's, if recorded
    if not tracking_uri:
        raise UsageFailure(
            f"No MLflow tracking server is known: the state folder {home} has no running "
            "embedded default (start it with `mnistjobs up` or `mnistjobs submit`). Pass "
            "--tracking-uri or set MLFLOW_TRACKING_URI to read another server."
        )
    try:
        for path in (output, plot):  # a bad output folder fails before anything is read or written
            if path:
                report.check_output_path(path)
        runs, epochs = report.load_runs(tracking_uri, experiment=experiment, job=job)
        summary = report.summary_table(runs, epochs, target=target)
        tables = {}
        if which in ("all", "epochs"):
            tables["Side-by-side epoch table"] = report.epoch_table(epochs, runs)
        if which in ("all", "summary"):
            tables["Summary"] = summary
        groups = report.group_table(summary)
        if which == "groups" or (which == "all" and len(groups)):
            tables["Final test accuracy over seeds"] = groups
        text = report.render_report(tables, fmt)
        if output:
            report.write_output(output, text)
            click.echo(f"Wrote {output}", err=True)
        else:
            click.echo(text, nl=False)
        if plot:
            report.plot_accuracy(epochs, runs, plot, target=target)
            click.echo(f"Wrote {plot}", err=True)
    except report.ReportError as exc:
        raise UsageFailure(str(exc)) from None
    except OSError as exc:
        raise UsageFailure(f"Cannot write {exc.filename or 'the output'}: {exc.strerror}.") from None
# --- compare command end


# --- foreground commands: models, data, train -------------------------------

def _state_home(home: str | None) -> Path:
    return Path(home or os.environ.get("MNISTJOBS_HOME") or ".mnistjobs")


@main.command("models")
@click.argument("names", nargs=-1)
@click.option("--checks/--no-checks", default=True, show_default=True,
              help="Print the architecture checks under each table.")
def models_cmd(names: tuple[str, ...], checks: bool) -> None:
    """Print the layer table of each model (all when no NAME is given).

    The table has the seed's columns (Layer (type), Output Shape, Param #) and
    totals; the checks count BatchNorm, Dropout (Dropout2d included), Linear and
    global-pooling layers and give the receptive field. The last line is the
    model's default training recipe (what `train` and `submit` run unless told otherwise).
    """
    from mnistnets import create_model, list_models
    from mnistnets.summary import format_checks, format_table

    chosen = list(names) or list_models()
    unknown = [n for n in chosen if n not in list_models()]
    if unknown:
        raise UsageFailure(f"unknown model(s): {', '.join(unknown)}. "
                           f"Valid models: {', '.join(list_models())}.")
    for name in chosen:
        model = create_model(name)
        click.echo(f"model {name}")
        click.echo(format_table(model))
        if checks:
            click.echo(format_checks(model))
        click.echo(f"default recipe: {recipe_text(name)}")
        click.echo("")


def recipe_text(model: str) -> str:
    """The model's default recipe in one line: the shared defaults and the model's own settings."""
    from mnistnets.train import MODEL_RECIPES, TrainConfig, settings_text

    c = TrainConfig()
    own = MODEL_RECIPES.get(model, {})
    text = (f"{c.optimizer} (nesterov, momentum {c.momentum:g}), batch {c.batch_size}, {c.epochs} epochs, "
            f"schedule {c.schedule}, lr {c.lr:g}, weight decay {c.weight_decay:g}, affine warp "
            f"(rotation {c.rotation:g}, translate {c.translate:g}, scale {c.scale:g}, shear {c.shear:g}), "
            f"tta {c.tta}")
    from mnistnets import create_model

    rate = create_model(model).dropout_rate
    if rate is not None and "dropout" not in own:
        text += f", dropout {rate:g}"
    if own:
        text += "; this model: " + settings_text(own)
    return text


@main.command("data")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="MNISTJOBS_DATA_DIR", default=None,
              help="Folder with the four MNIST IDX files  [env: MNISTJOBS_DATA_DIR; "
              "default: <home>/data/mnist, downloaded once]")
@home_option
def data_cmd(data_dir: str | None, home: str | None) -> None:
    """Check an MNIST folder: counts, class histograms and md5 of each file.

    Each problem (missing file, truncated file, wrong magic number, count
    mismatch, bad label) is reported with the file it concerns; exit code 2.
    """
    from jobs.datadir import check_data
    from mnistnets.data import DataError, format_check_report

    try:
        report = check_data(data_dir, home=_state_home(home))
    except DataError as exc:
        raise UsageFailure(str(exc)) from None
    click.echo(format_check_report(report))


@main.command("train")
@click.option("--model", "model_name", default="v0", show_default=True,
              help="Model name (see `mnistjobs models`).")
@click.option("--schedule", default=None,
              help="LR schedule spec, e.g. 'onecycle:max_lr=0.05,pct_start=0.2', 'step:step_size=6,gamma=0.1'"
                   "  [default: the recipe's onecycle]")
@recipe_options
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where last.pt and best.pt go  [default: <home>/runs/<model>-s<seed>]")
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False), default=None,
              help="Continue from a checkpoint written by an earlier run (last.pt).")
@click.option("--quiet", is_flag=True, help="No progress bars, only the per-epoch test lines.")
@home_option
def train_cmd(model_name, schedule, seed, device, checkpoint_dir, resume_from, quiet, home, **recipe):
    """Train one model in the foreground (no Ray, no MLflow).

    Prints a progress bar per epoch (`Train Loss=... Accuracy=...`, like the
    seed) and a test line per epoch, writes checkpoints, and ends with a summary.
    """
    from jobs.state import StateError, ensure_home
    from jobs.datadir import load_data
    from mnistnets.data import DataError
    from mnistnets.train import (CheckpointError, check_resumable, fit, prepare_checkpoint_dir, recipe_for,
                                 resolve_device)

    values = recipe_overrides(**recipe)
    values.update(seed=seed, device=device)
    if schedule is not None:
        values["schedule"] = schedule
    try:
        config = recipe_for(model_name, **values).validate()
        resolve_device(config.device)  # cuda asked for on a machine without one
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    state = _state_home(home)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else state / "runs" / f"{config.model}-s{config.seed}"
    if resume_from is not None:
        try:
            done_epochs = int(check_resumable(config, resume_from)["epoch"])
        except CheckpointError as exc:
            raise UsageFailure(str(exc)) from None
        if done_epochs >= config.epochs:
            click.echo(f"Nothing to resume: {resume_from} is at epoch {done_epochs} of {config.epochs}, "
                       f"so the run is complete. To train longer, start a new run with more --epochs.")
            return
    try:
        data = load_data(config.data_dir, home=state, train_limit=config.train_limit, test_limit=config.test_limit)
        if not checkpoint_dir:
            ensure_home(state)  # mode 0700, as `up` makes it
        prepare_checkpoint_dir(ckpt)
    except CheckpointError as exc:  # mnistnets names the folder; the option to change is ours
        raise UsageFailure(f"{exc} (--checkpoint-dir)") from None
    except (DataError, StateError) as exc:
        raise UsageFailure(str(exc)) from None

    from tqdm import tqdm

    from mnistnets import count_parameters
    from mnistnets.train import build_model

    click.echo(f"model {config.model}: {count_parameters(build_model(config)):,} parameters; "
               f"{len(data.train_labels):,} train / {len(data.test_labels):,} test images; "
               f"schedule {config.schedule}; checkpoints in {ckpt}")
    bar = None

    def progress(epoch, batch, n_batches, loss, acc):
        nonlocal bar
        if quiet:
            return
        if bar is None:
            click.echo(f"Epoch {epoch}")
            bar = tqdm(total=n_batches, leave=True, dynamic_ncols=True)
        bar.set_description(f"Train Loss={loss:.4f} Accuracy={acc:.2f}", refresh=False)
        bar.update(batch - bar.n)

    results = []
    try:
        for r in fit(config, data=data, checkpoint_dir=ckpt, resume_from=resume_from, progress=progress):
            if bar is not None:
                bar.close()
                bar = None
            n_test = len(data.test_labels)
            click.echo(f"Test set: Average loss: {r['test_loss']:.4f}, Accuracy: "
                       f"{round(r['test_acc'] * n_test / 100)}/{n_test} ({r['test_acc']:.2f}%)"
                       f"  [epoch {r['epoch']}, lr {r['lr']:.4g}, {r['epoch_seconds']:.1f}s, "
                       f"{r['images_per_second']:.0f} img/s]")
            if "tta_test_acc" in r:
                click.echo(f"Test set with test-time augmentation ({config.tta}): Average loss: "
                           f"{r['tta_test_loss']:.4f}, Accuracy: {r['tta_test_acc']:.2f}%")
            results.append(r)
    except CheckpointError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:
        if (ckpt / "last.pt").is_file():
            click.echo(f"\ninterrupted; resume with --resume {ckpt / 'last.pt'}", err=True)
        else:
            click.echo("\ninterrupted before the first epoch ended: no checkpoint to resume from", err=True)
        sys.exit(130)
    if results:
        best = max(results, key=lambda r: r["test_acc"])
        final = results[-1]
        total = sum(r["epoch_seconds"] for r in results)
        tta = f" ({final['tta_test_acc']:.2f}% with {config.tta} TTA)" if "tta_test_acc" in final else ""
        click.echo(f"\nfinal test accuracy {final['test_acc']:.2f}%{tta} at epoch {final['epoch']}; "
                   f"best {best['test_acc']:.2f}% at epoch {best['epoch']}; "
                   f"{total:.1f}s training; checkpoints: {ckpt}")


if __name__ == "__main__":  # pragma: no cover
    main()
