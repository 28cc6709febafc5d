"""The DVC pipeline end to end on a tiny phantom, in a temporary git repository.

Proves: `dvc repro` from clean produces metrics, dvclive training curves, the m_key sweep and
reports; a second `dvc repro` is a no-op; a head-parameter experiment (`dvc exp run -S
train.lr_primary=...`) reruns train/evaluate/interpret/report but never data, extract or the
sweep, and no CNN forward happens in train or evaluate (every Conv2d call of every Python process
is logged by a sitecustomize hook; the report stage's heatmaps of the five top slices are the
only convolutions allowed); README ablations work with -S ++; the plain `dvc exp show` has at most
40 columns, exactly those the static count predicts (headline metrics with CIs, params.yaml's keys,
the inputs); `dvc metrics diff` compares with the committed baseline; `dvc plots show` renders
offline with the PNGs as images; a head edit reruns the heads and never extraction, a reader edit
reruns extraction (the fingerprint stage).
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

TINY_STAGE_ONE = {  # configs/stage_one.yaml of the copy
    "phantom": {"scans": 6, "seed": 3, "layout": "rsna", "size": 32},
    "adapt": {"data": None, "epochs": 1},
    "dataset": {"layout": "rsna", "data": "data/phantom", "labels": None},
    "extract": {"resolutions": [32, 64], "weights": "random:0", "aps_source": "upsampled", "workers": 0,
                "batch_size": 64},
}
TINY_PARAMS = {  # params.yaml of the copy: the demo's keys (so its `dvc exp show` has the demo's columns)
    "sampler": {"m": 8},
    "model": {"name": "drct2", "m_key": 4},
    "train": {"lr_primary": 0.0005, "epochs": 1, "folds": 2},
    "evaluate": {"threshold": 0.5},
}
TINY_SWEEP = {"sweep_m_keys: 2,4,8,16": "sweep_m_keys: 2,4", "sweep_epochs: 5": "sweep_epochs: 1"}  # dvc.yaml vars


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

STAGE_ONE_CONFIG = "configs/stage_one.yaml"
STAGE_ONE_SECTIONS = ("phantom", "adapt", "dataset", "extract")
TREE = {"pipeline", "stages", "cache", "configs"}  # every first-party package, and the configs


def test_expensive_stages_depend_on_their_fingerprint_not_on_sources():
    """adapt, extract, train and sweep list no source file: only their data and the fingerprint of
    the code and config they run (pipeline/fingerprint.py), which the `fingerprint` stage writes
    from the whole tree. A head edit therefore never reruns extraction (tests/test_fingerprint.py)."""
    stages = dvc_yaml()["stages"]
    assert set(stages["fingerprint"]["deps"]) == TREE
    assert set(stages["fingerprint"]["outs"]) == {"fingerprints/stage_one.json", "fingerprints/heads.json"}
    assert set(stages["adapt"]["deps"]) == {"fingerprints/stage_one.json"}
    assert set(stages["extract"]["deps"]) == {"fingerprints/stage_one.json", "features/adapt", "${dataset.data}"}
    for name in ("train", "sweep"):
        assert set(stages[name]["deps"]) == {"features/features.h5", "fingerprints/heads.json"}, name
    for name in ("data", "adapt", "extract"):
        assert "params" not in stages[name], name
        assert f"--config {STAGE_ONE_CONFIG}" in stages[name]["cmd"], name
    assert f"--config {STAGE_ONE_CONFIG}" in stages["fingerprint"]["cmd"]  # the config extract reads
    for name in ("data", "evaluate", "interpret", "report"):  # cheap stages: the whole tree
        assert TREE - {"cache"} <= set(stages[name]["deps"]), name


def test_params_yaml_is_the_head_experiment():
    """`dvc exp show` lists every key of params.yaml: it holds the head experiment only, stage one is
    configs/stage_one.yaml (no DVC params file), and no stage lists another params file."""
    stages = dvc_yaml()["stages"]
    for name, stage in stages.items():
        assert all(isinstance(entry, str) for entry in stage.get("params", [])), name
        assert not {str(e).split(".")[0] for e in stage.get("params", [])} & set(STAGE_ONE_SECTIONS), name
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert not set(params) & set(STAGE_ONE_SECTIONS)
    assert {"sampler", "model", "train"} <= set(stages["train"]["params"])
    stage_one = yaml.safe_load((REPO / STAGE_ONE_CONFIG).read_text())
    assert set(stage_one) == set(STAGE_ONE_SECTIONS)
    load_config(REPO / STAGE_ONE_CONFIG)  # valid under the schema
    assert f"{STAGE_ONE_CONFIG}:dataset" in dvc_yaml()["vars"]  # ${dataset.data}


def test_readme_ablations_work_with_S():
    """`-S key=value` modifies a key params.yaml lists; any other key needs `-S ++key=value` (Hydra's
    add-or-override). Every ablation the README names is set the way that works."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = load_config(None)
    readme = (REPO / "README.md").read_text()
    for key in ("model.aps_selection", "model.aps_resolution", "train.loss", "model.name", "model.m_key",
                "train.lr_primary"):
        lookup(defaults, key)
        try:
            lookup(params, key)
        except KeyError:
            assert f"-S ++{key}=" in readme, key
        else:
            assert f"-S {key}=" in readme, key


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


