"""The evaluate stage's MLflow run is open while it works: progress and partial metrics every batch, the final
metrics in the same run (small random MFIM and stub evaluation networks, as tests/test_evaluate_stream.py)."""

from tests.test_evaluate_stream import checkpoint  # noqa: F401 - the fixture
from tests.defaults import EVAL_BASE, params_with
from tests.stubs import stub_evaluation_networks, write_evalsets


def test_evaluate_logs_progress_while_it_runs_into_its_one_run(tmp_path, checkpoint, monkeypatch,  # noqa: F811
                                                               one_thread):
    import mlflow

    from mfim.evaluation.evaluate import run_evaluation
    from mfim.tracking import start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MFIM_PIPELINE_ID", raising=False)
    import mfim.evaluation.evaluate as evaluate

    real_logging = evaluate.log_to_mlflow
    stub_evaluation_networks(monkeypatch.setattr)
    monkeypatch.setattr(evaluate, "log_to_mlflow", real_logging)  # the stubs skip it; here it is the point
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=6, n_pairs=11, n_triplets=0)
    params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": 1,
                          "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/t.db", "experiment": "t",
                                     "artifact_root": str(tmp_path / "art")}},
              "evaluate": {"batch_size": 4, "bootstrap": 20}})
    with start_run("evaluate", params, groups=["evaluate"]) as run:  # as pipelines/evaluate.py opens it
        out = run_evaluation(params, model_path=checkpoint, evalsets_dir=evalsets, shards_dir=tmp_path / "no_shards",
                             raw_dir=tmp_path / "no_raw", reports_dir=tmp_path / "reports")
    client = mlflow.MlflowClient()
    done = client.get_metric_history(run.info.run_id, "progress.pairs")
    assert [(m.step, m.value) for m in done] == [(4, 4.0), (8, 8.0), (11, 11.0)]  # 11 pairs, batches of 4
    # the self-swap errors belong to the distinct targets, measured in the images pass (before the pairs pass)
    images = client.get_metric_history(run.info.run_id, "progress.images")
    partial = client.get_metric_history(run.info.run_id, "progress.self_swap_lpips")
    values = [m.value for m in images]
    assert values == sorted(values) and values[-1] == 6.0  # rows done after each batch; 6 distinct images
    # an image batch of sources only has no self-swap error to log
    assert 1 <= len(partial) <= len(images) and max(m.timestamp for m in partial) <= min(m.timestamp for m in done)
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # the end-of-stage logging went into the same run
    final = runs[0].data.metrics["swap.identity"]
    assert final == out["swap"]["identity"]
