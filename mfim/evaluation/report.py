"""Markdown reports laid out like the paper's Tables 2-5, with the paper's published numbers beside ours.

The paper's rows are on FF++ / CelebA-HQ with VGGFace2 features, RingNet/FLAME parameters and the official Hopenet;
ours are on whatever protocol and evaluators the run used (stated under each table). They are comparable only when
those match -- the tables say so every time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PAPER_TABLE2 = {  # FaceForensics++; Identity, Shape, Expression, Pose, Pose-HN
    "Deepfakes": (120.907, 0.639, 0.802, 0.188, 4.588),
    "FaceShifter": (110.875, 0.658, 0.653, 0.177, 3.175),
    "SimSwap": (99.736, 0.662, 0.664, 0.178, 3.749),
    "HifiFace": (106.655, 0.616, 0.702, 0.177, 3.370),
    "InfoSwap": (104.456, 0.664, 0.698, 0.179, 4.043),
    "MegaFS": (110.897, 0.701, 0.678, 0.182, 5.456),
    "SmoothSwap": (101.678, 0.565, 0.722, 0.186, 4.498),
    "MFIM": (87.030, 0.553, 0.646, 0.175, 3.694),
}
PAPER_TABLE3 = {  # CelebA-HQ; Identity, Shape, Expression, Pose, Pose-HN, FID
    "MegaFS": (108.571, 0.906, 0.438, 0.071, 4.880, 14.446),
    "MFIM": (91.469, 0.782, 0.400, 0.057, 4.095, 4.946),
}
PAPER_TABLE4 = {  # CelebA-HQ ablation
    "A": (70.160, 0.383, 1.116, 0.145, 7.899),
    "B": (91.430, 0.823, 0.398, 0.051, 3.795),
    "C": (86.476, 0.635, 0.864, 0.085, 5.091),
    "D": (86.777, 0.634, 0.860, 0.078, 4.797),
    "E": (91.469, 0.782, 0.400, 0.057, 4.095),
}
PAPER_TABLE5 = {  # R-ID(gb), R-ID(lc), R-Shape(gb), R-Shape(lc)
    "local": (0.602, 0.398, 0.609, 0.391),
    "id_mixing": (0.515, 0.485, 0.466, 0.534),
    "global": (0.399, 0.601, 0.378, 0.622),
}
CONFIG_NAMES = {"A": "A. Baseline MFIM", "B": "B. + style maps", "C": "C. + L_shape", "D": "D. + L_pose",
                "E": "E. + L_exp"}
SWAP_COLS = ["identity", "shape", "expression", "pose", "pose_hn"]
HEADER = "| | Identity ↓ | Shape ↓ | Expression ↓ | Pose ↓ | Pose-HN ↓ |"


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}"


def _ci(detail: dict, name: str) -> str:
    d = detail.get("swap", {}).get(name)
    if not d:
        return "–"
    return f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def evaluator_warnings(detail: dict) -> list[str]:
    """What makes the run's numbers flatter the model, stated above the tables."""
    ev = detail.get("evaluators", {})
    out = []
    name = ev.get("threedmm_encoder")
    if name and name == ev.get("loss_threedmm_encoder"):
        out.append(
            f"**Warning**: Shape / Expression / Pose are measured with **{name}**, the 3DMM network the 3DMM losses "
            "trained against (`loss.threedmm_encoder`): a swapper optimised against a network scores well on that "
            "network, so these columns flatter it. Set `evaluate.threedmm_encoder` to another network (the paper "
            "trains with DECA and measures with RingNet)."
        )
    return out


