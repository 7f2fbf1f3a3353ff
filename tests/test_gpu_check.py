"""benchmarks/gpu_check.py (issue 32): its --smoke mode runs every code path of the GPU check on the CPU, and what
the device call must send (working tree + carried folder) stays under the device tool's 64 MiB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"json": json.loads((out / "gpu_check.json").read_text()), "stdout": proc.stdout}


@pytest.mark.timeout(600)
def test_smoke_times_every_part_and_checks_numerics(smoke):
    r = smoke["json"]
    assert r["smoke"] and r["device"] == "cpu"
    rows = {(t["variant"], t["batch"]): t for t in r["train"]}
    today, fast = rows[("today", 1)], rows[("all_options", 1)]
    for row in (today, fast):
        assert "error" not in row and "skipped" not in row, row
        assert row["img_per_s"] > 0 and row["ms_per_step"] > 0
    assert fast["opt.compile"] == ["generator", "discriminator"] and fast["opt.channels_last"]
    # float32 on the CPU: every option computes the same step (a wrong kernel would be ~1)
    assert fast["grad_rel_diff"] < 1e-4 and fast["loss_rel_diff"] < 1e-5
    swaps = {(s["what"], s["variant"]) for s in r["swap"] if "ms_per_batch" in s}
    assert {("generator", "fp32 (today)"), ("swap", "fp32 (today)"),
            ("swap", "bf16+channels_last+compile")} <= swaps, r["swap"]
    assert r["profile"]["top_ops"] and r["profile"]["scalar_reads_per_step"] > 0
    assert set(r["goal"]) >= {"train_meets_goal", "swap_meets_goal", "swap_batch1_ms"}
    assert "goal:" in smoke["stdout"].splitlines()[-1]  # the table is printed last


def test_smoke_imports_only_what_the_gpu_machine_has_or_is_carried(smoke):
    carried = set(gpu_check.CARRY_PACKAGES) | {"mfim", "tests", "gpu_check"}
    extra = set(smoke["json"]["imported_packages"]) - gpu_check.REMOTE_PACKAGES - carried
    # torch's optional imports found in this venv (pydot: fx graph drawing) are tried, not required
    extra -= {"pydot", "pyparsing"}
    assert not extra, f"the check imports packages the GPU machine lacks and nobody carries: {sorted(extra)}"


def test_carry_list_builds_and_fits_the_device_limit(tmp_path):
    carry = gpu_check.prepare_carry(tmp_path)
    for name in gpu_check.CARRY_PACKAGES:
        assert (carry / "site" / name / "__init__.py").is_file()
    assert (carry / "mfim_home" / "assets" / "alexnet.ckpt").stat().st_size > 9_000_000
    sizes = gpu_check.travel_bytes(REPO, carry_root=tmp_path)
    assert sizes["carry"] > 9_000_000
    assert sizes["total"] < gpu_check.TRAVEL_LIMIT, {k: v / 2**20 for k, v in sizes.items()}
