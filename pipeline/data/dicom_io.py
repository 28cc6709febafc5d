"""Read one DICOM slice: its header (for indexing) and its pixels in Hounsfield units.

Stage one's input is a 2-D float32 HU image per slice. Real head-CT DICOM has many quirks
(see ../shared/DESIGN.md and ../shared/data/real/README.md); every one that changes pixel
values or slice order is fixed here, in one place, so that the readers (rsna, cq500, folder)
and the feature extractor agree:

* compressed transfer syntaxes (JPEG Lossless, JPEG 2000): decoded by pydicom through
  python-gdcm (Apache-2.0), which pydicom picks up automatically;
* RescaleSlope / RescaleIntercept are DS strings ("-1024.000000"): cast to float;
* RSNA 12-bit unsigned images with a wrong intercept (BitsStored 12, PixelRepresentation 0,
  RescaleIntercept > -100): the well-known Kaggle fix, applied exactly as published
  (``x = pixel_array + 1000; x[x >= 4096] -= 4096; intercept = -1000``);
* MONOCHROME1: by the standard (PS3.3 C.11.1) the Modality LUT output is in HU whatever the
  photometric interpretation, which only says how to *display* it; so a MONOCHROME1 slice with a
  RescaleSlope/Intercept is used as is. Without a rescale the stored values carry no HU meaning
  and are mirrored within their stored range, so that dense tissue is bright as everywhere else;
* padding outside the scan circle (raw -2000 -> -3024 HU) and other out-of-range values:
  HU clipped to [-1024, 3071], the 12-bit CT range;
* multi-frame, colour or otherwise non-2-D images and undecodable pixel data: `SliceError`
  with a human reason, which the callers turn into a rejects entry;
* bad pixel scaling: a RescaleSlope or RescaleIntercept that is NaN, infinite or zero, a rescale
  that sends every pixel out of the CT range (slope 1e300), and Rows x Columns that do not match
  the length of uncompressed pixel data are `SliceError`s too: silently constant, garbled or NaN
  images would otherwise be cached as if they were fine;
* modality: only CT is read unless the caller allows others (`dataset.allow_modalities`), since
  HU windows mean nothing on an MR image (`check_modality`, applied at indexing);
* image size (`ImageLimits`, applied at indexing, before any pixel is read): Rows x Columns x
  frames above ``dataset.max_pixels`` (default 4096 x 4096) is refused, so a 0.5 MB deflated file
  that claims a 16384 x 16384 image (512 MiB inflated, GBs once converted) never gets decoded; an
  image smaller than ``dataset.min_size`` in rows or columns (default 16 px) is refused too;
* Deflated Explicit VR Little Endian files (``1.2.840.10008.1.2.1.99``) are inflated by us, not by
  pydicom (which inflates the whole file even to read a header): at most `HEADER_INFLATE_BYTES` to
  read a header, and at most what the header claims (plus `INFLATE_SLACK_BYTES`) to read pixels;
  more is a `SliceError` (a decompression bomb), so memory stays bounded whatever the file says.

Tag values come from anywhere: `clean_text` turns any of them (NUL bytes, non-UTF-8 bytes, very
long values) into a short printable str, so one odd header never aborts a run.

Slice order uses `slice_position`: ImagePositionPatient projected on the slice normal
(row x column direction cosines), which stays correct under gantry tilt, where IPP[2] alone
is only right by luck.
"""

from __future__ import annotations

import copy
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

# RSNA writes its UIDs as "ID_<hex>" strings, which are invalid UI values: pydicom would warn once
# per file (750k times). Reading never needs value validation, so it is switched off.
if pydicom.config.settings.reading_validation_mode == pydicom.config.WARN:
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

HU_MIN = -1024.0
HU_MAX = 3071.0

# Tags read when indexing; `specific_tags` keeps header parsing cheap on ~750k RSNA files.
HEADER_TAGS = [
    "SOPInstanceUID",
    "SOPClassUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "ImageType",
    "SeriesDescription",
    "SliceThickness",
    "ConvolutionKernel",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelSpacing",
    "SamplesPerPixel",
    "Modality",
    "ContrastBolusAgent",
]

LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM")
DEFAULT_MODALITIES = ("CT",)
MAX_TEXT = 256  # characters kept of a tag value (ids, descriptions); longer values are cut
# Uncompressed transfer syntaxes, whose pixel data length is fully determined by the header.
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
HEADER_INFLATE_BYTES = 4 << 20  # inflated bytes of a deflated file read to find its header (real headers: KBs)
INFLATE_SLACK_BYTES = 1 << 20   # inflated bytes allowed beyond header + claimed pixels (trailing tags, padding)
DEFAULT_MAX_PIXELS = 4096 * 4096  # dataset.max_pixels: Rows x Columns x frames of one file
DEFAULT_MIN_SIZE = 16             # dataset.min_size: rows and columns of an image, px


class SliceError(Exception):
    """A slice that cannot be used; the message is the human reason written to the rejects file."""


def clean_text(value: Any, limit: int = MAX_TEXT) -> str:
    """Any tag value as a storable str: bytes decoded as UTF-8 (invalid bytes replaced), NUL and
    other control characters removed, lone surrogates replaced, cut to `limit` characters.

    Why: HDF5 variable-length strings refuse embedded NULs and non-UTF-8 text, and a CSV cell
    with a newline or a megabyte of text helps nobody; one odd tag must never abort a run."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", errors="replace")
    else:
        text = str(value)
    text = text.encode("utf-8", errors="replace").decode("utf-8", errors="replace")
    text = "".join(ch for ch in text if ch >= " " and ch != "\x7f").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def modality_of(ds: Dataset) -> str:
    """Modality tag, upper case ("" where absent)."""
    return clean_text(ds.get("Modality", "")).upper()


def check_modality(modality: str, allowed: Sequence[str] | None = None) -> str | None:
    """The reject reason for a slice of a modality not allowed, or None. An absent Modality is
    accepted (some anonymisers drop it); CT only unless `allowed` lists others."""
    allowed = [str(m).upper() for m in (allowed or DEFAULT_MODALITIES)]
    if not modality or modality in allowed:
        return None
    return (
        f"modality {modality} is not {' or '.join(allowed)}: refused (HU windows are meaningless on it); "
        f"add it to dataset.allow_modalities to extract it anyway"
    )


@dataclass(frozen=True)
class ImageLimits:
    """What image sizes indexing accepts (``dataset.max_pixels``, ``dataset.min_size``)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_size: int = DEFAULT_MIN_SIZE

    @classmethod
    def from_config(cls, dataset: dict | None) -> ImageLimits:
        dataset = dataset or {}
        return cls(int(dataset.get("max_pixels") or DEFAULT_MAX_PIXELS),
                   int(dataset.get("min_size") or DEFAULT_MIN_SIZE))

    def reason(self, rows: int, columns: int, frames: int = 1, samples: int = 1, bits: int = 16) -> str | None:
        """The reject reason for an image of this size, or None. Checked before any pixel is decoded."""
        pixels = int(rows) * int(columns) * max(1, int(frames)) * max(1, int(samples))
        if pixels > self.max_pixels:
            frame_text = f" x {frames} frames" if frames > 1 else ""
            decoded = pixels * max(1, (int(bits) + 7) // 8)
            return (
                f"image too large: {rows} x {columns}{frame_text} = {pixels:,} pixels ({decoded / 2**20:,.0f} MiB "
                f"decoded) exceeds dataset.max_pixels {self.max_pixels:,}: refused before decoding (a "
                "decompression bomb?); raise dataset.max_pixels to read it"
            )
        if min(int(rows), int(columns)) < self.min_size:
            return (
                f"image too small: {rows} x {columns} pixels, below dataset.min_size {self.min_size} x "
                f"{self.min_size}: not a usable CT slice; lower dataset.min_size to read it"
            )
        return None


def _deflated_meta(handle):
    """The file meta of an open file if it is a deflated DICOM file (handle then at its dataset), else None."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    head = handle.read(4096)
    if DEFLATED_SYNTAX.encode() not in head:
        return None
    handle.seek(0)
    read_preamble(handle, False)
    meta = _read_file_meta_info(handle)
    return meta if str(meta.get("TransferSyntaxUID", "")) == DEFLATED_SYNTAX else None


def _deflated_copy(handle, meta, limit: int, strict: bool) -> io.BytesIO:
    """An in-memory Explicit VR Little Endian copy of an open deflated DICOM file (positioned at
    its dataset), inflated up to `limit` bytes: beyond that a `SliceError` when `strict`, else cut
    there (enough to read a header with ``stop_before_pixels``)."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pieces, total = [], 0
    while not inflater.eof and total <= limit:
        chunk = inflater.unconsumed_tail or handle.read(1 << 20)
        if not chunk:
            break
        try:
            piece = inflater.decompress(chunk, limit + 1 - total)
        except zlib.error as exc:
            raise SliceError(f"deflated data cannot be inflated: {exc}") from exc
        pieces.append(piece)
        total += len(piece)
    if total > limit and strict:
        raise SliceError(
            f"deflated data inflates to more than {limit / 2**20:,.1f} MiB, more than its header claims: "
            "refused (a decompression bomb?)"
        )
    meta = copy.deepcopy(meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    writer = DicomFileLike(out)
    writer.is_little_endian, writer.is_implicit_VR = True, False
    write_file_meta_info(writer, meta, enforce_standard=False)
    out.write(b"".join(pieces)[:limit])
    out.seek(0)
    return out


def _size_reason(ds: Dataset, limits: ImageLimits) -> str | None:
    try:
        return limits.reason(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), _frames(ds),
                             int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16))
    except (TypeError, ValueError) as exc:
        raise SliceError(f"malformed image size tags: {exc}") from exc


