"""volumes.py and POST /volume: NIfTI and DICOM in, labels and tissue volumes out, bad scans 4xx."""

import gzip
import io
import json
import subprocess
import tracemalloc
import zipfile

import nibabel as nib
import numpy as np
import pytest
from conftest import ICBM_BRAIN_ML, nifti_bytes, read_png
from test_app import multipart, request

import processing
import volumes


def post(url, data, query="", headers=None):
    """(status, headers, body) of POST /volume with a raw body."""
    return request(f"{url}/volume{query}", data, "POST", headers or {})


def labels_of(body):
    """The NIfTI image in a .nii.gz response body."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(body))


def test_curl_nifti_in_labels_out_in_the_scans_own_geometry(server_url, icbm_nifti, tmp_path):
    # The test writes the scan to a file only because curl reads uploads from files.
    scan = tmp_path / "icbm.nii.gz"
    scan.write_bytes(icbm_nifti)
    out = tmp_path / "labels.nii.gz"
    command = ["curl", "-sS", "--data-binary", f"@{scan}", "-o", str(out), "-D", "-"]
    result = subprocess.run(
        [*command, server_url + "/volume"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "200 OK" in result.stdout.splitlines()[0]
    source, labels = labels_of(icbm_nifti), labels_of(out.read_bytes())
    assert labels.shape == source.shape and labels.get_data_dtype() == np.uint8
    assert np.array_equal(labels.affine, source.affine)
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "srow_x"):
        assert np.array_equal(labels.header[field], source.header[field]), field
    values = np.asarray(labels.dataobj)
    assert set(np.unique(values)) == {0, 1, 2, 3}
    brain_ml = np.isin(values, (1, 2, 3)).sum() * 8 / 1000
    assert abs(brain_ml - ICBM_BRAIN_ML) < 0.1 * ICBM_BRAIN_ML


def test_json_volumes_agree_with_the_reference_brain(server_url, icbm_nifti):
    status, headers, body = post(server_url, icbm_nifti, headers={"Accept": "application/json"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    summary = json.loads(body)
    print(f"\nICBM 2009a 2 mm: {summary['volumes_ml']}, brain {summary['brain_ml']} mL")
    assert abs(summary["brain_ml"] - ICBM_BRAIN_ML) < 0.1 * ICBM_BRAIN_ML
    ml = summary["volumes_ml"]
    assert set(ml) == {"csf", "grey_matter", "white_matter"}
    assert summary["brain_ml"] == pytest.approx(sum(ml.values()), abs=0.05)
    assert ml["grey_matter"] > ml["white_matter"] > ml["csf"] > 0
    assert sum(summary["fractions_of_brain"].values()) == pytest.approx(1, abs=1e-3)
    assert summary["voxel_ml"] == 0.008 and summary["voxel_mm"] == [2.0, 2.0, 2.0]
    # a whole brain in 2 mm cubes: cut along all three planes, 98 + 116 + 94 slices
    assert (summary["plane"], summary["slices"], summary["shape"]) == ("all", 308, [98, 116, 94])
    assert summary["source"] == "nifti" and summary["orientation"] == "RAS"
    assert summary["inference_ms"] > 0 and summary["model_id"]


def test_any_orientation_gives_the_same_labels(model, icbm_slab):
    data, affine = icbm_slab
    straight = volumes.Volume(data, affine, "nifti", data.shape)
    labels, plane, count = volumes.segment(model, straight)
    assert (plane, count) == ("axial", 12)  # isotropic: the last axis, here superior
    # The same voxels stored as L-I-P with the slices on the first axis: a new affine, the
    # same anatomy, so the same labels once put back in the new voxel order.
    turned = np.ascontiguousarray(data[::-1, :, ::-1].transpose(2, 0, 1))
    ijk = np.zeros((4, 4))
    ijk[2, 0], ijk[0, 1], ijk[1, 2], ijk[3, 3] = -1, -1, 1, 1
    ijk[2, 3], ijk[0, 3] = data.shape[2] - 1, data.shape[0] - 1
    turned_affine = affine @ ijk
    assert nib.aff2axcodes(turned_affine) == ("I", "L", "A")
    relabelled, _, _ = volumes.segment(
        model, volumes.Volume(turned, turned_affine, "nifti", turned.shape), "axial"
    )
    assert np.array_equal(relabelled, labels[::-1, :, ::-1].transpose(2, 0, 1))


def test_default_plane_is_the_coarsest_axis():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shape = (4, 4, 4)
    for zooms, plane in [((1, 1, 1), "axial"), ((1, 5, 1), "coronal"), ((4, 1, 1), "sagittal")]:
        volume = volumes.Volume(np.zeros(shape), affine @ np.diag([*zooms, 1]), "nifti", shape)
        assert volumes.acquisition_plane(volume) == plane
    # stored L-I-P: the last array axis points posterior, so isotropic means coronal
    flipped = np.array([[-1, 0, 0, 0], [0, 0, -1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], float)
    assert volumes.acquisition_plane(volumes.Volume(np.zeros(shape), flipped, "n", shape)) == (
        "coronal"
    )


def test_all_planes_is_each_voxels_majority(model, icbm_nifti):
    image = nib.Nifti1Image.from_bytes(gzip.decompress(icbm_nifti))
    data = np.asarray(image.dataobj)
    volume = volumes.Volume(data, image.affine, "nifti", data.shape)
    assert volumes.default_plane(volume) == "all"
    labels, plane, count = volumes.segment(model, volume)
    assert (plane, count) == ("all", 98 + 116 + 94)
    coronal, sagittal, axial = (volumes.segment(model, volume, p)[0] for p in volumes.VOTING_ORDER)
    assert not np.array_equal(coronal, axial) and not np.array_equal(coronal, sagittal)
    assert np.array_equal(labels, np.where(sagittal == axial, sagittal, coronal))
    # where two planes agree, their label; where none does, coronal's
    two = (coronal == sagittal) | (coronal == axial)
    assert (labels[two] == coronal[two]).all()


def test_default_plane_is_all_only_for_a_whole_brain_in_near_cubic_voxels():
    cases = [
        ((1.0, 1.0, 1.2), (160, 200, 150), "all"),
        ((0.9, 0.9, 3.0), (256, 256, 50), "axial"),  # thick slices: the acquisition plane
        ((2.0, 2.0, 2.0), (98, 116, 12), "axial"),  # a 24 mm slab
    ]
    for zooms, shape, plane in cases:
        volume = volumes.Volume(np.zeros(shape, np.uint8), np.diag([*zooms, 1]), "n", shape)
        assert volumes.default_plane(volume) == plane


def test_planes_and_4d_single_volume(server_url, icbm_slab):
    data, affine = icbm_slab
    four_d = nifti_bytes(data[:, 40:60, :, None], affine)
    status, _, body = post(server_url, four_d, "?plane=coronal&format=json")
    summary = json.loads(body)
    assert status == 200 and summary["plane"] == "coronal" and summary["slices"] == 20
    assert summary["shape"] == [98, 20, 12, 1]
    status, _, body = post(server_url, four_d)
    assert status == 200 and labels_of(body).shape == (98, 20, 12, 1)


def test_blank_volume_is_all_background(server_url):
    blank = nifti_bytes(np.zeros((20, 20, 5), np.int16), np.eye(4))
    status, _, body = post(server_url, blank, "?format=json")
    assert status == 200 and json.loads(body)["brain_ml"] == 0
    status, _, body = post(server_url, blank)
    assert status == 200 and not np.asarray(labels_of(body).dataobj).any()


def test_stored_types_and_scaling_are_read(icbm_slab):
    data, affine = icbm_slab
    for dtype in (np.int16, np.int32, np.float64, np.uint16):
        volume = volumes.read_nifti(nifti_bytes(data.astype(dtype), affine))
        assert volume.data.shape == data.shape and np.allclose(volume.data, data)
    noisy = data.astype(np.float32)
    noisy[0, 0, 0] = np.nan
    assert np.isfinite(volumes.read_nifti(nifti_bytes(noisy, affine, gz=False)).data).all()
    image = nib.Nifti1Image(data.astype(np.int16), affine)
    image.header.set_slope_inter(-2.0, 5.0)
    flipped = volumes.read_nifti(image.to_bytes()).data
    assert np.allclose(flipped, -2.0 * data + 5.0)


def test_gzip_bomb_inflates_only_what_the_header_promises():
    small = nib.Nifti1Image(np.ones((16, 16, 16), np.uint8), np.eye(4)).to_bytes()
    stream = zlib_stream(small, 256)  # then 256 MB of zeros
    assert len(stream) < 1024 * 1024
    tracemalloc.start()
    try:
        volume = volumes.read_nifti(stream)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert volume.data.shape == (16, 16, 16)
    assert peak < 20 * 1024 * 1024, f"{peak / 1e6:.0f} MB held while reading"


def zlib_stream(head, zeros_mb):
    """gzip bytes of `head` and then `zeros_mb` MB of zeros, made a MB at a time."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1024 * 1024)
    parts = [packer.compress(head)] + [packer.compress(block) for _ in range(zeros_mb)]
    return b"".join(parts) + packer.flush()


