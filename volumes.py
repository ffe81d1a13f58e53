"""Whole scans: NIfTI and DICOM uploads in, label volumes and tissue volumes out.

A volume is read from memory (never from a file), reoriented to the nearest RAS axes, cut
into slices along one plane, and every slice goes through the PNG route's steps:
`processing.frame_slice` -> `processing.predict_frames` (in batches) -> `processing.mask_of`.
The labels are put back in the upload's own voxel order, so they overlay it in any viewer.
Sizes are checked from headers before any pixel is decoded or decompressed.
"""

import gzip
import io
import logging
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

import processing

log = logging.getLogger("segmentation.volumes")

PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the normal's axis in RAS order
ALL = "all"  # segment along every plane and take each voxel's majority (segment)
# The plane whose label wins where all three differ, then the other two: coronal was the best
# single plane, axial the worst, on every skull-on brain measured (README, "Brain volumes").
VOTING_ORDER = ("coronal", "sagittal", "axial")
# A volume is cut along all three planes when its voxels are this near cubic and it spans
# a whole brain on every axis; else along its acquisition plane only (thick slices cut
# across would be distorted, and a slab is too thin to frame along another plane).
NEAR_ISOTROPIC = 1.5
WHOLE_BRAIN_MM = 100
MAX_VOXELS = 32_000_000  # the default of MAX_VOLUME_MEGAVOXELS
MIN_SLICES = 1
BATCH = 8  # frames per forward pass: bounds the scores held at once (8 x K x side x side)
PROGRESS_EVERY_S = 5.0
# keep_brain: tissue is eroded by CORE_RADIUS_MM before its 3-D pieces are counted, and
# pieces under MIN_PIECE of the largest are dropped (eyes, face, scalp; not a brain cut in
# two by one badly segmented slice).
CORE_RADIUS_MM = 3.0
MIN_PIECE = 0.05
NIFTI_HEADER_BYTES = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
DICOM_MAX_FILES = 4096
CHUNK = 1 << 20  # compressed bytes fed to zlib at a time
ACCEPTED = (
    "NIfTI-1/2 (.nii or .nii.gz, 3-D or 4-D with one volume), a zip of one DICOM MR series, "
    "or several DICOM files as multipart fields 'file'"
)


class VolumeError(processing.ImageError):
    """A volume upload we cannot use (400 unless a subclass says otherwise)."""


class UnsupportedVolume(VolumeError):
    status = 415


class VolumeTooLarge(VolumeError):
    status = 413


