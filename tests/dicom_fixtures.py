"""Write small synthetic CT DICOM files for the reader tests (16-32 px, a few slices).

Each keyword of `write_slice` sets one header field a pitfall depends on; ``omit`` removes tags
(e.g. ImagePositionPatient) after the fact, ``truncate_pixels`` cuts the pixel data short.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def tilted_iop(degrees: float) -> tuple[float, ...]:
    """IOP of a gantry tilted about the x axis: column cosine (0, cos t, -sin t)."""
    t = np.deg2rad(degrees)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t)))


def write_slice(
    path: str | Path,
    pixels: np.ndarray,
    *,
    ipp: Sequence[float] | None = (0.0, 0.0, 0.0),
    iop: Sequence[float] | None = AXIAL,
    instance_number: int | None = 1,
    series_uid: str = "1.2.3.4",
    study_uid: str = "1.2.3",
    patient_id: str = "P1",
    sop_uid: str | None = None,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    intercept: str | None = "-1024",
    slope: str | None = "1",
    photometric: str = "MONOCHROME2",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_description: str = "CT Plain",
    slice_thickness: float | None = 5.0,
    window_center: Sequence[str] | str = "40",
    implicit_vr: bool = False,
    frames: int = 1,
    truncate_pixels: int = 0,
    omit: Sequence[str] = (),
) -> str:
    """Write one CT slice with raw stored values `pixels` (int array, (H, W) or (frames, H, W))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.ImageType = list(image_type)
    ds.SeriesDescription = series_description
    if ipp is not None:
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    if iop is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.WindowCenter = window_center
    ds.WindowWidth = "80"
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if slope is not None:
        ds.RescaleSlope = slope
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    data = pixels.astype(np.int16 if pixel_representation else np.uint16).tobytes()
    if truncate_pixels:
        data = data[:-truncate_pixels]
    ds.PixelData = data
    for tag in omit:
        if tag in ds:
            delattr(ds, tag)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def write_series(
    folder: str | Path,
    n: int,
    *,
    size: int = 16,
    spacing: float = 5.0,
    z0: float = 0.0,
    iop: Sequence[float] = AXIAL,
    names: Sequence[str] | None = None,
    seed: int = 0,
    **kwargs,
) -> list[str]:
    """Write n slices of one series at positions z0 + k * spacing along the IOP normal.

    Pixel value of slice k is k + 1 everywhere (so order can be checked from pixels); file names
    default to a shuffled order so that name order is not z order."""
    folder = Path(folder)
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    paths = []
    for k in range(n):
        ipp = tuple(float(v) for v in normal * (z0 + k * spacing) + np.array([-4.0, -4.0, 0.0]))
        name = names[k] if names else f"IM{order[k]:04d}.dcm"
        paths.append(
            write_slice(
                folder / name,
                np.full((size, size), k + 1, dtype=np.int16),
                ipp=ipp,
                iop=iop,
                instance_number=k + 1,
                **kwargs,
            )
        )
    return paths


def write_deflated_bomb(path: str | Path, rows: int = 16384, columns: int = 16384, *, series_uid: str = "9.9.9",
                        patient_id: str = "P-bomb", level: int = 9, pixel_bytes: int | None = None) -> str:
    """A Deflated Explicit VR Little Endian CT slice whose header claims rows x columns 16-bit pixels,
    all zero: a decompression bomb (16384 x 16384 is 512 MiB inflated, about 0.5 MB on disk).
    `pixel_bytes`: the pixel data's real length, when it should differ from the claim (a small
    header over a huge stream).

    Streamed: the zero pixels go through zlib 1 MiB at a time, so writing it never holds the
    inflated image in memory."""
    import io
    import struct
    import zlib

    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = series_uid + ".0"
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = [f"{v:.1f}" for v in AXIAL]
    ds.InstanceNumber = 1
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.Rows, ds.Columns = rows, columns
    body = io.BytesIO()
    from pydicom.filebase import DicomFileLike

    fp = DicomFileLike(body)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    n_bytes = rows * columns * 2 if pixel_bytes is None else pixel_bytes
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_bytes)
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM")
        head = DicomFileLike(handle)
        head.is_little_endian, head.is_implicit_VR = True, False
        write_file_meta_info(head, meta, enforce_standard=True)
        # After a full flush no block refers back to earlier data, so the deflated MiB of zeros
        # is written again and again instead of being compressed again (fast), then the final block.
        deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        handle.write(deflate.compress(body.getvalue() + pixel_header) + deflate.flush(zlib.Z_FULL_FLUSH))
        mib = 1 << 20
        chunk = deflate.compress(bytes(mib)) + deflate.flush(zlib.Z_FULL_FLUSH)
        handle.writelines(chunk for _ in range(n_bytes // mib))
        handle.write(deflate.compress(bytes(n_bytes % mib)) + deflate.flush())
    return str(path)
