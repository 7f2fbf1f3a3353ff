"""Turn a finished long run of the warmstart + train stages into checkpoints/mfim_synth64.pt (+ .json).

python docs/experiments/ship_swapper.py RUN_DIR   (RUN_DIR: a checkout where `warmstart` and `train` ran)

The shipped file is the run's data/train/mfim.pt (swapper format: generator + EMA encoder, loads with
`mfim.models.mfim.load_swapper`) plus the discriminator it was trained against, so `train` can continue from it.
The .json beside it records the exact params, wall times, and the warm-start and training curves.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import yaml

run = Path(sys.argv[1])
out = Path("checkpoints/mfim_synth64.pt")
swapper = torch.load(run / "data/train/mfim.pt", map_location="cpu", weights_only=True)
train_state = torch.load(run / "data/train/checkpoint.pt", map_location="cpu", weights_only=True)
swapper["discriminator"] = train_state["discriminator"]
torch.save(swapper, out)
params = yaml.safe_load((run / "params.yaml").read_text())
report = {
    "output": str(out),
    "output_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    "params": {k: params[k] for k in ("data", "generator", "encoder", "warmstart", "loss", "train", "project")},
    "warmstart": json.loads((run / "reports/warmstart.json").read_text()),
    "train": json.loads((run / "reports/train.json").read_text()),
    "train_curve": (run / "reports/plots/train_loss.csv").read_text().splitlines(),
    "wall_clock": {p.name: p.read_text().strip() for p in sorted(run.glob("long.*"))},
}
Path("checkpoints/mfim_synth64.json").write_text(json.dumps(report, indent=1) + "\n")
print(out, report["output_sha256"])