@dataclass
class Volume:
    """A scan in memory: (X, Y, Z) voxels in NIfTI order, the voxel->RAS mm affine.

    `data` keeps the stored dtype where a positive scale would not change the segmentation
    (normalisation is per slice, minimum to 0 and 99th percentile to 1). `header` is the
    NIfTI header the labels inherit (None for DICOM); `shape` the upload's exact shape.
    """

    data: np.ndarray
    affine: np.ndarray
    source: str
    shape: tuple
    header: object = None
    notes: dict = field(default_factory=dict)

    @property
    def zooms(self):
        """(3,) voxel sizes in mm, from the affine's columns."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(0))


# --- Reading uploads ----------------------------------------------------------------------


def read_volume(parts, max_voxels=MAX_VOXELS):
    """Upload bytes (one body, or several multipart parts) -> Volume, whatever the format."""
    if not parts or not any(parts):
        raise VolumeError(
            "the request body is empty: send a NIfTI file or a DICOM zip as the raw body "
            "or as multipart field 'file'"
        )
    if len(parts) > 1:
        return read_dicom_files(parts, max_voxels)
    data = parts[0]
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        return read_dicom_zip(data, max_voxels)
    if len(data) > 132 and data[128:132] == b"DICM":
        return read_dicom_files([data], max_voxels)
    if data.startswith(b"\x1f\x8b") or nifti_header_class(data[:4]):
        return read_nifti(data, max_voxels)
    if data.startswith(processing.PNG_SIGNATURE):
        raise UnsupportedVolume("this is a PNG slice: POST it to /segment; /volume takes scans")
    raise UnsupportedVolume(f"{processing.sniff(data)} is not a volume we read; send {ACCEPTED}")


def nifti_header_class(first4):
    """Nifti1Header or Nifti2Header from the sizeof_hdr field (either byte order), or None."""
    if len(first4) < 4:
        return None
    for order in ("<", ">"):
        size = int(np.frombuffer(first4, order + "i4")[0])
        if size in NIFTI_HEADER_BYTES:
            return NIFTI_HEADER_BYTES[size]
    return None


def read_nifti(data, max_voxels=MAX_VOXELS):
    """.nii or .nii.gz bytes -> Volume; the header's size is checked before the voxels."""
    compressed = data.startswith(b"\x1f\x8b")
    stream = Gunzip(data) if compressed else None
    head = stream.read(540) if stream else data[:540]
    header_class = nifti_header_class(head[:4])
    if header_class is None:
        raise UnsupportedVolume(f"this is gzip but not a NIfTI file; send {ACCEPTED}")
    try:
        header = header_class.from_fileobj(io.BytesIO(head))
    except Exception as error:  # nibabel raises several kinds on a damaged header
        raise VolumeError(f"the NIfTI header is damaged ({error}); re-export it") from error
    if header["magic"].item() not in (b"n+1", b"n+2"):
        raise UnsupportedVolume(
            "this NIfTI header belongs to a .hdr/.img pair (or is Analyze 7.5); "
            "send a single .nii or .nii.gz file"
        )
    shape = tuple(int(n) for n in header.get_data_shape())
    spatial = check_nifti_shape(shape, header, max_voxels)
    offset = int(header.get_data_offset())
    needed = offset + int(np.prod(shape)) * header.get_data_dtype().itemsize
    if stream:
        body = head + stream.read(needed - len(head))
    else:
        body = data[:needed]
    if len(body) < needed:
        raise VolumeError(
            f"the NIfTI file is truncated: its header promises {needed} bytes, "
            f"it holds {len(body)}; re-export it"
        )
    image_class = nib.Nifti1Image if header_class is nib.Nifti1Header else nib.Nifti2Image
    try:
        image = image_class.from_bytes(body)
        voxels = image.dataobj.get_unscaled().reshape(spatial)
    except Exception as error:
        raise VolumeError(f"the NIfTI file is damaged ({error}); re-export it") from error
    voxels = usable_voxels(voxels, header.get_slope_inter()[0], header.get_slope_inter()[1])
    affine = image.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError("the NIfTI header's affine is degenerate; fix its qform/sform")
    notes = {"compressed": compressed}
    return Volume(voxels, affine, "nifti", shape, header=image.header, notes=notes)


def check_nifti_shape(shape, header, max_voxels):
    """The (X, Y, Z) shape to segment; a clear 4xx for 2-D, 4-D series, huge or odd files."""
    if len(shape) < 3 or (len(shape) == 3 and min(shape) == 1 and shape[2] == 1):
        raise VolumeError(
            f"the NIfTI image is 2-D ({'x'.join(map(str, shape))}); POST single slices "
            "as PNG to /segment"
        )
    if len(shape) > 3 and int(np.prod(shape[3:])) != 1:
        raise VolumeError(
            f"the NIfTI image is {len(shape)}-D ({'x'.join(map(str, shape))}); send one "
            "3-D volume (a 4-D file with one volume is fine)"
        )
    if min(shape) < 1:
        raise VolumeError(f"the NIfTI header gives an empty shape {shape}")
    dtype = header.get_data_dtype()
    if dtype.kind not in "uif" or dtype.fields:
        raise UnsupportedVolume(
            f"the NIfTI voxels are {dtype} (complex or RGB); send a greyscale scan"
        )
    check_voxels(shape[:3], max_voxels)
    return shape[:3]


