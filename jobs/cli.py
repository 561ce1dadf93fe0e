"""The `mnistjobs` command line: one click group, one command per verb.

The job commands here (submit, status, list, logs, cancel, resume) parse options and print what
the Ray job client (jobs.client) returns, as `ray job` does over JobSubmissionClient. The
commands that need no job client are in jobs.cli_local: models, data and train (foreground),
up and down (the embedded local Ray + MLflow, jobs.services), compare (reads MLflow). Commands that need Ray, MLflow or torch
import them lazily, so `mnistjobs --help`, `list`, `status`, `logs` and `cancel` start fast.
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

import click

from jobs import cli_local
from jobs.cli_options import (CONTEXT_SETTINGS, UsageFailure, address_option, home_option, recipe_options,
                              service_errors, tracking_option)


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


for _command in (cli_local.models_cmd, cli_local.data_cmd, cli_local.train_cmd, cli_local.compare,
                 cli_local.up_cmd, cli_local.down_cmd):
    main.add_command(_command)


# ---------------------------------------------------------------------------------- connecting

def _connect(address, tracking_uri, home, *, start):
    """The cluster (jobs.cluster.Cluster) and a job client for it."""
    from jobs import cluster as clusters

    with service_errors():
        cluster = clusters.connect(address, tracking_uri, home, start=start, log=lambda m: click.echo(m, err=True))
        if start and cluster.embedded and cluster.services is not None and not cluster.services.reused:
            click.echo(f"Started the embedded services in {cluster.services.home}: Ray dashboard "
                       f"{cluster.services.dashboard_url}, MLflow {cluster.services.mlflow_url}", err=True)
        return cluster, clusters.job_client(cluster)


# ------------------------------------------------------------------------------------ printing

def _when(ms) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(info) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    seconds = int((end - info.start_time) / 1000)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _echo_links(cluster, info) -> None:
    from jobs import client as jc

    links = jc.job_links(cluster, info)
    click.echo(f"  Ray dashboard: {links['dashboard']}")
    if links["mlflow"]:
        click.echo(f"  MLflow:        {links['mlflow']}")


def _trial_table(cluster, info) -> str | None:
    """The job's trials from MLflow as text (None when no MLflow is known)."""
    from jobs import client as jc

    rows, problem = jc.trials(cluster, info)
    if problem:
        return f"  ({problem})"
    if rows is None:
        return None
    if not rows:
        return "  (no trial runs in MLflow yet)"
    width = max(len("trial"), *(len(r["name"] or "") for r in rows))
    lines = [f"  {'trial':<{width}}  {'status':<8}  {'epoch':>7}  {'test_acc':>8}  {'best':>6}  device"]
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"  {r['name']:<{width}}  {r['status']:<8}  {str(r['epoch']) + '/' + str(r['epochs']):>7}  "
                     f"{fmt(r['test_acc']):>8}  {fmt(r['best_acc']):>6}  {r['device'] or '-'}")
    return "\n".join(lines)


def _echo_jobs(client) -> None:
    from jobs import client as jc

    jobs_ = jc.list_jobs(client)
    if not jobs_:
        click.echo("No jobs.")
        return
    click.echo(f"{'job':<18} {'status':<10} {'submitted':<19}  {'time':>8}  sweep")
    for j in jobs_:
        click.echo(f"{(j.submission_id or j.job_id or '-'):<18} {jc.status_of(j):<10} "
                   f"{_when(j.start_time):<19}  {_duration(j):>8}  {jc.sweep_text(j)}")


def _follow(client, cluster, job_id):
    """Print the job's log as it grows until the job ends; return the final JobInfo."""
    from jobs import client as jc

    with service_errors():
        for chunk in jc.follow_log(client, job_id):
            click.echo(chunk, nl=False)
        return jc.job_info(client, cluster, job_id)


