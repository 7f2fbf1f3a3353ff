"""The pose metrics on a case with a known trend: a face against its mirror image is further apart in pose the more it
is turned (mirroring negates yaw and roll), for both the 3DMM pose and Pose-HN."""

import numpy as np
import pytest
import torch

from mfim.evaluation.grids import from_uint8
from mfim.evaluation.metrics import l2_distance
from tests.defaults import synth_config


@pytest.fixture(scope="module")
def aligned_renders():
    from mfim.data.synth import Synthesizer
    from mfim.nets.align import align_face

    synth = Synthesizer(synth_config(seed=3, yaw_deg=35, pitch_deg=3, roll_deg=3, supersample=1,
                                     identities_train=160, images_per_identity=8))
    who = synth.identity(0)
    faces, yaws = [], []
    for i in range(10):
        out, spec = synth.render(who, i)
        faces.append(align_face(out.image, out.landmarks, output_size=128, transform_size=256).image)
        yaws.append(abs(np.degrees(spec.pose[0])))
    return np.stack(faces), np.array(yaws)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return np.corrcoef(ra, rb)[0, 1]


def test_pose_distance_to_mirror_grows_with_yaw(aligned_renders):
    from mfim.nets.headpose import HopenetOnnx
    from mfim.nets.threedmm import TDDFAEncoder

    faces, yaws = aligned_renders
    x = from_uint8(faces)
    mirrored = torch.flip(x, dims=[3])
    with torch.no_grad():
        hn = HopenetOnnx()
        d_hn = l2_distance(hn(x).numpy(), hn(mirrored).numpy())
        tddfa = TDDFAEncoder()
        d_3dmm = l2_distance(tddfa(x).pose.numpy(), tddfa(mirrored).pose.numpy())
    assert spearman(yaws, d_hn) > 0.7, (yaws, d_hn)
    assert spearman(yaws, d_3dmm) > 0.7, (yaws, d_3dmm)
    # about twice the yaw (plus the roll/pitch noise) for the turned faces
    turned = yaws > 20
    assert np.all(d_hn[turned] > 20)
