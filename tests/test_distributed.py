"""Calibration over several processes: data-parallel statistics, FSDP-sharded Taylor scores and the plans
``prune`` makes equal one process's; under torchrun the command line writes on rank 0 only, and a rank that
fails ends every rank with its error line and leaves no output folder.

Every multi-process test runs 2 ranks on CPU with gloo over 127.0.0.1: torch.multiprocessing for the
library (one job computes everything, tests/distributed_ranks.py), torchrun for the command line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import distributed_ranks as ranks
from conftest import REPO_ROOT
from layerprune import distributed
from layerprune.cli import main
from layerprune.scoring.hooks import shard_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2
JOB_TIMEOUT_S = 480


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_same(reference: Any, got: Any, where: str = "", rtol: float = 1e-4, atol: float = 0.0) -> None:
    """Equal structure; integers and strings exactly, floats to ``rtol`` of the largest magnitude compared (or
    ``atol``, when larger: loss increases are differences of losses, exact to a fraction of the loss)."""
    if isinstance(reference, dict):
        assert set(reference) == set(got), where
        for key in reference:
            assert_same(reference[key], got[key], f"{where}/{key}", rtol, atol)
    elif isinstance(reference, (list, tuple)) and not (reference and isinstance(reference[0], (float, np.floating))):
        assert len(reference) == len(got), where
        for i, (a, b) in enumerate(zip(reference, got)):
            assert_same(a, b, f"{where}[{i}]", rtol, atol)
    elif isinstance(reference, (int, str, bool)) and not isinstance(reference, float):
        assert reference == got, where
    else:
        a = torch.as_tensor(np.asarray(reference, dtype=np.float64))
        b = torch.as_tensor(np.asarray(got, dtype=np.float64))
        assert a.shape == b.shape, where
        scale = float(a.abs().max()) if a.numel() else 0.0
        torch.testing.assert_close(b, a, rtol=0.0, atol=max(rtol * max(scale, 1e-12), atol), msg=where)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Every computation of tests/distributed_ranks.py on each of 2 spawned ranks."""
    out = tmp_path_factory.mktemp("ranks")
    names = list(ranks.COMPUTATIONS)
    context = torch.multiprocessing.start_processes(ranks.spawned_rank, args=(WORLD, _free_port(), str(out), names),
                                                    nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {JOB_TIMEOUT_S} s")
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(WORLD)] for name in names}


# ---- one process: the helpers are no-ops, the shares cover the batch -------------------------------------


def test_shares_cover_every_sample_once_and_prefixes_are_the_batch_prefix():
    for n in range(1, 12):
        for world in range(1, 5):
            shares = [list(distributed.share_indices(n, r, world)) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            for first in range(n + 1):  # curve_samples: each rank keeps a prefix of its share
                kept = [s[: len(distributed.share_indices(first, r, world))] for r, s in enumerate(shares)]
                assert sorted(i for k in kept for i in k) == list(range(first))


def test_row_shards_are_torch_chunk_sizes():
    for rows in (1, 2, 7, 64, 65, 97):
        for world in (1, 2, 3, 8):
            want = [c.shape[0] for c in torch.arange(rows).chunk(world)]
            assert shard_rows(rows, world) == want + [0] * (world - len(want))


def test_padded_shares_give_every_rank_as_many_micro_batches_and_each_row_once(monkeypatch):
    """FSDP gathers each layer in every forward, so each rank must run as many: a shorter share is padded with
    empty micro-batches (healing's held-out evaluation runs one row for each and counts nothing)."""
    from layerprune.healing.sharding import padded_share

    for n in range(12):
        for world in range(1, 5):
            for micro in range(1, 4):
                monkeypatch.setattr(distributed, "world_size", lambda: world)
                shares = []
                for r in range(world):
                    monkeypatch.setattr(distributed, "rank", lambda: r)
                    shares.append(padded_share(list(range(n)), micro))
                assert len({len(share) for share in shares}) == 1, (n, world, micro)
                assert sorted(i for share in shares for chunk in share for i in chunk) == list(range(n))
                assert all(len(chunk) <= micro for share in shares for chunk in share)


def test_in_one_process_every_collective_is_a_no_op():
    assert distributed.active() is None
    ids = torch.arange(6).view(3, 2)
    assert distributed.local_samples(ids) is ids
    assert distributed.sum_values(1.5, 3) == (1.5, 3)
    assert distributed.global_count(7) == 7 and distributed.token_share(11) == 1.0
    assert distributed.ranks_where(True) == [0] and distributed.ranks_where(False) == []
    assert distributed.on_rank0(lambda a, b: a + b, 2, b=3) == 5
    assert distributed.broadcast_object({"x": 1}) == {"x": 1}
    t = torch.ones(3)
    distributed.all_reduce_sum_([t])
    assert t.tolist() == [1.0, 1.0, 1.0]
    distributed.barrier("nothing")


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "--model", "nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["layerprune eval: error: eval runs in one process; under torchrun (WORLD_SIZE=2) only prune "
                   "and heal run (InvalidInputError)"]