def protocol_note(metrics: dict, detail: dict) -> str:
    ev = detail.get("evaluators", {})
    proto = detail.get("protocol", {})
    fd = detail.get("fd", {})
    lines = [f"- {w}" for w in evaluator_warnings(detail)] + [
        f"- Protocol: **{metrics.get('protocol')}** — {metrics.get('n_pairs')} pairs, {metrics.get('n_triplets')} "
        f"ID-mixing triplets. {proto.get('images', '')}",
        f"- Identity: L2 between features of **{ev.get('identity_embedder')}** (paper: VGGFace2 ResNet-50, "
        "un-normalised features); ID retrieval: top-1 nearest source identity by cosine.",
        f"- Shape / Expression / Pose: L2 of **{ev.get('threedmm_encoder')}** 3DMM parameters (shape and expression "
        f"{ev.get('coefficient_units', 'standardised by the 3DMM coefficient std')}; pose = "
        f"{ev.get('pose_parameters', 'yaw, pitch, roll')} in radians). Paper: RingNet/FLAME. Training: L_pose "
        f"{'with' if ev.get('loss_jaw_pose') else 'without'} FLAME's jaw rotation (`loss.jaw_pose`).",
        f"- Shape (and R-Shape) from **{ev.get('shape_encoder', ev.get('threedmm_encoder'))}**, leading "
        f"{ev.get('shape_coefficients', 'all')} coefficients; Expression from **"
        f"{ev.get('expression_encoder', ev.get('threedmm_encoder'))}**. Their own accuracy on unswapped images is "
        "`shape_pearson_r_on_real` / `exp_pearson_r_on_real` below.",
        f"- Pose-HN: L2 of (yaw, pitch, roll) in degrees from **{ev.get('pose_network')}** (paper: official "
        "Hopenet hopenet_robust_alpha1).",
        f"- Fréchet distance: **{metrics.get('fd', {}).get('name')}** (FID only when the official Inception "
        f"weights were given), over the pairs' targets (real) and swaps. {fd.get('resolution_note', '')}".rstrip(),
        "- Means over pairs with bootstrap 95% intervals in reports/metrics_detail.json.",
    ]
    fit = detail.get("source_fit", {})
    if fit.get("steps", 0):  # not the paper's feed-forward swap: say so beside the numbers
        lines.append(f"- Swaps: each source's ID style codes fitted at test time, **{fit['steps']} steps** "
                     f"(`source_fit`, not in the paper: L1 {fit.get('l1')} + LPIPS {fit.get('lpips')} + ID "
                     f"{fit.get('id')} against the source image); `source_fit.steps: 0` is the feed-forward swap.")
    torgb = int(detail.get("split", {}).get("source_torgb_max_res", 0) or 0)
    if torgb:  # not the paper's split either
        lines.append(f"- Code split: coarse layers from the target except the toRGB codes up to **{torgb} px**, from "
                     "the source (`encoder.source_torgb_max_res`, not in the paper: skin tone); 0 is the paper's split.")
    if metrics.get("protocol") == "synthetic":
        lines.append(
            "- **Not comparable to the paper's numbers**: different data (synthetic 3DMM renders at 64 px), "
            "different evaluation networks and parameter spaces. The paper's rows are shown for layout only."
        )
    return "\n".join(lines)


