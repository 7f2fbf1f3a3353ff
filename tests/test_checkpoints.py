"""Checkpoints: bit-exact round trips through our format and both official layouts (key names, shapes and pickle
structure as the official files have them), the restricted unpickler, clear errors, and `mfim generate`."""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mfim.assets import MissingAssetError, sha256_file
from mfim.weights import (
    CheckpointError,
    PersistentRecord,
    load_discriminator,
    load_generator,
    read_checkpoint,
    save_checkpoint,
    write_rosinality_checkpoint,
)
from mfim.models.layers import make_fir_kernel
from mfim.models.stylegan2 import Discriminator, Generator
from mfim.weights.nvidia import _RestrictedUnpickler as RestrictedUnpickler
from tests.nvidia_writer import write_nvidia_pickle

# Official stylegan2-ada-pytorch networks at img_resolution=16, z_dim=w_dim=64, 2 mapping layers, channel_base=256,
# channel_max=32: every state_dict entry in order, as their code produces it.
NVIDIA_G_16 = [
    ("synthesis.b4.const", (32, 4, 4)), ("synthesis.b4.resample_filter", (4, 4)),
    ("synthesis.b4.conv1.weight", (32, 32, 3, 3)), ("synthesis.b4.conv1.noise_strength", ()),
    ("synthesis.b4.conv1.bias", (32,)), ("synthesis.b4.conv1.resample_filter", (4, 4)),
    ("synthesis.b4.conv1.noise_const", (4, 4)), ("synthesis.b4.conv1.affine.weight", (32, 64)),
    ("synthesis.b4.conv1.affine.bias", (32,)), ("synthesis.b4.torgb.weight", (3, 32, 1, 1)),
    ("synthesis.b4.torgb.bias", (3,)), ("synthesis.b4.torgb.affine.weight", (32, 64)),
    ("synthesis.b4.torgb.affine.bias", (32,)), ("synthesis.b8.resample_filter", (4, 4)),
    ("synthesis.b8.conv0.weight", (32, 32, 3, 3)), ("synthesis.b8.conv0.noise_strength", ()),
    ("synthesis.b8.conv0.bias", (32,)), ("synthesis.b8.conv0.resample_filter", (4, 4)),
    ("synthesis.b8.conv0.noise_const", (8, 8)), ("synthesis.b8.conv0.affine.weight", (32, 64)),
    ("synthesis.b8.conv0.affine.bias", (32,)), ("synthesis.b8.conv1.weight", (32, 32, 3, 3)),
    ("synthesis.b8.conv1.noise_strength", ()), ("synthesis.b8.conv1.bias", (32,)),
    ("synthesis.b8.conv1.resample_filter", (4, 4)), ("synthesis.b8.conv1.noise_const", (8, 8)),
    ("synthesis.b8.conv1.affine.weight", (32, 64)), ("synthesis.b8.conv1.affine.bias", (32,)),
    ("synthesis.b8.torgb.weight", (3, 32, 1, 1)), ("synthesis.b8.torgb.bias", (3,)),
    ("synthesis.b8.torgb.affine.weight", (32, 64)), ("synthesis.b8.torgb.affine.bias", (32,)),
    ("synthesis.b16.resample_filter", (4, 4)), ("synthesis.b16.conv0.weight", (16, 32, 3, 3)),
    ("synthesis.b16.conv0.noise_strength", ()), ("synthesis.b16.conv0.bias", (16,)),
    ("synthesis.b16.conv0.resample_filter", (4, 4)), ("synthesis.b16.conv0.noise_const", (16, 16)),
    ("synthesis.b16.conv0.affine.weight", (32, 64)), ("synthesis.b16.conv0.affine.bias", (32,)),
    ("synthesis.b16.conv1.weight", (16, 16, 3, 3)), ("synthesis.b16.conv1.noise_strength", ()),
    ("synthesis.b16.conv1.bias", (16,)), ("synthesis.b16.conv1.resample_filter", (4, 4)),
    ("synthesis.b16.conv1.noise_const", (16, 16)), ("synthesis.b16.conv1.affine.weight", (16, 64)),
    ("synthesis.b16.conv1.affine.bias", (16,)), ("synthesis.b16.torgb.weight", (3, 16, 1, 1)),
    ("synthesis.b16.torgb.bias", (3,)), ("synthesis.b16.torgb.affine.weight", (16, 64)),
    ("synthesis.b16.torgb.affine.bias", (16,)), ("mapping.w_avg", (64,)), ("mapping.fc0.weight", (64, 64)),
    ("mapping.fc0.bias", (64,)), ("mapping.fc1.weight", (64, 64)), ("mapping.fc1.bias", (64,)),
]  # fmt: skip
NVIDIA_D_16 = [
    ("b16.resample_filter", (4, 4)), ("b16.fromrgb.weight", (16, 3, 1, 1)), ("b16.fromrgb.bias", (16,)),
    ("b16.fromrgb.resample_filter", (4, 4)), ("b16.conv0.weight", (16, 16, 3, 3)), ("b16.conv0.bias", (16,)),
    ("b16.conv0.resample_filter", (4, 4)), ("b16.conv1.weight", (32, 16, 3, 3)), ("b16.conv1.bias", (32,)),
    ("b16.conv1.resample_filter", (4, 4)), ("b16.skip.weight", (32, 16, 1, 1)), ("b16.skip.resample_filter", (4, 4)),
    ("b8.resample_filter", (4, 4)), ("b8.conv0.weight", (32, 32, 3, 3)), ("b8.conv0.bias", (32,)),
    ("b8.conv0.resample_filter", (4, 4)), ("b8.conv1.weight", (32, 32, 3, 3)), ("b8.conv1.bias", (32,)),
    ("b8.conv1.resample_filter", (4, 4)), ("b8.skip.weight", (32, 32, 1, 1)), ("b8.skip.resample_filter", (4, 4)),
    ("b4.conv.weight", (32, 33, 3, 3)), ("b4.conv.bias", (32,)), ("b4.conv.resample_filter", (4, 4)),
    ("b4.fc.weight", (32, 512)), ("b4.fc.bias", (32,)), ("b4.out.weight", (1, 32)), ("b4.out.bias", (1,)),
]  # fmt: skip
NVIDIA_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"), ("dnnlib.util", "EasyDict"),
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch.storage", "_load_from_bytes"), ("numpy.core.multiarray", "scalar"), ("numpy", "dtype"),
}  # fmt: skip

