"""`benches/gpu_check.sh`, the check that runs whenever a GPU is lent, stays runnable: its dry run walks every step
on tiny shapes on the CPU (`GPU_CHECK_DEVICE=cpu ... --quick`), and its helpers (the CPU-vs-device comparison, the
step records and the summary) decide pass and fail as documented."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

BENCHES = REPO_ROOT / "benches"
SCRIPT = BENCHES / "gpu_check.sh"
PIPELINE_STEPS = ["model", "prune_device", "eval_device_32k", "eval_device_4k", "prune_cpu", "eval_cpu_4k",
                  "eval_cross_4k", "compare", "heal", "sequential"]
KERNEL_STEPS = ["kernel_tests", "bench_scoring", "tune_triton"]


def _run_check(out: Path, data_dir: Path, *args: str, root: Path = REPO_ROOT, timeout: int = 600,
               **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    environ.update({"GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable, "OUT": str(out), "DATA_DIR": str(data_dir),
                    **env})
    return subprocess.run(["bash", str(root / "benches" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=environ, timeout=timeout)


def _steps(out: Path) -> dict[str, dict]:
    return {s["step"]: s for s in (json.loads(p.read_text()) for p in sorted((out / "steps").glob("*.json")))}


@pytest.mark.slow
def test_dry_run_walks_every_step(tmp_path, wikitext_dir):
    out = tmp_path / "gpu_check"
    done = _run_check(out, wikitext_dir, "--quick")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    steps = _steps(out)
    assert list(steps) == PIPELINE_STEPS + KERNEL_STEPS  # every step's JSON, in the order they ran
    for name, step in steps.items():
        assert step["status"] in ("ok", "skipped"), (name, step)
        assert set(step) >= {"status", "rc", "seconds", "limit_seconds", "reason", "result", "details"}
    # the summary table, printed once, and its JSON
    assert len(re.findall(r"^step +\| status +\| seconds \| result$", done.stdout, re.M)) == 1
    assert "gpu_check: every step passed (13 steps" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["not_passed"] == [] and summary["env"]["quick"]
    # the CPU-vs-device comparison ran; both runs are on the CPU here, so everything agrees exactly
    assert steps["compare"]["status"] == "ok"
    verdict = json.loads((out / "compare.json").read_text())
    assert verdict["agree"] and verdict["kept"]["match"] and verdict["kept"]["layers"] == 4
    assert verdict["ppl"]["relative_difference"] == 0.0 and verdict["ppl"]["weights_difference"] == 0.0
    # time per stage of both prunes, the perplexities, the layer-by-layer run
    assert set(steps["prune_device"]["details"]["timings"]) >= {"load", "layer_importance", "refit", "total"}
    assert steps["eval_device_32k"]["details"]["tokens"] == 2048 and steps["eval_cpu_4k"]["details"]["tokens"] == 1024
    seq = steps["sequential"]["details"]
    assert seq["shape"] == "tiny" and seq["layers"] == 2 and len(seq["seconds_per_layer"]) == 2
    assert seq["projected_70b"]["layers"] == 80
    assert steps["kernel_tests"]["details"]["result"].endswith("deselected")
    # heal: the pruned model distilled from the dense one on the device, then evaluated like the others
    assert steps["heal"]["status"] == "ok" and steps["heal"]["details"]["tokens"] == 1024
    assert (out / "gpu_check.txt").read_text().count("== GPU check summary") == 1


@pytest.mark.slow
def test_without_the_compiled_core_the_pipeline_is_reported_not_run(tmp_path, wikitext_dir):
    """A plain copy of the repository without layerprune._core: nothing is built, the pipeline steps say why they
    did not run, the kernel steps still run, and the exit code says the check did not pass."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "benches", root / "benches", ignore=shutil.ignore_patterns("results", "instances"))
    shutil.copytree(REPO_ROOT / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__", "floor"))
    shutil.copytree(REPO_ROOT / "python", root / "python",
                    ignore=shutil.ignore_patterns("__pycache__", "_core*.so", "_core*.pyd"))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = tmp_path / "out"
    done = _run_check(out, wikitext_dir, "--quick", root=root)
    assert done.returncode == 1, done.stdout[-3000:]
    steps = _steps(out)
    assert list(steps) == PIPELINE_STEPS + KERNEL_STEPS
    for name in PIPELINE_STEPS:
        assert steps[name]["status"] == "not-run"
        assert "layerprune._core is not built" in steps[name]["reason"] and "builds nothing" in steps[name]["reason"]
    assert steps["kernel_tests"]["status"] == "ok" and steps["bench_scoring"]["status"] == "ok"
    assert "layerprune._core MISSING" in done.stdout
    assert sorted(p.relative_to(root) for p in root.rglob("*") if "__pycache__" not in p.parts) == \
        [p for p in before if "__pycache__" not in p.parts]  # nothing built in the copy


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole check")
def test_without_a_gpu_the_real_check_exits_3(tmp_path, wikitext_dir):
    done = _run_check(tmp_path / "out", wikitext_dir, timeout=120, GPU_CHECK_DEVICE="cuda")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no CUDA device visible" in done.stdout


def test_bad_arguments_exit_2(tmp_path, wikitext_dir):
    assert _run_check(tmp_path / "out", wikitext_dir, "--fast", timeout=60).returncode == 2
    assert _run_check(tmp_path / "out", wikitext_dir, timeout=60, GPU_CHECK_DEVICE="tpu").returncode == 2
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--quick" in usage.stdout and "Exit 0" in usage.stdout


# ---- the comparison of the device run with the CPU run ----------------------------------------------------


def _report(kv: list[list[int]], ch: list[list[int]]) -> dict:
    return {"layers": [{"kv_heads_kept": k, "mlp_channels_kept": c} for k, c in zip(kv, ch)],
            "timings": {"total": 1.0}}


def _compare(tmp_path: Path, device_report: dict, cpu_report: dict, ppl_device: float, ppl_cpu: float,
             tokens: tuple[int, int] = (4096, 4096)) -> tuple[int, dict]:
    files = {}
    for name, data in (("dr", device_report), ("cr", cpu_report),
                       ("de", {"ppl": ppl_device, "tokens": tokens[0], "device": "cuda"}),
                       ("ce", {"ppl": ppl_cpu, "tokens": tokens[1], "device": "cpu"})):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(data))
    target = tmp_path / "verdict.json"
    done = subprocess.run([sys.executable, str(BENCHES / "gpu_check_compare.py"), "--device-report", str(files["dr"]),
                           "--cpu-report", str(files["cr"]), "--device-eval", str(files["de"]), "--cpu-eval",
                           str(files["ce"]), "--cross-eval", str(tmp_path / "absent.json"), "--json", str(target)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(target.read_text()) if target.is_file() else {}


def test_compare_agrees_within_the_tolerance(tmp_path):
    report = _report([[0, 2], [1]], [[0, 1, 5], [2, 3]])
    rc, verdict = _compare(tmp_path, report, report, 84.75, 84.73)
    assert rc == 0 and verdict["agree"] and verdict["kept"]["match"]
    assert verdict["ppl"]["relative_difference"] == pytest.approx(0.02 / 84.73)


def test_compare_flags_other_heads_or_channels(tmp_path):
    rc, verdict = _compare(tmp_path, _report([[0, 2], [1]], [[0, 1, 5], [2, 3]]),
                           _report([[0, 1], [1]], [[0, 1, 5], [2, 4]]), 84.73, 84.73)
    assert rc == 1 and not verdict["agree"]
    assert [d["layer"] for d in verdict["kept"]["differing_layers"]] == [0, 1]
    assert verdict["kept"]["differing_layers"][1]["channels_only_device"] == 1
    rc, verdict = _compare(tmp_path, _report([[0]], [[1]]), _report([[0], [1]], [[1], [2]]), 1.0, 1.0)
    assert rc == 1 and "1 layers on the device, 2 on the CPU" in verdict["problems"][0]


def test_compare_flags_a_perplexity_gap_or_other_tokens(tmp_path):
    report = _report([[0]], [[1]])
    rc, verdict = _compare(tmp_path, report, report, 85.2, 84.73)  # 0.55 % apart
    assert rc == 1 and not verdict["ppl"]["within_tolerance"] and "PPL differs" in verdict["problems"][0]
    rc, verdict = _compare(tmp_path, report, report, 84.73, 84.73, tokens=(4096, 2048))
    assert rc == 1 and "different token counts" in verdict["problems"][0]


def test_compare_refuses_missing_inputs(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHES / "gpu_check_compare.py"), "--device-report",
                           str(tmp_path / "none.json"), "--cpu-report", str(tmp_path / "none.json"), "--device-eval",
                           str(tmp_path / "none.json"), "--cpu-eval", str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read" in done.stderr


# ---- step records and the summary -------------------------------------------------------------------------


def _summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHES / "gpu_check_summary.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_summary_passes_only_when_every_step_passed(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text("....\n35 passed in 6.53s\n")
    assert _summary("record", str(tmp_path), "kernel_tests", "pytest", "ok", "--rc", "0", "--seconds", "7.5",
                    "--log", str(log)).returncode == 0
    assert _summary("record", str(tmp_path), "heal", "heal", "skipped", "--reason", "no heal yet").returncode == 0
    table = _summary("table", str(tmp_path), "--wall", "12")
    assert table.returncode == 0 and "every step passed (2 steps" in table.stdout
    assert "35 passed" in table.stdout and "no heal yet" in table.stdout
    steps = _steps(tmp_path)
    assert steps["kernel_tests"]["details"] == {"result": "35 passed", "pytest_seconds": 6.53}
    assert steps["kernel_tests"]["index"] == 1 and steps["heal"]["index"] == 2

    failing = tmp_path / "fail.log"
    failing.write_text("Traceback ...\nRuntimeError: Expected all tensors to be on the same device\n")
    _summary("record", str(tmp_path), "prune_device", "prune", "failed", "--rc", "70", "--log", str(failing))
    _summary("record", str(tmp_path), "sequential", "sequential", "timeout", "--rc", "124", "--limit", "150")
    _summary("record", str(tmp_path), "compare", "compare", "not-run", "--reason", "needs step prune_device")
    table = _summary("table", str(tmp_path))
    assert table.returncode == 1
    assert "3 step(s) did not pass: prune_device, sequential, compare" in table.stdout
    steps = _steps(tmp_path)
    assert steps["prune_device"]["reason"] == "RuntimeError: Expected all tensors to be on the same device"
    assert steps["sequential"]["reason"] == "time limit of 150 s ran out"
    assert not json.loads((tmp_path / "summary.json").read_text())["passed"]
