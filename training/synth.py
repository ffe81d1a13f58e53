"""SynthSeg-style training slices (Billot et al. 2023) of whole heads, as a scanner exports them.

`SliceSampler.sample()` returns one (size, size) float32 network input and its uint8 target,
made the way the server sees an upload: a random plane and slice (thin, or a thick slab
averaged), the head around the brain (from the TPM, or procedural layers of bone, marrow,
fat and scalp of random thickness), a random intensity per generation class (or the
volume's real image), a random affine and elastic warp onto an acquisition grid of 0.5-3 mm
pixels with partial fields of view, then blur, ringing, bias, gamma, Rician noise,
8/16-bit windowing, nearest-neighbour upscaling and black canvases; finally the server's own
`processing.frame_slice` and a random crop of its frame.
"""

import numpy as np
from scipy import ndimage

from processing import FRAME_SIDE, frame_slice
from training.data import brain_slices
from training.sources import TARGET_OF

# Generation classes: the 7 of `training.sources`, then 3 that only procedural heads use.
AIR, CSF, GREY, WHITE, BONE, SOFT, OTHER, FAT, MARROW, EYE = range(10)
CLASSES = 10
TARGETS = np.concatenate([TARGET_OF, np.zeros(3, np.uint8)])
# T1-like mean intensity ranges of the brain classes; the rest of the head is random.
BRAIN_MEANS = {AIR: (0.0, 0.08), CSF: (0.03, 0.35), GREY: (0.3, 0.65), WHITE: (0.55, 1.0)}


class SliceSampler:
    """Draws training slices from a list of Volumes; keeps per-plane brain slice indices."""

    def __init__(
        self,
        volumes,
        size=160,
        real_fraction=0.3,
        seed=0,
        pixel_mm=(0.5, 3.0),
        frame_side=FRAME_SIDE,
        beyond_brain=0.15,
        patches=0.0,
        thick=0.3,
        atrophy=0.0,
        repaint=0.0,
    ):
        self.volumes = volumes
        self.repaint = repaint
        self.patches = patches
        self.thick = thick
        self.atrophy = atrophy
        self.beyond_brain = beyond_brain
        self.frame_side = frame_side
        self.size = size
        self.real_fraction = real_fraction
        self.pixel_mm = pixel_mm
        self.rng = np.random.default_rng(seed)
        self.slices, self.beyond = [], []
        for volume in volumes:
            labels = volume.labels()
            head = np.argmax(volume.probs, axis=0) != AIR
            self.slices.append([brain_slices(labels, p) for p in range(3)])
            self.beyond.append([head_slices(labels, head, p) for p in range(3)])

    def batch(self, n):
        """(n, 1, size, size) float32 images and (n, size, size) uint8 targets."""
        images = np.zeros((n, 1, self.size, self.size), np.float32)
        targets = np.zeros((n, self.size, self.size), np.uint8)
        for i in range(n):
            images[i, 0], targets[i] = self.sample()
        return images, targets

    def sample(self):
        """One (image, target) pair, cropped from the frame the server would build."""
        rng = self.rng
        v = int(rng.integers(len(self.volumes)))
        volume, plane = self.volumes[v], int(rng.integers(3))
        beyond = self.beyond[v][plane]
        if len(beyond) and rng.random() < self.beyond_brain:
            index = int(rng.choice(beyond))  # skull base, neck, vertex: little or no brain
        else:
            index = int(rng.choice(self.slices[v][plane]))
        spacing = volume.spacing
        slab = 1
        if rng.random() < self.thick:  # a thick slice: partial volume through the plane
            slab = max(1, round(rng.uniform(2, 7) / spacing[plane]))
        probs = slab_mean(volume.probs, plane, index, slab).astype(np.float32)
        extra = np.zeros((CLASSES - len(probs),) + probs.shape[1:], np.float32)
        probs = np.concatenate([probs, extra])
        in_plane = np.delete(spacing, plane)
        use_real = volume.image is not None and rng.random() < self.real_fraction
        if not use_real and rng.random() < 0.5:
            probs = procedural_head(probs, in_plane, rng)
        elif not use_real:
            probs = split_soft_tissue(probs, rng)
        if not use_real and self.atrophy and rng.random() < self.atrophy:
            probs = atrophy(probs, in_plane, rng)
        labels = TARGETS[np.argmax(probs, axis=0)]
        if not use_real and self.patches and rng.random() < self.patches:
            probs = patchwork(probs, rng)
        if use_real:
            image = slab_mean(volume.image, plane, index, slab)
            image = image / max(float(image.max()), 1e-6)
            if self.repaint and rng.random() < self.repaint:
                image = repaint_head(image, labels, in_plane, rng)
        else:
            image = synthesise(probs, rng)
        head = np.argmax(probs, axis=0) != AIR
        strip = rng.random() < (0.25 if not use_real or has_skull(image, labels) else 1.0)
        if strip and (labels > 0).any():  # a stripped slice without brain would be blank
            head = ndimage.binary_dilation(labels > 0, iterations=int(rng.integers(0, 3)))
            image = image * head
        image, labels = acquire(image, labels, head, in_plane, rng, self.pixel_mm, self.frame_side)
        image = quantise(degrade(image, rng), rng)
        image, labels = export(image, labels, rng)
        frame, geometry = frame_slice(image, self.frame_side)
        target = frame_labels(labels, geometry)
        return crop(frame, target, self.size, rng)


