"""Fitting the 3DMM regressor (mfim.nets.threedmm_regressor): the ``fit_regressor`` stage's training loop, its
data (shard images joined with the 3DMM table, or an aligned render set) and its report.

The network, its checkpoint format and its loading stay in mfim.nets.threedmm_regressor (a frozen auxiliary network
like the others there); this module is the one that trains it.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mfim.assets.store import sha256_file
from mfim.data.augment import FaceAugment
from mfim.data.shards import iter_samples
from mfim.data.threedmm_table import COLUMN_SETS, GROUPS, group_errors, has_ground_truth, read_table, stack_column
from mfim.nets.threedmm_regressor import (
    RegressorConfig,
    ThreeDMMRegressor,
    frozen_regressor,
    init_from_tddfa,
    read_regressor_checkpoint,
    save_regressor,
)
from mfim.runtime import LoaderWorkerInit, pick_device

# Where FitConfig.shape_tail_weight starts: the leading shape coefficients the 64 px default's L_shape reads (its
# loss.shape_coefficients). Not a params key: it matters only with shape_tail_weight != 1, which no config uses now.
SHAPE_LEAD = 10


@dataclass
class FitConfig:
    """How a 3DMM regressor is fitted: ``threedmm.<group>`` (:meth:`from_params`, the one place it is read)."""

    epochs: int
    batch_size: int
    lr: float
    val_fraction: float
    seed: int
    # weight of the shape coefficients after the first ``shape_lead`` in the loss (1: every coefficient alike). The
    # later BFM coefficients change a 64 px face by a pixel or less and L_shape reads only the leading ones
    # (loss.shape_coefficients), so fitting them at full weight spends the network on noise
    shape_tail_weight: float
    # weights of the (shape, expression, pose) groups in the loss (each group's error is a mean over its
    # coefficients). Equal in params.yaml; a fine-tune can lean on the group that lags (the loss network's expression)
    group_weights: tuple[float, float, float]
    # processes that augment the next batches while the network fits (torch DataLoader workers; 0: in-process).
    # Worth it on an accelerator, where albumentations on one core is the bottleneck; the batches are the same
    # for any number (each image's augmentation is seeded by (seed, epoch, row)).
    workers: int
    device: str  # where the network fits ("cuda" on a GPU machine); the saved checkpoint is CPU tensors
    augment: bool  # not a params key: the pipeline's fits always augment (tests switch it off)
    shape_lead: int  # where shape_tail_weight starts (SHAPE_LEAD)

    @classmethod
    def from_params(cls, params: dict, group: str) -> "FitConfig":
        """``threedmm.<group>`` of ``params``, on ``project.device``. The evaluator has a seed of its own (other
        people, network and seed than the loss network); the loss network's is ``project.seed``."""
        r = params["threedmm"][group]
        return cls(epochs=int(r["epochs"]), batch_size=int(r["batch_size"]),
                   lr=float(r["lr"]), val_fraction=float(r["val_fraction"]),
                   seed=int(r["seed"] if group == "evaluator" else params["project"]["seed"]),
                   shape_tail_weight=float(r["shape_tail_weight"]),
                   group_weights=tuple(float(w) for w in r["group_weights"]), workers=int(r["workers"]),
                   device=str(pick_device(str(params["project"]["device"]))), augment=True, shape_lead=SHAPE_LEAD)


def regressor_config(params: dict, group: str) -> RegressorConfig:
    """The network ``threedmm.<group>`` fits (the checkpoint's own config wins when a fit continues one)."""
    r = params["threedmm"][group]
    return RegressorConfig(input_size=int(r["input_size"]), width=int(r["width"]), backbone=str(r["backbone"]))


