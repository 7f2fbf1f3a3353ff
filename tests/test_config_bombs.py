"""Config bombs: tiny checkpoint files whose stored or inferred generator config would allocate tens of GB.

Each is loaded in a subprocess under an address-space cap (RLIMIT_AS: what the interpreter already maps plus
1.5 GiB), so a regression fails with a memory error instead of taking the machine down; each must be refused with
one CheckpointError naming the file and the bad value, well within a second.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mfim.models.stylegan2 import Generator
from mfim.weights import FORMAT
from tests import nvidia_writer

HUGE = 65536  # 2 noise buffers of 65536² floats: 34 GB at this resolution alone


def _small_generator() -> Generator:
    torch.manual_seed(0)
    # every layer at the cap, so extra blocks at any resolution keep the channel rule consistent
    return Generator(resolution=16, style_dim=8, n_mlp=2, channel_base=16 * 8 * HUGE, channel_max=8)


def own_format_bomb(path: Path) -> Path:
    torch.save({"format": FORMAT, "version": 1, "config": {"resolution": HUGE, "style_dim": 8, "n_mlp": 2,
             "channel_base": 8 * HUGE, "channel_max": 8}, "g_ema": {}}, path)  # fmt: skip
    return path


def own_format_empty_weights(path: Path) -> Path:
    """A plausible config (config F, 1024 px: ~120 MB) with no weights behind it."""
    torch.save({"format": FORMAT, "version": 1, "config": {}, "g_ema": {"mapping.w_avg": torch.zeros(512)}}, path)
    return path


def rosinality_bomb(path: Path) -> Path:
    n_noise = 2 * 16 - 3  # (n_noise + 3) // 2 = log2(65536)
    g: dict[str, torch.Tensor] = {"style.1.weight": torch.zeros(8, 8), "style.1.bias": torch.zeros(8),
                                  "style.2.weight": torch.zeros(8, 8), "style.2.bias": torch.zeros(8),
                                  "input.input": torch.zeros(1, 8, 4, 4), "conv1.conv.weight": torch.zeros(1, 8, 8, 3, 3),
                                  "to_rgb1.conv.weight": torch.zeros(1, 3, 8, 1, 1)}  # fmt: skip
    w = torch.zeros(1, 8, 8, 3, 3)
    for i in range(n_noise - 1):
        g[f"convs.{i}.conv.weight"] = w  # one storage, written once
    for i in range(n_noise):
        g[f"noises.noise_{i}"] = torch.zeros(1, 1, 1, 1)
    torch.save({"g_ema": g}, path)
    return path


def nvidia_bomb(path: Path) -> Path:
    """A real (16 px) network pickle with one more synthesis block, named b65536."""
    G = _small_generator()
    rec = nvidia_writer._nvidia_generator_record(G, nvidia_writer.PLACEHOLDER_MODULE_SRC)
    blocks = rec.args[0]["state"]["_modules"]["synthesis"].args[0]["state"]["_modules"]
    blocks[f"b{HUGE}"] = blocks["b16"]
    data = {"training_set_kwargs": None, "G": rec, "D": None, "G_ema": rec, "augment_pipe": None}
    with path.open("wb") as f:
        nvidia_writer._OfficialPickler(f, protocol=4).dump(data)
    return path


def swapper_bomb(path: Path) -> Path:
    G = _small_generator()
    config = {**G.config, "resolution": HUGE}
    torch.save({"format": "mfim-swapper", "version": "0", "generator": {"config": config,
                "state_dict": G.state_dict()}, "encoder_config": {}, "encoder": {}, "coarse_max_res": 8,
                "mix_global_res": [16], "noise_mode": "const", "meta": {}}, path)  # fmt: skip
    return path


_PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from mfim.weights import load_generator
    from mfim.models.mfim import load_swapper
    from mfim.cli import main

    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**29, vm + 3 * 2**29))
    how, path, out = sys.argv[1:4]
    t0 = time.perf_counter()
    try:
        if how == "cli":
            rc = main(["generate", "--checkpoint", path, "--seeds", "0", "--outdir", out])
            result = {"error": f"exit {rc}", "message": ""}
        else:
            (load_swapper if how == "swapper" else load_generator)(path)
            result = {"error": None, "message": "loaded"}
    except BaseException as e:
        result = {"error": type(e).__name__, "message": str(e)}
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result))
    """
)


def _probe(how: str, path: Path, tmp_path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE, how, str(path), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "stderr": r.stderr}


@pytest.mark.parametrize(
    "make, how, says",
    [
        (own_format_bomb, "generator", f"resolution={HUGE} is outside 8..4096"),
        (own_format_empty_weights, "generator", "the file's tensors hold 512"),
        (rosinality_bomb, "generator", f"resolution={HUGE} is outside 8..4096"),
        (nvidia_bomb, "generator", f"resolution={HUGE} is outside 8..4096"),
        (swapper_bomb, "swapper", f"resolution={HUGE} is outside 8..4096"),
        (rosinality_bomb, "cli", f"resolution={HUGE} is outside 8..4096"),
    ],
    ids=["own", "own-empty-weights", "rosinality", "nvidia", "swapper", "generate-cli"],
)
def test_config_bomb_is_refused_fast_before_allocating(tmp_path, make, how, says):
    path = make(tmp_path / "bomb.pt")
    assert path.stat().st_size < 64_000
    got = _probe(how, path, tmp_path)
    if how == "cli":
        assert got["error"] == "exit 3" and says in got["stderr"] and str(path) in got["stderr"]
        assert "Traceback" not in got["stderr"]
    else:
        assert got["error"] == "CheckpointError", got
        assert str(path) in got["message"] and says in got["message"]
    assert got["seconds"] < 1.0, got


def test_limits_reject_each_bad_field():
    from mfim.weights.limits import CheckpointError, validate_network_config

    good = _small_generator().config
    assert validate_network_config("generator", good, "f")["resolution"] == 16
    for bad, says in [({"resolution": 24}, "not a power of two"), ({"resolution": 4}, "outside"),
                      ({"channel_max": 0}, "channel_max=0"), ({"style_dim": 10**6}, "style_dim"),
                      ({"n_mlp": 1000}, "n_mlp"), ({"n_mlp": 2.5}, "not an integer"),
                      ({"w_avg_beta": float("nan")}, "w_avg_beta"), ({"evil": 1}, "unknown"),
                      ({"resolution": 4096, "channel_max": 4096, "channel_base": 2**24}, "parameters")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=says):
            validate_network_config("generator", {**good, **bad}, "f")
    # a config whose weights are in the file passes with them
    G = _small_generator()
    validate_network_config("generator", G.config, "f", G.state_dict())
    # stride-0 views count by what they store, not by their shape
    fake = collections.OrderedDict(w=torch.zeros(1).expand(10**8))
    with pytest.raises(CheckpointError, match="hold 1"):
        validate_network_config("generator", G.config, "f", fake)
