"""Where stage-one tasks run: in this process, or on a dask.distributed cluster.

* `InlineExecutor` (``extract.workers: 0``): tasks run in this process when their result is asked for.
* `DaskExecutor`: a client of a local cluster or of an existing scheduler (``extract.scheduler``).
  The local cluster is ``extract.workers`` CPU processes of ``extract.threads_per_worker`` threads,
  or, where the encoder runs on CUDA, one worker per GPU: dask-cuda's ``LocalCUDACluster`` when the
  optional extra is installed (``pip install 'drct2-pipeline[cuda]'``), else an equivalent built
  here (one nanny per GPU with its own ``CUDA_VISIBLE_DEVICES``).

Faults: the scheduler reruns the tasks of a worker that dies on the other workers. When every
worker is gone, `DaskExecutor.result` raises a `ClusterError` after ``extract.worker_timeout``
seconds without a worker, instead of waiting forever; the committed units stay and a rerun
resumes. Secure links: TLS from ``--tls-ca/--tls-cert/--tls-key`` or dask's own config
(``distributed.comm.tls.*``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable

from cache.store import CacheError

POLL_SECONDS = 1.0  # how often a waiting client checks that the cluster still has workers


class ClusterError(CacheError):
    """The cluster cannot run the extraction (unreachable, no workers, a task that kills workers)."""


class _InlineFuture:
    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class InlineExecutor:
    """workers = 0: run each task in this process when its result is asked for (no parallelism)."""

    description = "this process (no dask)"
    n_slots = 1

    def submit(self, fn: Callable, *args):
        return _InlineFuture(fn, args)

    def result(self, future):
        return future.result()

    def close(self) -> None:
        pass


def make_security(tls_ca: str | None, tls_cert: str | None, tls_key: str | None):
    """dask `Security` from the three TLS files, or from dask's config (``distributed.comm.tls``) when none is given."""
    from distributed.security import Security

    given = [v for v in (tls_ca, tls_cert, tls_key) if v]
    if not given:
        return Security()
    if len(given) != 3:
        raise ClusterError(
            "TLS needs all three of --tls-ca, --tls-cert and --tls-key (extract.tls_ca/tls_cert/tls_key), "
            "or none of them to use dask's config (distributed.comm.tls.*)"
        )
    from pathlib import Path

    for what, path in (("CA", tls_ca), ("certificate", tls_cert), ("key", tls_key)):
        if not Path(path).is_file():
            raise ClusterError(f"TLS {what} file not found: {path}")
    return Security(tls_ca_file=tls_ca, tls_client_cert=tls_cert, tls_client_key=tls_key, require_encryption=True)


def cuda_devices() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _gpu_cluster(threads: int, log: Callable[[str], None]):
    """One worker per visible GPU: dask-cuda's LocalCUDACluster, else nannies with CUDA_VISIBLE_DEVICES."""
    gpus = cuda_devices()
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        from distributed import Nanny, Scheduler, SpecCluster

        log(
            "dask-cuda is not installed (pip install 'drct2-pipeline[cuda]'); starting one worker per GPU "
            "with CUDA_VISIBLE_DEVICES instead"
        )
        workers = {
            f"gpu-{k}": {
                "cls": Nanny,
                "options": {
                    "nthreads": threads,
                    "host": "127.0.0.1",
                    # Rotated like dask-cuda: each worker's own GPU is its cuda:0.
                    "env": {"CUDA_VISIBLE_DEVICES": ",".join(gpus[k:] + gpus[:k])},
                },
            }
            for k in range(len(gpus))
        }
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
        cluster = SpecCluster(scheduler=scheduler, workers=workers, silence_logs=logging.ERROR)
        return cluster, f"local GPU cluster ({len(gpus)} workers, one per GPU, {threads} threads each)"
    cluster = LocalCUDACluster(threads_per_worker=threads, dashboard_address=None, silence_logs=logging.ERROR)
    return cluster, f"dask-cuda LocalCUDACluster ({len(gpus)} workers, one per GPU, {threads} threads each)"


