"""The markdown reports: every table row has as many cells as its header, and the paper's numbers are where they belong."""

from __future__ import annotations

import json

from mfim.evaluation import report
from tests.defaults import params_with

# the params these report tests were written for: the feed-forward swap and the paper's code split
REPORT_BASE = {"source_fit": {"steps": 0}, "encoder": {"source_torgb_max_res": 0}}


def _params(overrides: dict | None = None) -> dict:
    return params_with(REPORT_BASE, overrides or {})


def _metrics() -> dict:
    swap = {c: 0.1 * (i + 1) for i, c in enumerate(report.SWAP_COLS)}
    mixing = {row: {"r_id_gb": 0.4, "r_id_lc": 0.6, "r_shape_gb": 0.5, "r_shape_lc": 0.5} for row in report.PAPER_TABLE5}
    return {"protocol": "synthetic", "swap": swap, "fd": {"name": "fd_lpips_alex", "value": 12.5},
            "id_mixing": mixing, "checks": {"id_closer_to_source_than_target": True}}


def _tables(markdown: str) -> list[list[str]]:
    """Consecutive `|`-lines of a markdown text, as lists of lines (one list per table)."""
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _cells(line: str) -> int:
    return line.strip().strip("|").count("|") + 1


def test_every_table_row_has_as_many_cells_as_its_header(monkeypatch):
    monkeypatch.setattr(report, "ablation_rows_from_mlflow",
                        lambda params: {"B": [{c: 1.0 for c in report.ABLATION_COLS} | {"seed": "0"}]})
    m = _metrics()
    text = "\n\n".join([report.swap_tables(m, {}), report.mixing_table(m),
                        report.ablation_table(_params(), "E", m)])
    tables = _tables(text)
    assert len(tables) >= 6
    for t in tables:
        want = _cells(t[0])
        assert all(_cells(line) == want for line in t), t


def _runs(seed_values: dict[str, list[float]]) -> dict[str, list[dict]]:
    """Ablation rows with every column at the given per-seed values."""
    return {cfg: [{c: v for c in report.ABLATION_COLS} | {"seed": str(i)} for i, v in enumerate(vals)]
            for cfg, vals in seed_values.items()}


def test_ablation_rows_give_seed_means_spreads_and_which_steps_exceed_seed_noise(monkeypatch):
    rows = _runs({"A": [1.0, 1.2], "B": [0.5, 0.7], "C": [0.6, 0.8], "D": [0.65, 0.75]})
    monkeypatch.setattr(report, "ablation_rows_from_mlflow", lambda params: rows)
    monkeypatch.setattr(report, "load_ablation_runs", lambda params, path=None: {})  # not reports/'s exported rows
    text = report.ablation_table(_params(), "E", _metrics())
    ours = _tables(text)[1]
    a_row = next(line for line in ours if line.startswith("| **A."))
    assert "| 1.100 ± 0.100 |" in a_row and a_row.endswith("| 0, 1 |")
    assert any(line.startswith("| **E.") and "| 0.100 |" in line for line in ours)  # the current run, one seed
    steps = report.beyond_seed_noise(rows)
    assert steps[0].startswith("- A -> B: identity -0.500 (better)")
    assert "id_retrieval -0.500 (worse)" in steps[0]  # higher is better there
    assert steps[1].startswith("- B -> C: identity +0.100 (within seed noise)")
    assert len(steps) == 3  # E has one seed: no verdict for D -> E


def test_a_run_with_the_test_time_source_fit_does_not_stand_in_for_its_configuration(monkeypatch):
    """The ablation compares training configurations through the feed-forward swap: reports/metrics.json made with
    source_fit.steps > 0 is not put in the table as configuration E (its retrieval would look like E's)."""
    monkeypatch.setattr(report, "ablation_rows_from_mlflow", lambda params: {})
    monkeypatch.setattr(report, "load_ablation_runs", lambda params, path=None: {})
    fitted = _tables(report.ablation_table(_params({"source_fit": {"steps": 50}}), "E", _metrics()))[1]
    assert any(line.startswith("| **E.") and "not run yet" in line for line in fitted)
    plain = _tables(report.ablation_table(_params({"source_fit": {"steps": 0}}), "E", _metrics()))[1]
    assert any(line.startswith("| **E.") and "| 0.100 |" in line for line in plain)


def test_exported_ablation_rows_travel_and_the_stores_own_runs_replace_theirs(tmp_path, monkeypatch):
    exported = _runs({"A": [1.0, 1.2], "B": [0.5, 0.7]})
    monkeypatch.setattr(report, "ablation_rows_from_mlflow", lambda params: exported)
    path = report.export_ablation_runs(_params({"train": {"steps": 100}}), tmp_path / "runs.json")
    assert report.load_ablation_runs(_params({"train": {"steps": 100}}), path) == exported
    assert report.load_ablation_runs(_params({"train": {"steps": 5}}), path) == {}  # other steps: not these rows
    # a fresh store with a new run of B seed 1 and one of C: B seed 0 and all of A come from the file
    own = {"B": [{c: 9.0 for c in report.ABLATION_COLS} | {"seed": "1"}], "C": [{"identity": 2.0, "seed": "0"}]}
    monkeypatch.setattr(report, "ablation_rows_from_mlflow", lambda params: own)
    merged = report.merged_ablation_rows(_params({"train": {"steps": 100}}), path)
    assert [r["identity"] for r in merged["B"]] == [9.0, 0.5] and len(merged["A"]) == 2 and merged["C"][0]["seed"] == "0"
    # exporting from that store keeps the file's other rows (a checkout that ran only B and C drops no A)
    report.export_ablation_runs(_params({"train": {"steps": 100}}), path)
    assert report.load_ablation_runs(_params({"train": {"steps": 100}}), path) == json.loads(json.dumps(merged))


