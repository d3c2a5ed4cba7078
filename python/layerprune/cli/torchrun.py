"""A command under ``torchrun``: one process per rank, and every rank ends the same way.

``torchrun --nproc-per-node N -m layerprune prune ...`` starts N copies of the command. Each joins the process
group (gloo on CPU, NCCL on GPUs), computes on its share of the calibration samples with every statistic
summed over the ranks (:mod:`layerprune.distributed`), and rank 0 alone writes the output, after every rank
has pruned. A failure on any rank ends every rank with that rank's error line and exit code
(:class:`layerprune.distributed.ExitAgreement`); rank 0 writes nothing before all ranks have succeeded, and
its write is atomic, so no output folder is left.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from layerprune.errors import InvalidInputError

# The commands that run under torchrun; the others refuse a WORLD_SIZE above 1.
DISTRIBUTED_COMMANDS = ("prune", "heal")


PRUNE_FSDP_HELP = ("compute the Taylor scores (taylor, vectorize) on a copy of the model sharded with FSDP2 over "
                   "the ranks: each rank holds its shard of the weights and one gradient shard")


def add_distributed_arguments(p: argparse.ArgumentParser, *, fsdp: str | None = PRUNE_FSDP_HELP) -> None:
    """``--dist-backend``, and ``--fsdp`` with the help ``fsdp`` (None: no such flag)."""
    from layerprune.distributed import BACKENDS

    g = p.add_argument_group("several processes (torchrun --nproc-per-node N -m layerprune ...)")
    g.add_argument("--dist-backend", choices=BACKENDS, default="auto",
                   help="collective backend under torchrun: nccl (each rank on cuda:LOCAL_RANK) or gloo (CPU); "
                   "auto: nccl when every local rank has a GPU (default: auto)")
    if fsdp is not None:
        g.add_argument("--fsdp", action="store_true", help=fsdp)


def wants_distributed(args: argparse.Namespace) -> bool:
    """Launched as one of several ranks (WORLD_SIZE > 1), or asked for FSDP (which needs a process group)."""
    from layerprune.distributed import launched_world_size

    return launched_world_size() > 1 or bool(getattr(args, "fsdp", False))


def first_on_local_rank0(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` on local rank 0 of every node first, then on the other ranks (a cache that the first call fills,
    such as the converted embedded model, is filled once per node)."""
    from layerprune import distributed

    local_rank0 = int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
    if local_rank0:
        result = fn(*args, **kwargs)
        distributed.barrier("local-rank0-first")
        return result
    distributed.barrier("local-rank0-first")
    return fn(*args, **kwargs)


def run(args: argparse.Namespace, failure: Callable[[str, BaseException, str], tuple[int, str]]) -> int:
    """``args.run(args)`` on this rank; ``failure(command, exc, where)`` gives the exit code and error line."""
    from layerprune import distributed

    world = distributed.launched_world_size()
    if args.command not in DISTRIBUTED_COMMANDS:
        raise InvalidInputError(f"{args.command} runs in one process; under torchrun (WORLD_SIZE={world}) only "
                                f"{' and '.join(DISTRIBUTED_COMMANDS)} run")
    from layerprune.cli.args import release_outputs
    from layerprune.distributed.exits import BEFORE_FORCED_EXIT, forced_exit

    if release_outputs not in BEFORE_FORCED_EXIT:  # a rank ended by another's failure releases its claim of --out
        BEFORE_FORCED_EXIT.append(release_outputs)
    distributed.initialize(getattr(args, "dist_backend", "auto"))
    where = f"rank {int(os.environ.get('RANK', '0') or 0)} of {world}" if world > 1 else ""
    try:
        with distributed.exit_agreement() as agreement:
            try:
                code = int(args.run(args) or 0)
            except (KeyboardInterrupt, Exception) as exc:
                code, line = failure(args.command, exc, where)
                if agreement is None:
                    print(line, file=sys.stderr, flush=True)
                    return code
                code = agreement.fail(line, code)  # prints the line every rank ends with
                # End now: torchrun stops the remaining ranks once one has exited, and Python's own shutdown
                # would meet that SIGTERM with the default action instead of this exit code.
                forced_exit(code)
            if agreement is not None:
                agreement.finish()
            return code
    finally:
        distributed.shutdown()


__all__ = ["DISTRIBUTED_COMMANDS", "add_distributed_arguments", "first_on_local_rank0", "run", "wants_distributed"]
