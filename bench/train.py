"""Training speed: ``recsvc train`` against the 20-line script a shop would write, as whole processes.

    .venv/bin/python bench/train.py                    # every data set, 3 alternating runs each
    .venv/bin/python bench/train.py --quick            # smaller synthetic sets, 1 run
    .venv/bin/python bench/train.py --sets grocery,instacart --repeat 5
    .venv/bin/python bench/train.py --before main      # also the code of a git revision, same run
    .venv/bin/python bench/train.py --data-dir /work/shared/data   # where the public data sets are

Three sides per data set, each a fresh process started by this one (interpreter start-up, imports,
reading, fitting, writing and exit all count), alternating in a rotating order, ``--repeat`` times:

* ``script``: ``bench/als_script.py`` -- pyarrow CSV read, dictionary-encoded ids, a CSR of
  weights view 1 / cart 4 / purchase 10, implicit ALS (64 factors, 15 iterations), ``np.save`` of
  the factors. The floor: no validation, no model beyond ALS, no evaluation, nothing to serve.
* ``no-eval``: ``recsvc train --no-evaluate`` (the same 64 factors and 15 iterations by default).
* ``train``: the default ``recsvc train`` (the evaluation on a held-out split first).

With ``--before REV`` the two train sides also run on the code of git revision ``REV``
(exported with ``git archive`` under var/bench/; the worktree is untouched) in the same rounds.

Each process's wall time is measured here, its CPU time (user + system) by ``os.wait4``, its peak
RSS (Linux ``VmHWM``) by the process itself at its end. Medians over the runs are printed with the
ratios to the script (targets: ``no-eval`` <= 1.3x the script's wall, CPU and peak memory, the
default ``train`` <= 3x), then per stage: train's stages from the manifest (``timings_s``; CPU and
the peak RSS reached by the end of each stage from ``resources``), ``start`` (interpreter and
imports) and ``rest`` (what ``main`` spends outside the stages: the command's own imports, the
artifact's files and documents after the manifest's ``write`` stage, exit), against the
script's own stages (read, matrix, fit, write) where a stage has a counterpart.

Data sets (prepared once under var/bench/, never in the repository):

* ``synthetic``: ``training/synth.py``'s shop of ~5.3M events (135k users, 27k items; ``--quick``
  ~500k events);
* ``grocery``: grocery-shaped purchases (``bench/bundles.py``'s generator: 124k orders x 68k
  items x 2.5k customers, ~1.2M purchases, 130 categories; ``--quick`` 30k orders x 20k items) --
  the shape of the real receipts where the catalogue-sized costs showed;
* ``online-retail-uci-baskets``: the 22k UCI Online Retail invoices, each an anonymous shopper
  (the file has no customers: every "user" has one basket, so a time split has no returning
  user and the evaluation scores nobody -- it is trained, but evaluated only by its note);
* ``online-retail-uci``: the UCI row file (10k rows, with customers);
* ``instacart``: the Instacart sample (593 users' complete histories, 150k lines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
WORK = REPO / "var" / "bench"
SCRIPT = Path(__file__).resolve().parent / "als_script.py"
SETS = ("synthetic", "grocery", "online-retail-uci-baskets", "online-retail-uci", "instacart")
TARGETS = {"no-eval": 1.3, "train": 3.0}
# Runs ``recsvc.cli.main`` from a code tree as the ``recsvc`` console script would, and reports how
# long the imports and the command took inside the process (the parent times the whole process)
# and the process's peak RSS (VmHWM: ``wait4``'s ru_maxrss would count this parent's RSS at fork).
BOOTSTRAP = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv.pop(1))
out = sys.argv.pop(1)
from recsvc.cli import main
t1 = time.perf_counter()
try:
    main(sys.argv[1:], prog_name="recsvc", standalone_mode=False)
finally:
    t2 = time.perf_counter()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        json.dump({"imports_s": t1 - t0, "main_s": t2 - t1, "peak_mb": peak}, f)
"""


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def synthetic(quick: bool) -> tuple[Path, Path]:
    from training.synth import write_shop

    users = 13_513 if quick else 135_135  # ~39 events per user: ~530k / ~5.3M events
    folder = WORK / f"synthetic-{users}u-{users // 5}i"
    if not (folder / "events.csv").exists():
        write_shop(folder, seed=7, n_users=users, n_items=users // 5, days=90)
    return folder / "events.csv", folder / "catalog.csv"


def grocery(quick: bool) -> tuple[Path, Path]:
    """``bench/bundles.py``'s grocery-shaped orders written as an events file and a catalogue."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    sys.path.insert(0, str(REPO / "bench"))
    from bundles import grocery_orders, grocery_shape

    shape = grocery_shape(quick)
    folder = WORK / f"grocery-{shape['n_orders']}o-{shape['n_items']}i"
    if not (folder / "events.csv").exists():
        events, category = grocery_orders(**shape)
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "user_id": pa.array(events.user_id, pa.string()),
                "item_id": pa.array(events.item_id, pa.string()),
                "event": pa.array(np.full(len(events), "purchase", dtype=object), pa.string()),
                "timestamp": pa.array(events.timestamp),
                "order_id": pa.array(events.order_id, pa.string()),
            }
        )
        catalog = pa.table(
            {
                "item_id": pa.array([f"sku{i:06d}" for i in range(len(category))], pa.string()),
                "category": pa.array([f"aisle{c}" for c in category], pa.string()),
            }
        )
        for name, data in (("events.csv", table), ("catalog.csv", catalog)):
            pa_csv.write_csv(data, folder / f".{name}")
            (folder / f".{name}").replace(folder / name)
    return folder / "events.csv", folder / "catalog.csv"


def dataset(name: str, quick: bool, data_dir: Path) -> tuple[Path, Path | None] | None:
    """``(events, catalog)`` of a data set, prepared once; None when its source is not there."""
    if name == "synthetic":
        return synthetic(quick)
    if name == "grocery":
        return grocery(quick)
    from training.datasets import convert

    try:
        result = convert(name, data_dir, WORK / "datasets" / name)
    except FileNotFoundError:
        return None
    return result.events, result.catalog


# --------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------


def run_process(cmd: list[str], scratch: Path) -> dict[str, Any]:
    """Run ``cmd`` to its end; wall (measured here), CPU (``wait4``), its stdout."""
    out_path, err_path = scratch / "stdout", scratch / "stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(out_path.read_text() + err_path.read_text())
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "stdout": out_path.read_text(),
    }


def run_script(events: Path, threads: int, scratch: Path) -> dict[str, Any]:
    out = scratch / "factors"
    out.mkdir(exist_ok=True)
    result = run_process([sys.executable, str(SCRIPT), str(events), str(out), str(threads)], scratch)
    report = json.loads(result.pop("stdout").strip().splitlines()[-1])
    stages = report["stages"]
    # "start" is everything before the script's first line ran: interpreter and imports.
    inner = sum(v[0] for k, v in stages.items() if k != "start")
    stages["start"] = [result["wall_s"] - inner, None, stages["start"][2]]
    peak = max(v[2] for v in stages.values())
    return result | {"stages": stages, "nnz": report["nnz"], "shape": report["shape"], "peak_mb": peak}


def run_train(
    tree: Path, events: Path, catalog: Path | None, threads: int, evaluate: bool, scratch: Path
) -> dict[str, Any]:
    models = scratch / "models"
    shutil.rmtree(models, ignore_errors=True)
    inner = scratch / "inner.json"
    cmd = [sys.executable, "-c", BOOTSTRAP, str(tree), str(inner), "train", "--events", str(events)]
    cmd += ["--models-dir", str(models), "--threads", str(threads), "--no-progress"]
    cmd += (["--catalog", str(catalog)] if catalog else []) + ([] if evaluate else ["--no-evaluate"])
    result = run_process(cmd, scratch)
    result.pop("stdout")
    times = json.loads(inner.read_text())
    (version,) = [p for p in models.iterdir() if not p.name.startswith(".")]
    manifest = json.loads((version / "manifest.json").read_text())
    timings = dict(manifest["timings_s"])
    resources = manifest.get("resources", {})
    stages: dict[str, list[float | None]] = {
        "start": [result["wall_s"] - times["main_s"], None, None],
    }
    for stage, wall in timings.items():
        cpu = resources.get("cpu_s", {}).get(stage)
        stages[stage] = [wall, cpu, resources.get("peak_rss_mb", {}).get(stage)]
    # The artifact's files, checksums, the printed table and the exit: the rest of the process.
    stages["rest"] = [times["main_s"] - sum(timings.values()), None, None]
    return result | {
        "peak_mb": times["peak_mb"],
        "stages": stages,
        "counts": manifest["counts"],
        "rows_read": manifest["load_report"]["rows_read"],
        "metrics": _headline(manifest.get("metrics", {})),
    }


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    split = metrics.get("split", {})
    return {
        "note": metrics.get("note"),
        "scored_test_users": split.get("scored_test_users"),
        "ndcg@10": metrics.get("model", {}).get("ndcg@10"),
        "seconds": split.get("seconds"),
    }


# --------------------------------------------------------------------------------------------
# Rounds and tables
# --------------------------------------------------------------------------------------------


def measure(
    events: Path, catalog: Path | None, trees: dict[str, Path], threads: int, repeat: int, evaluate: bool
) -> dict[str, list[dict[str, Any]]]:
    """Every side ``repeat`` times, alternating in a rotating order (the host's load drifts)."""
    sides: list[tuple[str, Any]] = [("script", lambda s: run_script(events, threads, s))]
    for code, tree in trees.items():
        suffix = "" if code == "after" else f"@{code}"
        sides.append((f"no-eval{suffix}", lambda s, t=tree: run_train(t, events, catalog, threads, False, s)))
        if evaluate:
            sides.append(
                (f"train{suffix}", lambda s, t=tree: run_train(t, events, catalog, threads, True, s))
            )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in sides}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        for r in range(repeat):
            for name, run in sides[r % len(sides) :] + sides[: r % len(sides)]:
                runs[name].append(run(Path(tmp)))
    return runs


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of wall, CPU and peak, and of every stage's figures."""
    out = dict(runs[-1])
    for key in ("wall_s", "cpu_s", "peak_mb"):
        out[key] = statistics.median(r[key] for r in runs)
    stages: dict[str, list[float | None]] = {}
    for stage in runs[-1]["stages"]:
        values = [r["stages"].get(stage, [None] * 3) for r in runs]
        stages[stage] = [
            None if any(v[i] is None for v in values) else statistics.median(v[i] for v in values)
            for i in range(3)
        ]
    out["stages"] = stages
    out["all_wall_s"] = [round(r["wall_s"], 2) for r in runs]
    return out


# The script's stage each train stage is compared with (train's matrix+fit = the script's matrix+fit).
COUNTERPART = {
    "start": "start",
    "load": "load",
    "fit": "fit",
    "write": "write",
    "rest": "write",
    "matrix": "matrix",
}


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def print_totals(label: str, script: dict[str, Any], sides: dict[str, dict[str, Any]]) -> list[str]:
    missed = []
    print(f"\n{label}: {script['nnz']:,} user-item pairs, {script['shape'][0]:,} x {script['shape'][1]:,}")
    head = f"  {'side':<16}{'wall s':>9}{'CPU s':>9}{'peak MB':>9}{'wall':>9}{'CPU':>8}{'peak':>8}"
    print(head + "  runs (wall s)")
    print(
        f"  {'script':<16}{script['wall_s']:>9.2f}{script['cpu_s']:>9.2f}{script['peak_mb']:>9.0f}"
        f"{'':>25}  {script['all_wall_s']}"
    )
    for name, r in sides.items():
        ratios = [
            r["wall_s"] / script["wall_s"],
            r["cpu_s"] / script["cpu_s"],
            r["peak_mb"] / script["peak_mb"],
        ]
        target = TARGETS.get(name)
        flag = ""
        if target is not None and max(ratios) > target:
            flag = f"  > {target}x"
            missed.append(f"{label} {name}")
        print(
            f"  {name:<16}{r['wall_s']:>9.2f}{r['cpu_s']:>9.2f}{r['peak_mb']:>9.0f}"
            f"{ratios[0]:>8.2f}x{ratios[1]:>7.2f}x{ratios[2]:>7.2f}x  {r['all_wall_s']}{flag}"
        )
        note = r.get("metrics", {})
        if name.startswith("train") and (note.get("note") or note.get("scored_test_users") is not None):
            print(
                f"  {'':<16}evaluation: {note.get('scored_test_users')} test users scored, "
                f"nDCG@10 {note.get('ndcg@10')}, {note.get('note') or ''} seconds {note.get('seconds')}"
            )
    return missed


def print_stages(script: dict[str, Any], sides: dict[str, dict[str, Any]]) -> None:
    """Per stage: wall, CPU, peak RSS at its end; ratio to the script's counterpart stage."""
    names = list(sides)
    print(
        f"  {'stage':<10}{'script wall/CPU/peak':>24}" + "".join(f"{n + ' wall/CPU/peak':>30}" for n in names)
    )
    order: list[str] = []
    for r in [script, *sides.values()]:
        order += [s for s in r["stages"] if s not in order]
    for stage in order:
        row = f"  {stage:<10}{_cell(script['stages'].get(stage)):>24}"
        for n in names:
            mine = sides[n]["stages"].get(stage)
            theirs = script["stages"].get(COUNTERPART.get(stage, ""))
            ratio = _ratio(mine[0] if mine else None, theirs[0] if theirs else None)
            row += f"{_cell(mine) + ' ' + ratio:>30}"
        print(row)


def _cell(v: list[float | None] | None) -> str:
    if v is None:
        return "-"
    wall, cpu, peak = v
    return f"{wall:.2f}/{'-' if cpu is None else f'{cpu:.2f}'}/{'-' if peak is None else f'{peak:.0f}'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller synthetic sets, one run each")
    parser.add_argument("--threads", type=int, default=0, help="implicit threads, every side (0 = all cores)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per side (default 3, --quick 1)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {', '.join(SETS)}")
    parser.add_argument("--no-eval", action="store_true", help="skip the default train (with evaluation)")
    parser.add_argument("--before", metavar="REV", help="also run train on the code of git revision REV")
    parser.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, help="the public data sets [../shared/data]"
    )
    parser.add_argument("--json-out", type=Path, help="also write the raw measurements here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    WORK.mkdir(parents=True, exist_ok=True)
    repeat = args.repeat or (1 if args.quick else 3)
    trees = {"after": REPO}
    if args.before:
        sys.path.insert(0, str(REPO / "bench"))
        from bundles import export_revision

        folder = WORK / "before"
        shutil.rmtree(folder, ignore_errors=True)
        trees = {"before": export_revision(args.before, folder), **trees}
    print(
        f"threads={args.threads or os.cpu_count()}, {repeat} alternating run(s) per side, medians; "
        f"load average {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    missed, raw = [], {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        if name not in SETS:
            parser.error(f"unknown data set {name!r} (known: {', '.join(SETS)})")
        found = dataset(name, args.quick, args.data_dir)
        if found is None:
            print(f"\n{name}: not found under {args.data_dir}, skipped")
            continue
        runs = measure(*found, trees, args.threads, repeat, not args.no_eval)
        raw[name] = runs
        medians = {side: median_of(rs) for side, rs in runs.items()}
        script = medians.pop("script")
        missed += print_totals(name, script, medians)
        print_stages(script, medians)
        sys.stdout.flush()
    print(
        "\nratios to the script (wall, CPU, peak RSS); stage cells wall s / CPU s / peak RSS MB at the "
        "stage's end, ratio of wall to the script's stage of the same name; targets: no-eval <= "
        f"{TARGETS['no-eval']}x, train <= {TARGETS['train']}x -> "
        + ("all met" if not missed else "missed: " + "; ".join(missed))
    )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json_out:
        args.json_out.write_text(json.dumps(raw, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
