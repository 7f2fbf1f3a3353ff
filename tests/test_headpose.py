"""Head pose (Pose-HN): ONNX parity, bin decoding, signs against 3DDFA_V2, mirror and in-plane rotation on photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mfim.nets.face_crops import canonical_face_box, image_to_tensor, warp
from mfim.nets.headpose import HopenetOnnx, HopenetResNet50, bins_to_degrees, hopenet_demo_box, quarter_enlarged_box


@pytest.fixture(scope="module")
def hopenet():
    return HopenetOnnx()


@pytest.fixture(scope="module")
def faces(photos):
    from mfim.nets.align import align_face
    from mfim.nets.landmarks import DlibFaceLandmarker

    lmk = DlibFaceLandmarker()
    out = {}
    for name, img in photos.items():
        face = lmk.largest(img)
        aligned = align_face(img, face.landmarks, 256)
        out[name] = (img, face, aligned.image, aligned.transform.rotation_deg)
    return out


@pytest.fixture(scope="module")
def aligned_batch(faces):
    return torch.cat([image_to_tensor(faces[n][2]) for n in faces])


def test_hopenet_onnx_matches_onnxruntime_and_any_batch(hopenet):
    import onnxruntime

    from mfim.assets import resolve

    session = onnxruntime.InferenceSession(str(resolve("hopenet_onnx")), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    with torch.no_grad():
        batched = hopenet.net(x)
        single = [torch.cat(t) for t in zip(*[hopenet.net(x[i : i + 1]) for i in range(3)])]
    per_sample = [session.run(None, {"input": x[i : i + 1].numpy()}) for i in range(3)]
    reference = [np.concatenate(t) for t in zip(*per_sample)]
    assert len(batched) == 3 and all(t.shape == (3, 66) for t in batched)
    for b, s, r in zip(batched, single, reference):
        # logits reach ~10; float32 accumulation differences stay far below a bin's effect on the angle
        assert (b - s).abs().max().item() <= 1e-4
        assert np.abs(b.numpy() - r).max() <= 1e-4


def test_bins_to_degrees():
    one_hot = torch.full((3, 66), -1e4)
    one_hot[0, 0] = one_hot[1, 33] = one_hot[2, 65] = 0.0
    assert torch.allclose(bins_to_degrees(one_hot), torch.tensor([-99.0, 0.0, 96.0]))
    assert torch.allclose(bins_to_degrees(torch.zeros(1, 66)), torch.tensor([-1.5]))  # mean index 32.5


def test_crop_boxes():
    assert np.allclose(quarter_enlarged_box([100, 100, 200, 180]), [75, 80, 225, 200])
    # dlib demo: +-w/2 sideways, 3h/4 up, h/4 down, clipped to the image, then the centred square
    assert np.allclose(hopenet_demo_box([100, 100, 200, 200], 1000, 1000), [50, 25, 250, 225])
    # on an aligned face the demo region covers the whole crop (what the paper-protocol scripts feed Hopenet)
    assert np.allclose(hopenet_demo_box(canonical_face_box(256), 256, 256), [0, 0, 256, 256])


def test_mirror_negates_yaw_and_roll(aligned_batch, hopenet):
    with torch.no_grad():
        deg, mirrored = hopenet(aligned_batch), hopenet(aligned_batch.flip(-1))
    yaw, yaw_m = deg[:, 0], mirrored[:, 0]
    turned = yaw.abs() > 5
    assert turned.sum() >= 3, yaw
    assert (torch.sign(yaw[turned]) == -torch.sign(yaw_m[turned])).all(), (yaw, yaw_m)
    assert (yaw + yaw_m).abs().max() < 6.0, (yaw, yaw_m)
    assert (deg[:, 2] + mirrored[:, 2]).abs().max() < 6.0


def test_signs_agree_with_3ddfa(aligned_batch, hopenet):
    from mfim.nets.threedmm import TDDFAEncoder

    with torch.no_grad():
        hn = hopenet(aligned_batch)
        tddfa = torch.rad2deg(TDDFAEncoder()(aligned_batch).pose)
    clear = tddfa[:, 0].abs() > 5
    assert clear.sum() >= 3
    assert (torch.sign(hn[clear, 0]) == torch.sign(tddfa[clear, 0])).all(), (hn, tddfa)
    assert (hn[:, 0] - tddfa[:, 0]).abs().max() < 5.0, (hn, tddfa)
    pitch_clear = tddfa[:, 1].abs() > 5  # obama3 looks down ~13 deg
    assert (torch.sign(hn[pitch_clear, 1]) == torch.sign(tddfa[pitch_clear, 1])).all(), (hn, tddfa)


def test_in_plane_rotation_moves_roll(aligned_batch, hopenet):
    a = math.radians(15)
    size = aligned_batch.shape[-1]
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    m = np.concatenate([rot, (size / 2 - rot @ np.array([size / 2, size / 2]))[:, None]], 1)
    with torch.no_grad():
        roll0 = hopenet(aligned_batch)[:, 2]
        roll_cw = hopenet(warp(aligned_batch, m, size))[:, 2]  # content turned 15 deg clockwise on screen
    assert ((roll_cw - roll0) + 15).abs().max() < 5.0, (roll0, roll_cw)


def test_photo_path_agrees_with_aligned(faces, hopenet):
    img, face, aligned, rotation_deg = faces["obama2"]
    with torch.no_grad():
        a = hopenet(image_to_tensor(aligned))[0]
        p = hopenet.from_photo(img, face.box)[0]
    assert (p[:2] - a[:2]).abs().max() < 6.0, (p, a)
    assert abs(p[2] - (a[2] + rotation_deg)) < 4.0, (p, a, rotation_deg)


def test_official_resnet_layout_runs_and_is_frozen():
    net = HopenetResNet50(load=False)
    net.train()
    assert not net.training
    out = net(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 3) and torch.all(out.abs() <= 99)
    assert "mean" not in net.state_dict() and "fc_finetune.weight" in net.state_dict()
