"""Speed options (mfim.training.speed): each one, switched on for a small trainer of the real networks (StyleGAN2
generator and residual D, the encoder with its style maps), gives the plain step's losses, gradients and updates
within float32 rounding -- so turning them on at paper scale is safe. torch.compile is checked with the aot_eager
backend (the same graph capture and autograd as inductor, without generating C++); inductor itself runs in
benchmarks/gpu_check.py --smoke and on the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mfim.criteria.id_loss import IDLoss
from mfim.criteria.recon_loss import ReconLoss
from mfim.criteria.threedmm_loss import ThreeDMMLoss
from mfim.models.mfim import MFIM
from mfim.models.stylegan2 import Discriminator, Generator
from mfim.training.objective import MFIMObjective
from mfim.training.speed import SPEED_KEYS, SpeedOptions, apply_speed_options, fused_adam
from mfim.training.trainer import Trainer
from tests.stubs import Stub3DMM, StubEmbedder
from tests.defaults import default_group, loss_weights, speed_options, train_config, unit_encoder

REPO = Path(__file__).resolve().parents[1]

RES = 32
LR = 2e-3
# every encoder term and the D update with R1 on the first step (step 0) and without it on the second
WEIGHTS = loss_weights(id=1.0, l1=1.0, lpips=0.0, adv=0.1, r1=1.0, r1_every=2, shape=0.5, pose=0.5, exp=0.5,
                       recon_cross_identity=1.0, background_l1=0.0)


def small_trainer(seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    G = Generator(resolution=RES, style_dim=16, n_mlp=1, channel_base=256, channel_max=16).eval()
    model = MFIM(G, unit_encoder(input_size=RES, width=8, style_map_resolutions=(8, 16)), coarse_max_res=8)
    D = Discriminator(RES, 256, 16)
    objective = MFIMObjective(WEIGHTS, id_loss=IDLoss(StubEmbedder()), recon=ReconLoss(None),
                              threedmm=ThreeDMMLoss(Stub3DMM()), discriminator=D)
    return Trainer(model, objective, train_config(lr=LR, d_lr=LR, log_every=1, steps=600), torch.device("cpu"))


def batch(seed: int, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(n, 3, RES, RES, generator=g) * 2 - 1 for k in ("src", "tgt")}


def run_steps(opts: SpeedOptions, steps: int = 2):
    """Logs, gradients and updated weights of step k (k < ``steps``) of a fresh trainer with ``opts``: every step
    starts from the same weights, so differences are the option's, not an earlier update's (Adam's first steps are
    ~lr x sign(gradient), which turns a rounding difference in a near-zero gradient into a visible weight change)."""
    out = []
    for k in range(steps):
        tr = small_trainer()
        apply_speed_options(tr, opts)
        tr.step = k  # step 0 runs lazy R1 (r1_every 2), step 1 does not
        logs = {k: float(v) for k, v in tr.train_step([batch(k)]).items()}  # the step keeps its logs on the device
        params = list(tr.model.encoder.parameters()) + list(tr.D.parameters())
        out.append((logs, [p.grad.clone() for p in params if p.grad is not None], [p.detach().clone() for p in params]))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference; a gradient whose norm is ~0 (a dead SE gate) is compared at an absolute 1e-7."""
    return float((a.double() - b.double()).norm() / (b.double().norm() + 1e-7 / 2e-5))


def assert_same_step(got, ref, tol: float) -> None:
    for (logs, grads, weights), (rlogs, rgrads, rweights) in zip(got, ref):
        assert logs.keys() == rlogs.keys()
        for k in rlogs:
            assert logs[k] == pytest.approx(rlogs[k], rel=tol, abs=1e-7), k
        assert len(grads) == len(rgrads) > 0
        worst = max(rel(g, r) for g, r in zip(grads, rgrads))
        assert worst <= tol, f"gradient differs by {worst:.2e} (relative)"
        # a near-zero gradient component can still flip Adam's ~lr x sign step: updates are compared against lr
        worst = max(float((w - r).abs().max()) for w, r in zip(weights, rweights))
        assert worst <= (tol > 0) * 0.05 * LR, f"updates differ by {worst:.2e} ({worst / LR:.1%} of lr)"


@pytest.fixture(scope="module")
def baseline():
    return run_steps(speed_options())


