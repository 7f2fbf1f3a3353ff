"""FID with pytorch-fid's Inception when its official weights are present; otherwise an honestly named substitute.

``load_fid_inception(path)`` builds pytorch-fid's own ``InceptionV3`` (the ``FIDInceptionA``..``E_2`` blocks of the
TF-ported FID network, pool3 2048-d features) and fills it from ``pt_inception-2015-12-05-6726825d.pth`` -- the
official file's key layout (torchvision Inception names, 1008-way ``fc``) -- taken from the given path, the MFIM asset
cache, or the torch hub cache where pytorch-fid itself would have put it. Nothing is downloaded.

``compute_fd`` returns ``{"name": "fid", ...}`` only with those weights. Without them it computes the Fréchet
distance in the feature space of another network it does have and names the number after it (``fd_lpips_alex``:
LPIPS AlexNet trunk, each of its five ReLU maps averaged over space, concatenated, 1152-d), with a note saying it is
not FID and not comparable to published FID values. The Fréchet distance itself is pytorch-fid's
``calculate_frechet_distance``.

``FrechetDistance`` takes batches as they come (running mean and covariance, one d×d matrix per set), so the
evaluate stage never holds its swaps; both sets are area-resized to one resolution first (the real images' by
default).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mfim.assets import cached_path, get, missing_error, resolve
from mfim.nets.onnx_utils import FrozenModule, freeze, load_state_dict_file

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
SUBSTITUTES = ("lpips_alex",)


def hub_cached_inception() -> Path | None:
    """pytorch-fid's weights in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), if a past run put them there."""
    p = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME
    return p if p.is_file() else None


def find_inception_checkpoint(path: str | os.PathLike | None = None) -> Path | None:
    """The FID Inception weights: ``path`` (must exist, else MissingAssetError), the MFIM cache, the hub cache, or
    None."""
    if path:
        return resolve("fid_inception", path)
    cached = cached_path(get("fid_inception"))
    if cached.is_file():
        return cached
    return hub_cached_inception()


def load_fid_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """pytorch-fid's ``InceptionV3`` (pool3 block) with the official FID weights; frozen.

    Input B×3×H×W in [0, 1] (it resizes to 299 and rescales itself), output a list holding B×2048×1×1.
    Raises MissingAssetError (file, params key ``evaluate.fid.inception_checkpoint``, where to get it) when absent.
    """
    from pytorch_fid import inception as fid_inception

    found = find_inception_checkpoint(path)
    if found is None:
        raise missing_error(get("fid_inception"))
    state = load_state_dict_file(found)

    # pytorch-fid fetches its weights with load_state_dict_from_url(FID_WEIGHTS_URL); hand it the local file instead.
    def local_weights(url, *args, **kwargs):
        return state

    with mock.patch.object(fid_inception, "load_state_dict_from_url", local_weights):
        model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return freeze(model).to(device)


class InceptionFeatures(FrozenModule):
    """[-1, 1] images -> B×2048 FID pool3 features."""

    name = "fid"

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inception((images + 1.0) / 2.0)[0].flatten(1)


class LPIPSAlexFeatures(FrozenModule):
    """[-1, 1] images -> B×1152: LPIPS AlexNet's five ReLU maps, spatially averaged and concatenated.

    Images are first resized to 224 px (antialiased) so the features describe the same image scale whatever the
    generator's resolution.
    """

    name = "fd_lpips_alex"
    input_size = 224

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        from mfim.nets.perceptual import load_lpips

        lp = load_lpips("alex", device=device)
        self.scaling_layer, self.trunk = lp.scaling_layer, lp.net
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        x = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        maps = self.trunk(self.scaling_layer(x))
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], 1)


