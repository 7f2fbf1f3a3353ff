"""The full MFIM objective, eq. (6):

    L = λ_id L_id + λ_recon (L1 + LPIPS) + λ_adv L_adv + λ_R1 L_R1 + λ_shape L_shape + λ_pose L_pose + λ_exp L_exp

λ_recon is split into λ_l1 and λ_lpips (pSp's l2_lambda / lpips_lambda). A term whose λ is 0 is not computed at all,
so it contributes exactly no gradient (and costs nothing). The discriminator sees the target images as real and the
swaps (resized to the target's size) as fake.

Not in the paper: ``background_l1`` (λ, default 0), an L1 outside the face region on pairs of different people
(mfim.criteria.recon_loss.BackgroundL1), for when ``recon_cross_identity`` < 1 leaves their hair and background
unsupervised; ``gt_swap`` (λ, default 0), L1 + LPIPS against the exact swap where the batch has one (rendered
triples of the synthetic protocol, mfim.data.gt_swaps).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
from torch import nn

from mfim.criteria.adv_loss import discriminator_loss, generator_loss, r1_penalty
from mfim.criteria.recon_loss import BackgroundL1, match_size
from mfim.nets.face_crops import resize_points
from mfim.nets.threedmm import encode


@dataclass(frozen=True)
class LossWeights:
    """The eq. (6) weights of params.yaml's ``loss`` group (their values live in params.yaml only)."""

    id: float
    l1: float
    lpips: float
    adv: float
    r1: float
    r1_every: int
    shape: float
    pose: float
    exp: float
    # L1 + LPIPS weight of pairs of *different* people relative to same-identity pairs. 1.0 is eq. (2) as written
    # (every pair); below 1 the pixel terms pull less towards the target's face where the ID loss pulls away.
    recon_cross_identity: float
    # L1 outside the face on pairs of different people: hair and background come from the target whatever the
    # source, so this pixel pull does not fight the ID loss the way full-image L1/LPIPS on a cross pair does.
    background_l1: float
    # L1 + LPIPS against the ground-truth swap on the batch rows that have one (synthetic data: mfim.data.gt_swaps)
    gt_swap: float

    @staticmethod
    def from_params(loss: dict) -> "LossWeights":
        """From the validated ``loss`` group (mfim.params_schema): its other keys configure the loss networks."""
        return LossWeights(**{f.name: (int if f.name == "r1_every" else float)(loss[f.name])
                              for f in fields(LossWeights)})

    @property
    def threedmm_terms(self) -> tuple[str, ...]:
        return tuple(t for t in ("shape", "pose", "exp") if getattr(self, t) > 0)


# eq. (6) terms of the encoder update, plus our optional background L1 on cross pairs and ground-truth swap term
ENCODER_TERMS = ("id", "l1", "lpips", "background_l1", "gt_swap", "adv", "shape", "pose", "exp")


def loss_shares(terms: dict[str, float], weights: LossWeights) -> dict[str, float]:
    """Each encoder term's share of the weighted total, ``loss_share/<term>`` (sums to 1): what dominates eq. (6),
    e.g. raw FLAME terms that outweigh every other term (issue 13). The discriminator's terms are not part of it."""
    weighted = {k: getattr(weights, k) * float(terms[k]) for k in ENCODER_TERMS if k in terms}
    total = sum(weighted.values())
    return {f"loss_share/{k}": v / total for k, v in weighted.items()} if total > 0 else {}


@contextlib.contextmanager
def fp32_targets(x: torch.Tensor):
    """No-grad targets of the frozen loss networks (R(x_src), 3DMM of source and target) in float32 even inside the
    trainer's bf16 autocast: they are constants of the step, and bf16's 8-bit mantissa would add noise of ~0.4 % of
    each parameter to L_shape / L_exp for nothing (only the swap's branch needs to be fast and differentiable)."""
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        yield