def exp_show_columns(stages: dict, params: dict, metric_files: list[dict], data_path: str) -> list[str]:
    """The columns `dvc exp show` has for one commit (dvc/repo/experiments/serialize.py): the meta
    columns, one per metric leaf, one per params.yaml leaf, one per variable a stage interpolates
    from another file, and one per distinct dependency path (params files excepted)."""
    columns = list(EXP_SHOW_META)
    for data in metric_files:
        columns += _leaves(data)
    columns += _leaves(params)
    text = (REPO / "dvc.yaml").read_text()
    columns += [var for var in ("dataset.data",) if "${" + var + "}" in text]
    columns += sorted({str(dep).replace("${dataset.data}", data_path) for stage in stages.values()
                       for dep in stage.get("deps", [])})
    return columns


def test_exp_show_of_the_committed_baseline_fits_the_table():
    """Issue 17: `dvc exp show` had 252 columns, then 107; the demo's now fit MAX_COLUMNS, and the
    headline has its intervals and n (the end-to-end test below counts the real table)."""
    stages = dvc_yaml()["stages"]
    metric_files = [json.loads((REPO / (next(iter(e)) if isinstance(e, dict) else e)).read_text())
                    for stage in stages.values() for e in stage.get("metrics", [])]
    data_path = yaml.safe_load((REPO / STAGE_ONE_CONFIG).read_text())["dataset"]["data"]
    columns = exp_show_columns(stages, yaml.safe_load((REPO / "params.yaml").read_text()), metric_files, data_path)
    assert len(columns) <= MAX_COLUMNS, (len(columns), columns)
    headline = json.loads((REPO / "metrics/metrics.json").read_text())
    assert metric_files == [headline]  # dvclive's training summary is no metrics file
    for key in ("macro_precision", "macro_recall", "macro_f1", "macro_auc", "macro_ap"):
        assert headline[f"{key}_ci_low"] <= headline[key] <= headline[f"{key}_ci_high"], key
    assert "n" in headline and "per_class" not in headline and "per_fold" not in headline
    details = json.loads((REPO / "metrics/metrics_details.json").read_text())
    assert {"per_class", "per_fold", "calibration", "training_curves"} <= set(details)


@pytest.mark.parametrize("config", ["params.yaml", "configs/cq500.yaml", "configs/rsna.yaml"])
def test_params_files_hold_every_listed_key(config):
    """configs/cq500.yaml and rsna.yaml can replace params.yaml: every key a stage lists exists in
    them, and they load through load_config."""
    data = yaml.safe_load((REPO / config).read_text())
    load_config(REPO / config)
    for stage in dvc_yaml()["stages"].values():
        for key in params_keys(stage, "params.yaml"):
            lookup(data, key)