def check_voxels(shape, max_voxels):
    """413 for a volume over the voxel limit or a slice over processing.MAX_SIDE."""
    voxels = int(np.prod([int(n) for n in shape]))
    if voxels > max_voxels:
        raise VolumeTooLarge(
            f"the volume is {'x'.join(map(str, shape))} = {voxels / 1e6:.1f} million voxels; "
            f"the limit is {max_voxels / 1e6:.1f} million (MAX_VOLUME_MEGAVOXELS)"
        )
    if max(shape) > processing.MAX_SIDE:
        raise VolumeTooLarge(
            f"the volume is {'x'.join(map(str, shape))}; no side may pass {processing.MAX_SIDE}"
        )


def usable_voxels(voxels, slope, inter):
    """Stored voxels, scaled only where scaling changes what a slice looks like.

    A positive slope and any intercept leave each slice's normalisation unchanged, so the
    stored integers are kept (a quarter of float32's memory, and the fast histogram path).
    """
    if voxels.dtype.kind == "f":
        voxels = np.nan_to_num(voxels.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    elif voxels.dtype.itemsize > 2:  # the histogram behind normalise needs a narrow range
        voxels = voxels.astype(np.float32)
    if slope is not None and np.isfinite(slope) and slope < 0:
        inter = 0.0 if inter is None or not np.isfinite(inter) else inter
        return (voxels.astype(np.float32) * np.float32(slope) + np.float32(inter)).astype(
            np.float32
        )
    return voxels


class Gunzip:
    """Inflates a gzip body on demand: only the bytes asked for, whatever it claims to hold.

    A .nii.gz that inflates to gigabytes costs no more than the header's promised size,
    which is checked against the voxel limit first.
    """

    def __init__(self, data):
        self.data = memoryview(data)
        self.position = 0
        self.zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.pending = b""

    def read(self, size):
        """Up to `size` inflated bytes (fewer only at the end of the data)."""
        parts, need = [], size
        try:
            while need > 0:
                if self.zlib.eof:  # concatenated gzip members are one file
                    rest = self.zlib.unused_data
                    if not rest.startswith(b"\x1f\x8b"):
                        break
                    self.zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self.pending = rest
                if not self.pending:
                    if self.position >= len(self.data):
                        break
                    self.pending = bytes(self.data[self.position : self.position + CHUNK])
                    self.position += CHUNK
                out = self.zlib.decompress(self.pending, need)
                self.pending = self.zlib.unconsumed_tail
                parts.append(out)
                need -= len(out)
        except zlib.error as error:
            raise VolumeError(f"the gzip data is damaged ({error}); re-export it") from error
        return b"".join(parts)


# --- DICOM ----------------------------------------------------------------------------------


def read_dicom_zip(data, max_voxels=MAX_VOXELS):
    """A zip of one DICOM series -> Volume. Sizes come from the zip's directory first."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir() and wanted_member(m.filename)]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as error:
        raise VolumeError(f"the zip is damaged ({error}); zip the series again") from error
    if not members:
        raise VolumeError("the zip holds no files; zip the folder of one DICOM series")
    if len(members) > DICOM_MAX_FILES:
        raise VolumeTooLarge(f"the zip holds {len(members)} files; the limit is {DICOM_MAX_FILES}")
    # Each file is a slice of at most max_voxels / files voxels: a bound on what it may inflate
    # to (16 bits a voxel, plus headers). zipfile stops at the declared size when reading.
    total = sum(m.file_size for m in members)
    budget = max_voxels * 2 + len(members) * 256 * 1024
    if total > budget:
        raise VolumeTooLarge(
            f"the zip would inflate to {total / 1e6:.0f} MB; the limit for "
            f"{max_voxels / 1e6:.1f} million voxels is {budget / 1e6:.0f} MB"
        )
    files = []
    for member in members:
        if member.flag_bits & 0x1:
            raise VolumeError("the zip is encrypted; send it without a password")
        try:
            files.append(archive.read(member))
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as error:
            raise VolumeError(f"the zip is damaged ({error}); zip the series again") from error
    return read_dicom_files(files, max_voxels, from_zip=True)


def wanted_member(name):
    """Skip what archivers and viewers add beside the images."""
    base = name.rsplit("/", 1)[-1]
    return not (name.startswith("__MACOSX/") or base.startswith(".") or base.upper() == "DICOMDIR")


def read_dicom_files(files, max_voxels=MAX_VOXELS, from_zip=False):
    """DICOM file bytes of one single-frame MR series -> Volume in LPS->RAS geometry.

    Headers are read and checked first (modality, one series, one matrix, the voxel limit);
    pixels are decoded only then. No tag value reaches a log line or an error message.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets, skipped = [], 0
    for data in files:
        try:
            datasets.append(pydicom.dcmread(io.BytesIO(data), defer_size=1024))
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError):
            if not from_zip:
                raise VolumeError(
                    "a part is not a DICOM file (no 'DICM' marker or damaged); send only the "
                    "series' image files"
                ) from None
            skipped += 1
    if not datasets:
        raise VolumeError("the zip holds no DICOM files; zip the folder of one series")
    geometry = dicom_geometry(datasets, max_voxels)
    slices = []
    for dataset in geometry["order"]:
        slices.append(dicom_pixels(dataset))
    data = np.stack(slices, axis=-1)  # (columns, rows, slices): NIfTI's i, j, k
    if any(s.dtype.kind == "f" for s in slices):
        data = data.astype(np.float32)
    log.info(
        "DICOM series: %d slices of %dx%d%s",
        data.shape[2],
        data.shape[0],
        data.shape[1],
        f" ({skipped} other files skipped)" if skipped else "",
    )
    notes = {"skipped_files": skipped}
    return Volume(data, geometry["affine"], "dicom", data.shape, notes=notes)


