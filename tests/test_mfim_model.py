"""Facial attribute encoder + swap / mix on a stub generator honouring the S-space contract."""

import pytest
import torch

from mfim.models.encoder import FacialAttributeEncoder, level_for_resolution
from mfim.models.mfim import MFIM
from tests.stubs import StubGenerator
from tests.defaults import unit_encoder


def make_model(style_maps=True, res=32, maps=(8, 16), map_channels=1, source_torgb_max_res=0):
    torch.manual_seed(0)
    g = StubGenerator(resolution=res)
    cfg = unit_encoder(input_size=res, width=8, style_maps=style_maps, style_map_resolutions=maps,
                       style_map_channels=map_channels)
    m = MFIM(g, cfg, coarse_max_res=8, mix_global_res=(16,), source_torgb_max_res=source_torgb_max_res)
    # give the zero-initialised heads some weight so outputs depend on the inputs
    with torch.no_grad():
        for p in m.encoder.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return m.eval()


def test_level_split_follows_psp():
    assert [level_for_resolution(r) for r in (4, 8, 16, 32, 64, 1024)] == [
        "coarse", "coarse", "middle", "middle", "fine", "fine"]


def test_small_backbone_latent_map_sizes_match_generator_layers():
    enc = FacialAttributeEncoder(unit_encoder(input_size=64, width=8), StubGenerator(64).style_layers,
                                 StubGenerator(64).noise_layers)
    maps = enc.latent_maps(torch.randn(2, 3, 64, 64))
    assert {k: v.shape[-1] for k, v in maps.items()} == {"coarse": 8, "middle": 16, "fine": 32}
    assert enc.level_res == {"coarse": 8, "middle": 16, "fine": 32}


def test_ir_se50_levels_at_paper_input_size():
    enc = FacialAttributeEncoder(unit_encoder(input_size=256, backbone="ir_se50", style_maps=False),
                                 StubGenerator(64).style_layers, StubGenerator(64).noise_layers)
    assert enc.level_res == {"coarse": 16, "middle": 32, "fine": 64}
    assert len(enc.backbone.body) == 24  # 3 + 4 + 14 + 3 IR-SE units, as pSp's IR-SE50


def test_code_and_map_shapes():
    m = make_model()
    out = m.encoder(torch.randn(2, 3, 32, 32), with_maps=True)
    for l in m.generator.style_layers:
        assert out.codes[l.index].shape == (2, l.channels)
    assert sorted(n.resolution for n in m.generator.noise_layers if n.index in out.maps) == [8, 16]
    for i, mp in out.maps.items():
        assert mp.shape == (2, 1, m.generator.noise_layers[i].resolution, m.generator.noise_layers[i].resolution)


def test_per_channel_style_maps():
    m = make_model(map_channels=0)
    out = m.encoder(torch.randn(1, 3, 32, 32), with_maps=True)
    for i, mp in out.maps.items():
        assert mp.shape[1] == m.generator.noise_layers[i].channels


def test_untrained_encoder_starts_at_average_style():
    torch.manual_seed(0)
    g = StubGenerator(32)
    m = MFIM(g, unit_encoder(input_size=32, width=8), coarse_max_res=8)
    codes = m.encode_codes(torch.randn(2, 3, 32, 32), [l.index for l in g.style_layers])
    s_avg = g.styles_from_ws(g.w_avg.reshape(1, 1, -1).expand(1, g.num_ws, -1))
    for l in g.style_layers:
        torch.testing.assert_close(codes[l.index], s_avg[l.index].expand(2, -1), rtol=0, atol=0)


@pytest.mark.parametrize("source_torgb_max_res", [0, 8])
def test_coarse_codes_depend_only_on_target_fine_only_on_source(monkeypatch, source_torgb_max_res):
    m = make_model(source_torgb_max_res=source_torgb_max_res)
    src, tgt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    captured = []
    orig = m.synthesize

    def spy(codes, maps):
        captured.append(({k: v.clone() for k, v in codes.items()}, {k: v.clone() for k, v in maps.items()}))
        return orig(codes, maps)

    monkeypatch.setattr(m, "synthesize", spy)
    with torch.no_grad():
        m.swap(src, tgt)
        m.swap(src + 0.5 * torch.randn_like(src), tgt)  # perturb the source
        m.swap(src, tgt + 0.5 * torch.randn_like(tgt))  # perturb the target
    (c0, m0), (c1, m1), (c2, m2) = captured
    for i in m.tgt_indices:
        assert torch.equal(c0[i], c1[i]), "coarse code changed with the source"
        assert not torch.equal(c0[i], c2[i])
    for i in m.src_indices:
        assert torch.equal(c0[i], c2[i]), "fine code changed with the target"
        assert not torch.equal(c0[i], c1[i])
    for k in m0:
        assert torch.equal(m0[k], m1[k]) and not torch.equal(m0[k], m2[k])


