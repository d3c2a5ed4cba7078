"""The fault tests' process runner: imports layerprune once, then forks one child per command.

Each child is a whole `layerprune` command (``layerprune.cli.main(argv)``) in a process of its own, as a user's
would be, without paying the imports (seconds) again: it can be killed by a fault point (SIGKILL), run under a
file-size limit, or run beside another child. The runner reads one JSON list of jobs per line on stdin and answers
one JSON line per list: for each job its exit code (negative: the signal that ended it), wall time, peak RSS, and
the runner's own RSS when it forked (a child starts with the parent's pages, so its growth is the difference).

A job: ``{"argv": [...], "log": PATH, "env": {...}, "fsize": BYTES, "no_exchange": bool}``. Jobs of one list
start together.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _child(job: dict) -> int:
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(job.get("env", {}))
    if job.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
    if job.get("no_exchange"):  # a file system without renameat2(RENAME_EXCHANGE): the two-rename swap
        import layerprune.atomic

        layerprune.atomic._exchange = lambda a, b: False
    from layerprune.cli import main

    return main(job["argv"])


def run_jobs(jobs: list[dict]) -> list[dict]:
    started: dict[int, tuple[int, float, int]] = {}
    for index, job in enumerate(jobs):
        base = rss_kib()
        pid = os.fork()
        if pid == 0:  # the child: run the command, then leave without the parent's exit handlers
            code = 99
            try:
                code = _child(job)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        started[pid] = (index, time.monotonic(), base)
    results: list[dict] = [{} for _ in jobs]
    while started:
        pid, status, usage = os.wait4(-1, 0)
        index, t0, base = started.pop(pid)
        results[index] = {"exit": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - t0,
                          "maxrss_kib": usage.ru_maxrss, "base_rss_kib": base}
    return results


def main() -> None:
    # Everything the commands import, imported before the first fork (no torch work runs in this process, so no
    # thread pool is started before a fork).
    import torch  # noqa: F401 (imported before the first fork)
    import transformers  # noqa: F401

    import layerprune.cli
    import layerprune.compare
    import layerprune.evaluation
    import layerprune.export.gguf
    import layerprune.export.streamed
    import layerprune.healing
    import layerprune.pruning.pipeline
    import layerprune.pruning.sequential  # noqa: F401
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    layerprune.cli.build_parser()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run_jobs(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
