"""SynthSeg-style training slices (Billot et al. 2023) drawn from label maps and real images.

`sample(volume, rng, size)` returns one (size, size) float32 normalised image and its
(size, size) uint8 target: a random plane and slice, a random affine and elastic
deformation, then either a synthetic image (a random intensity per generation class) or the
volume's real image, followed by blur, bias field, gamma, noise, optional skull stripping and
8- or 16-bit quantisation.
"""

import numpy as np
from scipy import ndimage

from processing import normalise
from training.data import brain_slices, planes
from training.sources import TARGET_OF

# T1-like ordering of the generation classes: air, CSF, GM, WM, bone, soft tissue, other.
T1_MEAN_RANGES = np.array(
    [(0.0, 0.08), (0.05, 0.35), (0.35, 0.62), (0.65, 1.0), (0.0, 0.3), (0.2, 1.0), (0.0, 0.45)],
    dtype=np.float32,
)


class SliceSampler:
    """Draws training slices from a list of Volumes; keeps per-plane brain slice indices."""

    def __init__(self, volumes, size=128, real_fraction=0.25, seed=0, pixel_mm=(0.9, 2.4)):
        self.volumes = volumes
        self.size = size
        self.real_fraction = real_fraction
        self.pixel_mm = pixel_mm
        self.rng = np.random.default_rng(seed)
        self.slices = [[brain_slices(v.labels(), p) for p in range(3)] for v in volumes]

    def batch(self, n):
        """(n, 1, size, size) float32 images and (n, size, size) uint8 targets."""
        images = np.zeros((n, 1, self.size, self.size), np.float32)
        targets = np.zeros((n, self.size, self.size), np.uint8)
        for i in range(n):
            images[i, 0], targets[i] = self.sample()
        return images, targets

    def sample(self):
        """One (image, target) pair."""
        rng = self.rng
        v = rng.integers(len(self.volumes))
        volume = self.volumes[v]
        plane = int(rng.integers(3))
        index = int(rng.choice(self.slices[v][plane]))
        probs = planes(volume.probs, plane)[:, index].astype(np.float32)
        in_plane = np.delete(volume.spacing, plane)
        use_real = volume.image is not None and rng.random() < self.real_fraction
        channels = probs
        if use_real:
            image = planes(volume.image, plane)[index][None]
            channels = np.concatenate([probs, image / max(float(image.max()), 1e-6)])
        warped = deform(channels, in_plane, self.size, rng, self.pixel_mm)
        probs = warped[:7]
        target = TARGET_OF[np.argmax(probs, axis=0)]
        image = warped[7] if use_real else synthesise(probs, rng)
        image = corrupt(image, target, rng, allow_strip=not use_real)
        return normalise(quantise(image, rng)), target


def deform(channels, spacing, size, rng, pixel_mm_range=(0.9, 2.4)):
    """Random affine + elastic warp of (C, A, B) onto a (C, size, size) grid at a random mm/px."""
    pixel_mm = rng.uniform(*pixel_mm_range)
    scale = pixel_mm / spacing * rng.uniform(0.9, 1.1, 2)
    angle = rng.uniform(-np.pi, np.pi) if rng.random() < 0.3 else rng.uniform(-0.35, 0.35)
    shear = rng.uniform(-0.1, 0.1)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotation @ np.array([[1, shear], [0, 1]]) @ np.diag(scale)
    if rng.random() < 0.5:
        matrix = matrix @ np.diag([1, -1])
    grid = np.indices((size, size), dtype=np.float32).reshape(2, -1) - size / 2
    grid += elastic_field(size, rng).reshape(2, -1)
    brain = np.argwhere(channels[1:4].sum(0) > 0.5)
    centre = brain.mean(0) if len(brain) else np.array(channels.shape[1:]) / 2
    centre = centre + rng.normal(0, 8, 2) / scale
    coords = matrix @ grid + centre[:, None]
    return np.stack(
        [
            ndimage.map_coordinates(
                c, coords, order=1, mode="constant", cval=1.0 if k == 0 else 0.0
            ).reshape(size, size)
            for k, c in enumerate(channels)
        ]
    )


def elastic_field(size, rng, control=5):
    """(2, size, size) smooth random displacement in pixels."""
    amplitude = rng.uniform(0, 4)
    coarse = rng.normal(0, amplitude, (2, control, control)).astype(np.float32)
    return np.stack([ndimage.zoom(c, size / control, order=3)[:size, :size] for c in coarse])


def synthesise(probs, rng):
    """(K, H, W) probabilities -> (H, W) image with a random Gaussian mixture per class."""
    if rng.random() < 0.85:
        low, high = T1_MEAN_RANGES[:, 0], T1_MEAN_RANGES[:, 1]
        means = rng.uniform(low, high)
        means[3] = max(means[3], means[2] + 0.1)
        means[1] = min(means[1], means[2] - 0.1)
    else:
        means = rng.uniform(0, 1, len(probs))
    spread = rng.uniform(0, 0.06, len(probs))
    noise = rng.normal(0, 1, probs.shape[1:])
    return np.tensordot(means, probs, 1) + np.tensordot(spread, probs, 1) * noise


def corrupt(image, target, rng, allow_strip=True):
    """Blur, bias field, gamma, noise and (sometimes) skull stripping of an (H, W) image."""
    if rng.random() < 0.7:
        image = ndimage.gaussian_filter(image, rng.uniform(0, 1.2, 2))
    size = image.shape[0]
    bias = rng.normal(0, rng.uniform(0, 0.3), (4, 4))
    image = np.clip(image, 0, None) * np.exp(ndimage.zoom(bias, size / 4, order=3)[:size, :size])
    image = np.clip(image, 0, None) ** np.exp(rng.normal(0, 0.25))
    image = image + rng.normal(0, rng.uniform(0, 0.04) * max(float(image.max()), 1e-6), image.shape)
    image = np.clip(image, 0, None)
    if allow_strip and rng.random() < 0.4:
        mask = ndimage.binary_dilation(target > 0, iterations=int(rng.integers(0, 3)))
        image = image * mask
    return image


def quantise(image, rng):
    """Round to 8-bit or to a random 16-bit range, as scanner exports are."""
    levels = 255 if rng.random() < 0.5 else int(rng.uniform(1000, 65535))
    return np.round(image / max(float(image.max()), 1e-6) * levels).astype(np.float32)
