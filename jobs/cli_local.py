"""The `mnistjobs` commands that need no Ray job client: models, data and train run in the
foreground on this machine (no Ray, no MLflow), compare reads finished runs from MLflow, up and
down start and stop the embedded local Ray + MLflow (jobs.services).

jobs.cli registers them on its click group. torch is imported only when a command runs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from jobs.cli_options import (CONTEXT_SETTINGS, UsageFailure, home_option, recipe_options, recipe_overrides,
                              service_errors)
from jobs.contract import DEFAULT_EXPERIMENT


def _state_home(home: str | None) -> Path:
    return Path(home or os.environ.get("MNISTJOBS_HOME") or ".mnistjobs")


# ------------------------------------------------------------------------------------- models

@click.command("models")
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
    from mnistnets import create_model
    from mnistnets.train import MODEL_RECIPES, TrainConfig, settings_text

    c = TrainConfig()
    own = MODEL_RECIPES.get(model, {})
    text = (f"{c.optimizer} (nesterov, momentum {c.momentum:g}), batch {c.batch_size}, {c.epochs} epochs, "
            f"schedule {c.schedule}, lr {c.lr:g}, weight decay {c.weight_decay:g}, affine warp "
            f"(rotation {c.rotation:g}, translate {c.translate:g}, scale {c.scale:g}, shear {c.shear:g}), "
            f"tta {c.tta}")
    rate = create_model(model).dropout_rate
    if rate is not None and "dropout" not in own:
        text += f", dropout {rate:g}"
    if own:
        text += "; this model: " + settings_text(own)
    return text


# --------------------------------------------------------------------------------------- data

@click.command("data")
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


# -------------------------------------------------------------------------------------- train

@click.command("train")
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
    config = _train_config(model_name, schedule, seed, device, recipe)
    state = _state_home(home)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else state / "runs" / f"{config.model}-s{config.seed}"
    if resume_from is not None and _already_complete(config, resume_from):
        return
    data = _prepare(config, state, ckpt, own_folder=not checkpoint_dir)
    results = _fit_printing(config, data, ckpt, resume_from, quiet)
    if results:
        _print_summary(config, results, ckpt)


def _train_config(model_name, schedule, seed, device, recipe):
    """The run's TrainConfig (the model's recipe, then the options), validated."""
    from mnistnets.train import recipe_for, resolve_device

    values = recipe_overrides(**recipe)
    values.update(seed=seed, device=device)
    if schedule is not None:
        values["schedule"] = schedule
    try:
        config = recipe_for(model_name, **values).validate()
        resolve_device(config.device)  # cuda asked for on a machine without one
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    return config


def _already_complete(config, resume_from) -> bool:
    """Check that ``resume_from`` resumes this run; True (and say so) when it has no epoch left."""
    from mnistnets.train import CheckpointError, check_resumable

    try:
        done_epochs = int(check_resumable(config, resume_from)["epoch"])
    except CheckpointError as exc:
        raise UsageFailure(str(exc)) from None
    if done_epochs < config.epochs:
        return False
    click.echo(f"Nothing to resume: {resume_from} is at epoch {done_epochs} of {config.epochs}, "
               f"so the run is complete. To train longer, start a new run with more --epochs.")
    return True


def _prepare(config, state: Path, ckpt: Path, *, own_folder: bool):
    """Load the data and make the checkpoint folder (in the state folder, mode 0700, unless given)."""
    from jobs.datadir import load_data
    from jobs.state import StateError, ensure_home
    from mnistnets.data import DataError
    from mnistnets.train import CheckpointError, prepare_checkpoint_dir

    try:
        data = load_data(config.data_dir, home=state, train_limit=config.train_limit, test_limit=config.test_limit)
        if own_folder:
            ensure_home(state)  # mode 0700, as `up` makes it
        prepare_checkpoint_dir(ckpt)
    except CheckpointError as exc:  # mnistnets names the folder; the option to change is ours
        raise UsageFailure(f"{exc} (--checkpoint-dir)") from None
    except (DataError, StateError) as exc:
        raise UsageFailure(str(exc)) from None
    return data


def _fit_printing(config, data, ckpt: Path, resume_from, quiet: bool) -> list[dict]:
    """Run fit(), printing a progress bar per epoch (unless quiet) and the seed's test line."""
    from tqdm import tqdm

    from mnistnets import count_parameters
    from mnistnets.train import CheckpointError, Diverged, build_model, fit

    n_test = len(data.test_labels)
    click.echo(f"model {config.model}: {count_parameters(build_model(config)):,} parameters; "
               f"{len(data.train_labels):,} train / {n_test:,} test images; "
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
    except Diverged as exc:  # a NaN or infinite loss: the one line, exit 1 (the run failed, not the input)
        if bar is not None:
            bar.close()
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        if (ckpt / "last.pt").is_file():
            click.echo(f"\ninterrupted; resume with --resume {ckpt / 'last.pt'}", err=True)
        else:
            click.echo("\ninterrupted before the first epoch ended: no checkpoint to resume from", err=True)
        sys.exit(130)
    return results


def _print_summary(config, results: list[dict], ckpt: Path) -> None:
    best = max(results, key=lambda r: r["test_acc"])
    final = results[-1]
    total = sum(r["epoch_seconds"] for r in results)
    tta = f" ({final['tta_test_acc']:.2f}% with {config.tta} TTA)" if "tta_test_acc" in final else ""
    click.echo(f"\nfinal test accuracy {final['test_acc']:.2f}%{tta} at epoch {final['epoch']}; "
               f"best {best['test_acc']:.2f}% at epoch {best['epoch']}; "
               f"{total:.1f}s training; checkpoints: {ckpt}")


# ------------------------------------------------------------------------------------ compare

@click.command("compare", context_settings=CONTEXT_SETTINGS)
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, metavar="NAME",
              help="MLflow experiment to read (the --experiment given at submit time).")
