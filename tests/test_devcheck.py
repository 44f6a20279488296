"""The device check runs end to end on this CPU (toy shape): logits against transformers within its bf16 bound,
decode and time-to-first-token figures for both sides, one JSON line with "ok" last."""

import json
import subprocess
import sys


def test_devcheck_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llava_jax.devcheck", "--json", "--shape", "tiny", "--new-tokens", "4",
                           "--batches", "1,2", "--image-size", "200x133", "--workdir", str(tmp_path)],
                          stdout=subprocess.PIPE, text=True, timeout=900)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"], result
    assert result["backend"] == "cpu" and result["kernels"] == "xla_cpu" and result["torch_device"] == "cpu"
    logits = result["logits"]
    assert logits["same_input_ids"] and logits["mean_abs_diff_over_std"] < 0.05 and logits["top1_agreement"] >= 0.9
    for batch in ("1", "2"):
        row = result["decode"][batch]
        for side in ("jax", "torch"):
            assert row[side]["tok_s"] > 0 and 0 < row[side]["bandwidth_pct"]
    assert result["ttft_s"]["jax"] > 0 and result["ttft_s"]["torch"] > 0
