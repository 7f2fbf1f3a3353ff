"""BFM model: recovered triangulation, linear model, 3DDFA_V2 camera convention, coefficient units."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy import ndimage

from mfim.data.render import rasterize
from mfim.nets.bfm import BFMModel, boundary_loops, load_bfm, pose_matrix, tddfa_coefficient_stats
from mfim.nets.onnx_utils import load_numpy_pickle
from mfim.nets.rotation import matrix_to_angles, normalize_pose_matrix


@pytest.fixture(scope="module")
def bfm() -> BFMModel:
    return load_bfm()


def _frontal_points(bfm: BFMModel, size: int = 256) -> np.ndarray:
    """Mean face, frontal, ~200 px wide, in image coordinates."""
    camera = pose_matrix(torch.zeros(1, 3), torch.tensor([200.0 / 160000.0]), torch.tensor([[size / 2, size / 2, 0.0]]))
    verts = bfm.vertices(torch.zeros(1, 40), torch.zeros(1, 10))
    return BFMModel.project(verts, camera, size)[0].double().numpy()


def test_layout(bfm):
    assert bfm.mean_shape.shape == (38365, 3)
    assert bfm.shape_basis.shape == (38365, 3, 40) and bfm.exp_basis.shape == (38365, 3, 10)
    assert bfm.landmark_indices.shape == (68,)
    assert bfm.n_bfm_triangles == 76073  # BFM's own triangles, all kept


def test_triangles_index_the_mesh(bfm):
    tri = bfm.triangles.numpy()
    assert tri.min() == 0 and tri.max() == bfm.n_vertices - 1  # the pickle's raw tri goes up to 46851
    assert np.unique(tri).size == bfm.n_vertices  # every vertex belongs to a triangle
    assert np.all((tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2]))


def test_triangles_are_local(bfm):
    """A wrong renumbering would join far-apart vertices; BFM's own mesh has ~1.5 mm edges."""
    v = bfm.mean_shape.double().numpy()
    tri = bfm.triangles.numpy()[: bfm.n_bfm_triangles]
    edges = np.linalg.norm(v[tri] - v[np.roll(tri, 1, axis=1)], axis=-1) / 1000.0  # mm
    assert 1.0 < np.median(edges) < 2.0
    assert np.quantile(edges, 0.999) < 5.0 and edges.max() < 15.0


def test_consistent_winding_and_closed_mouth(bfm):
    tri = bfm.triangles.numpy()
    directed = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    code = directed[:, 0] * bfm.n_vertices + directed[:, 1]
    assert np.unique(code).size == code.size  # each directed edge once: neighbours agree on orientation
    loops = boundary_loops(tri)
    assert len(loops) == 1 and len(loops[0]) > 500  # only the outer rim; the mouth opening is capped
    assert len(boundary_loops(tri[: bfm.n_bfm_triangles])) == 2  # BFM itself has the mouth hole


def test_no_flipped_faces_on_frontal_mesh(bfm):
    """Frontal mean face: front faces cover it without holes, and every back face is hidden behind a front face."""
    size = 256
    pts = _frontal_points(bfm, size)
    tri = bfm.triangles.numpy()
    front = rasterize(pts, tri, size, size)
    back = rasterize(pts, tri[:, [0, 2, 1]], size, size)  # reversed winding: only the away-facing ones

    def depth(r):
        w = r.weights.astype(np.float64)
        return (w * pts[tri[np.maximum(r.triangle, 0)], 2]).sum(-1)

    lm = np.rint(pts[bfm.landmark_indices.numpy(), :2]).astype(int)
    assert front.mask[lm[17:, 1], lm[17:, 0]].all()  # covers the face: brows, eyes, nose, mouth
    off_mask = ndimage.distance_transform_edt(~front.mask)
    assert off_mask[lm[:17, 1], lm[:17, 0]].max() < 2.0  # jaw landmarks are BFM contour vertices: on the edge
    assert front.mask.sum() > 0.5 * (np.ptp(lm[:, 0]) * np.ptp(lm[:, 1]))
    assert np.array_equal(ndimage.binary_fill_holes(front.mask), front.mask)  # no holes
    shown_back = back.mask & (~front.mask | (depth(back) > depth(front) + 1e-6))
    assert shown_back.sum() == 0