def test_mix_with_same_source_twice_equals_swap():
    m = make_model()
    src, tgt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.mix(tgt, src, src), m.swap(src, tgt))
        assert torch.equal(m.mix(tgt, src, src, src, assignment=[[16], [32], []]), m.swap(src, tgt))


def test_mix_routes_resolutions_to_sources():
    m = make_model()
    tgt, gb, lc = (torch.randn(1, 3, 32, 32) for _ in range(3))
    assert m.mix_assignment() == [[16], [32]]
    seen = {}
    orig = m.synthesize
    m.synthesize = lambda codes, maps: seen.update(codes=codes) or orig(codes, maps)
    with torch.no_grad():
        m.mix(tgt, gb, lc)
        gb_codes = m.encode_codes(gb, m.src_indices)
        lc_codes = m.encode_codes(lc, m.src_indices)
    for l in m.generator.style_layers:
        if l.resolution == 16:
            assert torch.equal(seen["codes"][l.index], gb_codes[l.index])
        elif l.resolution == 32:
            assert torch.equal(seen["codes"][l.index], lc_codes[l.index])


def test_configuration_a_has_no_style_maps():
    m = make_model(style_maps=False)
    assert len(m.encoder.m2m) == 0
    out = m.encoder(torch.randn(1, 3, 32, 32), with_maps=True)
    assert out.maps == {}


def test_generator_stays_frozen_in_train_mode():
    m = make_model()
    m.train()
    assert not m.generator.training
    assert all(not p.requires_grad for p in m.generator.parameters())
    assert all(p.requires_grad for p in m.encoder.parameters())


def test_invalid_split_is_rejected():
    with pytest.raises(ValueError):
        MFIM(StubGenerator(32), unit_encoder(input_size=32, width=8), coarse_max_res=32)


# --- with the real StyleGAN2 --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "res, input_size, backbone, maps",
    [
        (64, 64, "small", (8, 16, 32)),
        (128, 64, "small", (8, 16, 32)),
        (256, 64, "small", (8, 16, 32)),
        pytest.param(1024, 256, "ir_se50", (16, 32, 64), marks=pytest.mark.slow),
    ],
)
def test_swap_shapes_with_stylegan2(res, input_size, backbone, maps):
    from mfim.models.stylegan2 import Generator

    torch.manual_seed(0)
    if res == 1024:  # the official FFHQ config (channel multiplier 2)
        G = Generator(1024, 512, 8, 32768, 512)
    else:
        G = Generator(res, style_dim=32, n_mlp=2, channel_base=2048, channel_max=16)
    m = MFIM(G, unit_encoder(input_size=input_size, backbone=backbone, width=8, code_channels=16,
                             style_map_resolutions=maps), coarse_max_res=16).eval()
    n_styles = {64: 14, 128: 17, 256: 20, 1024: 26}[res]
    assert len(G.style_layers) == n_styles
    x = torch.rand(1, 3, input_size, input_size) * 2 - 1
    with torch.no_grad():
        out = m.encoder(x, with_maps=True)
        y = m.swap(x, x.flip(3))
    assert y.shape == (1, 3, res, res) and torch.isfinite(y).all()
    assert sorted(G.noise_layers[i].resolution for i in out.maps) == sorted(r for r in maps for _ in (0, 1))
    assert set(m.tgt_indices) == {l.index for l in G.style_layers if l.resolution <= 16}


def test_self_swap_shortcut_equals_the_two_pass_swap():
    m = make_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.reconstruct(x), m.swap(x, x.clone()), rtol=0, atol=1e-6)


def test_ir_se50_file_without_num_batches_tracked_loads(tmp_path):
    # files written by older PyTorch lack BatchNorm's num_batches_tracked; pSp loads them, so must we. A round trip
    # (our writer of pSp's layout -> our loader): it checks the loader, not that IR-SE50 matches pSp's code
    from mfim.models.encoder import load_ir_se50
    from tests.official_files import write_psp_ir_se50

    enc = FacialAttributeEncoder(unit_encoder(input_size=256, backbone="ir_se50", style_maps=False),
                                 StubGenerator(64).style_layers, StubGenerator(64).noise_layers)
    state = write_psp_ir_se50(tmp_path / "model_ir_se50.pth")  # no num_batches_tracked, + the head pSp skips
    assert not any(k.endswith("num_batches_tracked") for k in state)
    unused = load_ir_se50(enc, tmp_path / "model_ir_se50.pth")
    assert unused == ["output_layer.0.weight"]
    for k, v in state.items():
        if k in enc.backbone.state_dict():
            assert torch.equal(enc.backbone.state_dict()[k], v)
    del state["body.0.res_layer.1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="keys missing"):
        load_ir_se50(enc, tmp_path / "broken.pth")


def test_encoder_config_comes_from_params_alone():
    """EncoderConfig has no value of its own: every field is read from the params group (a group without one is a
    KeyError, not a silent default), and MFIM's paper-scale split constants are the values configs/paper.yaml states."""
    import dataclasses
    from pathlib import Path

    import yaml

    from mfim.models.encoder import EncoderConfig
    from mfim.models.mfim import COARSE_MAX_RES, MIX_GLOBAL_RES
    from tests.defaults import default_params

    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(EncoderConfig))
    params = default_params()
    params["encoder"].update(width=16, style_map_resolutions=[8], style_maps=False, latent_channels=24)
    cfg = EncoderConfig.from_params(params, input_size=32)
    assert (cfg.input_size, cfg.width, cfg.style_map_resolutions, cfg.style_maps, cfg.latent_channels) == (
        32, 16, (8,), False, 24)
    del params["encoder"]["style_map_gain"]
    with pytest.raises(KeyError, match="style_map_gain"):
        EncoderConfig.from_params(params, input_size=32)
    paper = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper.yaml").read_text())["encoder"]
    assert paper["coarse_max_res"] == COARSE_MAX_RES and tuple(paper["mix_global_res"]) == MIX_GLOBAL_RES