def header_only(shape, dtype=np.int16, magic=b"n+1"):
    """A NIfTI-1 header claiming `shape` and `dtype`, with a few voxels only."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["magic"] = magic
    header["vox_offset"] = 352
    return header.binaryblock + bytes(4) + bytes(64)


@pytest.mark.parametrize(
    "make, status, words",
    [
        (lambda: header_only((4000, 4000, 4000)), 413, "limit is"),
        (lambda: gzip.compress(header_only((4000, 4000, 4000))), 413, "limit is"),
        (lambda: header_only((64, 64, 64)), 400, "truncated"),
        (lambda: header_only((64, 64)), 400, "2-D"),
        (lambda: header_only((64, 64, 1)), 400, "2-D"),
        (lambda: header_only((8, 8, 8, 3)), 400, "4-D"),
        (lambda: header_only((8, 8, 8), np.complex64), 415, "complex"),
        (lambda: header_only((8, 8, 8), magic=b"ni1"), 415, ".hdr/.img"),
        (lambda: b"\x1f\x8b\x08\x00" + bytes(40), 400, "gzip"),
        (lambda: gzip.compress(b"not a scan" * 100), 415, "not a NIfTI"),
        (lambda: b"", 400, "empty"),
        (lambda: b"\x89PNG\r\n\x1a\n" + bytes(100), 415, "/segment"),
        (lambda: b"\xff\xd8\xff\xe0" + bytes(300), 415, "JPEG"),
        (lambda: b"PK\x03\x04" + bytes(100), 400, "zip"),
    ],
)
def test_bad_volumes_get_a_json_4xx(server_url, make, status, words):
    answer, headers, body = post(server_url, make())
    assert answer == status and headers["Content-Type"] == "application/json"
    assert words in json.loads(body)["error"]
    assert request(server_url + "/health")[0] == 200


@pytest.mark.parametrize("query, words", [("?plane=oblique", "plane"), ("?format=tiff", "format")])
def test_bad_options_are_a_400(server_url, icbm_slab, query, words):
    status, _, body = post(server_url, nifti_bytes(*icbm_slab), query)
    assert status == 400 and words in json.loads(body)["error"]


def test_multipart_upload_and_mosaic(server_url, icbm_slab):
    body, content_type = multipart("file", nifti_bytes(*icbm_slab), "slab.nii.gz")
    status, headers, answer = post(server_url, body, "?format=png", {"Content-Type": content_type})
    assert status == 200 and headers["Content-Type"] == "image/png"
    mosaic = read_png(answer)
    assert mosaic.shape[1] >= 4 * 160  # four enlarged tiles across


# --- DICOM ---------------------------------------------------------------------------------


def dicom_series(data, affine, modality="MR", series="1.2.3.4", syntax=None, slope=1.0):
    """One single-frame DICOM file (bytes) per slice of an (X, Y, Z) volume with RAS `affine`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    across, down = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    files = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
        ds.PatientName, ds.PatientID = "Doe^Jane", "PATIENT-SECRET-42"
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series, "1.2.3"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelSpacing = [float(down), float(across)]
        ds.ImageOrientationPatient = [*(lps[:3, 0] / across), *(lps[:3, 1] / down)]
        ds.ImagePositionPatient = list(map(float, lps[:3, 3] + k * lps[:3, 2]))
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.RescaleSlope, ds.RescaleIntercept = slope, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        pixels = np.ascontiguousarray(data[:, :, k].T.astype(np.uint16)).tobytes()
        if syntax:  # a compressed syntax: one encapsulated frame (not a real JPEG stream)
            from pydicom.encaps import encapsulate

            pixels = encapsulate([b"\xff\xd8\xff\xdb" + pixels[:1000] + b"\xff\xd9"])
        ds.PixelData = pixels
        out = io.BytesIO()
        ds.save_as(out, write_like_original=False)
        files.append(out.getvalue())
    return files


