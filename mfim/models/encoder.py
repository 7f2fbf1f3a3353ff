"""The facial attribute encoder of MFIM (§3.1): a pSp-style hierarchical backbone whose latent maps feed

* M2C blocks (map-to-code): one style code per S-space entry of the generator, and
* M2M blocks (map-to-map): style maps with spatial extent, given to the generator as its noise inputs.

Latent maps. Like pSp, the backbone's last three stages give c1 (stride 4 of the stage input), c2, c3 and a
top-down FPN gives three levels: ``coarse`` = c3, ``middle`` = up(coarse) + lat(c2), ``fine`` = up(middle) + lat(c1).
At paper scale (IR-SE50, 256 px input) they are 16, 32 and 64 px. The small backbone of the embedded default starts
with a stride-1 stage so that at 64 px input the levels are 8, 16 and 32 px -- the resolutions of the generator layers
that take style maps by default.

Which level feeds which generator layer (pSp's split, written in terms of the generator layer's resolution r):
r <= 8 -> coarse, 16 <= r <= 32 -> middle, r >= 64 -> fine. An M2M block takes the level whose map has the layer's
resolution (the paper: "style maps with the same size of the incoming latent maps"), or the nearest level resized
bilinearly when none matches (only in unusual configurations).

Style codes are predicted as offsets from the generator's average style (its S-space image of w_avg), the S-space
version of pSp/e4e's "start from latent average": an untrained encoder gives the average face, not noise.

Iterative refinement (not in the paper; ``refine_iterations`` > 0). One feed-forward pass inverts a face only roughly
on a small compute budget, and the reconstruction loses identity (docs/EXPERIMENTS.md §3, §8-9). ReStyle (Alaluf et
al., ICCV 2021) refines an encoder's inversion by showing an encoder the input beside its current reconstruction and
adding what it predicts. Here that second encoder (``refiner``, the same design with a 6-channel input and
zero-initialised heads, so that it starts as "no correction") adds offsets to every style code and style map; MFIM
runs it ``refine_iterations`` times on each image it encodes, before the code split of the swap. 0 is the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mfim.models.irse import IR_SE50_STAGES, IRSEBackbone, StageSpec

LEVELS = ("coarse", "middle", "fine")


def level_for_resolution(res: int) -> str:
    """pSp's coarse/middle/fine split of generator layers, by layer resolution."""
    if res <= 8:
        return "coarse"
    if res <= 32:
        return "middle"
    return "fine"


@dataclass(frozen=True)
class EncoderConfig:
    """params.yaml's ``encoder`` keys that shape the network (values: params.yaml, or a checkpoint's stored config),
    plus ``input_size`` (data.resolution)."""

    input_size: int
    backbone: str  # small | ir_se50
    width: int  # small backbone: channels of the first stage (doubling per stage)
    latent_channels: int | None  # FPN width; None: 512 for ir_se50, 4*width for small
    code_channels: int | None  # hidden width of the M2C blocks; None: latent_channels (pSp: 512)
    style_maps: bool
    style_map_resolutions: tuple[int, ...]
    style_map_channels: int  # 1: B×1×H×W maps like StyleGAN noise; 0: per-channel maps (B×C×H×W)
    # How a map reaches the generator. "direct": added to the layer's activations, scaled by a trainable per-layer
    # gain the encoder owns (init ``style_map_gain``). "strength": as a literal noise input, i.e. times the frozen
    # generator's learned noise strength -- ~1e-3 in the shipped 64 px generator, which leaves the maps inert.
    style_map_injection: str
    style_map_gain: float
    # ReStyle-style refinement passes after the one-shot encoding (module docstring); 0: the paper's single pass
    refine_iterations: int
    # the style-map resolutions whose maps the refiner corrects (None: all of style_map_resolutions). Its 16 px map
    # corrections carried the target's face shape into the swap at 64 px (docs/EXPERIMENTS.md §12)
    refine_map_resolutions: tuple[int, ...] | None

    @staticmethod
    def from_params(params: dict, input_size: int) -> "EncoderConfig":
        """From the validated params.yaml ``encoder`` group (mfim.params_schema: every key present). Its other keys
        (backbone_checkpoint, coarse_max_res, source_torgb_max_res, mix_global_res) configure MFIM around it."""
        enc = params["encoder"]
        casts = {"width": int, "style_maps": bool, "style_map_channels": int, "style_map_injection": str,
                 "style_map_gain": float, "backbone": str, "refine_iterations": int,
                 "latent_channels": lambda v: None if v is None else int(v),
                 "code_channels": lambda v: None if v is None else int(v),
                 "style_map_resolutions": lambda v: tuple(int(r) for r in v),
                 "refine_map_resolutions": lambda v: None if v is None else tuple(int(r) for r in v)}
        return EncoderConfig(input_size=input_size,
                             **{f.name: casts[f.name](enc[f.name]) for f in fields(EncoderConfig)
                                if f.name != "input_size"})


