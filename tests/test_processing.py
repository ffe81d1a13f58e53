"""processing.py: decoding every PNG flavour, rejecting bad ones, normalising, encoding."""

import io
import struct
import zlib

import numpy as np
import png
import pytest
from conftest import DATA, read_png

import processing
from tools import fuzz


def encode(array, **info):
    """PNG bytes of an (H, W[, planes]) array with pypng."""
    out = io.BytesIO()
    height, width = array.shape[:2]
    planes = 1 if array.ndim == 2 else array.shape[2]
    writer = png.Writer(width, height, **info)
    writer.write(out, array.reshape(height, width * planes).tolist())
    return out.getvalue()


def png_with_header(width, height, idat=None, bitdepth=8, colour_type=0, extra=()):
    """A PNG signature, a valid-CRC IHDR claiming width x height, an IDAT (tiny unless given)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bitdepth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00") if idat is None else idat
    return fuzz.build([(b"IHDR", ihdr), *extra, (b"IDAT", idat), (b"IEND", b"")])


def reference_decode(data):
    """What decode_png must return, computed with PyPNG's own (slow, unbounded) decoder."""
    width, height, rows, info = png.Reader(bytes=data).asDirect()
    pixels = np.vstack([np.asarray(r) for r in rows]).reshape(height, width, info["planes"])
    dtype = np.uint16 if info["bitdepth"] > 8 else np.uint8
    if info["planes"] >= 3:  # Rec. 601 luma, rounded half up
        red, green, blue = (pixels[..., i].astype(np.int64) for i in range(3))
        return ((299 * red + 587 * green + 114 * blue + 500) // 1000).astype(dtype)
    return pixels[..., 0].astype(dtype)


@pytest.fixture
def grey():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 30)).astype(np.uint8)


def test_decodes_8_bit_greyscale(grey):
    decoded = processing.decode_png(encode(grey, greyscale=True))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, grey)


def test_decodes_16_bit_greyscale(grey):
    wide = grey.astype(np.uint16) * 257
    decoded = processing.decode_png(encode(wide, greyscale=True, bitdepth=16))
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, wide)


def test_grey_alpha_keeps_grey(grey):
    pixels = np.stack([grey, np.full_like(grey, 255)], axis=2)
    decoded = processing.decode_png(encode(pixels, greyscale=True, alpha=True))
    assert np.array_equal(decoded, grey)


@pytest.mark.parametrize("alpha", [False, True])
def test_colour_becomes_luminance(grey, alpha):
    planes = [grey, grey, grey] + ([np.full_like(grey, 255)] if alpha else [])
    decoded = processing.decode_png(encode(np.stack(planes, axis=2), greyscale=False, alpha=alpha))
    assert np.abs(decoded.astype(int) - grey).max() <= 1


def test_palette_is_resolved(grey):
    palette = [(v, v, v) for v in range(256)]
    decoded = processing.decode_png(encode(grey, palette=palette))
    assert np.abs(decoded.astype(int) - grey).max() <= 1


def test_every_mode_filter_and_interlace_decodes_as_pypng_does():
    rng = np.random.default_rng(3)
    for data in fuzz.seeds(rng, sizes=((16, 16), (37, 29), (70, 19))):
        decoded, expected = processing.decode_png(data), reference_decode(data)
        assert decoded.dtype == expected.dtype and np.array_equal(decoded, expected)


@pytest.mark.parametrize("kind", range(5))
def test_one_filter_type_on_every_row_decodes_as_pypng_does(kind):
    rng = np.random.default_rng(kind)
    for data in fuzz.seeds(rng, sizes=((37, 29),), kind=kind):
        decoded, expected = processing.decode_png(data), reference_decode(data)
        assert decoded.dtype == expected.dtype and np.array_equal(decoded, expected)