def _wait(client, cluster, ray_job_id) -> None:
    """Follow the job to its end, print its trials; exit 1 unless it SUCCEEDED."""
    from jobs import client as jc

    info = _follow(client, cluster, ray_job_id)
    table = _trial_table(cluster, info)
    if table:
        click.echo(table)
    status = jc.status_of(info)
    if status != "SUCCEEDED":
        raise click.ClickException(f"Job {ray_job_id} ended {status}"
                                   + (f": {info.message}" if info.message else "")
                                   + ". Trials that failed are FAILED in MLflow; `mnistjobs resume "
                                   f"{ray_job_id}` continues the unfinished ones from their checkpoints.")
    click.echo(f"Job {ray_job_id} SUCCEEDED: every trial finished.")


# -------------------------------------------------------------------------------------- submit

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
    from jobs import client as jc
    from jobs.spec import format_trial_table

    spec = _spec_of(config_file, address, {
        "models": list(models) or None, "schedules": list(schedules) or None, "seeds": seeds,
        "gpus_per_trial": gpus_per_trial, "cpus_per_trial": cpus_per_trial, "max_concurrent": max_concurrent,
        "max_failures": max_failures, "experiment": experiment}, recipe)
    if dry_run:
        click.echo(f"Dry run, nothing submitted. {spec.summary()}, experiment {spec.experiment!r}:")
        click.echo(format_trial_table(spec))
        return
    _check_tracking(address, tracking_uri, home)
    cluster, client = _connect(address, tracking_uri, home, start=True)
    with service_errors():
        ray_job_id = jc.submit(client, cluster, spec, jc.new_job_id())
        info = jc.job_info(client, cluster, ray_job_id)
    click.echo(f"Submitted job {ray_job_id}: {spec.summary()}")
    _echo_links(cluster, info)
    if not wait:
        click.echo(f"  Follow it:     mnistjobs logs {ray_job_id} --follow   (or: mnistjobs status {ray_job_id})")
        return
    _wait(client, cluster, ray_job_id)


#: Recipe options that go to the spec's ``train:`` mapping (the others are spec fields).
TRAIN_KEYS = ("lr", "momentum", "weight_decay", "label_smoothing", "dropout", "clean_epochs", "ema", "tta")


def _spec_of(config_file, address, options: dict, recipe: dict):
    """The sweep spec: the --config file, then the options; validated, its local data checked."""
    from jobs.spec import SpecError, SweepSpec
    from mnistnets.data import DataError

    train = {k: recipe[k] for k in TRAIN_KEYS if recipe.get(k) is not None}
    fields = {k: v for k, v in recipe.items() if k not in TRAIN_KEYS}
    try:
        spec = SweepSpec.from_yaml(config_file) if config_file else SweepSpec()
        spec.update({**options, "train": train or None, **fields})
        if spec.data_dir and not address:
            spec.data_dir = str(Path(spec.data_dir).expanduser().resolve())
        spec.validate()
    except SpecError as exc:
        raise UsageFailure(str(exc)) from None
    if not address and spec.data_dir:  # the embedded cluster reads it here: check it now
        from jobs.datadir import load_data

        try:
            load_data(spec.data_dir, train_limit=1, test_limit=1)
        except DataError as exc:
            raise UsageFailure(str(exc)) from None
    return spec


def _check_tracking(address, tracking_uri, home) -> None:
    """A cluster given by address needs a tracking URI its workers reach; a given URI must answer."""
    from jobs import cluster as clusters, services

    if address and not tracking_uri:
        rec = services.load_record(home)
        if rec is None or rec.dashboard_url.rstrip("/") != clusters.dashboard_url_of(address):
            raise UsageFailure("With --address (RAY_ADDRESS), give --tracking-uri (MLFLOW_TRACKING_URI): "
                               "the MLflow server that the cluster's workers can reach.")
    if tracking_uri:
        with service_errors():
            clusters.check_tracking_uri(tracking_uri)


# ------------------------------------------------------------------------------- job commands

