"""`distgan bench gpu --dry`: the GPU benchmark's every cell on the CPU at tiny sizes, so the command cannot rot
between the rare occasions a GPU is there. Figures are a benchmark's business; this checks that each cell
measured something, that the JSON holds the table, and that the fp16 run shows both loss scalers skipping."""

import json
import re
import subprocess

import pytest

from conftest import BIN, cli_env, patience

pytestmark = pytest.mark.integration

MODELS = ["DCGAN-64", "BigGAN-128", "R3GAN-32", "StyleGAN2-256"]
VARIANTS = ["plain fp32", "fp32", "bf16", "bf16+cl", "bf16+cl+compile"]


def test_bench_gpu_dry_measures_every_cell_and_writes_the_table_as_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = [str(BIN / "distgan"), "bench", "gpu", "--dry", "--json", str(out)]
    p = subprocess.run(argv, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=patience(900))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry"] and report["device"] == "cpu"
    for model in MODELS:
        rows = report["models"][model]
        assert rows["gflops_per_image"] > 0, model
        for variant in VARIANTS:
            r = rows[variant]
            if variant == "bf16+cl+compile" and model != "DCGAN-64":
                assert r == {"skipped": "--dry compiles DCGAN only"}
                continue
            assert r["img_per_sec"] > 0 and r["x_plain"] > 0, (model, variant)
            line = re.search(rf"{re.escape(model)}\s+{re.escape(variant)}\s+([\d.]+)", p.stdout)
            assert line and float(line[1]) == pytest.approx(r["img_per_sec"], abs=0.1), (model, variant)
    # Bigger networks cost more FLOPs per image; the compile cell compiled (and kept that out of its img/s).
    flops = {m: report["models"][m]["gflops_per_image"] for m in MODELS}
    assert flops["DCGAN-64"] < flops["StyleGAN2-256"], flops
    fast = report["models"]["DCGAN-64"]["bf16+cl+compile"]
    assert fast["compile_s"] > 0 and fast["compilations"] >= 3, fast  # (G's, D's and D frozen's forwards at least)
    assert report["models"]["DCGAN-64"]["fp32"]["compilations"] == 0
    for cell in report["distributed"].values():
        assert cell["img_per_sec"] > 0, report["distributed"]
    # fp16 with R1 at every step from 2^16: each network's scaler skipped steps and lowered its own scale.
    for name, s in report["fp16"]["nets"].items():
        assert s["skipped"] > 0 and s["last"] < s["first"], (name, s)
    assert "targets: not checked (--dry (a CPU))" in p.stdout
