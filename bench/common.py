"""What every benchmark script does the same way: the machine's description, each timing in its own
process (a worker and its RESULT line), and where the JSON goes."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import torch


def machine_description(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model, its cores, the torch version and its thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def report(result: dict) -> None:
    """A worker's answer to run_worker: one RESULT line on stdout."""
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(script: str, worker_args: list, label: str) -> dict:
    """Run `script` with `worker_args` in its own process (a large case's heap slows the next one in
    the same process) and return what it reported; exit with its output when it fails."""
    run = subprocess.run([sys.executable, os.path.abspath(script), *map(str, worker_args)],
                         capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        sys.exit(f"{label} failed:\n{run.stdout}\n{run.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def write_results(out, name: str, device: str, smoke: bool, payload: dict) -> str:
    """Write payload (plus the command line) as JSON to `out`, by default
    bench/results/<name>_<device>[_smoke].json; returns the path."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              f"{name}_{device}{'_smoke' if smoke else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": " ".join(sys.argv), **payload}, f, indent=1)
    print(f"\nwrote {out}")
    return out
