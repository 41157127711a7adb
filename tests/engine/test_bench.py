"""`diffrt bench` and the side-by-side script: their code paths and report schema (not their speed)."""

import json
import subprocess
import sys
from pathlib import Path

from diffrt.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_bench_prints_a_table_and_writes_the_json_report(sd1_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(sd1_bundle),
            "--steps",
            "3",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--scheduler",
            "euler",
            "--backend",
            "ort-cpu",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "unet_step" in table and "end to end" in table and "host overhead" in table
    report = json.loads(out.read_text())
    assert report["schema"] == 1 and report["backend"] == "ort-cpu"
    assert report["settings"]["steps"] == 3 and report["settings"]["width"] == 64
    for stage in ("tokenizer", "text_encoder", "unet", "unet_step", "host", "vae_decoder", "total"):
        st = report["stages"][stage]
        assert st["p90_ms"] >= st["median_ms"] >= 0, stage
    assert report["stages"]["unet_step"]["n"] == 2 * 3  # two timed runs, three UNet calls each
    assert len(report["runs"]) == 2 and all(len(r["unet_steps"]) == 3 for r in report["runs"])
    assert report["end_to_end"]["images_per_s"] > 0 and report["load_s"] > 0
    assert 0 <= report["host_overhead"]["share_of_total"] < 1
    assert report["peak_rss_mb"] > 0 and report["environment"]["cpu_count"] >= 1
    assert "onnxruntime" in report["environment"]["versions"]


def test_bench_refuses_zero_runs(sd1_bundle, capsys):
    assert main(["bench", str(sd1_bundle), "--runs", "0"]) == 2
    assert "--runs" in capsys.readouterr().err


def test_side_by_side_script_runs_interleaved_workers(sd1_folder, sd1_bundle, tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/compare.py"),
            str(sd1_folder),
            str(sd1_bundle),
            "--steps",
            "2",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--peers",
            "diffrt,diffusers",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["peers"]) == {"diffrt", "diffusers"}
    assert report["peers"]["diffrt"]["speedup_of_diffrt"] == 1.0
    assert all(len(p["totals_s"]) == 2 for p in report["peers"].values())
    assert "diffrt is" in proc.stdout
