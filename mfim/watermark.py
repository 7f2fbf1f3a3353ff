"""Invisible, keyed watermark for the images MFIM synthesises.

Why our own scheme: the PyPI `invisible-watermark` methods were measured on the test photos (PSNR ~40 dB, 32 bits):
dwtDct / dwtDctSvd fall to chance bit accuracy after a resize to half or a central 70% crop, and rivaGan (ONNX, needs
onnxruntime) fails on resize-to-half combined with crop and JPEG. We need a mark that says "MFIM made this" after the
ordinary things a picture goes through when it is shared, so this is a zero-bit (present / absent) mark built for that.

Scheme (keyed spread spectrum, tiled, phase-only matched filter):
- A key seeds random phases for every DFT coefficient of a canonical TILE×TILE tile whose frequency lies in the band
  [K_MIN, K_MAX] cycles per tile; the tile is that band-limited, unit-magnitude spectrum brought to space. Because the
  pattern is a sum of sinusoids with whole numbers of cycles per tile it can be rendered exactly at any tile period.
- Embedding adds the tile, repeated over the image with a period tied to the image size (`embed_period`), to the
  luminance (the same offset on R, G and B, so colour is untouched), scaled to a target PSNR (default 40 dB).
  Mid/low frequencies (wavelengths 8..32 px at the largest period) survive JPEG and a resize to half.
- Detection takes a whitened high-pass residual of the luminance, estimates the tile period from the residual's
  autocorrelation (a tiled pattern repeats; this is what makes it survive resizing), rescales to the canonical period,
  folds the image onto one tile (summing every repeat: this is what makes it survive crops, which only shift the
  phase), and correlates the folded tile with the key by phase-only correlation over every cyclic shift.
- The score is the largest correlation. Without the mark each shift's correlation is close to N(0, 1/(2M)), M = number
  of band coefficients; the threshold is set so that the chance that any of the shifts and period candidates tried
  on an unmarked image passes it is below `TARGET_FALSE_POSITIVE_RATE` (Bonferroni over all of them).
  benchmarks/bench_watermark.py measures the rates empirically.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import cv2
import numpy as np
from scipy import fft as sfft
from scipy.special import ndtri

SCHEME = "mfim-tiled-ss/1"
DEFAULT_KEY = "mfim-v1"
TILE = 128  # canonical tile period in pixels: detection folds onto a TILE×TILE grid
K_MIN, K_MAX = 4, 16  # band of the pattern, in cycles per tile
MIN_PERIOD = 2 * K_MAX + 2  # smallest period at which the band renders without aliasing
DEFAULT_PSNR_DB = 40.0
TARGET_FALSE_POSITIVE_RATE = 1e-8  # per image, by the Gaussian null with a Bonferroni bound
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_PERIOD_JITTER = (0.995, 1.0, 1.005)
ACF_WINDOW = 1024  # side of the central window whose autocorrelation gives the period  # the autocorrelation peak is good to ~0.5%; try its neighbours too


# ----------------------------------------------------------------------------------------------- the keyed pattern


@lru_cache(maxsize=8)
def _band() -> np.ndarray:
    """Boolean mask of the rfft2 coefficients of a TILE×TILE grid whose frequency lies in the band."""
    ky = sfft.fftfreq(TILE, 1 / TILE)[:, None]
    kx = sfft.rfftfreq(TILE, 1 / TILE)[None, :]
    r = np.hypot(ky, kx)
    return (r >= K_MIN) & (r <= K_MAX)


@lru_cache(maxsize=8)
def key_spectrum(key: str = DEFAULT_KEY) -> np.ndarray:
    """Unit-magnitude, random-phase rfft2 coefficients of the canonical tile (zero outside the band)."""
    seed = int.from_bytes(hashlib.sha256(f"{SCHEME}:{key}".encode()).digest()[:8], "little")
    phases = np.random.default_rng(seed).random((TILE, TILE // 2 + 1))
    return np.exp(2j * np.pi * phases) * _band()


def render_tile(key: str, period: int) -> np.ndarray:
    """The key's pattern on a period×period grid (same sinusoids, whole cycles per tile), unit RMS."""
    if period < MIN_PERIOD:
        raise ValueError(f"tile period {period} < {MIN_PERIOD} would alias the band")
    spec = key_spectrum(key)
    small = np.zeros((period, period // 2 + 1), complex)
    for k in range(-K_MAX, K_MAX + 1):  # move each row of frequencies to where a period-sized FFT keeps it
        small[k % period, : K_MAX + 1] = spec[k % TILE, : K_MAX + 1]
    tile = sfft.irfft2(small, s=(period, period))
    return tile / tile.std()


def embed_period(short_side: int) -> int:
    """Tile period for an image: a quarter of the short side (at least 4 repeats across it, which the period
    estimate needs), at most TILE, at least MIN_PERIOD."""
    return int(np.clip(round(short_side / 4), MIN_PERIOD, TILE))


def embed(image: np.ndarray, key: str = DEFAULT_KEY, psnr_db: float = DEFAULT_PSNR_DB) -> np.ndarray:
    """H×W×3 uint8 RGB -> the same with the keyed pattern added to its luminance at the given PSNR."""
    image = _check_rgb8(image)
    h, w = image.shape[:2]
    period = embed_period(min(h, w))
    tile = render_tile(key, period)
    pattern = np.tile(tile, (-(-h // period), -(-w // period)))[:h, :w]
    amplitude = 255.0 / 10 ** (psnr_db / 20)  # RMS of the added pattern
    marked = image.astype(np.float32) + (amplitude * pattern).astype(np.float32)[..., None]
    return np.clip(np.rint(marked), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ detection


def null_std() -> float:
    """Std of one shift's correlation on an unmarked image: phase-only correlation over M random phases."""
    return float(1.0 / np.sqrt(2.0 * _band().sum()))


def n_period_candidates() -> int:
    return (_N_ACF_CANDIDATES + 2) * len(_PERIOD_JITTER)


def threshold_for(false_positive_rate: float = TARGET_FALSE_POSITIVE_RATE) -> float:
    """Score above which an unmarked image is called marked with probability <= false_positive_rate."""
    n_tests = n_period_candidates() * TILE * TILE
    return float(-null_std() * ndtri(false_positive_rate / n_tests))  # upper-tail quantile, exact for tiny rates


def false_positive_bound(score: float) -> float:
    """Bonferroni bound on the chance that an unmarked image scores at least `score`."""
    from scipy.special import ndtr

    n_tests = n_period_candidates() * TILE * TILE
    return float(min(1.0, n_tests * ndtr(-score / null_std())))


_N_ACF_CANDIDATES = 4
THRESHOLD = round(threshold_for(), 3)


def detect(image: np.ndarray, key: str = DEFAULT_KEY, threshold: float = THRESHOLD) -> dict:
    """Look for the key's pattern. Returns {'watermarked', 'score', 'threshold', 'period_px', 'z',
    'false_positive_bound', 'scheme'}; score is a correlation in [-1, 1] (~0.9 on an untouched marked photo)."""
    image = _check_rgb8(image)
    residual = whitened_residual(luminance(image))
    score, period = -1.0, None
    if residual.any():
        for p in period_candidates(residual):
            s = float(correlate_with_key(fold(residual, p), key).max())
            if s > score:
                score, period = s, p
    else:  # a flat image has nothing to correlate
        score = 0.0
    return {
        "watermarked": bool(score >= threshold),
        "score": round(score, 4),
        "threshold": threshold,
        "z": round(score / null_std(), 2),
        "false_positive_bound": false_positive_bound(score),
        "period_px": None if period is None else round(float(period), 2),
        "scheme": SCHEME,
    }


def luminance(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) @ _LUMA


def whitened_residual(y: np.ndarray) -> np.ndarray:
    """High-pass residual divided by its local RMS: removes the picture's smooth content and evens out the weight
    of busy and flat regions, so edges do not drown the pattern."""
    r = y - cv2.GaussianBlur(y, (0, 0), 3.0)
    local_rms = np.sqrt(cv2.GaussianBlur(r * r, (0, 0), 8.0))
    return r / (local_rms + 1.0)


def period_candidates(residual: np.ndarray) -> list[float]:
    """Tile periods worth trying: the strongest peaks of the residual's autocorrelation along the axes, plus the
    period the embedder would use at this size and at twice it (a resize to half), each with its jitter."""
    h, w = residual.shape
    # a central window is plenty to see the repeats and keeps the FFT small on large photos
    y0, x0 = max(0, (h - ACF_WINDOW) // 2), max(0, (w - ACF_WINDOW) // 2)
    base = acf_periods(residual[y0 : y0 + ACF_WINDOW, x0 : x0 + ACF_WINDOW], _N_ACF_CANDIDATES)
    base += [embed_period(min(h, w)), embed_period(2 * min(h, w)) / 2]
    base += [base[-1]] * (_N_ACF_CANDIDATES + 2 - len(base))  # fixed count keeps the threshold's arithmetic true
    return [p * j for p in base for j in _PERIOD_JITTER if p * j >= 8]


def acf_periods(residual: np.ndarray, n: int, min_lag: int = 16) -> list[float]:
    """Lags (sub-pixel) of the n highest local maxima of the axis autocorrelation profile."""
    h, w = residual.shape
    max_lag = int(min(h, w) * 0.6)
    if max_lag <= min_lag + 2:
        return []
    shape = (sfft.next_fast_len(2 * h, real=True), sfft.next_fast_len(2 * w, real=True))
    spec = sfft.rfft2(residual, s=shape, workers=1)
    acf = sfft.irfft2(np.abs(spec) ** 2, s=shape, workers=1)
    lags = np.arange(max_lag + 2)
    # divide by the overlap so long lags are not penalised for being long
    profile = acf[0, : max_lag + 2] * w / (w - lags) + acf[: max_lag + 2, 0] * h / (h - lags)
    profile = profile / acf[0, 0]
    profile = profile - np.convolve(profile, np.ones(9) / 9, mode="same")  # drop the slow decay
    peaks = []
    for lag in range(min_lag, len(profile) - 1):
        left, mid, right = profile[lag - 1 : lag + 2]
        if mid >= left and mid >= right:
            curvature = left - 2 * mid + right
            offset = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
            peaks.append((mid, lag + offset))
    peaks.sort(reverse=True)
    return [float(lag) for _, lag in peaks[:n]]


def fold(residual: np.ndarray, period: float) -> np.ndarray:
    """Rescale so the period becomes TILE, then sum every TILE×TILE repeat into one tile."""
    scale = TILE / period
    h, w = residual.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
    r = cv2.resize(residual, size, interpolation=interp)
    H, W = r.shape
    r = np.pad(r, ((0, -H % TILE), (0, -W % TILE)))
    return r.reshape(r.shape[0] // TILE, TILE, r.shape[1] // TILE, TILE).sum(axis=(0, 2))


def correlate_with_key(folded: np.ndarray, key: str = DEFAULT_KEY) -> np.ndarray:
    """Phase-only correlation of a folded tile with the key at every cyclic shift (TILE×TILE array)."""
    band = _band()
    spec = sfft.rfft2(folded, workers=1)
    phase = np.where(band, spec / (np.abs(spec) + 1e-12), 0)
    corr = sfft.irfft2(phase * np.conj(key_spectrum(key)), s=(TILE, TILE), workers=1)
    return corr * (TILE * TILE) / (2 * band.sum())  # 1.0 when every band phase matches


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _check_rgb8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {image.dtype} {image.shape}")
    return image