def tag(dataset, name, default=None):
    """A header value, or `default` where missing or unreadable."""
    try:
        value = dataset.get(name, default)
    except Exception:  # a damaged element
        return default
    return default if value in (None, "") else value


def dicom_geometry(datasets, max_voxels):
    """Sorted slices and the voxel->RAS affine of one series; 4xx for anything else."""
    modalities = {str(tag(d, "Modality", "")).upper() for d in datasets}
    if modalities != {"MR"}:
        named = ", ".join(sorted(m or "none" for m in modalities))
        raise UnsupportedVolume(f"the DICOM files are modality {named}; this model reads MR only")
    series = {str(tag(d, "SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise VolumeError(
            f"the upload holds {len(series)} series; send one series (one folder) at a time"
        )
    if any(int(tag(d, "NumberOfFrames", 1) or 1) > 1 for d in datasets):
        raise UnsupportedVolume("multi-frame (enhanced) DICOM is not read; export single-frame")
    try:
        matrices = {(int(d.Rows), int(d.Columns)) for d in datasets}
        spacings = {tuple(round(float(v), 4) for v in d.PixelSpacing) for d in datasets}
        orientations = [np.array(d.ImageOrientationPatient, float) for d in datasets]
        positions = [np.array(d.ImagePositionPatient, float) for d in datasets]
        samples = {int(tag(d, "SamplesPerPixel", 1)) for d in datasets}
    except (AttributeError, TypeError, ValueError, KeyError) as error:
        raise VolumeError(
            "the DICOM files lack the geometry a volume needs (Rows, Columns, PixelSpacing, "
            "ImagePositionPatient, ImageOrientationPatient)"
        ) from error
    if len(matrices) > 1 or len(spacings) > 1:
        raise VolumeError("the files have different matrices or pixel spacings; send one series")
    if samples != {1}:
        raise UnsupportedVolume("the DICOM images are colour; send a greyscale MR series")
    first = orientations[0]
    if first.shape != (6,) or any(np.abs(o - first).max() > 1e-3 for o in orientations):
        raise VolumeError("the files have different slice orientations; send one series")
    rows, columns = matrices.pop()
    check_voxels((columns, rows, len(datasets)), max_voxels)
    row_spacing, column_spacing = spacings.pop()
    along_row, along_column = first[:3], first[3:]
    normal = np.cross(along_row, along_column)
    depth = np.array([p @ normal for p in positions])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    if len(depth) > 1 and np.diff(depth).min() < 1e-3:
        raise VolumeError(
            "several files share one slice position (several echoes or repeats?); send one "
            "series with one image per position"
        )
    if len(depth) > 1:
        step = (positions[order[-1]] - positions[order[0]]) / (len(depth) - 1)
        gaps = np.diff(depth)
        if gaps.max() - gaps.min() > 0.1 * gaps.mean():
            log.warning("DICOM slice gaps vary from %.2f to %.2f mm", gaps.min(), gaps.max())
    else:
        thickness = float(
            tag(datasets[0], "SpacingBetweenSlices", None)
            or tag(datasets[0], "SliceThickness", 1.0)
        )
        step = normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = along_row * column_spacing  # i: along a row, across columns
    lps[:3, 1] = along_column * row_spacing  # j: down a column, across rows
    lps[:3, 2] = step
    lps[:3, 3] = positions[order[0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS to NIfTI's RAS
    return {"order": [datasets[i] for i in order], "affine": affine}


def dicom_pixels(dataset):
    """(columns, rows) voxels of one slice, RescaleSlope/Intercept applied where it matters."""
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises NotImplementedError, RuntimeError, ...
        syntax = dataset.file_meta.get("TransferSyntaxUID", None) if dataset.file_meta else None
        name = getattr(syntax, "name", None) or "unknown"
        raise UnsupportedVolume(
            f"cannot decode the DICOM pixel data (transfer syntax {name}); export the series "
            "uncompressed (Explicit/Implicit VR Little Endian)"
        ) from error
    if pixels.ndim != 2:
        raise UnsupportedVolume("a DICOM image is not a single greyscale frame")
    slope = float(tag(dataset, "RescaleSlope", 1.0))
    intercept = float(tag(dataset, "RescaleIntercept", 0.0))
    if str(tag(dataset, "PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        pixels = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return pixels.T


# --- Segmentation -----------------------------------------------------------------------------


def acquisition_plane(volume):
    """The plane the scan was acquired in: normal along the coarsest axis (last if isotropic)."""
    zooms = volume.zooms
    axis = len(zooms) - 1 if zooms.max() - zooms.min() < 1e-3 * zooms.max() else int(zooms.argmax())
    ras_axis = int(nib.orientations.io_orientation(volume.affine)[axis, 0])
    return {v: k for k, v in PLANES.items()}[ras_axis]


def default_plane(volume):
    """ALL for a near-isotropic volume that spans a whole brain, else the acquisition plane."""
    zooms = volume.zooms
    extent = zooms * np.asarray(volume.data.shape[:3])
    if zooms.max() <= NEAR_ISOTROPIC * zooms.min() and extent.min() >= WHOLE_BRAIN_MM:
        return ALL
    return acquisition_plane(volume)


def segment(model, volume, plane=None, progress_every_s=PROGRESS_EVERY_S, clean=True):
    """Volume -> ((X, Y, Z) uint8 labels in the upload's voxel order, plane, slice count).

    `plane` is axial, coronal, sagittal or ALL (default: default_plane). With ALL the volume
    is segmented along each plane and every voxel takes the label two of them agree on
    (where all three differ, the first of VOTING_ORDER's): on Colin27's 1 mm head grey
    matter Dice 0.855 against 0.800-0.836 for one plane (README), for three times the work.
    `clean` False skips the 3-D step (tools/volume_quality.py measures it).
    """
    plane = plane or default_plane(volume)
    if plane != ALL:
        return segment_along(model, volume, plane, progress_every_s, clean)
    results = [segment_along(model, volume, name, progress_every_s, clean) for name in VOTING_ORDER]
    (labels, _, first), (second, _, more), (third, _, most) = results
    np.copyto(labels, second, where=second == third)
    return labels, ALL, first + more + most


def segment_along(model, volume, plane, progress_every_s=PROGRESS_EVERY_S, clean=True):
    """segment() along one plane. The volume is turned to the nearest RAS axes, the slices
    along `plane` are framed, predicted BATCH at a time and mapped back one by one, as a PNG
    slice is but for its 2-D stray-tissue drop; then tissue apart from the brain is dropped
    in 3-D (keep_brain).
    """
    slices = along(volume.data, volume.affine, plane)
    if min(slices.shape[1:]) < 2:
        raise VolumeError(
            f"the {plane} slices of this volume are {slices.shape[1]}x{slices.shape[2]} "
            "voxels; choose another plane (?plane=axial|coronal|sagittal)"
        )
    labels = np.zeros(slices.shape, np.uint8)
    side = model.meta["frame_side"]
    channels = model.meta["input_channels"]
    started = last_report = time.perf_counter()
    batch_indices, frames, geometries = [], [], []

    def flush():
        scores = processing.predict_frames(model.predict, np.stack(frames), channels, model.passes)
        for index, geometry, score in zip(batch_indices, geometries, scores):
            labels[index] = processing.mask_of(slices[index], score, geometry, drop_stray=False)
        del batch_indices[:], frames[:], geometries[:]

    for index in range(len(slices)):
        slice_ = slices[index]
        if slice_.min() == slice_.max():
            continue  # a blank slice holds no tissue: background, with no forward pass
        frame, geometry = processing.frame_slice(slice_, side)
        batch_indices.append(index)
        frames.append(frame)
        geometries.append(geometry)
        if len(frames) == BATCH:
            flush()
        now = time.perf_counter()
        if now - last_report > progress_every_s:
            log.info(
                "volume: %d of %d %s slices in %.0f s", index + 1, len(slices), plane, now - started
            )
            last_report = now
    if frames:
        flush()
    if clean:
        labels = clean_up(slices, labels, slice_mm(volume, plane))
    ornt = nib.orientations.io_orientation(volume.affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    labels = nib.orientations.apply_orientation(np.moveaxis(labels, 0, PLANES[plane]), back)
    return np.ascontiguousarray(labels, np.uint8), plane, len(slices)


def clean_up(image, labels, spacing):
    """keep_brain() as served: labels of an `image` (voxels `spacing` mm) without the tissue
    apart from the brain, eroding only when the volume has a skull (looks_stripped)."""
    radius = 0.0 if looks_stripped(image, labels) else CORE_RADIUS_MM
    return keep_brain(labels, spacing, radius)


def looks_stripped(slices, labels):
    """Whether a volume is skull-stripped: its labels call at least STRIPPED_COVER of the
    voxels above its minimum tissue, as processing.fill_stripped tells a stripped slice."""
    above = slices > slices.min()
    count = np.count_nonzero(above)
    tissue = np.count_nonzero(np.logical_and(above, labels > 0, out=above))
    return tissue >= processing.STRIPPED_COVER * count


def keep_brain(labels, spacing, radius_mm=CORE_RADIUS_MM, min_piece=MIN_PIECE):
    """(N, A, B) uint8 labels, voxels `spacing` mm, with tissue apart from the brain made
    background. Changes `labels` in place and returns it.

    A brain is one thick piece in 3-D. What a slice at a time wrongly calls tissue (face and
    neck below the brain, scalp above it, eyes) is a thin shell or a small piece, joined to
    the brain, if at all, by thin bridges. So the tissue is eroded by `radius_mm`, pieces of
    the rest under `min_piece` of the largest are dropped, and what is left grows back
    within the tissue by one voxel more than it was eroded. That also rounds off the brain's
    own thin edges (2 % of a stripped brain), so a stripped volume, which has no scalp, is
    given `radius_mm` 0: only its small pieces go.
    """
    tissue = labels > 0
    steps = [int(radius_mm / float(size) + 0.5) for size in spacing]
    core = processing.erode(tissue, steps)
    rows, starts, stops, piece = processing.tissue_pieces(core)
    if not len(piece):
        return labels
    sizes = np.bincount(piece, weights=stops - starts)
    small = sizes[piece] < min_piece * sizes.max()
    core.reshape(-1)[processing.run_pixels(rows[small], starts[small], stops[small], core)] = False
    kept = processing.grow_within(core, tissue, [step + 1 for step in steps])
    labels[tissue & ~kept] = 0
    return labels


def along(array, affine, plane):
    """(N, A, B) view of an (X, Y, Z) array turned to the nearest RAS axes: N slices along
    `plane`'s normal, each with its in-plane axes in RAS order (as training cuts them)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, ornt)
    return np.moveaxis(ras, PLANES[plane], 0)


def in_plane_mm(volume, plane):
    """(A, B) pixel sizes in mm of `plane`'s slices, as `along` lays them out."""
    return slice_mm(volume, plane)[1:]


def slice_mm(volume, plane):
    """(N, A, B) voxel sizes in mm of the (N, A, B) array `along` makes: across the slices,
    then in their plane."""
    ornt = nib.orientations.io_orientation(volume.affine)
    zooms = volume.zooms
    ras_zooms = [float(zooms[list(ornt[:, 0]).index(axis)]) for axis in range(3)]
    across = ras_zooms.pop(PLANES[plane])
    return [across, *ras_zooms]


def tissue_volumes(labels, volume, classes):
    """mL per class (not background), the brain's total and each tissue's share of it."""
    voxel_ml = float(np.prod(volume.zooms)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(classes))[: len(classes)]
    millilitres = {name: round(float(n) * voxel_ml, 2) for name, n in zip(classes, counts)}
    millilitres.pop(classes[0], None)
    brain = round(sum(millilitres.values()), 2)
    fractions = {k: round(v / brain, 4) if brain else 0.0 for k, v in millilitres.items()}
    return {
        "volumes_ml": millilitres,
        "brain_ml": brain,
        "fractions_of_brain": fractions,
        "voxel_ml": round(voxel_ml, 6),
    }


# --- Writing labels ---------------------------------------------------------------------------


def encode_labels(labels, volume, classes):
    """(X, Y, Z) uint8 labels -> .nii.gz bytes with the upload's shape, affine and qform/sform.

    A NIfTI upload's header is kept (its codes and units) but emptied of anything that may
    carry patient details: description, extensions, auxiliary file names.
    """
    labels = labels.reshape(volume.shape)
    if volume.header is not None:
        # The upload's header as stored: quaternions, srow and both codes are kept bit for bit.
        image_class = (
            nib.Nifti2Image if isinstance(volume.header, nib.Nifti2Header) else nib.Nifti1Image
        )
        image = image_class(labels, None, header=volume.header.copy())
    else:
        image = nib.Nifti1Image(labels, volume.affine)
        image.set_qform(volume.affine, code=1)  # scanner coordinates
        image.set_sform(volume.affine, code=1)
    header = image.header
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header.extensions.clear()
    header["descrip"] = ("labels: " + " ".join(f"{i}={c}" for i, c in enumerate(classes)))[:79]
    header["aux_file"] = b""
    header["intent_name"] = b"labels"
    header["cal_min"], header["cal_max"] = 0, len(classes) - 1
    if "db_name" in header:
        header["db_name"] = b""
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0)
