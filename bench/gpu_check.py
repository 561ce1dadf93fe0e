"""The GPU check of issue 16, in one bounded run (``bench/gpu.sh`` runs it).

On a CUDA machine (written for one H200, Python 3.12, torch 2.11; needs torch and this checkout's
``mnistnets`` only: no Ray, no MLflow, no torchvision, no network), within ``--budget`` seconds
(default 450, so that ``gpu.sh`` ends within 8 minutes), it measures and writes to ``--out``
(``gpu_check.json`` after every section, and ``gpu_check.txt``, the same as tables):

1. models    - per model v0-v3, the trainer (``mnistnets.train.fit``, the default recipe, fp32,
               eager: what a trial runs) on the full MNIST: seconds per epoch, training images/s
               and the peak GPU memory of the process (allocated and reserved), over 2 epochs
               (the first one pays CUDA's and cuDNN's warm-up; the figures are the second's).
2. variants  - v0's recipe for 15 epochs (``--variant-epochs``) in a copy of the trainer's loop
               with one change each: channels_last, bf16 autocast, torch.compile, torch.compile
               with CUDA graphs (mode reduce-overhead), and the first three together; the speed
               (seconds per epoch after the first, the first with its compile time) and the final
               test accuracy (the recipe's EMA weights, evaluated in fp32 eager as the trainer
               does) against the plain fp32 run. A variant that does not fit in what is left of
               the section's budget is skipped, or stopped at an epoch's end, and marked so.
3. procs     - 1, 2, 4, 8 trainer processes (v0's recipe, fp32) on the one GPU at once: each warms
               up, waits for the others, then trains for ``--proc-seconds``; the total images/s
               and where it stops growing (less than 5% more than with half the processes).

Nothing here becomes a default of the trainer: the variants live in this file only.

``--smoke`` runs the same code on the CPU in about a minute (tiny synthetic digits, 1 epoch, 1 and
2 processes, torch.compile with the "eager" backend: plumbing, not speed) so that the script can be
checked on a machine without a GPU. Without a GPU and without ``--smoke`` it exits 2 and says so;
without data (``--data-dir`` or ``MNISTJOBS_DATA_DIR``) likewise, unless ``--synthetic`` (full-size
synthetic digits: speed figures only, no MNIST accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout's mnistnets, installed or not
    sys.path.insert(0, str(REPO))

MODELS = ("v0", "v1", "v2", "v3")
#: (name, channels_last, bf16 autocast, torch.compile mode or None), in the order they run.
VARIANTS = (
    ("fp32 eager (the trainer)", False, False, None),
    ("channels_last", True, False, None),
    ("bf16 autocast", False, True, None),
    ("torch.compile", False, False, "default"),
    ("torch.compile reduce-overhead (CUDA graphs)", False, False, "reduce-overhead"),
    ("channels_last + bf16 + compile", True, True, "default"),
)
#: Each section's share of the budget (what one leaves unused goes to the next).
SHARES = {"models": 0.22, "variants": 0.52, "procs": 0.26}
GROWTH = 1.05  # "still growing": at least 5% more images/s than with half the processes


class Usage(Exception):
    """A bad invocation: the message says what to do; exit 2."""


# ------------------------------------------------------------------------------------ plumbing

class Report:
    """The figures so far; written to OUT after every section, so a run cut short keeps them."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "env": {}, "models": [], "variants": [], "procs": [], "notes": []}

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.data["notes"].append(text)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str) + "\n"),
                           ("gpu_check.txt", render(self.data))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)


class Clock:
    """The run's deadline and each section's."""

    def __init__(self, budget: float):
        self.start = time.monotonic()
        self.deadline = self.start + budget

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, share_of_rest: float) -> float:
        """A deadline for a section: its share of what is left."""
        return time.monotonic() + max(0.0, self.left()) * share_of_rest


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"peak_allocated_mib": None, "peak_reserved_mib": None}
    return {"peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved(device) / 2 ** 20, 1)}


def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                   gpus_visible=torch.cuda.device_count())
    try:
        import triton  # noqa: F401  (torch.compile's GPU backend)

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: compile variants will say why they fail
        env["triton"] = None
    return env


