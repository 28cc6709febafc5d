"""Stage one on a loopback dask cluster (a `dask scheduler` and `dask worker` processes on 127.0.0.1):
workers encode and the cache equals an in-process run; a killed worker's tasks rerun elsewhere;
every worker gone is a clear error within extract.worker_timeout, the committed units stay and a
rerun resumes; TLS with a CA made here. Tiny: 6 scans x 4 slices of 32 px, VGG16 at 32 and 48 px."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_extract import assert_same_cache, extract, write_dataset

from cache.store import CacheError
from cache.verify import verify_parts
from cache.writer import parts_dir
from pipeline.features.extraction import PAUSE_ENV

REPO = Path(__file__).resolve().parent.parent


def _dask(*args: str) -> list[str]:
    """The `dask` command of this interpreter's environment."""
    return [str(Path(sys.executable).with_name("dask")), *args]


class Loopback:
    """A scheduler and worker processes on 127.0.0.1, each in its own process group."""

    def __init__(self, tmp: Path, tls: dict | None = None):
        self.tmp, self.tls = tmp, tls
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.scheduler_file = tmp / "scheduler.json"
        self.workers: list[subprocess.Popen] = []
        tls_args = [] if tls is None else ["--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"], "--tls-key", tls["key"]]
        protocol = ["--protocol", "tls"] if tls else []
        self.scheduler = self._start(
            _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                  "--scheduler-file", str(self.scheduler_file), *protocol, *tls_args), "scheduler")
        self.address = self._wait_for_address(timeout=120)
        self._worker_args = ["--scheduler-file", str(self.scheduler_file), "--nthreads", "1", "--no-nanny",
                             "--no-dashboard", "--host", "127.0.0.1", *tls_args]

    def _wait_for_address(self, timeout: float) -> str:
        """The scheduler's address, once its scheduler file is complete: the file appears before its
        JSON is written, so an empty or half-written file means "not yet", not an error."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.scheduler.poll() is None, (self.tmp / "scheduler.log").read_text()
            try:
                return json.loads(self.scheduler_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.1)
        raise AssertionError(f"no scheduler address in {timeout:g} s: {(self.tmp / 'scheduler.log').read_text()}")

    def _start(self, command: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def add_workers(self, n: int) -> None:
        for _ in range(n):
            self.workers.append(self._start(_dask("worker", *self._worker_args), f"worker{len(self.workers)}"))
        if n:
            self.wait_for_workers(len([w for w in self.workers if w.poll() is None]))

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client
        from distributed.security import Security

        security = Security(tls_ca_file=self.tls["ca"], tls_client_cert=self.tls["cert"],
                            tls_client_key=self.tls["key"], require_encryption=True) if self.tls else None
        with Client(self.address, security=security, timeout="60s") as client:
            client.wait_for_workers(n, timeout=180)

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            self.kill(process)


@pytest.fixture
def loopback(tmp_path):
    clusters: list[Loopback] = []

    def make(n_workers: int, tls: dict | None = None) -> Loopback:
        cluster = Loopback(tmp_path, tls)
        clusters.append(cluster)
        cluster.add_workers(n_workers)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dicom"))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An in-process run (workers: 0): the vectors every cluster run must equal."""
    out = tmp_path_factory.mktemp("ref") / "features.h5"
    extract(out, dataset)
    return out


def kill_when_committed(out: Path, process: subprocess.Popen, killed_at: list[float]) -> threading.Thread:
    """A thread that SIGKILLs `process` as soon as the first unit of `out` is committed."""

    def watch() -> None:
        deadline = time.time() + 120
        while not list(parts_dir(out).glob("unit-*.h5")) and time.time() < deadline:
            time.sleep(0.05)
        Loopback.kill(process)
        killed_at.append(time.monotonic())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_workers_encode_and_equal_an_in_process_run(loopback, dataset, reference, tmp_path):
    cluster = loopback(2)
    out = tmp_path / "features.h5"
    result = extract(out, dataset, scheduler=cluster.address)
    assert result.where == f"dask scheduler {cluster.address}"
    assert result.encode_seconds == 0.0  # nothing was encoded in this process
    assert result.n_slices == 24
    assert_same_cache(out, reference)


def test_a_killed_worker_loses_nothing(loopback, dataset, reference, tmp_path, monkeypatch):
    cluster = loopback(2)
    out = tmp_path / "features.h5"
    monkeypatch.setenv(PAUSE_ENV, "1.5")  # units keep coming after the kill
    killed_at: list[float] = []
    watcher = kill_when_committed(out, cluster.workers[0], killed_at)
    result = extract(out, dataset, scheduler=cluster.address, worker_timeout=60)
    watcher.join(5)
    assert killed_at and cluster.workers[0].returncode == -signal.SIGKILL
    assert result.n_scans == 6 and result.skipped_scans == 0
    assert_same_cache(out, reference)