def head_slices(labels, head, plane, min_head=0.05):
    """Indices along `plane` through the `head` mask (>= `min_head` of the slice) that are not
    brain slices (< 2 % brain in `labels`).

    Uploads include slices through the skull base, the eyes, the neck or the vertex; drawn
    only from brain slices, the network never learns that those are mostly not brain.
    """
    brain = set(brain_slices(labels, plane).tolist())
    per_slice = np.moveaxis(head, plane, 0).reshape(head.shape[plane], -1).mean(1)
    return np.array([i for i in np.flatnonzero(per_slice >= min_head) if i not in brain], int)


def slab_mean(volume, plane, index, slab):
    """Mean of `slab` neighbouring slices around `index` along `plane` of (..., X, Y, Z)."""
    axis = volume.ndim - 3 + plane
    low = max(0, index - slab // 2)
    high = min(volume.shape[axis], low + slab)
    return np.take(volume, range(low, high), axis=axis).astype(np.float32).mean(axis=axis)


def has_skull(image, labels):
    """Whether a real slice shows tissue outside the brain (templates are often stripped)."""
    return (image[labels == 0] > 0.1).mean() > 0.02


def procedural_head(probs, spacing, rng):
    """Replace the head around the brain by layers of random thickness and shape.

    From the brain outwards: a gap (dura, CSF-like), bone with a marrow band, then fat and
    scalp; beyond them air. Thicknesses vary smoothly around the head.
    """
    brain = probs[CSF : WHITE + 1].sum(0)
    outside = ndimage.distance_transform_edt(brain < 0.5, sampling=spacing)
    outside = outside + smooth_field(outside.shape, rng, rng.uniform(0, 4))
    edges = np.cumsum([rng.uniform(0, 3), rng.uniform(3, 9), rng.uniform(1, 6), rng.uniform(2, 9)])
    layer = np.digitize(outside, edges)  # 0 gap, 1 bone, 2 fat, 3 scalp, 4 air
    classes = np.array([OTHER, BONE, FAT, SOFT, AIR])[layer]
    bone = layer == 1
    if rng.random() < 0.6:
        middle = (outside - edges[0]) / max(edges[1] - edges[0], 1e-3)
        classes[bone & (np.abs(middle - 0.5) < rng.uniform(0.1, 0.3))] = MARROW
    if rng.random() < 0.3:
        classes[(layer == 4) & (smooth_field(outside.shape, rng, 1) > 1.2)] = EYE
    head = np.eye(CLASSES, dtype=np.float32)[classes].transpose(2, 0, 1)
    head = ndimage.gaussian_filter(head, (0, 0.7, 0.7))
    rest = np.clip(1 - brain, 0, 1)
    result = head * rest
    result[CSF : WHITE + 1] += probs[CSF : WHITE + 1]
    return result


def split_soft_tissue(probs, rng):
    """Split the TPM's soft tissue into muscle and fat by a smooth random pattern."""
    fat = smooth_field(probs.shape[1:], rng, 1) > rng.uniform(-0.5, 1.0)
    probs = probs.copy()
    probs[FAT] = probs[SOFT] * fat
    probs[SOFT] = probs[SOFT] * ~fat
    return probs


def atrophy(probs, spacing, rng):
    """Shrink the brain of a (K, H, W) slice as age and disease do: a thinner cortex and wider
    sulci, larger ventricles and, sometimes, CSF-filled holes (old infarcts).

    The templates and most real heads here are young adults; clinics scan older people, whose
    wide CSF spaces a network that has seen only young brains fills with grey matter.
    """
    tissue = np.argmax(probs, axis=0)
    csf = tissue == CSF
    if not csf.any():
        return probs
    to_csf = ndimage.distance_transform_edt(~csf, sampling=spacing)
    shrink = ((tissue == GREY) & (to_csf <= rng.uniform(1, 2.5))) | (
        (tissue == WHITE) & (to_csf <= rng.uniform(0, 4))
    )
    if rng.random() < 0.3:
        holes = smooth_field(tissue.shape, rng, 1, int(rng.integers(6, 16))) > rng.uniform(1.8, 2.6)
        shrink |= holes & ((tissue == GREY) | (tissue == WHITE))
    moved = np.minimum(ndimage.gaussian_filter(shrink.astype(np.float32), 0.5), 1)
    probs = probs.copy()
    for k in (GREY, WHITE):
        probs[CSF] += probs[k] * moved
        probs[k] *= 1 - moved
    return probs


def repaint_head(image, labels, spacing, rng):
    """A real (H, W) image in 0..1 whose head beyond a random distance from the brain goes
    through a random, often non-monotonic, intensity curve; the brain and its rim keep theirs.

    A real tongue, neck or scalp keeps its texture and shape but takes any brightness, as
    bright as cortex in one scan and dark in the next. Real heads with necks are few, and a
    network that has seen each only in its own contrast might call a brighter tongue grey
    matter. Measured at stop 28 (`--repaint 0.5`): more of the neck called tissue, not less
    (docs/lobo/real.md); kept, off by default, so that result can be repeated.
    """
    brain = labels > 0
    if brain.any():
        distance = ndimage.distance_transform_edt(~brain, sampling=spacing)
    else:
        distance = np.full(image.shape, np.inf)
    weight = np.clip((distance - rng.uniform(1, 6)) / rng.uniform(1, 5), 0, 1)
    dark = rng.uniform(0.08, 0.2)  # air and its noise stay dark
    knots = np.concatenate([[0.0, dark], np.sort(rng.uniform(dark, 1, 3)), [1.0]])
    values = np.concatenate([[0.0, rng.uniform(0, 0.12)], rng.uniform(0, 1, 4)])
    return image * (1 - weight) + np.interp(image, knots, values) * weight


def patchwork(probs, rng, parts=4):
    """(K, H, W) -> (K + 5 (parts - 1), H, W): bone, marrow, fat, soft tissue and the rest of
    the head each split into `parts` random patches, every patch a class of its own.

    A real neck or face is a mosaic of muscle, fat, glands, vessels and bone, some as bright
    as white matter and some as grey as cortex; one intensity per class paints it as a few
    flat regions, and a network that has seen only those calls a real tongue grey matter.
    """
    probs = probs.copy()
    control = int(rng.integers(4, 33))
    fields = np.stack([smooth_field(probs.shape[1:], rng, 1, control) for _ in range(parts)])
    patch = np.argmax(fields, axis=0)
    extra = []
    for k in (BONE, SOFT, OTHER, FAT, MARROW):
        for j in range(1, parts):
            extra.append(np.where(patch == j, probs[k], 0))
        probs[k] = np.where(patch == 0, probs[k], 0)
    return np.concatenate([probs, np.stack(extra).astype(probs.dtype)])


def smooth_field(shape, rng, amplitude, control=6):
    """A smooth random (H, W) field of about `amplitude` standard deviation."""
    coarse = rng.normal(0, amplitude, (control, control))
    zoom = (shape[0] / control, shape[1] / control)
    field = ndimage.zoom(coarse, zoom, order=1)
    return np.pad(field, [(0, max(0, s - f)) for s, f in zip(shape, field.shape)], "edge")[
        : shape[0], : shape[1]
    ]


def synthesise(probs, rng):
    """(K, H, W) probabilities -> (H, W) image: a random mean and texture per class.

    Brain classes are mostly T1-ordered (MPRAGE to spin echo); every other class of the
    head takes any intensity, so the network must tell scalp from cortex by shape.
    """
    means = rng.uniform(0, 1, len(probs))
    if rng.random() < 0.85:
        for k, (low, high) in BRAIN_MEANS.items():
            means[k] = rng.uniform(low, high)
        means[WHITE] = max(means[WHITE], means[GREY] + rng.uniform(0.05, 0.25))
        means[CSF] = min(means[CSF], means[GREY] - 0.1)
        means[AIR] = rng.uniform(0, 0.1)
    spread = rng.uniform(0, 0.06, len(probs))
    noise = rng.normal(0, 1, probs.shape[1:])
    texture = np.tensordot(spread, probs, 1) * noise
    return np.tensordot(means, probs, 1) + texture


def acquire(image, labels, head, spacing, rng, pixel_mm_range, frame_side):
    """Warp a native-resolution slice onto a random acquisition grid.

    Pixels of 0.5-3 mm (the grid is capped near the frame's side: finer pixels would be
    averaged down by the server anyway), rotation, shear, flip, elastic deformation and a
    field of view that holds the whole head with a random margin, or only part of it.
    """
    pixel_mm = np.exp(rng.uniform(*np.log(pixel_mm_range)))
    head = np.argwhere(head | (labels > 0))
    if not len(head):  # nothing but air: the whole slice is the field of view
        head = np.argwhere(np.ones_like(labels, bool))
    low, high = head.min(0) * spacing, (head.max(0) + 1) * spacing
    fov = (high - low) * rng.uniform(1.0, 1.4, 2)
    if rng.random() < 0.15:
        fov *= rng.uniform(0.6, 0.95, 2)  # a partial field of view
    pixel_mm = max(pixel_mm, fov.max() / (1.25 * frame_side))
    shape = np.maximum(np.round(fov / pixel_mm).astype(int), 16)
    angle = rng.uniform(-np.pi, np.pi) if rng.random() < 0.2 else rng.uniform(-0.3, 0.3)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear = np.array([[1, rng.uniform(-0.08, 0.08)], [0, 1]])
    matrix = rotation @ shear @ np.diag(pixel_mm / spacing * rng.uniform(0.92, 1.08, 2))
    if rng.random() < 0.5:
        matrix = matrix @ np.diag([1, -1])
    grid = np.indices(shape, dtype=np.float32).reshape(2, -1) - shape[:, None] / 2
    grid += np.stack(
        [smooth_field(shape, rng, rng.uniform(0, 3) / pixel_mm) for _ in "yx"]
    ).reshape(2, -1)
    centre = (low + high) / 2 / spacing + rng.normal(0, 0.08, 2) * (high - low) / spacing
    coords = matrix @ grid + centre[:, None]
    warped = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
    warped_labels = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    return warped.reshape(shape), warped_labels.reshape(shape)


def degrade(image, rng):
    """Blur, ringing, bias field, gamma and Rician noise of an (H, W) image in 0..~1."""
    if rng.random() < 0.2:  # heavy blur: averaged or strongly filtered images, coarse scanners
        image = ndimage.gaussian_filter(image, rng.uniform(1.0, 2.5, 2))
    elif rng.random() < 0.6:
        image = ndimage.gaussian_filter(image, rng.uniform(0, 1.0, 2))
    if rng.random() < 0.15:  # Gibbs ringing: a sharp cut in k-space
        spectrum = np.fft.fftshift(np.fft.fft2(image))
        keep = rng.uniform(0.35, 0.8)
        h, w = image.shape
        yy, xx = np.ogrid[:h, :w]
        spectrum[(np.abs(yy - h / 2) > keep * h / 2) | (np.abs(xx - w / 2) > keep * w / 2)] = 0
        image = np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum)))
    bias = smooth_field(image.shape, rng, rng.uniform(0, 0.3), control=4)
    image = np.clip(image, 0, None) * np.exp(bias)
    image = image ** np.exp(rng.normal(0, 0.2))
    sigma = rng.uniform(0, 0.05) * max(float(np.percentile(image, 99)), 1e-6)
    noisy = image + rng.normal(0, sigma, image.shape)
    return np.hypot(noisy, rng.normal(0, sigma, image.shape))  # magnitude images: Rician


