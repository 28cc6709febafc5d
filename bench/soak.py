"""Kill-and-resume soak of `drct extract`: SIGKILL at random moments, resume, compare.

    .venv/bin/python bench/soak.py [--kills 24] [--scans 10] [--seed 0] [--work DIR] [--workers 0]
                                   [--targeted] [--write-pause 0.3]

A small RSNA-layout phantom (32 px, random:0 encoder at 32/48 px, one scan per commit unit)
with two bad files added (a truncated slice, a text file), so the rejects list is not empty.
An uninterrupted extraction is the reference. Then rounds: each round starts a fresh OUT and
runs `drct extract` in its own process group, SIGKILLs the group at a random moment drawn
uniformly over the reference run's duration, and runs it again, until one run completes;
with --targeted each run instead draws its moment among: a random time, the next commit in
flight (a part's .tmp exists), the final merge in flight (OUT.tmp exists) -- commits and the
merge take milliseconds, so --write-pause (DRCT_WRITE_PAUSE, a sleep before each rename)
widens them enough to be hit;
rounds repeat until at least --kills kills happened. Where each kill landed is read from what
it left (OUT.parts/*.tmp: during a commit; OUT.tmp: during the final merge; OUT plus parts:
after the final rename) and tallied. After each round the cache is compared with the
reference: scans lost, scans duplicated, every dataset and attribute equal (so features
bit-identical), rejects CSV equal. Not part of the test suite (minutes); figures go to
BENCHMARKS.md ("Kill-and-resume soak").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cache.writer import parts_dir, rejects_path


def command(data: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "extract", "--data", str(data), "--layout", "rsna", "--out", str(out),
            "--resolutions", "32,48", "--weights", "random:0", "--workers", str(workers), "--scans-per-commit", "1",
            "--batch-size", "16", "--precision", "fp32", "--device", "cpu", "--no-progress"]


WRITE_PAUSE = {"value": ""}


def env() -> dict:
    extra = {"DRCT_WRITE_PAUSE": WRITE_PAUSE["value"]} if WRITE_PAUSE["value"] else {}
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
            **extra}


def make_data(root: Path, scans: int, seed: int) -> Path:
    subprocess.run([sys.executable, "-m", "stages.cli", "phantom", str(root), "--layout", "rsna", "--scans",
                    str(scans), "--seed", str(seed), "--size", "32", "--no-progress"], check=True, cwd=REPO, env=env(),
                   stdout=subprocess.DEVNULL)
    files = sorted((root / "stage_2_train").glob("*.dcm"))
    files[3].write_bytes(files[3].read_bytes()[:-300])             # pixels cut short: a slice reject
    (root / "stage_2_train" / "ID_notdicom.dcm").write_text("not a DICOM file\n")  # an index reject
    return root


def read_all(path: Path) -> dict:
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        arrays["attrs"] = {k: str(v) for k, v in f.attrs.items()}
    return arrays


def compare(out: Path, reference: Path) -> dict:
    got, want = read_all(out), read_all(reference)
    ids = [s.decode() for s in got["scans/scan_id"]]
    want_ids = [s.decode() for s in want["scans/scan_id"]]
    different = sorted(
        name for name in set(got) | set(want)
        if name != "attrs" and (name not in got or name not in want or got[name].dtype != want[name].dtype
                                or not np.array_equal(got[name], want[name]))
    )
    return {
        "scans_lost": len(set(want_ids) - set(ids)),
        "scans_duplicated": len(ids) - len(set(ids)),
        "datasets_differing": different,
        "attrs_equal": got["attrs"] == want["attrs"],
        "features_equal": not any(name.startswith("features/") for name in different),
        "rejects_csv_equal": rejects_path(out).read_text() == rejects_path(reference).read_text(),
        "rejects_rows": len(rejects_path(out).read_text().splitlines()) - 1,
    }


def phase_of(out: Path) -> str:
    """Where a kill landed, from what it left behind."""
    parts = parts_dir(out)
    if Path(str(out) + ".tmp").exists():
        return "during the final merge (OUT.tmp being written)"
    if out.exists() and parts.exists():
        return "after the final rename, before the parts were removed"
    if out.exists():
        return "after the final merge, while the process exited"
    if parts.exists() and list(parts.glob("*.tmp")):
        return "during a commit (a part's .tmp being written)"
    if parts.exists() and list(parts.glob("unit-*.h5")):
        return "between commits"
    return "before the first commit (startup, indexing)"


def run_once(cmd: list[str], kill_after: float | None, trigger=None) -> int | None:
    """Run; SIGKILL the process group after `kill_after` s, or as soon as `trigger()` is true.
    Returns the exit code, or None if killed."""
    process = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while process.poll() is None:
        if (deadline is not None and time.monotonic() >= deadline) or (trigger is not None and trigger()):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None
        time.sleep(0.01)
    if process.returncode != 0:
        raise RuntimeError(f"extract failed ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--scans", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="0: in-process decoding; N: a local dask cluster")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here too")
    parser.add_argument("--targeted", action="store_true", help="also aim kills at commits and the final merge")
    parser.add_argument("--write-pause", type=float, default=0.0, help="DRCT_WRITE_PAUSE seconds (with --targeted)")
    args = parser.parse_args()
    WRITE_PAUSE["value"] = str(args.write_pause) if args.write_pause else ""
    work = args.work or Path(tempfile.mkdtemp(prefix="drct-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    data = make_data(work / "data", args.scans, args.seed)

    reference = work / "reference" / "features.h5"
    start = time.perf_counter()
    run_once(command(data, reference, args.workers), None)
    duration = time.perf_counter() - start
    print(f"reference run: {duration:.1f} s", flush=True)

    kills, rounds, phases, aims = 0, [], collections.Counter(), collections.Counter()
    while kills < args.kills:
        out = work / f"round{len(rounds)}" / "features.h5"
        round_kills = 0
        while True:
            moment = rng.uniform(0.0, duration)
            trigger = None
            aim = rng.choice(("time", "commit", "merge")) if args.targeted else "time"
            if aim == "commit":
                trigger = lambda out=out: any(parts_dir(out).glob("*.h5.tmp"))
                moment = None
            elif aim == "merge":
                trigger = lambda out=out: Path(str(out) + ".tmp").exists()
                moment = None
            aims[aim] += 1
            if run_once(command(data, out, args.workers), moment, trigger) is None:
                kills += 1
                round_kills += 1
                phases[phase_of(out)] += 1
                continue
            break
        result = compare(out, reference)
        result["kills"] = round_kills
        rounds.append(result)
        print(f"round {len(rounds)}: {round_kills} kills, {json.dumps(result)}", flush=True)
        shutil.rmtree(out.parent)
    summary = {
        "kills": kills,
        "rounds": len(rounds),
        "reference_seconds": round(duration, 1),
        "kill_phases": dict(phases),
        "runs_by_aim": dict(aims),
        "write_pause_s": args.write_pause,
        "scans_lost": sum(r["scans_lost"] for r in rounds),
        "scans_duplicated": sum(r["scans_duplicated"] for r in rounds),
        "rounds_with_equal_features": sum(r["features_equal"] for r in rounds),
        "rounds_with_equal_caches": sum(not r["datasets_differing"] and r["attrs_equal"] for r in rounds),
        "rounds_with_equal_rejects": sum(r["rejects_csv_equal"] for r in rounds),
        "rejects_rows": rounds[0]["rejects_rows"] if rounds else 0,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
