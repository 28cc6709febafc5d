"""What a feature cache was made with, and the check stage two runs before trusting one.

Stage two refuses a cache whose provenance differs from its config in any field that changes
the vectors, naming the field, so a head is never trained on features of another encoder.
Used by stage one (the provenance a new cache records), by the writer (refusing a resume with
other settings) and by stage two (training, prediction) before trusting a cache. The cache
contract lives here, once: this module imports nothing from `pipeline`.
"""

from __future__ import annotations

import hashlib

# The version of the software (the drct2-pipeline distribution: pipeline, stages, cache) that
# wrote a cache; `pipeline.__version__` is this value.
SOFTWARE_VERSION = "0.1.0"
ENCODER_NAME = "vgg16"
# Bump when preprocessing (HU, windows, resize, normalisation) changes the pixels fed to VGG16.
PREPROCESS_VERSION = 1

# Fields compared between a cache and a config; software_version and the digest are recorded
# for the reader but do not by themselves make a cache unusable.
CHECKED_FIELDS = ("encoder", "weights", "resolutions", "windows", "aps_source", "preprocess_version")


def config_provenance(extract_config: dict) -> dict:
    """The provenance a cache made with this `extract` config section would carry
    (without weights_digest, which needs the weights loaded)."""
    return {
        "encoder": ENCODER_NAME,
        "weights": str(extract_config["weights"]),
        "resolutions": [int(r) for r in extract_config["resolutions"]],
        "windows": [[float(c), float(w)] for c, w in extract_config["windows"]],
        "aps_source": str(extract_config["aps_source"]),
        "preprocess_version": PREPROCESS_VERSION,
        "software_version": SOFTWARE_VERSION,
    }


def normalise_field(field: str, value):
    """A recorded provenance field in the form it is compared in (windows as float pairs,
    resolutions as ints), so that a cache read back from HDF5 compares equal to its config."""
    if field == "windows" and value is not None:
        return [[float(c), float(w)] for c, w in value]
    if field == "resolutions" and value is not None:
        return [int(r) for r in value]
    return value


def provenance_differences(cache_provenance: dict, expected: dict) -> list[str]:
    """Human-readable differences in CHECKED_FIELDS, e.g. "aps_source: cache has 'native', config wants 'upsampled'"."""
    differences = []
    for field in CHECKED_FIELDS:
        have = normalise_field(field, cache_provenance.get(field))
        want = normalise_field(field, expected.get(field))
        if have != want:
            differences.append(f"{field}: cache has {have!r}, config wants {want!r}")
    return differences


def sop_digest(sop_uid: str) -> str:
    """A key-independent short digest of a slice's SOP Instance UID: the overlap check between
    the adaptation scans and a stage-two cache compares these, because scan pseudonyms are keyed to
    each data root and two roots holding the same scans give different pseudonyms."""
    return hashlib.sha256(str(sop_uid).encode()).hexdigest()[:20]