class DaskExecutor:
    """A dask.distributed client: of a local cluster, or of the scheduler at `address`."""

    def __init__(
        self,
        address: str | None,
        workers: int,
        *,
        threads: int = 1,
        gpu: bool = False,
        worker_timeout: float = 120.0,
        security=None,
        log: Callable[[str], None] = lambda m: None,
    ):
        from dask.distributed import Client, LocalCluster

        self.cluster = None
        self.worker_timeout = float(worker_timeout)
        self.address = address
        if address:
            try:
                # A scheduler that does not answer within min(20 s, worker_timeout) is unreachable.
                self.client = Client(address, timeout=min(20.0, self.worker_timeout), security=security)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(f"cannot reach the dask scheduler at {address}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - TLS/config errors come in many types
                raise ClusterError(f"cannot connect to the dask scheduler at {address}: {type(exc).__name__}: {exc}") from None
            self.description = f"dask scheduler {address}"
        else:
            with warnings.catch_warnings():  # "port 8787 in use" of the (disabled) dashboard's HTTP server
                warnings.simplefilter("ignore", UserWarning)
                if gpu:
                    self.cluster, self.description = _gpu_cluster(threads, log)
                else:
                    self.cluster = LocalCluster(
                        n_workers=workers,
                        threads_per_worker=threads,
                        processes=True,
                        dashboard_address=None,
                        silence_logs=logging.ERROR,
                    )
                    self.description = f"local dask cluster ({workers} worker processes x {threads} threads)"
            self.client = Client(self.cluster)

    # -- the workers ---------------------------------------------------------------------------
    def _nthreads(self) -> dict:
        try:
            return self.client.nthreads()
        except Exception as exc:  # noqa: BLE001 - CommClosedError, OSError, TimeoutError...
            raise ClusterError(
                f"lost the dask scheduler{' at ' + self.address if self.address else ''} "
                f"({type(exc).__name__}: {exc}); committed scans are kept: run the same command again to resume"
            ) from None

    @property
    def n_slots(self) -> int:
        """Task threads of the cluster now (at least 1)."""
        return max(1, sum(self._nthreads().values()))

    def wait_for_workers(self) -> None:
        """Wait up to worker_timeout for a first worker (a remote cluster may still be starting)."""
        deadline = time.monotonic() + self.worker_timeout
        while not self._nthreads():
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the dask scheduler {self.address} has no workers (waited {self.worker_timeout:g} s, "
                    "extract.worker_timeout); start `dask worker` processes that can import this package"
                )
            time.sleep(POLL_SECONDS / 4)

    def run_on_workers(self, fn: Callable, *args) -> dict:
        """`fn(*args)` on every worker now; {worker address: result}. A failure names the worker."""
        try:
            return self.client.run(fn, *args)
        except ImportError as exc:
            raise ClusterError(
                f"the dask workers cannot import the pipeline ({exc}); install this package on every worker"
            ) from None
        except CacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the worker raised, said plainly
            raise ClusterError(f"a dask worker failed to set up: {type(exc).__name__}: {exc}") from None

    # -- tasks ---------------------------------------------------------------------------------
    def submit(self, fn: Callable, *args):
        return self.client.submit(fn, *args, pure=False)

    def result(self, future):
        """The task's result. Raises ClusterError when the cluster has had no worker for
        worker_timeout seconds, when the scheduler is lost, or when the task killed workers."""
        from distributed import KilledWorker

        no_workers_since = None
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except TimeoutError:
                pass
            except KilledWorker as exc:
                raise ClusterError(
                    f"a stage-one task was running on every worker that died ({exc}); out of memory, or a decoder "
                    "crash? Committed scans are kept: fix the cause and run the same command again to resume"
                ) from None
            except CacheError:
                raise
            except Exception as exc:  # noqa: BLE001 - an exception raised inside the task
                raise ClusterError(f"a stage-one task failed on a dask worker: {type(exc).__name__}: {exc}") from None
            if self._nthreads():
                no_workers_since = None
                continue
            now = time.monotonic()
            no_workers_since = no_workers_since or now
            if now - no_workers_since > self.worker_timeout:
                raise ClusterError(
                    f"every dask worker is gone: none for {self.worker_timeout:g} s (extract.worker_timeout). "
                    "Committed scans are kept: start workers again and run the same command to resume"
                )

    def close(self) -> None:
        """Close the client (and the local cluster); safe to call twice, and after a lost scheduler."""
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        if client is not None:
            with contextlib.suppress(Exception):  # a lost scheduler must not hide the real error
                client.close(timeout=10)
        if cluster is not None:
            cluster.close()
