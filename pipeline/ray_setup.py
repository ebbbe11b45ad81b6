"""Connecting to Ray: a local instance by default, the cluster named by RAY_ADDRESS when it is set."""

from __future__ import annotations

import logging
import os
import sys

from pipeline.errors import StageError  # a UserError: every user error is one


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins the cluster; its token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=True, logging_level="WARNING")
    _route_system_noise()


# What Ray's own processes (GCS, raylet) forward to the driver's console that users cannot act on. When a stage's
# actor pool ends, Ray kills actors that have already exited and the GCS logs the failed kill as an error
# ("Failed to kill actor …: KillActor RPC failed"); in a sweep it lands between jobs, reading like a crash.
# Such lines go to pixelmill.log (logger "ray"); every other forwarded line, the GCS's and raylet's real errors
# (an out-of-memory kill, a dead node) included, still reaches the console.
SYSTEM_NOISE = {"gcs_server": ("Failed to kill actor",)}


def drop_system_noise(batch: dict) -> dict | None:
    """A batch of forwarded log lines (Ray's dict: pid, lines, is_err, …) without SYSTEM_NOISE's lines, which
    are logged instead; None when nothing is left to print."""
    noise = SYSTEM_NOISE.get(str(batch.get("pid")))
    if not noise:
        return batch
    kept = []
    for line in batch.get("lines", []):
        if any(pattern in line for pattern in noise):
            logging.getLogger("ray").warning("(%s) %s", batch["pid"], line)
        else:
            kept.append(line)
    return {**batch, "lines": kept} if kept else None


def _route_system_noise() -> None:
    """Wrap the driver's printer of forwarded lines (`ray_print_logs`, a handler of Ray's private dispatcher)
    with `drop_system_noise` while pixelmill routes library output to its log (not `verbose`). Ray versions
    without that handler print as before."""
    from training.quiet import is_quiet

    if not is_quiet():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            dispatcher.handlers = [
                (name, _without_noise(handler) if name == "ray_print_logs" else handler)
                for name, handler in dispatcher.handlers
            ]
    except (ImportError, AttributeError, TypeError, ValueError):
        return


def _without_noise(print_batch):
    def printer(batch):
        batch = drop_system_noise(batch)
        if batch is not None:
            print_batch(batch)

    return printer


def quiet_ray_data() -> None:
    """Stages show their own bar in units users count (URLs, samples) and their own summary; Ray Data's
    per-operator bars and INFO lines add noise. Its warnings and errors still show, but for a user error's
    traceback."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = False
    # A worker's own exception, not Ray Data's UserCodeException (which drops it): a DiskFullError or a
    # StageError raised on a worker then reaches `run_command` and ends the run in its one line, which Ray
    # Data's own report of it (with the traceback) would bury.
    context.raise_original_map_exception = True
    for name in REPORTS_OF_FAILED_MAPS:
        reports = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorRecords) for f in reports.filters):
            reports.addFilter(_UserErrorRecords())


# What Ray's C++ core worker prints on the driver's stderr, past Python's logging, that users cannot act on:
# Ray Data passes every actor pool its map function through the object store while keeping actor restarts on
# (our stages rely on them: pipeline/stage.py), and Ray warns of that combination at the pool's first actor
# (ray-project/ray#53727). It goes to the log file instead (training.quiet.native_lines_to_log).
NATIVE_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)  # literal bytes

# Ray Data's modules that log a worker's exception (and its traceback) before raising it on the driver.
REPORTS_OF_FAILED_MAPS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")


class _UserErrorRecords:
    """Drops the records logged about a UserError (it is their exception, or the one being handled as they are
    logged): `run_command` prints it in one line."""

    def filter(self, record) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not isinstance(error, StageError)


def actor_count(requested: int | None, items: int) -> int:
    """Actors for a pool: as requested, else one per CPU the cluster offers; never more than there is work."""
    import ray

    if requested is None:
        requested = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(int(requested), items))
