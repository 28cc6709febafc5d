"""The DVC pipeline end to end on a tiny phantom, in a temporary git repository.

Proves: `dvc repro` from clean produces metrics, dvclive training curves, the m_key sweep and
reports; a second `dvc repro` is a no-op; a head-parameter experiment (`dvc exp run -S
train.lr_primary=...`) reruns train/evaluate/interpret/report but never data, extract or the
sweep, and no CNN forward happens in train or evaluate (every Conv2d call of every Python process
is logged by a sitecustomize hook; the report stage's heatmaps of the five top slices are the
only convolutions allowed); README ablations work with -S; `dvc exp show` lists the experiment
with metrics and only params.yaml's params; `dvc metrics diff` compares with the committed
baseline; `dvc plots show` renders offline with the PNGs as images.
Also checks the static contract of dvc.yaml, the committed baseline and the real-data configs
without running DVC.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"

# Logs the first Conv2d forward of each process (pid and command) to $DRCT_CONV_LOG.
SITECUSTOMIZE = '''
import importlib.machinery, os, sys
_LOG = os.environ.get("DRCT_CONV_LOG")

class _ConvHook:
    def find_spec(self, name, path, target=None):
        if name != "torch.nn.modules.conv" or not _LOG:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            forward = module.Conv2d._conv_forward
            logged = []

            def _conv_forward(self, input, weight, bias):
                if not logged:
                    logged.append(1)
                    with open(_LOG, "a") as handle:
                        handle.write(f"{os.getpid()} {' '.join(os.path.basename(a) for a in sys.argv[:2])}\\n")
                return forward(self, input, weight, bias)

            module.Conv2d._conv_forward = _conv_forward

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _ConvHook())
'''

TINY_PARAMS = {
    "phantom": {"scans": 6, "seed": 3, "layout": "rsna", "size": 32},
    "adapt": {"data": None, "epochs": 1},
    "dataset": {"layout": "rsna", "data": "data/phantom", "labels": None},
    "extract": {"resolutions": [32, 64], "weights": "random:0", "aps_source": "upsampled", "workers": 0,
                "batch_size": 64},
    "sampler": {"m": 8},
    "model": {"name": "drct2", "m_key": 4, "aps_selection": "attention", "aps_resolution": "last"},
    "train": {"loss": "mse_mse_bce", "lr_primary": 0.0005, "lr_aps": 0.0003, "lr_fusion": 0.0005, "epochs": 1,
              "batch_size": 4, "folds": 2},
    "evaluate": {"threshold": 0.5},
    "interpret": {"sweep_m_keys": "2,4", "sweep_epochs": 1},
}


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def params_keys(stage: dict, file: str) -> list[str]:
    keys = []
    for entry in stage.get("params", []):
        if isinstance(entry, str) and file == "params.yaml":
            keys.append(entry)
        elif isinstance(entry, dict) and file in entry:
            keys.extend(entry[file])
    return keys


def lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


# -- static contract (fast) --------------------------------------------------------------------


def test_extract_never_depends_on_head_code_or_keys():
    stages = dvc_yaml()["stages"]
    extract_deps = stages["extract"]["deps"]
    assert not any(d.startswith(("pipeline/heads", "pipeline/training", "configs")) for d in extract_deps)
    extract_keys = params_keys(stages["extract"], "params.yaml") + params_keys(stages["extract"], "configs/defaults.yaml")
    assert not any(k.split(".")[0] in ("model", "train", "sampler", "evaluate") for k in extract_keys)
    train_deps = stages["train"]["deps"]
    assert not any(d in ("pipeline/features", "pipeline/data") or d.startswith("pipeline/data") for d in train_deps)


def test_params_come_from_params_yaml_only():
    """`dvc exp show` lists only params.yaml's keys: no stage lists another params file, and the
    head stages depend on configs/defaults.yaml as a file instead (extract never does)."""
    stages = dvc_yaml()["stages"]
    for name, stage in stages.items():
        assert all(isinstance(entry, str) for entry in stage.get("params", [])), name
    assert "configs/defaults.yaml" in stages["train"]["deps"] and "configs/defaults.yaml" in stages["sweep"]["deps"]
    assert "configs/defaults.yaml" not in stages["extract"]["deps"]
    # every key that changes the vectors is written out in params.yaml (extract tracks its sections)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert {"dataset", "extract"} <= set(stages["extract"]["params"])
    for key in ("resolutions", "weights", "aps_source", "windows", "precision"):
        assert key in params["extract"], key
    assert "scan_labels" in params["dataset"]


def test_readme_ablations_work_with_S():
    """-S only modifies keys that exist in params.yaml: every ablation the README names is there."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    readme = (REPO / "README.md").read_text()
    keys = {"model.aps_selection", "model.aps_resolution", "train.loss", "model.name", "model.m_key", "train.lr_primary"}
    for key in keys:
        assert key in readme, key
        lookup(params, key)
    tracked = {k.split(".")[0] for k in dvc_yaml()["stages"]["train"]["params"]}
    assert {"model", "train", "sampler"} <= tracked