def _dcmread(path: str, *, header_only: bool, tags: list[str] | None = None, max_pixels: int | None = None):
    """pydicom.dcmread in bounded memory. A deflated file is inflated by `_deflated_copy`: at most
    `HEADER_INFLATE_BYTES` for its header, then (pixels wanted) at most what that header claims.
    `max_pixels`: with pixels wanted, a header claiming more is a `SliceError` before they are read."""
    with open(path, "rb") as handle:
        meta = _deflated_meta(handle)
        if meta is not None:
            start = handle.tell()
            header = pydicom.dcmread(_deflated_copy(handle, meta, HEADER_INFLATE_BYTES, strict=False),
                                     stop_before_pixels=True, specific_tags=tags if header_only else None)
            header.filename = path
            if header_only:
                return header
            if max_pixels is not None and (reason := _size_reason(header, ImageLimits(max_pixels, 0))):
                raise SliceError(reason)
            handle.seek(start)
            limit = HEADER_INFLATE_BYTES + claimed_pixel_bytes(header) + INFLATE_SLACK_BYTES
            ds = pydicom.dcmread(_deflated_copy(handle, meta, limit, strict=True))
            ds.filename = path
            return ds
        handle.seek(0)  # not deflated: pydicom reads the same open file (one open per file)
        if header_only:
            return pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=tags)
        if max_pixels is not None:
            reason = _size_reason(pydicom.dcmread(handle, stop_before_pixels=True), ImageLimits(max_pixels, 0))
            if reason:
                raise SliceError(reason)
            handle.seek(0)
        return pydicom.dcmread(handle)


def claimed_pixel_bytes(ds: Dataset) -> int:
    """Bytes of pixel data a header claims: Rows x Columns x frames x samples x BitsAllocated / 8."""
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise SliceError(f"malformed image size tags: {exc}") from exc
    return rows * columns * max(1, _frames(ds)) * max(1, samples) * max(1, (bits + 7) // 8)


def read_header(path: str | Path, tags: list[str] | None = None) -> Dataset:
    """Read a DICOM header without pixel data. Raises `SliceError` for a file that is not DICOM.

    Files without the 128-byte preamble (seen in the wild) are retried with ``force=True`` and
    accepted only if they hold an image-like tag, so a random text file is still rejected.
    A deflated file is inflated only as far as its header (`_deflated_copy`).
    """
    path = str(path)
    try:
        return _dcmread(path, header_only=True, tags=tags)
    except SliceError:
        raise
    except InvalidDicomError:
        pass
    except (OSError, EOFError) as exc:
        raise SliceError(f"cannot read file: {exc}") from exc
    except Exception as exc:
        raise SliceError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags, force=True)
        if "SOPInstanceUID" in ds or "Rows" in ds:
            return ds
    except Exception as exc:
        raise SliceError(
            f"not a DICOM file (no DICM preamble; forced read failed: {type(exc).__name__})"
        ) from exc
    raise SliceError("not a DICOM file (no DICM preamble and no image tags)")