def zipped(files, names=None):
    """A zip (bytes) of the files, in a shuffled order, in a folder as exported."""
    out = io.BytesIO()
    order = np.random.default_rng(0).permutation(len(files))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for n in order:
            archive.writestr(names[n] if names else f"series/IM{n:04d}", files[n])
    return out.getvalue()


def test_dicom_zip_gives_the_niftis_labels(server_url, icbm_slab, caplog):
    data, affine = icbm_slab
    status, _, body = post(server_url, nifti_bytes(data, affine))
    from_nifti = labels_of(body)
    series = zipped(dicom_series(data, affine))
    with caplog.at_level("DEBUG"):
        status, headers, body = post(server_url, series)
    assert status == 200 and headers["Content-Type"] == "application/gzip"
    from_dicom = labels_of(body)
    assert from_dicom.shape == data.shape and np.allclose(from_dicom.affine, affine, atol=1e-4)
    assert np.array_equal(np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj))
    assert b"Doe" not in body and b"SECRET" not in gzip.decompress(body)
    status, _, body = post(server_url, series, "?format=json")
    summary = json.loads(body)
    assert summary["source"] == "dicom" and summary["slices"] == 12
    assert "Doe" not in body.decode() and "SECRET" not in body.decode()
    assert "SECRET" not in caplog.text and "Doe" not in caplog.text