def test_head_experiments_do_not_rerun_the_sweep():
    stages = dvc_yaml()["stages"]
    assert "--train-sweep" not in stages["interpret"]["cmd"]
    assert "runs/drct" not in stages["sweep"]["deps"]
    assert not any(str(p).startswith(("train", "model")) for p in stages["sweep"]["params"])


def test_progress_is_shown_under_dvc():
    for name, stage in dvc_yaml()["stages"].items():
        assert "--no-progress" not in stage["cmd"] and "--quiet" not in stage["cmd"], name


def test_committed_baseline():
    """dvc.lock and every small cache: false output (metrics, plot tables and images) are in git,
    so `dvc exp show` / `dvc metrics diff` compare against the demo's baseline; PNGs are image plots."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    stages = dvc_yaml()["stages"]
    assert set(lock["stages"]) == set(stages)
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split())
    for name, stage in stages.items():
        for section in ("metrics", "plots"):
            for entry in stage.get(section, []):
                path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                assert options.get("cache") is False, (name, path)
                if (REPO / path).is_dir():
                    assert any(t.startswith(path + "/") for t in tracked), path
                else:
                    assert path in tracked, path
    pngs = [next(iter(e)) for st in stages.values() for e in st.get("plots", []) if str(next(iter(e))).endswith(".png")]
    assert len(pngs) >= 3
    assert "dvc_plots/" in (REPO / ".gitignore").read_text()


EXP_SHOW_META = ("Experiment", "rev", "typ", "Created", "parent")  # the non-data columns of `dvc exp show --csv`
MAX_COLUMNS = 40


def _leaves(value, prefix=""):
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{prefix}{key}.")]
    return [prefix[:-1]]


def test_metric_columns_of_the_committed_baseline_fit_the_table():
    """`dvc exp show` has one column per leaf of every declared metrics file: with its meta columns
    they stay within MAX_COLUMNS (issue 17: 252 before), and the headline has its intervals and n."""
    import json

    columns = []
    for stage in dvc_yaml()["stages"].values():
        for entry in stage.get("metrics", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            columns += _leaves(json.loads((REPO / path).read_text()))
    assert len(EXP_SHOW_META) + len(columns) <= MAX_COLUMNS, columns
    headline = json.loads((REPO / "metrics/metrics.json").read_text())
    for key in ("macro_precision", "macro_recall", "macro_f1", "macro_auc", "macro_ap"):
        assert headline[f"{key}_ci_low"] <= headline[key] <= headline[f"{key}_ci_high"], key
    assert "n" in headline and "per_class" not in headline and "per_fold" not in headline
    details = json.loads((REPO / "metrics/metrics_details.json").read_text())
    assert {"per_class", "per_fold", "calibration", "training_curves"} <= set(details)


@pytest.mark.parametrize("config", ["params.yaml", "configs/cq500.yaml", "configs/rsna.yaml"])
def test_params_files_hold_every_listed_key(config):
    """configs/cq500.yaml and rsna.yaml can replace params.yaml: every params.yaml key a stage
    other than the phantom lists exists in them, and they load through load_config."""
    data = yaml.safe_load((REPO / config).read_text())
    merged = load_config(REPO / config)
    for name, stage in dvc_yaml()["stages"].items():
        if name == "data" and config != "params.yaml":
            continue
        for key in params_keys(stage, "params.yaml"):
            lookup(data, key)
        for key in params_keys(stage, "configs/defaults.yaml"):
            lookup(merged, key)


def test_real_configs_have_the_papers_settings():
    cq500, rsna = load_config(REPO / "configs/cq500.yaml"), load_config(REPO / "configs/rsna.yaml")
    assert (cq500["sampler"]["m"], cq500["train"]["folds"], cq500["train"]["batch_size"]) == (32, 10, 32)
    assert (rsna["sampler"]["m"], rsna["train"]["folds"], rsna["train"]["batch_size"]) == (28, 5, 256)
    for c in (cq500, rsna):
        assert c["extract"]["resolutions"] == [224, 512] and c["extract"]["weights"] == "imagenet"
        assert c["model"]["m_key"] == 16 and c["train"]["epochs"] == 100
        assert (c["train"]["lr_primary"], c["train"]["lr_aps"], c["train"]["lr_fusion"]) == (5e-4, 3e-4, 5e-4)


def test_dvc_never_phones_home():
    config = (REPO / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "check_update = false" in config


# -- end to end ----------------------------------------------------------------------------------


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    keep = ("pipeline/", "stages/", "cache/", "configs/", ".dvc/", "dvc.yaml", ".dvcignore", "pyproject.toml")
    for name in files:
        if name.startswith(keep) and (REPO / name).is_file() and "__pycache__" not in name:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".gitignore").write_text("/data/\n/features/\n/runs/\n/reports/\n__pycache__/\ndvc_plots/\n")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.skipif(not DVC.is_file(), reason="dvc is not installed in this environment")
def test_dvc_repro_and_head_experiment(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_tree(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    conv_log = tmp_path / "conv.log"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{hook}{os.pathsep}{repo}",  # the copy's code, not the editable install's
        "DRCT_CONV_LOG": str(conv_log),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost",
        "DVC_NO_ANALYTICS": "1",
    }

    def run(*args: str) -> str:
        done = subprocess.run(args, check=False, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def conv_processes() -> list[str]:
        return conv_log.read_text().splitlines() if conv_log.exists() else []

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "tiny pipeline")

    out = run(str(DVC), "repro")
    for stage in ("data", "extract", "train", "evaluate", "interpret", "sweep", "report"):
        assert f"Running stage '{stage}'" in out
    assert "slice/s" in out  # extract's progress bar (rate and ETA) reaches the DVC log
    metrics = json.loads((repo / "metrics/metrics.json").read_text())
    assert metrics  # the evaluate stage wrote its metrics
    assert (repo / "reports/drct/index.html").is_file()
    interpretation = json.loads((repo / "metrics/interpret/interpret.json").read_text())
    assert {"easy", "difficult", "comprehensive"} <= set(interpretation["tasks"])
    sweep = json.loads((repo / "metrics/sweep/sweep.json").read_text())
    assert len(sweep["points"]) == 2 * 2  # 2 m_key x (attention, random), mean and std over folds
    assert all(set(p) == {"macro_f1", "macro_f1_std"} for p in sweep["points"].values())
    live = json.loads((repo / "metrics/train/metrics.json").read_text())
    assert set(live) == {"epochs", "last_loss_fold_mean", "last_val_macro_f1_fold_mean", "last_val_macro_auc_fold_mean"}
    curve = (repo / "metrics/train/plots/metrics/fold1/val_macro_f1.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["step", "val_macro_f1"] and len(curve) == 1 + TINY_PARAMS["train"]["epochs"]
    cache = repo / "features/features.h5"
    cache_hash, cache_mtime = _sha(cache), cache.stat().st_mtime_ns
    # positive control: the hook sees the stage-one CNN
    assert any(line.endswith("drct extract") for line in conv_processes())

    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline run")
    conv_log.unlink()
    assert "Running stage" not in run(str(DVC), "repro")  # second repro: nothing to do
    assert conv_processes() == []

    out = run(str(DVC), "exp", "run", "-S", "train.lr_primary=0.002", "-n", "lr2")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert ran == {"train", "evaluate", "interpret", "report"}  # never data, extract or the sweep
    assert _sha(cache) == cache_hash and cache.stat().st_mtime_ns == cache_mtime
    commands = {line.split(" ", 1)[1] for line in conv_processes()}
    assert commands <= {"drct report"}, f"a CNN forward outside the report heatmaps: {commands}"

    table = run(str(DVC), "exp", "show", "--csv", "--no-pager")
    rows = list(csv.DictReader(io.StringIO(table[table.index("Experiment"):])))
    lr2 = [row for row in rows if row.get("Experiment") == "lr2"]
    lr_column = next(c for c in rows[0] if c.endswith("train.lr_primary"))
    assert lr2 and lr2[0][lr_column] == "0.002"
    f1_columns = [c for c in rows[0] if "macro_f1" in c]
    assert f1_columns and all(lr2[0][c] not in ("", "-") for c in f1_columns)
    # readable: meta and metric columns (not params.yaml's keys, not the dependency hashes) fit MAX_COLUMNS,
    # and so does the whole table of what changed (README: `dvc exp show --only-changed`)
    param_keys = {key for key in _leaves(TINY_PARAMS)}
    deps = {str(d) for st in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values() for d in st.get("deps", [])}
    deps.add(TINY_PARAMS["dataset"]["data"])  # ${dataset.data}, interpolated
    data_columns = [c for c in rows[0] if c.split(":")[-1] not in param_keys and c not in deps]
    assert len(data_columns) <= MAX_COLUMNS, data_columns
    assert {"macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "macro_ap", "n"} <= {c.split(":")[-1] for c in data_columns}
    changed = run(str(DVC), "exp", "show", "--csv", "--no-pager", "--only-changed")
    assert len(next(csv.reader(io.StringIO(changed[changed.index("Experiment"):])))) <= MAX_COLUMNS
    # only params.yaml's keys are params: none of configs/defaults.yaml's other keys is a column
    assert not any(c.endswith(("model.gru_hidden", "train.eval_batch_size", "extract.decode_chunk", "report.top_k"))
                   for c in rows[0])
    assert not any(c.startswith("configs/defaults.yaml:") for c in rows[0])

    diff = run(str(DVC), "metrics", "diff")  # the committed baseline (HEAD) vs the experiment in the workspace
    assert "failed to load" not in diff and "macro_f1" in diff
    out = run(str(DVC), "exp", "run", "-S", "model.aps_selection=random", "-n", "randomsel")  # README ablation
    assert "Running stage 'train'" in out and "Running stage 'sweep'" not in out

    run(str(DVC), "plots", "show", "--out", "dvc_plots")
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "pr_curves.png" in page and "mkey_sweep.png" in page and "val_macro_f1" in page
    assert (repo / "dvc_plots" / "static").is_dir()
