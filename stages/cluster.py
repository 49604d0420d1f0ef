"""A Dask cluster for the stages: a local one (``--workers N``) or an existing one (``--scheduler``).

    pipeline run extract --task rte --workers 2                  # a local cluster of 2 processes
    pipeline run extract --task rte --scheduler tcp://host:8786  # an existing cluster

What runs on it: the segments of stage one (``stages.extract_dask``) and the trials of a stage-two
sweep (``stages.sweep``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache_store import store as st
from stages.errors import StageError

if TYPE_CHECKING:
    from distributed import Client

# one torch job at a time per process: ``Backbone.states`` hooks the shared model's blocks, and
# ``train_side`` seeds torch's global RNG, so two tasks on threads of one worker would mix
TORCH_LOCK = threading.Lock()


class Cluster:
    """A Dask client: a given one, an existing scheduler's (``scheduler``) or a local cluster's.

    A local cluster (``workers`` processes, one thread each) starts on first use, so a command that
    finds its work already done starts nothing. An existing scheduler is contacted when the
    context is entered, before anything is loaded: one that does not answer within ``timeout``
    seconds is a one-line error.
    """

    def __init__(
        self,
        workers: int | None = None,
        scheduler: str | None = None,
        timeout: float = 30.0,
        client: Client | None = None,
    ) -> None:
        if workers is not None and scheduler is not None:
            raise StageError(
                "--workers starts a local Dask cluster and --scheduler uses an existing one; "
                "give one of them"
            )
        if workers is not None and workers < 1:
            raise StageError(f"--workers must be at least 1, got {workers}")
        if timeout <= 0:
            raise StageError(f"--scheduler-timeout must be positive, got {timeout:g}")
        self.workers, self.scheduler, self.timeout = workers, scheduler, timeout
        self._client = client
        self._owned: list[Any] = []  # what this object started and must close

    def __enter__(self) -> Cluster:
        if self.scheduler is not None:
            self.client  # noqa: B018 - connect now: fail before loading anything
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self._connect() if self.scheduler else self._local()
        return self._client

    def _connect(self) -> Client:
        from distributed import Client

        address = self.scheduler
        try:
            with quiet("distributed"):
                client = Client(address, timeout=self.timeout, set_as_default=False)
        except (OSError, TimeoutError):
            raise StageError(
                f"scheduler {address} did not answer within {self.timeout:g}s"
            ) from None
        except ValueError as e:
            raise StageError(f"bad scheduler address {address!r}: {e}") from None
        self._owned.append(client)
        return client

    def _local(self) -> Client:
        from distributed import Client, LocalCluster

        n = self.workers or 1
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # no dashboard; its HTTP routes on a free local port (not 8787, maybe taken)
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            silence_logs=logging.ERROR,
        )
        self._owned.append(cluster)
        client = Client(cluster, set_as_default=False)
        self._owned.append(client)
        return client

    def n_workers(self) -> int:
        """Workers connected now; waits up to ``timeout`` for a first one."""
        client = self.client
        try:
            client.wait_for_workers(1, timeout=self.timeout)
        except TimeoutError:
            raise StageError(
                f"scheduler {client.scheduler.address} has no workers (waited {self.timeout:g}s)"
            ) from None
        return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))

    def close(self) -> None:
        while self._owned:
            obj = self._owned.pop()  # the client first, then its local cluster
            with quiet("distributed"), contextlib.suppress(Exception):
                obj.close()
        self._client = None


@contextlib.contextmanager
def quiet(name: str) -> Iterator[None]:
    """Silence a logger below ERROR (distributed logs connection retries as warnings)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def raise_killed(e: BaseException, what: str) -> None:
    from distributed import KilledWorker

    if isinstance(e, KilledWorker):
        raise StageError(
            f"Dask workers died {what} too often ({e}); nothing was committed; "
            "run the same command again to resume"
        ) from None


def worker_address() -> str:
    """The Dask worker this runs on, or this process when not on a worker."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def absolute_root(root: str) -> str:
    """A local root as an absolute path (workers may run in another directory)."""
    return root if st.is_remote(root) else str(Path(root.removeprefix("file://")).resolve())
