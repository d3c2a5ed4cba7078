"""The fault tests' harness (its fixtures are in conftest.py): the process runner (``runner.py``), a tiny checkpoint, and folder digests.

Every command runs in a process of its own (forked by the runner), so a fault point's SIGKILL, a file-size limit or
a second writer meets a real process, as a user's command would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
# The files of a pruned folder that must be identical between two runs of one command (report.json holds timings).
RESULT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class Runner:
    """One runner process; :meth:`run` sends it jobs and gives back their results (see runner.py)."""

    def __init__(self, tmp: Path, data_dir: Path) -> None:
        env = dict(os.environ, LAYERPRUNE_DATA_DIR=str(data_dir), TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
        env.pop("LAYERPRUNE_FAULT", None)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "runner.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
        self.tmp, self.count = tmp, 0
        ready = json.loads(self.proc.stdout.readline())
        assert "ready" in ready, ready

    def run(self, *jobs: dict) -> list[dict]:
        """Run ``jobs`` together; each result gains ``log`` (its stdout and stderr) and ``error_lines``."""
        sent = []
        for job in jobs:
            self.count += 1
            sent.append({"log": str(self.tmp / f"job-{self.count}.log"), **job})
        self.proc.stdin.write(json.dumps(sent) + "\n")
        self.proc.stdin.flush()
        results = json.loads(self.proc.stdout.readline())
        for job, result in zip(sent, results):
            result["log"] = Path(job["log"]).read_text(errors="replace")
            result["error_lines"] = [line for line in result["log"].splitlines() if line.startswith("layerprune ")]
            result["growth_mib"] = max(0, result["maxrss_kib"] - result["base_rss_kib"]) / 1024
        return results

    def one(self, argv: list[str], **job: object) -> dict:
        return self.run({"argv": [str(a) for a in argv], **job})[0]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


def make_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama (GQA 4:1) with a BPE tokenizer, saved as a Hugging Face folder."""
    from families import CASES, make_model, make_tokenizer

    make_model(CASES[0], seed=seed).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def digest(folder: Path, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """sha256 of every file below ``folder`` (or of ``names`` only), by relative path."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file()) if names is None else [folder / n for n in names]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def leftovers(out: Path) -> list[str]:
    """Names a writer of ``out`` leaves beside it while it runs (``.NAME.tmp-*``, ``.NAME.old-*``, ``.NAME.lock``)."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