def split_by_group(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/val row indices; rows with a known group (identity >= 0) are split by group, so validation measures
    unseen identities; unknown ones are split by row."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    val = np.zeros(len(groups), bool)
    known = np.unique(groups[groups >= 0])
    if len(known) >= 2:
        n_val = max(1, int(round(val_fraction * len(known))))
        val |= np.isin(groups, rng.choice(known, n_val, replace=False))
    unknown = np.flatnonzero(groups < 0)
    if len(unknown):
        val[rng.choice(unknown, max(1, int(round(val_fraction * len(unknown)))), replace=False)] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


def _to_input(images, device: str | torch.device = "cpu") -> torch.Tensor:
    """N×H×W×3 uint8 (numpy or tensor) -> N×3×H×W float in [-1, 1] on ``device`` (converted there: 4× less to move)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


class _AugmentedRows(torch.utils.data.Dataset):
    """Row ``(epoch, i)`` of ``images``, photometrically augmented with a generator seeded by (seed, epoch, i): the
    same pixels whichever worker process, batch or order asks for it."""

    def __init__(self, images: np.ndarray, augment, seed: int):
        self.images, self.augment, self.seed = images, augment, int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> torch.Tensor:
        epoch, i = key
        image = self.images[i]
        if self.augment is not None:
            image = self.augment(image, np.random.default_rng((self.seed, epoch, i))).image
        return torch.from_numpy(np.ascontiguousarray(image))


def _epoch_batches(rows: _AugmentedRows, order: np.ndarray, epoch: int, batch_size: int, workers: int):
    """uint8 B×H×W×3 batches of ``rows`` in ``order``; ``workers`` > 0 augments them in forked worker processes
    (fork: the image array is shared, not pickled to each worker)."""
    keys = [(epoch, int(i)) for i in order]
    batches = [keys[b : b + batch_size] for b in range(0, len(keys), batch_size)]
    extra = {}
    if workers > 0:
        extra = {"num_workers": workers, "multiprocessing_context": multiprocessing.get_context("fork"),
                 "worker_init_fn": LoaderWorkerInit()}
    return torch.utils.data.DataLoader(rows, batch_sampler=batches, pin_memory=False, **extra)


@torch.no_grad()
def predict(model: ThreeDMMRegressor, images: np.ndarray, batch_size: int = 256,
            device: str | torch.device | None = None) -> dict:
    """N×H×W×3 uint8 -> {'shape', 'exp', 'pose'} numpy arrays in BFM units (on the model's device by default)."""
    model.eval()
    device = device or next(model.parameters()).device
    outs = [model(_to_input(images[i : i + batch_size], device)) for i in range(0, len(images), batch_size)]
    return {name: torch.cat([getattr(o, name) for o in outs]).cpu().numpy() for name in ("shape", "exp", "pose")}


def _starting_model(model_config: RegressorConfig, y_train: torch.Tensor,
                    init: ThreeDMMRegressor | None) -> ThreeDMMRegressor:
    """``init``'s weights and normalisation (a fine-tune), else this set's mean/std and, for ``mobilenet_v1``,
    3DDFA_V2's weights."""
    if init is not None:
        if asdict(init.config) != asdict(model_config):
            raise ValueError(f"init regressor's config {asdict(init.config)} differs from {asdict(model_config)}")
        model = ThreeDMMRegressor(model_config, init.mean.detach().cpu(), init.std.detach().cpu())
        model.load_state_dict(init.state_dict())
        return model
    model = ThreeDMMRegressor(model_config, y_train.mean(0), y_train.std(0).clamp_min(1e-6))
    if model_config.backbone == "mobilenet_v1":
        init_from_tddfa(model)
    return model


def _group_loss(c: RegressorConfig, fit: FitConfig, device):
    """loss(pred, target), both B×n_out normalised: the groups' (weighted) mean squared errors, mixed by
    ``fit.group_weights``."""
    bounds = [(0, c.n_shape), (c.n_shape, c.n_shape + c.n_exp), (c.n_shape + c.n_exp, c.n_out)]
    weight = torch.ones(c.n_out, device=device)
    weight[min(fit.shape_lead, c.n_shape) : c.n_shape] = fit.shape_tail_weight

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if fit.shape_tail_weight == 1.0:
            per_group = [F.mse_loss(pred[:, lo:hi], target[:, lo:hi]) for lo, hi in bounds]
        else:  # the same, each group a weighted mean
            err = (pred - target).pow(2) * weight
            per_group = [err[:, lo:hi].sum(1).mean() / weight[lo:hi].sum() for lo, hi in bounds]
        return sum(w * g for w, g in zip(fit.group_weights, per_group)) / sum(fit.group_weights)

    return loss


def fit_regressor(images: np.ndarray, targets: dict, groups: np.ndarray, model_config: RegressorConfig,
                  fit: FitConfig, log=print, val: dict | None = None,
                  init: ThreeDMMRegressor | None = None,
                  step_hook: Callable[[int, float], bool] | None = None) -> tuple[ThreeDMMRegressor, dict]:
    """Fit on N×H×W×3 uint8 ``images`` (already at ``input_size``) and ``targets`` {'shape','exp','pose'} (N×D).

    Loss: mean over the three groups of the MSE of std-normalised parameters, so 3 pose angles weigh as much as 40
    shape coefficients (within the shape group, coefficients after ``fit.shape_lead`` weigh ``shape_tail_weight``).
    A ``mobilenet_v1`` backbone starts from 3DDFA_V2's weights (:func:`init_from_tddfa`). Validation: held-out
    identities of ``groups`` (``fit.val_fraction``), or, when ``val`` is given ({'images', 'shape', 'exp', 'pose'}:
    a set of other people), that set, and every row trains. Returns the model (eval mode, on the CPU) and a report
    with the validation error per group, the error of predicting the training mean (the baseline to beat) and the
    loss curve. ``init``: a fitted regressor of the same config to continue from (a fine-tune): its weights and its
    normalisation (mean and std of the set it was first fitted on) instead of this set's and 3DDFA_V2's.
    ``step_hook(step, loss)`` after each optimiser step; a True return ends the fit there (a check of the first
    steps of a long fit, mfim.ship.check).
    """
    t0 = time.time()
    device = torch.device(fit.device)
    torch.manual_seed(fit.seed)
    y_all = np.concatenate([targets["shape"], targets["exp"], targets["pose"]], axis=1).astype(np.float32)
    if val is None:
        train_idx, val_idx = split_by_group(groups, fit.val_fraction, fit.seed)
        val_images = images[val_idx]
        gt_val = {k: np.asarray(targets[k])[val_idx] for k in ("shape", "exp", "pose")}
    else:
        train_idx = np.arange(len(images))
        val_images = val["images"]
        gt_val = {k: np.asarray(val[k]) for k in ("shape", "exp", "pose")}
    model = _starting_model(model_config, torch.from_numpy(y_all[train_idx]), init).to(device)
    mean, std = model.mean.cpu(), model.std.cpu()
    loss_of = _group_loss(model_config, fit, device)
    opt = torch.optim.AdamW(model.parameters(), lr=fit.lr, weight_decay=1e-4)
    steps = fit.epochs * math.ceil(len(train_idx) / fit.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=fit.lr, total_steps=max(steps, 1), pct_start=0.15)
    rows = _AugmentedRows(images, FaceAugment() if fit.augment else None, fit.seed)  # photometric: labels stay true
    rng = np.random.default_rng(fit.seed)
    y_norm = ((torch.from_numpy(y_all) - mean) / std).to(device)
    curve = []
    done_steps, stop = 0, False
    for epoch in range(fit.epochs):
        if stop:
            break
        model.train()
        order = train_idx[rng.permutation(len(train_idx))]
        total = torch.zeros((), device=device)
        for batch, start in zip(_epoch_batches(rows, order, epoch, fit.batch_size, fit.workers),
                                range(0, len(order), fit.batch_size)):
            sel = torch.from_numpy(order[start : start + fit.batch_size]).to(device)
            if len(sel) < 2:  # BatchNorm needs two samples
                continue
            loss = loss_of(model.forward_normalized(_to_input(batch, device)), y_norm[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(sel)
            done_steps += 1
            if step_hook is not None and step_hook(done_steps, float(loss.detach())):
                stop = True
                break
        curve.append(float(total) / len(train_idx))
        log(f"regressor epoch {epoch + 1}/{fit.epochs}: train loss {curve[-1]:.4f} ({time.time() - t0:.0f} s)")
    model.freeze()
    report = {
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_images)),
        "val_split": ("a render set of other identities" if val is not None else
                      "held-out identities" if (np.asarray(groups) >= 0).any() else "held-out images"),
        "val_error": group_errors(predict(model, val_images), gt_val),
        "val_error_predict_mean": group_errors(
            {k: np.broadcast_to(np.asarray(targets[k])[train_idx].mean(0), gt_val[k].shape) for k in gt_val}, gt_val),
        "train_loss": [round(v, 5) for v in curve],
        "seconds": round(time.time() - t0, 1),
    }
    return model.cpu(), report


def load_training_data(pattern: str, table_path: str | Path, target: str, input_size: int):
    """Shard images at ``input_size`` joined by key with the table's targets: (images, targets, identities, keys).

    ``target``: 'ground_truth' (synthetic data) or 'estimate' (distillation of the table's encoder).
    """
    if target not in COLUMN_SETS:
        raise ValueError(f"threedmm.regressor.target must be one of {sorted(COLUMN_SETS)}, got {target!r}")
    table = read_table(table_path).set_index("key", drop=False)
    if target == "ground_truth" and not has_ground_truth(table):
        raise ValueError("threedmm.regressor.target=ground_truth needs ground truth in the 3DMM table (the synthetic "
                         "set); for real photos use target: estimate (distils the DECA/3DDFA_V2 estimates)")
    images, keys = [], []
    for s in iter_samples(pattern, resolution=input_size):
        if s.key in table.index:  # samples the precompute could not read are not in the table
            images.append(s.image)
            keys.append(s.key)
    rows = table.loc[keys]
    targets = {name: stack_column(rows, col) for name, col in zip(GROUPS, COLUMN_SETS[target])}
    return np.stack(images), targets, rows["identity"].to_numpy(np.int64), keys


def eval_split_error(model: ThreeDMMRegressor, eval_pattern: str, table_path: str | Path, target: str) -> dict:
    """The model's error per parameter group on the eval shards (the swapper's evaluation identities)."""
    images, targets, _, _ = load_training_data(eval_pattern, table_path, target, model.config.input_size)
    return group_errors(predict(model, images), targets)


def fit_from_table(train_pattern: str, table_path: str | Path, out_path: str | Path, target: str,
                   model_config: RegressorConfig, fit: FitConfig, eval_pattern: str | None = None, log=print) -> dict:
    """Fit on the train split, report validation error (held-out train identities) and, when given, the error on
    the eval split (identities never used for fitting), save the checkpoint; returns the report."""
    images, targets, identities, _ = load_training_data(train_pattern, table_path, target, model_config.input_size)
    # the head is as wide as the table's 3DMM (distilling DECA: FLAME's 100 / 50; BFM: 40 / 10)
    model_config = replace(model_config, n_shape=int(targets["shape"].shape[1]), n_exp=int(targets["exp"].shape[1]))
    log(f"regressor: {len(images)} images, target {target}, {len(np.unique(identities[identities >= 0]))} identities")
    model, report = fit_regressor(images, targets, identities, model_config, fit, log)
    if eval_pattern is not None:
        report["eval_split_error"] = eval_split_error(model, eval_pattern, table_path, target)
    report.update(target=target, config=asdict(model_config), fit=asdict(fit))
    save_regressor(model, out_path, target, report["val_error"],
                   extra={"eval_split_error": report.get("eval_split_error")})
    return report


def fit_from_render_set(render: dict, out_path: str | Path, model_config: RegressorConfig, fit: FitConfig,
                        eval_pattern: str | None = None, table_path: str | Path | None = None, log=print) -> dict:
    """Fit on an aligned render set (mfim.data.regressor_set: exact ground truth, disjoint identities), validate on
    held-out identities of the set and, when given, on the eval shards (the swapper's evaluation identities)."""
    targets = {k: render[k] for k in ("shape", "exp", "pose")}
    log(f"regressor: {len(render['images'])} rendered images, {len(np.unique(render['identity']))} identities")
    model, report = fit_regressor(render["images"], targets, render["identity"], model_config, fit, log)
    if eval_pattern is not None and table_path is not None:
        report["eval_split_error"] = eval_split_error(model, eval_pattern, table_path, "ground_truth")
    report.update(target="ground_truth", training_set="render set", config=asdict(model_config), fit=asdict(fit))
    save_regressor(model, out_path, "ground_truth", report["val_error"],
                   extra={"eval_split_error": report.get("eval_split_error")})
    return report


def use_shipped_regressor(shipped: str | Path, out_path: str | Path, model_config: RegressorConfig,
                          eval_pattern: str | None = None, table_path: str | Path | None = None, log=print,
                          group: str = "regressor") -> dict:
    """A regressor fitted elsewhere (checkpoints/ ships one fitted on a GPU machine on ~22,000 render-set people,
    docs/EXPERIMENTS.md §18) used as is: checked (format, and the input size the stage asks for), measured on the
    eval shards like a fit made here, written to ``out_path`` with that error. Its recipe and the validation error it
    was fitted with travel in the file; the report carries them, with the file's sha256."""
    shipped = Path(shipped)
    if not shipped.is_file():
        raise FileNotFoundError(f"threedmm.{group}.shipped_checkpoint: {shipped} not found (the repository ships "
                                "it under checkpoints/; set the key to \"\" to fit the regressor here instead)")
    ckpt = read_regressor_checkpoint(shipped)
    model = frozen_regressor(ckpt)
    if model.config.input_size != model_config.input_size:
        raise ValueError(f"{shipped}: fitted at input_size {model.config.input_size}, the stage asks for "
                         f"{model_config.input_size} (threedmm.{group}.input_size)")
    try:
        recipe = json.loads(ckpt.get("recipe", "{}"))
        if not isinstance(recipe, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{shipped}: its 'recipe' entry is not the JSON object a shipped fit records ({e})") from None
    report = {"val_error": ckpt["val_error"], "train_loss": recipe.get("train_loss", []),
              "seconds": recipe.get("seconds", 0.0), "shipped_checkpoint": str(shipped),
              "sha256": sha256_file(shipped), "recipe": recipe, "target": ckpt["target"],
              "training_set": "render set (shipped fit)", "config": asdict(model.config)}
    if eval_pattern is not None and table_path is not None:
        report["eval_split_error"] = eval_split_error(model, eval_pattern, table_path, "ground_truth")
    log(f"regressor: shipped fit {shipped} (sha256 {report['sha256'][:12]}...)")
    save_regressor(model, out_path, ckpt["target"], ckpt["val_error"],
                   extra={"eval_split_error": report.get("eval_split_error"), "recipe": ckpt.get("recipe", "{}"),
                          "shipped_sha256": report["sha256"]})
    return report