def data_folder(args) -> Path | None:
    """The MNIST folder (--data-dir, $MNISTJOBS_DATA_DIR); None for synthetic digits (--smoke,
    --synthetic: see synthetic_folder)."""
    if args.smoke or args.synthetic:
        return None
    given = args.data_dir or os.environ.get("MNISTJOBS_DATA_DIR")
    if not given:
        raise Usage("No MNIST data: give the folder of the four MNIST IDX files (train-images-idx3-ubyte.gz, "
                    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) as "
                    "`bench/gpu.sh DATA_DIR` (or --data-dir, or MNISTJOBS_DATA_DIR). This check downloads "
                    "nothing; carry the ~11 MB folder with the run, or pass --synthetic for speed figures on "
                    "full-size synthetic digits (no MNIST accuracy).")
    folder = Path(given).expanduser()
    if not folder.is_dir():
        raise Usage(f"The MNIST folder {folder} does not exist (--data-dir / MNISTJOBS_DATA_DIR): give the "
                    f"folder that holds the four MNIST IDX files.")
    return folder


def synthetic_folder(args) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from synthetic import make_synthetic_mnist

    n_train, n_test = (512, 256) if args.smoke else (60_000, 10_000)
    folder = Path(tempfile.mkdtemp(prefix="mnistjobs-gpucheck-"))
    return make_synthetic_mnist(folder, n_train=n_train, n_test=n_test, seed=0)


def load(folder: Path):
    from mnistnets.data import DataError, load_mnist

    try:
        return load_mnist(folder)
    except DataError as exc:
        raise Usage(f"Cannot use the MNIST folder {folder}: {exc}") from None


# ------------------------------------------------------------------------- the trainer's loop

class Loop:
    """v0's (or any model's) recipe trained as mnistnets.train.fit trains it (the same model,
    optimizer, schedule, loader, augmentation, EMA and loss), with the variant's changes:
    channels_last inputs and weights, bf16 autocast around forward and loss, torch.compile of
    the model. Evaluation stays fp32 eager on the recipe's scored model (the EMA when on)."""

    def __init__(self, config, data, device, channels_last=False, bf16=False, compile_mode=None,
                 compile_backend="inductor"):
        import torch

        from mnistnets.data import DeviceLoader
        from mnistnets.schedules import build_scheduler
        from mnistnets.train import WeightEMA, build_model, build_optimizer

        config.validate()
        self.config, self.device, self.bf16 = config, device, bf16
        self.channels_last = torch.channels_last if channels_last else None
        torch.manual_seed(config.seed)
        self.model = build_model(config).to(device)
        if self.channels_last is not None:
            self.model = self.model.to(memory_format=self.channels_last)
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.train_loader = DeviceLoader(data.train_images, data.train_labels, config.batch_size, device=device,
                                         shuffle=True, augment=config.augment_config(), seed=config.seed)
        self.test_loader = DeviceLoader(data.test_images, data.test_labels, config.eval_batch_size, device=device)
        self.augment = self.train_loader.augment
        self.scheduler = build_scheduler(config.schedule, self.optimizer, config.epochs, len(self.train_loader))
        self.ema = WeightEMA(self.model, config.ema) if config.ema > 0 else None
        self.forward = self.model
        self.cudagraphs = compile_mode == "reduce-overhead" and compile_backend == "inductor"
        if compile_mode is not None:
            options = {"backend": compile_backend, "dynamic": False}
            if compile_backend == "inductor":
                options["mode"] = compile_mode
            self.forward = torch.compile(self.model, **options)

    @property
    def scored(self):
        return self.model if self.ema is None else self.ema.model

    def epoch(self, epoch: int, seconds: float | None = None) -> dict:
        """Train one epoch (or, with ``seconds``, batches of it until that much time has passed,
        checked every 25 batches after a device sync); return images, seconds, train loss."""
        import torch
        import torch.nn.functional as F

        from mnistnets.seeds import dropout_seed

        config, loader = self.config, self.train_loader
        torch.manual_seed(dropout_seed(config.seed, epoch))
        loader.set_epoch(epoch)
        loader.augment = None if epoch > config.epochs - config.clean_epochs else self.augment
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        sync(self.device)
        start = time.perf_counter()
        for i, (x, y) in enumerate(loader, 1):
            if self.channels_last is not None:
                x = x.contiguous(memory_format=self.channels_last)
            if self.cudagraphs:  # a new training step: the graphs' outputs of the last one are done
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.forward(x)
                loss = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step_batch()
            if self.ema is not None:
                self.ema.update()
            loss_sum += loss.detach().float() * y.numel()
            seen += y.numel()
            if seconds is not None and i % 25 == 0:
                sync(self.device)
                if time.perf_counter() - start >= seconds:
                    break
        sync(self.device)
        elapsed = time.perf_counter() - start
        return {"images": seen, "seconds": elapsed, "train_loss": loss_sum.item() / max(seen, 1)}

    def finish_epoch(self) -> tuple[float, float]:
        from mnistnets.evaluate import evaluate

        test_loss, test_acc = evaluate(self.scored, self.test_loader)
        self.scheduler.step_epoch(test_loss)
        return test_loss, test_acc

    def tta(self) -> float | None:
        from mnistnets.evaluate import evaluate_tta

        if self.config.tta == "none":
            return None
        return evaluate_tta(self.scored, self.test_loader, self.config.tta)[1]


