"""DVC stage `evaluate`: paper metrics, ID-mixing table, grids (reports/), logged to MLflow.

With several GPUs visible (and project.device not cpu) it starts itself again under torchrun, one rank per GPU: the
ranks split the batches and rank 0 writes the reports (mfim.evaluation.evaluate). CPU runs stay one process."""

import contextlib
import os

from mfim.runtime import ensure_allocator_env


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error, load_params
    from mfim.evaluation.evaluate import run_evaluation
    from mfim.launch import relaunch_on_every_gpu
    from mfim.tracking import start_run
    from mfim.training.presets import apply_preset

    with exit_on_params_error("evaluate"):
        params = apply_preset(load_params())
    relaunch_on_every_gpu(params, __file__)
    # the run is open from the start, so progress shows in MLflow while the stage works (rank 0's; the others log none)
    tracked = start_run("evaluate", params, groups=["evaluate"]) if int(os.environ.get("RANK", "0")) == 0 \
        else contextlib.nullcontext()
    with tracked:
        # finished batches are kept here until the reports are written: a killed run continues from them (not a
        # DVC output; keyed by a fingerprint of the params and inputs, so a changed input starts afresh)
        run_evaluation(params, progress_dir="data/evaluate/progress")