def _floats(value: Any, n: int) -> list[float] | None:
    """A multi-valued numeric tag as n floats, or None where absent or malformed."""
    if value is None:
        return None
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def slice_normal(ds: Dataset) -> np.ndarray | None:
    """Unit normal of the slice plane: cross(row cosine, column cosine) from ImageOrientationPatient."""
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if iop is None:
        return None
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None
    return normal / norm


def slice_position(ds: Dataset) -> float | None:
    """Position of the slice along its normal (mm): dot(IPP, cross(IOP row, IOP column)).

    Correct for gantry-tilted (oblique) series, where IPP[2] alone is not the distance between
    planes. None when IPP or IOP is missing or malformed (the caller falls back to InstanceNumber).
    """
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    normal = slice_normal(ds)
    if ipp is None or normal is None:
        return None
    return float(np.dot(np.asarray(ipp), normal))


def instance_number(ds: Dataset) -> int | None:
    """InstanceNumber as int, or None where absent or malformed."""
    value = ds.get("InstanceNumber")
    if value is None or value == "":
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def is_localizer(ds: Dataset) -> bool:
    """True for localizer / scout / topogram images, which are not slices of the head volume.

    Checks ImageType (e.g. ``ORIGINAL\\PRIMARY\\LOCALIZER``) and, because some scanners leave
    ImageType plain, the SeriesDescription. Localizers that carry neither are caught later by the
    readers: their orientation differs from the rest of the series.
    """
    image_type = ds.get("ImageType")
    if image_type is not None:
        values = [
            str(v).upper()
            for v in (
                image_type
                if isinstance(image_type, (list, tuple, pydicom.multival.MultiValue))
                else [image_type]
            )
        ]
        if any(word in value for value in values for word in LOCALIZER_WORDS):
            return True
    description = str(ds.get("SeriesDescription", "") or "").upper()
    return any(word in description for word in LOCALIZER_WORDS)


def _frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def check_single_frame(ds: Dataset) -> None:
    """Raise `SliceError` for multi-frame or colour images (the pipeline reads single 2-D slices)."""
    frames = _frames(ds)
    if frames > 1:
        raise SliceError(f"multi-frame image ({frames} frames): only single-frame slices are supported")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise SliceError(f"not a greyscale image (SamplesPerPixel {samples})")


def _tag_float(ds: Dataset, keyword: str, default: float) -> float:
    """A numeric tag as float; absent or empty -> default (a present 0 stays 0)."""
    value = ds.get(keyword)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        raise SliceError(f"malformed {keyword}: {len(value)} values, expected one")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise SliceError(f"malformed {keyword}: {clean_text(value, 40)!r}") from exc


def _rescale(ds: Dataset) -> tuple[float, float]:
    """RescaleSlope / RescaleIntercept as floats (they are DS strings); defaults 1 and 0.

    A NaN or infinite value, or a zero slope, is a `SliceError`: it would give NaN or constant HU."""
    slope = _tag_float(ds, "RescaleSlope", 1.0)
    intercept = _tag_float(ds, "RescaleIntercept", 0.0)
    if not np.isfinite(slope) or not np.isfinite(intercept):
        raise SliceError(f"bad pixel scaling: RescaleSlope {slope}, RescaleIntercept {intercept} (not finite)")
    if slope == 0:
        raise SliceError("bad pixel scaling: RescaleSlope is 0 (every pixel would have the same value)")
    return slope, intercept