def test_paper_rows_and_ours_sit_in_their_tables():
    text = report.swap_tables(_metrics(), {})
    t2, t3 = _tables(text)[:2]
    assert "| MFIM (paper, FF++) | 87.030 | 0.553 | 0.646 | 0.175 | 3.694 |" in t2
    assert "| MFIM (paper, CelebA-HQ) | 91.469 | 0.782 | 0.400 | 0.057 | 4.095 | 4.946 |" in t3
    assert t3[-1] == "| **ours (synthetic)** | 0.100 | 0.200 | 0.300 | 0.400 | 0.500 | 12.500 (fd_lpips_alex) |"
    assert t3[0].endswith("| Pose-HN ↓ | FID ↓ |")


def _evaluators(threedmm: str, loss: str) -> dict:
    return {"evaluators": {"identity_embedder": "dlib", "threedmm_encoder": threedmm, "loss_threedmm_encoder": loss}}


def test_report_warns_when_the_evaluation_3dmm_is_the_loss_network(tmp_path, monkeypatch, caplog):
    import json

    same = report.protocol_note(_metrics(), _evaluators("deca", "deca"))
    assert "**Warning**" in same and "**deca**" in same and "evaluate.threedmm_encoder" in same
    assert "Warning" not in report.protocol_note(_metrics(), _evaluators("tddfa", "deca"))
    deca = _evaluators("deca", "fitted")
    deca["evaluators"].update(coefficient_units="standardised by data/threedmm/stats.json",
                              pose_parameters="yaw, pitch, roll + FLAME jaw rotation", loss_jaw_pose=True)
    note = report.protocol_note(_metrics(), deca)
    assert "standardised by data/threedmm/stats.json" in note and "+ FLAME jaw rotation in radians" in note
    assert "L_pose with FLAME's jaw rotation" in note
    # written reports carry it, and the stage log says it
    monkeypatch.setattr(report, "ablation_rows_from_mlflow", lambda params: {})
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
    (tmp_path / "metrics_detail.json").write_text(json.dumps(_evaluators("deca", "deca")))
    with caplog.at_level("WARNING"):
        tables, ablation = report.write_reports(_params(), tmp_path)
    assert "**Warning**" in tables.read_text() and "**Warning**" in ablation.read_text()
    assert any("measured with deca" in r.getMessage() for r in caplog.records)


def test_configs_evaluate_3dmm_with_another_network_than_the_loss():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    for name in ("params.yaml", "configs/paper.yaml"):
        p = yaml.safe_load((root / name).read_text())
        assert p["evaluate"]["threedmm_encoder"] != p["loss"]["threedmm_encoder"], name


def test_report_says_at_which_resolution_the_fd_compares():
    detail = {"fd": {"resolution": 256, "resolution_note": "Compared at 256 px (generated images area-downsampled "
                                                           "from 1024 px) before the feature network's own resize."}}
    assert "Compared at 256 px (generated images area-downsampled from 1024 px)" in report.protocol_note(_metrics(),
                                                                                                         detail)


def test_the_ablation_says_when_its_rows_were_trained_under_another_code_split(monkeypatch):
    """Rows without a split record predate encoder.source_torgb_max_res (the paper's split, 0): with another value in
    the params the table says so instead of passing them off as the current default's."""
    monkeypatch.setattr(report, "load_ablation_runs", lambda params, path=None: {})
    rows = _runs({"A": [1.0, 1.2]})
    monkeypatch.setattr(report, "ablation_rows_from_mlflow", lambda params: rows)
    assert "source_torgb_max_res" not in report.ablation_table(_params(), "E", _metrics())
    text = report.ablation_table(_params({"encoder": {"source_torgb_max_res": 8}}), "E", _metrics())
    assert "rows trained with encoder.source_torgb_max_res 0" in text and "current params say 8" in text
    rows["A"][0]["source_torgb_max_res"] = rows["A"][1]["source_torgb_max_res"] = "8"
    split8 = _params({"encoder": {"source_torgb_max_res": 8}})
    assert "Note: rows trained" not in report.ablation_table(split8, "E", _metrics())


def test_the_protocol_note_names_a_split_that_is_not_the_papers():
    m = _metrics()
    assert "Code split" not in report.protocol_note(m, {})
    assert "Code split" not in report.protocol_note(m, {"split": {"source_torgb_max_res": 0}})
    assert "toRGB codes up to **4 px**" in report.protocol_note(m, {"split": {"source_torgb_max_res": 4}})
