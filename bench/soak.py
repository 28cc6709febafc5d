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

    .venv/bin/python bench/soak.py --mode train [--kills 8] [--scans 45] [--seed 0] [--epochs 2]
                                   [--folds 3] [--epoch-pause 0.5] [--work DIR]

The same for `drct train` (issue 16): a synthetic cache (pipeline/synthetic/synthetic.py, the
sizes of tests/test_train.py), an uninterrupted `drct train` as the reference, then rounds: each
round starts a fresh run directory, runs `drct train` in its own process group and sends the
group SIGTERM or SIGKILL (drawn with the seed) at a moment drawn uniformly over the reference
run's duration, then reruns the same command (it resumes at the first unfinished fold; a SIGKILL
leaves RUN.lock, whose flock the kernel released) until one run exits 0. After each kill: the
exit code (143 and one "stopped by SIGTERM" line when the handler ran), the folds kept, whether
incomplete.json marks the run. After each round: every oof.npz array (np.array_equal, dtype
too), every fold checkpoint tensor and every fold history (timings left out) equal to the
reference, no incomplete.json, no *.tmp. DRCT_EPOCH_PAUSE (a sleep after each epoch, in the
reference too) spreads the kills over the folds; it changes no number.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
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


# -- train mode ------------------------------------------------------------------------------
TRAIN_SETTINGS = {  # tests/test_train.py's SMALL: seconds per fold on 2 CPU cores
    "sampler.m": 8, "model.m_key": 4, "model.gru_hidden": 8, "model.aps_gru_hidden": 8, "model.aps_fc": 16,
    "model.fc_hidden": [16, 12], "model.fusion_dim": 16, "train.batch_size": 16, "train.threads": 1,
}
LABEL_NAMES = ["any", "bleed", "fracture"]


def make_train_cache(path: Path, scans: int, folds: int, seed: int) -> Path:
    from pipeline.config import load_config
    from pipeline.synthetic.synthetic import write_synthetic_cache

    config = load_config(None, {**TRAIN_SETTINGS, "train.folds": folds})
    return write_synthetic_cache(path, config, LABEL_NAMES, n_scans=scans, slices=(5, 30), scans_per_patient=2,
                                 seed=seed)


def train_command(cache: Path, out: Path, epochs: int, folds: int) -> list[str]:
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**TRAIN_SETTINGS, "train.folds": folds}.items()]
    return [sys.executable, "-m", "stages.cli", "train", "--cache", str(cache), "--out", str(out), "--model", "drct2",
            "--epochs", str(epochs), "--quiet", *sets]