class MFIMObjective(nn.Module):
    """Holds the frozen loss networks and the discriminator; computes the generator-side and D-side terms."""

    def __init__(self, weights: LossWeights, id_loss=None, recon=None, threedmm=None, discriminator=None,
                 background=None, gt_swap_region: str = "image", gt_swap_id_target: bool = False):
        super().__init__()
        self.w = weights
        self.background = background if background is not None or weights.background_l1 <= 0 else BackgroundL1()
        if gt_swap_region not in ("image", "face"):
            raise ValueError(f"loss.gt_swap_region must be 'image' or 'face', not {gt_swap_region!r}")
        # face: the swap's pixels outside the (dilated) template face are replaced by the ground truth's before
        # L1 + LPIPS, so the term asks only for the face, not for the scene the other terms already reconstruct
        self.gt_face = BackgroundL1() if gt_swap_region == "face" else None
        # rows with a ground-truth swap: L_id compares the swap with R(truth), the source's identity in the target's
        # pose and light, instead of R(x_src) in the source's own
        self.gt_swap_id_target = bool(gt_swap_id_target)
        self.id_loss = id_loss
        self.recon = recon
        self.threedmm = threedmm
        self.discriminator = discriminator
        if weights.id > 0 and id_loss is None:
            raise ValueError("loss.id > 0 needs an ID loss network")
        if weights.threedmm_terms and threedmm is None:
            raise ValueError("3DMM loss weights > 0 need a 3DMM encoder")
        if weights.adv > 0 and discriminator is None:
            raise ValueError("loss.adv > 0 needs a discriminator")

    def encoder_terms(self, x_swap: torch.Tensor, x_src: torch.Tensor, x_tgt: torch.Tensor,
                      same_identity: torch.Tensor | None = None, gt: torch.Tensor | None = None,
                      has_gt: torch.Tensor | None = None, src_landmarks=None, tgt_landmarks=None):
        """(weighted total, {term: unweighted value}) for the encoder update. ``same_identity`` (B bool) is needed
        only when ``recon_cross_identity`` != 1; ``gt`` (B×3×H×W) and ``has_gt`` (B bool: which rows' ``gt`` is
        real) only for ``gt_swap``, whose term is absent from a batch without such rows. ``src_landmarks`` /
        ``tgt_landmarks`` (B×68×2 pixel indices of x_src / x_tgt, NaN rows unknown) place the crop of a 3DMM encoder
        that crops from landmarks (DECA); the swap, in the target's pose, is cropped with the target's."""
        w, terms = self.w, {}
        with_truth = gt is not None and has_gt is not None and bool(has_gt.any())
        if with_truth:
            gt, has_gt = gt.to(x_swap.device), has_gt.to(x_swap.device)
        if w.id > 0:
            with fp32_targets(x_src):
                src_embedding = self.id_loss.embedder(x_src.float())
                if self.gt_swap_id_target and with_truth:
                    src_embedding[has_gt] = self.id_loss.embedder(gt[has_gt].float())
            terms["id"] = self.id_loss(x_swap, x_src, src_embedding=src_embedding)
        if w.l1 > 0 or w.lpips > 0:
            pair_weight = None
            if w.recon_cross_identity != 1.0:
                if same_identity is None:
                    raise ValueError("loss.recon_cross_identity != 1 needs the batch's same_identity flags")
                same = same_identity.to(x_swap.device).float()
                pair_weight = same + (1.0 - same) * w.recon_cross_identity
            rec = self.recon(x_swap, x_tgt, pair_weight)
            if w.l1 > 0:
                terms["l1"] = rec["l1"]
            if w.lpips > 0:
                terms["lpips"] = rec["lpips"]
        if w.background_l1 > 0:
            if same_identity is None:
                raise ValueError("loss.background_l1 > 0 needs the batch's same_identity flags")
            cross = 1.0 - same_identity.to(x_swap.device).float()
            if cross.sum() > 0:
                terms["background_l1"] = self.background(x_swap, x_tgt, cross)
        if w.gt_swap > 0 and with_truth:
            x = match_size(x_swap, gt)
            if self.gt_face is not None:
                outside = self.gt_face.background(x.shape[-1], x.device, x.dtype)
                x = x * (1 - outside) + gt * outside
            rec = self.recon(x, gt, has_gt.float())
            terms["gt_swap"] = rec["l1"] + rec.get("lpips", 0.0)  # eq. (2)'s form, against the exact swap
        if w.adv > 0:
            terms["adv"] = generator_loss(self.discriminator(match_size(x_swap, x_tgt)))
        wanted = w.threedmm_terms
        if wanted:
            enc = self.threedmm.encoder
            with fp32_targets(x_src):
                src = encode(enc, x_src.float(), src_landmarks) if "shape" in wanted else None
                tgt = encode(enc, x_tgt.float(), tgt_landmarks) if ("pose" in wanted or "exp" in wanted) else None
            swap_landmarks = None
            if tgt_landmarks is not None:
                swap_landmarks = resize_points(tgt_landmarks, x_tgt.shape[-1], x_swap.shape[-1])
            terms.update(self.threedmm(x_swap, src if src is not None else tgt, tgt if tgt is not None else src, wanted,
                                       landmarks=swap_landmarks))
        total = sum(getattr(w, k) * v for k, v in terms.items())
        return total, terms

    def discriminator_terms(self, x_real: torch.Tensor, x_fake: torch.Tensor, with_r1: bool, discriminator=None):
        """Non-saturating D loss; lazy R1 every ``r1_every`` steps, scaled by r1_every as in StyleGAN2.
        ``discriminator``: what to call instead of ``self.discriminator`` (its DistributedDataParallel wrapper)."""
        D = discriminator if discriminator is not None else self.discriminator
        terms = {}
        fake = match_size(x_fake.detach(), x_real)
        if self.w.adv > 0:
            terms["d_adv"] = discriminator_loss(D(x_real), D(fake))
        total = terms.get("d_adv", torch.zeros((), device=x_real.device))
        if with_r1 and self.w.r1 > 0:
            real = x_real.detach().requires_grad_(True)
            terms["r1"] = r1_penalty(real, D(real))
            total = total + self.w.r1 * 0.5 * self.w.r1_every * terms["r1"]
        return total, terms