def test_every_worker_gone_is_a_clear_error_and_a_rerun_resumes(loopback, dataset, reference, tmp_path,
                                                                 monkeypatch):
    cluster = loopback(1)
    out = tmp_path / "features.h5"
    monkeypatch.setenv(PAUSE_ENV, "1.5")
    killed_at: list[float] = []
    watcher = kill_when_committed(out, cluster.workers[0], killed_at)
    with pytest.raises(CacheError, match=r"every dask worker is gone: none for 3 s \(extract.worker_timeout\)"):
        extract(out, dataset, scheduler=cluster.address, worker_timeout=3)
    watcher.join(5)
    assert killed_at and time.monotonic() - killed_at[0] < 3 + 20  # the timeout, not forever
    report = verify_parts(parts_dir(out))
    assert report.ok, report.problems
    assert not out.exists()
    monkeypatch.delenv(PAUSE_ENV)
    result = extract(out, dataset)  # in-process rerun: resumes after the committed units
    assert 2 <= result.skipped_scans < 6
    assert_same_cache(out, reference)


def test_no_worker_at_all_and_unreachable_scheduler_are_clear_errors(loopback, dataset, tmp_path):
    cluster = loopback(0)
    with pytest.raises(CacheError, match=r"has no workers \(waited 1 s, extract.worker_timeout\)"):
        extract(tmp_path / "a.h5", dataset, scheduler=cluster.address, worker_timeout=1)
    cluster.close()
    with pytest.raises(CacheError, match="cannot reach the dask scheduler at"):
        extract(tmp_path / "b.h5", dataset, scheduler=cluster.address, worker_timeout=2)


def make_tls_files(folder: Path) -> dict:
    """A self-signed CA and a certificate it signs for 127.0.0.1 (shared by scheduler, workers and client)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "drct test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return {name: str(path) for name, path in files.items()}


def test_tls_on_loopback(loopback, dataset, reference, tmp_path):
    tls = make_tls_files(tmp_path)
    cluster = loopback(1, tls=tls)
    assert cluster.address.startswith("tls://")
    out = tmp_path / "features.h5"
    extract(out, dataset, scheduler=cluster.address, tls_ca=tls["ca"], tls_cert=tls["cert"], tls_key=tls["key"])
    assert_same_cache(out, reference)
    # Without the flags, dask's own config supplies the files.
    import dask

    tls_config = {"distributed.comm.tls.ca-file": tls["ca"], "distributed.comm.tls.client.cert": tls["cert"],
                  "distributed.comm.tls.client.key": tls["key"]}
    with dask.config.set(tls_config):
        extract(tmp_path / "by-config.h5", dataset, scheduler=cluster.address)
    assert_same_cache(tmp_path / "by-config.h5", reference)
    with pytest.raises(CacheError, match="TLS needs all three of --tls-ca, --tls-cert and --tls-key"):
        extract(tmp_path / "b.h5", dataset, scheduler=cluster.address, tls_ca=tls["ca"])
    with pytest.raises(CacheError, match="TLS key file not found"):
        extract(tmp_path / "b.h5", dataset, scheduler=cluster.address, tls_ca=tls["ca"], tls_cert=tls["cert"],
                tls_key=str(tmp_path / "missing.pem"))


def test_without_dask_cuda_one_worker_per_gpu_is_still_started(monkeypatch):
    """The fallback of the `cuda` extra: one nanny per GPU, each seeing its own GPU first."""
    import builtins

    import pipeline.features.cluster as cluster_module
    from pipeline.features.cluster import DaskExecutor

    real_import = builtins.__import__

    def no_dask_cuda(name, *args, **kwargs):
        if name.startswith("dask_cuda"):
            raise ImportError("No module named 'dask_cuda'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask_cuda)
    monkeypatch.setattr(cluster_module, "cuda_devices", lambda: ["0", "1"])
    logs: list[str] = []
    executor = DaskExecutor(None, 0, threads=1, gpu=True, log=logs.append)
    try:
        assert "dask-cuda is not installed (pip install 'drct2-pipeline[cuda]')" in logs[0]
        assert executor.description == "local GPU cluster (2 workers, one per GPU, 1 threads each)"
        seen = executor.run_on_workers(os.getenv, "CUDA_VISIBLE_DEVICES")  # runs on each worker
        assert sorted(seen.values()) == ["0,1", "1,0"]
    finally:
        executor.close()


def test_workers_that_would_encode_differently_are_refused():
    from pipeline.features.extraction import _check_workers

    info = {"host": "h", "pid": 1, "device": "cpu", "device_name": "cpu", "precision": "fp32", "digest": "a" * 64}
    assert _check_workers({"w1": info, "w2": info}, "a" * 64, "fp32") == "2 workers encode on cpu fp32"
    with pytest.raises(CacheError, match="dask worker w2 .h. loaded other weights"):
        _check_workers({"w1": info, "w2": {**info, "digest": "b" * 64}}, "a" * 64, "fp32")
    with pytest.raises(CacheError, match="would not all encode alike .wanted fp32; w1: cpu fp32, w2: cuda:0 bf16"):
        _check_workers({"w1": info, "w2": {**info, "device": "cuda:0", "precision": "bf16"}}, "a" * 64, "fp32")