@main.command("status", context_settings=CONTEXT_SETTINGS)
@click.argument("job", required=False)
@address_option
@tracking_option
@home_option
def status_cmd(job, address, tracking_uri, home):
    """Show a job (its state and a table of its trials from MLflow), or, with no JOB, the
    embedded services and the jobs on the cluster."""
    from jobs import client as jc

    if job is None and not address and not _echo_services(home):
        return
    cluster, client = _connect(address, tracking_uri, home, start=False)
    if job is None:
        with service_errors():
            _echo_jobs(client)
        return
    with service_errors():
        info = jc.job_info(client, cluster, job)
    meta = info.metadata or {}
    state = jc.status_of(info)
    click.echo(f"Job {job}: {state}  (submitted {_when(info.start_time)}, {_duration(info)})"
               + (f"  {meta[jc.META_SUMMARY]}" if jc.META_SUMMARY in meta else ""))
    if info.message and state != "RUNNING":
        click.echo(f"  {info.message}")
    _echo_links(cluster, info)
    table = _trial_table(cluster, info)
    if table:
        click.echo(table)


def _echo_services(home) -> bool:
    """Print the embedded services' state; True when both run (so their jobs can be listed)."""
    from jobs import services

    with service_errors():
        st = services.status(home)
    if st["ray"] is None:
        click.echo(f"Embedded services of {st['home']}: not running (start them with `mnistjobs up`).")
        return False
    click.echo(f"Embedded services of {st['home']}:")
    click.echo(f"  Ray:    {'running' if st['ray']['running'] else 'NOT ANSWERING'}  "
               f"dashboard {st['ray']['dashboard_url']}  (GCS {st['ray']['address']})")
    click.echo(f"  MLflow: {'running' if st['mlflow']['running'] else 'NOT ANSWERING'}  {st['mlflow']['url']}")
    return bool(st["running"])


@main.command("list", context_settings=CONTEXT_SETTINGS)
@address_option
@home_option
def list_cmd(address, home):
    """List the jobs on the cluster: id, state, submission time, run time, sweep."""
    _cluster, client = _connect(address, None, home, start=False)
    with service_errors():
        _echo_jobs(client)


@main.command("logs", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the log grows, until the job ends.")
@address_option
@home_option
def logs_cmd(job, follow, address, home):
    """Print a job's log: the sweep driver's output, one line per trial epoch and event."""
    from jobs import client as jc

    cluster, client = _connect(address, None, home, start=False)
    with service_errors():
        jc.job_info(client, cluster, job)
    if follow:
        info = _follow(client, cluster, job)
        click.echo(f"[job {job} {jc.status_of(info)}]", err=True)
    else:
        click.echo(client.get_job_logs(job), nl=False)


@main.command("cancel", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@address_option
@tracking_option
@home_option
def cancel_cmd(job, address, tracking_uri, home):
    """Stop a job: its trials end and its MLflow runs are marked KILLED (never left RUNNING)."""
    from jobs import client as jc

    cluster, client = _connect(address, tracking_uri, home, start=False)
    with service_errors():
        result = jc.cancel(client, cluster, job)
    if result["before"] in jc.TERMINAL_JOB_STATES:
        click.echo(f"Job {job} had already ended ({result['before']}); nothing to stop.")
    else:
        click.echo(f"Job {job}: {result['after']}.")
    if result["killed_runs"]:
        click.echo(f"Marked {result['killed_runs']} MLflow run(s) that were still RUNNING as KILLED.")


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
    from jobs import client as jc

    cluster, client = _connect(address, tracking_uri, home, start=False)
    with service_errors():
        ray_job_id, spec = jc.resume(client, cluster, job)
        info = jc.job_info(client, cluster, ray_job_id)
    click.echo(f"Submitted job {ray_job_id}: resumes {job} ({spec.summary()})")
    _echo_links(cluster, info)
    if wait:
        _wait(client, cluster, ray_job_id)


if __name__ == "__main__":  # pragma: no cover
    main()
