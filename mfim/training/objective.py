"""The full MFIM objective, eq. (6) of the paper, and what this implementation adds to it, kept apart.

    L = λ_id L_id + λ_recon L_recon + λ_adv L_adv + λ_R1 L_R1 + λ_shape L_shape + λ_pose L_pose + λ_exp L_exp

Where each equation lives: eq. (1) L_id in mfim.criteria.id_loss, eq. (2) L_recon in mfim.criteria.recon_loss, eqs.
(3)-(5) in mfim.criteria.threedmm_loss, L_adv and L_R1 in mfim.criteria.adv_loss, eq. (6) in ``weighted_total``
(the encoder's update) and ``MFIMObjective.discriminator_terms`` (λ_R1 L_R1, D's update). λ_recon is split into λ_l1
and λ_lpips (pSp's l2_lambda / lpips_lambda). A term whose λ is 0 is not computed at all, so it contributes exactly
no gradient (and costs nothing). The discriminator sees the target images as real and the swaps (resized to the
target's size) as fake.

Not in the paper (docs/DEVIATIONS.md#additions-to-the-objective), each in the section below the marker in
``MFIMObjective``: the EXTRA_TERMS ``background_l1`` (an L1 outside the face region on pairs of different people,
mfim.criteria.recon_loss.BackgroundL1) and ``gt_swap`` (L1 + LPIPS against the exact swap where the batch has one,
mfim.data.gt_swaps), both λ 0 by default; ``recon_cross_identity`` (eq. (2)'s weight on pairs of different people,
1 by default = eq. (2) as written); ``gt_swap_id_target`` (L_id against R(ground-truth swap) on its rows, off).
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


# eq. (6)'s terms of the encoder update (λ_R1 L_R1 regularises D: MFIMObjective.discriminator_terms)
PAPER_TERMS = ("id", "l1", "lpips", "adv", "shape", "pose", "exp")
# not in the paper (docs/DEVIATIONS.md#additions-to-the-objective); λ 0 by default
EXTRA_TERMS = ("background_l1", "gt_swap")
ENCODER_TERMS = PAPER_TERMS + EXTRA_TERMS
# the order encoder_terms computes them in (the extras right after L_recon's terms): loss_shares sums in it
COMPUTED_ORDER = ("id", "l1", "lpips", *EXTRA_TERMS, "adv", "shape", "pose", "exp")


def weighted_total(terms: dict[str, torch.Tensor], weights: "LossWeights") -> torch.Tensor:
    """Eq. (6) of the encoder update, Σ λ_k L_k over the terms present (the EXTRA_TERMS among them when their λ > 0),
    summed in the order ``terms`` has them."""
    return sum(getattr(weights, k) * v for k, v in terms.items())


def loss_shares(terms: dict[str, float], weights: LossWeights) -> dict[str, float]:
    """Each encoder term's share of the weighted total, ``loss_share/<term>`` (sums to 1): what dominates eq. (6),
    e.g. raw FLAME terms that outweigh every other term (issue 13). The discriminator's terms are not part of it."""
    weighted = {k: getattr(weights, k) * float(terms[k]) for k in COMPUTED_ORDER if k in terms}
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
        # not in the paper (docs/DEVIATIONS.md#additions-to-the-objective): background_l1's mask, gt_swap's region,
        # gt_swap_id_target
        self.background = background if background is not None or weights.background_l1 <= 0 else BackgroundL1()
        if gt_swap_region not in ("image", "face"):
            raise ValueError(f"loss.gt_swap_region must be 'image' or 'face', not {gt_swap_region!r}")
        # face: the swap's pixels outside the (dilated) template face are replaced by the ground truth's before
        # L1 + LPIPS, so the term asks only for the face, not for the scene the other terms already reconstruct
        self.gt_face = BackgroundL1() if gt_swap_region == "face" else None
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
        truth = self._rows_with_truth(x_swap.device, gt, has_gt)
        if w.id > 0:
            terms["id"] = self._id_term(x_swap, x_src, truth)
        if w.l1 > 0 or w.lpips > 0:
            rec = self.recon(x_swap, x_tgt, self._cross_identity_weight(x_swap.device, same_identity))
            terms.update({k: rec[k] for k in ("l1", "lpips") if getattr(w, k) > 0})
        terms.update(self._extra_terms(x_swap, x_tgt, same_identity, truth))
        if w.adv > 0:
            terms["adv"] = generator_loss(self.discriminator(match_size(x_swap, x_tgt)))
        terms.update(self._threedmm_terms(x_swap, x_src, x_tgt, src_landmarks, tgt_landmarks))
        return weighted_total(terms, w), terms

    def _id_term(self, x_swap: torch.Tensor, x_src: torch.Tensor, truth) -> torch.Tensor:
        """L_id with R(x_src) computed once, in float32 (mfim.criteria.id_loss)."""
        with fp32_targets(x_src):
            src_embedding = self.id_loss.embedder(x_src.float())
            if self.gt_swap_id_target and truth is not None:
                self._truth_as_id_target(src_embedding, *truth)
        return self.id_loss(x_swap, x_src, src_embedding=src_embedding)

    def _threedmm_terms(self, x_swap, x_src, x_tgt, src_landmarks, tgt_landmarks) -> dict[str, torch.Tensor]:
        """L_shape, L_pose, L_exp (mfim.criteria.threedmm_loss) with λ > 0; 3DMM codes of source and target in fp32."""
        wanted = self.w.threedmm_terms
        if not wanted:
            return {}
        enc = self.threedmm.encoder
        with fp32_targets(x_src):
            src = encode(enc, x_src.float(), src_landmarks) if "shape" in wanted else None
            tgt = encode(enc, x_tgt.float(), tgt_landmarks) if ("pose" in wanted or "exp" in wanted) else None
        swap_landmarks = None
        if tgt_landmarks is not None:
            swap_landmarks = resize_points(tgt_landmarks, x_tgt.shape[-1], x_swap.shape[-1])
        return self.threedmm(x_swap, src if src is not None else tgt, tgt if tgt is not None else src, wanted,
                             landmarks=swap_landmarks)

    # --- not in the paper (docs/DEVIATIONS.md#additions-to-the-objective) ---------------------------------------

    @staticmethod
    def _rows_with_truth(device, gt: torch.Tensor | None, has_gt: torch.Tensor | None):
        """(gt, has_gt) on ``device`` when some row of the batch has a ground-truth swap, else None."""
        if gt is None or has_gt is None or not bool(has_gt.any()):
            return None
        return gt.to(device), has_gt.to(device)

    def _truth_as_id_target(self, src_embedding: torch.Tensor, gt: torch.Tensor, has_gt: torch.Tensor) -> None:
        """``gt_swap_id_target``: on rows with a ground-truth swap L_id compares with R(truth), the source's identity
        in the target's pose and light, instead of R(x_src) in the source's own (in place; under fp32_targets)."""
        src_embedding[has_gt] = self.id_loss.embedder(gt[has_gt].float())

    def _cross_identity_weight(self, device, same_identity: torch.Tensor | None) -> torch.Tensor | None:
        """Per-pair weight of L_recon: 1 on same-identity pairs, ``recon_cross_identity`` on the others; None (eq.
        (2) as written, every pair alike) when that is 1."""
        r = self.w.recon_cross_identity
        if r == 1.0:
            return None
        if same_identity is None:
            raise ValueError("loss.recon_cross_identity != 1 needs the batch's same_identity flags")
        same = same_identity.to(device).float()
        return same + (1.0 - same) * r

    def _extra_terms(self, x_swap, x_tgt, same_identity, truth) -> dict[str, torch.Tensor]:
        """The EXTRA_TERMS with λ > 0 that this batch has rows for."""
        w, terms = self.w, {}
        if w.background_l1 > 0:
            if same_identity is None:
                raise ValueError("loss.background_l1 > 0 needs the batch's same_identity flags")
            cross = 1.0 - same_identity.to(x_swap.device).float()
            if cross.sum() > 0:
                terms["background_l1"] = self.background(x_swap, x_tgt, cross)
        if w.gt_swap > 0 and truth is not None:
            terms["gt_swap"] = self._gt_swap_term(x_swap, *truth)
        return terms

    def _gt_swap_term(self, x_swap: torch.Tensor, gt: torch.Tensor, has_gt: torch.Tensor) -> torch.Tensor:
        """L1 + LPIPS (eq. (2)'s form) against the exact swap, on the rows that have one."""
        x = match_size(x_swap, gt)
        if self.gt_face is not None:
            outside = self.gt_face.background(x.shape[-1], x.device, x.dtype)
            x = x * (1 - outside) + gt * outside
        rec = self.recon(x, gt, has_gt.float())
        return rec["l1"] + rec.get("lpips", 0.0)

    # --- the discriminator's update -----------------------------------------------------------------------------

    def discriminator_terms(self, x_real: torch.Tensor, x_fake: torch.Tensor, with_r1: bool, discriminator=None):
        """Non-saturating D loss and eq. (6)'s λ_R1 L_R1: lazy R1 every ``r1_every`` steps, scaled by r1_every as in
        StyleGAN2. ``discriminator``: what to call instead of ``self.discriminator`` (its DistributedDataParallel wrapper)."""
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
