"""DVC stage `evaluate`: paper metrics, ID-mixing table, grids (reports/), logged to MLflow."""

from mfim.runtime import ensure_allocator_env

if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import load_params
    from mfim.evaluation.evaluate import run_evaluation
    from mfim.tracking import start_run
    from mfim.training.presets import apply_preset

    params = apply_preset(load_params())
    with start_run("evaluate", params, groups=["evaluate"]):  # open from the start: progress shows while it runs
        run_evaluation(params)