def test_dicom_files_as_multipart_parts(server_url, icbm_slab):
    files = dicom_series(icbm_slab[0][:, :, :3], icbm_slab[1])
    boundary = "b0undary"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{n}.dcm"\r\n'
            f"Content-Type: application/dicom\r\n\r\n".encode()
            + data
            + b"\r\n"
            for n, data in enumerate(files[::-1])
        )
        + f"--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, answer = post(server_url, body, "?format=json", headers)
    assert status == 200 and json.loads(answer)["slices"] == 3


def test_dicom_rescale_and_geometry_are_read(icbm_slab):
    data, affine = icbm_slab
    volume = volumes.read_dicom_zip(zipped(dicom_series(data[:, :, :4], affine, slope=2.5)))
    assert np.allclose(volume.data, data[:, :, :4] * 2.5)
    assert np.allclose(volume.affine, affine, atol=1e-4)


def bad_series(icbm_slab, name):
    """(zip bytes, status, words in the error) of one bad upload."""
    data, affine = icbm_slab[0][:, :, :3], icbm_slab[1]
    if name == "bomb":
        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("huge.dcm", bytes(200 * 1024 * 1024))
        return bomb.getvalue(), 413, "inflate"
    files = dicom_series(data, affine)
    return {
        "ct": lambda: (zipped(dicom_series(data, affine, modality="CT")), 415, "MR only"),
        "mixed": lambda: (zipped(files + dicom_series(data, affine, series="9")), 400, "2 series"),
        "repeated": lambda: (zipped(files + files), 400, "share one slice position"),
        "jpeg": lambda: (
            zipped(dicom_series(data, affine, syntax="1.2.840.10008.1.2.4.50")),
            415,
            "cannot decode",
        ),
        "not dicom": lambda: (zipped([b"hello"] * 3), 400, "no DICOM"),
    }[name]()


@pytest.mark.parametrize("name", ["ct", "mixed", "repeated", "jpeg", "not dicom", "bomb"])
def test_bad_dicom_gets_a_json_4xx(server_url, icbm_slab, name):
    body, status, words = bad_series(icbm_slab, name)
    answer, _, reply = post(server_url, body)
    assert answer == status and words in json.loads(reply)["error"], reply
    assert "Doe" not in reply.decode()


