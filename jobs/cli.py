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

from jobs import cli_env, cli_local, cli_verify
from jobs.spec import MAX_TRIALS
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
                 cli_local.up_cmd, cli_local.down_cmd, cli_env.env_cmd, cli_env.token_cmd, cli_verify.verify_cmd):
    main.add_command(_command)


# ---------------------------------------------------------------------------------- connecting

def _connect(address, tracking_uri, home, *, start, fast=False):
    """The cluster (jobs.cluster.Cluster) and a job client for it: Ray's JobSubmissionClient, or
    with ``fast`` the plain-HTTP one of the commands that answer at once (jobs.rest.RayJobs: no
    Ray import; MLflow is then read over plain HTTP too)."""
    from jobs import cluster as clusters

    with service_errors():
        cluster = clusters.connect(address, tracking_uri, home, start=start, log=lambda m: click.echo(m, err=True))
        if start and cluster.embedded and cluster.services is not None and not cluster.services.reused:
            click.echo(f"Started the embedded services in {cluster.services.home}: Ray dashboard "
                       f"{cluster.services.dashboard_url}, MLflow {cluster.services.mlflow_url}", err=True)
        return cluster, (clusters.job_reader(cluster) if fast else clusters.job_client(cluster))


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


def _trial_table(rows, problem) -> str | None:
    """The job's trials (``jobs.client.trials``: the rows, or why they could not be read) as text;
    None when no MLflow is known."""
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
        state = "DIVERGED" if r.get("diverged") else r["status"]
        lines.append(f"  {r['name']:<{width}}  {state:<8}  {str(r['epoch']) + '/' + str(r['epochs']):>7}  "
                     f"{fmt(r['test_acc']):>8}  {fmt(r['best_acc']):>6}  {r['device'] or '-'}")
    return "\n".join(lines)


def _echo_jobs(client, cluster) -> None:
    """Ray's jobs and the queue's: queued ones (not yet Ray jobs) with their place."""
    from jobs import client as jc, queue

    jobs_ = jc.list_jobs(client)
    waiting = []
    try:
        mlf = jc._mlflow(client, cluster)
        waiting = [e for e in queue.read(mlf) if e.queued or not any(
            (j.metadata or {}).get(jc.META_JOB_ID) == e.job_id for j in jobs_)]
    except Exception:  # noqa: BLE001 - no queue store known, or MLflow away: Ray's jobs only
        pass
    if not jobs_ and not waiting:
        click.echo("No jobs.")
        return
    click.echo(f"{'job':<18} {'status':<10} {'submitted':<19}  {'time':>8}  sweep")
    for j in jobs_:
        click.echo(f"{(j.submission_id or j.job_id or '-'):<18} {jc.status_of(j):<10} "
                   f"{_when(j.start_time):<19}  {_duration(j):>8}  {jc.sweep_text(j)}")
    for e in waiting:
        state = "QUEUED" if e.queued else "RUNNING"
        note = f"place {e.place} in the queue" if e.queued else "starting again at its place"
        click.echo(f"{e.job_id:<18} {state:<10} {queue.when(e.submitted_at):<19}  {'-':>8}  {e.summary} ({note})")


def _follow(client, cluster, job_id, logical_id=None, *, full: bool = False):
    """Print the job's log as it grows until its driver's last line (``jobs.client.until_done``), or
    until the job ends where there is none (tracebacks left out unless ``full``). Returns (the job's
    info, its state: the one the driver's last line gives, else Ray's)."""
    from jobs import client as jc

    outcome: dict[str, str] = {}
    with service_errors():
        local = jc.local_log_file(cluster, job_id)  # the embedded cluster: read the file, at once
        lines = jc.readable(jc.follow_file(local, client, job_id) if local else jc.follow_log(client, job_id),
                            full=full)
        for chunk in jc.until_done(lines, logical_id or job_id, outcome):
            click.echo(chunk, nl=False)
        lines.close()  # the log's stream with it, at once
        info = jc.job_info(client, cluster, job_id)
    return info, outcome.get("state") or jc.status_of(info)


