"""Inputs that used to hang (issue 16): every input gets an answer, exit 2 and a clear message past
the limits a user sees in --help. Fast: no Ray, no MLflow, no training."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from jobs.spec import (MAX_EPOCHS, MAX_SPEC_BYTES, MAX_SPEC_VALUES, MAX_TRIALS, SpecError, SweepSpec)

CLEAN_ENV = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "MNISTJOBS_DATA_DIR": None}


def _cli(*args):
    from jobs.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=CLEAN_ENV, catch_exceptions=False)


# ------------------------------------------------------------------ the three inputs, whole

@pytest.mark.parametrize("args, words", [
    (["--models", "all", "--seeds", "1000000"], ["4,000,000 trials", "1000000 seeds", f"at most {MAX_TRIALS}"]),
    (["--models", "all", "--epochs", "100000000"], ["--epochs", f"from 1 to {MAX_EPOCHS}", "100000000"]),
    (["--config", "/dev/zero"], ["/dev/zero", "is a device", "YAML file"]),
], ids=["million-seeds", "hundred-million-epochs", "dev-zero"])
def test_inputs_that_hung_exit_2_with_a_clear_message(tmp_path, args, words):
    """As a user types them, in a process of their own: the timeout only turns a hang back into a
    failure (it used to be killed after 60 s, or run out of memory), it measures nothing."""
    if "/dev/zero" in args and not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    proc = subprocess.run([sys.executable, "-c", "from jobs.cli import main; main()", "submit", *args,
                           "--dry-run", "--home", str(home)],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.startswith("Error: ") and "Traceback" not in out, out
    for w in words:
        assert w in out, (w, out)
    assert not home.exists()


# ------------------------------------------------------------------------------------ trials

def test_trial_limit_is_checked_before_any_point_is_built(monkeypatch):
    def no_points(self):
        raise AssertionError("the points were built before the number of trials was checked")

    monkeypatch.setattr(SweepSpec, "points", no_points)
    monkeypatch.setattr(SweepSpec, "axes", no_points)
    spec = SweepSpec(models=["v0"], seeds=10 ** 12)
    with pytest.raises(SpecError, match=r"1,000,000,000,000 trials \(1 models x 1000000000000 seeds\)"):
        spec.validate()
    assert spec.trial_count() == 10 ** 12


def test_the_limit_counts_every_axis_and_names_it():
    spec = SweepSpec(models="all", schedules=["onecycle", "cosine"], seeds=50, train={"lr": [0.05, 0.1, 0.2]})
    with pytest.raises(SpecError) as err:
        spec.validate()
    message = str(err.value)
    assert "1,200 trials (4 models x 2 schedules x 50 seeds x 3 values of train: lr)" in message
    assert f"at most {MAX_TRIALS}" in message and "--seeds" in message


def test_a_large_grid_within_the_limit_runs():
    """4 models x 7 schedules x 10 seeds = 280 trials, and exactly MAX_TRIALS."""
    schedules = ["onecycle", "cosine", "step", "multistep", "exponential", "plateau", "constant"]
    spec = SweepSpec(models="all", schedules=schedules, seeds=10).validate()
    assert spec.trial_count() == len(spec.points()) == 280
    assert spec.summary().startswith("280 trials: ")
    at_limit = SweepSpec(models="all", seeds=MAX_TRIALS // 4).validate()
    assert at_limit.trial_count() == len(at_limit.points()) == MAX_TRIALS
    with pytest.raises(SpecError, match=f"{MAX_TRIALS + 4:,} trials"):
        SweepSpec(models="all", seeds=MAX_TRIALS // 4 + 1).validate()


@pytest.mark.parametrize("spec", [
    SweepSpec(models=["v0", "v2"], schedules=["onecycle", "cosine"], seeds=[3, 5, 9]),
    SweepSpec(models=["v1"], train={"lr": [0.1, 0.2], "dropout": [0.0, 0.1, 0.2]}),
    SweepSpec(models="all"),
])
def test_trial_count_is_the_number_of_points(spec):
    spec.validate()
    assert spec.trial_count() == len(spec.points()) == len(spec.trials())


def test_a_long_list_of_schedules_is_refused_by_count_before_each_is_checked():
    # 3000 schedules (with repeats: the old check counted each one against all the others)
    spec = SweepSpec(models=["v0"], schedules=[f"step:step_size={i % 50 + 1}" for i in range(3000)])
    with pytest.raises(SpecError, match=r"3,000 trials \(1 models x 3000 schedules x 1 seeds\)"):
        spec.validate()


# ------------------------------------------------------------------------------------ epochs

def test_epochs_limit_in_the_spec():
    assert SweepSpec(models=["v0"], epochs=MAX_EPOCHS).validate().epochs == MAX_EPOCHS
    for bad in (MAX_EPOCHS + 1, 10 ** 8):
        with pytest.raises(SpecError, match=rf"--epochs must be a whole number from 1 to {MAX_EPOCHS}, not {bad}"):
            SweepSpec(models=["v0"], epochs=bad).validate()


def test_epochs_limit_from_a_sweep_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("models: [v0]\nepochs: 100000000\n")
    r = _cli("submit", "--config", path, "--dry-run", "--home", tmp_path / "home")
    assert r.exit_code == 2 and f"from 1 to {MAX_EPOCHS}" in r.output, r.output


@pytest.mark.parametrize("command", ["train", "submit"])
def test_epochs_limit_on_the_command_line_and_in_help(tmp_path, command):
    help_text = " ".join(_cli(command, "--help").output.split())
    assert f"--epochs INTEGER Epochs per run, at most {MAX_EPOCHS}" in help_text
    r = _cli(command, "--epochs", MAX_EPOCHS + 1, "--home", tmp_path / "home")
    assert r.exit_code == 2, r.output
    assert r.output == f"Error: --epochs must be a whole number from 1 to {MAX_EPOCHS}, not {MAX_EPOCHS + 1}.\n"
    assert not (tmp_path / "home").exists()


# ------------------------------------------------------------------------------- sweep files

def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "sweep.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match=r"sweep\.yaml is a FIFO; --config takes a YAML file"):
        SweepSpec.from_yaml(fifo)


def test_a_folder_and_a_device_are_refused(tmp_path):
    with pytest.raises(SpecError, match="is a folder"):
        SweepSpec.from_yaml(tmp_path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(SpecError, match="/dev/zero is a device"):
            SweepSpec.from_yaml("/dev/zero")


def test_a_file_over_the_size_limit_is_refused_and_one_at_it_is_read(tmp_path):
    head = "models: [v0]\nepochs: 2\n"
    at = tmp_path / "at.yaml"
    at.write_text(head + "#" * (MAX_SPEC_BYTES - len(head) - 1) + "\n")
    assert at.stat().st_size == MAX_SPEC_BYTES
    assert SweepSpec.from_yaml(at).validate().epochs == 2
    over = tmp_path / "over.yaml"
    over.write_text(head + "#" * (MAX_SPEC_BYTES - len(head)) + "\n")
    with pytest.raises(SpecError) as err:
        SweepSpec.from_yaml(over)
    assert f"{MAX_SPEC_BYTES + 1:,} bytes" in str(err.value) and f"at most {MAX_SPEC_BYTES:,} bytes" in str(err.value)
    sparse = tmp_path / "huge.yaml"  # 10 GiB that take no disk: refused from its size, not read
    with open(sparse, "wb") as f:
        f.truncate(10 << 30)
    with pytest.raises(SpecError, match=f"{10 << 30:,} bytes"):
        SweepSpec.from_yaml(sparse)


def test_a_symlink_to_a_sweep_file_is_read(tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text("models: [v2]\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    assert SweepSpec.from_yaml(link).models == ["v2"]


def test_yaml_aliases_cannot_expand_past_the_value_limit(tmp_path):
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")  # 10**9 values in the end
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(rows) + "\nmodels: *i\n")
    with pytest.raises(SpecError, match=f"more than {MAX_SPEC_VALUES:,} values"):
        SweepSpec.from_yaml(path)


def test_not_utf8_and_deep_nesting_are_spec_errors(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"models: [v0]\n\xff\xfe\x00junk")
    with pytest.raises(SpecError, match="not UTF-8 text"):
        SweepSpec.from_yaml(binary)
    deep = tmp_path / "deep.yaml"
    deep.write_text("models: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(SpecError, match="not valid YAML|nests its values too deeply"):
        SweepSpec.from_yaml(deep)


def test_a_train_axis_holds_plain_values(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("models: [v0]\ntrain:\n  lr: [[0.1, 0.2], 0.3]\n")
    with pytest.raises(SpecError, match=r"train: lr: a list is a grid axis of plain values .*not \[\[0\.1, 0\.2\], 0\.3\]"):
        SweepSpec.from_yaml(path).validate()


def test_a_long_bad_value_is_cut_short_in_the_message():
    seeds = list(range(5000)) + [-1]
    with pytest.raises(SpecError) as err:
        SweepSpec(models=["v0"], seeds=seeds).validate()
    assert "seeds must be a number N >= 1" in str(err.value) and len(str(err.value)) < 300


def test_offline_submit_without_data_fails_fast_before_any_service(tmp_path):
    """The embedded default resolves the data first: with no data folder and no network (a proxy
    that refuses every connection), `submit` exits 2 with one message that says how to point at
    a local copy, and starts nothing: no state folder, no services."""
    import subprocess
    import sys

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("MNISTJOBS_DATA_DIR", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""})
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--models", "v0", "--home", str(home)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr
    assert message.count("Could not download MNIST") == 1 and "--data-dir" in message and "MNISTJOBS_DATA_DIR" in message
    assert "resume" not in message  # a data error is not fixed by resuming
    assert not home.exists()  # nothing created: no state folder, so no services were started