def test_source_torgb_moves_only_coarse_torgb_layers_to_the_source():
    layers = {l.index: l for l in make_model().generator.style_layers}
    paper, tone = make_model(), make_model(source_torgb_max_res=8)
    moved = set(tone.src_indices) - set(paper.src_indices)
    assert {(layers[i].kind, layers[i].resolution) for i in moved} == {("torgb", 4), ("torgb", 8)}
    assert set(tone.tgt_indices) == set(paper.tgt_indices) - moved
    assert sorted(tone.src_indices + tone.tgt_indices) == sorted(layers)


def test_torgb_codes_change_colour_but_no_feature_map():
    """Why the source may own coarse toRGB codes: they feed nothing above them, so every conv activation (where
    pose and expression live) is bit-identical whichever image they come from, while the image changes."""
    from mfim.models.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(32, style_dim=32, n_mlp=2, channel_base=1024, channel_max=16).eval()
    ws = G.mapping(torch.randn(1, 32)).unsqueeze(1).expand(1, G.num_ws, -1)
    styles = G.styles_from_ws(ws)
    other = [s.clone() for s in styles]
    for l in G.style_layers:
        if l.kind == "torgb" and l.resolution <= 8:
            other[l.index] = other[l.index] + torch.randn_like(other[l.index])
    acts = []
    hooks = [m.register_forward_hook(lambda mod, i, o: acts.append(o.detach().clone()))
             for m in G.synthesis.convs]
    with torch.no_grad():
        a = G.synthesize(styles)
        n = len(acts)
        b = G.synthesize(other)
    for h in hooks:
        h.remove()
    assert n > 0 and len(acts) == 2 * n
    assert all(torch.equal(x, y) for x, y in zip(acts[:n], acts[n:]))
    assert (a - b).abs().mean() > 1e-3


def test_swapper_file_keeps_the_source_torgb_split(tmp_path):
    from mfim.models.mfim import load_swapper, save_swapper
    from mfim.models.stylegan2 import Generator

    G = Generator(32, style_dim=32, n_mlp=2, channel_base=1024, channel_max=16)
    m = MFIM(G, unit_encoder(input_size=32, width=8, code_channels=16, style_map_resolutions=(8, 16)),
             coarse_max_res=8, source_torgb_max_res=8)
    save_swapper(m, tmp_path / "s.pt")
    loaded, _ = load_swapper(tmp_path / "s.pt")
    assert loaded.source_torgb_max_res == 8
    assert loaded.src_indices == m.src_indices and loaded.tgt_indices == m.tgt_indices


def test_a_swapper_file_from_before_later_keys_loads_with_the_values_it_was_trained_with(tmp_path):
    """Files carry their whole encoder config; one written before style_map_injection / the refiner / the toRGB split
    existed lacks those keys and is read with ENCODER_CONFIG_BEFORE_KEY's values (how it was trained), not with
    params.yaml's current ones: the same weights give the same swap."""
    from mfim.models.mfim import ENCODER_CONFIG_BEFORE_KEY, load_swapper, save_swapper
    from mfim.models.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(32, style_dim=32, n_mlp=2, channel_base=1024, channel_max=16)
    old = {k: ENCODER_CONFIG_BEFORE_KEY[k] for k in ("style_map_injection", "style_map_gain", "refine_iterations",
                                                    "refine_map_resolutions", "latent_channels")}
    m = MFIM(G, unit_encoder(input_size=32, width=8, code_channels=16, style_map_resolutions=(8, 16), **old),
             coarse_max_res=8).eval()
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_swapper(m, tmp_path / "new.pt")
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    for k in old:
        del state["encoder_config"][k]
    del state["source_torgb_max_res"]
    torch.save(state, tmp_path / "old.pt")
    loaded, _ = load_swapper(tmp_path / "old.pt")
    assert loaded.encoder.cfg == m.encoder.cfg and loaded.source_torgb_max_res == 0
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.swap(x[:1], x[1:]), m.swap(x[:1], x[1:]))