def _await_start(client, cluster, job_id, ray_job_id) -> None:
    """Wait while the job is queued (printing its place when it changes) until its Ray job
    exists; a job cancelled meanwhile ends the wait with exit 1."""
    from jobs import client as jc, queue

    shown = None
    with service_errors():
        mlf = jc._mlflow(client, cluster)
        while True:
            try:
                client.get_job_info(ray_job_id)
                return
            except RuntimeError:
                pass
            run = queue.find(mlf, job_id)
            if run is not None and run.info.status not in queue.ACTIVE_STATUSES:
                raise click.ClickException(f"Job {job_id} ended {queue.user_state(run)} before it started.")
            where = queue.place_of(mlf, job_id)
            if where and shown and where[0] != shown[0]:
                click.echo(f"  queued: now place {where[0]} of {where[1]}")
            shown = where or shown
            time.sleep(0.5)


def _wait(client, cluster, ray_job_id, job_id=None) -> None:
    """Follow the job to its end, print its trials; exit 1 unless it SUCCEEDED.

    It follows the log to the driver's last line (``jobs.contract.DONE_LINE``), which the driver
    writes after closing its parent run and its Ray connection, so that the trials' own lines
    (``(train_trial pid=...) [v2-...] model logged``, forwarded by Ray) are all before it; without
    that line (a killed driver), until the Ray job has ended. The trials table is then read over
    plain HTTP (no MLflow import)."""
    from jobs import client as jc

    _await_start(client, cluster, job_id or ray_job_id, ray_job_id)
    info, status = _follow(client, cluster, ray_job_id, job_id)
    rows, problem = jc.trials(cluster, info, lite=True)
    table = _trial_table(rows, problem)
    if table:
        click.echo(table)
    if status != "SUCCEEDED":
        raise click.ClickException(f"Job {ray_job_id} ended {status}"
                                   + (f": {info.message}" if info.message and jc.has_ended(info) else "")
                                   + ". Trials that failed are FAILED in MLflow; `mnistjobs resume "
                                   f"{ray_job_id}` continues the unfinished ones from their checkpoints.")
    diverged = [r for r in (rows or []) if r.get("diverged")]
    if diverged:
        click.echo(f"Job {ray_job_id} SUCCEEDED: {len(rows) - len(diverged)} trial(s) finished, {len(diverged)} "
                   f"diverged ({', '.join(r['name'] for r in diverged)}: FAILED in MLflow, tagged mnistjobs.diverged).")
        return
    click.echo(f"Job {ray_job_id} SUCCEEDED: every trial finished.")


def _echo_queued(cluster, view) -> None:
    """`status JOB` of a job Ray does not know (yet): queued, or starting again after its Ray
    head was replaced, or ended with its Ray job gone."""
    from jobs import queue

    run = view.run
    tags = run.data.tags
    line = f"Job {view.job_id}: {view.state}"
    if view.entry is not None:
        total = len(queue.read(view.mlf))
        line += (f"  (place {view.entry.place} of {total} in the queue, priority {view.entry.priority}, "
                 f"submitted {queue.when(view.entry.submitted_at)} by {view.entry.submitted_by})")
        if not view.entry.queued:
            line += "; its Ray job is gone (the head was replaced): it starts again at its place"
    click.echo(line + (f"  {tags.get(queue.TAG_SUMMARY)}" if tags.get(queue.TAG_SUMMARY) else ""))
    if tags.get(queue.TAG_QUEUE_NOTE):
        click.echo(f"  {tags[queue.TAG_QUEUE_NOTE]}")
    from jobs import tracking

    click.echo(f"  MLflow:        {tracking.run_url(cluster.tracking_uri, run.info.experiment_id, run.info.run_id)}")


# -------------------------------------------------------------------------------------- submit

