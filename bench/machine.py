"""The machine a benchmark ran on, for the figures it records."""
import argparse
import json
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def write_section(script: str, title: str, text: str) -> Path:
    """Put ``text`` under ``## title`` in BENCHMARKS.md between the markers of ``script``
    (``<!-- bench/x.py: begin -->`` ... ``end -->``), replacing that section or appending it."""
    path = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
    begin, end = f"<!-- {script}: begin -->", f"<!-- {script}: end -->"
    section = f"{begin}\n## {title}\n\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in old:
        new = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)
    return path


def record(reference: dict, rows: list, args) -> dict:
    """What a benchmark run keeps in its JSON: the reference, the rows so far, the arguments."""
    return {"reference": reference, "rows": rows, "args": vars(args)}


def merged(files: str) -> tuple[dict, list, argparse.Namespace]:
    """The rows of earlier runs' JSON records (:func:`record`; the same reference, methods run in
    parallel processes), in the order given, with the first run's reference and settings."""
    runs = [json.loads(Path(f).read_text()) for f in files.split(",")]
    for f, run in zip(files.split(","), runs):
        if run["reference"]["frechet"] != runs[0]["reference"]["frechet"]:
            raise SystemExit(f"{f}: another teacher reference ({run['reference']}) than {runs[0]['reference']}")
    return runs[0]["reference"], [r for run in runs for r in run["rows"]], argparse.Namespace(**runs[0]["args"])