def test_tissue_pieces_are_scipys_26_connected_pieces():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for trial in range(12):
        noise = ndimage.gaussian_filter(rng.random((14, 19, 23)), 1.2)
        mask = noise > np.quantile(noise, rng.uniform(0.4, 0.8))
        rows, starts, stops, piece = processing.tissue_pieces(mask)
        ours = np.full(mask.shape, -1).reshape(-1, mask.shape[2])
        for row, start, stop, number in zip(rows, starts, stops, piece):
            ours[row, start:stop] = number
        theirs, count = ndimage.label(mask, np.ones((3, 3, 3)))
        ours = ours.reshape(mask.shape)
        assert ((ours >= 0) == mask).all()
        assert count > 1 or trial  # the masks do come in several pieces
        # the same partition: each of scipy's pieces is exactly one of ours
        assert len(set(zip(theirs[mask].tolist(), ours[mask].tolist()))) == count
        assert len(set(piece.tolist())) == count


def head_phantom(spacing=1.0):
    """(labels, brain) of a 1 mm-like head: a brain ball, a scalp shell around it joined by a
    thin bridge, and an eye, all called tissue as a slice-by-slice network might."""
    z, y, x = np.indices((60, 70, 70)) * spacing
    centre = np.array([30, 35, 35]) * spacing
    radius = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    brain = radius < 22 * spacing
    scalp = (radius > 27 * spacing) & (radius < 29 * spacing) & (z < 55 * spacing)
    bridge = (np.abs(y - centre[1]) < spacing) & (np.abs(x - centre[2]) < spacing)
    bridge &= (radius >= 22 * spacing) & (radius <= 27 * spacing)
    eye = np.sqrt((z - 30 * spacing) ** 2 + (y - 66 * spacing) ** 2 + (x - 35 * spacing) ** 2)
    labels = np.where(brain, 3, 0).astype(np.uint8)
    labels[scalp | bridge] = 2
    labels[eye < 3 * spacing] = 1
    return labels, brain


def test_keep_brain_drops_scalp_bridge_and_eye_not_brain():
    labels, brain = head_phantom()
    assert np.count_nonzero(labels[~brain]) > 18000
    kept = volumes.keep_brain(labels.copy(), [1.0, 1.0, 1.0])
    assert (kept[brain] == 3).all()
    # all but the bridge's foot, which grows back with the brain's eroded rim
    assert np.count_nonzero(kept[~brain]) <= 4


def test_keep_brain_keeps_a_brain_cut_in_two_and_one_cut_by_the_field_of_view():
    labels, brain = head_phantom()
    labels[30] = 0  # a slice the network got wrong: the brain in two halves
    kept = volumes.keep_brain(labels.copy(), [1.0, 1.0, 1.0])
    assert np.count_nonzero(kept[~brain]) <= 8
    # both halves stay; an opening rounds the edge where the cut meets the brain's surface
    lost = np.argwhere(brain & (kept == 0))[:, 0]
    assert set(lost) <= {27, 28, 29, 30, 31, 32, 33}
    assert len(lost) - np.count_nonzero(brain[30]) < 0.03 * brain.sum()
    slab = volumes.keep_brain(labels[15:25].copy(), [1.0, 1.0, 1.0])  # 10 slices of it
    assert np.count_nonzero(slab[brain[15:25]]) > 0.9 * np.count_nonzero(brain[15:25])


def test_keep_brain_erodes_in_millimetres():
    # 5 mm slices: an erosion of 3 mm takes one slice off each end, not three.
    labels, brain = head_phantom()
    thick = labels[::5].copy()
    kept = volumes.keep_brain(thick.copy(), [5.0, 1.0, 1.0])
    assert (kept[brain[::5]] == 3).all() and kept.any()
    assert processing.erode(np.ones((5, 9, 9), bool), [1, 3, 3]).sum() == 3 * 3 * 3


def test_a_stripped_volume_keeps_its_thin_edges():
    labels, brain = head_phantom()
    image = np.where(brain, 100.0, 0.0)
    fins = np.zeros_like(brain)
    fins[30, 10:60, 34:36] = True  # a thin fold of the brain, 2 voxels across
    image[fins], labels[fins] = 100.0, 2
    labels[~brain & ~fins] = 0  # what the network leaves of a stripped head: brain only
    assert volumes.looks_stripped(image, labels)
    assert volumes.keep_brain(labels.copy(), [1.0] * 3, 0.0)[fins].all()
    assert not volumes.keep_brain(labels.copy(), [1.0] * 3)[fins].all()  # an opening would not
    # with a scalp in the image that the labels leave out, the volume has a skull
    skull_on = image + np.where(head_phantom()[0] == 2, 80.0, 0.0) * ~brain
    assert not volumes.looks_stripped(skull_on, labels)
