"""The sweep driver's connection to Ray, and the trial workers the raylet starts ahead of Tune.

A trial runs in a Ray worker process of the sweep's job. Ray starts that process when Tune asks
for the trial's actor, at the end of Tune's own setup, and the process then needs about 3.5 s of
a 2-core CPU before the trial can begin: Ray's own start (about 1 s) and the imports a trial
needs (:func:`jobs.trial.warm_worker`, the job's ``worker_process_setup_hook``: torch, MLflow's
client, Tune; 2.5-2.8 s). So those workers are asked of the raylet earlier, with its
``PrestartWorkers`` request:

- by the queue's admitter as it starts the job (:func:`prestart_for_job`), before Ray starts the
  job's driver: workers bound to no job yet, with the runtime_env the job's trial actors will
  have (:func:`job_runtime_env`, :func:`trial_runtime_env`), which is what the raylet matches
  them by; it tells the driver so in the job's env (``PRESTARTED_VAR``);
- else by the driver (``python -m jobs.sweep``), which begins with :func:`connect_early`: before
  it imports Tune, opens its MLflow runs or builds the tuner, it connects to Ray and asks for
  workers bound to its job (:func:`prestart_trial_workers`).

Either way on every node of the cluster as many as trials can start at once there, this node
first and no more than the trials that start at once in all (:func:`prestart_plan`): on a
cluster, a node's first trials start as warm as the head's instead of waiting for their
workers' start and imports.

Only light imports here (``ray`` lazily): the driver calls this before anything heavy.
"""
from __future__ import annotations

import argparse
import os

from jobs.process import startup_mark
from jobs.trial import WARM_HOOK

#: How long a prestarted trial worker waits for a trial before the raylet may end it (seconds).
PRESTART_KEEP_ALIVE_S = 60


def connect_ray(**options) -> None:
    """``ray.init`` for the driver: the job's workers import what a trial needs as they start
    (:func:`jobs.trial.warm_worker` as Ray's ``worker_process_setup_hook``; Ray merges it with
    the job's own runtime_env, its env_vars). ``options``: more ``ray.init`` arguments (tests)."""
    import ray

    ray.init(log_to_driver=True, logging_level="WARNING", runtime_env={"worker_process_setup_hook": WARM_HOOK},
             **options)


def connect_driver(spec) -> int:
    """Connect to Ray (:func:`connect_ray`) unless this process is connected already, then have
    the raylet start the first trials' workers (:func:`prestart_trial_workers`). Returns how many
    workers were asked for (0 when already connected: they were asked for then)."""
    import ray

    if ray.is_initialized():
        return 0
    connect_ray()
    startup_mark("driver: ray.init done")
    if int(os.environ.get(PRESTARTED_VAR) or 0) > 0:
        startup_mark(f"driver: {os.environ[PRESTARTED_VAR]} trial worker(s) asked for by the queue's admitter")
        return 0
    n = prestart_trial_workers(spec)
    startup_mark(f"driver: {n} trial worker(s) asked of the raylet")
    return n


def connect_early(argv: list[str]) -> int:
    """The driver's first step (``python -m jobs.sweep ARGS``): read the spec from ``--spec`` /
    ``$MNISTJOBS_SPEC`` and :func:`connect_driver`. Anything wrong (no spec, a bad one, Ray not
    reachable) is left for the driver's own checks to report: nothing is connected then, and
    0 is returned."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--spec", default=os.environ.get("MNISTJOBS_SPEC"))
    try:
        args, _ = parser.parse_known_args(argv)
        if not args.spec:
            return 0
        from jobs.spec import driver_spec

        spec = driver_spec(args.spec)
    except (Exception, SystemExit):  # noqa: BLE001 - the driver reports it, with its exit code
        return 0
    try:
        return connect_driver(spec)
    except Exception as e:  # noqa: BLE001 - run_sweep connects again and reports what fails
        startup_mark(f"driver: early connect failed ({type(e).__name__}: {e})")
        return 0


#: The env_vars Tune gives its trainables' actor class (``ray.tune.execution.class_cache``,
#: checked against Tune's own in the tests): these always, and the variables named in
#: TUNE_PROPAGATED_ENV_VARS where the driver has them set.
TUNE_DEFAULT_ENV_VARS = {"PL_DISABLE_FORK": "1"}
TUNE_PROPAGATED_ENV_VARS = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN", "NCCL_RAS_ADDR",
    "RAY_CHDIR_TO_TRIAL_DIR", "RAY_TRAIN_CHECKPOINT_UPLOAD_WARN_INTERVAL_S", "RAY_TRAIN_COLLECTIVE_TIMEOUT_S",
    "RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S", "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_ENABLE_PRINT_PATCH",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "RAY_TRAIN_STATE_ACTOR_RECONCILIATION_INTERVAL_S", "RAY_TRAIN_V2_ENABLED",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S",
    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "TORCHFT_LIGHTHOUSE", "TRAIN_COPY_DIRECTORY_CHECKPOINTS_INSTEAD_OF_MOVING"})


def tune_actor_env_vars(environ=None) -> dict[str, str]:
    """The env_vars of the runtime_env Tune gives a trial's actor, as Tune's actor class cache
    builds them from the driver's environment ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    return {**TUNE_DEFAULT_ENV_VARS, **{k: environ[k] for k in TUNE_PROPAGATED_ENV_VARS if k in environ}}