def check_pixel_length(ds: Dataset) -> None:
    """Raise `SliceError` when uncompressed pixel data is not Rows x Columns x BitsAllocated long
    (pydicom would reshape a wrong length into a garbled image, or cut it silently)."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax and syntax not in _NATIVE_SYNTAXES:
        return  # compressed: the decoder checks the frame size
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise SliceError(f"malformed image size tags: {exc}") from exc
    if rows <= 0 or columns <= 0:
        raise SliceError(f"image size {rows} x {columns} is empty")
    expected = (rows * columns * samples * _frames(ds) * bits + 7) // 8
    actual = len(ds.PixelData)
    if actual not in (expected, expected + (expected % 2)):  # DICOM pads odd lengths with one byte
        raise SliceError(
            f"pixel data cannot be decoded: its length ({actual} bytes) does not match Rows x Columns ({rows} x {columns}, "
            f"{bits} bits: {expected} bytes)"
        )


def needs_rsna_12bit_fix(ds: Dataset) -> bool:
    """The RSNA 2019 12-bit unsigned images whose intercept is wrong (Kaggle kernels' condition)."""
    try:
        return (
            int(ds.get("BitsStored", 0)) == 12
            and int(ds.get("PixelRepresentation", 1)) == 0
            and int(float(ds.get("RescaleIntercept", -1024))) > -100
        )
    except (TypeError, ValueError):
        return False


def hu_from_dataset(ds: Dataset) -> np.ndarray:
    """Pixels of a full dataset (with pixel data) as float32 HU, every pitfall fixed (module doc)."""
    check_single_frame(ds)
    if "PixelData" not in ds:
        raise SliceError("no pixel data")
    check_pixel_length(ds)
    slope, intercept = _rescale(ds)
    try:
        raw = ds.pixel_array
    except Exception as exc:
        raise SliceError(f"pixel data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if raw.ndim != 2:
        raise SliceError(f"pixel array is not 2-D (shape {tuple(raw.shape)})")
    if raw.size == 0:
        raise SliceError("empty pixel array")
    values = raw.astype(np.int32)
    if needs_rsna_12bit_fix(ds):
        # Kaggle RSNA 2019 fix: x = pixel_array + 1000; x[x >= 4096] -= 4096; intercept = -1000.
        values = values + 1000
        values[values >= 4096] -= 4096
        intercept = -1000.0
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds
    if not has_rescale and str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16) or 16)
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        else:
            low, high = 0, (1 << bits) - 1
        values = (low + high) - values
    with np.errstate(over="ignore", invalid="ignore"):
        hu = values.astype(np.float64) * slope + intercept
    if not np.all(np.isfinite(hu)):
        raise SliceError(f"bad pixel scaling: RescaleSlope {slope:g} gives non-finite HU values")
    clipped = np.clip(hu, HU_MIN, HU_MAX)
    if values.min() != values.max() and clipped.min() == clipped.max():
        raise SliceError(
            f"bad pixel scaling: RescaleSlope {slope:g}, RescaleIntercept {intercept:g} put every pixel "
            f"outside the CT range [{HU_MIN:g}, {HU_MAX:g}] HU (the image would be constant)"
        )
    return clipped.astype(np.float32)


def read_hu(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read one slice as float32 (H, W) HU clipped to [-1024, 3071]; raises `SliceError` with a reason.

    `max_pixels`: refuse a header claiming more pixels before reading them (indexing already
    applies ``dataset.max_pixels``; None = no further limit). A deflated file is inflated at most
    to the size its header claims (`_deflated_copy`), so a file cannot hold more than it says."""
    path = str(path)
    try:
        ds = _dcmread(path, header_only=False, max_pixels=max_pixels)
    except SliceError:
        raise
    except InvalidDicomError:
        read_header(path)  # raises the "not a DICOM file" SliceError, or accepts a preamble-less file
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:
            raise SliceError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise SliceError(f"cannot read file: {exc}") from exc
    except Exception as exc:
        raise SliceError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc
    return hu_from_dataset(ds)