@main.command("submit", context_settings=CONTEXT_SETTINGS)
@click.option("--models", multiple=True, metavar="NAMES",
              help="Models: 'all' or names separated by commas, e.g. v0,v2 (repeatable)  [default: all]")
@click.option("--schedules", multiple=True, metavar="SPECS",
              help="LR schedule specs, one grid axis: e.g. 'onecycle:max_lr=0.05,pct_start=0.2' "
                   "(repeat the option, or separate specs with ';' or a comma before the next "
                   "name: 'cosine,step:step_size=6')  [default: the recipe's onecycle]")
@click.option("--seeds", type=int, default=None,
              help=f"Seeds per (model, schedule): N runs seeds 1..N; a job has at most {MAX_TRIALS} trials "
                   f"(models x schedules x seeds x train: lists, x --num-samples under a search). Under "
                   f"--search random|optuna every sampled config trains with ONE seed (1, or the one seed of a "
                   f"sweep file's seeds: [7]); more are refused: confirm the best config on more seeds "
                   f"afterwards with a grid job of its values (--lr 0.05 --seeds 5)  [default: 1]")
@click.option("--search", type=click.Choice(["grid", "random", "optuna"]), default=None,
              help="grid: every point of the axes once, nothing sampled; random: --num-samples configs drawn "
                   "from --space (Tune's BasicVariantGenerator), each run for every model, given schedule and "
                   "grid(...) axis; optuna: --num-samples configs chosen by Optuna's TPE (Ray Tune's "
                   "OptunaSearch), one model and no grid axis per job  [default: grid]")
@click.option("--num-samples", type=int, default=None, metavar="N",
              help="Configs a search samples (random: per grid point)  [default: 10; not with --search grid]")
@click.option("--search-seed", type=int, default=None, metavar="S",
              help="Seed of the search's sampler: the same seed samples the same configs (random search: "
                   "--dry-run lists them)  [default: none, a new draw each time]")
@click.option("--space", "space", multiple=True, metavar="KEY=DIST",
              help="A searched setting (repeatable): lr, momentum, weight_decay, label_smoothing, dropout, "
                   "ema, clean_epochs, rotation, translate, scale, shear, batch_size, optimizer, schedule, "
                   "nesterov, augment, tta; DIST is uniform(a,b), loguniform(a,b), randint(a,b) (both "
                   "included), choice(a,...) (sampled) or grid(a,...) (a grid axis: every item). Quote an item "
                   "that holds commas: 'schedule=choice(\"onecycle:max_lr=0.05,pct_start=0.2\",cosine)'. A "
                   "sampled DIST needs --search random|optuna; with --search grid only grid(...) is taken. A "
                   "setting is searched or fixed (--lr), not both.")
@click.option("--metric", type=click.Choice(["test_acc", "test_loss", "train_acc", "train_loss"]), default=None,
              help="What the search and ASHA optimise: a metric every trial reports each epoch; the parent "
                   "run's best_<metric> and best.<key> record the trial best at its last epoch  "
                   "[default: test_acc]")
@click.option("--mode", type=click.Choice(["max", "min"]), default=None,
              help="Maximise or minimise --metric (a loss needs min)  [default: max]")
@click.option("--scheduler", type=click.Choice(["fifo", "asha"]), default=None,
              help="fifo: every trial trains all its epochs; asha: ASHA stops the trials that trail at each "
                   "rung (epochs grace, grace x factor, ...; its last rung is --epochs, so a trial that trains "
                   "all its epochs never counts as stopped). A stopped trial's run ends FINISHED, tagged "
                   "mnistjobs.stopped_early; it is neither retried nor failed  [default: fifo]")
@click.option("--grace-period", type=int, default=None, metavar="EPOCHS",
              help="ASHA: epochs every trial trains before it can be stopped, at most --epochs  [default: 1]")
@click.option("--reduction-factor", type=float, default=None, metavar="F",
              help="ASHA: at each rung the best 1/F of the trials go on; > 1  [default: 3]")
