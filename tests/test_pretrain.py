"""StyleGAN2 pretraining: each phase moves its network in the expected direction, the optimiser/EMA constants
follow the official recipe, and the loop's checkpoint round-trips bit-exactly."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_fid.fid_score import calculate_frechet_distance

from mfim.models.stylegan2 import Discriminator, Generator
from mfim.training.pretrain import (
    PretrainConfig,
    StyleGAN2Trainer,
    ema_beta,
    gaussian_stats,
    image_grid,
    lazy_regularization_adam,
    pixel_features,
    pretrain,
    sample_checkpoint,
)
from mfim.weights import load_discriminator, load_generator, read_checkpoint, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (fixture in conftest.py)


def tiny_nets(seed=0):
    torch.manual_seed(seed)
    G = Generator(resolution=16, style_dim=32, n_mlp=2, channel_base=128, channel_max=16)
    D = Discriminator(resolution=16, channel_base=128, channel_max=16)
    return G, D


def fixed_reals(n=4, seed=1):
    """A fixed batch of structured 'real' images: smooth colour blobs, clearly unlike an untrained G's output."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    imgs = []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.2)
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        imgs.append((colour * blob).clamp(-1, 1))
    return torch.stack(imgs)


def cfg(**kw):
    base = dict(batch_size=4, lr=0.002, r1_gamma=0.1, r1_every=4, mixing_prob=0.0, progress=False, seed=0)
    base.update(kw)
    return PretrainConfig.from_dict(base)


def test_official_constants():
    opt = lazy_regularization_adam([torch.nn.Parameter(torch.zeros(1))], 0.002, (0.0, 0.99), 16)
    group = opt.param_groups[0]
    assert math.isclose(group["lr"], 0.002 * 16 / 17)
    assert group["betas"][0] == 0.0 and math.isclose(group["betas"][1], 0.99 ** (16 / 17))
    plain = lazy_regularization_adam([torch.nn.Parameter(torch.zeros(1))], 0.002, (0.0, 0.99), None)
    assert plain.param_groups[0]["lr"] == 0.002 and plain.param_groups[0]["betas"] == (0.0, 0.99)
    assert math.isclose(ema_beta(8, 2.0), 0.5 ** (8 / 2000))
    assert math.isclose(ema_beta(8, 2.0) ** (2000 / 8), 0.5)  # halves every 2 kimg
    assert math.isclose(ema_beta(8, 2.0, images_seen=1000, rampup=0.05), 0.5 ** (8 / 50))
    c = PretrainConfig.from_dict({"iterations": 5, "betas": [0, 0.9], "shipped_checkpoint": "", "unknown": 1})
    assert c.iterations == 5 and c.betas == (0.0, 0.9)


def test_discriminator_steps_separate_real_from_fake():
    G, D = tiny_nets()
    tr = StyleGAN2Trainer(G, D, cfg(lr=0.005))
    real = fixed_reals()
    first = tr.d_main_step(real)
    for _ in range(20):
        last = tr.d_main_step(real)
    assert last["loss_D"] < first["loss_D"] - 0.3
    assert last["score_real"] - last["score_fake"] > first["score_real"] - first["score_fake"] + 0.5


def test_generator_step_lowers_its_loss_against_a_fixed_discriminator():
    G, D = tiny_nets(3)
    tr = StyleGAN2Trainer(G, D, cfg())
    real = fixed_reals()
    for _ in range(10):  # give D something to say first
        tr.d_main_step(real)
    z = torch.randn(8, G.z_dim, generator=torch.Generator().manual_seed(5))
    D_before = {k: v.clone() for k, v in D.state_dict().items()}

    def g_loss():
        with torch.no_grad():
            return F.softplus(-D(G.synthesize(G.styles_from_ws(G.broadcast(G.mapping(z, update_w_avg=False))),
                                              noise_mode="none"))).mean().item()  # fmt: skip

    before = g_loss()
    for _ in range(5):
        tr.g_main_step()
    after = g_loss()
    assert after < before - 0.05
    assert all(torch.equal(D_before[k], v) for k, v in D.state_dict().items())  # the G phase leaves D alone


