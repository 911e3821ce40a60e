"""difflab studio under load: 20 jobs from 5 tabs submitted at once, through the HTTP API.

Each "tab" is a client thread with its own client id (what a browser tab holds in sessionStorage);
all five submit their four jobs at the same moment, then poll their own jobs as the page does.
Checks: every job completes, none is lost, and every tab gets exactly its own jobs, each with the
images of its own class and seed (the parameters written into the PNGs). Prints the median and
95th-percentile wait in the queue (submission to start, as the server measured it) and the
median / p95 turnaround (submission to the tab seeing the images).

    python bench/studio_queue.py                 # trains a tiny digits model first (a few seconds)
    python bench/studio_queue.py --record        # also writes the figures into BENCHMARKS.md
"""
import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine, write_section  # noqa: E402

from difflab.cli import main  # noqa: E402
from difflab.studio import make_server  # noqa: E402


def call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.loads(r.read())


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def tab(url, index, jobs_per_tab, steps, batch, start, out):
    """One tab: submit its jobs at ``start``, poll its own jobs until all are finished."""
    client = f"bench-tab-{index:02d}"
    start.wait()
    submitted = {}
    for j in range(jobs_per_tab):
        label, seed = (index + j) % 10, 100 * index + j
        job = call(url + "api/jobs", {"client": client, "model": "digits", "class_label": str(label), "seed": seed,
                                      "steps": steps, "batch_size": batch, "guidance": 2})
        submitted[job["id"]] = (label, seed, time.monotonic())
    seen = {}
    while len(seen) < len(submitted):
        for job in call(url + f"api/jobs?client={client}")["jobs"]:
            if job["status"] not in ("queued", "running") and job["id"] not in seen:
                seen[job["id"]] = (job, time.monotonic())
        time.sleep(0.05)
    out[client] = (submitted, seen)


def check(results, batch):
    """Every job of every tab done, its own, with its own class and seed in every image's parameters."""
    problems = []
    for client, (submitted, seen) in results.items():
        if set(seen) != set(submitted):
            problems.append(f"{client}: got jobs {sorted(seen)} for {sorted(submitted)}")
        for job_id, (job, _) in seen.items():
            label, seed, _ = submitted[job_id]
            if job["status"] != "done" or len(job["results"]) != batch:
                problems.append(f"{client} job {job_id}: {job['status']} {job['error']} with {len(job['results'])} images")
            for r in job["results"]:
                p = r["params"]
                if (p.get("class_label"), p.get("seed")) != (str(label), seed):
                    problems.append(f"{client} job {job_id}: an image of class {p.get('class_label')} seed {p.get('seed')}")
    return problems


def main_(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tabs", type=int, default=5)
    ap.add_argument("--jobs-per-tab", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps({"train": {"steps": 30, "batch_size": 32, "checkpoint_every": 30, "progress": False}}))
        assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(models / "digits")]) == 0
        server = make_server(models, Path(tmp) / "gallery", port=0)
        server.serve_in_thread()
        start, out = threading.Event(), {}
        threads = [threading.Thread(target=tab, args=(server.url, i, args.jobs_per_tab, args.steps, args.batch, start, out))
                   for i in range(args.tabs)]
        for t in threads:
            t.start()
        wall, cpu = time.perf_counter(), time.process_time()
        start.set()
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        server.close()
    problems = check(out, args.batch)
    waits = [job["wait_s"] for _, seen in out.values() for job, _ in seen.values()]
    turns = [done - submitted[job_id][2] for submitted, seen in out.values() for job_id, (_, done) in seen.items()]
    n = sum(len(s) for s, _ in out.values())
    lines = [f"{n} jobs from {args.tabs} tabs ({args.jobs_per_tab} each, {args.batch} digits x {args.steps} DDIM steps per job), "
             f"one worker: {'all complete, each tab got exactly its own' if not problems else 'PROBLEMS'}",
             f"wait in the queue: median {statistics.median(waits):.2f} s, p95 {percentile(waits, 0.95):.2f} s, "
             f"max {max(waits):.2f} s",
             f"turnaround (submit -> tab sees the images): median {statistics.median(turns):.2f} s, "
             f"p95 {percentile(turns, 0.95):.2f} s",
             f"all {n} jobs: {wall:.1f} s wall, {cpu:.1f} s CPU (process), {torch.get_num_threads()} torch thread(s)",
             f"machine: {machine()}"]
    print("\n".join(lines))
    for p in problems:
        print("problem:", p)
    if args.record and not problems:
        text = ("`python bench/studio_queue.py` (tiny digits model trained 30 steps; jobs through the HTTP API; "
                "2-core CPU, shared/loaded):\n\n" + "\n".join(f"- {line}" for line in lines))
        print("recorded in", write_section("bench/studio_queue.py", "difflab studio: 20 jobs from 5 tabs", text))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main_())