def trial_runtime_env(job_runtime_env: str, environ=None) -> str:
    """The serialized runtime_env of the job's trial actors, from the job's (``job_runtime_env``,
    serialized): the raylet gives an actor only a worker started with this very string (it
    compares their hashes). Ray's core worker merges the actor class's runtime_env (Tune's
    env_vars) into the job's, the child's keys over the parent's and env_vars key by key, and
    writes the result compactly with its keys sorted (nlohmann::json)."""
    import json

    merged = json.loads(job_runtime_env) if job_runtime_env.strip() else {}
    merged["env_vars"] = {**merged.get("env_vars", {}), **tune_actor_env_vars(environ)}
    return json.dumps(merged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _trials_at_once(spec) -> int:
    """How many of the sweep's trials may run at once anywhere: its trials, at most ``--max-concurrent``."""
    return min(spec.trial_count(), spec.max_concurrent) if spec.max_concurrent else spec.trial_count()


def trial_workers_at_once(spec, resources: dict[str, float], cluster_gpus: float | None = None) -> int:
    """How many of the sweep's trials can start at once on a node with ``resources`` (Ray's
    resource dict): bounded by the trials, ``--max-concurrent`` and the CPUs and GPUs a trial
    asks for (its GPUs as the driver resolves them, from the cluster's ``cluster_gpus``; default
    the node's own)."""
    n = min(_trials_at_once(spec), int(resources.get("CPU", 0) // spec.cpus_per_trial))
    gpus = spec.resolved_gpus(resources.get("GPU", 0) if cluster_gpus is None else cluster_gpus)
    if gpus > 0:
        n = min(n, int(resources.get("GPU", 0) // gpus))
    return max(n, 0)


def prestart_plan(spec, nodes: list[dict]) -> list[tuple[dict, int]]:
    """Where the sweep's first trials' workers are started: ``[(node, how many), ...]`` over
    ``nodes`` (Ray's node records with their free resources in ``"Free"``, in the order to fill
    them, this process's node first), each node as many as trials can start on it at once
    (:func:`trial_workers_at_once`), all together no more than the trials that start at once."""
    left = _trials_at_once(spec)
    cluster_gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    plan = []
    for node in nodes:
        n = min(left, trial_workers_at_once(spec, node.get("Free", {}), cluster_gpus))
        if n > 0:
            plan.append((node, n))
            left -= n
    return plan


def _alive_nodes() -> list[dict]:
    """Ray's records of the cluster's alive nodes (``ray.nodes()``), each with its resources free
    now in ``"Free"``: this process's node first, then the others by node id."""
    import ray
    from ray._private.state import available_resources_per_node

    here = ray.get_runtime_context().get_node_id()
    free = available_resources_per_node()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for n in nodes:
        n["Free"] = free.get(n.get("NodeID"), {})
    return sorted(nodes, key=lambda n: (n.get("NodeID") != here, n.get("NodeID", "")))


def _ask_raylets(plan: list[tuple[dict, int]], runtime_env_info, job_id: bytes | None) -> int:
    """:func:`_ask_raylet` of each node of a :func:`prestart_plan`; returns how many workers were
    asked for where the raylet took the request (a node that did not costs only its head start)."""
    asked = 0
    for node, n in plan:
        try:
            _ask_raylet(node, runtime_env_info, n, job_id)
        except Exception as e:  # noqa: BLE001 - only a head start
            startup_mark(f"no trial workers prestarted on {node.get('NodeManagerAddress')} "
                         f"({type(e).__name__}: {e})")
            continue
        asked += n
    return asked


def _ask_raylet(node: dict, runtime_env_info, n: int, job_id: bytes | None) -> None:
    """The raylet's PrestartWorkers request: ``n`` Python workers with ``runtime_env_info``,
    bound to the job ``job_id`` (None: to whichever job's task or actor fits them first)."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.PYTHON, runtime_env_info=runtime_env_info,
        keep_alive_duration_secs=PRESTART_KEEP_ALIVE_S, num_workers=n)
    if job_id is not None:
        request.job_id = job_id
    channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=5)
    finally:
        channel.close()


def prestart_trial_workers(spec) -> int:
    """Ask the raylets to start, now, the worker processes the sweep's first trials will run in;
    return how many were asked for. The driver's fallback, where the queue's admitter did not
    (``$MNISTJOBS_PRESTARTED``, :func:`prestart_for_job`).

    The request is Ray's own (the raylet's ``PrestartWorkers``, which Ray's gRPC API offers and
    its Python API does not): workers bound to this job with the runtime_env its trial actors
    will have (:func:`trial_runtime_env`), which the raylet then hands to Tune's trials in place
    of starting new ones. On each node as many as trials can start there at once with the
    resources free now, this node first, no more than the trials that start at once in all
    (:func:`prestart_plan`); unused, they end after ``PRESTART_KEEP_ALIVE_S`` or with the job.
    Never raises: a failed request only loses the head start."""
    try:
        import ray

        job_env = ray._private.worker.global_worker.core_worker.get_job_config().runtime_env_info
        env_info = type(job_env)()
        env_info.CopyFrom(job_env)
        env_info.serialized_runtime_env = trial_runtime_env(job_env.serialized_runtime_env)
        return _ask_raylets(prestart_plan(spec, _alive_nodes()), env_info,
                            bytes.fromhex(ray.get_runtime_context().get_job_id()))
    except Exception as e:  # noqa: BLE001 - only a head start
        startup_mark(f"driver: no trial workers prestarted ({type(e).__name__}: {e})")
        return 0


#: Set in a sweep job's env_vars by the queue's admitter: how many trial workers it had the
#: raylet start for the job (the driver then asks for none).
PRESTARTED_VAR = "MNISTJOBS_PRESTARTED"


def job_runtime_env(env_vars: dict[str, str]) -> str:
    """The runtime_env (serialized) of a sweep's driver submitted through Ray's job API with
    ``{"env_vars": env_vars}``: its ``ray.init`` (:func:`connect_ray`) adds the setup hook, and
    Ray the hook's env var (checked against a real driver's in the tests)."""
    import json

    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return json.dumps({"env_vars": {**env_vars, WORKER_PROCESS_SETUP_HOOK_ENV_VAR: WARM_HOOK},
                       "worker_process_setup_hook": WARM_HOOK})


def prestart_for_job(spec_json: str, env_vars: dict[str, str]) -> int:
    """For the queue's admitter, as it starts a job: have the raylets start the workers the job's
    first trials will run in, before the job's driver exists (it is about 2 s from here to the
    driver's own request, :func:`prestart_trial_workers`), on each node as many as trials can
    start there at once, this node first (:func:`prestart_plan`). The workers are bound
    to no job (Ray's job id comes with the driver) and carry the runtime_env the job's trial
    actors will have (:func:`job_runtime_env`, :func:`trial_runtime_env`), so the raylet hands
    them to those actors; Tune's env vars are taken from this process's environment. Sets
    ``PRESTARTED_VAR`` in ``env_vars`` (the job's, before it is submitted) to the number asked
    for; returns it. Never raises."""
    try:
        from ray.core.generated import runtime_environment_pb2

        from jobs.spec import SweepSpec

        plan = prestart_plan(SweepSpec.from_json(spec_json), _alive_nodes())
        n = sum(k for _, k in plan)
        if n <= 0:
            return 0
        env_vars[PRESTARTED_VAR] = str(n)
        info = runtime_environment_pb2.RuntimeEnvInfo(
            serialized_runtime_env=trial_runtime_env(job_runtime_env(env_vars)))
        info.runtime_env_config.setup_timeout_seconds = 600  # Ray's default
        info.runtime_env_config.eager_install = True
        asked = _ask_raylets(plan, info, None)  # the plan whose count is in the job's env
        if asked <= 0:
            env_vars.pop(PRESTARTED_VAR, None)
        return asked
    except Exception:  # noqa: BLE001 - only a head start; the driver asks for its own
        env_vars.pop(PRESTARTED_VAR, None)
        return 0
