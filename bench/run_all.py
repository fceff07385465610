"""Run every benchmark in bench/ in turn (``make bench``); pass ``--quick`` for short runs.

Each benchmark prints its own table with ratios against a baseline measured in the same run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ORDER = ["train", "quality", "bundles", "repurchase", "export", "realtime", "serve", "experiments", "scale"]


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    scripts = [here / f"{name}.py" for name in ORDER if (here / f"{name}.py").exists()]
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script), *argv])
        print(f"=== {script.name}: exit {rc} in {time.perf_counter() - start:.1f}s", flush=True)
        if rc:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