# rosinality/stylegan2-pytorch at size=16, style_dim=S, n_mlp=2 (C: channels, 512 in their fixed table).
ROSINALITY_G_16 = [
    ("style.1.weight", ("S", "S")), ("style.1.bias", ("S",)), ("style.2.weight", ("S", "S")), ("style.2.bias", ("S",)),
    ("input.input", (1, "C", 4, 4)), ("conv1.conv.weight", (1, "C", "C", 3, 3)),
    ("conv1.conv.modulation.weight", ("C", "S")), ("conv1.conv.modulation.bias", ("C",)), ("conv1.noise.weight", (1,)),
    ("conv1.activate.bias", ("C",)), ("to_rgb1.bias", (1, 3, 1, 1)), ("to_rgb1.conv.weight", (1, 3, "C", 1, 1)),
    ("to_rgb1.conv.modulation.weight", ("C", "S")), ("to_rgb1.conv.modulation.bias", ("C",)),
    ("convs.0.conv.weight", (1, "C", "C", 3, 3)), ("convs.0.conv.blur.kernel", (4, 4)),
    ("convs.0.conv.modulation.weight", ("C", "S")), ("convs.0.conv.modulation.bias", ("C",)),
    ("convs.0.noise.weight", (1,)), ("convs.0.activate.bias", ("C",)), ("convs.1.conv.weight", (1, "C", "C", 3, 3)),
    ("convs.1.conv.modulation.weight", ("C", "S")), ("convs.1.conv.modulation.bias", ("C",)),
    ("convs.1.noise.weight", (1,)), ("convs.1.activate.bias", ("C",)), ("convs.2.conv.weight", (1, "C", "C", 3, 3)),
    ("convs.2.conv.blur.kernel", (4, 4)), ("convs.2.conv.modulation.weight", ("C", "S")),
    ("convs.2.conv.modulation.bias", ("C",)), ("convs.2.noise.weight", (1,)), ("convs.2.activate.bias", ("C",)),
    ("convs.3.conv.weight", (1, "C", "C", 3, 3)), ("convs.3.conv.modulation.weight", ("C", "S")),
    ("convs.3.conv.modulation.bias", ("C",)), ("convs.3.noise.weight", (1,)), ("convs.3.activate.bias", ("C",)),
    ("to_rgbs.0.bias", (1, 3, 1, 1)), ("to_rgbs.0.upsample.kernel", (4, 4)),
    ("to_rgbs.0.conv.weight", (1, 3, "C", 1, 1)),
    ("to_rgbs.0.conv.modulation.weight", ("C", "S")), ("to_rgbs.0.conv.modulation.bias", ("C",)),
    ("to_rgbs.1.bias", (1, 3, 1, 1)), ("to_rgbs.1.upsample.kernel", (4, 4)),
    ("to_rgbs.1.conv.weight", (1, 3, "C", 1, 1)),
    ("to_rgbs.1.conv.modulation.weight", ("C", "S")), ("to_rgbs.1.conv.modulation.bias", ("C",)),
    ("noises.noise_0", (1, 1, 4, 4)), ("noises.noise_1", (1, 1, 8, 8)), ("noises.noise_2", (1, 1, 8, 8)),
    ("noises.noise_3", (1, 1, 16, 16)), ("noises.noise_4", (1, 1, 16, 16)),
]  # fmt: skip
ROSINALITY_D_16 = [
    ("convs.0.0.weight", ("C", 3, 1, 1)), ("convs.0.1.bias", ("C",)), ("convs.1.conv1.0.weight", ("C", "C", 3, 3)),
    ("convs.1.conv1.1.bias", ("C",)), ("convs.1.conv2.0.kernel", (4, 4)), ("convs.1.conv2.1.weight", ("C", "C", 3, 3)),
    ("convs.1.conv2.2.bias", ("C",)), ("convs.1.skip.0.kernel", (4, 4)), ("convs.1.skip.1.weight", ("C", "C", 1, 1)),
    ("convs.2.conv1.0.weight", ("C", "C", 3, 3)), ("convs.2.conv1.1.bias", ("C",)), ("convs.2.conv2.0.kernel", (4, 4)),
    ("convs.2.conv2.1.weight", ("C", "C", 3, 3)), ("convs.2.conv2.2.bias", ("C",)), ("convs.2.skip.0.kernel", (4, 4)),
    ("convs.2.skip.1.weight", ("C", "C", 1, 1)), ("final_conv.0.weight", ("C", "C+1", 3, 3)),
    ("final_conv.1.bias", ("C",)), ("final_linear.0.weight", ("C", "16C")), ("final_linear.0.bias", ("C",)),
    ("final_linear.1.weight", (1, "C")), ("final_linear.1.bias", (1,)),
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (fixture in conftest.py)


def _perturbed(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.state_dict().values():  # persistent tensors only (not the fixed FIR kernels)
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return net.eval()


def nvidia_pair(seed=0):
    torch.manual_seed(seed)
    G = Generator(resolution=16, style_dim=64, n_mlp=2, channel_base=256, channel_max=32)
    D = Discriminator(resolution=16, channel_base=256, channel_max=32)
    return _perturbed(G, seed), _perturbed(D, seed + 1)


def rosinality_pair(seed=0, c=16):
    torch.manual_seed(seed)
    # every layer at the cap, like rosinality's 512-channel low resolutions (channel_base is then the smallest
    # equivalent one, which is what the loader infers)
    G = Generator(resolution=16, style_dim=32, n_mlp=2, channel_base=16 * c, channel_max=c)
    D = Discriminator(resolution=16, channel_base=16 * c, channel_max=c)
    return _perturbed(G, seed), _perturbed(D, seed + 1)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def assert_single_error(e: BaseException):
    """One error with the reason in its message: no chained exception (and so no second stack trace) shown."""
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def _shape(template, c, s):
    table = {"C": c, "S": s, "C+1": c + 1, "16C": 16 * c}
    return tuple(table.get(d, d) for d in template)


# ----------------------------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------------------------


def test_own_format_round_trip_is_bit_exact(tmp_path):
    G, D = nvidia_pair(3)
    G.fused_modconv = None
    path = save_checkpoint(tmp_path / "g.pt", G, D, extra={"kimg": 1.5, "note": "x", "t": torch.arange(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pt"]  # no temp file left behind
    G2, D2 = load_generator(path), load_discriminator(path)
    assert_same_state(G, G2)
    assert_same_state(D, D2)
    assert G2.config == G.config and D2.config == D.config
    raw = read_checkpoint(path)
    assert raw.format == "mfim" and raw.data["extra"]["kimg"] == 1.5
    assert torch.equal(raw.data["extra"]["t"], torch.arange(3))
    z = torch.randn(2, G.z_dim)
    with torch.no_grad():
        assert torch.equal(G(z), G2(z))
    img = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(D(img), D2(img))
    # a generator-only file has no discriminator: one clear error
    p2 = save_checkpoint(tmp_path / "g_only.pt", G)
    with pytest.raises(CheckpointError, match="no discriminator"):
        load_discriminator(p2)


# ----------------------------------------------------------------------------------------------------------------
# NVIDIA pickles
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["stylegan2-ada", "stylegan3"])
def test_nvidia_pickle_layout_matches_official(tmp_path, flavor):
    G, D = nvidia_pair(1)
    path = write_nvidia_pickle(tmp_path / "net.pkl", G, D, flavor=flavor)
    seen = set()

    class Recording(RestrictedUnpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    data = Recording(io.BytesIO(path.read_bytes())).load()
    assert seen == NVIDIA_GLOBALS
    assert list(data) == ["training_set_kwargs", "G", "D", "G_ema", "augment_pipe"]
    g_ema = data["G_ema"]
    assert isinstance(g_ema, PersistentRecord) and g_ema.class_name == "Generator" and g_ema.version == 6
    assert [(k, tuple(v.shape)) for k, v in g_ema.tensors().items()] == NVIDIA_G_16
    assert [(k, tuple(v.shape)) for k, v in data["D"].tensors().items()] == NVIDIA_D_16
    syn = g_ema.modules["synthesis"]
    layer = syn.modules["b8"].modules["conv0"]
    assert layer.class_name == "SynthesisLayer" and layer.init_args == (32, 32)
    assert layer.attr("up") == 2 and isinstance(layer.attr("act_gain"), np.float64)
    assert math.isclose(layer.attr("act_gain"), math.sqrt(2))
    assert layer.state["_parameters"]["weight"].requires_grad is False  # G_ema snapshots are frozen
    assert layer.attr("training") is False
    kw = g_ema.init_kwargs
    assert kw["mapping_kwargs"] == {"num_layers": 2} and type(kw["mapping_kwargs"]).__name__ == "_EasyDict"
    if flavor == "stylegan3":
        assert kw["channel_base"] == 256 and "synthesis_kwargs" not in kw
        assert layer.attr("in_channels") == 32 and syn.modules["b4"].attr("fused_modconv_default") is True
    else:
        assert kw["synthesis_kwargs"] == {"channel_base": 256, "channel_max": 32, "num_fp16_res": 0, "conv_clamp": None}
    fc = g_ema.modules["mapping"].modules["fc0"]
    assert fc.attr("bias_gain") == 0.01 and math.isclose(fc.attr("weight_gain"), 0.01 / 8)
    assert torch.equal(g_ema.tensors()["synthesis.b8.resample_filter"], make_fir_kernel())
    skip = data["D"].modules["b16"].modules["skip"]
    assert skip.attr("bias") is None and "bias" not in skip.state["_parameters"]


@pytest.mark.parametrize("flavor", ["stylegan2-ada", "stylegan3"])
def test_nvidia_round_trip_is_bit_exact(tmp_path, flavor):
    G, D = nvidia_pair(2)
    G_train = _perturbed(Generator(**G.config), 7)
    path = write_nvidia_pickle(tmp_path / "net.pkl", G, D, G_train=G_train, flavor=flavor)
    assert read_checkpoint(path).format == "nvidia"
    G2, D2 = load_generator(path), load_discriminator(path)
    assert_same_state(G, G2)  # G_ema, not the training G
    assert_same_state(D, D2)
    z = torch.from_numpy(np.random.RandomState(0).randn(3, G.z_dim))
    with torch.no_grad():
        assert torch.equal(G(z, truncation_psi=0.7), G2(z, truncation_psi=0.7))


def test_nvidia_config_with_clamp_and_other_mapping_is_inferred(tmp_path):
    torch.manual_seed(0)
    G = _perturbed(Generator(32, style_dim=48, n_mlp=3, channel_base=512, channel_max=32, z_dim=24, conv_clamp=256), 0)
    D = _perturbed(Discriminator(32, channel_base=512, channel_max=32, mbstd_group_size=2, conv_clamp=256), 1)
    path = write_nvidia_pickle(tmp_path / "net.pkl", G, D)
    G2, D2 = load_generator(path), load_discriminator(path)
    assert G2.config == G.config and D2.config == D.config
    assert_same_state(G, G2)
    assert_same_state(D, D2)


def test_restricted_unpickler_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    G, D = nvidia_pair(0)
    # the network source a persistent record carries is never executed
    path = write_nvidia_pickle(tmp_path / "net.pkl", G, D, module_src=f"open({str(marker)!r}, 'w').write('x')\n")
    assert_same_state(G, load_generator(path))
    assert not marker.exists()

    # a global outside the allow-list is refused before it is called
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"G_ema": Evil()}))
    with pytest.raises(CheckpointError, match=r"refused globals: (posix|os)\.system") as err:
        load_generator(bad)
    assert not marker.exists()
    assert_single_error(err.value)


def test_unknown_types_outside_the_networks_are_ignored_not_run(tmp_path):
    from tests.nvidia_writer import _GlobalRef, _nvidia_generator_record, _OfficialPickler, _Reduce

    G, _ = nvidia_pair(0)
    augment = _Reduce(_GlobalRef.of("training.augment", "AugmentPipe"), (1, 2))  # a class we do not know
    data = {"training_set_kwargs": None, "G_ema": _nvidia_generator_record(G, "# src\n"), "augment_pipe": augment}
    buf = io.BytesIO()
    _OfficialPickler(buf, protocol=4).dump(data)
    path = tmp_path / "net.pkl"
    path.write_bytes(buf.getvalue())
    raw = read_checkpoint(path)
    assert raw.format == "nvidia" and raw.notes == ["ignored (not loaded) global training.augment.AugmentPipe"]
    assert repr(raw.data["augment_pipe"]) == "<refused global training.augment.AugmentPipe>"
    assert_same_state(G, load_generator(path))
    # the same unknown type where a tensor belongs is an error
    data["G_ema"] = _nvidia_generator_record(G, "# src\n")
    data["G_ema"].args[0]["state"]["_modules"]["mapping"].args[0]["state"]["_buffers"]["w_avg"] = augment
    buf = io.BytesIO()
    _OfficialPickler(buf, protocol=4).dump(data)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="mapping.w_avg is a RefusedGlobal"):
        load_generator(path)


# ----------------------------------------------------------------------------------------------------------------
# rosinality checkpoints
# ----------------------------------------------------------------------------------------------------------------


def test_rosinality_layout_matches_official(tmp_path):
    G, D = rosinality_pair(0, c=16)
    path = write_rosinality_checkpoint(tmp_path / "r.pt", G, D)
    ck = torch.load(path, weights_only=True)
    assert sorted(ck) == ["d", "g_ema", "latent_avg"]
    assert [(k, tuple(v.shape)) for k, v in ck["g_ema"].items()] == [
        (k, _shape(s, 16, 32)) for k, s in ROSINALITY_G_16
    ]
    assert [(k, tuple(v.shape)) for k, v in ck["d"].items()] == [(k, _shape(s, 16, 32)) for k, s in ROSINALITY_D_16]
    assert torch.equal(ck["g_ema"]["convs.0.conv.blur.kernel"], make_fir_kernel() * 4)  # upsampling gain folded in
    assert torch.equal(ck["d"]["convs.1.skip.0.kernel"], make_fir_kernel())
    assert torch.equal(ck["latent_avg"], G.mapping.w_avg)


def test_rosinality_round_trip_is_bit_exact(tmp_path):
    G, D = rosinality_pair(4)
    path = write_rosinality_checkpoint(tmp_path / "r.pt", G, D)
    assert read_checkpoint(path).format == "rosinality"
    G2, D2 = load_generator(path), load_discriminator(path)
    assert_same_state(G, G2)
    assert_same_state(D, D2)
    assert G2.config == G.config
    # without latent_avg the truncation centre is estimated as the mean w of 4096 fixed-seed samples
    p2 = write_rosinality_checkpoint(tmp_path / "r2.pt", G, latent_avg=False)
    G3 = load_generator(p2)
    with torch.no_grad():
        w = G.mapping(torch.randn(20000, G.z_dim, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(G3.mapping.w_avg, G.mapping.w_avg)
    assert (G3.mapping.w_avg - w.mean(0)).abs().max() < 0.1 * w.std(0).max()
    with pytest.raises(CheckpointError, match="no discriminator"):
        load_discriminator(p2)


def test_rosinality_wrong_shape_is_one_clear_error(tmp_path):
    G, _ = rosinality_pair(0)
    path = write_rosinality_checkpoint(tmp_path / "r.pt", G)
    ck = torch.load(path, weights_only=True)
    ck["g_ema"]["convs.1.conv.weight"] = torch.zeros(1, 16, 8, 3, 3)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="convs.1.conv.weight"):
        load_generator(path)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_missing_file_names_the_params_key(tmp_path):
    with pytest.raises(MissingAssetError, match="generator.checkpoint"):
        load_generator(tmp_path / "nope.pkl")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "unrelated_torch", "tf_tuple", "empty"])
