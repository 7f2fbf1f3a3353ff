"""The fitted 3DMM regressor: a differentiable CNN from an FFHQ-aligned face to BFM shape/exp and pose.

Two backbones (``RegressorConfig.backbone``): ``small``, a few strided convolutions fitted from scratch, and
``mobilenet_v1``, 3DDFA_V2's own network started from its weights and fitted further (on the renders it sees BFM
shape and expression better at the same data: docs/EXPERIMENTS.md §15).

It is the third 3DMM option beside 3DDFA_V2 and DECA, and what L_shape uses on the embedded default: 3DDFA_V2 cannot
see BFM shape on these renders, while a network fitted to the renders' ground truth can. On real data it is fitted
to DECA/3DDFA_V2 estimates instead (distillation), which gives a fast, differentiable stand-in for them.

The network predicts std-normalised parameters (each coefficient minus the training mean, over the training std);
``forward`` de-normalises them to :class:`~mfim.nets.types.ThreeDMMParams` (BFM units, pose in radians).
``forward_normalized`` gives the normalised vector directly (``[shape | exp | pose]``), the scale the 3DMM losses use.

Checkpoint (``data/threedmm/regressor.pt``, loads with ``torch.load(weights_only=True)``): a dict with ``format``,
``version``, ``config`` (input_size, width, n_shape, n_exp, backbone), ``state_dict``, ``mean``/``std`` (normalisation
stats, also buffers of the module), ``target`` (ground_truth | estimate) and ``val_error`` (per parameter group).

Fitting it (the ``fit_regressor`` stage's training loop, data loading and reports) is mfim.data.regressor_fit: this
module is the network and its file only, as the other frozen auxiliary networks of mfim.nets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mfim.nets.mobilenet_v1 import (
    TDDFA_EXP,
    TDDFA_SHAPE,
    MobileNetV1,
    fitted_regressor_crop,
    load_tddfa_stats,
    tddfa_network_input,
    tddfa_state,
)
from mfim.nets.types import N_EXP, N_SHAPE, ThreeDMMParams

FORMAT = "mfim-threedmm-regressor"
VERSION = 1


BACKBONES = ("small", "mobilenet_v1")


@dataclass
class RegressorConfig:
    input_size: int = 64  # side of the aligned face the network is fitted on (inputs are resized to it first)
    width: int = 32  # base channels of the small backbone
    n_shape: int = N_SHAPE
    n_exp: int = N_EXP
    # small: the CNN below, from scratch. mobilenet_v1: 3DDFA_V2's network (mfim.nets.mobilenet_v1) on its own
    # 120 px roi of the aligned face, started from 3DDFA_V2's weights when fitted (init_from_tddfa)
    backbone: str = "small"

    @property
    def n_out(self) -> int:
        return self.n_shape + self.n_exp + 3


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class ThreeDMMRegressor(nn.Module):
    """aligned B×3×H×W in [-1, 1] (any H=W) -> ThreeDMMParams. Differentiable w.r.t. the input."""

    def __init__(self, config: RegressorConfig | None = None, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None):
        super().__init__()
        self.config = c = config or RegressorConfig()
        if c.backbone not in BACKBONES:
            raise ValueError(f"3DMM regressor backbone must be one of {BACKBONES}, got {c.backbone!r}")
        self.register_buffer("mean", torch.zeros(c.n_out) if mean is None else mean.float().clone())
        self.register_buffer("std", torch.ones(c.n_out) if std is None else std.float().clone())
        self.frozen = False
        if c.backbone == "mobilenet_v1":
            net = MobileNetV1(c.n_out)
            self.features = nn.Sequential(net.body, net.pool)
            self.head = net.fc
            return
        w = c.width
        layers, cin, size = [], 3, c.input_size
        # Stride-2 stages down to 4×4, then a flatten: geometry (where the jaw and eyes are) is what is regressed,
        # so the head keeps the spatial layout instead of pooling it away. A second (stride-1) conv only from a
        # quarter of the input size down: at the first, largest stage it would cost ~30% of the FLOPs for no
        # measurable gain (64 px, synthetic set).
        for cout in (w, 2 * w, 4 * w, 4 * w):
            size = (size + 1) // 2
            layers.append(_conv(cin, cout, 2))
            if 4 < size <= c.input_size // 4:
                layers.append(_conv(cout, cout, 1))
            cin = cout
            if size <= 4:
                break
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * size * size, 8 * w), nn.SiLU(inplace=True),
                                  nn.Linear(8 * w, c.n_out))

    def train(self, mode: bool = True) -> "ThreeDMMRegressor":
        # Once fitted it is a loss network: a trainer calling .train() on its parent must not switch BatchNorm to
        # batch statistics.
        return super().train(mode and not self.frozen)

    def freeze(self) -> "ThreeDMMRegressor":
        self.frozen = True
        return self.eval().requires_grad_(False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.input_size
        if x.shape[-1] != s or x.shape[-2] != s:
            # antialiased bilinear: downscaling a 256/1024 crop without aliasing, and it has a backward pass
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=x.shape[-1] > s)
        if self.config.backbone == "mobilenet_v1":
            x = _tddfa_input(x)
        return x

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """B×(n_shape+n_exp+3) std-normalised ``[shape | exp | pose]``."""
        return self.head(self.features(self.prepare(x)))

    def split(self, v: torch.Tensor) -> ThreeDMMParams:
        c = self.config
        return ThreeDMMParams(v[:, : c.n_shape], v[:, c.n_shape : c.n_shape + c.n_exp], v[:, c.n_shape + c.n_exp :])

    def normalize(self, params: ThreeDMMParams) -> torch.Tensor:
        """ThreeDMMParams in BFM units -> the normalised vector ``forward_normalized`` predicts."""
        v = torch.cat([params.shape, params.exp, params.pose], dim=1)
        return (v - self.mean) / self.std

    def denormalize(self, v: torch.Tensor) -> ThreeDMMParams:
        return self.split(v * self.std + self.mean)

    def forward(self, x: torch.Tensor) -> ThreeDMMParams:
        return self.denormalize(self.forward_normalized(x))


def _tddfa_input(aligned: torch.Tensor) -> torch.Tensor:
    """Aligned RGB in [-1, 1] -> the 120 px roi (the crop these fits were made on), BGR, scaled as 3DDFA_V2's network
    reads it."""
    return tddfa_network_input(fitted_regressor_crop(aligned))


def init_from_tddfa(model: ThreeDMMRegressor, onnx_path=None, stats_path=None) -> ThreeDMMRegressor:
    """Start a ``mobilenet_v1`` regressor from 3DDFA_V2: its convolutions, and a head that predicts what 3DDFA_V2
    predicts for BFM shape and expression in this model's normalisation (3DDFA_V2's output is de-normalised with its
    own statistics, then normalised with the model's ``mean``/``std``). The pose rows start at zero (the training
    mean): 3DDFA_V2 gives a 3x4 camera matrix, not the three angles regressed here. With another 3DMM width (DECA's
    FLAME) only the convolutions are taken."""
    if model.config.backbone != "mobilenet_v1":
        raise ValueError("init_from_tddfa needs backbone mobilenet_v1")
    state = tddfa_state(onnx_path)
    body = {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}
    model.features[0].load_state_dict(body)
    c = model.config
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        if (c.n_shape, c.n_exp) == (N_SHAPE, N_EXP):
            p_mean, p_std = (torch.from_numpy(a) for a in load_tddfa_stats(stats_path))
            rows = torch.cat([torch.arange(62)[TDDFA_SHAPE], torch.arange(62)[TDDFA_EXP]])
            mine = slice(0, c.n_shape + c.n_exp)
            std, mean = model.std[mine], model.mean[mine]
            model.head.weight[mine] = state["fc.weight"][rows] * (p_std[rows] / std)[:, None]
            model.head.bias[mine] = (state["fc.bias"][rows] * p_std[rows] + p_mean[rows] - mean) / std
    return model


def save_regressor(model: ThreeDMMRegressor, path: str | Path, target: str, val_error: dict, extra=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "version": VERSION, "config": asdict(model.config), "state_dict": state,
                "mean": model.mean.detach().cpu(), "std": model.std.detach().cpu(), "target": target,
                "val_error": val_error, **(extra or {})}, path)
    return path


NO_REGRESSOR = "mfim-threedmm-regressor-absent"


def save_no_regressor(path: str | Path, why: str) -> Path:
    """A marker in place of a regressor a stage declares but did not fit (loading it names ``why``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": NO_REGRESSOR, "why": why}, path)
    return path


def read_regressor_checkpoint(path: Path) -> dict:
    """The checkpoint dict of a fitted regressor, its format and version checked."""
    if not path.is_file():
        raise FileNotFoundError(f"fitted 3DMM regressor not found at {path} (made by `dvc repro fit_regressor`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and ckpt.get("format") == NO_REGRESSOR:
        raise ValueError(f"{path}: no regressor was fitted ({ckpt.get('why')})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an MFIM 3DMM regressor checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} (this code reads {VERSION})")
    return ckpt


def frozen_regressor(ckpt: dict) -> ThreeDMMRegressor:
    model = ThreeDMMRegressor(RegressorConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.freeze()


def load_fitted_regressor(path: str | Path, device: str | torch.device = "cpu") -> ThreeDMMRegressor:
    """The fitted regressor, frozen: eval mode for good (``.train()`` is ignored), no parameter gradients; gradients
    still flow to the input."""
    return frozen_regressor(read_regressor_checkpoint(Path(path))).to(device)
