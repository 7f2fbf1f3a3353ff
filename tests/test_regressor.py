"""The fitted 3DMM regressor: learns a known image->parameter function, round-trips, is differentiable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfim.data.regressor_fit import fit_regressor, predict, split_by_group, use_shipped_regressor
from mfim.nets.threedmm_regressor import RegressorConfig, ThreeDMMRegressor, load_fitted_regressor, save_regressor
from mfim.nets.types import ThreeDMMParams
from tests.defaults import fit_config


def known_function_data(n: int = 320, size: int = 16, seed: int = 0):
    """Images of four flat-coloured quadrants; the 53 targets are a fixed linear map of the 12 quadrant colours."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0, 1, (n, 2, 2, 3))
    images = np.repeat(np.repeat(colours, size // 2, 1), size // 2, 2)
    images = (images * 255).round().astype(np.uint8)
    feats = colours.reshape(n, 12) - 0.5
    w = np.random.default_rng(99).normal(size=(12, 53))
    y = feats @ w
    targets = {"shape": 3 * y[:, :40], "exp": y[:, 40:50], "pose": 0.2 * y[:, 50:]}
    groups = np.repeat(np.arange(n // 4), 4)  # "identities" of four images each
    return images, targets, groups


def test_fitting_reduces_validation_error_on_a_known_function():
    images, targets, groups = known_function_data()
    model, report = fit_regressor(images, targets, groups, RegressorConfig(input_size=16, width=8),
                                  fit_config(epochs=10, batch_size=32, lr=3e-3, val_fraction=0.2, augment=False),
                                  log=lambda *_: None)
    assert report["val_split"] == "held-out identities" and report["n_val"] == 64
    assert report["train_loss"][-1] < 0.5 * report["train_loss"][0]
    base, fit = report["val_error_predict_mean"], report["val_error"]
    assert base["shape"]["nrmse"] == pytest.approx(1.0, abs=0.1)
    for group in ("shape", "exp"):
        assert fit[group]["nrmse"] < 0.6 * base[group]["nrmse"]
        assert fit[group]["pearson_r"] > 0.8
    assert fit["pose"]["mae_deg"] < 0.6 * base["pose"]["mae_deg"]


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    images, targets, groups = known_function_data(n=64)
    model, report = fit_regressor(images, targets, groups, RegressorConfig(input_size=32, width=8),
                                  fit_config(epochs=1, batch_size=16, augment=True), log=lambda *_: None)
    path = save_regressor(model, tmp_path / "regressor.pt", "ground_truth", report["val_error"])
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "mfim-threedmm-regressor" and ckpt["config"]["width"] == 8
    assert ckpt["val_error"]["pose"]["mae_deg"] == report["val_error"]["pose"]["mae_deg"]
    loaded = load_fitted_regressor(path)
    x = torch.rand(5, 3, 48, 48) * 2 - 1
    a, b = model(x), loaded(x)
    assert isinstance(b, ThreeDMMParams) and b.shape.shape == (5, 40) and b.exp.shape == (5, 10)
    assert torch.equal(a.shape, b.shape) and torch.equal(a.exp, b.exp) and torch.equal(a.pose, b.pose)
    # de-normalised units: the training mean is what a zero normalised output means
    assert torch.allclose(loaded.denormalize(torch.zeros(1, 53)).shape[0], torch.from_numpy(
        targets["shape"][split_by_group(groups, 0.1, 0)[0]].mean(0)).float(), atol=1e-4)
    p = predict(loaded, images[:3])
    assert np.allclose(p["pose"], model(torch.from_numpy(images[:3]).permute(0, 3, 1, 2).float() / 127.5 - 1)
                       .pose.numpy(), atol=1e-6)


def test_loaded_regressor_stays_in_eval_mode_inside_a_training_parent(tmp_path):
    model = ThreeDMMRegressor(RegressorConfig(input_size=16, width=4))
    model.train()
    model(torch.rand(4, 3, 16, 16))  # moves the BatchNorm running statistics away from their init
    path = save_regressor(model.freeze(), tmp_path / "r.pt", "estimate", {})
    parent = torch.nn.Sequential(load_fitted_regressor(path))
    parent.train()
    assert not parent[0].training and not any(m.training for m in parent[0].modules())
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(parent[0](x).shape[:1], parent[0](x[:1]).shape, atol=1e-5)  # no batch statistics
    assert not any(p.requires_grad for p in parent.parameters())


def test_other_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an MFIM"):
        load_fitted_regressor(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="fit_regressor"):
        load_fitted_regressor(tmp_path / "absent.pt")


def test_a_shipped_fit_is_used_as_is_and_checked(tmp_path):
    import hashlib
    import json

    images, targets, groups = known_function_data(n=64, size=32)
    model, report = fit_regressor(images, targets, groups, RegressorConfig(input_size=32, width=8),
                                  fit_config(epochs=1, batch_size=16, augment=False), log=lambda *_: None)
    shipped = save_regressor(model, tmp_path / "shipped.pt", "ground_truth", report["val_error"],
                             extra={"recipe": json.dumps({"train_loss": [0.9, 0.5], "seconds": 40.5})})
    out = tmp_path / "data" / "regressor.pt"
    rep = use_shipped_regressor(shipped, out, RegressorConfig(input_size=32), log=lambda *_: None)
    assert rep["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert rep["val_error"] == report["val_error"] and rep["train_loss"] == [0.9, 0.5] and rep["seconds"] == 40.5
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    a, b = model(x), load_fitted_regressor(out)(x)
    assert torch.equal(a.shape, b.shape) and torch.equal(a.exp, b.exp) and torch.equal(a.pose, b.pose)
    assert torch.load(out, weights_only=True)["shipped_sha256"] == rep["sha256"]
    with pytest.raises(ValueError, match="input_size 32.*asks for 64"):
        use_shipped_regressor(shipped, out, RegressorConfig(input_size=64), log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="threedmm.evaluator.shipped_checkpoint.*not found"):
        use_shipped_regressor(tmp_path / "absent.pt", out, RegressorConfig(input_size=32), log=lambda *_: None,
                              group="evaluator")
    for recipe in ("{not json", "[1, 2]"):  # our own file, damaged: one clear line, not a JSON traceback
        bad = save_regressor(model, tmp_path / "bad.pt", "ground_truth", report["val_error"], extra={"recipe": recipe})
        with pytest.raises(ValueError, match="bad.pt: its 'recipe' entry is not the JSON object"):
            use_shipped_regressor(bad, out, RegressorConfig(input_size=32), log=lambda *_: None)


def test_differentiable_with_respect_to_the_input_at_any_resolution():
    model = ThreeDMMRegressor(RegressorConfig(input_size=32, width=8)).eval().requires_grad_(False)
    for size in (32, 64, 256):
        x = (torch.rand(2, 3, size, size) * 2 - 1).requires_grad_(True)
        out = model(x)
        (out.shape.square().sum() + out.pose.sum()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_split_by_group_keeps_identities_whole():
    groups = np.repeat(np.arange(20), 5)
    train, val = split_by_group(groups, 0.2, 0)
    assert len(val) == 20 and not set(groups[train]) & set(groups[val])
    unknown = np.full(50, -1)
    train, val = split_by_group(unknown, 0.1, 0)
    assert len(val) == 5 and len(train) == 45


# --- the mobilenet_v1 backbone: 3DDFA_V2's network as plain torch layers, started from its weights ---------------


def test_mobilenet_v1_with_tddfa_weights_matches_the_onnx_file():
    import onnxruntime

    from mfim.assets import resolve
    from mfim.nets.mobilenet_v1 import MobileNetV1, tddfa_state

    net = MobileNetV1()
    net.load_state_dict(tddfa_state())
    x = torch.randn(2, 3, 120, 120, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)
    session = onnxruntime.InferenceSession(str(resolve("tddfa_mb1_onnx")), providers=["CPUExecutionProvider"])
    reference = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(2)])
    with torch.no_grad():
        assert np.abs(net(x).numpy() - reference).max() <= 1e-4


def test_a_regressor_started_from_tddfa_predicts_what_tddfa_predicts(tmp_path, monkeypatch):
    """Before any fitting, the mobilenet_v1 regressor is 3DDFA_V2: same input scaling, and a head that re-expresses
    3DDFA_V2's shape and expression in the regressor's own normalisation (a wrong row or scale shows here), given the
    same roi (the fitted regressors keep the continuous crop they were fitted on; the official network gets its
    whole-pixel one, so the comparison hands 3DDFA_V2 the regressor's crop). Its pose rows start at the training
    mean. Then it round-trips through a checkpoint bit-exactly."""
    from mfim.nets.mobilenet_v1 import fitted_regressor_crop
    from mfim.nets.threedmm import TDDFAEncoder
    from mfim.nets.threedmm_regressor import init_from_tddfa

    monkeypatch.setattr(TDDFAEncoder, "crop", staticmethod(fitted_regressor_crop))

    g = torch.Generator().manual_seed(0)
    # statistics at BFM's scales: shape coefficients ~1e5, expression ~1, pose angles ~0.3
    scale = torch.cat([torch.full((40,), 1e5), torch.ones(10), torch.full((3,), 0.3)])
    mean = torch.randn(53, generator=g) * 0.1 * scale
    std = (torch.rand(53, generator=g) + 0.5) * scale
    model = init_from_tddfa(ThreeDMMRegressor(RegressorConfig(input_size=64, backbone="mobilenet_v1"), mean, std))
    model.freeze()
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ours, theirs = model(x), TDDFAEncoder()(x)
    scale = theirs.shape.abs().max()
    assert (ours.shape - theirs.shape).abs().max() <= 1e-4 * scale
    assert (ours.exp - theirs.exp).abs().max() <= 1e-4 * theirs.exp.abs().max()
    assert torch.allclose(ours.pose, mean[50:].expand(3, 3))
    path = save_regressor(model, tmp_path / "r.pt", "ground_truth", {})
    loaded = load_fitted_regressor(path)
    assert loaded.config.backbone == "mobilenet_v1"
    with torch.no_grad():
        again = loaded(x)
    assert torch.equal(again.shape, ours.shape) and torch.equal(again.exp, ours.exp)


def test_shape_tail_weight_leaves_the_leading_coefficients_to_the_loss():
    """With the tail at weight 0, targets that differ only in the shape coefficients after the leading ten give the
    same fit (the loss does not see them)."""
    images, targets, groups = known_function_data(n=64)
    noisy = dict(targets, shape=targets["shape"].copy())
    noisy["shape"][:, 10:] = np.random.default_rng(5).normal(size=noisy["shape"][:, 10:].shape)
    fit = fit_config(epochs=2, batch_size=16, augment=False, shape_tail_weight=0.0)
    cfg = RegressorConfig(input_size=16, width=4)
    torch.manual_seed(0)
    a, ra = fit_regressor(images, targets, groups, cfg, fit, log=lambda *_: None)
    torch.manual_seed(0)
    b, rb = fit_regressor(images, noisy, groups, cfg, fit, log=lambda *_: None)
    assert ra["train_loss"] == rb["train_loss"]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(a.forward_normalized(x)[:, :10], b.forward_normalized(x)[:, :10], atol=1e-6)


def test_augmenting_in_worker_processes_gives_the_same_fit():
    # each image's augmentation is seeded by (seed, epoch, row): worker processes change where it runs, not what
    images, targets, groups = known_function_data(n=48)
    cfg = RegressorConfig(input_size=16, width=8)
    fits = [fit_regressor(images, targets, groups, cfg, fit_config(epochs=2, batch_size=16, augment=True, workers=w),
                          log=lambda *_: None) for w in (0, 2)]
    (a, ra), (b, rb) = fits
    assert ra["train_loss"] == rb["train_loss"]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    # and the augmentation is on: without it the same seed fits another model
    c, _ = fit_regressor(images, targets, groups, cfg, fit_config(epochs=2, batch_size=16, augment=False),
                         log=lambda *_: None)
    assert not torch.equal(a.head[1].weight, c.head[1].weight)


def test_a_separate_validation_set_is_used_and_every_row_trains():
    images, targets, groups = known_function_data(n=96)
    val = {"images": images[:32], **{k: v[:32] for k, v in targets.items()}}
    model, report = fit_regressor(images[32:], {k: v[32:] for k, v in targets.items()}, groups[32:],
                                  RegressorConfig(input_size=16, width=8), fit_config(epochs=1, batch_size=16,
                                                                                     augment=False),
                                  log=lambda *_: None, val=val)
    assert report["n_train"] == 64 and report["n_val"] == 32
    assert report["val_split"] == "a render set of other identities"
    pred = predict(model, images[:32])
    from mfim.data.threedmm_table import group_errors

    assert report["val_error"] == group_errors(pred, val)


def test_a_group_at_weight_zero_is_not_fitted():
    """group_weights (1, 0, 1): expression targets replaced by noise give the same fit (the loss does not see them),
    while the same noise at weight 1 changes it."""
    images, targets, groups = known_function_data(n=64)
    noisy = dict(targets, exp=np.random.default_rng(6).normal(size=targets["exp"].shape))
    cfg = RegressorConfig(input_size=16, width=4)

    def fit(t, weights):
        torch.manual_seed(0)
        return fit_regressor(images, t, groups, cfg, fit_config(epochs=2, batch_size=16, augment=False,
                                                               group_weights=weights), log=lambda *_: None)[1]

    assert fit(targets, (1.0, 0.0, 1.0))["train_loss"] == fit(noisy, (1.0, 0.0, 1.0))["train_loss"]
    assert fit(targets, (1.0, 1.0, 1.0))["train_loss"] != fit(noisy, (1.0, 1.0, 1.0))["train_loss"]


def test_a_fine_tune_starts_from_the_given_fit_and_keeps_its_normalisation():
    images, targets, groups = known_function_data(n=128)
    cfg = RegressorConfig(input_size=16, width=8)
    first, r1 = fit_regressor(images[:64], {k: v[:64] for k, v in targets.items()}, groups[:64], cfg,
                              fit_config(epochs=3, batch_size=16, lr=3e-3, augment=False), log=lambda *_: None)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    # more people: continuing lowers the training loss below where the first fit started and keeps its mean/std
    second, r2 = fit_regressor(images[64:], {k: v[64:] for k, v in targets.items()}, groups[64:], cfg,
                               fit_config(epochs=3, batch_size=16, lr=1e-3, augment=False), log=lambda *_: None,
                               init=first)
    assert torch.equal(second.mean, first.mean) and torch.equal(second.std, first.std)
    assert r2["train_loss"][0] < r1["train_loss"][0]
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in before.items())  # the start is left as it was
    assert not torch.equal(second.head[1].weight, first.head[1].weight)
    with pytest.raises(ValueError, match="config"):
        fit_regressor(images[64:], {k: v[64:] for k, v in targets.items()}, groups[64:],
                      RegressorConfig(input_size=16, width=4), fit_config(epochs=1), log=lambda *_: None, init=first)


def test_the_fitted_regressor_reads_the_crop_it_was_fitted_on():
    """regressor_synth64.pt was fitted on the continuous canonical roi (the crop before 3DDFA_V2's whole-pixel rule
    was adopted for the official network): its input must stay that crop, which at 64 px sits visibly off the
    whole-pixel one. Known answer: the roi is the square on the canonical 68-landmark box's centre, side its larger
    extent times sqrt(2), mapped onto 120 px."""
    from mfim.nets.face_crops import canonical_landmark_box, warp
    from mfim.nets.mobilenet_v1 import fitted_regressor_crop, tddfa_crop, tddfa_network_input

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0, y0, x1, y1 = canonical_landmark_box(64)
    half = max(x1 - x0, y1 - y0) * np.sqrt(2.0) / 2
    cx, cy, k = (x0 + x1) / 2, (y0 + y1) / 2, 2 * half / 120
    m = np.array([[k, 0, cx - half], [0, k, cy - half]])  # 120 px crop -> the continuous roi
    expected = warp(x, m, 120, fill=-1.0)
    assert torch.allclose(fitted_regressor_crop(x), expected, atol=1e-5)
    model = ThreeDMMRegressor(RegressorConfig(input_size=64, backbone="mobilenet_v1"), torch.zeros(53), torch.ones(53))
    assert torch.equal(model.prepare(x), tddfa_network_input(fitted_regressor_crop(x)))
    assert (tddfa_crop(x) - fitted_regressor_crop(x)).abs().max() > 0.1