# ---------------------------------------------------------------------------------- sections

def section_models(report: Report, args, data, device, deadline: float) -> None:
    from mnistnets.train import fit, recipe_for

    epochs = 1 if args.smoke else 2
    for name in MODELS:
        if time.monotonic() >= deadline:
            report.data["models"].append({"model": name, "skipped": "the section's time budget was spent"})
            continue
        config = recipe_for(name, epochs=epochs, device=str(device), tta="none")
        reset_peak(device)
        rows = []
        for result in fit(config, data=data):
            rows.append({k: result[k] for k in ("epoch", "epoch_seconds", "train_seconds", "images_per_second",
                                                 "test_acc")})
            if time.monotonic() >= deadline:
                break
        later = rows[1:] or rows  # the first epoch pays the warm-up
        entry = {"model": name, "batch_size": config.batch_size, "epochs_run": len(rows),
                 "epoch_seconds": statistics.median(r["epoch_seconds"] for r in later),
                 "train_seconds": statistics.median(r["train_seconds"] for r in later),
                 "images_per_second": statistics.median(r["images_per_second"] for r in later),
                 "first_epoch_seconds": rows[0]["epoch_seconds"], "test_acc_last": rows[-1]["test_acc"],
                 **peak_mib(device), "epochs": rows}
        report.data["models"].append(entry)
        print(f"  {name}: {entry['epoch_seconds']:.2f} s/epoch, {entry['images_per_second']:,.0f} images/s, "
              f"peak {entry['peak_allocated_mib']} MiB", flush=True)
        report.save()