@recipe_options
@click.option("--gpus-per-trial", type=float, default=None, metavar="FRACTION",
              help="Fraction of a GPU per trial, 0-1; 0.25 lets four trials share a GPU  "
                   "[default: 0.25 when the cluster has GPUs, else 0]")
@click.option("--cpus-per-trial", type=float, default=None, help="CPUs per trial  [default: 1]")
@click.option("--max-concurrent", type=int, default=None,
              help="At most this many trials at once (0: as many as resources allow)  [default: 0]")
@click.option("--max-failures", type=int, default=None,
              help="Retries of a failed trial from its last checkpoint (-1: forever)  [default: 2]")
@click.option("--reuse-workers/--no-reuse-workers", "reuse_workers", default=None,
              help="Hand a finished trial's Ray worker process to the next trial (Tune's reuse_actors), "
                   "saving a process start and its imports (about 4 s of a 2-core CPU) a trial; "
                   "--no-reuse-workers gives every trial a fresh process: nothing of an earlier trial stays "
                   "in it, and a trial that waits for a worker still starting (on another node, say) keeps "
                   "it instead of moving to one that came free  [default: reuse]")
@click.option("--experiment", default=None, metavar="NAME", help="MLflow experiment  [default: mnistjobs]")
@click.option("--priority", type=int, default=None, metavar="N",
              help="Place in the queue: higher runs first; equal priorities run in submission order. "
                   "Change it while queued with `mnistjobs priority JOB N`.  [default: 0]")
@click.option("--register/--no-register", "register", default=None,
              help="At the end, register each model's best finished trial (final test accuracy) as a new "
                   "version of mnistjobs-<model> and point its alias @best at the best version there is  "
                   "[default: register]")
@click.option("--system-metrics-interval", type=float, default=None, metavar="S",
              help="Seconds between MLflow system-metric samples (CPU, memory; GPU when visible) of each "
                   "trial run; 0 turns them off  [default: 10]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, metavar="YAML",
              help="Sweep spec file with the same settings (models, schedules, seeds, epochs, ..., and "
                   "`train:` for other recipe settings); options given here override it.")
@click.option("--dry-run", is_flag=True, help="Validate and print the trial table; submit nothing.")
@click.option("--wait", is_flag=True,
              help="Follow the job's log to its end; exit 1 unless every trial finished.")
