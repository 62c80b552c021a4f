"""Smoke test of benchmarks/throughput.py: the real script, in a subprocess, on tiny models.

No timing assertions (the numbers of a smoke run mean nothing); it checks that every section runs
through deit_jax and timm and prints its table.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_smoke(tmp_path):
    out_json = tmp_path / "timings.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--json", out_json],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for title in (
        "## Throughput",
        "## Step time against batch size",
        "## Step time against resolution",
        "## Distillation overhead",
        "## Planned memory with and without remat",
    ):
        assert title in out, out
    # Both frameworks measured: a ratio column with numbers, for train and inference steps.
    rows = [line for line in out.splitlines() if line.startswith("| DeiT-Ti")]
    assert {"train", "infer"} <= {row.split("|")[5].strip() for row in rows}, out
    assert all(row.split("|")[8].strip() not in ("", "-") for row in rows), out
    assert "| distilled, live teacher (kind hard) |" in out
    assert "| distilled, cached teacher (kind hard) |" in out
    assert "| feature distillation, live teacher |" in out
    assert "| feature distillation, cached embeddings |" in out
    assert "| timm `TokenDistillationTask`, live teacher (hard) |" in out
    assert "| writer: forward + top-10 + copy to host + zarr write |" in out
    assert "regnety_002" in out
    assert "| timm teacher forward alone (`torch.no_grad`) |" in out
    assert "| deit_tiny_patch16_224 | 2 | nothing_saveable |" in out  # the remat memory plan
    assert out_json.exists() and '"jax_seconds"' in out_json.read_text()


def test_clip_teacher_smoke(tmp_path):
    """benchmarks/clip_teacher.py --smoke: a tiny CLIP through deit_jax and open_clip, its table
    with both timings, their ratio and the parity of the two towers (no timing assertions)."""
    out_json = tmp_path / "clip.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "clip_teacher.py"), "--smoke"]
        + ["--json", str(out_json)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "image tower" in line]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[2] == "open_clip" and all(float(cells[i].replace(",", "")) > 0 for i in (1, 3, 4))
    assert float(cells[6].split()[-1]) <= 1e-5, rows[0]  # the two towers agree
    assert '"deit_jax"' in out_json.read_text()