def _conv_lrelu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2)]


class MapToCode(nn.Module):
    """M2C: strided convs shrink a latent map to 1×1, a linear layer gives one style code (pSp's GradualStyleBlock).

    The output layer starts at zero so that the code starts at the generator's average style.
    """

    def __init__(self, in_ch: int, out_ch: int, spatial: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_ch
        n = max(int(math.log2(spatial)), 1)
        layers = _conv_lrelu(in_ch, hidden, 2)
        for _ in range(n - 1):
            layers += _conv_lrelu(hidden, hidden, 2)
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(hidden, out_ch)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        return self.linear(x.mean(dim=(2, 3)))


class MapToMap(nn.Module):
    """M2M: two convs turn a latent map into a style map (1 or C channels) at the generator layer's resolution.

    Zero-initialised output: at the start the style maps are zero, i.e. the generator runs without noise there.
    """

    def __init__(self, in_ch: int, out_ch: int, out_res: int):
        super().__init__()
        self.out_res = out_res
        self.body = nn.Sequential(*_conv_lrelu(in_ch, in_ch, 1), nn.Conv2d(in_ch, out_ch, 3, 1, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.out_res:
            x = F.interpolate(x, size=(self.out_res, self.out_res), mode="bilinear", align_corners=False)
        return self.body(x)


def _small_stages(width: int) -> tuple[StageSpec, ...]:
    return (StageSpec(width, 1), StageSpec(width * 2, 2), StageSpec(width * 4, 2), StageSpec(width * 4, 2))


@dataclass
class EncoderOutput:
    codes: dict[int, torch.Tensor]  # S-space index -> B×C offset from the average style
    maps: dict[int, torch.Tensor]  # noise-layer index -> B×k×H×W style map


class FacialAttributeEncoder(nn.Module):
    """Backbone + FPN + one M2C per S-space entry + one M2M per style-mapped generator layer.

    ``style_layers`` / ``noise_layers`` are the generator's records (``Generator.style_layers`` /
    ``.noise_layers``: index, name, resolution, channels, kind), so the encoder adapts to any generator size.
    """

    def __init__(self, cfg: EncoderConfig, style_layers, noise_layers, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.in_channels = int(in_channels)
        if cfg.refine_iterations < 0:
            raise ValueError(f"encoder.refine_iterations must be >= 0, not {cfg.refine_iterations}")
        refine_res = cfg.style_map_resolutions if cfg.refine_map_resolutions is None else cfg.refine_map_resolutions
        if not set(refine_res) <= set(cfg.style_map_resolutions):
            raise ValueError(f"encoder.refine_map_resolutions {list(refine_res)} must be a subset of "
                             f"style_map_resolutions {list(cfg.style_map_resolutions)}")
        if cfg.backbone == "ir_se50":
            stages, norm, stem = IR_SE50_STAGES, "batch", 64
            first_stride = 2
        elif cfg.backbone == "small":
            stages, norm, stem = _small_stages(cfg.width), "group", cfg.width
            first_stride = 1
        else:
            raise ValueError(f"encoder.backbone must be small or ir_se50, not {cfg.backbone!r}")
        self.backbone = IRSEBackbone(stages, stem=stem, norm=norm, first_stride=first_stride, in_channels=in_channels)
        lat = cfg.latent_channels or (512 if cfg.backbone == "ir_se50" else 4 * cfg.width)
        c1, c2, c3 = self.backbone.stage_channels[1:]
        self.top = nn.Conv2d(c3, lat, 1) if c3 != lat else nn.Identity()
        self.latlayer1 = nn.Conv2d(c2, lat, 1)
        self.latlayer2 = nn.Conv2d(c1, lat, 1)
        # level resolutions: stage i has stride 2^(i+1) (ir_se50) or 2^i (small, stride-1 first stage)
        s0 = 0 if first_stride == 1 else 1
        self.level_res = {
            "fine": cfg.input_size // 2 ** (s0 + 1),
            "middle": cfg.input_size // 2 ** (s0 + 2),
            "coarse": cfg.input_size // 2 ** (s0 + 3),
        }
        self.style_layers = list(style_layers)
        self.code_level = {l.index: level_for_resolution(l.resolution) for l in self.style_layers}
        self.m2c = nn.ModuleDict(
            {
                str(l.index): MapToCode(lat, l.channels, self.level_res[self.code_level[l.index]], cfg.code_channels)
                for l in self.style_layers
            }
        )
        if cfg.style_map_injection not in ("direct", "strength"):
            raise ValueError(f"encoder.style_map_injection must be direct or strength, not {cfg.style_map_injection!r}")
        self.map_level: dict[int, str] = {}
        self.m2m = nn.ModuleDict()
        self.map_gain = nn.ParameterDict()
        if cfg.style_maps:
            for n in noise_layers:
                if n.resolution not in cfg.style_map_resolutions:
                    continue
                level = min(LEVELS, key=lambda lv: (abs(math.log2(self.level_res[lv] / n.resolution)), lv))
                self.map_level[n.index] = level
                out_ch = n.channels if cfg.style_map_channels == 0 else cfg.style_map_channels
                self.m2m[str(n.index)] = MapToMap(lat, out_ch, n.resolution)
                if cfg.style_map_injection == "direct":
                    self.map_gain[str(n.index)] = nn.Parameter(torch.tensor(float(cfg.style_map_gain)))
        self.refiner: FacialAttributeEncoder | None = None
        if cfg.refine_iterations > 0:
            # sees [image, current reconstruction]; one set of weights for every iteration, as ReStyle
            sub = replace(cfg, refine_iterations=0, style_map_resolutions=tuple(refine_res), refine_map_resolutions=None)
            self.refiner = FacialAttributeEncoder(sub, style_layers, noise_layers, in_channels=2 * self.in_channels)
            self.init_refiner()

    @torch.no_grad()
    def init_refiner(self) -> None:
        """Start the refiner from this encoder's weights: its backbone, FPN and head bodies see faces as this one
        does (the reconstruction's input channels start at zero), and its output layers start at zero, so that a
        refinement pass at first changes nothing. Called at construction and again when a trained encoder without a
        refiner is loaded into one that has it (mfim.training.run.init_encoder)."""
        if self.refiner is None:
            return
        own = self.state_dict()
        target = self.refiner.state_dict()
        stem = "backbone.input_layer.0.weight"
        for k, v in target.items():
            if k == stem:
                v.zero_()
                v[:, : own[k].shape[1]].copy_(own[k])
            elif k in own and own[k].shape == v.shape:
                v.copy_(own[k])
        for head in self.refiner.m2c.values():  # zero outputs: no correction until it learns one
            head.linear.weight.zero_()
            head.linear.bias.zero_()
        for head in self.refiner.m2m.values():
            head.body[-1].weight.zero_()
            head.body[-1].bias.zero_()
        self.refiner.load_state_dict(target)

    def load_state_starting_refiner(self, state: dict) -> bool:
        """``load_state_dict(state)``, except that the state of an encoder without a refiner (a one-pass encoder's)
        loaded into one that has it starts the refiner as a copy of it (``init_refiner``). Returns whether it did;
        any other missing or unexpected key is an error, as in a strict load."""
        missing = [k for k in self.state_dict() if k not in state]
        new_refiner = bool(missing) and all(k.startswith("refiner.") for k in missing)
        result = self.load_state_dict(state, strict=not new_refiner)
        if new_refiner:
            if result.unexpected_keys:
                raise RuntimeError(f"unexpected encoder keys, e.g. {result.unexpected_keys[0]}")
            self.init_refiner()
        return new_refiner

    def latent_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] != self.cfg.input_size or x.shape[-2] != self.cfg.input_size:
            x = F.interpolate(x, size=(self.cfg.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        _, c1, c2, c3 = self.backbone(x)
        coarse = self.top(c3)
        middle = F.interpolate(coarse, size=c2.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
        fine = F.interpolate(middle, size=c1.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
        return {"coarse": coarse, "middle": middle, "fine": fine}

    def forward(self, x: torch.Tensor, code_indices=None, with_maps: bool = False) -> EncoderOutput:
        """Style-code offsets for ``code_indices`` (default: all) and, if asked, the style maps."""
        feats = self.latent_maps(x)
        idx = [l.index for l in self.style_layers] if code_indices is None else list(code_indices)
        codes = {i: self.m2c[str(i)](feats[self.code_level[i]]) for i in idx}
        maps = {}
        if with_maps:
            maps = {i: self.m2m[str(i)](feats[lv]) for i, lv in self.map_level.items()}
            if self.cfg.style_map_injection == "direct":
                maps = {i: m * self.map_gain[str(i)] for i, m in maps.items()}
        return EncoderOutput(codes, maps)


def load_ir_se50(encoder: FacialAttributeEncoder, path: str | Path) -> list[str]:
    """Initialise an ir_se50 encoder's backbone from pSp's ``model_ir_se50.pth``; returns the keys left unused.

    The checkpoint's ``output_layer.*`` (the face-recognition head) has no counterpart and is skipped, as pSp does.
    """
    from mfim.assets import resolve

    path = resolve("psp_ir_se50", path)
    if encoder.cfg.backbone != "ir_se50":
        raise ValueError("model_ir_se50.pth initialises encoder.backbone = ir_se50 only")
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = encoder.backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # BatchNorm's num_batches_tracked is absent from files written by older PyTorch (pSp loads them all the same)
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: not an IR-SE50 state dict ({len(missing)} backbone keys missing, e.g. {missing[0]})")
    encoder.backbone.load_state_dict({**{k: v for k, v in own.items() if k not in matched}, **matched})
    return sorted(k for k in state if k not in matched)
