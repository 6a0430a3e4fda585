"""Run ``bench/microscopy.py`` for several settings × cases in parallel processes, merge.

    python bench/microscopy_sweep.py sweep.json --jobs 6 --out results/sweep

``sweep.json``: ``{"configs": {"name": ["key=value", ...] or {"set": [...], "methods":
[...], "cases": [...], "args": [more microscopy.py arguments], "iterations": N}}, "cases":
[...], "methods": [...], "iterations": N}`` (a config's own ``iterations`` wins). Tasks run case by case (all
settings of the first case first). Every (config, case) runs in its own process (a GPU
serves several at once), its output in ``--out``/parts/microscopy_<config>_<case>.log;
a worker of a stopped sweep runs on to its result file, which ``--merge-only`` collects.
The merged ``sweep.json`` in ``--out`` holds
``{config: {case: {method: row}}}``; ``--out``/progress/<config> holds the curves as they grow,
so a sweep cut short still leaves them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--merge-only", action="store_true", help="only merge the finished parts")
    parser.add_argument("--cache", type=Path, default=None, help="folder of cached cases (.npz)")
    parser.add_argument("--iterations", type=int, default=None, help="instead of the spec's (smoke runs)")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    work = args.out / "parts"
    work.mkdir(parents=True, exist_ok=True)

    def cases_of(name: str) -> list[str]:
        setting = spec["configs"][name]
        return setting.get("cases", spec["cases"]) if isinstance(setting, dict) else spec["cases"]

    tasks = [(name, case) for case in spec["cases"] for name in spec["configs"] if case in cases_of(name)]

    def run(task: tuple[str, str]) -> None:
        name, case = task
        setting = spec["configs"][name]
        if isinstance(setting, list):
            setting = {"set": setting}
        methods = setting.get("methods", spec["methods"])
        command = [
            sys.executable,
            str(HERE / "microscopy.py"),
            "--cases",
            case,
            "--methods",
            *methods,
            "--iterations",
            str(args.iterations or setting.get("iterations", spec["iterations"])),
            "--tag",
            f"_{name}_{case}",
            "--out",
            str(work),
            "--progress",
            str(args.out / "progress" / name),
            *setting.get("args", []),
        ]
        if args.cache:
            command += ["--cache", str(args.cache)]
        if setting.get("set"):
            command += ["--set", *setting["set"]]
        # The worker writes to a file, not a pipe: a sweep stopped part-way then leaves
        # its workers running to their result files (a closed pipe killed them at their
        # next printed row, and the case's rows were lost).
        log = work / f"microscopy_{name}_{case}.log"
        with log.open("w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        text = log.read_text()
        print(text.strip() if not done.returncode else text[-2000:], flush=True)

    if not args.merge_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, tasks))
    merged: dict = {}
    for name, case in tasks:
        part = work / f"microscopy_{name}_{case}.json"
        if part.exists():
            record = json.loads(part.read_text())
            merged.setdefault(name, {})[case] = record["cases"][case]
            merged.setdefault("_device", record["device"])
    (args.out / "sweep.json").write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