@address_option
@tracking_option
@home_option
def submit(models, schedules, seeds, search, num_samples, search_seed, space, metric, mode, scheduler, grace_period,
           reduction_factor, gpus_per_trial, cpus_per_trial, max_concurrent, max_failures, reuse_workers,
           experiment, priority, register, system_metrics_interval, config_file, dry_run, wait, address,
           tracking_uri, home, **recipe):
    """Submit a sweep: one Ray Tune trial per (model, schedule, seed), tracked in MLflow; or a
    search (--search random|optuna) of --num-samples configs drawn from --space.

    The spec is validated first: an unknown model, a bad schedule, epochs < 1, a GPU fraction
    outside 0-1 and the like exit with code 2 and create nothing. With no --address, the
    embedded local Ray head and MLflow server of the state folder are started (or reused).

    \b
    The job goes into the cluster's queue (QUEUED) and `submit` returns at once with its id,
    its place in the queue and the MLflow experiment URL (or follows the job with --wait).
    Jobs run in order of --priority (higher first), then submission time; the next job starts
    once every job ahead of it has started all its trials, and uses what they leave free.
    `mnistjobs queue` shows the order; `cancel` takes a queued job out, `priority` moves it.

    \b
    Each trial trains with mnistnets.train.fit, logs params, per-epoch metrics (step = epoch)
    and artifacts (layer table, checkpoints, accuracy/loss plots) to its own MLflow run named
    like v2-onecycle-s1, and is retried from its last checkpoint if it fails.

    \b
    A search's trials are named by Tune's counter (v2-t003) and log their sampled values as
    params; the parent run gets the tags mnistjobs.search, .searched, .metric, .mode and
    .scheduler, and at the end best_<metric>, the best config as params best.<key> and
    mnistjobs.best_run_id (best by --metric at each trial's last logged epoch, stopped trials
    included). `mnistjobs resume JOB` restores the searcher: finished trials are not rerun and
    no config is sampled twice. The sweep file takes the same settings (search:, num_samples:,
    space: as a mapping KEY: DIST or a list of KEY=DIST, metric:, scheduler:, ...).

    \b
    Examples:
      mnistjobs submit --models all --wait
      mnistjobs submit --models v0,v2 --schedules 'onecycle:max_lr=0.05' --schedules cosine --seeds 3
      mnistjobs submit --config sweep.yaml --epochs 20 --dry-run
      mnistjobs submit --models v2 --search random --num-samples 12 --search-seed 1 --scheduler asha \\
        --space 'lr=loguniform(0.01,0.5)' --space 'weight_decay=loguniform(1e-5,1e-3)' --dry-run
    """
    from jobs import client as jc
    from jobs.process import process_started_at, startup_mark

    startup_mark("submit: process started", process_started_at())
    spec = _spec_of(config_file, address, {
        "models": list(models) or None, "schedules": list(schedules) or None, "seeds": seeds,
        "gpus_per_trial": gpus_per_trial, "cpus_per_trial": cpus_per_trial, "max_concurrent": max_concurrent,
        "max_failures": max_failures, "reuse_workers": reuse_workers, "experiment": experiment, "priority": priority,
        "register": register,
        "system_metrics_interval": system_metrics_interval, "search": search, "num_samples": num_samples,
        "search_seed": search_seed, "space": list(space) or None, "metric": metric, "mode": mode,
        "scheduler": scheduler, "grace_period": grace_period, "reduction_factor": reduction_factor}, recipe)
    if dry_run:
        _finish_checks(spec, address, home, dry_run=True)()
        click.echo(f"Dry run, nothing submitted. {spec.summary()}, experiment {spec.experiment!r}:")
        _echo_search_dry_run(spec)
        return
    # The checks that need torch (each schedule stepped, the data read) run in a child process
    # while this one imports Ray's and MLflow's clients; nothing is started or written before
    # they passed.
    checked = _finish_checks(spec, address, home, in_child=True)
    startup_mark(f"submit: spec validated (torch-free), checks {'forked' if checked.in_child else 'done here'}")
    _import_clients()
    startup_mark("submit: Ray's and MLflow's clients imported")
    checked()
    startup_mark("submit: spec validated, data checked")
    _check_tracking(address, tracking_uri, home)
    cluster, client = _connect(address, tracking_uri, home, start=True)
    startup_mark("submit: services found")
    with service_errors():
        queued = jc.submit(client, cluster, spec, jc.new_job_id())
    startup_mark("submit: queued")
    job_id = queued["job_id"]
    click.echo(f"Submitted job {job_id}: {spec.summary()}")
    if queued["place"]:
        click.echo(f"  Queued:        place {queued['place']} of {queued['length']}"
                   + (f", priority {getattr(spec, 'priority', 0)}" if getattr(spec, "priority", 0) else "")
                   + ("  (next to start)" if queued["place"] == 1 else "  (`mnistjobs queue` shows the order)"))
    _echo_job_links(cluster, job_id, spec)
    if not wait:
        click.echo(f"  Follow it:     mnistjobs logs {job_id} --follow   (or: mnistjobs status {job_id})")
        return
    _wait(client, cluster, job_id)