def swap_tables(metrics: dict, detail: dict) -> str:
    ours = metrics["swap"]
    row = "| **ours (" + metrics.get("protocol", "?") + ")** | " + " | ".join(_fmt(ours.get(c)) for c in SWAP_COLS)
    out = ["## Table 2 layout — face swapping (paper: FaceForensics++)", "", HEADER, "|---|---|---|---|---|---|"]
    out += [f"| {k} (paper, FF++) | " + " | ".join(_fmt(v) for v in vals) + " |" for k, vals in PAPER_TABLE2.items()]
    out += [row + " |", ""]
    out += ["## Table 3 layout — face swapping with FID (paper: CelebA-HQ)", "",
            HEADER + " FID ↓ |", "|---|---|---|---|---|---|---|"]
    out += [f"| {k} (paper, CelebA-HQ) | " + " | ".join(_fmt(v) for v in vals) + " |" for k, vals in PAPER_TABLE3.items()]
    fd = metrics.get("fd", {})
    out += [row + f" | {_fmt(fd.get('value'))} ({fd.get('name')}) |", ""]
    out += ["### Ours with 95% bootstrap intervals", "", "| metric | mean [95% CI] |", "|---|---|"]
    for c in SWAP_COLS + ["id_retrieval", "identity_to_target", "shape_to_target", "expression_to_source",
                          "pose_to_source", "shape_margin", "expression_margin", "pose_margin", "id_similarity_source",
                          "id_similarity_target", "pose_gt_deg", "pose_hn_gt_deg"]:
        if c in detail.get("swap", {}):
            out.append(f"| {c} | {_ci(detail, c)} |")
    out += ["", "*_margin: per pair, the distance to the image the swap should not match minus the distance to the "
            "one it should (> 0: nearer the right one), with the interval of that paired difference."]
    out += ["", "### How far to trust each evaluator (on real, unswapped eval images)", "", "| evaluator check | value |",
            "|---|---|"]
    for k, v in metrics.get("evaluators_on_real_images", {}).items():
        out.append(f"| {k} | {_fmt(v)} |")
    out += ["", "### Reconstruction (self-swap: source = target)", "", "| metric | value |", "|---|---|"]
    for k, v in metrics.get("reconstruction", {}).items():
        out.append(f"| {k} | {_fmt(v)} |")
    out += ["", "### Checks", ""]
    for k, v in metrics.get("checks", {}).items():
        out.append(f"- {k}: **{'yes' if v else 'no'}**")
    return "\n".join(out)


def mixing_table(metrics: dict) -> str:
    out = ["## Table 5 layout — ID mixing", "", "| | R-ID (gb) | R-ID (lc) | R-Shape (gb) | R-Shape (lc) |",
           "|---|---|---|---|---|"]
    names = {"local": "Local", "id_mixing": "ID mixing", "global": "Global"}
    for row, vals in PAPER_TABLE5.items():
        out.append(f"| {names[row]} (paper, CelebA-HQ) | " + " | ".join(_fmt(v) for v in vals) + " |")
    for row in PAPER_TABLE5:
        m = metrics.get("id_mixing", {}).get(row, {})
        out.append(f"| **{names[row]} (ours)** | " + " | ".join(
            _fmt(m.get(k)) for k in ("r_id_gb", "r_id_lc", "r_shape_gb", "r_shape_lc")) + " |")
    if not metrics.get("id_mixing"):
        out += ["", f"Ours: no ID-mixing triplets in the {metrics.get('protocol', '?')} protocol (the paper's ID-mixing "
                "analysis is on CelebA-HQ)."]
    out += ["", "R-X(gb) = D(x, x_gb) / (D(x, x_gb) + D(x, x_lc)); R-X(gb) + R-X(lc) = 1. 'Local'/'Global' are plain "
            "swaps with only the local / global source; 'ID mixing' takes global codes at the coarse-ID resolution "
            "and local codes above it."]
    return "\n".join(out)


ABLATION_COLS = SWAP_COLS + ["id_retrieval", "self_swap_lpips"]  # ours: + what separates A from B here
ABLATION_HEADER = HEADER.replace("| |", "| Configuration |") + " ID retrieval ↑ | Self-swap LPIPS ↓ | seeds |"
LOWER_IS_BETTER = {c: True for c in SWAP_COLS} | {"id_retrieval": False, "self_swap_lpips": True}