def test_r1_steps_flatten_the_discriminator_on_reals():
    G, D = tiny_nets(4)
    tr = StyleGAN2Trainer(G, D, cfg(lr=0.005, r1_gamma=10.0, r1_every=1))
    real = fixed_reals()
    for _ in range(20):  # a D that separates reals has large input gradients on them
        tr.d_main_step(real)
    first = tr.d_r1_step(real)["r1_penalty"]
    for _ in range(10):
        last = tr.d_r1_step(real)["r1_penalty"]
    assert last < 0.5 * first


def test_path_length_regularizer_tracks_its_mean():
    G, D = tiny_nets(6)
    tr = StyleGAN2Trainer(G, D, cfg(pl_weight=2.0, pl_every=1, pl_decay=0.5))
    s1 = tr.g_path_length_step()
    s2 = tr.g_path_length_step()
    assert s1["pl_mean"] > 0 and s2["pl_mean"] > s1["pl_mean"]  # moving towards the observed lengths from 0
    assert math.isfinite(s2["pl_penalty"])


def test_ema_update_and_style_mixing():
    G, D = tiny_nets(7)
    tr = StyleGAN2Trainer(G, D, cfg(mixing_prob=1.0, ema_half_life_kimg=0.01))
    ema_before = {k: v.clone() for k, v in tr.G_ema.named_parameters()}
    tr.train_step(fixed_reals())
    beta = ema_beta(4, 0.01)
    for k, p in G.named_parameters():
        expected = p.detach().lerp(ema_before[k], beta)
        assert torch.allclose(dict(tr.G_ema.named_parameters())[k], expected, atol=1e-7), k
    # with mixing the W+ of a batch has two distinct w blocks
    _, ws = tr.run_G(tr.sample_z(2))
    distinct = {tuple(ws[0, i, :3].tolist()) for i in range(G.num_ws)}
    assert len(distinct) == 2


def test_pretrain_loop_checkpoint_round_trips_bit_exactly(tmp_path):
    G, D = tiny_nets(8)
    logged, evals = [], []
    real = fixed_reals()

    def log_fn(step, metrics, artifacts=None):
        logged.append((step, dict(metrics), list(artifacts or [])))

    def eval_fn(G_ema, step):
        evals.append(step)
        return {"fd_pixels": float(step)}

    out = pretrain(G, D, itertools.repeat(real), cfg(iterations=4, sample_every=2, log_every=2, grid_size=4),
                   tmp_path, log_fn=log_fn, eval_fn=eval_fn)  # fmt: skip
    assert out["iterations"] == 4 and out["images_seen"] == 16 and not out["data_exhausted"]
    assert out["img_per_s"] > 0 and {"loss_G", "loss_D", "r1_penalty"} <= set(out["final"])
    assert evals == [0, 2, 4] and out["eval"] == {"fd_pixels": 4.0}
    assert [s for s, m, _ in logged if "loss_D" in m] == [2, 4]
    assert len(out["sample_grids"]) == 3
    json.dumps({k: v for k, v in out.items() if k != "networks"})  # the summary is JSON-able
    # the checkpoint: EMA generator and D bit-exact, raw G in extra, no temp files
    G_ema, D_trained = out["networks"]["G_ema"], out["networks"]["D"]
    G2, D2 = load_generator(out["checkpoint"]), load_discriminator(out["checkpoint"])
    for a, b in ((G_ema, G2), (D_trained, D2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    extra = read_checkpoint(out["checkpoint"]).data["extra"]
    assert all(torch.equal(extra["g"][k], v) for k, v in G.state_dict().items())
    assert extra["iterations"] == 4 and extra["pretrain_config"]["r1_every"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with torch.no_grad():
        z = torch.randn(2, G.z_dim)
        assert torch.equal(G_ema.eval()(z), G2(z))


def test_pretrain_stops_when_data_runs_out(tmp_path):
    G, D = tiny_nets(9)
    out = pretrain(G, D, iter([fixed_reals()] * 2), cfg(iterations=5, sample_every=0), tmp_path)
    assert out["iterations"] == 2 and out["data_exhausted"]


def test_grid_and_frechet_helpers():
    imgs = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    grid = image_grid(imgs)
    assert grid.shape == (2 * 4, 3 * 4, 3) and grid.dtype.name == "uint8"
    assert grid[0, 0, 0] == int((imgs[0, 0, 0, 0] * 127.5 + 128).clamp(0, 255))
    assert (grid[4:, 8:] == 0).all()  # the empty sixth cell
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 3, 16, 16, generator=g)
    b = torch.randn(400, 3, 16, 16, generator=g)
    fa, fb = pixel_features(a, 4), pixel_features(b, 4)
    same = calculate_frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
    shifted = calculate_frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb + 1.0))
    assert same < 2.0 and shifted == pytest.approx(same + 48.0, rel=0.1)  # +1 on 48 features adds ~48