def _echo_search_dry_run(spec) -> None:
    """The dry run's table: the trials of a grid or of a seeded random search (the configs it will
    run, drawn as Tune draws them), else the space and the grid points each sample runs at."""
    from jobs import search as searches
    from jobs.space import describe_space
    from jobs.spec import format_trial_table

    if not searches.is_search(spec):
        if spec.space:
            click.echo(describe_space(spec.parsed_space()))
        click.echo(format_trial_table(spec))
        return
    click.echo(describe_space(spec.parsed_space()))
    if spec.search == "random" and spec.search_seed is not None:
        click.echo(f"The {spec.trial_count()} configs search seed {spec.search_seed} samples, in the order Tune runs them:")
        click.echo(format_trial_table(spec, trials=searches.sample_configs(spec)))
        return
    why = ("Optuna chooses each config from the results before it" if spec.search == "optuna"
           else "give --search-seed to list them here")
    click.echo(f"Sampled when the job runs ({why}): {spec.num_samples} config(s) at each grid point below.")
    click.echo(format_trial_table(spec))


def _echo_job_links(cluster, job_id, spec) -> None:
    from jobs import tracking

    click.echo(f"  Ray dashboard: {cluster.dashboard_url}/#/jobs/{job_id}")
    exp = tracking.client(cluster.tracking_uri).get_experiment_by_name(spec.experiment)
    if exp is not None:
        click.echo(f"  MLflow:        {tracking.experiment_url(cluster.tracking_uri, exp.experiment_id)}")


#: Recipe options that go to the spec's ``train:`` mapping (the others are spec fields).
TRAIN_KEYS = ("lr", "momentum", "weight_decay", "label_smoothing", "dropout", "clean_epochs", "ema", "tta")


def _spec_of(config_file, address, options: dict, recipe: dict):
    """The sweep spec: the --config file, then the options; validated but for the checks that need
    torch (``SweepSpec.validate(deep=False)``: :func:`_finish_checks` does those)."""
    from jobs.spec import SpecError, SweepSpec

    train = {k: recipe[k] for k in TRAIN_KEYS if recipe.get(k) is not None}
    fields = {k: v for k, v in recipe.items() if k not in TRAIN_KEYS}
    try:
        spec = SweepSpec.from_yaml(config_file) if config_file else SweepSpec()
        spec.update({**options, "train": train or None, **fields})
        if spec.data_dir and not address:
            spec.data_dir = str(Path(spec.data_dir).expanduser().resolve())
        spec.validate(deep=False)
    except SpecError as exc:
        raise UsageFailure(str(exc)) from None
    return spec


def _finish_checks(spec, address, home, *, dry_run: bool = False, in_child: bool = False):
    """The rest of ``spec``'s checks: every schedule built and stepped through its run
    (``validate()``, torch), and on the embedded cluster the data found (or downloaded) and read
    (``load_data``, torch). Returns ``done()``, which sets ``spec.data_dir`` to the folder found
    or raises UsageFailure (exit 2) with what is wrong; with ``in_child`` the checks run in a
    forked child process meanwhile (jobs.process.fork_call), else when ``done()`` is called."""
    from jobs.process import ChildFailed, fork_call
    from jobs.spec import SpecError
    from mnistnets.data import DataError

    def checks():
        spec.validate()
        if not address and (spec.data_dir or not dry_run):
            # The embedded cluster is this machine: find (or download) the data now, before any
            # service starts, and hand the job that folder. Offline with no data: exit 2 here.
            from jobs.datadir import load_data, resolve_data_dir

            folder = str(resolve_data_dir(spec.data_dir, home=home))
            load_data(folder, train_limit=1, test_limit=1)
            return folder
        return spec.data_dir

    if not address and spec.data_dir:
        # A folder given: that it holds the four files is known without torch, at once.
        from jobs.datadir import find_data

        try:
            find_data(spec.data_dir, home=home, download=False)
        except DataError as exc:
            raise UsageFailure(str(exc)) from None
    result = fork_call(checks, (SpecError, DataError)) if in_child else checks

    def done() -> None:
        try:
            spec.data_dir = result()
        except (ChildFailed, SpecError, DataError) as exc:
            raise UsageFailure(str(exc)) from None

    done.in_child = getattr(result, "in_child", False)
    return done


