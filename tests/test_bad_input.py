"""Every bad input of the README's table, through the real CLI: a clear one-paragraph error,
exit code 2, no traceback, and nothing created (no state folder, no job, no run).

Rows that need running services (unknown job id, a port in use) are in test_service.py.
"""
import pytest

from _service_helpers import run_cli


@pytest.fixture
def bad_data(tmp_path, synthetic_dir):
    """A copy of the synthetic set whose training images are truncated."""
    import shutil

    d = tmp_path / "corrupt"
    shutil.copytree(synthetic_dir, d)
    f = d / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:200])
    return d


@pytest.fixture
def bad_yaml(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("models: [v0, v1\nepochs: 3\n")
    return f


ROWS = [
    # (id, extra submit args, words the message must hold)
    ("unknown-model", ["--models", "v9"], ["v9", "v0, v1, v2, v3"]),
    ("unknown-schedule", ["--schedules", "warp"], ["unknown schedule 'warp'", "onecycle"]),
    ("unknown-schedule-key", ["--schedules", "onecycle:peak=0.1"], ["no key 'peak'", "max_lr"]),
    ("malformed-yaml", ["--config", "{bad_yaml}"], ["sweep.yaml"]),
    ("zero-epochs", ["--epochs", "0"], ["epochs"]),
    ("negative-epochs", ["--epochs", "-3"], ["epochs"]),
    ("zero-batch", ["--batch-size", "0"], ["batch"]),
    ("gpu-fraction-over-1", ["--gpus-per-trial", "1.5"], ["1.5"]),
    ("gpu-fraction-negative", ["--gpus-per-trial", "-0.25"], ["-0.25"]),
    ("data-dir-missing", ["--data-dir", "{tmp}/nowhere"], ["nowhere", "--data-dir"]),
    ("data-dir-corrupt", ["--data-dir", "{bad_data}"], ["train-images-idx3-ubyte.gz", "corrupt or truncated"]),
    ("ray-unreachable", ["--address", "http://127.0.0.1:9", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"],
     ["127.0.0.1:9", "--address"]),
    ("address-without-tracking-uri", ["--address", "http://127.0.0.1:9"], ["--tracking-uri"]),
    ("mlflow-unreachable", ["--tracking-uri", "http://127.0.0.1:9"], ["127.0.0.1:9", "MLFLOW_TRACKING_URI"]),
]


@pytest.mark.parametrize("args, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_submit_bad_input(tmp_path, home, synthetic_dir, bad_data, bad_yaml, args, words):
    fill = {"tmp": tmp_path, "bad_data": bad_data, "bad_yaml": bad_yaml}
    args = [a.format(**fill) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(synthetic_dir)]
    r = run_cli(["submit", "--epochs", "1", *args] if "--epochs" not in args else ["submit", *args])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and "Traceback" not in r.output
    for w in words:
        assert w in r.output, (w, r.output)
    assert not home.exists(), "a rejected submit must create nothing"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", [["list"], ["status", "mj-00000000"], ["logs", "mj-00000000"],
                                     ["cancel", "mj-00000000"]])
def test_job_commands_with_unreachable_ray(home, command):
    r = run_cli([*command, "--address", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "127.0.0.1:9" in r.output and "Traceback" not in r.output


def test_compare_with_unreachable_mlflow(home):
    r = run_cli(["compare", "--tracking-uri", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "127.0.0.1:9" in r.output and "Traceback" not in r.output