def test_vertices_linear_and_differentiable(bfm):
    shape = torch.zeros(2, 40, requires_grad=True)
    exp = torch.zeros(2, 10)
    with torch.no_grad():
        shape[1, 3] = 2.0e5
        exp[1, 2] = 1.5
    verts = bfm.vertices(shape, exp)
    assert verts.shape == (2, 38365, 3)
    torch.testing.assert_close(verts[0], bfm.mean_shape)
    expected = bfm.mean_shape + 2.0e5 * bfm.shape_basis[:, :, 3] + 1.5 * bfm.exp_basis[:, :, 2]
    torch.testing.assert_close(verts[1], expected, rtol=1e-5, atol=1.0)  # micrometres
    torch.testing.assert_close(bfm.landmarks3d(shape, exp), verts[:, bfm.landmark_indices], rtol=1e-5, atol=1.0)
    verts[:, bfm.landmark_indices, 0].sum().backward()
    assert shape.grad is not None and shape.grad.abs().sum() > 0


def test_project_matches_3ddfa_reconstruction(bfm):
    """P @ [u + W a; 1] with the image row flipped as 3DDFA_V2's similar_transform does (minus its 1 px offset)."""
    data = load_numpy_pickle(bfm.path)
    rng = np.random.default_rng(0)
    alpha_shp, alpha_exp = rng.normal(0, 1e5, (40, 1)), rng.normal(0, 1, (10, 1))
    angles = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    camera = pose_matrix(angles, torch.tensor([7e-4], **f64), torch.tensor([[60.0, 58.0, 5.0]], **f64))
    p = camera[0].numpy()
    flat = data["u"] + data["w_shp"] @ alpha_shp + data["w_exp"] @ alpha_exp
    ref = p[:, :3] @ flat.reshape(3, -1, order="F") + p[:, 3:]
    ref[1] = 120 - ref[1]
    verts = bfm.vertices(torch.from_numpy(alpha_shp.T), torch.from_numpy(alpha_exp.T)).double()
    ours = BFMModel.project(verts, camera, 120)[0].numpy()
    np.testing.assert_allclose(ours, ref.T, atol=2e-3)
    # And 3DDFA_V2's pose read-out (P2sRt + Euler angles) returns the angles the camera was built from.
    scale, rotation, _ = normalize_pose_matrix(camera)
    torch.testing.assert_close(matrix_to_angles(rotation), angles)
    assert float(scale) == pytest.approx(7e-4)


def test_coefficient_units_are_3ddfa(bfm):
    """3DDFA_V2's 1-sigma of a shape / expression coefficient moves the face by millimetres (BFM: micrometres)."""
    stats = tddfa_coefficient_stats()
    assert stats["shape_std"].shape == (40,) and stats["exp_std"].shape == (10,)
    shape_rms = np.sqrt(((stats["shape_std"][0] * bfm.shape_basis[:, :, 0].numpy()) ** 2).sum(1).mean()) / 1000
    exp_rms = np.sqrt(((stats["exp_std"][0] * bfm.exp_basis[:, :, 0].numpy()) ** 2).sum(1).mean()) / 1000
    assert 1.0 < shape_rms < 5.0, shape_rms
    assert 0.5 < exp_rms < 5.0, exp_rms


def test_bfm_pickle_is_loaded_without_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"u": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        BFMModel(path)
    path.write_bytes(pickle.dumps({"u": np.zeros(3)}))
    with pytest.raises(ValueError, match="not a 3DDFA_V2 BFM pickle"):
        BFMModel(path)
