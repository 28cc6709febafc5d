"""Keyed pseudonyms for patient and scan ids, so that no PatientID reaches a shareable output.

Why keyed (HMAC-SHA256) and not a plain hash: PatientIDs are short and guessable (MRNs), so a
plain sha256 of one can be reversed by trying them all; with a secret key it cannot. The same
key gives the same pseudonym on every run (resume, re-extraction, predict), and whoever holds
the key can recompute a pseudonym from a known id to find a patient's scans.

The key is 32 random bytes (hex) kept beside the data: ``<data root>/.drct_pseudonym_key``
(hidden, so the readers skip it; ``.dvcignore`` keeps it out of DVC's hash of the data), or the
file given by ``dataset.pseudonym_key``. It is never written into a cache, a run or an export;
the cache records only `key_check`, a digest that tells whether a resume uses the same key.
Data already de-identified (RSNA, CQ500) can keep its ids with ``dataset.keep_ids`` /
``drct extract --keep-ids``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import replace
from pathlib import Path

from pipeline.data.scan_index import ScanIndex

KEY_NAME = ".drct_pseudonym_key"


class PseudonymError(ValueError):
    """The pseudonym key cannot be read or created; the message says what to do."""


def key_path(data_root: str | Path, configured: str | Path | None = None) -> Path:
    """The key file: `configured` (dataset.pseudonym_key) if given, else beside the data."""
    return Path(configured) if configured else Path(data_root) / KEY_NAME


def load_or_create_key(path: str | Path) -> bytes:
    """Read the key at `path`, creating it (mode 0600) on first use."""
    path = Path(path)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError as exc:
            raise PseudonymError(
                f"cannot create the pseudonym key {path} ({exc.strerror or exc}): set dataset.pseudonym_key "
                "to a writable file path, or pass --keep-ids for data already de-identified (RSNA, CQ500)"
            ) from None
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise PseudonymError(f"cannot read the pseudonym key {path} ({exc.strerror or exc})") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise PseudonymError(f"{path} is not a pseudonym key (expected 64 hex digits); remove it to make a new one")
    return key


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """``<kind>-<16 hex of HMAC-SHA256(key, kind:value)>``; an empty id stays empty (unknown)."""
    if not value:
        return ""
    digest = hmac.new(key, f"{kind}:{value}".encode("utf-8", errors="surrogateescape"), hashlib.sha256)
    return f"{kind}-{digest.hexdigest()[:16]}"


def key_check(key: bytes) -> str:
    """A digest that identifies the key without revealing it (recorded in caches for resume)."""
    return hmac.new(key, b"drct pseudonym key check", hashlib.sha256).hexdigest()[:16]


def pseudonymise_index(index: ScanIndex, key: bytes) -> ScanIndex:
    """A copy of `index` whose scan and patient ids (scans and rejects) are pseudonyms."""
    scans = [
        replace(scan, scan_id=pseudonym(key, "scan", scan.scan_id), patient_id=pseudonym(key, "patient", scan.patient_id))
        for scan in index.scans
    ]
    rejects = [replace(reject, scan_id=pseudonym(key, "scan", reject.scan_id)) for reject in index.rejects]
    return replace(index, scans=scans, rejects=rejects)
