"""CQ500 readers: the model against each reader and the majority, and reader agreement (kappas),
on the real reads of ../shared/data/real/cq500/reads_subset.csv (read in place, never copied)."""

from __future__ import annotations

import csv
import types

import numpy as np
import pytest

from pipeline.data.cq500 import read_cq500_reads
from pipeline.data.labels import CQ500_LABELS
from pipeline.metrics import classification_metrics
from pipeline.readers import (
    cohen_kappa,
    fleiss_kappa,
    majority,
    read_reader_labels,
    reader_evaluation,
    score_against_readers,
)


@pytest.fixture(scope="module")
def reads_csv(real_data):
    path = real_data / "cq500" / "reads_subset.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_fleiss_kappa_textbook_case():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> P = 0.378, P_e = 0.213, kappa 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = np.array([np.repeat(np.arange(5), row) for row in counts], float)
    assert fleiss_kappa(ratings) == pytest.approx(0.2099, abs=5e-4)
    assert np.isnan(fleiss_kappa(np.zeros((4, 3))))  # every read the same: undefined
    assert fleiss_kappa(np.array([[1, 1, np.nan], [0, 0, 0], [1, 1, 1]])) == 1.0  # the blank row is left out


def test_cohen_kappa_by_hand():
    a, b = np.array([1, 1, 0, 0, 1, np.nan]), np.array([1, 0, 0, 0, 1, 1])
    # known rows 0..4: agreement 4/5; a says 1 in 3/5, b in 2/5 -> p_e = .6*.4 + .4*.6 = .48; kappa = (.8-.48)/.52
    assert cohen_kappa(a, b) == pytest.approx((0.8 - 0.48) / 0.52)


def test_real_reads_majority_matches_the_training_labels(reads_csv):
    names, reads = read_reader_labels(reads_csv)
    assert set(reads) == {"R1", "R2", "R3"} and len(names) == 7
    training = read_cq500_reads(reads_csv)  # the labels drct extract gives the scans
    np.testing.assert_array_equal(majority(reads), np.array([training[n] for n in names]))
    with open(reads_csv, newline="") as handle:  # each reader's own column, read independently
        rows = list(csv.DictReader(handle))
    for k, name in enumerate(names):
        for c, label in enumerate(CQ500_LABELS):
            assert reads["R2"][k, c] == float(rows[k][f"R2:{label}"])


def test_model_against_each_reader_with_the_readers_agreement_as_ceiling(reads_csv):
    _names, reads = read_reader_labels(reads_csv)
    prob = np.where(reads["R1"] > 0.5, 0.9, 0.1)  # a "model" that reads like R1
    result = score_against_readers(prob, reads, 0.5)
    assert set(result["references"]) == {"R1", "R2", "R3", "majority"}
    r1 = result["references"]["R1"]
    assert r1["macro_f1"] == 1.0 and r1["macro_auc"] == 1.0
    # against R2 the model is R1: its kappa with R2 is the readers' own R1-R2 kappa, class by class
    agreement = result["agreement"]["per_class"]
    for label in CQ500_LABELS:
        expected = agreement[label]["cohen"]["R1-R2"]
        assert result["references"]["R2"]["model_cohen"][label] == pytest.approx(expected, nan_ok=True)
    assert result["references"]["majority"]["macro_f1"] == pytest.approx(
        classification_metrics(majority(reads), prob, CQ500_LABELS)["macro_f1"])
    fleiss = [v["fleiss"] for v in agreement.values() if np.isfinite(v["fleiss"])]
    assert result["agreement"]["mean_fleiss"] == pytest.approx(np.mean(fleiss)) and -1 <= np.mean(fleiss) <= 1


@pytest.mark.parametrize("pseudonymised", [False, True])
def test_reader_evaluation_matches_run_scans_by_patient(reads_csv, tmp_path, pseudonymised):
    from pipeline.pseudonym import load_or_create_key, pseudonym

    names, reads = read_reader_labels(reads_csv)
    key_file = tmp_path / "key"
    key = load_or_create_key(key_file)
    # two scans of the first patient, one of each other, one scan from outside reads.csv
    patients = [names[0], *names, "CQ500-CT-99999"]
    ids = [pseudonym(key, "patient", p) for p in patients] if pseudonymised else patients
    rng = np.random.default_rng(0)
    run = types.SimpleNamespace(names=list(CQ500_LABELS), patient_id=np.array(ids), prob=rng.random((len(ids), 9)))
    result = reader_evaluation(run, reads_csv, 0.5, key_file if pseudonymised else None)
    assert result["n"] == 8 and result["scans_without_reads"] == 1
    expected = classification_metrics(np.vstack([reads["R3"][:1], reads["R3"]]), run.prob[:8], CQ500_LABELS)
    assert result["references"]["R3"]["macro_f1"] == pytest.approx(expected["macro_f1"])