def section_variants(report: Report, args, data, device, deadline: float) -> None:
    from mnistnets.train import recipe_for

    epochs = 1 if args.smoke else args.variant_epochs
    variants = [v for v in VARIANTS if device.type == "cuda" or v[3] != "reduce-overhead"]
    if device.type != "cuda":
        report.note("variants on the CPU: torch.compile uses the 'eager' backend (plumbing only) and CUDA "
                    "graphs are skipped")
    base_seconds = None
    for index, (name, channels_last, bf16, compile_mode) in enumerate(variants):
        left = deadline - time.monotonic()
        share = left / (len(variants) - index)
        entry = {"variant": name, "channels_last": channels_last, "bf16": bf16, "compile": compile_mode,
                 "epochs": epochs}
        if base_seconds is not None and index > 0:
            needed = base_seconds * (1.3 if compile_mode is None else 1.0) + (60.0 if compile_mode else 0.0)
            if needed > left:
                entry["skipped"] = (f"needs about {needed:.0f} s (the fp32 run's {base_seconds:.0f} s"
                                    f"{' + compile' if compile_mode else ''}), {left:.0f} s left in the section")
                report.data["variants"].append(entry)
                report.save()
                continue
        config = recipe_for("v0", epochs=epochs, device=str(device))
        reset_peak(device)
        started = time.perf_counter()
        try:
            loop = Loop(config, data, device, channels_last=channels_last, bf16=bf16, compile_mode=compile_mode,
                        compile_backend="inductor" if device.type == "cuda" else "eager")
            rows = []
            for epoch in range(1, epochs + 1):
                trained = loop.epoch(epoch)
                test_loss, test_acc = loop.finish_epoch()
                rows.append({"epoch": epoch, "train_seconds": trained["seconds"],
                             "images_per_second": trained["images"] / trained["seconds"],
                             "train_loss": trained["train_loss"], "test_acc": test_acc})
                # the plain run (the others are measured against it) may take the whole section; the
                # others stop at an epoch's end when their share of what is left is spent
                spent = time.monotonic() >= deadline if index == 0 else time.perf_counter() - started > share
                if spent and epoch < epochs:
                    entry["stopped"] = (f"stopped after epoch {epoch} of {epochs}: "
                                        f"{'the section' if index == 0 else 'its share'} of the budget was spent")
                    break
            tta = loop.tta() if len(rows) == epochs else None
        except Exception as exc:  # noqa: BLE001 - a variant that fails (compile without triton, ...) is a finding
            entry["failed"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
            report.data["variants"].append(entry)
            report.save()
            print(f"  {name}: FAILED {entry['failed']}", flush=True)
            continue
        total = time.perf_counter() - started
        later = rows[1:] or rows
        entry.update(epochs_run=len(rows), total_seconds=total, first_epoch_seconds=rows[0]["train_seconds"],
                     train_seconds_per_epoch=statistics.median(r["train_seconds"] for r in later),
                     images_per_second=statistics.median(r["images_per_second"] for r in later),
                     final_test_acc=rows[-1]["test_acc"], final_tta_acc=tta, **peak_mib(device), per_epoch=rows)
        if index == 0:
            base_seconds = total
        report.data["variants"].append(entry)
        base = report.data["variants"][0]
        if "images_per_second" in base:
            entry["speedup"] = entry["images_per_second"] / base["images_per_second"]
            entry["acc_change"] = entry["final_test_acc"] - base["final_test_acc"]
        print(f"  {name}: {entry['train_seconds_per_epoch']:.2f} s/epoch, {entry['images_per_second']:,.0f} "
              f"images/s, test acc {entry['final_test_acc']:.2f}% after {len(rows)} epochs", flush=True)
        report.save()


def section_procs(report: Report, args, folder: Path, device, deadline: float) -> None:
    levels = [int(n) for n in args.procs.split(",")]
    seconds = args.proc_seconds
    previous = None
    for n in levels:
        left = deadline - time.monotonic()
        if left < seconds + 20:
            report.data["procs"].append({"processes": n, "skipped": f"skipped: {left:.0f} s left in the section, "
                                                                    f"a level needs about {seconds + 20:.0f} s"})
            report.save()
            continue
        entry = run_level(n, folder, device, seconds, timeout=left)
        report.data["procs"].append(entry)
        if "total_images_per_second" in entry:
            if previous:
                entry["growth"] = entry["total_images_per_second"] / previous
            previous = entry["total_images_per_second"]
            print(f"  {n} processes: {entry['total_images_per_second']:,.0f} images/s in all", flush=True)
        else:
            print(f"  {n} processes: {entry.get('failed')}", flush=True)
        report.save()
    rates = [(e["processes"], e["total_images_per_second"]) for e in report.data["procs"]
             if "total_images_per_second" in e]
    best = None
    for (n0, r0), (n1, r1) in zip(rates, rates[1:]):
        if r1 < GROWTH * r0:
            best = n0
            break
    report.data["procs_summary"] = (
        f"the total stops growing after {best} processes" if best is not None
        else f"the total still grew up to {rates[-1][0]} processes" if rates else "no level ran")


def run_level(n: int, folder: Path, device, seconds: float, timeout: float) -> dict:
    """n worker processes: each warms up, says it is ready, waits for "go", trains ``seconds``."""
    work = Path(tempfile.mkdtemp(prefix=f"mnistjobs-procs{n}-"))
    go = work / "go"
    procs, logs = [], []
    env = dict(os.environ)
    if device.type == "cpu":  # the smoke run: processes share the cores instead of each taking all
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for i in range(n):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data-dir", str(folder),
               "--device", str(device), "--proc-seconds", str(seconds), "--go", str(go),
               "--ready", str(work / f"ready{i}"), "--result", str(work / f"result{i}.json"), "--seed", str(i + 1)]
        logs.append(open(work / f"log{i}.txt", "w"))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[-1], env=env))
    start = time.monotonic()

    def failed(why: str) -> dict:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for f in logs:
            f.close()
        text = " | ".join((work / f"log{i}.txt").read_text()[-300:].strip() for i in range(n))
        return {"processes": n, "failed": f"{why}; worker logs: {' '.join(text.split())[:800]}"}

    while not all((work / f"ready{i}").exists() for i in range(n)):
        if any(p.poll() not in (None, 0) for p in procs):
            return failed("a worker exited before it was ready")
        if time.monotonic() - start > max(30.0, timeout - seconds - 10):
            return failed("the workers were not ready in time")
        time.sleep(0.05)
    ready_seconds = time.monotonic() - start
    go.write_text("go")
    for p in procs:
        try:
            p.wait(timeout=max(10.0, seconds + 60))
        except subprocess.TimeoutExpired:
            return failed("a worker did not finish in time")
    if any(p.returncode != 0 for p in procs):
        return failed("a worker failed")
    for f in logs:
        f.close()
    results = [json.loads((work / f"result{i}.json").read_text()) for i in range(n)]
    rates = [r["images"] / r["seconds"] for r in results]
    return {"processes": n, "total_images_per_second": sum(rates), "per_process_images_per_second": rates,
            "seconds_each": [r["seconds"] for r in results], "startup_seconds": ready_seconds,
            "peak_allocated_mib_each": [r.get("peak_allocated_mib") for r in results]}