@click.option("--job", metavar="JOB", default=None,
              help="Only the trials of this job id (see `mnistjobs list`). Default: all jobs.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown"]),
              default="table", show_default=True,
              help="Output format: aligned text, CSV (one table, as pandas and spreadsheets read "
                   "it), or Markdown pipe tables.")
@click.option("--table", "which", type=click.Choice(["all", "epochs", "summary", "groups"]),
              default=None,
              help="Which tables: the side-by-side epoch table, the per-run summary (of a "
                   "search job: its trials, best first), the per-(model, schedule) seed "
                   "statistics, or all of them (not with CSV, which holds one table)  "
                   "[default: all; with --format csv: summary]")
@click.option("--target", type=float, default=99.4, show_default=True, metavar="PCT",
              help="Test accuracy (percent) for the summary's 'first epoch >=' column.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
              metavar="FILE", help="Write the tables to FILE instead of standard output.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              metavar="PNG", help="Also write a PNG file: the train/test accuracy curves of all "
                                  "runs; for search jobs the metric against each searched setting.")
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

    A search job (`submit --search random|optuna`) gets its own table instead of the
    summary and seed statistics: one row per trial with a column per searched setting,
    the search's --metric at the trial's last logged epoch, epochs trained and a status
    (finished, "stopped at E" by ASHA, diverged, failed), sorted best first per --mode,
    the job's best trial marked "best". --plot then draws, per searched setting, the
    metric against the setting's value (a log axis for values spread over decades;
    stopped trials as crosses, diverged as triangles). Several jobs: the grid jobs'
    tables, then one table per search job (CSV, one table: pick one with --job);
    --table epochs shows every run's epochs side by side, search trials included.

    CSV holds one table: the summary unless --table picks another (--table all is refused).

    \b
    Examples:
      mnistjobs compare
      mnistjobs compare --job raysubmit_XXXX --format markdown -o results.md
      mnistjobs compare --table summary --format csv -o summary.csv --plot accuracy.png
      mnistjobs compare --job SEARCH_JOB --plot search.png
    """
    from jobs import report, services

    if which is None:
        which = "summary" if fmt == "csv" else "all"
    elif which == "all" and fmt == "csv":
        raise UsageFailure(
            "--table all cannot be written as CSV: a CSV file holds one table. Pick one with "
            "--table epochs, summary or groups (one file each), or use --format table or markdown "
            "for all of them."
        )
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
        runs, epochs, searches = report.load_compare(tracking_uri, experiment=experiment, job=job)
        tables = _compare_tables(report, runs, epochs, which, target, searches)
        if fmt == "csv" and len(tables) > 1:
            raise UsageFailure(_one_csv_table(tables, searches))
        text = report.render_report(tables, fmt)
        if output:
            report.write_output(output, text)
            click.echo(f"Wrote {output}", err=True)
        else:
            click.echo(text, nl=False)
        if plot:
            _compare_plot(report, runs, epochs, searches, plot, target)
    except report.ReportError as exc:
        raise UsageFailure(str(exc)) from None
    except OSError as exc:
        raise UsageFailure(f"Cannot write {exc.filename or 'the output'}: {exc.strerror}.") from None


def _compare_tables(report, runs, epochs, which: str, target: float, searches=()) -> dict:
    """The tables `compare --table WHICH` prints, by title (the seed groups only when any).

    Without search jobs: the epoch table, the summary and the seed groups of every run. With
    search jobs: those of the other (grid) jobs' runs, then one table per search job for "all"
    and "summary"; "epochs" is the epoch table of every run, "groups" the grid runs' groups.
    """
    if not searches:
        return _grid_tables(report, runs, epochs, which, target, groups_always=which == "groups")
    searched = {rid for s in searches for rid in s.run_ids}
    grid = ~runs["run_id"].isin(searched)
    if which == "epochs":
        return {"Side-by-side epoch table": report.epoch_table(epochs, runs)}
    tables = {}
    if grid.any() or which == "groups":
        grid_runs = runs[grid].reset_index(drop=True)
        grid_epochs = epochs[epochs["run_id"].isin(grid_runs["run_id"])].reset_index(drop=True)
        tables.update(_grid_tables(report, grid_runs, grid_epochs, which, target,
                                   groups_always=which == "groups"))
    if which in ("all", "summary"):
        for search in searches:
            tables[_search_title(search, len(search.run_ids))] = report.search_table(runs, epochs, search)
    return tables


def _grid_tables(report, runs, epochs, which: str, target: float, groups_always: bool) -> dict:
    summary = report.summary_table(runs, epochs, target=target)
    tables = {}
    if which in ("all", "epochs"):
        tables["Side-by-side epoch table"] = report.epoch_table(epochs, runs)
    if which in ("all", "summary"):
        tables["Summary"] = summary
    groups = report.group_table(summary)
    if groups_always or (which == "all" and len(groups)):
        tables["Final test accuracy over seeds"] = groups
    return tables


def _search_title(search, trials: int) -> str:
    best = "highest" if search.mode == "max" else "lowest"
    return (f"Search job {search.job_id} ({search.search} search, {search.scheduler} scheduler, "
            f"{trials} trials): {best} {search.metric} first")


def _one_csv_table(tables: dict, searches) -> str:
    jobs = ", ".join(s.job_id for s in searches)
    return (f"CSV holds one table, but these runs give {len(tables)} ({'; '.join(tables)}): the "
            "grid jobs' summary and one table per search job. Pick one job with --job JOB (search "
            f"jobs here: {jobs}), or use --format table or markdown for all of them.")


def _compare_plot(report, runs, epochs, searches, plot: str, target: float) -> None:
    """--plot: the accuracy curves of a grid job's runs; for search jobs the metric against
    each searched setting (then the grid jobs' runs, if any, are left out and it says so)."""
    if not searches:
        report.plot_accuracy(epochs, runs, plot, target=target)
        click.echo(f"Wrote {plot}", err=True)
        return
    report.plot_search(runs, epochs, searches, plot)
    searched = {rid for s in searches for rid in s.run_ids}
    others = int((~runs["run_id"].isin(searched)).sum())
    note = (f" (the search jobs only; the other {others} runs' accuracy curves: --plot with --job "
            "JOB of their job)" if others else "")
    click.echo(f"Wrote {plot}{note}", err=True)


# ------------------------------------------------------------------------- the embedded services

@click.command("up", context_settings=CONTEXT_SETTINGS)
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
                   f"connections from the network. Ray asks for its token; MLflow for its login "
                   f"(basic auth, on by default in mlflow/server.yaml).", err=True)
    with service_errors():
        rec = services.up(home, host=host, ray_port=ray_port, dashboard_port=dashboard_port,
                          mlflow_port=mlflow_port, num_cpus=num_cpus, num_gpus=num_gpus,
                          log=lambda m: click.echo(m, err=True))
        from jobs import cluster as clusters, queue

        cluster = clusters.Cluster(rec.dashboard_url, rec.headers, rec.mlflow_url, embedded=True, services=rec)
        started_queue = queue.ensure(clusters.job_client(cluster), cluster, wait=True)
    click.echo(("Already running" if rec.reused else "Started") + f" (state folder {rec.home}):")
    if started_queue:
        click.echo(f"  Job queue:     admitter started (Ray job {started_queue}); queued jobs move on")
    from jobs import cli_env

    login = cli_env.mlflow_login_help(rec)
    if login:
        click.echo("  " + login)
    click.echo(f"  Ray dashboard: {rec.dashboard_url}   (token: {rec.token_path})")
    click.echo(f"  Ray address:   {rec.ray_address}")
    click.echo(f"  MLflow:        {rec.mlflow_url}")


@click.command("down", context_settings=CONTEXT_SETTINGS)
@home_option
def down_cmd(home):
    """Stop the embedded services (and any jobs still running on them)."""
    from jobs import services
    from jobs.state import resolve_home

    with service_errors():
        rec = services.down(home)
    if rec is None:
        click.echo(f"Nothing to stop: no embedded services are recorded in {resolve_home(home)}.")
    else:
        click.echo(f"Stopped the embedded Ray ({rec.dashboard_url}) and MLflow ({rec.mlflow_url}).")
        held = getattr(rec, "held_jobs", [])
        if held:
            click.echo(f"{len(held)} running job(s) ({', '.join(held)}) start again at their place in the queue "
                       f"after `mnistjobs up`, from their trials' checkpoints; queued jobs stay queued.")
