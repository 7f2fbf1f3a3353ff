"""The markdown reports: every table row has as many cells as its header, and the paper's numbers are where they belong."""

from __future__ import annotations

from mfim.evaluation import report


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
    monkeypatch.setattr(report, "ablation_rows_from_mlflow", lambda params: {"B": {c: 1.0 for c in report.SWAP_COLS}})
    m = _metrics()
    text = "\n\n".join([report.swap_tables(m, {}), report.mixing_table(m), report.ablation_table({}, "E", m)])
    tables = _tables(text)
    assert len(tables) >= 6
    for t in tables:
        want = _cells(t[0])
        assert all(_cells(line) == want for line in t), t


def test_paper_rows_and_ours_sit_in_their_tables():
    text = report.swap_tables(_metrics(), {})
    t2, t3 = _tables(text)[:2]
    assert "| MFIM (paper, FF++) | 87.030 | 0.553 | 0.646 | 0.175 | 3.694 |" in t2
    assert "| MFIM (paper, CelebA-HQ) | 91.469 | 0.782 | 0.400 | 0.057 | 4.095 | 4.946 |" in t3
    assert t3[-1] == "| **ours (synthetic)** | 0.100 | 0.200 | 0.300 | 0.400 | 0.500 | 12.500 (fd_lpips_alex) |"
    assert t3[0].endswith("| Pose-HN ↓ | FID ↓ |")