def ablation_rows_from_mlflow(params: dict) -> dict[str, list[dict]]:
    """Per train.config, the latest `evaluate` run of each train seed in the MLflow store (A-E runs from `dvc exp
    run`), among runs trained for the current train.steps (so a short smoke run does not stand in for a
    configuration). Runs from before the train.seed tag are left out, and so are runs whose swaps were made with a
    test-time source fit (tag ``source_fit.steps`` > 0): the ablation compares training configurations through the
    paper's feed-forward swap, as its Table 4 does (``-S source_fit.steps=0``; runs before the tag were feed-forward)."""
    try:
        import mlflow

        from mfim.tracking import configure

        configure(params)
        steps = str(params["train"]["steps"])
        runs = mlflow.search_runs(
            filter_string=f"tags.`mfim.stage` = 'evaluate' and tags.`train.steps` = '{steps}'",
            order_by=["start_time DESC"],
        )
    except Exception:  # noqa: BLE001 - no store yet: an empty table
        return {}
    rows: dict[str, list[dict]] = {}
    seen: set[tuple[str, str]] = set()
    for _, r in runs.iterrows():
        cfg = r.get("tags.train.config")
        seed = r.get("tags.train.seed")
        fit_steps = r.get("tags.source_fit.steps")
        if isinstance(fit_steps, str) and fit_steps != "0":
            continue
        # runs from before the seed tag (an older model, as a rule) cannot be placed in a seed column: left out
        if not isinstance(cfg, str) or not isinstance(seed, str) or (cfg, seed) in seen:
            continue
        seen.add((cfg, seed))
        row = {c: r.get(f"metrics.swap.{c}") for c in SWAP_COLS + ["id_retrieval"]}
        row["self_swap_lpips"] = r.get("metrics.reconstruction.self_swap_lpips")
        split = r.get("tags.encoder.source_torgb_max_res")
        row.update(run_id=r.get("run_id"), experiment=r.get("tags.dvc.experiment") or "", seed=seed,
                   source_torgb_max_res=split if isinstance(split, str) else "0")
        rows.setdefault(cfg, []).append(row)
    return rows


ABLATION_RUNS = Path("reports/ablation_runs.json")  # committed rows of the runs behind the shipped ablation.md


def export_ablation_runs(params: dict, path: str | Path | None = None) -> Path:
    """Write the ablation rows (latest run per configuration and seed, current train.steps) to a JSON file that
    travels with the repository, so a fresh clone's `report` stage shows them without the runs' store. The rows
    already in that file stay unless this store has its own run of the same configuration and seed: a checkout
    that ran only some of the configurations adds them without dropping the others."""
    from mfim.atomic import atomic_write

    rows = merged_ablation_rows(params, path)
    steps = params["train"]["steps"]
    payload = {"train_steps": steps, "note": "exported by `python pipelines/report.py --export-ablation`",
               "rows": {cfg: runs for cfg, runs in sorted(rows.items())}}
    path = Path(path or ABLATION_RUNS)
    data = (json.dumps(payload, indent=1, default=str) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))
    return path


def load_ablation_runs(params: dict, path: str | Path | None = None) -> dict[str, list[dict]]:
    """Rows from an exported file (default :data:`ABLATION_RUNS`), when it was made with the current train.steps."""
    path = Path(path or ABLATION_RUNS)
    if not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    if str(payload.get("train_steps")) != str(params["train"]["steps"]):
        return {}
    return {cfg: list(runs) for cfg, runs in payload.get("rows", {}).items()}


def merged_ablation_rows(params: dict, path: str | Path | None = None) -> dict[str, list[dict]]:
    """The exported rows, with this store's own runs in place of any (configuration, seed) they repeat."""
    rows = load_ablation_runs(params, path)
    for cfg, runs in ablation_rows_from_mlflow(params).items():
        seeds = {r.get("seed") for r in runs}
        rows[cfg] = runs + [r for r in rows.get(cfg, []) if r.get("seed") not in seeds]
    return rows


def _values(runs: list[dict], col: str) -> list[float]:
    """The seeds' values of ``col``, without missing ones (None, or NaN from an MLflow frame)."""
    return [float(r[col]) for r in runs if r.get(col) is not None and r.get(col) == r.get(col)]


def _spread(runs: list[dict], col: str) -> tuple[float, float] | None:
    """(mean, half range) over the seeds' values of ``col``; None when no run has it."""
    vals = _values(runs, col)
    if not vals:
        return None
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2.0


def _fmt_spread(ms: tuple[float, float] | None, n: int) -> str:
    if ms is None:
        return "–"
    return f"{ms[0]:.3f} ± {ms[1]:.3f}" if n > 1 else f"{ms[0]:.3f}"


