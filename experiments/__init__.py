"""Experiments: studies that use the library and are not part of it (each folder has its README,
its command and its tests). The library never imports them. Run one from the project's root:

    python -m experiments.rtc --out runs/rtc          # the real-time chunking latency study
    python -m experiments.recap demo --out runs/recap # RECAP against imitation on the built-in task
    python -m experiments.gpu_check                   # full-size speed on a GPU
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_train(out, *args):
    """train.py in a subprocess, exactly as a user runs it; -> the exported checkpoint. An
    interrupted study picks up where it stopped: a finished run is reused, a run with
    checkpoints is resumed."""
    final = Path(out) / "final"
    if (final / "model.safetensors").exists():
        print(f"{final}: already trained, reused", flush=True)
        return final
    resume = ["--resume"] if (Path(out) / "checkpoints").is_dir() else []
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args), "--out", str(out), *resume]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return final
