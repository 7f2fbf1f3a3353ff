"""ReStyle-style refinement of the encoder's inversion (encoder.refine_iterations, mfim/models/encoder.py)."""

import pytest
import torch

from mfim.models.mfim import MFIM, load_swapper, save_swapper
from tests.stubs import StubGenerator
from tests.defaults import loss_weights, train_config, warmstart_config, unit_encoder


def make(refine: int, seed: int = 0, style_maps: bool = True) -> MFIM:
    torch.manual_seed(seed)
    cfg = unit_encoder(input_size=32, width=8, style_map_resolutions=(8, 16), refine_iterations=refine,
                       style_maps=style_maps)
    return MFIM(StubGenerator(32), cfg, coarse_max_res=8, mix_global_res=(16,)).eval()


def trained_looking(m: MFIM) -> MFIM:
    """Give the one-pass encoder's zero-initialised heads weights, as training would (outputs depend on inputs)."""
    with torch.no_grad():
        for name, p in m.encoder.named_parameters():
            if not name.startswith("refiner.") and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return m


def test_a_new_refiner_changes_nothing():
    """Zero-initialised correction heads: refinement starts as the identity, whatever the iteration count."""
    one_pass = trained_looking(make(0))
    refined = make(3)
    # the one-pass state lacks exactly the refiner's tensors: it loads, and the refiner starts from it
    assert refined.encoder.load_state_starting_refiner(one_pass.encoder.state_dict())
    assert not make(1).encoder.load_state_starting_refiner(refined.encoder.state_dict())  # a plain strict load
    with pytest.raises(RuntimeError, match="unexpected"):
        make(3).encoder.load_state_starting_refiner({**one_pass.encoder.state_dict(), "bogus": torch.zeros(1)})
    src, tgt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(refined.swap(src, tgt), one_pass.swap(src, tgt))
        assert torch.equal(refined.reconstruct(tgt), one_pass.reconstruct(tgt))


def test_refiner_starts_from_the_encoder_weights():
    m = trained_looking(make(1))
    m.encoder.init_refiner()
    own, ref = m.encoder.state_dict(), m.encoder.refiner.state_dict()
    stem = "backbone.input_layer.0.weight"
    assert ref[stem].shape[1] == 2 * own[stem].shape[1]
    assert torch.equal(ref[stem][:, :3], own[stem]) and not ref[stem][:, 3:].any()
    assert torch.equal(ref["backbone.body.2.res_layer.1.weight"], own["backbone.body.2.res_layer.1.weight"])
    assert not any(h.linear.weight.any() for h in m.encoder.refiner.m2c.values())


def test_refinement_sees_the_reconstruction_and_lowers_the_error():
    """One Adam step on the refiner alone lowers the reconstruction error of a fixed batch; the refiner reads the
    reconstruction channels (their stem weights get a gradient)."""
    m = trained_looking(make(1))
    m.encoder.init_refiner()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ref = m.encoder.refiner
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    m.train()
    before = (m.reconstruct(x) - x).abs().mean()
    before.backward()
    stem_grad = ref.backbone.input_layer[0].weight.grad
    assert stem_grad is not None
    opt.step()
    opt.zero_grad()
    # after one step the heads are non-zero, so the reconstruction channels now reach the codes
    (m.reconstruct(x) - x).abs().mean().backward()
    assert ref.backbone.input_layer[0].weight.grad[:, 3:].abs().sum() > 0
    with torch.no_grad():
        after = (m.reconstruct(x) - x).abs().mean()
    assert after < before - 1e-4


def test_code_split_holds_with_refinement():
    """Refinement is per image: perturbing the source leaves the target's codes and maps bit-identical, and back."""
    m = make(2)
    with torch.no_grad():
        for p in m.encoder.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    src, tgt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        c0, m0 = m.encode_target(tgt)
        s0 = m.encode_codes(src, m.src_indices)
        c1, m1 = m.encode_target(tgt)
        s1 = m.encode_codes(src + 0.5 * torch.randn_like(src), m.src_indices)
        y0 = m.swap(src, tgt)
        ref = m.synthesize({**c0, **s0}, m0)
    assert all(torch.equal(c0[i], c1[i]) for i in m.tgt_indices)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all(not torch.equal(s0[i], s1[i]) for i in m.src_indices)
    assert set(c0) == set(m.tgt_indices) and set(s0) == set(m.src_indices)
    torch.testing.assert_close(y0, ref, rtol=0, atol=0)


def test_swapper_with_refiner_round_trips(tmp_path):
    from mfim.models.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(32, style_dim=32, n_mlp=2, channel_base=2048, channel_max=16)
    cfg = unit_encoder(input_size=32, width=8, code_channels=16, style_map_resolutions=(8, 16), refine_iterations=2)
    m = MFIM(G, cfg, coarse_max_res=8, mix_global_res=(16,)).eval()
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_swapper(m, tmp_path / "s.pt")
    back, _ = load_swapper(path)
    assert back.encoder.cfg.refine_iterations == 2
    for k, v in m.encoder.state_dict().items():
        assert torch.equal(back.encoder.state_dict()[k], v)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.swap(x, x.flip(3)), m.swap(x, x.flip(3)))


def test_negative_refine_iterations_is_an_error():
    with pytest.raises(ValueError, match="refine_iterations"):
        make(-1)


