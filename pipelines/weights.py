"""DVC stage `weights` (always run, seconds): data/weights/<stage>.json, the sha256 of every weight file each stage
reads under the current params (mfim.assets.manifest). Stages depend on their manifest, so replacing a weight file at
the same path reruns the stages that read it, and only those."""

if __name__ == "__main__":
    from mfim.assets.manifest import write_manifests
    from mfim.config import exit_on_params_error, load_params

    with exit_on_params_error("weights"):
        params = load_params()
    for stage, path in write_manifests(params).items():
        print(f"weights: {stage} -> {path}")