def test_corrupt_or_foreign_files_raise_checkpoint_error(tmp_path, kind):
    path = tmp_path / "bad.pkl"
    if kind == "garbage":
        path.write_bytes(b"GIF89a" + bytes(range(200)))
    elif kind == "truncated":
        G, D = nvidia_pair(0)
        good = write_nvidia_pickle(tmp_path / "good.pkl", G, D).read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif kind == "unrelated_torch":
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    elif kind == "tf_tuple":
        path.write_bytes(pickle.dumps((1, 2, 3)))
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_generator(path)
    assert str(path) in str(err.value)
    assert_single_error(err.value)
    if kind == "tf_tuple":
        assert "TensorFlow" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# mfim generate
# ----------------------------------------------------------------------------------------------------------------


def test_generate_command_writes_official_seed_images(tmp_path):
    from PIL import Image

    from mfim.cli import main
    from mfim.provenance import read_record
    from mfim.watermark import embed

    G, D = nvidia_pair(5)
    ckpt = write_nvidia_pickle(tmp_path / "net.pkl", G, D)
    out = tmp_path / "out"
    rc = main(["generate", "--checkpoint", str(ckpt), "--seeds", "0-2,7", "--outdir", str(out), "--trunc", "0.8"])
    assert rc == 0
    arr = np.load(out / "images.npy")
    assert arr.dtype == np.float32 and arr.shape == (4, 3, 16, 16)
    with torch.no_grad():  # official seed -> z: float64 N(0,1) from RandomState(seed), shape 1×z_dim
        zs = [torch.from_numpy(np.random.RandomState(s).randn(1, 64)) for s in (0, 1, 2, 7)]
        expected = torch.cat([G(z, truncation_psi=0.8, noise_mode="const") for z in zs]).numpy()
    assert np.array_equal(arr, expected)
    digest = sha256_file(ckpt)
    for i, seed in enumerate((0, 1, 2, 7)):
        png = out / f"seed{seed:04d}.png"
        rec = read_record(png)
        assert rec["kind"] == "synthetic" and rec["checkpoint_sha256"] == digest and rec["seed"] == seed
        pix = np.asarray(Image.open(png))
        ref = np.clip(np.transpose(arr[i], (1, 2, 0)) * 127.5 + 128, 0, 255).astype(np.uint8)
        assert np.array_equal(pix, embed(ref))  # official 8-bit conversion + the synthetic-image watermark
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1, 2, 7] and manifest["checkpoint_sha256"] == digest


def test_generate_command_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from mfim.cli import main

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = main(["generate", "--checkpoint", str(bad), "--seeds", "0", "--outdir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 3 and err.startswith("mfim generate:") and "Traceback" not in err
    assert main(["generate", "--checkpoint", str(bad), "--seeds", "x-y", "--outdir", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("name", ["generator_synth64", "mfim_synth64", "regressor_synth64", "evaluator_synth64"])
def test_shipped_checkpoints_are_the_files_their_records_describe(name):
    root = Path(__file__).resolve().parents[1] / "checkpoints"
    record = json.loads((root / f"{name}.json").read_text())
    assert sha256_file(root / f"{name}.pt") == record["output_sha256"]
