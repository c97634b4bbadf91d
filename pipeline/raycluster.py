"""Joining Ray: one way for every stage that can run on it (extraction's Ray Data, fine-tuning's Ray Train).

Ray is an optional extra, imported on use (importing it costs seconds a local run
should not pay). An address of ``""`` starts a local instance, ``"auto"`` joins
this machine's cluster, anything else is a cluster's address (``ray://head:10001``).
The workers import this package from the driver's copy, uploaded with the job, so
the other nodes need no install of the project itself.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pipeline.errors import PipelineError

#: This package's folder, uploaded to the workers with the job.
PACKAGE_DIR = Path(__file__).resolve().parent


def import_ray(key: str, *modules: str):
    """``ray``, with ``modules`` (``ray.data``, ``ray.train.torch``) imported, or a one-line error naming ``key``."""
    import importlib

    try:
        import ray

        for m in modules:
            importlib.import_module(m)
    except ImportError:
        raise PipelineError(
            f"{key} is 'ray' but Ray is not installed; install it with pip install 'transfer-pipeline[ray]' "
            f"(or pip install 'ray[data,train]'), or set {key}: local"
        ) from None
    return ray


def connect(ray, address: str, num_cpus: int | None, key: str) -> bool:
    """Start or join Ray unless this process already has; True when it was started here (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    runtime_env = {"py_modules": [str(PACKAGE_DIR)]}
    check_reachable(address, key)
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise PipelineError(
            f"could not start or join {where} ({str(e).splitlines()[0][:200]}); check {key} "
            "('' for a local instance, 'auto' on a cluster node) and that `ray status` works"
        ) from None
    return True


def check_reachable(address: str, key: str, timeout: float = 5.0) -> None:
    """Refuse a cluster address nothing answers at, in seconds: ``ray.init`` retries it for minutes."""
    if not address or address == "auto":
        return
    where = address.split("://", 1)[-1]
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"{key} {address!r} is not an address of the form host:port or ray://host:port; "
                            "'' starts a local Ray, 'auto' joins this machine's cluster")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise PipelineError(f"nothing answers at {key} {address!r} ({e.strerror or e}); start the cluster "
                            "(ray start --head), check the address, or set it to '' for a local Ray") from None


def check_resources(ray, address: str, workers: int, per_worker: dict[str, float], what: str, remedy: str,
                    warn) -> None:
    """Refuse, rather than wait forever for, ``workers`` a local instance cannot place.

    ``per_worker``: Ray resources (``CPU``, ``GPU``) each worker asks for; ``what``
    names the workers in the message and ``remedy`` says which params to lower. A
    cluster with an autoscaler may grow, so there ``warn`` gets a line instead.
    """
    have = ray.cluster_resources()
    short = [f"{workers} x {n:g} {kind}s but it has {have.get(kind, 0):g}"
             for kind, n in per_worker.items() if n and workers * n > have.get(kind, 0)]
    if not short:
        return
    msg = f"{what} need {' and '.join(short)}; {remedy}"
    if not address:
        raise PipelineError(f"the local Ray instance is too small: {msg}")
    warn(f"warning: the Ray cluster has too few resources now (they wait for an autoscaler): {msg}")


def pipeline_error_in(e: BaseException) -> PipelineError | None:
    """The PipelineError a Ray worker raised, however Ray wrapped it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, PipelineError):
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, PipelineError):
            return cause
        e = e.__cause__ or e.__context__
    return None