@pytest.mark.parametrize("bitdepth, interlace", [(8, False), (16, False), (8, True)])
@pytest.mark.parametrize("grey_rows", [slice(0, 20), slice(20, 60)])
def test_grey_saved_as_colour_decodes_exactly_across_blocks(
    monkeypatch, bitdepth, interlace, grey_rows
):
    """Blocks whose planes are equal unfilter only the red plane; blocks that are not, and the
    rows right after a switch, must still decode exactly, whatever filter each row uses."""
    monkeypatch.setattr(processing, "BLOCK_BYTES", 600)  # a handful of rows per block
    rng = np.random.default_rng(bitdepth)
    top = (1 << bitdepth) - 1
    pixels = rng.integers(0, top + 1, (60, 23, 4))
    pixels[grey_rows, :, 1] = pixels[grey_rows, :, 2] = pixels[grey_rows, :, 0]
    plain = encode(pixels, greyscale=False, alpha=True, bitdepth=bitdepth, interlace=interlace)
    for kind in (None, 3, 4):
        data = fuzz.refilter(plain, rng, kind)
        decoded, expected = processing.decode_png(data), reference_decode(data)
        assert np.array_equal(decoded, expected)
        assert np.array_equal(decoded[grey_rows], pixels[grey_rows, :, 0])


