"""DVC stage `fit_regressor`: the fitted 3DMM regressors.

* `data/threedmm/regressor.pt`, the network inside L_shape / L_pose / L_exp on the embedded default. Synthetic data:
  fitted on its own aligned render set (`threedmm.regressor.render_identities` people never in the swapper's data;
  exact ground truth); real photos: on the train shards against the 3DMM table (`target: estimate`, distillation).
* `data/threedmm/evaluator.pt` (synthetic data, `threedmm.evaluator.render_identities` > 0): an independent shape and
  expression evaluator -- another network and seed, fitted on a render set of *other* people than the loss network
  saw (the shipped one at scale, `threedmm.evaluator.shipped_checkpoint`) -- which the evaluate stage uses for Shape,
  R-Shape and Expression, where 3DDFA_V2 cannot see BFM shape and reads expression at r ~0.24.

reports/regressor.json: per network, the validation error on held-out identities, the predict-the-mean baseline and
the error on the eval split (the swapper's evaluation identities, never used for fitting).

When no configured network reads the loss network (:func:`regressor_readers`: the paper configuration measures L_shape
with DECA and evaluates with 3DDFA_V2), nothing is fitted -- a CPU fit of ~1 h would sit on `train`'s critical path
for a file nobody opens: regressor.pt is then a marker naming why (loading it raises with that reason), and the report
says so.
"""

from mfim.runtime import ensure_allocator_env

SHARDS_DIR = "data/shards"
TABLE = "data/threedmm/params.parquet"
OUT = "data/threedmm/regressor.pt"
EVALUATOR_OUT = "data/threedmm/evaluator.pt"
REPORT = "reports/regressor.json"


def _fit(name: str, params: dict, out: str, train_pattern: str, eval_pattern, log) -> dict:
    from mfim.config import lookup
    from mfim.data.regressor_set import RenderSetConfig, render_aligned_set
    from mfim.data.synth import SynthConfig
    from mfim.data.regressor_fit import (FitConfig, fit_from_render_set, fit_from_table, regressor_config,
                                         use_shipped_regressor)

    group = lookup(params, f"threedmm.{name}")
    model_cfg = regressor_config(params, name)
    fit = FitConfig.from_params(params, name)
    synthetic = lookup(params, "data.source") == "synthetic"
    if group["shipped_checkpoint"] and synthetic:  # fitted on the same render recipe, at a scale 2 cores can't
        return use_shipped_regressor(group["shipped_checkpoint"], out, model_cfg, eval_pattern, TABLE, log=log,
                                     group=name)
    n_render = int(group["render_identities"])
    if n_render > 0 and synthetic:
        render = render_aligned_set(
            SynthConfig.from_params(lookup(params, "synthesize")),
            RenderSetConfig(identities=n_render, images_per_identity=int(group["render_images_per_identity"]),
                            identity_offset=int(group["identity_offset"]), size=model_cfg.input_size,
                            workers=int(lookup(params, "synthesize.render_workers"))),
            log=log,
        )
        return fit_from_render_set(render, out, model_cfg, fit, eval_pattern, TABLE, log=log)
    return fit_from_table(train_pattern, TABLE, out, group["target"], model_cfg, fit, eval_pattern=eval_pattern,
                          log=log)


def regressor_readers(params: dict) -> list[str]:
    """The params keys whose value makes a stage read data/threedmm/regressor.pt (``fitted``): the loss network
    (train, source_fit), the evaluation's 3DMM network, and a later threedmm precompute."""
    from mfim.config import lookup

    keys = ("loss.threedmm_encoder", "evaluate.threedmm_encoder", "threedmm.encoder")
    return [k for k in keys if str(lookup(params, k)) == "fitted"]


def _summary(name: str, report: dict) -> str:
    v = report.get("eval_split_error") or report["val_error"]
    took = (f"shipped, fitted elsewhere in {report['seconds']:.0f} s" if report.get("shipped_checkpoint") else
            f"{report['seconds']:.0f} s")
    return (f"{name}: {took}; eval-identity pose MAE {v['pose']['mae_deg']:.2f}°, shape r "
            f"{v['shape']['pearson_r']:.3f} (first 10: {v['shape']['pearson_r_first10']:.3f}), exp r "
            f"{v['exp']['pearson_r']:.3f}")


def main(params_path: str = "params.yaml") -> dict:
    import json
    import logging
    from pathlib import Path

    from mfim.config import load_params, lookup
    from mfim.data.shards import split_pattern
    from mfim.runtime import configure_threads

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = load_params(params_path)
    configure_threads(lookup(params, "project.threads"))
    has_eval = any(Path(SHARDS_DIR).glob("eval-*.tar"))
    eval_pattern = split_pattern(SHARDS_DIR, "eval") if has_eval else None
    train_pattern = split_pattern(SHARDS_DIR, "train")
    if regressor_readers(params):
        report = _fit("regressor", params, OUT, train_pattern, eval_pattern, print)
        print(_summary("fit_regressor (loss network)", report))
    else:
        from mfim.nets.threedmm_regressor import save_no_regressor

        why = (f"not needed: no configured network reads it (loss.threedmm_encoder: "
               f"{lookup(params, 'loss.threedmm_encoder')}, evaluate.threedmm_encoder: "
               f"{lookup(params, 'evaluate.threedmm_encoder')}, threedmm.encoder: "
               f"{lookup(params, 'threedmm.encoder')}; set one of them to fitted to fit it)")
        save_no_regressor(OUT, why)
        report = {"skipped": True, "why": why, "val_error": None, "train_loss": []}
        print(f"fit_regressor (loss network): {why}")
    if int(lookup(params, "threedmm.evaluator.render_identities")) > 0 and lookup(params, "data.source") == "synthetic":
        report["evaluator"] = _fit("evaluator", params, EVALUATOR_OUT, train_pattern, eval_pattern, print)
        print(_summary("fit_regressor (shape / expression evaluator)", report["evaluator"]))
    else:  # DVC declares the output: a marker that says why there is no evaluator (real photos have no renders)
        from mfim.nets.threedmm_regressor import save_no_regressor

        save_no_regressor(EVALUATOR_OUT, "threedmm.evaluator.render_identities is 0 or data.source is not synthetic")
    Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
    Path(REPORT).write_text(json.dumps(report, indent=1))

    import mlflow

    from mfim.tracking import start_run

    with start_run("fit_regressor", params, ["threedmm"]):
        for prefix, rep in (("", report), ("evaluator_", report.get("evaluator"))):
            if not rep:
                continue
            for split, err in (("val", rep.get("val_error")), ("eval", rep.get("eval_split_error"))):
                if err:
                    mlflow.log_metrics({f"{prefix}{split}_pose_mae_deg": err["pose"]["mae_deg"],
                                        f"{prefix}{split}_shape_pearson_r": err["shape"]["pearson_r"],
                                        f"{prefix}{split}_shape_pearson_r_first10": err["shape"]["pearson_r_first10"],
                                        f"{prefix}{split}_exp_pearson_r": err["exp"]["pearson_r"]})
        for step, loss in enumerate(report["train_loss"]):
            mlflow.log_metric("train_loss", loss, step=step)
        mlflow.log_artifact(REPORT)
    return report


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error

    with exit_on_params_error("fit_regressor"):
        main()
