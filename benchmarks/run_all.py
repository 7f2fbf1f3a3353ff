"""Run every benchmark (each prints its figures as ratios against a baseline measured in the same process)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = [
    ["bench_generator.py"],
    ["bench_generator_1024.py"],
    ["bench_reader.py"],
    ["bench_train.py"],
    ["bench_watermark.py", "--keys", "5"],
    ["bench_evaluate.py"],
    ["bench_dlib_resnet.py"],
]

if __name__ == "__main__":
    failed = 0
    for args in BENCHES:
        print(f"\n=== {args[0]} ===", flush=True)
        failed += subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]]).returncode != 0
    sys.exit(1 if failed else 0)