def test_fsdp_refuses_per_sample_scores(tmp_path, capsys, wikitext_dir):
    code = main(["prune", "--model", "nowhere", "--ratio", "0.2", "--out", str(tmp_path / "out"), "--fsdp",
                 "--importance", "taylor2", "--data-dir", str(wikitext_dir), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("layerprune prune: error: fsdp: shards the backward")
    assert not (tmp_path / "out").exists() and not torch.distributed.is_initialized()


# ---- 2 ranks, torch.multiprocessing: the same numbers as one process ------------------------------------


def test_data_parallel_statistics_equal_one_process(job):
    """Element scores (taylor, vectorize, taylor2, activation), removal, Block Influence, sensitivity curves
    on the first 3 samples, and the refit Gram matrices: 5 samples shared 3 + 2."""
    reference = ranks.calibration_statistics()
    # the curves are differences of float32 losses: exact to a few float32 ulps of the loss, not of the difference
    # (measured 6.9e-7 apart on an AVX2-only CPU, where 1e-4 of the curve's largest value is 6.8e-7)
    loss_ulps = 8 * torch.finfo(torch.float32).eps * abs(float(np.asarray(reference["removal"][3])))
    for rank, got in enumerate(job["statistics"]):
        assert_same({k: v for k, v in reference.items() if k != "sensitivity"},
                    {k: v for k, v in got.items() if k != "sensitivity"}, f"rank {rank}")
        assert_same(reference["sensitivity"], got["sensitivity"], f"rank {rank}/sensitivity", atol=loss_ulps)


def test_fsdp_taylor_scores_equal_one_process(job):
    """Rows gathered from uneven shards (65 rows: 33 + 32), columns summed over the ranks, signed vectorize
    columns, l1 of sharded weights, group scores; and data-parallel accumulate mode on a replicated model."""
    reference = ranks.sharded_scores()
    for rank, got in enumerate(job["sharded"]):
        assert got.pop("local_rows") == shard_rows(65, WORLD)[rank]
        assert got.pop("per_sample_refused").startswith("mode: per_sample cannot score FSDP-sharded weights")
        assert set(got) <= set(reference) and len(got) >= 100
        assert_same({k: reference[k] for k in got}, got, f"rank {rank}")


def test_prune_plans_equal_one_process(job):
    """The same heads and channels kept, the same allocation and the same pruned weights on every rank and
    in one process: with sensitivity curves after an lstsq refit, and with Taylor scores on an FSDP copy.

    The refit solves a least-squares problem on 4 windows of 12 tokens: its conditioning turns the rounding
    of the Gram sums (float32 per micro-batch, 2 + 2 windows instead of 4) into ~1e-4 of the weights' scale.
    Without a refit the kept weights are copies: they agree to float rounding."""
    reference = ranks.pruned_plans()
    for rank, got in enumerate(job["plans"]):
        for name, weight_rtol in (("refit", 1e-3), ("fsdp", 1e-6)):
            assert got[name]["kv"] == reference[name]["kv"] and got[name]["mlp"] == reference[name]["mlp"]
            assert got[name]["params_after"] == reference[name]["params_after"]
            assert got[name]["calibration"] == ranks.N_SAMPLES
            assert_same(reference[name]["importance"], got[name]["importance"], f"rank {rank} {name}")
            assert_same(reference[name]["weights"], got[name]["weights"], f"rank {rank} {name}", rtol=weight_rtol)
    for name in ("refit", "fsdp"):  # every rank returns the same model
        assert_same(job["plans"][0][name]["weights"], job["plans"][1][name]["weights"], name, rtol=0.0)


def test_healing_on_two_ranks_equals_one_process(job):
    """Each rank trains on its share of every step's sequences, the gradients summed: the healed weights and the
    held-out losses are the one-process run's up to the order of float additions."""
    reference = ranks.healed_weights()
    assert reference["world_size"] == 1
    for rank, got in enumerate(job["healed"]):
        assert got["world_size"] == WORLD and got["steps"] == reference["steps"] == 3
        assert_same(reference["held_out"], got["held_out"], f"rank {rank} held-out", rtol=1e-5)
        assert_same(reference["weights"], got["weights"], f"rank {rank} weights", rtol=1e-5)
    assert_same(job["healed"][0]["weights"], job["healed"][1]["weights"], "ranks", rtol=0.0)


def test_healing_with_fsdp_sharded_layers_equals_one_process(job):
    """FSDP2 shards each decoder layer's rows over the ranks (gradients summed by its reduce-scatter, the head's
    by an all-reduce, the clipping norm over both): full, LoRA, and a run stopped after step 2 and resumed from
    its gathered checkpoint all end on the one-process weights, as a plain model on every rank."""
    references = {"full": ranks.healed_weights(), "lora": ranks.healed_weights(lora=True)}
    references["resumed"] = references["full"]
    for rank, got in enumerate(job["healed_sharded"]):
        for name, reference in references.items():
            run = got[name]
            assert run["world_size"] == WORLD and run["steps"] == reference["steps"] == 3, (rank, name)
            local_rows, rows = run["sharded_rows"]
            assert local_rows == -(-rows // WORLD) and rows > 1, (rank, name)
            assert_same(reference["held_out"], run["held_out"], f"rank {rank} {name} held-out", rtol=1e-5)
            assert_same(reference["weights"], run["weights"], f"rank {rank} {name} weights", rtol=1e-5)
    for name in references:
        assert_same(job["healed_sharded"][0][name]["weights"], job["healed_sharded"][1][name]["weights"], name,
                    rtol=0.0)


# ---- 2 ranks, torchrun: the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, wikitext_dir) -> Path:
    from test_cli_prune import _save_model

    return _save_model(tmp_path_factory.mktemp("tiny"), wikitext_dir)


def _prune_args(model: Path, out: Path, data_dir: Path) -> list[str]:
    return ["prune", "--model", str(model), "--ratio", "0.2", "--out", str(out), "--data-dir", str(data_dir),
            "--calib-samples", "5", "--calib-seq-len", "24", "--curve-samples", "3", "--no-progress",
            "--layer-importance", "sensitivity", "--refit", "lstsq", "--refit-samples", "4", "--refit-seq-len", "16"]


def _torchrun(target: list[str], logs: Path) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    """torchrun with 2 ranks on 127.0.0.1; returns the launcher's result and each rank's stdout and stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "--log-dir", str(logs), "--redirects", "3", *target]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=env, cwd=REPO_ROOT)

    def read(rank: int, stream: str) -> str:
        found = sorted(logs.glob(f"*/attempt_0/{rank}/{stream}.log"))
        assert len(found) == 1, (rank, stream, done.stderr[-3000:])
        return found[0].read_text()

    return done, [read(r, "stdout") for r in range(WORLD)], [read(r, "stderr") for r in range(WORLD)]


def test_heal_under_torchrun_with_fsdp_writes_what_one_process_writes(tiny_dir, wikitext_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(_prune_args(tiny_dir, tmp_path / "pruned", wikitext_dir)) == 0
    text = tmp_path / "heal.txt"
    text.write_text((wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    capsys.readouterr()

    def heal_args(out: Path) -> list[str]:
        return ["heal", "--model", str(tmp_path / "pruned"), "--teacher", str(tiny_dir), "--out", str(out),
                "--data", str(text), "--tokens", str(3 * 4 * 24), "--seq-len", "24", "--batch-size", "4",
                "--lr", "1e-3", "--eval-every", "1", "--no-progress"]

    assert main(heal_args(tmp_path / "one")) == 0
    capsys.readouterr()
    # the ranks run with the decoder layers sharded (the data-parallel path: test_healing_on_two_ranks_...)
    done, out, err = _torchrun(["-m", "layerprune", *heal_args(tmp_path / "two"), "--fsdp"], tmp_path / "logs")
    assert done.returncode == 0, (done.stderr[-3000:], err)
    assert "saved:" in out[0] and "saved:" not in out[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heal.txt", "logs", "one", "pruned", "two"]
    one, two = (json.loads((tmp_path / name / "report.json").read_text())["heal"] for name in ("one", "two"))
    assert one["run"]["world_size"] == 1 and two["run"]["world_size"] == WORLD and two["run"]["backend"] == "gloo"
    assert two["config"]["fsdp"] and not one["config"]["fsdp"]
    assert_same(one["history"]["held_out"], two["history"]["held_out"], "held-out", rtol=1e-5)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    assert_same(a, b, "weights", rtol=1e-5)


def _exit_codes(launcher_stderr: str) -> dict[int, int]:
    """The exit code of every failed rank, from torchrun's failure summary."""
    pairs = re.findall(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", launcher_stderr)
    return {int(r): int(c) for r, c in pairs}


def test_prune_under_torchrun_writes_what_one_process_writes(tiny_dir, wikitext_dir, tmp_path, capsys):
    from layerprune.models import load_pruned

    assert main(_prune_args(tiny_dir, tmp_path / "one", wikitext_dir)) == 0
    capsys.readouterr()
    done, out, err = _torchrun(["-m", "layerprune", *_prune_args(tiny_dir, tmp_path / "two", wikitext_dir)],
                               tmp_path / "logs")
    assert done.returncode == 0, (done.stderr[-3000:], err)
    assert "saved to" in out[0] and "saved to" not in out[1]  # rank 0 writes and reports, alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "one", "two"]  # no temporary left behind
    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    for key in ("kv_heads_kept", "mlp_channels_kept", "params_kept"):
        assert [layer[key] for layer in one["layers"]] == [layer[key] for layer in two["layers"]], key
    assert one["params_after"] == two["params_after"] and one["calibration"] == two["calibration"]
    assert one["layer_importance"]["details"]["calib_tokens"] == two["layer_importance"]["details"]["calib_tokens"]
    assert one["refit"]["calib_tokens"] == two["refit"]["calib_tokens"]
    loss = one["layer_importance"]["base_loss"]
    assert abs(two["layer_importance"]["base_loss"] - loss) <= 1e-6 * loss
    for curves in ("attn_curves", "mlp_curve_samples"):  # measured after the refit: see the plans test
        assert_same(one["layer_importance"][curves], two["layer_importance"][curves], curves, atol=1e-5 * loss)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        logits = [load_pruned(tmp_path / name)[0](input_ids=ids).logits for name in ("one", "two")]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("where", "failing_rank", "line"), [
    ("loss", 1, "layerprune prune: error: rank 1 of 2: injected failure on rank 1 (InvalidInputError)"),
    ("save", 0, "layerprune prune: error: rank 0 of 2: the disk or the file-size limit is full (No space left on "
                "device); nothing was left half-written"),
], ids=["rank1-mid-collective", "rank0-saving"])
def test_a_failing_rank_ends_every_rank_with_its_line(tiny_dir, wikitext_dir, tmp_path, where, failing_rank, line):
    script = str(Path(ranks.__file__))
    done, _, err = _torchrun([script, where, str(failing_rank), *_prune_args(tiny_dir, tmp_path / "out", wikitext_dir)],
                             tmp_path / "logs")
    assert done.returncode != 0
    for rank in range(WORLD):
        assert err[rank].strip().splitlines()[-1] == line, (rank, err[rank][-2000:])
    assert _exit_codes(done.stderr) == {0: 2, 1: 2}, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]  # no output folder, no temporary


def test_bench_fsdp_memory_models_and_projects_a_saved_run(tmp_path):
    """The benchmark's figures from saved rows (measuring takes minutes): the model beside every row and the
    Llama-3-70B projection, whose weight shard is an eighth of its bfloat16 weights."""
    bench = REPO_ROOT / "benches" / "bench_fsdp_memory.py"
    assert "usage:" in subprocess.run([sys.executable, str(bench), "--help"], capture_output=True, text=True,
                                      timeout=120).stdout
    row = {"shape": "tiny", "device": "cpu", "rank": 0, "seconds": 1.0, "peak_rss_over_loaded_bytes": None}
    rows = [{**row, "mode": "single", "world": 1, "tokens_per_rank": 64, "held_bytes": 900_000,
             "peak_over_held_bytes": 1_400_000, "peak_bytes": 2_300_000,
             "saved_for_backward_bytes": {"layers": 1_100_000, "head": 150_000}},
            {**row, "mode": "fsdp-2", "world": 2, "tokens_per_rank": 32, "held_bytes": 450_000,
             "peak_over_held_bytes": 1_500_000, "peak_bytes": 1_950_000}]
    (tmp_path / "run.json").write_text(json.dumps({"rows": rows}))
    out = subprocess.run([sys.executable, str(bench), "--from-json", str(tmp_path / "run.json"), "--json",
                          str(tmp_path / "figures.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert all(r["modelled_peak_bytes"] > 0 for r in figures["rows"])
    projected = figures["projection"]
    assert [p["tokens_per_gpu"] for p in projected] == [256, 2048, 8192]
    assert all(p["gpus"] == 8 and 16.0 < p["weights_gib"] < 17.0 for p in projected)  # 70.6e9 × 2 B / 8
    assert projected[0]["peak_gib"] < projected[1]["peak_gib"] < projected[2]["peak_gib"]
