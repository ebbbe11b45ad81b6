"""Connecting to Ray: a local instance by default, the cluster named by RAY_ADDRESS when it is set."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins the cluster; its token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=True, logging_level="WARNING")


def quiet_ray_data() -> None:
    """Stages show their own bar in units users count (URLs, samples) and their own summary; Ray Data's
    per-operator bars and INFO lines add noise. Its warnings and errors still show."""
    import logging

    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = False


def actor_count(requested: int | None, items: int) -> int:
    """Actors for a pool: as requested, else one per CPU the cluster offers; never more than there is work."""
    import ray

    if requested is None:
        requested = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(int(requested), items))