def quantise(image, rng):
    """Window and round to 8 bits or a random 16-bit range, as scanner exports do."""
    top = np.percentile(image, rng.uniform(99.0, 100.0)) * rng.uniform(0.9, 1.3)
    levels = 255 if rng.random() < 0.5 else int(rng.uniform(1000, 65535))
    image = np.clip(image / max(float(top), 1e-6), 0, 1) * levels
    return np.round(image).astype(np.uint16 if levels > 255 else np.uint8)


def export(image, labels, rng):
    """Sometimes upscale with nearest neighbours, sometimes paste into a black canvas."""
    if rng.random() < 0.15:
        factor = int(rng.integers(2, 4))
        image = np.repeat(np.repeat(image, factor, 0), factor, 1)
        labels = np.repeat(np.repeat(labels, factor, 0), factor, 1)
    if rng.random() < 0.3:
        side = int(rng.choice([128, 256, 384, 512, 768, 1024]))
        height, width = max(side, image.shape[0]), max(side, image.shape[1])
        top = int(rng.integers(0, height - image.shape[0] + 1))
        left = int(rng.integers(0, width - image.shape[1] + 1))
        pad = ((top, height - top - image.shape[0]), (left, width - left - image.shape[1]))
        image, labels = np.pad(image, pad), np.pad(labels, pad)
    return image, labels


def frame_labels(labels, geometry):
    """(side, side) labels of the frame: the upload's label nearest each frame pixel."""
    labels = labels[:: geometry.factor, :: geometry.factor]
    rows = np.round(geometry.source_coordinates(0)).astype(int)
    columns = np.round(geometry.source_coordinates(1)).astype(int)
    inside_rows = (rows >= 0) & (rows < labels.shape[0])
    inside_columns = (columns >= 0) & (columns < labels.shape[1])
    target = np.zeros((geometry.side, geometry.side), np.uint8)
    target[np.ix_(inside_rows, inside_columns)] = labels[
        np.ix_(rows[inside_rows], columns[inside_columns])
    ]
    return target


def crop(frame, target, size, rng):
    """A random (size, size) window of the frame, centred near the brain."""
    side = frame.shape[0]
    if size >= side:
        return frame, target
    brain = np.argwhere(target > 0)
    centre = brain.mean(0) if len(brain) else np.array([side / 2, side / 2])
    centre = centre + rng.normal(0, size / 5, 2)
    top, left = np.clip(np.round(centre - size / 2).astype(int), 0, side - size)
    return frame[top : top + size, left : left + size], target[top : top + size, left : left + size]
