"""The Basel Face Model subset that 3DDFA_V2 uses (``bfm_noneck_v3.pkl``), in 3DDFA_V2's units and camera.

Vertices are ``mean + shape_basis @ shape + exp_basis @ exp`` with 40 shape and 10 expression coefficients in the
same units as 3DDFA_V2's 62-d parameter (so a 3DDFA_V2 estimate on a render compares with the ground truth
directly). Model coordinates are BFM's micrometres: x towards the subject's left (image right in a frontal view),
y up, z out of the face towards the camera.

The camera is 3DDFA_V2's scaled orthographic one: a 3×4 matrix ``P = [s·R | t]`` maps a vertex X to
``P @ [X, 1]``; the image row is then ``image_height - y`` (3DDFA_V2's ``similar_transform`` flips y, without its
1-pixel MATLAB offset). ``R = Rz(roll) Ry(yaw) Rx(pitch)`` as in ``mfim.nets.rotation``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mfim.nets.onnx_utils import load_numpy_pickle  # official pickles: numpy arrays only, nothing executable
from mfim.nets.rotation import angles_to_matrix
from mfim.nets.types import N_EXP, N_SHAPE

N_LANDMARKS = 68


def mesh_triangles(tri: np.ndarray, n_vertices: int) -> np.ndarray:
    """T×3 vertex indices of the mesh, from the pickle's ``tri`` (3×T).

    In ``bfm_noneck_v3.pkl`` ``tri`` still holds the full BFM's vertex numbers (max 46851 > 38365 vertices): the
    neck was cut by deleting vertices, keeping their order, and the triangles among the kept vertices were not
    renumbered. It references exactly ``n_vertices`` distinct numbers, so ranking them recovers the original BFM
    topology (a closed-edge manifold with one boundary loop and 99.9% of edges under 4.2 mm), which is far cleaner
    around the nose than any Delaunay triangulation of a 2-D projection of the mean shape.
    """
    tri = np.asarray(tri).reshape(3, -1).T.astype(np.int64)
    used = np.unique(tri)
    if tri.max() >= n_vertices:
        if used.size != n_vertices:
            raise ValueError(
                f"BFM triangles reference {used.size} distinct vertices, the mesh has {n_vertices}: cannot renumber"
            )
        tri = np.searchsorted(used, tri)
    return np.ascontiguousarray(tri)


def orient_outward(triangles: np.ndarray, mean_shape: np.ndarray) -> np.ndarray:
    """Flip the (consistent) winding if needed so that normals point out of the face, i.e. +z on the frontal face."""
    v = mean_shape[triangles]
    normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    # The pickle's winding is clockwise seen from the front; the majority vote makes this independent of that.
    if np.median(normals[:, 2]) < 0:
        triangles = triangles[:, [0, 2, 1]]
    return np.ascontiguousarray(triangles)


def boundary_loops(triangles: np.ndarray) -> list[np.ndarray]:
    """Vertex loops along the mesh boundary (edges used by one triangle), each in the direction its triangles use."""
    directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    n = int(triangles.max()) + 1
    code = directed[:, 0] * n + directed[:, 1]
    reverse = directed[:, 1] * n + directed[:, 0]
    boundary = directed[~np.isin(code, reverse)]
    following = dict(zip(boundary[:, 0].tolist(), boundary[:, 1].tolist()))
    loops, seen = [], set()
    for start in boundary[:, 0].tolist():
        if start in seen:
            continue
        loop, v = [], start
        while v not in seen:
            seen.add(v)
            loop.append(v)
            v = following[v]
        loops.append(np.array(loop))
    return loops


def close_mouth(triangles: np.ndarray, mean_shape: np.ndarray) -> np.ndarray:
    """Triangles that close BFM's mouth opening (the boundary loop that is not the outer one).

    Without them an open-mouth expression shows the background through the face. The hole's rim runs from one mouth
    corner to the other along the upper and the lower inner lip; zipping the two rims together by arc length (the
    corners zigzag, so x is not monotone there) gives a strip with no overlaps. The cap reuses the rim vertices (it
    deforms with the lips) and its winding continues the mesh's.
    """
    loops = boundary_loops(triangles)
    if len(loops) < 2:
        return np.zeros((0, 3), np.int64)
    loops.sort(key=len)
    rim = loops[0]  # the outer boundary is by far the longest loop
    x = mean_shape[rim, 0]
    left, right = int(np.argmin(x)), int(np.argmax(x))
    rolled = np.roll(rim, -left)
    split = (right - left) % len(rim)
    chain_a = rolled[: split + 1]  # left corner -> right corner one way round
    chain_b = np.concatenate([rolled[split:], rolled[:1]])[::-1]  # left corner -> right corner the other way

    def arc_position(chain):
        steps = np.linalg.norm(np.diff(mean_shape[chain], axis=0), axis=1)
        return np.concatenate([[0.0], np.cumsum(steps)]) / max(steps.sum(), 1e-12)

    pos_a, pos_b = arc_position(chain_a), arc_position(chain_b)
    cap, i, j = [], 0, 0
    while i < len(chain_a) - 1 or j < len(chain_b) - 1:
        if j == len(chain_b) - 1 or (i < len(chain_a) - 1 and pos_a[i + 1] <= pos_b[j + 1]):
            cap.append([chain_a[i], chain_a[i + 1], chain_b[j]])
            i += 1
        else:
            cap.append([chain_a[i], chain_b[j + 1], chain_b[j]])
            j += 1
    # The chains share their corner vertices, so the first and last steps can give a degenerate triangle.
    cap = [t for t in cap if len(set(t)) == 3]
    cap = np.array(cap, np.int64)
    # The rim's boundary edges run a -> b inside the mesh; the cap must use them b -> a.
    edge = (int(rolled[0]), int(rolled[1]))  # first edge of chain_a, as the mesh walks it
    uses = {(int(t[k]), int(t[(k + 1) % 3])) for t in cap for k in range(3)}
    if edge in uses:
        cap = cap[:, [0, 2, 1]]
    return cap


class BFMModel(nn.Module):
    """Mean shape, bases, triangles and the 68 landmark vertices of ``bfm_noneck_v3.pkl``.

    Buffers (float32): ``mean_shape`` N×3, ``shape_basis`` N×3×40, ``exp_basis`` N×3×10 (BFM micrometres per unit
    coefficient); ``triangles`` T×3 (int64, outward winding) and ``landmark_indices`` (68,) (iBUG-68 order).
    ``triangles[:n_bfm_triangles]`` is BFM's own mesh; the rest closes the mouth opening.
    """

    def __init__(self, path: str | Path | None = None, n_shape: int = N_SHAPE, n_exp: int = N_EXP):
        super().__init__()
        if path is None:
            from mfim.assets import resolve

            path = resolve("bfm_noneck")
        data = load_numpy_pickle(path)
        if not isinstance(data, dict) or not {"u", "w_shp", "w_exp", "tri", "keypoints"} <= set(data):
            raise ValueError(f"{path}: not a 3DDFA_V2 BFM pickle (expected keys u, w_shp, w_exp, tri, keypoints)")
        mean = np.asarray(data["u"], np.float32).reshape(-1, 3)  # x0 y0 z0 x1 ... (3DDFA_V2's order='F' reshape)
        n = mean.shape[0]
        w_shp = np.asarray(data["w_shp"], np.float32)[:, :n_shape].reshape(n, 3, n_shape)
        w_exp = np.asarray(data["w_exp"], np.float32)[:, :n_exp].reshape(n, 3, n_exp)
        keypoints = np.asarray(data["keypoints"], np.int64).reshape(N_LANDMARKS, 3)
        # Flattened-coordinate indices (x, y, z). One of the 68 takes z from another vertex; only x and y decide
        # where a landmark projects, so the landmark vertex is the one holding its x and y.
        if not (np.all(keypoints[:, 0] % 3 == 0) and np.all(keypoints[:, 1] == keypoints[:, 0] + 1)):
            raise ValueError(f"{path}: keypoints are not (x, y, ...) coordinates of flattened vertices")
        triangles = orient_outward(mesh_triangles(data["tri"], n), mean)
        self.n_bfm_triangles = len(triangles)
        triangles = np.concatenate([triangles, close_mouth(triangles, mean)])

        self.path = Path(path)
        self.n_vertices = n
        self.register_buffer("mean_shape", torch.from_numpy(mean))
        self.register_buffer("shape_basis", torch.from_numpy(np.ascontiguousarray(w_shp)))
        self.register_buffer("exp_basis", torch.from_numpy(np.ascontiguousarray(w_exp)))
        self.register_buffer("triangles", torch.from_numpy(triangles))
        self.register_buffer("landmark_indices", torch.from_numpy(keypoints[:, 0] // 3))

    @property
    def n_shape(self) -> int:
        return self.shape_basis.shape[-1]

    @property
    def n_exp(self) -> int:
        return self.exp_basis.shape[-1]

    def vertices(self, shape: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        """B×S shape and B×E expression coefficients -> B×N×3 model-space vertices (differentiable)."""
        offset = torch.einsum("nks,bs->bnk", self.shape_basis, shape.to(self.shape_basis.dtype))
        offset = offset + torch.einsum("nke,be->bnk", self.exp_basis, exp.to(self.exp_basis.dtype))
        return self.mean_shape + offset

    def landmarks3d(self, shape: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        """B×68×3 model-space landmark vertices, computing only those 68 rows."""
        idx = self.landmark_indices
        offset = torch.einsum("nks,bs->bnk", self.shape_basis[idx], shape.to(self.shape_basis.dtype))
        offset = offset + torch.einsum("nke,be->bnk", self.exp_basis[idx], exp.to(self.exp_basis.dtype))
        return self.mean_shape[idx] + offset

    @staticmethod
    def project(vertices: torch.Tensor, pose_matrix: torch.Tensor, image_height: float | None = None) -> torch.Tensor:
        """B×N×3 vertices, B×3×4 ``[s·R | t]`` -> B×N×3 projected points.

        Without ``image_height``: 3DDFA_V2's camera space (x right, y up, z towards the viewer). With it: image
        coordinates, x = column, y = row = ``image_height - y`` (pixel centres at integers), z unchanged (larger
        is nearer), as 3DDFA_V2's ``similar_transform`` does.
        """
        pts = vertices @ pose_matrix[..., :3].transpose(-1, -2) + pose_matrix[..., None, :, 3]
        if image_height is not None:
            pts = torch.stack([pts[..., 0], image_height - pts[..., 1], pts[..., 2]], -1)
        return pts


def pose_matrix(angles: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """B×3 (yaw, pitch, roll) radians, B scale, B×3 translation -> B×3×4 camera ``[s·R | t]`` (3DDFA_V2 layout)."""
    rotation = angles_to_matrix(angles) * scale[..., None, None]
    return torch.cat([rotation, translation[..., :, None]], -1)


@lru_cache(maxsize=2)
def load_bfm(path: str | None = None) -> BFMModel:
    """One shared (read-only) model per path and process."""
    return BFMModel(path).eval()


def tddfa_coefficient_stats(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Mean and std of 3DDFA_V2's 62-d parameter (12 pose + 40 shape + 10 expression), split by group.

    Keys ``pose_mean``/``pose_std`` (12,), ``shape_mean``/``shape_std`` (40,), ``exp_mean``/``exp_std`` (10,).
    The std is the natural 1σ of each coefficient (BFM units, what 3DDFA_V2 was trained on).
    """
    if path is None:
        from mfim.assets import resolve

        path = resolve("tddfa_param_stats")
    data = load_numpy_pickle(path)
    out = {}
    for stat in ("mean", "std"):
        values = np.asarray(data[stat], np.float32).reshape(-1)
        out[f"pose_{stat}"] = values[:12]
        out[f"shape_{stat}"] = values[12 : 12 + N_SHAPE]
        out[f"exp_{stat}"] = values[12 + N_SHAPE : 12 + N_SHAPE + N_EXP]
    return out
