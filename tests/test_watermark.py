"""The invisible watermark: invisible enough (PSNR), found where it is, not found where it is not, and still found
after the ordinary edits of a shared picture. The full robustness table is benchmarks/bench_watermark.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mfim import watermark as wm


def jpeg(img: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def half(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.BICUBIC))


def central_crop(img: np.ndarray, keep: float = 0.7) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = int(h * keep), int(w * keep)
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y : y + ch, x : x + cw]


ATTACKS = {
    "none": lambda a: a,
    "jpeg75": jpeg,
    "half": half,
    "crop70": central_crop,
    "crop70+half+jpeg75": lambda a: jpeg(half(central_crop(a))),
}


@pytest.fixture(scope="module")
def obama(photos):
    return photos["obama"]


@pytest.fixture(scope="module")
def marked_obama(obama):
    return wm.embed(obama)


def test_psnr_of_marked_photos_is_about_40db(photos):
    for name in ("obama", "biden", "obama_partial_face"):
        value = wm.psnr(wm.embed(photos[name]), photos[name])
        assert 39.5 <= value <= 41.5, (name, value)


def test_mark_changes_luminance_only(obama, marked_obama):
    diff = marked_obama.astype(int) - obama.astype(int)
    unclipped = (obama > 10).all(axis=2) & (obama < 245).all(axis=2)
    # the same offset on R, G and B (up to rounding), so hue and saturation are untouched
    spread = diff[unclipped].max(axis=1) - diff[unclipped].min(axis=1)
    assert np.mean(spread <= 1) > 0.999
    assert np.abs(diff).max() <= 16


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_marked_photo_detected_after_attack(marked_obama, attack):
    res = wm.detect(ATTACKS[attack](marked_obama))
    assert res["watermarked"], res
    assert res["score"] > 0.6  # measured 0.90-0.93: far above the threshold, not just over it


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_unmarked_photo_not_detected_after_attack(obama, attack):
    res = wm.detect(ATTACKS[attack](obama))
    assert not res["watermarked"], res
    assert res["score"] < res["threshold"]


def test_period_is_recovered_after_half_resize(marked_obama):
    assert wm.detect(marked_obama)["period_px"] == pytest.approx(wm.TILE, rel=0.01)
    assert wm.detect(half(marked_obama))["period_px"] == pytest.approx(wm.TILE / 2, rel=0.01)


def test_real_photos_unmarked_and_marked(photos):
    for name, img in photos.items():
        assert not wm.detect(img)["watermarked"], name
        assert wm.detect(wm.embed(img))["watermarked"], name


def test_other_key_is_not_detected(obama):
    marked = wm.embed(obama, key="someone-else")
    assert wm.detect(marked, key="someone-else")["watermarked"]
    assert not wm.detect(marked)["watermarked"]


def test_aligned_size_face_crop_survives_single_attacks(obama):
    # a 256 px face crop, the size of an aligned output of the embedded default after upscaling
    h, w = obama.shape[:2]
    side = min(h, w)
    crop = obama[(h - side) // 4 : (h - side) // 4 + side, (w - side) // 2 : (w - side) // 2 + side]
    face = np.asarray(Image.fromarray(crop).resize((256, 256), Image.LANCZOS))
    marked = wm.embed(face)
    for attack in ("none", "jpeg75", "half", "crop70"):
        assert wm.detect(ATTACKS[attack](marked))["watermarked"], attack
        assert not wm.detect(ATTACKS[attack](face))["watermarked"], attack


def test_flat_and_noise_images():
    gray = np.full((300, 400, 3), 128, np.uint8)
    assert wm.detect(gray)["score"] == 0.0 and not wm.detect(gray)["watermarked"]
    assert wm.detect(wm.embed(gray))["watermarked"]
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    assert not wm.detect(noise)["watermarked"]


def test_null_correlation_matches_the_model_behind_the_threshold(photos):
    """The threshold assumes each shift's correlation with a key the image was not marked with is ~N(0, null_std).
    Check that on real photos with many random keys: std, and the tail against the Gaussian."""
    residual = wm.whitened_residual(wm.luminance(photos["biden"]))
    folded = wm.fold(residual, 100.0)
    values = np.concatenate([wm.correlate_with_key(folded, f"random-{i}").ravel() for i in range(40)])
    assert values.std() == pytest.approx(wm.null_std(), rel=0.05)
    assert abs(values.mean()) < 0.1 * wm.null_std()
    # 655k shifts: a Gaussian puts ~0.2 beyond 5 sigma; allow a few, nothing near the threshold
    assert np.sum(np.abs(values) > 5 * wm.null_std()) <= 5
    assert values.max() < wm.THRESHOLD


def test_threshold_arithmetic():
    t = wm.threshold_for(wm.TARGET_FALSE_POSITIVE_RATE)
    assert wm.THRESHOLD == pytest.approx(t, abs=1e-3)
    assert wm.false_positive_bound(t) == pytest.approx(wm.TARGET_FALSE_POSITIVE_RATE, rel=1e-3)
    assert t < wm.threshold_for(1e-12) < 0.5  # stricter rates cost little: the marked scores are ~0.9


def test_render_tile_is_the_same_pattern_at_any_period():
    big = wm.render_tile(wm.DEFAULT_KEY, 128)
    small = wm.render_tile(wm.DEFAULT_KEY, 64)
    down = np.asarray(Image.fromarray(big.astype(np.float32), mode="F").resize((64, 64), Image.BILINEAR))
    assert np.corrcoef(down.ravel(), small.ravel())[0, 1] > 0.95


def test_rejects_non_rgb8():
    with pytest.raises(ValueError):
        wm.embed(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError):
        wm.detect(np.zeros((64, 64, 3), np.float32))