def test_warmstart_refine_phase_trains_only_the_refiner_and_lowers_the_error():
    """Phase 3 of the warm start: the one-pass encoder stays bit-identical, the refiner moves, and the refined
    reconstruction error of a fixed batch falls below the one-pass error it started from."""
    from mfim.criteria.id_loss import IDLoss
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.training.warmstart import run_warmstart
    from tests.stubs import StubEmbedder

    m = trained_looking(make(1))
    m.encoder.init_refiner()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        start = float((m.reconstruct(x, refine=False) - x).abs().mean())
    base = {k: v.clone() for k, v in m.encoder.state_dict().items() if not k.startswith("refiner.")}
    real = iter(lambda: {"src": x[:2], "tgt": x[2:]}, None)
    cfg = warmstart_config(regression_steps=0, recon_steps=0, refine_steps=30, batch_size=4, refine_lr=3e-3,
                           recon_lpips=0.0, refine_id=0.1, log_every=10, ema_decay=0.0, image_l1=1.0,
                           checkpoint_every=0)
    state, _, rows = run_warmstart(m, cfg, real, ReconLoss(None), progress=False, id_loss=IDLoss(StubEmbedder()))
    assert [r["step"] for r in rows] == [10, 20, 30] and "refine_id" in rows[0]
    assert all(torch.equal(state[k], v) for k, v in base.items())
    m.eval()
    with torch.no_grad():
        refined = float((m.reconstruct(x) - x).abs().mean())
    assert refined < 0.9 * start


def test_warmstart_without_refiner_skips_the_refine_phase():
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.training.warmstart import run_warmstart

    m = make(0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    real = iter(lambda: {"src": x[:2], "tgt": x[2:]}, None)
    cfg = warmstart_config(regression_steps=0, recon_steps=2, refine_steps=5, batch_size=4, recon_lpips=0.0,
                           log_every=1, image_l1=1.0, checkpoint_every=0)
    _, _, rows = run_warmstart(m, cfg, real, ReconLoss(None), progress=False)
    assert [r["step"] for r in rows] == [1, 2]


def test_swap_training_leaves_a_frozen_refiner_bit_identical():
    """train.train_refiner false (the default): the swap objective moves the one-pass encoder, not the refiner or
    its batch-norm statistics; true: both move."""
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.training.objective import MFIMObjective
    from mfim.training.trainer import Trainer

    batch = {"src": torch.rand(2, 3, 32, 32) * 2 - 1, "tgt": torch.rand(2, 3, 32, 32) * 2 - 1}
    for train_refiner in (False, True):
        m = trained_looking(make(1))
        m.encoder.init_refiner()
        w = loss_weights(id=0.0, l1=1.0, lpips=0.0, adv=0.0, r1=0.0, shape=0.0, pose=0.0, exp=0.0,
                         recon_cross_identity=1.0, background_l1=0.0)
        tr = Trainer(m, MFIMObjective(w, recon=ReconLoss(None)), train_config(lr=1e-2, train_refiner=train_refiner,
                                                                              steps=600),
                     torch.device("cpu"))
        ref0 = {k: v.clone() for k, v in m.encoder.refiner.state_dict().items()}
        base0 = m.encoder.backbone.input_layer[0].weight.clone()
        tr.train_step([batch])
        tr.train_step([batch])
        ref_same = all(torch.equal(v, ref0[k]) for k, v in m.encoder.refiner.state_dict().items())
        assert ref_same is (not train_refiner)
        assert not torch.equal(m.encoder.backbone.input_layer[0].weight, base0)


def test_refine_map_resolutions_limits_which_maps_the_refiner_corrects(tmp_path):
    """encoder.refine_map_resolutions [8]: the refiner has no 16 px map head, the refined 16 px map is the one-pass
    map bit for bit while the 8 px map moves; the choice survives a save/load round trip; a resolution outside the
    style maps is an error."""
    from mfim.models.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(32, style_dim=32, n_mlp=2, channel_base=2048, channel_max=16)
    cfg = unit_encoder(input_size=32, width=8, code_channels=16, style_map_resolutions=(8, 16), refine_iterations=1,
                       refine_map_resolutions=(8,))
    m = MFIM(G, cfg, coarse_max_res=8, mix_global_res=(16,)).eval()
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    res = {n.index: n.resolution for n in G.noise_layers}
    assert {res[int(k)] for k in m.encoder.refiner.m2m} == {8}
    assert {res[int(k)] for k in m.encoder.m2m} == {8, 16}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, one = m.invert(x, refine=False)
        _, refined = m.invert(x)
    for i, v in one.items():
        assert torch.equal(refined[i], v) is (res[i] == 16)
    back, _ = load_swapper(save_swapper(m, tmp_path / "s.pt"))
    assert back.encoder.cfg.refine_map_resolutions == (8,)
    with torch.no_grad():
        assert torch.equal(back.swap(x, x.flip(3)), m.swap(x, x.flip(3)))
    with pytest.raises(ValueError, match="refine_map_resolutions"):
        MFIM(G, unit_encoder(input_size=32, width=8, style_map_resolutions=(8,), refine_iterations=1,
                             refine_map_resolutions=(16,)), coarse_max_res=8, mix_global_res=(16,))


def test_save_swapper_carries_extra_entries_but_never_over_its_own(tmp_path):
    from mfim.models.stylegan2 import Generator

    G = Generator(32, style_dim=32, n_mlp=2, channel_base=2048, channel_max=16)
    m = MFIM(G, unit_encoder(input_size=32, width=8, code_channels=16, style_map_resolutions=(8, 16)),
             coarse_max_res=8, mix_global_res=(16,))
    d = {"w": torch.arange(3.0)}
    path = save_swapper(m, tmp_path / "s.pt", extra={"discriminator": d})
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["discriminator"]["w"], d["w"]) and state["format"] == "mfim-swapper"
    with pytest.raises(ValueError, match="encoder"):
        save_swapper(m, tmp_path / "t.pt", extra={"encoder": {}})
    assert not (tmp_path / "t.pt").exists()
