"""Official checkpoint formats, by path. Two kinds of test, named for what each can catch:

* ``test_*_keys_*`` / ``test_*_published_*``: our network's key names, shapes or size against facts of the official
  project written out here independently of our modules (key lists, published parameter counts, code widths). These
  can catch an architecture that differs from the official one.
* ``test_*_round_trip``: our writer of the official layout (tests/official_files.py, built from our own modules) ->
  our loader -> identical outputs. They check the loader's renaming, serialisation quirks (legacy files, prefixes,
  skipped heads) and preprocessing; they cannot catch an architecture difference from the official code, since the
  file and the reader come from the same network definition.

Missing files give one clear error.

Formats: insightface arcface_torch iresnet ``backbone.pth``; DECA ``deca_model.tar`` (``E_flame``); Hopenet
``hopenet_robust_alpha1.pkl`` (PyTorch 0.2 era: legacy serialisation, no BatchNorm ``num_batches_tracked``);
pytorch-fid ``pt_inception-2015-12-05-6726825d.pth``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mfim.assets import MissingAssetError, get, resolve

from .official_files import (
    GEN,
    write_deca_tar,
    write_fid_inception,
    write_hopenet_pkl,
    write_iresnet_backbone,
)


# --- key layouts, written out independently of our modules -----------------------------------------------------


def _bn(prefix: str, tracked: bool = True) -> list[str]:
    keys = [f"{prefix}.weight", f"{prefix}.bias", f"{prefix}.running_mean", f"{prefix}.running_var"]
    return keys + ([f"{prefix}.num_batches_tracked"] if tracked else [])


def resnet50_keys(tracked: bool = True) -> list[str]:
    """torchvision-style ResNet-50 (Bottleneck) trunk without its classifier, as DECA and Hopenet name it."""
    keys = ["conv1.weight", *_bn("bn1", tracked)]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight", *_bn(f"{p}.bn{i}", tracked)]
            if b == 0:
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1", tracked)]
    return keys


def iresnet_keys(layers) -> list[str]:
    """arcface_torch IResNet: pre-activation IBasicBlocks, PReLU, flatten -> fc -> BatchNorm1d ``features``."""
    keys = ["conv1.weight", *_bn("bn1"), "prelu.weight"]
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            keys += [*_bn(f"{p}.bn1"), f"{p}.conv1.weight", *_bn(f"{p}.bn2"), f"{p}.prelu.weight"]
            keys += [f"{p}.conv2.weight", *_bn(f"{p}.bn3")]
            if b == 0:
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return keys + [*_bn("bn2"), "fc.weight", "fc.bias", *_bn("features")]


def aligned_batch(n: int = 2, size: int = 128) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=GEN) * 2 - 1


# --- insightface arcface_torch iresnet -------------------------------------------------------------------------


def test_iresnet_keys_are_arcface_torchs():
    from mfim.nets.iresnet import IRESNET_LAYERS, IResNet

    assert list(IResNet(IRESNET_LAYERS[50]).state_dict()) == iresnet_keys(IRESNET_LAYERS[50])


def test_iresnet100_has_the_published_parameter_count():
    """insightface's ResNet100 ArcFace (LResNet100E-IR, the architecture arcface_torch's r100 ports) is listed at
    65.1320 M parameters (OpenVINO open_model_zoo, face-recognition-resnet100-arcface-onnx); ours has 65.156 M. The
    0.05 M margin is below the smallest architectural change (one more or one fewer first-stage block: 0.074 M); a
    wrong stage depth or width moves the count by millions."""
    from mfim.nets.iresnet import IRESNET_LAYERS, IResNet

    n_params = sum(p.numel() for p in IResNet(IRESNET_LAYERS[100]).parameters())
    assert abs(n_params - 65.132e6) < 0.05e6, n_params


def test_iresnet_backbone_pth_round_trip(tmp_path):
    """Our writer of arcface_torch's ``backbone.pth`` -> load_iresnet: same embeddings (cannot catch an architecture
    difference from arcface_torch: the keys tests above do that)."""
    from mfim.nets.iresnet import IRESNET_LAYERS, load_iresnet

    # the round trip on r18 (same block and key structure, a quarter of the compute)
    path = tmp_path / "backbone.pth"
    net = write_iresnet_backbone(path, depth=18)
    state = torch.load(path, weights_only=True)
    assert list(state) == iresnet_keys(IRESNET_LAYERS[18])
    assert state["fc.weight"].shape == (512, 512 * 7 * 7)

    emb = load_iresnet(path)
    x = aligned_batch()
    with torch.no_grad():
        crops = emb.crop(x)
        expected = net(crops)  # arcface_torch input: (x/255 - 0.5)/0.5, which is our [-1, 1] range unchanged
        assert torch.equal(emb(x), expected) and expected.shape == (2, 512)

    # DataParallel-saved copies ("module." prefix) load the same
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pth")
    with torch.no_grad():
        assert torch.equal(load_iresnet(tmp_path / "dp.pth").net(crops), expected)


@pytest.mark.parametrize("depth", [18, 34, 50, 100, 200])
def test_iresnet_depth_is_read_from_the_keys(depth):
    from mfim.nets.iresnet import IRESNET_LAYERS, iresnet_layers_from_state_dict

    state = dict.fromkeys(iresnet_keys(IRESNET_LAYERS[depth]))
    assert iresnet_layers_from_state_dict(state) == IRESNET_LAYERS[depth]


def test_wrong_checkpoint_names_the_file(tmp_path):
    from mfim.nets.iresnet import load_iresnet

    bad = tmp_path / "backbone.pth"
    state = {f"layer{s}.0.conv1.weight": torch.zeros(1) for s in (1, 2, 3, 4)}
    torch.save(state | {"fc.weight": torch.zeros(512, 3)}, bad)
    with pytest.raises(ValueError, match="backbone.pth.*key layout"):
        load_iresnet(bad)


# --- DECA deca_model.tar ---------------------------------------------------------------------------------------


def test_deca_code_width_is_decas_parameter_list():
    from mfim.nets.deca import DECA_CODE_SIZE

    # DECA's config: n_shape 100, n_tex 50, n_exp 50, n_pose 6, n_cam 3, n_light 27, in that order in E_flame's output
    assert DECA_CODE_SIZE == 100 + 50 + 50 + 6 + 3 + 27


def test_deca_model_tar_round_trip(tmp_path):
    """Our writer of ``deca_model.tar`` -> DECAEncoder: the same code. The key list is checked against DECA's layout
    written out here (ResNet-50 ``encoder.*`` + ``layers.0`` / ``layers.2``); the round trip itself cannot catch an
    architecture difference from DECA's code."""
    from mfim.nets.deca import DECA_CODE_SIZE, DECAEncoder, FLAMEParams

    path = tmp_path / "deca_model.tar"
    e_flame = write_deca_tar(path)
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint) == ["E_flame", "E_detail", "D_detail"]  # the detail networks ride along, as released
    state = checkpoint["E_flame"]
    assert list(state) == [f"encoder.{k}" for k in resnet50_keys()] + [
        "layers.0.weight",
        "layers.0.bias",
        "layers.2.weight",
        "layers.2.bias",
    ]
    assert state["layers.2.weight"].shape == (DECA_CODE_SIZE, 1024) and DECA_CODE_SIZE == 236

    deca = DECAEncoder(path)
    x = aligned_batch(1)
    with torch.no_grad():
        out = deca(x)
        code = e_flame((deca.crop(x) + 1) / 2)  # DECA takes 224x224 RGB in [0, 1]
    assert isinstance(out, FLAMEParams) and deca.crop(x).shape == (1, 3, 224, 224)
    assert torch.equal(out.code, code)
    assert torch.equal(out.shape, code[:, :100]) and torch.equal(out.exp, code[:, 150:200])
    assert torch.equal(out.jaw, code[:, 203:206]) and out.pose.shape == (1, 3)