def worker(args) -> None:
    """One process of the procs section (v0's recipe, fp32, as the trainer trains it)."""
    import torch

    from mnistnets.train import recipe_for

    device = torch.device(args.device)
    data = load(Path(args.data_dir))
    config = recipe_for("v0", epochs=1000, device=str(device), tta="none", seed=args.seed)
    loop = Loop(config, data, device)
    loop.epoch(1, seconds=1.0)  # warm-up: CUDA's and cuDNN's first calls, the allocator
    reset_peak(device)
    Path(args.ready).write_text("ready")
    waited = time.monotonic()
    while not Path(args.go).exists():
        if time.monotonic() - waited > 300:
            raise SystemExit("no go within 300 s")
        time.sleep(0.01)
    images, epoch, start = 0, 2, time.perf_counter()
    while True:  # whole epochs as the trainer runs them (their starts included), the last one cut short
        left = args.proc_seconds - (time.perf_counter() - start)
        images += loop.epoch(epoch, seconds=left)["images"]
        epoch += 1
        if time.perf_counter() - start >= args.proc_seconds:
            break
    Path(args.result).write_text(json.dumps({"images": images, "seconds": time.perf_counter() - start,
                                             "epochs": epoch - 2, **peak_mib(device)}))


def same_as_fit(report: Report) -> None:
    """The smoke run's check of the variants' loop: on the CPU its plain run is bit for bit the
    trainer's (the same 1-epoch v0 run as the models section's fit), so the variants differ from
    the trainer by their one change only."""
    fit_v0 = next((m for m in report.data["models"] if m["model"] == "v0" and "test_acc_last" in m), None)
    plain = report.data["variants"][0] if report.data["variants"] else {}
    if fit_v0 is None or "final_test_acc" not in plain:
        return
    same = fit_v0["test_acc_last"] == plain["final_test_acc"] and \
        fit_v0["epochs"][-1]["epoch"] == plain["epochs_run"]
    report.data["meta"]["loop_matches_fit"] = same
    report.note(f"the variants' loop {'matches' if same else 'DOES NOT match'} mnistnets.train.fit on the "
                f"CPU (v0, 1 epoch: test acc {plain['final_test_acc']:.4f}% vs fit's {fit_v0['test_acc_last']:.4f}%)")
    report.save()


