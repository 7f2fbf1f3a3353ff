"""dlib's face-recognition ResNet read into torch (mfim.nets.dlib_resnet) computes dlib's own descriptors.

The reference is dlib itself (``face_recognition_model_v1.compute_face_descriptor``, an independent implementation
of the network in C++ reading the same file), on real face chips cut by dlib from the embedded default's aligned
renders and on uniform-noise chips. Measured max |torch - dlib| over all 128 values: 3.7e-7 on the 16 face chips
(descriptor values up to 0.45) and 4.5e-7 on noise, float32 summation-order noise through 29 convolutions (a few
ulps of the largest activations); the bound is 1e-5, 20x the measured, and 4 orders of magnitude below dlib's
same/different-person scale (distances ~0.4 vs ~0.8, threshold 0.6).
"""

from __future__ import annotations

import numpy as np
import pytest

from mfim.assets import resolve
from mfim.nets.dlib_resnet import DlibFaceResNet, DlibFormatError, read_dlib_resnet
from mfim.nets.identity import DlibIdentityEmbedder

BOUND = 1e-5


@pytest.fixture(scope="module")
def dlib_embedder():
    return DlibIdentityEmbedder(descriptor="dlib")


@pytest.fixture(scope="module")
def network():
    return DlibFaceResNet()


@pytest.fixture(scope="module")
def face_chips(dlib_embedder):
    """16 dlib chips (150 px) of aligned renders of the embedded default's generator: 8 people x 2 images."""
    from mfim.data.synth import Synthesizer
    from mfim.nets.align import align_face
    from tests.defaults import synth_config

    synth = Synthesizer(synth_config())
    faces = []
    for i in range(8):
        who = synth.identity(i)
        for index in range(2):
            render = synth.render(who, index)[0]
            faces.append(align_face(render.image, render.landmarks, 128, transform_size=512).image)
    return np.stack(dlib_embedder.chips_aligned(faces))


def _dlib(embedder, chips) -> np.ndarray:
    return np.asarray(embedder.recognizer.compute_face_descriptor(list(chips)), np.float32)


def test_file_holds_dlibs_published_network():
    means, layers = read_dlib_resnet(resolve("dlib_face_recognition"))
    # input_rgb_image_sized's defaults (dlib/dnn/input.h), stored in the file as floats
    np.testing.assert_allclose(means, [122.782, 117.001, 104.298], rtol=1e-6)
    kinds = [layer.kind for layer in layers]
    # stem + 14 residual blocks of two convolutions each; a global average and the bias-free 256 -> 128 layer
    assert kinds.count("con") == 1 + 2 * 14 and kinds.count("affine") == 29 and kinds.count("add_prev") == 14
    assert kinds[-2:] == ["avg_pool", "fc"] and layers[-1].arrays["weight"].shape == (128, 256)


def test_torch_descriptors_equal_dlibs_on_face_chips(dlib_embedder, network, face_chips):
    want = _dlib(dlib_embedder, face_chips)
    got = network.describe(face_chips)
    assert got.shape == (16, 128) and got.dtype == np.float32
    assert np.abs(got - want).max() <= BOUND, np.abs(got - want).max()
    # the chips are faces dlib tells apart: the check is not on a degenerate input
    d = np.linalg.norm(want[::2, None] - want[None, ::2], axis=-1)
    assert d[~np.eye(8, dtype=bool)].min() > 0.2


def test_torch_descriptors_equal_dlibs_on_noise_and_in_any_batch(dlib_embedder, network):
    chips = np.random.default_rng(0).integers(0, 256, (6, 150, 150, 3), dtype=np.uint8)
    want = _dlib(dlib_embedder, chips)
    assert np.abs(network.describe(chips) - want).max() <= BOUND
    one_by_one = np.concatenate([network.describe(chips[i : i + 1]) for i in range(len(chips))])
    assert np.abs(one_by_one - want).max() <= BOUND
    assert network.describe(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)


def test_describe_each_is_the_same_bits_in_any_batch_and_thread_count(network, one_thread):
    import torch

    chips = np.random.default_rng(1).integers(0, 256, (5, 150, 150, 3), dtype=np.uint8)
    whole = network.describe_each(chips)
    torch.set_num_threads(2)
    parts = np.concatenate([network.describe_each(chips[:3]), network.describe_each(chips[3:])])
    assert torch.get_num_threads() == 2  # the caller's setting comes back
    np.testing.assert_array_equal(parts, whole)


def test_embedder_switch(dlib_embedder, face_chips):
    torch_embedder = DlibIdentityEmbedder()  # the default
    assert torch_embedder.recognizer is None
    got = torch_embedder._describe(list(face_chips[:4]))
    assert np.abs(got - dlib_embedder._describe(list(face_chips[:4]))).max() <= BOUND
    with pytest.raises(ValueError, match="descriptor"):
        DlibIdentityEmbedder(descriptor="onnx")


@pytest.mark.parametrize("cut", [100, 400_000, -7])
def test_truncated_or_padded_file_fails_with_one_clear_line(tmp_path, cut):
    data = resolve("dlib_face_recognition").read_bytes()
    bad = tmp_path / "bad.dat"
    bad.write_bytes(data[:cut] if cut > 0 else data + b"\x00" * -cut)
    with pytest.raises(DlibFormatError) as err:
        read_dlib_resnet(bad)
    assert "\n" not in str(err.value) and "bad.dat" in str(err.value)


def test_other_dlib_network_is_refused():
    with pytest.raises(DlibFormatError, match="loss"):
        read_dlib_resnet(resolve("dlib_cnn_detector"))