# --- Hopenet hopenet_robust_alpha1.pkl ------------------------------------------------------------------------


def test_hopenet_pkl_round_trip(tmp_path):
    """Our writer of the 2017 ``.pkl`` -> HopenetResNet50: same outputs. Our module's keys are checked against a
    torchvision ResNet-50 + Hopenet's four heads written out here; the round trip cannot catch an architecture
    difference from Hopenet's code."""
    from mfim.nets.headpose import HopenetResNet50

    path = tmp_path / "hopenet_robust_alpha1.pkl"
    net = write_hopenet_pkl(path)
    state = net.state_dict()
    heads = [f"fc_{h}.{p}" for h in ("yaw", "pitch", "roll", "finetune") for p in ("weight", "bias")]
    assert list(state) == resnet50_keys() + heads
    assert state["fc_yaw.weight"].shape == (66, 2048) and state["fc_finetune.weight"].shape == (3, 2051)
    # written like the 2017 original: no num_batches_tracked, legacy (non-zip) serialisation
    assert not any(k.endswith("num_batches_tracked") for k in torch.load(path, weights_only=True))

    loaded = HopenetResNet50(path)
    x = aligned_batch(1)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


# --- pytorch-fid Inception ---------------------------------------------------------------------------------------


def _reference_pool3(net: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    """pool3 features, the FID way: bilinear resize to 299, scale to [-1, 1], the Inception stem and blocks."""
    x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    x = net.Conv2d_2b_3x3(net.Conv2d_2a_3x3(net.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, 2)
    x = F.max_pool2d(net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(x)), 3, 2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(net, f"Mixed_{name}")(x)
    return x.mean(dim=(2, 3))


def test_fid_inception_pth_round_trip(tmp_path):
    """pytorch-fid's own network (imported from pytorch_fid, not ours) -> its state dict -> our loader and feature
    path: the same pool3 features. The one round trip here whose reference is the official code."""
    from mfim.nets.fid import InceptionFeatures, load_fid_inception

    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    ref = write_fid_inception(path)
    state = ref.state_dict()
    assert state["fc.weight"].shape == (1008, 2048)
    assert "Mixed_7c.branch3x3dbl_3b.conv.weight" in state and not any(k.startswith("AuxLogits") for k in state)

    features = InceptionFeatures(load_fid_inception(path))
    x = aligned_batch(1, 64)
    with torch.no_grad():
        ours = features(x)
        expected = _reference_pool3(ref, (x + 1) / 2)
    assert ours.shape == (1, 2048)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compute_fd_reports_fid_with_the_weights(tmp_path):
    from mfim.nets.fid import compute_fd

    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    write_fid_inception(path)
    report = compute_fd(aligned_batch(6, 64), aligned_batch(6, 64), inception_checkpoint=path, batch_size=3)
    assert report["name"] == "fid" and report["value"] >= 0 and "NOT FID" not in report["note"]


# --- missing files -------------------------------------------------------------------------------------------------


def _loaders():
    from mfim.nets.deca import DECAEncoder
    from mfim.nets.fid import load_fid_inception
    from mfim.nets.headpose import HopenetResNet50
    from mfim.nets.iresnet import load_iresnet

    return {
        "arcface_iresnet": load_iresnet,
        "deca": DECAEncoder,
        "hopenet_official": HopenetResNet50,
        "fid_inception": load_fid_inception,
    }


@pytest.mark.parametrize("name", ["arcface_iresnet", "deca", "hopenet_official", "fid_inception"])
def test_missing_official_file_is_one_clear_error(name, tmp_path):
    asset = get(name)
    missing = tmp_path / asset.filename
    for attempt in (lambda: resolve(name, missing), lambda: _loaders()[name](missing)):
        with pytest.raises(MissingAssetError) as info:
            attempt()
        message = str(info.value)
        assert asset.filename in message  # the file
        assert f"`{asset.params_key}`" in message  # the params.yaml key that points at it
        assert asset.source.url in message and asset.source.obtain in message  # where to get it
