"""Aligned render sets for the 3DMM regressors: exact labels, deterministic, people disjoint from the swapper's."""

import numpy as np

from mfim.data.regressor_set import RenderSetConfig, render_aligned_set
from tests.defaults import synth_config


def small(offset: int):
    return render_aligned_set(synth_config(canvas=96, supersample=1, identities_train=160, images_per_identity=8),
                              RenderSetConfig(identities=2, images_per_identity=2, identity_offset=offset, size=32,
                                              workers=1), log=lambda *_: None)


def test_render_set_labels_and_determinism():
    a = small(100_000)
    assert a["images"].shape == (4, 32, 32, 3) and a["images"].dtype == np.uint8
    assert list(a["identity"]) == [100_000, 100_000, 100_001, 100_001]
    assert a["shape"].shape == (4, 40) and a["exp"].shape == (4, 10) and a["pose"].shape == (4, 3)
    lm = a["landmarks"]  # the true landmarks, in aligned pixels: inside the crop, face the right way round
    assert lm.shape == (4, 68, 2) and lm.dtype == np.float32 and (lm > 0).all() and (lm < 32).all()
    assert (lm[:, 36:42, 0].mean(1) < lm[:, 42:48, 0].mean(1)).all()  # subject's right eye on the image left
    assert (lm[:, 36:48, 1].mean(1) < lm[:, 48:68, 1].mean(1)).all()  # eyes above the mouth
    np.testing.assert_array_equal(a["shape"][0], a["shape"][1])  # one person, one shape
    assert not np.allclose(a["shape"][0], a["shape"][2])
    assert not np.allclose(a["exp"][0], a["exp"][1])  # each render its own expression
    b = small(100_000)
    np.testing.assert_array_equal(a["images"], b["images"])
    c = small(200_000)  # another offset: other people
    assert not np.allclose(a["shape"], c["shape"])

