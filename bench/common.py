"""What every benchmark script reports the same way: the machine, and where its JSON goes."""
from __future__ import annotations

import json
import os
import platform
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