def _batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """Accept an N×3×H×W tensor, an iterable of such batches, or a sequence of H×W×3 uint8 arrays."""
    if torch.is_tensor(images):
        yield from images.split(batch_size)
        return
    pending: list[np.ndarray] = []
    for item in images:
        if torch.is_tensor(item):
            yield item if item.ndim == 4 else item[None]
            continue
        pending.append(np.asarray(item))
        if len(pending) == batch_size:
            yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            pending = []
    if pending:
        yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class RunningStatistics:
    """Mean and covariance of features added a batch at a time (Chan et al.'s pairwise update of the centred sums),
    so a Fréchet distance over any number of images holds one d×d matrix instead of every feature vector."""

    def __init__(self):
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum over images of (f - mean)(f - mean)^T

    def update(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        if len(f) == 0:
            return
        mean_b = f.mean(0)
        c = f - mean_b
        m2_b = c.T @ c
        if self.n == 0:
            self.n, self.mean, self.m2 = len(f), mean_b, m2_b
            return
        n = self.n + len(f)
        delta = mean_b - self.mean
        # in place: a fresh d×d matrix a batch (32 MB for Inception) would fragment the heap between image batches
        self.mean += delta * (len(f) / n)
        self.m2 += m2_b
        self.m2 += np.outer(delta, delta) * (self.n * len(f) / n)
        self.n = n

    def statistics(self) -> tuple[np.ndarray, np.ndarray, int]:
        if self.n < 2:
            raise ValueError("a Fréchet distance needs at least two images per set")
        return self.mean, self.m2 / (self.n - 1), self.n


def area_resize(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Area-downsample to ``resolution`` px (None or the same size: unchanged). Upsampling is refused: it adds no
    detail, and comparing real and generated images at different sizes is what this resize exists to prevent."""
    if resolution is None or images.shape[-1] == resolution:
        return images
    if images.shape[-1] < resolution or images.shape[-2] < resolution:
        raise ValueError(f"FID resolution {resolution} px is above the images' {images.shape[-1]} px; "
                         "choose one at most the smaller of the real and generated sizes")
    return F.interpolate(images, size=(resolution, resolution), mode="area")


@torch.no_grad()
def feature_statistics(extractor: nn.Module, images, batch_size: int = 50,
                       resolution: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, covariance, count) of the extractor's features over all images (area-resized to ``resolution``)."""
    device = next(extractor.parameters()).device
    stats = RunningStatistics()
    for b in _batches(images, batch_size):
        stats.update(extractor(area_resize(b.to(device, torch.float32), resolution)).double().cpu().numpy())
    return stats.statistics()


def frechet_distance(real_stats, fake_stats) -> float:
    """pytorch-fid's Fréchet distance of two (mean, covariance) pairs, as a float."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(real_stats[0], real_stats[1], fake_stats[0], fake_stats[1]))


def build_substitute_extractor(network: str = "lpips_alex", device: str | torch.device = "cpu") -> nn.Module:
    if network == "lpips_alex":
        return LPIPSAlexFeatures(device=device)
    raise ValueError(f"unknown substitute feature network {network!r}; choose one of {', '.join(SUBSTITUTES)}")


NOT_FOUND = (
    f"FID Inception weights {FID_WEIGHTS_FILENAME} not found (params.yaml `evaluate.fid.inception_checkpoint`, "
    "MFIM asset cache, torch hub cache). "
)


class FrechetDistance:
    """A Fréchet distance fed a batch at a time: FID with the official Inception weights, else the named substitute.

    Every image is first area-resized to ``resolution`` px (None: the size of the first real batch), so real and
    generated sets meet at one resolution: pytorch-fid resizes whatever it gets to 299 px bilinearly without
    antialiasing, which would alias a 1024 px swap and not a 256 px real image, and the distance would partly
    measure that. A given but missing ``inception_checkpoint`` raises MissingAssetError (a typo should not silently
    switch metrics); an empty one falls back to the caches, then to the substitute.
    """

    def __init__(self, inception_checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 substitute: str = "lpips_alex", resolution: int | None = None):
        self.inception_file = find_inception_checkpoint(inception_checkpoint)
        if self.inception_file is None:
            self.extractor = build_substitute_extractor(substitute, device)
        else:
            self.extractor = InceptionFeatures(load_fid_inception(self.inception_file, device))
        self.device = next(self.extractor.parameters()).device
        self.resolution = resolution
        self.input_sizes: dict[str, set[int]] = {"real": set(), "fake": set()}
        self.stats = {"real": RunningStatistics(), "fake": RunningStatistics()}

    @torch.no_grad()
    def add(self, which: str, images: torch.Tensor) -> None:
        """Add a B×3×H×W batch in [-1, 1] to the ``"real"`` or ``"fake"`` set."""
        if self.resolution is None:
            if which != "real":
                raise ValueError("without an explicit resolution, add a real batch first (it sets the size)")
            self.resolution = int(images.shape[-1])
        self.input_sizes[which].add(int(images.shape[-1]))
        x = area_resize(images.to(self.device, torch.float32), self.resolution)
        self.stats[which].update(self.extractor(x).double().cpu().numpy())

    def resolution_note(self) -> str:
        def sizes(which):
            return "/".join(str(s) for s in sorted(self.input_sizes[which]))

        resized = [f"{label} images area-downsampled from {sizes(w)} px"
                   for w, label in (("real", "real"), ("fake", "generated")) if self.input_sizes[w] - {self.resolution}]
        how = "; ".join(resized) if resized else "both given at that size"
        return f"Compared at {self.resolution} px ({how}) before the feature network's own resize."

    def report(self) -> dict:
        """``{"name": "fid" | "fd_<network>", "value", "note", "n_real", "n_fake", "resolution",
        "resolution_note"}``."""
        real, fake = self.stats["real"].statistics(), self.stats["fake"].statistics()
        if self.inception_file is None:
            note = (f"{NOT_FOUND}Fréchet distance between {real[2]} real and {fake[2]} generated images in the "
                    f"feature space of {self.extractor.name[3:]} ({real[0].shape[0]}-d); NOT FID and not comparable "
                    "to published FID numbers.")
        else:
            note = (f"FID (pytorch-fid Inception pool3, {self.inception_file.name}) between {real[2]} real and "
                    f"{fake[2]} generated images.")
        return {"name": self.extractor.name, "value": frechet_distance(real, fake), "note": f"{note} {self.resolution_note()}",
                "n_real": real[2], "n_fake": fake[2], "resolution": self.resolution,
                "resolution_note": self.resolution_note()}


def compute_fd(
    real_images,
    fake_images,
    inception_checkpoint: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    substitute: str = "lpips_alex",
    resolution: int | None = None,
) -> dict:
    """FID when the official Inception weights are found, else the substitute Fréchet distance (FrechetDistance),
    over in-memory sets or iterables of batches."""
    fd = FrechetDistance(inception_checkpoint, device, substitute, resolution)
    for which, images in (("real", real_images), ("fake", fake_images)):
        for b in _batches(images, batch_size):
            fd.add(which, b)
    return fd.report()


__all__ = [
    "load_fid_inception",
    "compute_fd",
    "FrechetDistance",
    "RunningStatistics",
    "feature_statistics",
    "find_inception_checkpoint",
    "hub_cached_inception",
    "InceptionFeatures",
    "LPIPSAlexFeatures",
    "FID_WEIGHTS_FILENAME",
]
