"""MFIM: face swapping and ID mixing with a frozen pretrained StyleGAN2 (paper §3.1, §3.3).

Swap. The facial attribute encoder maps the target to the ID-irrelevant style codes (S-space entries of the coarse
generator layers, 4-16 px by default: overall structure and pose) and to the style maps (noise inputs: details such as
expression, hair and background); it maps the source to the ID style codes (the fine layers, 32 px and up: face shape,
eyes, nose, lips). The generator blends them.

ID mixing. Several sources share out the fine layers: with two sources, the global source drives the coarse-ID
resolutions (32 px by default, face shape) and the local source the finer ones (64 px and up, eyes). ``mix`` takes any
number of (source, resolutions) assignments.
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from collections.abc import Sequence

import torch
from torch import nn

from mfim.models.encoder import EncoderConfig, FacialAttributeEncoder


# The paper's split of a 1024 px generator (§3.1, §3.3): layers up to 16 px take the target's codes; ID mixing drives
# 32 px from the global source. The one source of these defaults (params.yaml states the embedded default's values).
COARSE_MAX_RES = 16
MIX_GLOBAL_RES = (32,)
# A swapper file holds its whole encoder config. Files written before a key existed lack it: these are the values
# such files were trained with (a fact of the file format, not a params default; params.yaml holds those).
ENCODER_CONFIG_BEFORE_KEY = {
    "input_size": 64, "backbone": "small", "width": 32, "style_map_resolutions": (16, 32, 64), "latent_channels": None,
    "code_channels": None, "style_maps": True, "style_map_channels": 1,
    "style_map_injection": "strength",  # before the direct path existed, maps were noise inputs
    "style_map_gain": 1.0, "refine_iterations": 0, "refine_map_resolutions": None,
}
SWAPPER_BEFORE_KEY = {"source_torgb_max_res": 0}  # the paper's split, from before the option


class MFIM(nn.Module):
    def __init__(
        self,
        generator: nn.Module,
        encoder_cfg: EncoderConfig,
        coarse_max_res: int = COARSE_MAX_RES,
        mix_global_res: Sequence[int] = MIX_GLOBAL_RES,
        noise_mode: str = "const",
        source_torgb_max_res: int = 0,
    ):
        super().__init__()
        self.generator = generator.eval().requires_grad_(False)
        self.encoder = FacialAttributeEncoder(encoder_cfg, generator.style_layers, generator.noise_layers)
        self.coarse_max_res = int(coarse_max_res)
        # Not in the paper: toRGB layers up to this resolution take the *source's* codes although they are coarse.
        # A toRGB layer only maps features to colour and feeds nothing above it, so it cannot move pose or
        # expression, but through the skip sum its coarse levels set the image's overall colour: skin tone.
        # 0: every coarse layer is the target's (the paper's split).
        self.source_torgb_max_res = int(source_torgb_max_res)
        self.mix_global_res = tuple(int(r) for r in mix_global_res)
        self.noise_mode = noise_mode
        # Optional test-time fitting of the source's ID codes (mfim.models.source_fit); None = the paper's
        # feed-forward encoder. Not part of the weights: evaluation and the CLI attach it from params.
        self.source_fitter = None
        layers = generator.style_layers
        # ID codes: the layers above coarse_max_res. The source gives those and the coarse toRGB codes up to
        # source_torgb_max_res; the target everything else.
        self.id_indices = [l.index for l in layers if l.resolution > self.coarse_max_res]
        tone = [l.index for l in layers if l.kind == "torgb" and l.resolution <= min(self.source_torgb_max_res,
                                                                                      self.coarse_max_res)]
        self.src_indices = sorted(self.id_indices + tone)
        self.tgt_indices = [l.index for l in layers if l.index not in self.src_indices]
        if not self.tgt_indices or not self.src_indices:
            raise ValueError(f"coarse_max_res={coarse_max_res} leaves no target or no source layers")
        with torch.no_grad():
            w_avg = getattr(generator, "w_avg", None)
            if w_avg is None:
                w_avg = generator.mapping.w_avg
            ws = w_avg.detach().reshape(1, 1, -1).expand(1, generator.num_ws, -1)
            s_avg = generator.styles_from_ws(ws)
        for l, s in zip(layers, s_avg):
            self.register_buffer(f"s_avg_{l.index}", s[0].detach().clone())

    def train(self, mode: bool = True):
        super().train(mode)
        self.generator.eval()  # frozen: its noise buffers and any norm layers stay in inference behaviour
        return self

    # --- pieces -----------------------------------------------------------------------------------------------
    def average_style(self, index: int) -> torch.Tensor:
        return getattr(self, f"s_avg_{index}")

    def invert(self, x: torch.Tensor, indices: Sequence[int] | None = None, with_maps: bool = True,
               refine: bool = True) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Style codes (``indices``, default all) and, if asked, style maps of ``x``: the encoder's pass, then
        ``encoder.refine_iterations`` refinement passes (mfim.models.encoder). A refinement pass needs the whole
        current reconstruction, so with a refiner every code and map is computed whatever ``indices`` asks for. As in
        ReStyle, the reconstruction a pass looks at is a constant (no gradient through it); the corrections add up."""
        n = self.encoder.cfg.refine_iterations if refine else 0  # refine=False: the one-pass encoder alone
        out = self.encoder(x, code_indices=None if n else indices, with_maps=with_maps or n > 0)
        codes = {i: self.average_style(i) + d for i, d in out.codes.items()}
        maps = out.maps
        for _ in range(n):
            with torch.no_grad():
                y = self.synthesize({i: c.detach() for i, c in codes.items()}, {i: m.detach() for i, m in maps.items()})
                if y.shape[-2:] != x.shape[-2:]:  # paper scale: 1024 px reconstruction beside the 256 px input
                    y = torch.nn.functional.interpolate(y, size=x.shape[-2:], mode="area")
            frozen = not next(self.encoder.refiner.parameters()).requires_grad
            with torch.no_grad() if frozen else contextlib.nullcontext():  # a frozen refiner needs no graph
                step = self.encoder.refiner(torch.cat([x, y.to(x.dtype)], dim=1), with_maps=True)
            codes = {i: c + step.codes[i] for i, c in codes.items()}
            maps = {i: m + step.maps[i] if i in step.maps else m for i, m in maps.items()}  # refine_map_resolutions
        if indices is not None:
            codes = {i: codes[i] for i in indices}
        return codes, (maps if with_maps else {})

    def encode_codes(self, x: torch.Tensor, indices: Sequence[int]) -> dict[int, torch.Tensor]:
        """Style codes ``indices`` of x: the encoder's (and refiner's), fitted further when a source fitter is set."""
        if self.source_fitter is not None:
            return self.source_fitter(self, x, indices)
        return self.invert(x, indices, with_maps=False)[0]

    def encode_target(self, x_tgt: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """ID-irrelevant style codes and style maps of the target."""
        return self.invert(x_tgt, self.tgt_indices, with_maps=True)

    def synthesize(self, codes: dict[int, torch.Tensor], maps: dict[int, torch.Tensor]) -> torch.Tensor:
        styles = [codes[l.index] for l in self.generator.style_layers]
        per_layer = [maps.get(n.index) for n in self.generator.noise_layers]
        if self.encoder.cfg.style_map_injection == "direct":
            return self.generator.synthesize(styles, noise_mode=self.noise_mode, style_maps=per_layer)
        return self.generator.synthesize(styles, noise=per_layer, noise_mode=self.noise_mode)

    # --- operations -------------------------------------------------------------------------------------------
    def swap(self, x_src: torch.Tensor, x_tgt: torch.Tensor) -> torch.Tensor:
        """x_swap with the ID of x_src and the ID-irrelevant attributes (pose, expression, details) of x_tgt."""
        if x_src is x_tgt and self.source_fitter is None:  # self-swap: one inversion gives both halves of the split
            return self.synthesize(*self.invert(x_tgt))
        codes, maps = self.encode_target(x_tgt)
        codes.update(self.encode_codes(x_src, self.src_indices))
        return self.synthesize(codes, maps)

    def reconstruct(self, x: torch.Tensor, refine: bool = True) -> torch.Tensor:
        """The self-swap of ``x``; ``refine=False`` leaves out the refinement passes (the warm start trains the
        one-pass encoder that way before its refiner)."""
        return self.swap(x, x) if refine else self.synthesize(*self.invert(x, refine=False))

    def mix_assignment(self) -> list[list[int]]:
        """Default two-source split: [global-source resolutions, local-source resolutions]."""
        res = sorted({l.resolution for l in self.generator.style_layers if l.resolution > self.coarse_max_res})
        global_res = [r for r in res if r in self.mix_global_res]
        local_res = [r for r in res if r not in self.mix_global_res]
        return [global_res, local_res]

    def mix(
        self,
        x_tgt: torch.Tensor,
        x_src_global: torch.Tensor,
        x_src_local: torch.Tensor | None = None,
        *more_sources: torch.Tensor,
        assignment: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """ID mixing: ID style codes from several sources, each driving the generator resolutions it is assigned.

        With two sources and no assignment: global -> ``mix_global_res`` (32 px), local -> the finer ones.
        Fine layers that no source claims keep the first source's codes. With one source this is ``swap``.
        """
        sources = [x_src_global] + ([x_src_local] if x_src_local is not None else []) + list(more_sources)
        if assignment is None:
            assignment = self.mix_assignment() if len(sources) == 2 else [[]] * len(sources)
        if len(assignment) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(assignment)} resolution groups")
        res_of = {l.index: l.resolution for l in self.generator.style_layers}
        owner = {i: 0 for i in self.src_indices}
        for k, group in enumerate(assignment):
            for i in self.src_indices:
                if res_of[i] in set(int(r) for r in group):
                    owner[i] = k
        codes, maps = self.encode_target(x_tgt)
        for k, x in enumerate(sources):
            mine = [i for i in self.src_indices if owner[i] == k]
            if mine:
                codes.update(self.encode_codes(x, mine))
        return self.synthesize(codes, maps)

    def encoder_parameters(self):
        return self.encoder.parameters()

    def forward(self, x_src: torch.Tensor, x_tgt: torch.Tensor) -> torch.Tensor:
        return self.swap(x_src, x_tgt)


# --- inference checkpoint ------------------------------------------------------------------------------------------
SWAPPER_FORMAT = "mfim-swapper"


def save_swapper(model: MFIM, path, encoder_state: dict | None = None, meta: dict | None = None,
                 extra: dict | None = None):
    """Everything inference needs in one file: generator (config + weights), encoder config + (EMA) weights, split;
    ``extra``: further top-level entries (e.g. the ``discriminator`` training continues against).

    Plain tensors and containers only, so it loads with torch.load(weights_only=True).
    """
    from dataclasses import asdict

    from mfim import __version__
    from mfim.training.checkpoint import atomic_torch_save

    cfg = asdict(model.encoder.cfg)
    cfg["style_map_resolutions"] = list(cfg["style_map_resolutions"])
    if cfg.get("refine_map_resolutions") is not None:
        cfg["refine_map_resolutions"] = list(cfg["refine_map_resolutions"])
    state = {
        "format": SWAPPER_FORMAT,
        "version": __version__,
        "generator": {"config": model.generator.config, "state_dict": model.generator.state_dict()},
        "encoder_config": cfg,
        "encoder": encoder_state if encoder_state is not None else model.encoder.state_dict(),
        "coarse_max_res": model.coarse_max_res,
        "mix_global_res": list(model.mix_global_res),
        "noise_mode": model.noise_mode,
        "source_torgb_max_res": model.source_torgb_max_res,
        "meta": meta or {},
    }
    clash = set(extra or {}) & set(state)
    if clash:
        raise ValueError(f"save_swapper: extra entries {sorted(clash)} would replace the swapper's own")
    return atomic_torch_save({**state, **(extra or {})}, path)


def load_swapper(path, device="cpu") -> tuple[MFIM, dict]:
    """The swapper in ``path``; any problem with the file (unreadable, truncated, refused pickle, wrong kind, weights
    that do not fit the recorded config) is one ``CheckpointError`` naming the file."""
    from mfim.assets.store import warn_if_not_as_recorded
    from mfim.weights import CheckpointError

    warn_if_not_as_recorded(path)
    try:
        return _load_swapper(path, device)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, AttributeError,
            pickle.UnpicklingError, zipfile.BadZipFile) as e:
        if isinstance(e, pickle.UnpicklingError):
            from mfim.weights.limits import refused_pickle_reason

            raise CheckpointError(f"{path}: cannot load as an MFIM swapper ({refused_pickle_reason(e)})") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if isinstance(e, RuntimeError) and "cuda" in first.lower():
            raise CheckpointError(f"{path}: the device asked for is not available here ({first})") from None
        raise CheckpointError(f"{path}: cannot load as an MFIM swapper ({type(e).__name__}: {first})") from e


