"""The MLflow UI opens the project's experiment on its training runs, not on the GenAI overview: a headless Chromium
renders the address `make ui` / the report print (mfim.tracking.ui_url) from a real `mlflow server` on 127.0.0.1.
Slow (~1 min: the server's start and the page's scripts); skipped where no Chromium is installed."""

import shutil
import subprocess
import sys

import pytest

from tests.servers import free_port, stop, wait_until_it_answers

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _dom(url: str, screenshot) -> str:
    args = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
            "--virtual-time-budget=25000"]
    subprocess.run(args + [f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no Chromium (apt-get install chromium)")
@pytest.mark.timeout(400)
def test_ui_opens_the_experiment_on_its_training_runs(tmp_path):
    import mlflow

    from mfim.tracking import ui_url

    uri = f"sqlite:///{tmp_path}/t.db"
    params = {"project": {"mlflow": {"tracking_uri": uri, "experiment": "mfim", "artifact_root": str(tmp_path / "a")}}}
    port = free_port()
    url = ui_url(params, base=f"http://127.0.0.1:{port}")
    with mlflow.start_run(run_name="train E 3 steps seed 0"):
        mlflow.log_metric("loss", 1.0)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_it_answers(f"http://127.0.0.1:{port}/health", server, 120)
        dom = _dom(url, tmp_path / "runs.png")
        assert "train E 3 steps seed 0" in dom and "matching run" in dom  # the runs table
        assert "Detect Issues" not in dom and "Traces</" not in dom.split("Runs")[0]  # not the GenAI overview
        bare = _dom(url.split("?")[0], tmp_path / "bare.png")  # what the plain address shows on 3.17
        print(f"screenshots: {tmp_path / 'runs.png'}; without workflowType the run table shows: "
              f"{'train E 3 steps seed 0' in bare}")
    finally:
        stop(server)
