"""`drct doctor`: a one-screen preflight of what a run will use and what is missing.

Each check returns a `Check` (name, status ``ok`` | ``warn`` | ``fail``, one line of detail); a
``fail`` is something that would stop the run (no space for the cache, a weights file that is not
there, an unreachable dask scheduler, a requested CUDA device that is absent), a ``warn`` something
that costs time or a download (no bf16 fast path, ImageNet weights not cached, a DICOM codec
missing). The precision is `pipeline.features.encoder.resolve_precision`'s own choice.
"""

from __future__ import annotations

import configparser
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
IMAGENET_FILE = "vgg16-397923af.pth"
# transfer syntaxes of head CTs (README of the real data: JPEG Lossless, JPEG 2000 and uncompressed)
TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
VECTOR_BYTES = 512 * 2  # one float16 512-d vector per slice and resolution
CACHE_OVERHEAD = 1.15   # HDF5 chunks, table, provenance


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def cpu_check(device: str, precision: str) -> list[Check]:
    import torch

    from pipeline.features.encoder import resolve_device, resolve_precision

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    present = [f for f in CPU_FLAGS if f in flags]
    checks = [Check("cpu", "ok" if "avx2" in flags or not flags else "warn",
                    f"{os.cpu_count()} cores; flags {', '.join(present) or 'none of ' + '/'.join(CPU_FLAGS)}; "
                    f"torch capability {torch.backends.cpu.get_cpu_capability()}")]
    try:
        dev = resolve_device(device)
        chosen = resolve_precision(precision, dev)
        slow = dev.type == "cpu" and chosen == "fp32"
        checks.append(Check("precision", "warn" if slow else "ok",
                            f"--device {device} -> {dev}; precision {precision} -> {chosen}"
                            + (" (no AMX/AVX512-BF16: VGG16 in fp32, the slow path)" if slow else "")))
    except Exception as exc:  # noqa: BLE001 - EncoderError: the run would stop the same way
        checks.append(Check("precision", "fail", str(exc)))
    return checks


def torch_check() -> Check:
    import torch

    build = f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build")
    if not torch.cuda.is_available():
        return Check("torch", "ok", build + "; no CUDA device")
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
    return Check("torch", "ok", build + "; " + "; ".join(devices))


def dicom_check() -> Check:
    import importlib.util

    from pydicom import pixels

    plugins = [name for name in ("gdcm", "pylibjpeg", "openjpeg", "libjpeg") if importlib.util.find_spec(name)]
    missing = []
    for uid, name in TRANSFER_SYNTAXES.items():
        try:
            ok = pixels.get_decoder(uid).is_available
        except (NotImplementedError, ValueError):
            ok = False
        if not ok:
            missing.append(name)
    detail = f"decoders: {', '.join(plugins) or 'none'} (pydicom built-ins for uncompressed/RLE); "
    detail += f"cannot decode: {', '.join(missing)}" if missing else f"all {len(TRANSFER_SYNTAXES)} CT transfer syntaxes"
    hint = " (pip install python-gdcm)" if missing else ""
    return Check("dicom", "warn" if missing else "ok", detail + hint)


def weights_check(weights: str) -> Check:
    import torch

    weights = str(weights)
    if weights.startswith("random:"):
        return Check("weights", "ok", f"{weights}: untrained VGG16, nothing to load (a demo: no learned features)")
    if weights == "imagenet":
        path = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE
        if path.is_file():
            return Check("weights", "ok", f"imagenet: cached at {path}")
        return Check("weights", "warn", f"imagenet: not in the torch hub cache ({path}); the first run downloads 528 MB "
                     "(offline: copy the file there, see README)")
    path = Path(weights)
    return Check("weights", "ok" if path.is_file() else "fail",
                 f"{path}: {'present' if path.is_file() else 'not found'}")


def count_slices(data: str | Path) -> int:
    """Files under `data` that may be DICOM slices (everything but CSV/JSON/text and hidden files)."""
    skip = {".csv", ".json", ".txt", ".md", ".yaml", ".yml", ".zip"}
    return sum(1 for p in Path(data).rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in skip)


def disk_check(cache_path: str | Path, data: str | Path | None, resolutions) -> Check:
    cache_path = Path(cache_path)
    where = cache_path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    text = f"{free / 2**30:.1f} GiB free at {where}"
    if data is None or not Path(data).exists():
        return Check("disk", "ok", text + ("" if data is None else f"; data {data} not found: no estimate"))
    slices = count_slices(data)
    need = int(slices * len(resolutions) * VECTOR_BYTES * CACHE_OVERHEAD)
    existing = cache_path.stat().st_size if cache_path.is_file() else 0
    status = "fail" if need - existing > free else "ok"
    return Check("disk", status, f"{text}; cache for {slices} files x {len(resolutions)} resolutions ~ {need / 2**20:.1f} MiB"
                 + (" (not enough space)" if status == "fail" else ""))


def dvc_check(repo: str | Path = ".") -> Check:
    path = Path(repo) / ".dvc" / "config"
    if not path.is_file():
        return Check("dvc", "warn", f"{path} not found (not a DVC repository here)")
    parser = configparser.ConfigParser()
    parser.read(path)
    core = parser["core"] if parser.has_section("core") else {}
    values = {key: str(core.get(key, "unset")).strip().lower() for key in ("analytics", "check_update")}
    offline = all(v == "false" for v in values.values())
    return Check("dvc", "ok" if offline else "warn",
                 ", ".join(f"core.{k}={v}" for k, v in values.items()) + ("" if offline else " (phones home: set both to false)"))


def scheduler_check(address: str | None, timeout: float = 5.0) -> Check:
    if not address:
        return Check("dask", "ok", "no --scheduler: a local cluster (or extract.workers: 0, in process)")
    try:
        from distributed import Client

        with Client(address, timeout=timeout) as client:
            workers = client.scheduler_info().get("workers", {})
        return Check("dask", "ok" if workers else "warn", f"{address}: {len(workers)} worker(s)")
    except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError: the run could not join it either
        return Check("dask", "fail", f"{address}: cannot connect ({type(exc).__name__}: {exc})")


def run_checks(config: dict, data: str | Path | None = None, cache_path: str | Path | None = None,
               device: str = "auto", scheduler: str | None = None, repo: str | Path = ".") -> list[Check]:
    extract = config["extract"]
    return [
        *cpu_check(device, str(extract.get("precision", "auto"))),
        torch_check(),
        dicom_check(),
        weights_check(str(extract.get("weights"))),
        disk_check(cache_path or extract.get("out") or "features/features.h5", data, extract.get("resolutions") or [224, 512]),
        dvc_check(repo),
        scheduler_check(scheduler),
    ]


def format_checks(checks: list[Check]) -> str:
    mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = [f"{mark[c.status]} {c.name:9s} {c.detail}" for c in checks]
    failed = [c.name for c in checks if c.status == "fail"]
    lines.append(f"-> the run would fail: {', '.join(failed)}" if failed else "-> ready")
    return "\n".join(lines)