@pytest.mark.parametrize("config", [STAGE_ONE_CONFIG, "configs/cq500.yaml", "configs/rsna.yaml"])
def test_stage_one_configs_name_the_dicom_tree(config):
    """...and configs/stage_one.yaml (its dataset.data is the DICOM tree dvc.yaml interpolates)."""
    assert isinstance(load_config(REPO / config)["dataset"]["data"], str)
    lookup(yaml.safe_load((REPO / config).read_text()), "dataset.data")


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
    assert sorted(_leaves(TINY_PARAMS)) == sorted(_leaves(yaml.safe_load((REPO / "params.yaml").read_text())))
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    (repo / STAGE_ONE_CONFIG).write_text(yaml.safe_dump(TINY_STAGE_ONE, sort_keys=False))
    pipeline = (repo / "dvc.yaml").read_text()
    for old, new in TINY_SWEEP.items():
        assert old in pipeline, old
        pipeline = pipeline.replace(old, new)
    (repo / "dvc.yaml").write_text(pipeline)
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
    for stage in ("fingerprint", "data", "extract", "train", "evaluate", "interpret", "sweep", "report"):
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

    # one experiment: a key params.yaml lists (-S) and a README ablation of a key it lacks (-S ++)
    out = run(str(DVC), "exp", "run", "-S", "train.lr_primary=0.002", "-S", "++model.aps_selection=random", "-n", "lr2")
    assert "aps_selection: random" in (repo / "params.yaml").read_text()
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
    assert lr2[0][next(c for c in rows[0] if c.endswith("model.aps_selection"))] == "random"  # the added column
    f1_columns = [c for c in rows[0] if "macro_f1" in c]
    assert f1_columns and all(lr2[0][c] not in ("", "-") for c in f1_columns)
    # readable (issue 17): the plain table, baseline and experiment (with its added key), fits MAX_COLUMNS
    # with the headline and its intervals, as the static count of the committed baseline predicts
    assert len(rows[0]) <= MAX_COLUMNS, (len(rows[0]), list(rows[0]))
    assert {"macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "macro_ap", "n"} <= {c.split(":")[-1] for c in rows[0]}
    live_metrics = [json.loads((repo / "metrics/metrics.json").read_text())]
    params = {**TINY_PARAMS, "model": {**TINY_PARAMS["model"], "aps_selection": "random"}}
    predicted = exp_show_columns(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"], params, live_metrics,
                                 TINY_STAGE_ONE["dataset"]["data"])
    assert sorted(c.split(":")[-1] for c in rows[0]) == sorted(predicted)
    # only params.yaml's keys are params: none of configs/defaults.yaml's other keys, none of stage one's
    assert not any(c.endswith(("model.gru_hidden", "train.eval_batch_size", "extract.decode_chunk", "report.top_k",
                               "extract.resolutions", "phantom.scans")) for c in rows[0])
    assert not any(c.startswith(("configs/defaults.yaml:", "configs/stage_one.yaml:extract")) for c in rows[0])

    diff = run(str(DVC), "metrics", "diff")  # the committed baseline (HEAD) vs the experiment in the workspace
    assert "failed to load" not in diff and "macro_f1" in diff

    run(str(DVC), "plots", "show", "--out", "dvc_plots")
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "pr_curves.png" in page and "mkey_sweep.png" in page and "val_macro_f1" in page
    assert (repo / "dvc_plots" / "static").is_dir()

    # code edits: a head reruns the heads (and the cheap stages), never stage one; a reader reruns stage one
    def dirty_after_editing(path: str) -> set[str]:
        target = repo / path
        target.write_text(target.read_text() + "\n# an edit\n")
        run(str(DVC), "repro", "fingerprint")
        return {line[:-1] for line in run(str(DVC), "status").splitlines() if line.endswith(":") and not line[0].isspace()}

    dirty = dirty_after_editing("pipeline/heads/fusion.py")
    assert {"train", "sweep"} <= dirty and not {"adapt", "extract"} & dirty, dirty
    assert {"adapt", "extract"} <= dirty_after_editing("pipeline/features/preprocess.py")