@pytest.mark.parametrize("block_bytes, wave_bytes", [(300, 40 << 20), (1 << 20, 3000)])
def test_average_and_paeth_rows_decode_exactly_across_blocks(monkeypatch, block_bytes, wave_bytes):
    """Blocks of inflated rows, and the row chunks that bound unfiltering's memory."""
    monkeypatch.setattr(processing, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(processing, "WAVE_BYTES", wave_bytes)
    rng = np.random.default_rng(7)
    for bitdepth, greyscale in ((8, True), (16, True), (8, False)):
        pixels = rng.integers(0, 1 << bitdepth, (45, 31) if greyscale else (45, 31, 3))
        plain = encode(pixels, greyscale=greyscale, bitdepth=bitdepth)
        for kind in (None, 3, 4):
            data = fuzz.refilter(plain, rng, kind)
            assert np.array_equal(processing.decode_png(data), reference_decode(data))


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16", "colour"])
def test_pngs_written_by_pillow_decode_as_pillow_reads_them(mode):
    """Pillow, like libpng, picks a filter per row (here mostly Paeth): a real encoder's files."""
    image = pytest.importorskip("PIL.Image")
    slice_ = read_png(DATA / "icbm2009a_axial100.png")
    if mode == "I;16":
        picture = image.fromarray(slice_.astype(np.uint16) * 257)
    elif mode == "colour":  # planes that differ: true colour
        rng = np.random.default_rng(0)
        planes = [slice_, np.roll(slice_, 5, 0), rng.integers(0, 256, slice_.shape)]
        picture = image.fromarray(np.stack(planes, 2).astype(np.uint8), "RGB")
    else:
        picture = image.fromarray(slice_, "L").convert(mode)
    out = io.BytesIO()
    picture.save(out, "PNG")
    data = out.getvalue()
    kinds = fuzz.scanlines(data)[:: len(fuzz.scanlines(data)) // slice_.shape[0]]
    assert {3, 4} & set(kinds), "Pillow wrote no Average or Paeth row"
    pixels = np.asarray(image.open(io.BytesIO(data))).astype(np.int64)
    if pixels.ndim == 3 and pixels.shape[2] >= 3:  # Rec. 601 luma, rounded half up
        pixels = (299 * pixels[..., 0] + 587 * pixels[..., 1] + 114 * pixels[..., 2] + 500) // 1000
    elif pixels.ndim == 3:
        pixels = pixels[..., 0]
    assert np.array_equal(processing.decode_png(data), pixels)


def test_the_16x16_inflation_bomb_is_refused_after_a_few_bytes():
    deflate = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    stream = b"".join(deflate.compress(zeros) for _ in range(64)) + deflate.flush()
    bomb = png_with_header(16, 16, idat=stream)  # 64 MiB of rows where 272 bytes are due
    assert len(bomb) < 100_000
    with pytest.raises(processing.ImageError, match="more pixel data than its header") as caught:
        processing.decode_png(bomb)
    assert caught.value.status == 400


@pytest.mark.parametrize("rows, words", [(15, "fewer pixel rows"), (17, "more pixel data")])
def test_a_wrong_row_count_is_a_400(rows, words):
    data = png_with_header(16, 16, idat=zlib.compress(bytes(rows * 17)))
    with pytest.raises(processing.ImageError, match=words):
        processing.decode_png(data)


def test_a_truncated_interlaced_image_is_a_400(grey):
    out = io.BytesIO()
    png.Writer(30, 40, greyscale=True, interlace=True).write(out, grey.tolist())
    image = fuzz.scanlines(out.getvalue())
    for cut in (1, len(image) // 2, len(image) - 1):
        with pytest.raises(processing.ImageError, match="fewer pixel rows"):
            processing.decode_png(fuzz.with_scanlines(out.getvalue(), image[:cut]))


def test_a_corrupted_chunk_length_is_a_400(grey):
    data = bytearray(encode(grey, greyscale=True))
    data[33:37] = struct.pack(">I", 0x7FFFFFF0)  # the IDAT's length, far past the end
    with pytest.raises(processing.ImageError, match="truncated"):
        processing.decode_png(bytes(data))


def test_a_palette_index_past_the_palette_is_a_400():
    palette = (b"PLTE", bytes(range(12)))  # 4 colours; the pixels use index 9
    data = png_with_header(
        16, 16, idat=zlib.compress(bytes([0] + [9] * 16) * 16), colour_type=3, extra=[palette]
    )
    with pytest.raises(processing.ImageError, match="palette index 9"):
        processing.decode_png(data)


@pytest.mark.parametrize(
    "idat, words",
    [
        (zlib.compress(bytes([7] + [0] * 16) * 16), "filter type 7"),
        (zlib.compress(bytes(16 * 17)) + b"junk", "after its image stream"),
        (zlib.compress(bytes(16 * 17))[:-30], "fewer pixel rows"),
        (b"not zlib at all", "damaged"),
    ],
)
def test_damaged_image_data_is_a_400(idat, words):
    with pytest.raises(processing.ImageError, match=words) as caught:
        processing.decode_png(png_with_header(16, 16, idat=idat))
    assert caught.value.status == 400


def test_normalise_is_independent_of_bit_depth(grey):
    assert np.allclose(
        processing.normalise(grey), processing.normalise(grey.astype(np.uint16) * 257), atol=1e-5
    )
    normalised = processing.normalise(grey)
    assert normalised.dtype == np.float32 and normalised.min() == 0 and normalised.max() <= 2


def test_normalise_of_a_blank_slice_is_zero():
    assert not processing.normalise(np.full((20, 20), 7, np.uint8)).any()


@pytest.mark.parametrize(
    "data, error, words",
    [
        (b"", processing.ImageError, "empty"),
        (b"hello, this is not an image at all", processing.UnsupportedFormat, "not an image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100), processing.UnsupportedFormat, "JPEG"),
        (b"GIF89a" + bytes(100), processing.UnsupportedFormat, "GIF"),
        (bytes(128) + b"DICM" + bytes(100), processing.UnsupportedFormat, "DICOM"),
        (png_with_header(100000, 100000), processing.ImageTooLarge, "100000x100000"),
        (png_with_header(1, 1), processing.ImageError, "at least"),
    ],
)
def test_rejects_with_a_clear_message(data, error, words):
    with pytest.raises(error, match=words) as caught:
        processing.decode_png(data)
    assert 400 <= caught.value.status < 500


def test_rejects_truncated_png(grey):
    data = encode(grey, greyscale=True)
    for cut in (20, 40, len(data) - 20):
        with pytest.raises(processing.ImageError):
            processing.decode_png(data[:cut])


def test_rejects_a_damaged_header_crc(grey):
    data = bytearray(encode(grey, greyscale=True))
    data[20] ^= 0xFF
    with pytest.raises(processing.ImageError, match="header"):
        processing.decode_png(bytes(data))


def test_mask_round_trips_as_a_palette_png():
    mask = np.random.default_rng(1).integers(0, 4, (33, 47)).astype(np.uint8)
    data = processing.encode_mask(mask)
    reader = png.Reader(bytes=data)
    reader.preamble()
    assert reader.color_type == 3 and len(reader.palette()) == 4
    assert np.array_equal(read_png(data), mask)


@pytest.fixture
def head():
    """A real 233x197 brain slice (uint8)."""
    return read_png(DATA / "icbm2009a_axial100.png")


def test_frame_ignores_a_black_canvas(head):
    frame, geometry = processing.frame_slice(head, 256)
    canvas = np.zeros((512, 600), np.uint8)
    canvas[100 : 100 + head.shape[0], 250 : 250 + head.shape[1]] = head
    framed, placed = processing.frame_slice(canvas, 256)
    assert frame.shape == (256, 256) and frame.dtype == np.float32
    assert np.array_equal(frame, framed)
    assert (placed.centre_y - geometry.centre_y, placed.centre_x - geometry.centre_x) == (100, 250)


@pytest.mark.parametrize("factor", [2, 3, 4, 6])
def test_nearest_upscaling_is_undone(head, factor):
    upscaled = np.repeat(np.repeat(head, factor, 0), factor, 1)
    reduced, found = processing.undo_upscaling(upscaled)
    assert found == factor and np.array_equal(reduced, head)
    frame, geometry = processing.frame_slice(upscaled, 256)
    assert np.array_equal(frame, processing.frame_slice(head, 256)[0])
    scores = np.random.default_rng(0).normal(size=(4, 256, 256)).astype(np.float32)
    mask = processing.mask_from_scores(scores, geometry)
    plain = processing.mask_from_scores(scores, processing.frame_slice(head, 256)[1])
    assert np.array_equal(mask, np.repeat(np.repeat(plain, factor, 0), factor, 1))


def test_a_slice_that_only_looks_upscaled_is_kept(head):
    upscaled = np.repeat(np.repeat(head, 2, 0), 2, 1)
    upscaled[101, 77] ^= 1
    assert processing.undo_upscaling(upscaled)[1] == 1
    assert processing.undo_upscaling(head)[1] == 1


def test_an_upscaled_slice_off_the_grid_frames_nearly_the_same(head):
    frame = processing.frame_slice(head, 256)[0]
    canvas = np.zeros((720, 720), np.uint8)
    canvas[11 : 11 + 3 * head.shape[0], 7 : 7 + 3 * head.shape[1]] = np.repeat(
        np.repeat(head, 3, 0), 3, 1
    )
    assert processing.undo_upscaling(canvas)[1] == 1
    assert np.abs(processing.frame_slice(canvas, 256)[0] - frame).mean() < 0.005


def test_frame_fits_the_head_box_with_a_margin(head):
    frame, geometry = processing.frame_slice(head, 128)
    top, bottom, left, right = processing.head_box(processing.normalise(head))
    assert geometry.extent == pytest.approx(
        max(bottom - top, right - left) * (1 + 2 * processing.HEAD_MARGIN)
    )
    # the margin is background on every side of the frame
    assert frame[:4].max() < 0.05 and frame[-4:].max() < 0.05
    assert frame[:, :4].max() < 0.05 and frame[:, -4:].max() < 0.05
    assert frame[40:88, 40:88].mean() > 0.3


def test_a_blank_slice_frames_the_whole_image():
    assert processing.head_box(np.zeros((20, 30), np.float32)) == (0, 20, 0, 30)


def test_scores_map_back_to_the_upload_size():
    geometry = processing.Geometry(300, 280, 150.0, 140.0, 250.0, 64)
    scores = np.zeros((4, 64, 64), np.float32)
    scores[2] = 1
    mask = processing.mask_from_scores(scores, geometry)
    assert mask.shape == (300, 280)
    assert (mask[25:275, 15:265] == 2).all()
    assert not mask[:24].any() and not mask[:, :14].any() and not mask[:, 266:].any()


@pytest.mark.parametrize(
    "geometry",
    [
        processing.Geometry(90, 70, 45.0, 35.0, 64.0, 32),  # by strips
        processing.Geometry(300, 170, 150.0, 80.0, 230.0, 32),  # by frame rows
    ],
)
def test_scores_are_interpolated_bilinearly(geometry):
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(4, 32, 32)).astype(np.float32)
    mask = processing.mask_from_scores(scores, geometry, rows_per_strip=7)
    y, x = processing.frame_coordinates(geometry, 0), processing.frame_coordinates(geometry, 1)
    inside_y, inside_x = (y > -0.5) & (y < 31.5), (x > -0.5) & (x < 31.5)
    y, x = np.clip(y, 0, 31), np.clip(x, 0, 31)
    y0, x0 = np.minimum(np.floor(y), 30).astype(int), np.minimum(np.floor(x), 30).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    dense = sum(
        scores[:, y0 + dy][:, :, x0 + dx] * (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
        for dy in (0, 1)
        for dx in (0, 1)
    )
    expected = np.argmax(dense, axis=0)
    assert np.array_equal(mask[inside_y][:, inside_x], expected[inside_y][:, inside_x])


def stripped_brain():
    """A (40, 50) stripped slice: a disc of brain with a dark rim, black outside."""
    y, x = np.ogrid[:40, :50]
    distance = np.hypot(y - 20, x - 25)
    slice_ = np.where(distance < 15, 200, 0).astype(np.uint8)
    slice_[(distance >= 13) & (distance < 15)] = 10  # fluid at the brain's edge
    return slice_, distance


def test_a_stripped_slices_dark_brain_pixels_become_csf():
    slice_, distance = stripped_brain()
    mask = np.where(distance < 14.2, 2, 0).astype(np.uint8)  # the network missed part of the rim
    filled = processing.fill_stripped(slice_, mask.copy())
    assert (filled[slice_ > 0] > 0).all()
    assert (filled[(slice_ > 0) & (mask == 0)] == 1).all()
    assert not filled[slice_ == 0].any()
    assert np.array_equal(filled[mask > 0], mask[mask > 0])


def test_a_head_with_its_skull_is_left_as_the_network_made_it():
    slice_, distance = stripped_brain()
    slice_[(distance >= 15) & (distance < 19)] = 120  # skull and scalp around the brain
    mask = np.where(distance < 13.5, 2, 0).astype(np.uint8)
    assert np.array_equal(processing.fill_stripped(slice_, mask.copy()), mask)


def test_a_slice_the_network_calls_all_background_stays_background():
    slice_, _ = stripped_brain()
    mask = np.zeros(slice_.shape, np.uint8)
    assert not processing.fill_stripped(slice_, mask).any()


def head_frame(side=128):
    """(tissue, brain, tongue, fold, image) of a skull-on frame as the network might call it:
    a brain disc, a tongue below it joined by a 3-pixel bridge, and a thin fold of the brain
    (2 pixels across) that reaches out and touches nothing else; `image` has the tissue
    bright inside a head of scalp, skull, face and neck, with black air around it."""
    y, x = np.ogrid[:side, :side]
    brain = np.hypot(y - 45, x - 64) < 35
    tongue = np.hypot((y - 105) / 12, (x - 64) / 25) < 1
    bridge = (np.abs(x - 64) <= 1) & (y >= 75) & (y <= 95)
    fold = (y >= 45) & (y <= 46) & (x >= 95) & (x < 115)
    tissue = brain | tongue | bridge | fold
    head = np.hypot(y - 64, x - 64) < 64
    image = np.where(tissue, 200, np.where(head, 60, 0)).astype(np.uint8)
    return tissue, brain, tongue, fold, image


def test_stray_tissue_is_the_tongue_and_its_bridge_not_the_brain_or_its_thin_fold():
    tissue, brain, tongue, fold, _ = head_frame()
    stray = processing.stray_tissue(tissue)
    assert stray[tongue].all()
    assert not stray[brain].any() and not stray[fold].any()
    # the bridge goes but for its foot, which grows back with the brain's eroded edge
    assert np.count_nonzero(tissue & ~stray & ~brain & ~fold) <= 3 * (processing.CORE_STEPS + 1)


def test_a_brain_in_one_piece_or_two_like_halves_has_no_stray_tissue():
    _, brain, _, _, _ = head_frame()
    assert processing.stray_tissue(brain) is None
    halves = brain.copy()
    halves[:, 62:66] = False  # cut in two: the larger half is not the only brain
    assert processing.stray_tissue(halves) is None
    assert processing.stray_tissue(np.zeros_like(brain)) is None


def scores_of(tissue):
    """(4, H, W) scores calling `tissue` grey matter, the rest background."""
    scores = np.zeros((4,) + tissue.shape, np.float32)
    scores[0] = 1
    scores[2][tissue] = 2
    return scores


def test_mask_of_drops_stray_tissue_from_a_skull_on_slice():
    tissue, brain, tongue, _, image = head_frame()
    geometry = processing.Geometry(128, 128, 64.0, 64.0, 128.0, 128)
    mask = processing.mask_of(image, scores_of(tissue), geometry)
    assert (mask[brain] == 2).all() and not mask[tongue].any()
    kept = processing.mask_of(image, scores_of(tissue), geometry, drop_stray=False)
    assert (kept[tongue] == 2).all()


def test_a_stripped_slice_keeps_its_pieces_even_where_the_network_misses_its_rim():
    # a low stripped slice: the tongue's place taken by a temporal pole, both with a dark rim
    # of fluid that the network calls background, so it covers 0.6-0.85 of the brain
    tissue, _, tongue, _, _ = head_frame()
    rimmed = processing.by_cross(tissue[None], [0, 3, 3], np.logical_or)[0]
    image = np.where(tissue, 200, np.where(rimmed, 30, 0)).astype(np.uint8)
    cover = np.count_nonzero(tissue) / np.count_nonzero(rimmed)
    assert processing.STRAY_COVER <= cover < processing.STRIPPED_COVER
    geometry = processing.Geometry(128, 128, 64.0, 64.0, 128.0, 128)
    mask = processing.mask_of(image, scores_of(tissue), geometry)
    assert (mask[tongue] == 2).all() and not mask[rimmed & ~tissue].any()


def test_first_argmax_is_numpys_argmax_ties_included():
    scores = np.random.default_rng(4).integers(0, 3, (4, 40, 30)).astype(np.float32)
    assert np.array_equal(processing.first_argmax(scores), np.argmax(scores, axis=0))


@pytest.mark.parametrize("step", [0.4, 1.0, 2.5, 7.3])
def test_resampling_reads_only_the_kernels_taps(step):
    image = np.random.default_rng(5).random((60, 9)).astype(np.float32)
    coordinates = np.arange(-3, 70, step)[:40] - 0.25
    radius = max(step, 1.0)
    source = np.arange(-100, 200)
    kernel = np.clip(1 - np.abs(source[None] - coordinates[:, None]) / radius, 0, None)
    kernel /= kernel.sum(1, keepdims=True)
    dense = kernel[:, (source >= 0) & (source < 60)]  # taps beyond the image are background
    expected = dense @ image
    assert np.allclose(processing.resample_rows(image, coordinates, step), expected, atol=1e-5)


@pytest.mark.parametrize("step", [0.4, 1.0, 2.5, 7.3])
@pytest.mark.parametrize("offset", [-30.0, 0.0, 17.6, 55.0])
def test_the_kernels_span_is_all_resampling_reads(step, offset):
    image = np.random.default_rng(6).random((60, 9)).astype(np.float32) + 1
    coordinates = offset + np.arange(12) * step
    first, stop = processing.kernel_span(coordinates, step, len(image))
    whole = processing.resample_rows(image, coordinates, step)
    part = processing.resample_rows(image[first:stop], coordinates - first, step)
    assert np.array_equal(part, whole)
    if 0 < first:  # the row before the span has no weight: changing it changes nothing
        image[first - 1] = 99
        assert np.array_equal(processing.resample_rows(image, coordinates, step), whole)


def test_a_large_upload_is_framed_at_the_fixed_side():
    big = np.zeros((4096, 3000), np.uint16)
    big[500:3500, 400:2600] = 30000
    frame, geometry = processing.frame_slice(big, 256)
    assert frame.shape == (256, 256)
    mask = processing.mask_from_scores(np.ones((4, 256, 256), np.float32), geometry)
    assert mask.shape == (4096, 3000)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_normalise_matches_numpy_percentile(dtype):
    values = np.random.default_rng(3).integers(0, 200, (50, 40)).astype(dtype)
    shifted = values.astype(np.float32) - values.min()
    expected = np.clip(shifted / np.percentile(shifted[shifted > 0], 99), 0, 2)
    assert np.allclose(processing.normalise(values), expected, atol=1e-6)


def test_class_fractions_sum_to_one():
    mask = np.array([[0, 1], [2, 2]], np.uint8)
    fractions = processing.class_fractions(mask)
    assert fractions == {"background": 0.25, "csf": 0.25, "grey_matter": 0.5, "white_matter": 0.0}


@pytest.mark.parametrize("channels", [1, 3])
def test_two_passes_pair_each_of_several_frames_with_its_own_flip(channels):
    frames = np.random.default_rng(7).random((3, 8, 8)).astype(np.float32)

    def predict(batch):  # two "classes": the frame, and twice it plus its place in the batch
        assert batch.shape == (6, channels, 8, 8) and batch.flags.c_contiguous
        assert all(np.array_equal(batch[:, c], batch[:, 0]) for c in range(channels))
        place = np.arange(len(batch), dtype=np.float32)[:, None, None]
        return np.stack([batch[:, 0], 2 * batch[:, 0] + place], axis=1)

    scores = processing.predict_frames(predict, frames, channels, 2)
    assert scores.shape == (3, 2, 8, 8)
    assert np.allclose(scores[:, 0], frames)  # each frame's flip was flipped back onto it
    place = np.arange(3, dtype=np.float32)[:, None, None]
    assert np.allclose(scores[:, 1], 2 * frames + place + 1.5)  # frame i with batch entry i + 3
