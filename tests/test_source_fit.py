"""Test-time fitting of the source's ID codes (mfim.models.source_fit) on a stub generator."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mfim.models.source_fit import SourceCodeFitter, SourceFitConfig
from tests.test_mfim_model import make_model
from tests.defaults import source_fit_config


class PoolEmbedder(nn.Module):
    """A fixed random 'ID network': 4x4 average pool -> linear, differentiable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(3 * 16, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


def fit_loss(model, fitter, codes, maps, x):
    """The fitter's objective for given codes (L1 + id; lpips weight 0 in these tests)."""
    with torch.no_grad():
        y = model.synthesize(codes, maps)
        cos = F.cosine_similarity(fitter.embedder(y), fitter.embedder(x))
        return float(fitter.cfg.l1 * (y - x).abs().mean() + fitter.cfg.id * (1 - cos).mean())


def make(steps=20, source_torgb_max_res=0, **kw):
    model = make_model(source_torgb_max_res=source_torgb_max_res)
    cfg = source_fit_config(steps=steps, lr=0.05, l1=1.0, lpips=0.0, id=1.0, **{"exp": 0.0, **kw})
    return model, SourceCodeFitter(cfg, PoolEmbedder(), None)


def test_fit_lowers_its_loss_and_moves_only_the_id_codes():
    model, fitter = make()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes, maps = model.invert(x)
    fitted = fitter.fit(model, x)
    assert fit_loss(model, fitter, fitted, maps, x) < fit_loss(model, fitter, codes, maps, x) - 1e-3
    for i in model.tgt_indices:  # the target's half of the split is never touched
        assert torch.equal(fitted[i], codes[i])
    assert any(not torch.equal(fitted[i], codes[i]) for i in model.src_indices)


def test_coarse_torgb_codes_from_the_source_are_the_encoders_not_fitted():
    """With encoder.source_torgb_max_res the swap takes coarse toRGB codes from the source; the fit leaves them as
    the encoder made them (fitted, they copy the source's mouth and eye colour: its expression) and fits the rest."""
    model, fitter = make(source_torgb_max_res=8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes, _ = model.invert(x)
    fitted = fitter.fit(model, x)
    res = {l.index: l.resolution for l in model.generator.style_layers}
    coarse_src = [i for i in model.src_indices if res[i] <= model.coarse_max_res]
    assert coarse_src and all(torch.equal(fitted[i], codes[i]) for i in coarse_src)
    assert all(not torch.equal(fitted[i], codes[i]) for i in model.src_indices if res[i] > model.coarse_max_res)


def test_zero_steps_is_the_feed_forward_encoder_bit_for_bit():
    model, fitter = make(steps=0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        plain = model.encode_codes(x, model.src_indices)
        model.source_fitter = fitter
        fitted = model.encode_codes(x, model.src_indices)
    for i in model.src_indices:
        assert torch.equal(plain[i], fitted[i])


def test_each_image_is_fitted_once_and_rows_do_not_depend_on_the_batch():
    model, fitter = make(steps=5)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1
    first = fitter(model, torch.stack([a, b]), model.src_indices)
    calls = fitter.embedder.calls
    again = fitter(model, torch.stack([b, a, a]), model.src_indices)  # all cached: no new fitting
    assert fitter.embedder.calls == calls
    for i in model.src_indices:
        assert torch.equal(again[i][0], first[i][1]) and torch.equal(again[i][1], first[i][0])
        assert torch.equal(again[i][2], first[i][0])


def test_swap_with_a_fitter_keeps_the_code_split():
    """Perturbing the source changes the swap only through the ID codes: the target's codes and maps are the same."""
    model, fitter = make(steps=3)
    model.source_fitter = fitter
    x_src, x_tgt = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes_tgt, maps_tgt = model.encode_target(x_tgt)
        y1 = model.swap(x_src, x_tgt)
        y2 = model.swap(x_src + 0.1 * torch.randn_like(x_src), x_tgt)
        codes_tgt2, maps_tgt2 = model.encode_target(x_tgt)
    assert not torch.equal(y1, y2)
    for i in codes_tgt:
        assert torch.equal(codes_tgt[i], codes_tgt2[i])
    for i in maps_tgt:
        assert torch.equal(maps_tgt[i], maps_tgt2[i])
    with torch.no_grad():  # a self-swap goes through the fitter too: the same image as source and target
        assert torch.equal(model.swap(x_tgt, x_tgt), model.swap(x_tgt, x_tgt.clone()))


def test_config_rejects_unknown_keys_and_bad_values():
    from mfim.params_schema import ParamsError, validate
    from tests.defaults import default_group, default_params

    assert SourceFitConfig.from_params(default_group("source_fit", steps="50")).steps == 50
    params = default_params()
    params["source_fit"]["step"] = 5  # the schema refuses it at stage start, naming the key meant
    with pytest.raises(ParamsError, match="unknown key source_fit.step .*did you mean source_fit.steps"):
        validate(params)
    params = default_params()
    params["source_fit"]["steps"] = -1
    with pytest.raises(ParamsError, match=r"source_fit.steps is -1, allowed: an int >= 0"):
        validate(params)
    with pytest.raises(ValueError, match="steps must be"):  # built without the schema: still bounded
        SourceFitConfig.from_params(default_group("source_fit", steps=-1))
    with pytest.raises(ValueError, match="LPIPS"):
        SourceCodeFitter(source_fit_config(steps=1, lpips=1.0, exp=0.0), PoolEmbedder(), None)
    with pytest.raises(ValueError, match="exp > 0 needs a 3DMM expression network"):
        SourceCodeFitter(source_fit_config(steps=1, lpips=0.0, exp=1.0), PoolEmbedder(), None)
    with pytest.raises(ValueError, match="weights >= 0"):
        SourceFitConfig.from_params(default_group("source_fit", exp=-1))


class PoolExpression(nn.Module):
    """A fixed random 'expression network': the lower half of the face (the mouth's rows), pooled -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(3 * 8, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(x[:, :, x.shape[2] // 2 :], (2, 4)).flatten(1))


def test_expression_anchor_keeps_the_reconstructions_expression_while_fitting():
    """The fit pulls the image towards the source, and with it the expression network's reading; the anchor holds
    that reading at the encoder's reconstruction's, and the fit still moves the ID codes."""
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    drift = {}
    for w in (0.0, 10.0):
        model = make_model()
        expression = PoolExpression()
        cfg = source_fit_config(steps=30, lr=0.05, l1=1.0, lpips=0.0, id=0.0, exp=w)
        fitter = SourceCodeFitter(cfg, None, None, expression)
        with torch.no_grad():
            codes, maps = model.invert(x)
            fitted = fitter.fit(model, x)
            before = expression(model.synthesize(codes, maps))
            drift[w] = float((expression(model.synthesize(fitted, maps)) - before).norm(dim=1).mean())
        assert any(not torch.equal(fitted[i], codes[i]) for i in model.src_indices)
    assert drift[10.0] < 0.5 * drift[0.0], drift
