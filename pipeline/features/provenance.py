"""What a feature cache was made with, and the check stage two runs before trusting one.

Stage two refuses a cache whose provenance differs from its config in any field that changes
the vectors, naming the field, so a head is never trained on features of another encoder.
"""

from __future__ import annotations

from cache.provenance import CHECKED_FIELDS, provenance_differences  # noqa: F401 - re-exported for stage two
from pipeline import __version__

ENCODER_NAME = "vgg16"
# Bump when preprocessing (HU, windows, resize, normalisation) changes the pixels fed to VGG16.
PREPROCESS_VERSION = 1


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
        "software_version": __version__,
    }