# ----------------------------------------------------------------------------------- tables

def render(data: dict) -> str:
    env, meta = data["env"], data["meta"]
    lines = [f"GPU check ({'smoke: CPU, tiny synthetic data' if meta.get('smoke') else meta.get('data')}), "
             f"{env.get('gpu') or env.get('device', '?')}, torch {env.get('torch', '?')}, "
             f"Python {env.get('python', '?')}, {meta.get('date', '')}", ""]
    if data["models"]:
        lines += ["Trainer per model (mnistnets.train.fit, default recipe, fp32; median of the epochs after "
                  "the first)",
                  f"{'model':<6}{'batch':>6}{'s/epoch':>9}{'train s':>9}{'images/s':>11}{'peak alloc MiB':>16}"
                  f"{'reserved MiB':>14}{'first epoch s':>15}"]
        for m in data["models"]:
            if "skipped" in m:
                lines.append(f"{m['model']:<6}  skipped: {m['skipped']}")
                continue
            lines.append(f"{m['model']:<6}{m['batch_size']:>6}{m['epoch_seconds']:>9.2f}{m['train_seconds']:>9.2f}"
                         f"{m['images_per_second']:>11,.0f}{_num(m['peak_allocated_mib']):>16}"
                         f"{_num(m['peak_reserved_mib']):>14}{m['first_epoch_seconds']:>15.2f}")
        lines.append("")
    if data["variants"]:
        lines += ["v0's recipe, one change each (train s/epoch: median after the first epoch; the first "
                  "includes compiling)",
                  f"{'variant':<45}{'epochs':>7}{'s/epoch':>9}{'first s':>9}{'images/s':>11}{'speed':>7}"
                  f"{'test acc %':>11}{'vs fp32':>8}{'TTA %':>7}"]
        for v in data["variants"]:
            if "skipped" in v or "failed" in v:
                lines.append(f"{v['variant']:<45}  {'skipped' if 'skipped' in v else 'FAILED'}: "
                             f"{v.get('skipped') or v.get('failed')}")
                continue
            lines.append(f"{v['variant']:<45}{v['epochs_run']:>7}{v['train_seconds_per_epoch']:>9.2f}"
                         f"{v['first_epoch_seconds']:>9.2f}{v['images_per_second']:>11,.0f}"
                         f"{v.get('speedup', 1.0):>6.2f}x{v['final_test_acc']:>11.2f}"
                         f"{v.get('acc_change', 0.0):>+8.2f}{_num(v['final_tta_acc'], 2):>7}"
                         + (f"  ({v['stopped']})" if "stopped" in v else ""))
        lines.append("")
    if data["procs"]:
        lines += ["Trainer processes sharing the device (v0's recipe, fp32, each training the same seconds)",
                  f"{'processes':>9}{'images/s total':>16}{'growth':>8}{'per process':>13}{'startup s':>11}"]
        for p in data["procs"]:
            if "total_images_per_second" not in p:
                lines.append(f"{p['processes']:>9}  {p.get('skipped') or p.get('failed')}")
                continue
            per = statistics.mean(p["per_process_images_per_second"])
            growth = f"{p['growth']:.2f}x" if "growth" in p else "-"
            lines.append(f"{p['processes']:>9}{p['total_images_per_second']:>16,.0f}{growth:>8}{per:>13,.0f}"
                         f"{p['startup_seconds']:>11.1f}")
        if data.get("procs_summary"):
            lines.append(data["procs_summary"])
        lines.append("")
    for note in data["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _num(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


# ------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder of the four MNIST IDX files  [env: MNISTJOBS_DATA_DIR]")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "out" / "gpu-check"),
                   help="folder for gpu_check.json and gpu_check.txt  [env: OUT; default: bench/out/gpu-check]")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run  [default: 450]")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny synthetic data, 1 epoch: checks the script")
    p.add_argument("--synthetic", action="store_true", help="full-size synthetic digits instead of MNIST")
    p.add_argument("--sections", default="models,variants,procs", help="which sections, comma-separated")
    p.add_argument("--variant-epochs", type=int, default=15, help="epochs of each v0 variant  [default: 15]")
    p.add_argument("--procs", default=None, help="process counts  [default: 1,2,4,8; --smoke: 1,2]")
    p.add_argument("--proc-seconds", type=float, default=None,
                   help="seconds each process trains  [default: 10; --smoke: 2]")
    # a worker of the procs section (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--go", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.procs = args.procs or ("1,2" if args.smoke else "1,2,4,8")
    args.proc_seconds = args.proc_seconds or (2.0 if args.smoke else 10.0)
    unknown = set(args.sections.split(",")) - set(SHARES)
    if unknown:
        p.error(f"unknown section {sorted(unknown)[0]!r}; sections: {', '.join(SHARES)}")
    if args.variant_epochs < 1:
        p.error("--variant-epochs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    clock = Clock(args.budget)
    try:
        import torch
    except ImportError:
        print("error: this check needs torch (pip install torch)", file=sys.stderr)
        return 2
    try:
        folder = data_folder(args)
        if args.smoke:
            device = torch.device("cpu")
        elif torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            raise Usage("No CUDA GPU is visible to torch: this check is for a GPU machine (bench/gpu.sh --smoke "
                        "runs it on the CPU, as a check of the script).")
        folder = folder or synthetic_folder(args)
        data = load(folder)
    except Usage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke, "budget_s": args.budget,
            "data": "synthetic digits (speed only)" if args.synthetic else ("smoke" if args.smoke else str(folder)),
            "train_images": len(data.train_images), "test_images": len(data.test_images),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    report = Report(Path(args.out), meta)
    report.data["env"] = environment(device)
    print(f"GPU check on {report.data['env'].get('gpu') or device}, torch {torch.__version__}; "
          f"{meta['train_images']} training images; budget {args.budget:.0f} s", flush=True)
    report.save()
    wanted = [s for s in SHARES if s in args.sections.split(",")]
    for i, name in enumerate(wanted):
        share = SHARES[name] / sum(SHARES[s] for s in wanted[i:])
        deadline = clock.section(share)
        print(f"[{name}] {deadline - time.monotonic():.0f} s", flush=True)
        t0 = time.monotonic()
        if name == "models":
            section_models(report, args, data, device, deadline)
        elif name == "variants":
            section_variants(report, args, data, device, deadline)
        else:
            section_procs(report, args, folder, device, deadline)
        report.data["meta"][f"{name}_seconds"] = round(time.monotonic() - t0, 1)
        report.save()
    if args.smoke:
        same_as_fit(report)
    report.data["meta"]["total_seconds"] = round(time.monotonic() - clock.start, 1)
    report.save()
    print(render(report.data), end="")
    print(f"wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.txt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
