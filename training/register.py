"""Affine registration of a template onto a head, by mutual information.

SPM's tissue priors (`TPM.nii`) lie in MNI space. To label a scan that does not, the TPM must
be carried onto the scan first: `register` finds the 12-parameter affine that best aligns a
skull-on template in that space (SPM's `avg152T1`) with the scan, and `training.sources`
resamples the TPM through it. Mutual information of the two images' intensities does not
need them to share a contrast or a scale, only to be T1 images of heads.
"""

import numpy as np
from scipy import ndimage, optimize

BINS = 32


def register(image, affine, template, template_affine, steps_mm=(8, 4)):
    """(4, 4) matrix from the template's world coordinates to the image's (mm), coarse to
    fine: Powell's method on the mutual information of the template's voxels, smoothed and
    subsampled to `steps_mm`, with the image sampled where the matrix carries them. Starts
    from a translation that lines up the tops of the two heads and their upper parts' centres
    (a scan may reach far further down the neck than the template)."""
    params = np.zeros(12)
    params[:3] = head_top(image, affine) - head_top(template, template_affine)
    to_voxels = np.linalg.inv(affine)
    for step in steps_mm:
        factor = step / np.linalg.norm(template_affine[:3, 0])
        small = ndimage.zoom(ndimage.gaussian_filter(template, factor / 2), 1 / factor, order=1)
        # zoom keeps the first and last voxels' centres, so its step is not exactly `factor`
        scales = (np.array(template.shape) - 1) / (np.array(small.shape) - 1)
        small_affine = template_affine @ np.diag([*scales, 1.0])
        grid = np.indices(small.shape).reshape(3, -1).astype(np.float64)
        world = np.vstack(
            [small_affine[:3, :3] @ grid + small_affine[:3, 3:], np.ones(grid[0].shape)]
        )
        smooth = ndimage.gaussian_filter(image, step / 2.5)
        values = small.ravel()

        def cost(p, world=world, smooth=smooth, values=values):
            coords = (to_voxels @ matrix(p) @ world)[:3]
            sampled = ndimage.map_coordinates(smooth, coords, order=1, mode="constant")
            return -mutual_information(values, sampled)

        params = optimize.minimize(
            cost, params, method="Powell", options={"xtol": 1e-3, "ftol": 1e-5, "maxfev": 4000}
        ).x
    return matrix(params)


def matrix(params):
    """(4, 4) affine from 12 parameters: translation (mm), rotations about x, y, z (radians),
    log scales, shears."""
    cos, sin = np.cos(params[3:6]), np.sin(params[3:6])
    rx = np.array([[1, 0, 0], [0, cos[0], -sin[0]], [0, sin[0], cos[0]]])
    ry = np.array([[cos[1], 0, sin[1]], [0, 1, 0], [-sin[1], 0, cos[1]]])
    rz = np.array([[cos[2], -sin[2], 0], [sin[2], cos[2], 0], [0, 0, 1]])
    shear = np.array([[1, params[9], params[10]], [0, 1, params[11]], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rx @ ry @ rz @ np.diag(np.exp(params[6:9])) @ shear
    out[:3, 3] = params[:3]
    return out


def mutual_information(a, b):
    """Mutual information (nats) of two samples' intensities, from a `BINS`² histogram."""
    joint, _, _ = np.histogram2d(a, b, bins=BINS)
    joint /= joint.sum()
    expected = np.outer(joint.sum(1), joint.sum(0))
    seen = joint > 0
    return float((joint[seen] * np.log(joint[seen] / expected[seen])).sum())


def head_top(volume, affine, depth_mm=100):
    """World point (mm) above the centre of the head's upper `depth_mm`, at its highest voxel."""
    world = np.argwhere(volume > np.percentile(volume, 60)) @ affine[:3, :3].T + affine[:3, 3]
    top = world[:, 2].max()
    upper = world[world[:, 2] > top - depth_mm]
    return np.array([upper[:, 0].mean(), upper[:, 1].mean(), top])
