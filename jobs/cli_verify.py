"""`mnistjobs verify`: re-score each trial's logged model here and compare with what its run logged.

jobs.cli registers the command on its group; the work is jobs.verify's.
"""
from __future__ import annotations

import click

from jobs.cli_options import CONTEXT_SETTINGS, UsageFailure, home_option
from jobs.contract import DEFAULT_EXPERIMENT


@click.command("verify", context_settings=CONTEXT_SETTINGS)
@click.option("--job", metavar="JOB", default=None, help="Only the finished trials of this job (see `mnistjobs list`).")
@click.option("--model", "model", metavar="NAME@ALIAS", default=None,
              help="One registered version: NAME@ALIAS (mnistjobs-v2@best), NAME/VERSION (mnistjobs-v2/3) or "
                   "NAME (its @best); it is loaded from the registry and compared with the run it came from.")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, metavar="NAME",
              help="MLflow experiment to read (the --experiment given at submit time).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="MNISTJOBS_DATA_DIR", default=None,
              help="Folder with the four MNIST files  [env: MNISTJOBS_DATA_DIR; default: the folder each run "
                   "was trained from (its tag mnistjobs.data_dir)]")
@click.option("--tolerance", type=float, default=None, metavar="POINTS",
              help="Largest difference in test accuracy (percentage points) that passes  [default: 0.01]")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
              help="MLflow tracking server. [env: MLFLOW_TRACKING_URI; default: the embedded server of --home]")
@home_option
def verify_cmd(job, model, experiment, data_dir, tolerance, tracking_uri, home):
    """Load each trial's model through MLflow and check its test accuracy here.

    For each finished trial run (all of the experiment's, one job's with --job, or the run a
    registered version came from with --model), the model the run logged is loaded with
    mlflow.pytorch.load_model (not this project's checkpoint code) and scored on the test images
    that run was scored on: the real test set, or its first test_limit images. Prints the logged
    final test accuracy (test_acc at the last epoch) and the recomputed one per run.

    \b
    Exit code: 0 when every run agrees within --tolerance (0.01 points, one image in 10,000),
    1 when one differs or cannot be checked, 2 for a bad request (no such job or model).
    Runs without a logged model (stopped early by Tune) are listed as skipped.

    \b
    Examples:
      mnistjobs verify
      mnistjobs verify --job raysubmit_XXXX
      mnistjobs verify --model mnistjobs-v2@best
    """
    from jobs import services, verify

    if job and model:
        raise UsageFailure("Give --job or --model, not both: --model checks one registered version, --job the "
                           "trials of one job.")
    tolerance = verify.DEFAULT_TOLERANCE if tolerance is None else tolerance
    if not tolerance >= 0:
        raise UsageFailure(f"--tolerance must be a number of points >= 0 (e.g. 0.01), not {tolerance}.")
    home = home or ".mnistjobs"
    if not tracking_uri:
        tracking_uri = services.tracking_uri_for(home)
    if not tracking_uri:
        raise UsageFailure(
            f"No MLflow tracking server is known: the state folder {home} has no running embedded default "
            "(start it with `mnistjobs up` or `mnistjobs submit`). Pass --tracking-uri or set "
            "MLFLOW_TRACKING_URI to read another server.")

    width = 24
    printed = []

    def show(check):
        if not printed:
            click.echo(verify.header(width))
        printed.append(check)
        click.echo(verify.format_check(check, width))

    try:
        checks = verify.verify(tracking_uri, experiment=experiment, job=job, model=model, data_dir=data_dir,
                               tolerance=tolerance, on_check=show)
    except verify.VerifyError as exc:
        raise UsageFailure(f"Nothing to verify: {exc}.") from None
    checked = [c for c in checks if c.skipped is None]
    bad = [c for c in checked if not c.ok]
    skipped = len(checks) - len(checked)
    tail = f", {skipped} skipped (no model)" if skipped else ""
    if not checked:
        click.echo(f"No run could be verified: none of the {len(checks)} finished trial run(s) logged a model{tail}.",
                   err=True)
        raise SystemExit(1)
    if bad:
        click.echo(f"{len(bad)} of {len(checked)} run(s) FAILED verification (tolerance {tolerance:g} points){tail}.",
                   err=True)
        raise SystemExit(1)
    click.echo(f"All {len(checked)} run(s) verified: the logged models reproduce their logged test accuracy "
               f"within {tolerance:g} points{tail}.")
