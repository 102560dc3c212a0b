"""The prepared full-size GPU check as a CPU smoke test on the small config: every part runs (no
time budget, so a busy machine skips nothing), the JSON file has every figure, FSDP2 on one
process equals the plain model."""

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_on_cpu_and_writes_every_part(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--config", "small", "--budget", "0", "--iters", "2",
                          "--train-steps", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)  # a limit for a hung run, not a timing
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["peaks"]["matmul_tflops"] > 0 and r["peaks"]["copy_gbps"] > 0
    for model in ("pi0", "pi05"):
        eager = r[model]["eager"]
        assert eager["p50_ms"] > 0 and {"vision", "prefix", "denoise"} <= set(eager) and eager["tflops"] > 0
        assert set(r[model]) >= {"eager", "params", "weights_mib"} and r[model]["weights_mib"] > 0
    assert r["pi0_fast"]["prefill_ms"] > 0 and r["pi0_fast"]["decode_ms_per_token"] > 0
    batches = r["pi05_training"]["batches"]
    assert batches and all(b["samples_s"] > 0 and b["mfu"] > 0 for b in batches)
    assert r["pi05_training"]["fsdp_equals_plain"]["max_rel_diff"] < 1e-6
    assert "FSDP2 on one device vs plain" in res.stdout  # the table