def _import_clients() -> None:
    """Import Ray's job client and MLflow's client (what `submit` uses next), for the time the
    checks of :func:`_finish_checks` take in their child process."""
    import ray.job_submission  # noqa: F401
    from mlflow import MlflowClient  # noqa: F401


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
    from jobs import client as jc, rest

    if job is None and not address and not _echo_services(home):
        return
    cluster, client = _connect(address, tracking_uri, home, start=False, fast=True)
    if job is None:
        with service_errors():
            _echo_jobs(client, cluster)
        return
    with service_errors():
        view = jc.find_job(client, cluster, job)
    if view.info is None:
        _echo_queued(cluster, view)
        return
    info = view.info
    meta = info.metadata or {}
    state = view.state
    click.echo(f"Job {job}: {state}  (submitted {_when(info.start_time)}, {_duration(info)})"
               + (f"  {meta[jc.META_SUMMARY]}" if jc.META_SUMMARY in meta else ""))
    if info.message and jc.status_of(info) != "RUNNING":
        click.echo(f"  {info.message}")
    _echo_links(cluster, info)
    table = _trial_table(*jc.trials(cluster, info, lite=rest.is_lite(client)))
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
    cluster, client = _connect(address, None, home, start=False, fast=True)
    with service_errors():
        _echo_jobs(client, cluster)