def beyond_seed_noise(rows: dict[str, list[dict]]) -> list[str]:
    """Each step of the ablation (A->B, B->C, ...) per column: the change of the seed mean, and whether it exceeds
    seed noise, i.e. the two configurations' seed ranges do not overlap (needs two seeds or more on both sides)."""
    out = []
    order = [c for c in PAPER_TABLE4 if c in rows]
    for a, b in zip(order, order[1:]):
        if len(rows[a]) < 2 or len(rows[b]) < 2:
            continue
        parts = []
        for col in ABLATION_COLS:
            va, vb = _values(rows[a], col), _values(rows[b], col)
            if len(va) < 2 or len(vb) < 2:
                continue
            delta = sum(vb) / len(vb) - sum(va) / len(va)
            apart = max(va) < min(vb) or max(vb) < min(va)
            better = (delta < 0) == LOWER_IS_BETTER[col]
            verdict = ("better" if better else "worse") if apart else "within seed noise"
            parts.append(f"{col} {delta:+.3f} ({verdict})")
        out.append(f"- {a} -> {b}: " + "; ".join(parts))
    return out


def ablation_table(params: dict, current: str, metrics: dict) -> str:
    rows = merged_ablation_rows(params)
    feed_forward = int(params["source_fit"]["steps"]) == 0
    split = str(params["encoder"]["source_torgb_max_res"])
    if current not in rows and feed_forward:  # the current run stands in only when it is a feed-forward one
        cur = {c: metrics["swap"].get(c) for c in SWAP_COLS + ["id_retrieval"]}
        cur["self_swap_lpips"] = metrics.get("reconstruction", {}).get("self_swap_lpips")
        cur["source_torgb_max_res"] = split
        rows[current] = [cur]
    out = ["# Ablation (paper Table 4 layout)", "", HEADER.replace("| |", "| Configuration |"), "|---|---|---|---|---|---|"]
    for cfg, vals in PAPER_TABLE4.items():
        out.append(f"| {CONFIG_NAMES[cfg]} (paper, CelebA-HQ) | " + " | ".join(_fmt(v) for v in vals) + " |")
    out += ["", "Ours: mean ± half range over the seeds (train.seed) of each configuration.", "",
            ABLATION_HEADER, "|" + "---|" * (len(ABLATION_COLS) + 2)]
    for cfg in PAPER_TABLE4:
        runs = rows.get(cfg)
        if not runs:
            out.append(f"| **{CONFIG_NAMES[cfg]} (ours)** | not run yet |" + " |" * len(ABLATION_COLS))
            continue
        seeds = ", ".join(sorted(str(r.get("seed", "?")) for r in runs))
        out.append(f"| **{CONFIG_NAMES[cfg]} (ours)** | "
                   + " | ".join(_fmt_spread(_spread(runs, c), len(runs)) for c in ABLATION_COLS) + f" | {seeds} |")
    other = sorted({str(r.get("source_torgb_max_res", "0")) for runs in rows.values() for r in runs} - {split})
    if other:
        out += ["", f"Note: rows trained with encoder.source_torgb_max_res {', '.join(other)} (rows without the "
                f"record predate the option: 0, the paper's split), while the current params say {split}: each "
                "configuration is compared under the split it was trained with; the commands below re-run them "
                "under the current one."]
    steps = beyond_seed_noise(rows)
    if steps:
        out += ["", "Differences between neighbouring configurations (change of the seed mean; beyond seed noise when "
                "the two seed ranges do not overlap):", ""] + steps
    out += ["", "Our rows: the latest `evaluate` run of each configuration and seed with the current train.steps and "
            "the feed-forward swap (source_fit.steps 0, as the paper's table; reports/metrics.json may use the test-time "
            "source fit), from "
            f"the MLflow store and from {ABLATION_RUNS} (the runs behind the committed table; the store's own runs "
            "replace those of the same configuration and seed). To fill them:", "",
            "```", "for c in A B C D E; do for s in 0 1; do",
            "  dvc exp run --queue -S train.config=$c -S train.seed=$s -S source_fit.steps=0; done; done",
            "dvc exp run --run-all",
            "dvc exp show --only-changed", "python pipelines/report.py   # rebuilds this file",
            "python pipelines/report.py --export-ablation   # keeps the rows in " + str(ABLATION_RUNS), "```"]
    return "\n".join(out)


