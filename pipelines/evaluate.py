"""DVC stage `evaluate`: paper metrics, ID-mixing table, grids (reports/), logged to MLflow."""

from mfim.runtime import ensure_allocator_env

if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import load_params
    from mfim.evaluation.evaluate import run_evaluation
    from mfim.training.presets import apply_preset

    # finished batches are kept here until the reports are written: a killed run continues from them (not a DVC
    # output; keyed by a fingerprint of the params and inputs, so a changed input starts afresh)
    run_evaluation(apply_preset(load_params()), progress_dir="data/evaluate/progress")
