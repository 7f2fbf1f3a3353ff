"""Speed options of the training step (issue 32): what a GPU run can switch on without changing what is learned.

Every option defaults to off, which is the step as it always was. Each one changes only how the same arithmetic runs,
so losses and gradients stay equal to the plain step within float32 rounding (tests/test_speed.py checks each on the
CPU); TF32 is the exception that trades precision on purpose (fp32 matmuls / convs with a 10-bit mantissa, ~1e-3
relative, on NVIDIA GPUs only).

``train`` params (params.yaml, configs/paper.yaml):

* ``channels_last``: the encoder's, D's and the loss networks' 4-D weights in NHWC, so cuDNN runs its tensor-core
  kernels without transposes (activations follow the weights' layout). Not the generator: its modulated convs are
  per-sample grouped convs whose weights are rebuilt every call, and with channels-last weights the CPU's grouped
  1x1 conv (ToRGB) returned a wrong weight gradient -- the ToRGB style codes' gradients off by ~100 % while the image
  was right (torch 2.14, oneDNN; tests/test_speed.py keeps the generator out and benchmarks/gpu_check.py compares
  each variant's gradients on the GPU).
* ``compile``: which modules go through ``torch.compile`` -- any of ``encoder``, ``generator``, ``discriminator``;
  ``compile_mode`` is torch.compile's ``mode``, ``compile_backend`` its ``backend`` (``inductor``; the tests use
  ``aot_eager``). Shapes are static (``dynamic=False``): each batch size compiles once. The discriminator's lazy R1
  differentiates D's input gradient again (a double backward, which compiled graphs do not support), so R1's forward
  runs D eagerly; every other D call is compiled.
* ``fused_adam``: both Adams as ``torch.optim.Adam(fused=True)`` (one kernel for all parameters; CUDA and, since torch
  2.4, CPU); a device without it keeps the plain Adam and says so.
* ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` (times the conv algorithms once per shape).
* ``tf32``: ``torch.set_float32_matmul_precision("high")`` and cuDNN's TF32 convs, for what runs in float32 under the
  bf16 autocast (the loss networks' no-grad targets) or without it.

bf16 autocast is ``train.bf16`` (mfim.training.trainer.TrainConfig), already on by default on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

COMPILABLE = ("encoder", "generator", "discriminator")
# the train params this module reads; they change how the step runs, not what it learns (mfim.training.run leaves
# them out of the resume fingerprint, so a run can continue with an option switched)
SPEED_KEYS = frozenset({"channels_last", "compile", "compile_mode", "compile_backend", "fused_adam",
                        "cudnn_benchmark", "tf32"})


@dataclass(frozen=True)
class SpeedOptions:
    """params.yaml ``train`` group's speed keys (SPEED_KEYS; their values live in params.yaml only)."""

    channels_last: bool
    compile: tuple[str, ...]
    compile_mode: str
    compile_backend: str
    fused_adam: bool
    cudnn_benchmark: bool
    tf32: bool

    def __post_init__(self):
        unknown = [m for m in self.compile if m not in COMPILABLE]
        if unknown:
            raise ValueError(f"train.compile: unknown module {unknown[0]!r}; choose from {', '.join(COMPILABLE)}")

    @staticmethod
    def from_params(train: dict) -> "SpeedOptions":
        """From the ``train`` group (validated: every speed key present); ``compile`` may be one name or a list."""
        comp = train["compile"] or ()
        if isinstance(comp, str):
            comp = (comp,)
        return SpeedOptions(
            channels_last=bool(train["channels_last"]),
            compile=tuple(str(m) for m in comp),
            compile_mode=str(train["compile_mode"]),
            compile_backend=str(train["compile_backend"]),
            fused_adam=bool(train["fused_adam"]),
            cudnn_benchmark=bool(train["cudnn_benchmark"]),
            tf32=bool(train["tf32"]),
        )

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @property
    def any(self) -> bool:
        """An option is switched on (compile_mode / compile_backend only matter with something to compile)."""
        return bool(self.channels_last or self.compile or self.fused_adam or self.cudnn_benchmark or self.tf32)


def apply_backend_flags(opts: SpeedOptions) -> None:
    """Process-wide switches (they affect every later op in this process)."""
    if opts.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if opts.tf32:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def to_channels_last(*modules: nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.to(memory_format=torch.channels_last)


def fused_adam(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same Adam (groups, hyper-parameters and moments) as ``fused=True``; ``opt`` itself where the parameters'
    device has no fused kernel."""
    if not isinstance(opt, torch.optim.Adam) or opt.param_groups[0].get("fused"):
        return opt
    state = opt.state_dict()
    for g in state["param_groups"]:
        g["fused"], g["foreach"] = True, None  # load_state_dict takes the groups' flags from the saved state
    groups = [{**g, "fused": True, "foreach": None} for g in opt.param_groups]
    try:
        new = torch.optim.Adam(groups, fused=True)
    except RuntimeError as e:  # e.g. a device type without the fused kernel
        print(f"speed: fused Adam unavailable here ({str(e).splitlines()[0]}); keeping the plain Adam")
        return opt
    new.load_state_dict(state)  # moves the step counters where the fused kernel wants them
    return new


def _compile_kwargs(opts: SpeedOptions) -> dict:
    kw = {"backend": opts.compile_backend, "dynamic": False}
    if opts.compile_mode != "default":
        kw["mode"] = opts.compile_mode
    return kw


def compile_generator(G: nn.Module, opts: SpeedOptions) -> None:
    """MFIM calls the frozen generator through ``synthesize`` (S-space styles), not ``forward``: that method is what
    is compiled, on this instance only (its state dict and checkpoints are unchanged)."""
    target = getattr(G, "synthesis", G)
    target.synthesize = torch.compile(target.synthesize, **_compile_kwargs(opts))


def compile_discriminator(D: nn.Module, opts: SpeedOptions) -> None:
    """D's forward compiled, except for R1: R1 (input requires grad while D trains) needs a double backward."""
    eager = D.forward
    compiled = torch.compile(eager, **_compile_kwargs(opts))
    params = list(D.parameters())

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return eager(x)
        return compiled(x)

    D.forward = forward


def apply_speed_options(trainer, opts: SpeedOptions) -> SpeedOptions:
    """Switch ``opts`` on for a built ``mfim.training.trainer.Trainer``, after its optimisers exist and any resume
    loaded their state. Returns ``opts``."""
    if not opts.any:
        return opts
    apply_backend_flags(opts)
    if opts.channels_last:  # not the generator (module docstring)
        to_channels_last(trainer.model.encoder, trainer.objective, trainer.ema.encoder)
    if opts.fused_adam:
        trainer.opt_e = fused_adam(trainer.opt_e)
        if trainer.opt_d is not None:
            trainer.opt_d = fused_adam(trainer.opt_d)
    if "encoder" in opts.compile:
        trainer.model.encoder.compile(**_compile_kwargs(opts))
    if "generator" in opts.compile:
        compile_generator(trainer.model.generator, opts)
    if "discriminator" in opts.compile and trainer.D is not None:
        compile_discriminator(trainer.D, opts)
    print(f"speed options: {opts.as_dict()}")
    return opts