def run_train_once(cmd: list[str], kill_after: float | None, signum: int, epoch_pause: float) -> tuple[int, str]:
    """Run `drct train` in its own process group; send the group `signum` after `kill_after` s.
    Returns (exit code, stderr); a negative code is the signal that ended it unhandled."""
    environment = {**env(), "DRCT_EPOCH_PAUSE": str(epoch_pause)}
    process = subprocess.Popen(cmd, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = None if kill_after is None else time.monotonic() + kill_after
    sent = False
    while process.poll() is None:
        if not sent and deadline is not None and time.monotonic() >= deadline:
            os.killpg(process.pid, signum)
            sent = True
        time.sleep(0.01)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a SIGTERM that does not stop it within 2 minutes is a bug
        os.killpg(process.pid, signal.SIGKILL)
        raise RuntimeError("drct train did not stop within 120 s of SIGTERM") from None
    return process.returncode, stderr


def _oof(run: Path) -> dict:
    with np.load(run / "oof.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _folds_kept(run: Path) -> list[int]:
    try:
        return sorted(int(k) for k in set(_oof(run)["fold"].tolist()))
    except (OSError, ValueError, KeyError, EOFError):
        return []


def _history(path: Path) -> list[dict]:
    return [{k: v for k, v in epoch.items() if "seconds" not in k} for epoch in json.loads(path.read_text())]


def compare_runs(run: Path, reference: Path, folds: int) -> dict:
    import torch

    got, want = _oof(run), _oof(reference)
    oof_differing = sorted(k for k in set(got) | set(want) if k not in got or k not in want
                           or got[k].dtype != want[k].dtype or not np.array_equal(got[k], want[k]))
    tensors_differing, histories_differing = [], []
    for k in range(folds):
        a = torch.load(run / f"fold_{k}" / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]
        b = torch.load(reference / f"fold_{k}" / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]
        tensors_differing += [f"fold_{k}:{n}" for n in sorted(set(a) | set(b))
                              if n not in a or n not in b or not torch.equal(a[n], b[n])]
        if _history(run / f"fold_{k}" / "history.json") != _history(reference / f"fold_{k}" / "history.json"):
            histories_differing.append(k)
    return {
        "oof_arrays": len(want),
        "oof_differing": oof_differing,
        "checkpoint_tensors_differing": tensors_differing,
        "histories_differing": histories_differing,
        "incomplete_left": (run / "incomplete.json").exists(),
        "tmp_left": [str(p.relative_to(run)) for p in run.rglob("*.tmp")],
    }


def soak_train(args) -> None:
    import platform

    work = args.work or Path(tempfile.mkdtemp(prefix="drct-soak-train-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    scans = args.scans or 45
    cache = make_train_cache(work / "features.h5", scans, args.folds, args.seed)
    reference = work / "reference"
    start = time.perf_counter()
    code, stderr = run_train_once(train_command(cache, reference, args.epochs, args.folds), None, 0, args.epoch_pause)
    duration = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"reference train failed ({code}): {stderr[-2000:]}")
    print(f"reference run: {duration:.1f} s", flush=True)

    kills, resumes, rounds = 0, 0, []
    by_signal, outcomes, kept_at_kill = collections.Counter(), collections.Counter(), collections.Counter()
    problems: list[str] = []
    lines = collections.Counter()  # the SIGTERM lines, fold numbers as N
    while kills < args.kills:
        run = work / f"round{len(rounds)}"
        cmd = train_command(cache, run, args.epochs, args.folds)
        round_kills = 0
        while True:
            signum = rng.choice((signal.SIGTERM, signal.SIGKILL))
            moment = rng.uniform(0.0, duration)
            resumes += round_kills > 0  # a rerun on the killed run directory
            code, stderr = run_train_once(cmd, moment, signum, args.epoch_pause)
            if code == 0:  # it finished before the signal (or the signal came after its last write)
                break
            name = signal.Signals(signum).name
            if code not in (128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGKILL):
                problems.append(f"round {len(rounds)}: {name} gave exit {code}: {stderr.strip()[-500:]}")
                raise RuntimeError(problems[-1])
            kills += 1
            round_kills += 1
            by_signal[name] += 1
            stopped = [line for line in stderr.splitlines() if "stopped by SIGTERM" in line]
            if code == 128 + signal.SIGTERM:
                outcome = "SIGTERM handled: exit 143, one line"
                if len(stopped) != 1 or "Traceback" in stderr:
                    problems.append(f"round {len(rounds)}: SIGTERM exit 143 without exactly one line: {stderr[-500:]}")
            elif code == -signal.SIGTERM:  # at startup, or after the last fold (handlers restored)
                outcome = "SIGTERM outside the handler: exit -15"
            else:
                outcome = "SIGKILL"
            marked = (run / "incomplete.json").exists()
            folds = _folds_kept(run)
            state = ("marked incomplete" if marked else "no incomplete.json" if (run / "run.json").exists()
                     else "nothing written yet")
            outcomes[f"{outcome}; {state}"] += 1
            if stopped:
                lines[re.sub(r"\d+", "N", stopped[0].replace(str(run), "RUN"))] += 1
            kept_at_kill[f"{len(folds)} fold(s) kept"] += 1
            print(f"  kill {kills}: {name} at {moment:.1f} s -> exit {code}, {state}, folds kept {folds}", flush=True)
            if (run / "run.json").exists() and not marked and len(folds) < args.folds:
                problems.append(f"round {len(rounds)}: {name} left {folds} without incomplete.json")
        result = compare_runs(run, reference, args.folds)
        result["kills"] = round_kills
        result["equal"] = not (result["oof_differing"] or result["checkpoint_tensors_differing"]
                               or result["histories_differing"] or result["incomplete_left"] or result["tmp_left"])
        rounds.append(result)
        print(f"round {len(rounds)}: {round_kills} kills, {json.dumps(result)}", flush=True)
        shutil.rmtree(run)
    flags = ""
    try:
        cpu = Path("/proc/cpuinfo").read_text().split("\n")
        have = set(next(line for line in cpu if line.startswith("flags")).split(":", 1)[1].split())
        flags = " ".join(f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have)
    except (OSError, StopIteration):
        pass
    summary = {
        "mode": "train",
        "kills": kills,
        "by_signal": dict(by_signal),
        "resumes": resumes,
        "rounds": len(rounds),
        "rounds_equal": sum(r["equal"] for r in rounds),
        "oof_arrays_compared": rounds[0]["oof_arrays"] if rounds else 0,
        "reference_seconds": round(duration, 1),
        "epoch_pause_s": args.epoch_pause,
        "kill_outcomes": dict(outcomes),
        "folds_kept_at_kill": dict(kept_at_kill),
        "sigterm_lines": dict(lines),
        "problems": problems,
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("extract", "train"), default="extract")
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--scans", type=int, default=None, help="phantom scans (extract: 10) or cache scans (train: 45)")
    parser.add_argument("--epochs", type=int, default=2, help="train mode: epochs per fold")
    parser.add_argument("--folds", type=int, default=3, help="train mode: folds")
    parser.add_argument("--epoch-pause", type=float, default=0.5, help="train mode: DRCT_EPOCH_PAUSE seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="0: in-process decoding; N: a local dask cluster")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here too")
    parser.add_argument("--targeted", action="store_true", help="also aim kills at commits and the final merge")
    parser.add_argument("--write-pause", type=float, default=0.0, help="DRCT_WRITE_PAUSE seconds (with --targeted)")
    args = parser.parse_args()
    if args.mode == "train":
        return soak_train(args)
    args.scans = args.scans or 10
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