@pytest.fixture(autouse=True)
def restore_backend_flags():
    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.benchmark = before[0]
    torch.set_float32_matmul_precision(before[1])
    torch.backends.cudnn.allow_tf32 = before[2]


def test_baseline_is_deterministic(baseline):
    """The reference itself: two plain runs agree bit for bit (so any difference below is the option's)."""
    again = run_steps(speed_options())
    assert_same_step(again, baseline, tol=0.0)
    assert "r1" in baseline[0][0] and "r1" not in baseline[1][0]  # lazy R1 on step 0 only (r1_every 2)


@pytest.mark.parametrize("opts", [
    speed_options(channels_last=True),
    speed_options(fused_adam=True),
    speed_options(cudnn_benchmark=True, tf32=True),  # CUDA-only switches: on the CPU they must change nothing
], ids=["channels_last", "fused_adam", "cudnn_benchmark+tf32"])
def test_option_keeps_losses_gradients_and_updates(opts, baseline):
    assert_same_step(run_steps(opts), baseline, tol=2e-5)


@pytest.mark.timeout(600)
def test_compile_keeps_losses_gradients_and_updates(baseline):
    """Encoder, generator and D compiled (D eager only for R1's double backward), two steps: with R1, without."""
    opts = speed_options(compile=("encoder", "generator", "discriminator"), compile_backend="aot_eager")
    torch._dynamo.reset()
    assert_same_step(run_steps(opts), baseline, tol=2e-5)


@pytest.mark.slow  # ~35 s more of CPU compile on top of the test above
def test_all_options_together(baseline):
    opts = speed_options(channels_last=True, fused_adam=True, cudnn_benchmark=True, tf32=True,
                         compile=("encoder", "generator", "discriminator"), compile_backend="aot_eager")
    torch._dynamo.reset()
    assert_same_step(run_steps(opts), baseline, tol=5e-5)


def test_channels_last_leaves_the_generator_contiguous():
    """NHWC for the encoder, D and the loss networks; the generator's weights stay as they were (speed.py: the CPU's
    grouped 1x1 conv gave ToRGB a wrong weight gradient with NHWC weights)."""
    tr = small_trainer()
    apply_speed_options(tr, speed_options(channels_last=True))
    convs = lambda m: [p for p in m.parameters() if p.ndim == 4 and p.shape[-1] > 1]  # noqa: E731 (1x1: ambiguous)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs(tr.model.encoder) + convs(tr.D))
    assert all(p.is_contiguous() for p in tr.model.generator.parameters())


def test_fused_adam_keeps_moments_and_groups():
    """A fused copy of an Adam that already stepped continues exactly where the plain one would."""
    import copy

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    plain = torch.optim.Adam([w], lr=1e-2, betas=(0.0, 0.99))
    w.grad = torch.randn(5, 3)
    plain.step()
    twin_w = torch.nn.Parameter(w.detach().clone())
    twin = torch.optim.Adam([twin_w], lr=1e-2, betas=(0.0, 0.99))
    twin.load_state_dict(copy.deepcopy(plain.state_dict()))  # the plain Adam, continued
    fused = fused_adam(plain)
    assert fused is not plain and fused.param_groups[0]["fused"] and fused.param_groups[0]["betas"] == (0.0, 0.99)
    for _ in range(3):
        g = torch.randn(5, 3)
        w.grad, twin_w.grad = g.clone(), g.clone()
        fused.step()
        twin.step()
    assert torch.allclose(w, twin_w, rtol=1e-6, atol=1e-7)
    assert fused_adam(fused) is fused  # already fused


def test_params_parse_and_are_listed_in_both_param_files():
    import yaml

    for name in ("params.yaml", "configs/paper.yaml"):
        train = yaml.safe_load((REPO / name).read_text())["train"]
        assert SPEED_KEYS <= set(train), (name, SPEED_KEYS - set(train))
        SpeedOptions.from_params(train)  # valid values
    assert not SpeedOptions.from_params(yaml.safe_load((REPO / "params.yaml").read_text())["train"]).any  # all off
    opts = SpeedOptions.from_params(default_group("train", compile="encoder", channels_last=True))
    assert opts.compile == ("encoder",) and opts.channels_last and opts.any
    with pytest.raises(ValueError, match="train.compile: unknown module 'decoder'"):
        SpeedOptions.from_params(default_group("train", compile=["decoder"]))