@main.command("logs", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing as the log grows, until the job ends (a queued job: from its start).")
@click.option("--full", is_flag=True,
              help="Everything the driver wrote, with the tracebacks of failed trials (left out "
                   "otherwise: each failure is one line).")
@address_option
@home_option
def logs_cmd(job, follow, full, address, home):
    """Print a job's log: the sweep driver's output, one line per trial epoch and event."""
    from jobs import client as jc

    cluster, client = _connect(address, None, home, start=False, fast=not follow)  # --follow: Ray's websocket
    with service_errors():
        view = jc.find_job(client, cluster, job)
    ray_job_id = view.info.submission_id if view.info is not None else view.ray_job_id
    if view.info is None:
        if not follow:
            click.echo(f"Job {view.job_id} is {view.state}"
                       + (f" (place {view.entry.place} in the queue)" if view.entry is not None else "")
                       + "; it has no log yet (`mnistjobs logs JOB --follow` waits for it).", err=True)
            return
        _await_start(client, cluster, view.job_id, ray_job_id)
    if follow:
        _, state = _follow(client, cluster, ray_job_id, view.job_id, full=full)
        click.echo(f"[job {ray_job_id} {state}]", err=True)
    else:
        with service_errors():
            text = client.get_job_logs(ray_job_id)
        click.echo("".join(jc.readable([text], full=full)), nl=False)


@main.command("cancel", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@address_option
@tracking_option
@home_option
def cancel_cmd(job, address, tracking_uri, home):
    """Stop a job: a queued one leaves the queue and never starts; a running one's trials end.
    Its MLflow runs are marked KILLED (never left RUNNING or SCHEDULED)."""
    from jobs import client as jc

    cluster, client = _connect(address, tracking_uri, home, start=False, fast=True)
    with service_errors():
        result = jc.cancel(client, cluster, job)
    if result.get("queued"):
        click.echo(f"Job {job}: STOPPED; taken out of the queue before it started.")
    elif result["before"] in jc.TERMINAL_JOB_STATES:
        click.echo(f"Job {job} had already ended ({result['before']}); nothing to stop.")
    else:
        click.echo(f"Job {job}: {result['after']}.")
    if result["killed_runs"]:
        click.echo(f"Marked {result['killed_runs']} MLflow run(s) that were still RUNNING or SCHEDULED as KILLED.")


@main.command("resume", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@click.option("--wait", is_flag=True, help="Follow the resumed job to its end; exit 1 unless every trial finished.")
@address_option
@tracking_option
@home_option
def resume_cmd(job, wait, address, tracking_uri, home):
    """Finish a stopped or failed job: queue it again; it restores its Tune experiment and runs
    what is left.

    Finished trials are not repeated; unfinished and failed ones continue from their last
    checkpoint in their own MLflow runs. The resumed run is a new Ray job (JOB-r1, ...) that
    waits its turn in the queue like a new submission."""
    from jobs import client as jc, queue

    cluster, client = _connect(address, tracking_uri, home, start=False)
    with service_errors():
        ray_job_id, spec = jc.resume(client, cluster, job)
        logical = ray_job_id.rsplit("-r", 1)[0]
        where = queue.place_of(jc._mlflow(client, cluster), logical)
    click.echo(f"Submitted job {ray_job_id}: resumes {job} ({spec.summary()})"
               + (f"; queued at place {where[0]} of {where[1]}" if where else ""))
    click.echo(f"  Ray dashboard: {cluster.dashboard_url}/#/jobs/{ray_job_id}")
    if wait:
        _wait(client, cluster, ray_job_id, logical)


# --------------------------------------------------------------------------------------- queue

@main.command("queue", context_settings=CONTEXT_SETTINGS)
@address_option
@tracking_option
@home_option
def queue_cmd(address, tracking_uri, home):
    """Show the queue: the running and queued jobs in the order they run.

    \b
    Running jobs keep their place (in the order they started); queued ones follow by priority
    (higher first), then submission time. The next queued job starts once every job ahead of it
    has started all its trials. Columns: place, job, state, priority, submitted, trials done /
    total, experiment, who submitted it."""
    from jobs import client as jc, queue, rest

    cluster, client = _connect(address, tracking_uri, home, start=False, fast=True)
    with service_errors():
        mlf = jc._mlflow(client, cluster)
        entries = queue.read(mlf)
        done = {e.job_id: sum(r.info.status == "FINISHED" for r in rest.job_runs(
            mlf, e.job_id, role="trial", experiment_ids=[e.experiment_id])) for e in entries}
    if not entries:
        click.echo("The queue is empty: no job is queued or running.")
        return
    width = max(len("job"), *(len(e.job_id) for e in entries))
    click.echo(f"{'place':>5}  {'job':<{width}}  {'state':<8}  {'priority':>8}  {'submitted':<19}  "
               f"{'trials':>7}  {'experiment':<14}  submitted by")
    for e in entries:
        state = "QUEUED" if e.queued else "RUNNING"
        trials = f"{done.get(e.job_id, 0)}/{e.total if e.total is not None else '?'}"
        click.echo(f"{e.place:>5}  {e.job_id:<{width}}  {state:<8}  {e.priority:>8}  {queue.when(e.submitted_at):<19}  "
                   f"{trials:>7}  {e.experiment:<14}  {e.submitted_by}")


@main.command("priority", context_settings=CONTEXT_SETTINGS)
@click.argument("job")
@click.argument("priority", type=int)
@address_option
@tracking_option
@home_option
def priority_cmd(job, priority, address, tracking_uri, home):
    """Change a queued job's priority (higher runs first; a started job keeps its place)."""
    from jobs import client as jc, queue

    if not -1000 <= priority <= 1000:
        raise UsageFailure(f"Priority {priority} is out of range: give an integer from -1000 to 1000.")
    cluster, client = _connect(address, tracking_uri, home, start=False)
    with service_errors():
        entry = queue.set_priority(jc._mlflow(client, cluster), job, priority)
        jc.wake_admitter(cluster)
    click.echo(f"Job {job}: priority {priority}; now place {entry.place} in the queue.")


def run() -> None:
    """The `mnistjobs` console script: the click group, then a fast exit (``jobs.process.fast_exit``:
    atexit functions and threads as usual, without the interpreter's module teardown, about a second
    once torch, MLflow and Ray are loaded). Tests call ``main`` in-process instead."""
    from jobs.process import fast_exit

    try:
        main()
    except SystemExit as exc:  # click's standalone mode always ends so
        fast_exit(exc.code)
    fast_exit(0)


if __name__ == "__main__":  # pragma: no cover
    run()
