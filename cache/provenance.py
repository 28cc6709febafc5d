"""The provenance comparison the cache owns: which recorded fields make a cache unusable.

Used by the writer (refusing a resume with other settings) and, through
`pipeline.features.provenance`, by stage two before trusting a cache; kept here so that the
cache package imports nothing from `pipeline`.
"""

from __future__ import annotations

# Fields compared between a cache and a config; software_version and the digest are recorded
# for the reader but do not by themselves make a cache unusable.
CHECKED_FIELDS = ("encoder", "weights", "resolutions", "windows", "aps_source", "preprocess_version")


def _normalise(field: str, value):
    if field == "windows" and value is not None:
        return [[float(c), float(w)] for c, w in value]
    if field == "resolutions" and value is not None:
        return [int(r) for r in value]
    return value


def provenance_differences(cache_provenance: dict, expected: dict) -> list[str]:
    """Human-readable differences in CHECKED_FIELDS, e.g. "aps_source: cache has 'native', config wants 'upsampled'"."""
    differences = []
    for field in CHECKED_FIELDS:
        have = _normalise(field, cache_provenance.get(field))
        want = _normalise(field, expected.get(field))
        if have != want:
            differences.append(f"{field}: cache has {have!r}, config wants {want!r}")
    return differences
