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


def add_run_options(parser: argparse.ArgumentParser, records: str) -> None:
    """``--write``, ``--threads`` and ``--rows-from`` (``records``: the JSON files of earlier runs)."""
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rows-from", default=None, help=f"comma-separated {records} files of earlier runs (methods "
                        "run in parallel): print (and --write) their table, run nothing")


def start_run(args, report):
    """With ``--rows-from``: ``report`` of the merged earlier runs, returned. Otherwise set the threads,
    record the machine in ``args``, make ``args.out``, seed torch, and return None (go on and run)."""
    if args.rows_from:
        reference, rows, run_args = merged(args.rows_from)
        run_args.write = args.write
        return report(reference, rows, run_args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.machine, args.threads = machine(), torch.get_num_threads()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    return None


def digits_world(out: Path) -> dict:
    """What the digits benches judge with: the digits judge (trained once into ``out``), the held-out
    digits and their labels, and the training digits (the Frechet floor)."""
    from difflab.data import load_digits
    from difflab.eval import DigitsJudge

    images, _ = load_digits(split="train")
    held, held_labels = load_digits(split="test")
    return {"judge": DigitsJudge.load_or_train(out / "digits_judge.safetensors"), "held": held,
            "held_labels": held_labels, "train": images}