def _load_swapper(path, device="cpu") -> tuple[MFIM, dict]:
    from mfim.weights.limits import CheckpointError, validate_encoder_config, validate_network_config
    from mfim.models.stylegan2 import Generator

    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != SWAPPER_FORMAT:
        raise CheckpointError(f"{path}: not an MFIM swapper checkpoint (expected format {SWAPPER_FORMAT!r})")
    gen = state.get("generator")
    if not isinstance(gen, dict) or not isinstance(gen.get("state_dict"), dict):
        raise CheckpointError(f"{path}: swapper without generator config and weights")
    # The config comes from the file: bound it (and check the weights hold what it needs) before allocating.
    config = validate_network_config("generator", gen.get("config"), str(path), gen["state_dict"])
    G = Generator(**config)
    G.load_state_dict(gen["state_dict"])
    cfg = {**ENCODER_CONFIG_BEFORE_KEY, **validate_encoder_config(state["encoder_config"], str(path), G.resolution)}
    cfg["style_map_resolutions"] = tuple(cfg["style_map_resolutions"])
    if cfg.get("refine_map_resolutions") is not None:
        cfg["refine_map_resolutions"] = tuple(cfg["refine_map_resolutions"])
    model = MFIM(
        G.to(device),
        EncoderConfig(**cfg),
        coarse_max_res=state["coarse_max_res"],
        mix_global_res=tuple(state["mix_global_res"]),
        noise_mode=state["noise_mode"],
        source_torgb_max_res=int(state.get("source_torgb_max_res", SWAPPER_BEFORE_KEY["source_torgb_max_res"])),
    )
    model.encoder.load_state_dict(state["encoder"])
    from mfim.weights.limits import refuse_non_finite

    refuse_non_finite(model, str(path))
    return model.to(device).eval(), state.get("meta", {})