def test_the_one_frechet_distance_has_the_closed_form_of_gaussians():
    """pytorch-fid's distance (what the pretrain stage's fd_pixels8 and FID both use) against known answers: for
    diagonal covariances ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)); for full ones tr sqrt(C1 C2) = the sum of
    the square roots of the eigenvalues of sqrt(C1) C2 sqrt(C1) (a symmetric matrix, so eigh; another path)."""
    rng = np.random.default_rng(0)
    for d in (2, 8, 64):  # (scipy 1.17 returns a 1×1 sqrtm without its error estimate: pytorch-fid needs d > 1)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
        want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
        assert calculate_frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-6, abs=1e-9)
        a, b = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d))
        c1, c2 = a @ a.T / (3 * d), b @ b.T / (3 * d)
        w, v = np.linalg.eigh(c1)
        root1 = (v * np.sqrt(w)) @ v.T
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ c2 @ root1), 0, None)).sum()
        want = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_covmean
        assert calculate_frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_stage_imports_a_given_checkpoint_instead_of_training(tmp_path):
    from mfim.assets import sha256_file
    from mfim.weights import save_checkpoint, write_rosinality_checkpoint
    from pipelines.pretrain_generator import import_checkpoint

    G, D = tiny_nets(10)
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    # an official layout is converted to our format, bit-exact
    src = write_rosinality_checkpoint(tmp_path / "r.pt", G, D)
    out = tmp_path / "gen" / "generator.pt"
    rep = import_checkpoint(str(src), str(out))
    assert rep["mode"] == "imported" and rep["source_format"] == "rosinality" and rep["has_discriminator"]
    raw = read_checkpoint(out)
    assert raw.format == "mfim" and raw.data["extra"]["source_sha256"] == sha256_file(src)
    G2 = load_generator(out)
    assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), G2.state_dict().values()))
    # our own format is copied byte for byte
    ours = save_checkpoint(tmp_path / "ours.pt", G)
    rep = import_checkpoint(str(ours), str(out))
    assert sha256_file(out) == sha256_file(ours) and not rep["has_discriminator"]


def test_sample_checkpoint_grid_is_the_generators_images_for_fixed_seeds(tmp_path):
    from mfim.assets import sha256_file
    from mfim.imageio import read_rgb
    from mfim.provenance import read_record

    G, _ = tiny_nets(3)
    ckpt = save_checkpoint(tmp_path / "g.pt", G)
    a = sample_checkpoint(ckpt, tmp_path / "a" / "imported.png", "cpu", n=6, seed=5)
    b = sample_checkpoint(ckpt, tmp_path / "b.png", "cpu", n=6, seed=5)
    img = read_rgb(a)
    assert img.shape == (2 * 16, 3 * 16, 3) and (img == read_rgb(b)).all()
    z = torch.randn(6, G.z_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = image_grid(torch.cat([G(zi[None], noise_mode="const") for zi in z]))
    def psnr(x, y):
        return 10 * math.log10(255**2 / max(((x.astype(float) - y.astype(float)) ** 2).mean(), 1e-12))

    assert psnr(img, want) > 35  # the same images, under the invisible watermark (~40 dB) that save_image adds
    other = sample_checkpoint(ckpt, tmp_path / "c.png", "cpu", n=6, seed=6)
    assert psnr(read_rgb(other), want) < 25
    rec = read_record(a)
    assert rec["kind"] == "synthetic" and rec["checkpoint_sha256"] == sha256_file(ckpt)