def write_reports(params: dict, reports_dir="reports") -> list[Path]:
    reports_dir = Path(reports_dir)
    metrics = json.loads((reports_dir / "metrics.json").read_text())
    detail_path = reports_dir / "metrics_detail.json"
    detail = json.loads(detail_path.read_text()) if detail_path.is_file() else {}
    for w in evaluator_warnings(detail):
        log.warning(w.replace("**", ""))
    note = protocol_note(metrics, detail)
    tables = reports_dir / "tables.md"
    tables.write_text(
        "# MFIM evaluation\n\n" + note + "\n\n" + swap_tables(metrics, detail) + "\n\n" + mixing_table(metrics) + "\n\n"
        "Images: reports/grids/swaps.png (source | target | swap | E+), id_mixing.png (global | local | target | mix), "
        "style_maps.png (target | self-swap | self-swap without style maps), paste_back.png (raw target | E+ pasted).\n"
    )
    current = str(params["train"]["config"]).upper()
    ablation = reports_dir / "ablation.md"
    ablation.write_text(ablation_table(params, current, metrics) + "\n\n" + note + "\n")
    return [tables, ablation]


PAPER_COLUMNS = {"identity": "Identity", "shape": "Shape", "expression": "Expression", "pose": "Pose",
                 "pose_hn": "Pose-HN", "id_retrieval": "ID retrieval"}


def paper_metrics(metrics: dict) -> dict:
    """The paper's columns (Tables 2-3) under its names, for `dvc metrics diff` between experiments."""
    out = {name: metrics["swap"].get(key) for key, name in PAPER_COLUMNS.items()}
    fd = metrics.get("fd", {})
    out["FID" if fd.get("name") == "fid" else f"FD ({fd.get('name')})"] = fd.get("value")
    out["Self-swap LPIPS"] = metrics.get("reconstruction", {}).get("self_swap_lpips")
    return out


def write_plot_data(params: dict, reports_dir: str | Path = "reports", metrics: dict | None = None,
                    detail: dict | None = None) -> list[Path]:
    """What `dvc plots` draws besides the training losses (dvc.yaml `plots:`), and the paper's columns as a metrics
    file: reports/plots/ablation.csv (one row per configuration and seed, the rows of reports/ablation.md),
    evaluator_accuracy.csv (each evaluator's check on real images), metric_intervals.csv (means with their 95%
    bootstrap interval), reports/paper_metrics.json."""
    import pandas as pd

    reports_dir = Path(reports_dir)
    metrics = metrics if metrics is not None else json.loads((reports_dir / "metrics.json").read_text())
    if detail is None:
        detail_path = reports_dir / "metrics_detail.json"
        detail = json.loads(detail_path.read_text()) if detail_path.is_file() else {}
    plots = reports_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = [{"config": cfg, "seed": str(r.get("seed", "?")), **{c: r.get(c) for c in ABLATION_COLS}}
            for cfg, runs in sorted(merged_ablation_rows(params).items()) for r in runs]
    ablation = plots / "ablation.csv"
    pd.DataFrame(rows, columns=["config", "seed", *ABLATION_COLS]).to_csv(ablation, index=False)
    accuracy = plots / "evaluator_accuracy.csv"
    pd.DataFrame(sorted(metrics.get("evaluators_on_real_images", {}).items()),
                 columns=["evaluator_check", "value"]).to_csv(accuracy, index=False)
    intervals = plots / "metric_intervals.csv"
    pd.DataFrame([{"metric": k, "mean": v["mean"], "ci_low": v["ci_low"], "ci_high": v["ci_high"]}
                  for k, v in detail.get("swap", {}).items() if isinstance(v, dict) and "ci_low" in v],
                 columns=["metric", "mean", "ci_low", "ci_high"]).to_csv(intervals, index=False)
    paper = reports_dir / "paper_metrics.json"
    paper.write_text(json.dumps(paper_metrics(metrics), indent=2) + "\n")
    return [ablation, accuracy, intervals, paper]
