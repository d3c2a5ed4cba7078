"""What the ranks of the multi-process tests (tests/test_distributed.py) run.

* :func:`calibration_statistics`, :func:`sharded_scores`, :func:`pruned_plans`: the same computations in one
  process (the reference) and on every rank of a job (inside the data-parallel group, on the rank's share);
* :func:`spawned_rank`: one rank started by ``torch.multiprocessing`` (gloo on 127.0.0.1), which saves its
  results for the test to compare;
* run as a script, one rank of a torchrun job running the layerprune command line, with a failure injected
  on one rank: ``torchrun ... distributed_ranks.py WHERE FAILING_RANK ARGV...``, WHERE being ``loss`` (the
  rank raises in its third calibration-loss evaluation, while the others are blocked in the all-reduce of
  that loss) or ``save`` (rank 0's ``save_pruned`` meets a full disk, after every rank has pruned).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import torch
from families import plain_config

sys.path.insert(0, str(Path(__file__).resolve().parent))

N_SAMPLES, SEQ_LEN, VOCAB = 5, 12, 64  # 5 samples: the ranks hold 3 and 2


def tiny_model() -> torch.nn.Module:
    """Odd MLP width (65 rows: FSDP shards of 33 and 32), GQA 4:2."""
    from conftest import make_tiny_llama

    return make_tiny_llama(num_heads=4, num_kv_heads=2, head_dim=8, hidden=32, intermediate=65, layers=2, vocab=VOCAB)


def batch(n: int = N_SAMPLES, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def calibration_statistics() -> dict[str, Any]:
    """Element scores, layer importance and Gram matrices of the batch (this rank's share when data-parallel)."""
    from layerprune import distributed
    from layerprune.importance import activation_importance, removal_importance, sensitivity_importance
    from layerprune.refit import output_projection_grams
    from layerprune.scoring.groups import element_group_scores

    model, ids = tiny_model(), distributed.local_samples(batch())
    out: dict[str, Any] = {}
    for kind in ("taylor", "vectorize", "taylor2", "activation"):
        out[f"scores/{kind}"] = element_group_scores(model, ids, importance=kind, progress=False)
    removal = removal_importance(model, ids, progress=False)
    out["removal"] = (removal.attn, removal.mlp, removal.combined, removal.base_loss)
    out["block_influence"] = activation_importance(model, ids, progress=False).combined
    curves = sensitivity_importance(model, ids, *out["scores/taylor"], curve_samples=3, progress=False)
    out["sensitivity"] = (curves.attn_curves, curves.mlp_curves)
    grams = output_projection_grams(model, ids, progress=False)
    out["grams"] = [(g[k].gram, g[k].total, g[k].count) for g in grams for k in ("o_proj", "down_proj")]
    return out


def _scorer_scores(model: torch.nn.Module, ids: torch.Tensor, mode: str, world: int = 1) -> dict[str, Any]:
    """GradientScorer rows and columns of every decoder weight after the batch's mean-loss gradient: one
    backward (``batch``) or two micro-batches summed (``accumulate``); ``world`` undoes FSDP's averaging."""
    from layerprune import distributed
    from layerprune.scoring import GradientScorer

    total_tokens = distributed.global_count(ids.shape[0] * (ids.shape[1] - 1))
    parts = [ids] if mode == "batch" else [ids[:1], ids[1:]]
    kinds = ("taylor", "vectorize") if mode == "batch" else ("taylor",)
    with GradientScorer(model, kinds=kinds, mode=mode) as scorer:
        for part in parts:
            loss = model(input_ids=part, labels=part, use_cache=False).loss
            (loss * (part.shape[0] * (part.shape[1] - 1) / total_tokens) * world).backward()
        scorer.step()
    out = {f"{mode}/{k}/{n}/{axis}": getattr(scorer, f"{axis}_scores")(n, k)
           for n in scorer.names for k in kinds for axis in ("row", "col")}
    if mode == "batch":
        with GradientScorer(model, kinds=("l1",)) as magnitude:
            out.update({f"l1/{n}/{axis}": getattr(magnitude, f"{axis}_scores")(n, "l1")
                        for n in magnitude.names for axis in ("row", "col")})
    return out


def sharded_scores() -> dict[str, Any]:
    """Raw GradientScorer scores and group scores: of a plain model in one process, of an FSDP2-sharded one
    (each rank its share of the samples) in a job; data-parallel accumulate mode on the replicated model."""
    from layerprune import distributed
    from layerprune.errors import InvalidInputError
    from layerprune.scoring import GradientScorer
    from layerprune.scoring.groups import element_group_scores
    from layerprune.scoring.sharded import shard_model, sharded_group_scores

    model, ids = tiny_model(), distributed.local_samples(batch())
    out: dict[str, Any] = {}
    if distributed.active() is None:
        for mode in ("batch", "accumulate"):
            out.update(_scorer_scores(model, ids, mode))
        for kind in ("taylor", "vectorize"):
            out[f"groups/{kind}"] = element_group_scores(model, ids, importance=kind, progress=False)
        return out
    import torch.distributed as dist

    out.update(_scorer_scores(model, ids, "accumulate"))  # replicated weights: gradients summed in step()
    sharded = shard_model(tiny_model())
    out["local_rows"] = int(sharded.model.layers[0].mlp.gate_proj.weight.to_local().shape[0])
    try:
        GradientScorer(sharded, kinds=("taylor2",), mode="per_sample")
    except InvalidInputError as exc:
        out["per_sample_refused"] = str(exc)
    out.update(_scorer_scores(sharded, ids, "batch", world=dist.get_world_size()))
    for kind in ("taylor", "vectorize"):
        out[f"groups/{kind}"] = sharded_group_scores(model, ids, importance=kind, progress=False)
    return out


def pruned_plans() -> dict[str, Any]:
    """What ``prune`` keeps (data-parallel inside a job), with sensitivity curves after an lstsq refit, and
    with the Taylor scores on an FSDP-sharded copy."""
    from layerprune import distributed
    from layerprune.pruning import prune

    out: dict[str, Any] = {}
    sharded = distributed.active() is not None  # the one-process reference scores the plain model
    for name, extra in (("refit", {"refit": "lstsq", "layer_importance": "sensitivity"}),
                        ("fsdp", {"fsdp": sharded, "layer_importance": "removal"})):
        config = plain_config(ratio=0.3, mode="unbalanced", solver="dp", calib_samples=N_SAMPLES, **extra)
        result = prune(tiny_model(), None, config, calib_ids=batch(), refit_ids=batch(4, seed=2), progress=False)
        out[name] = {
            "kv": [layer["kv_heads_kept"] for layer in result.report["layers"]],
            "mlp": [layer["mlp_channels_kept"] for layer in result.report["layers"]],
            "params_after": result.allocation.params_after,
            "importance": (result.layer_importance.attn, result.layer_importance.mlp),
            "calibration": result.report["calibration"]["samples"],
            "weights": {k: v.clone() for k, v in result.model.state_dict().items()},
        }
    return out


def healed_weights(*, fsdp: bool = False, lora: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """A pruned tiny Llama healed for 3 steps of 4 sequences (micro-batches of 1): in one process, or each rank
    taking its share of every step's sequences with the gradients summed over the ranks (``fsdp``: the decoder
    layers sharded). ``stop_after``: the run is stopped after that step (a checkpoint at every step) and resumed."""
    import shutil
    import tempfile

    from families import find_data_dir
    from families import CASES, make_model, make_tokenizer

    from layerprune import distributed
    from layerprune.arch import layer_shapes
    from layerprune.healing import HealConfig, heal
    from layerprune.pruning import pruned_copy
    from layerprune.scoring.selection import LayerKeep

    teacher = make_model(CASES[0])
    keep = [LayerKeep(kv_heads=(0,), mlp_channels=tuple(range(0, s["intermediate"], 2))) for s in layer_shapes(teacher)]
    config = HealConfig(tokens=3 * 4 * 32, seq_len=32, batch_size=4, micro_batch_size=1, lr=1e-3, eval_every=1,
                        checkpoint_every=1, lora=lora, fsdp=fsdp, data_dir=str(find_data_dir()))
    student = pruned_copy(teacher, keep)
    state = Path(distributed.broadcast_object(tempfile.mkdtemp(prefix="heal-ranks-") if distributed.is_rank0() else None))
    if stop_after is not None:
        def stop(step: int, tokens: int, model: Any) -> None:
            if step == stop_after:
                raise KeyboardInterrupt

        try:
            heal(student, teacher, make_tokenizer(), config, state_dir=state, progress=False, on_step=stop)
        except KeyboardInterrupt:
            pass
    result = heal(student, teacher, make_tokenizer(), config, state_dir=state, resume=stop_after is not None,
                  progress=False)
    distributed.barrier("healed-weights")
    if distributed.is_rank0():
        shutil.rmtree(state)
    return {"weights": {k: v.clone() for k, v in result.model.state_dict().items()},
            "held_out": result.report["heal"]["history"]["held_out"], "steps": result.report["heal"]["steps"],
            "world_size": result.report["heal"]["run"]["world_size"],
            "sharded_rows": _sharded_rows(config) if fsdp else None}


def _sharded_rows(config: Any) -> tuple[int, int]:
    """Rows of layer 0's gate_proj a rank holds once the model is sharded for healing, and all its rows."""
    from families import CASES, make_model

    from layerprune.healing.sharding import shard_decoder_layers

    model = shard_decoder_layers(make_model(CASES[0]), config.batch_size)
    weight = model.model.layers[0].mlp.gate_proj.weight
    return int(weight.to_local().shape[0]), int(weight.shape[0])


def healed_sharded() -> dict[str, Any]:
    """Healing with the decoder layers sharded by FSDP2: plain, with LoRA, and stopped after step 2 and resumed."""
    return {"full": healed_weights(fsdp=True), "lora": healed_weights(fsdp=True, lora=True),
            "resumed": healed_weights(fsdp=True, stop_after=2)}


COMPUTATIONS = {"statistics": calibration_statistics, "sharded": sharded_scores, "plans": pruned_plans,
                "healed": healed_weights, "healed_sharded": healed_sharded}


def spawned_rank(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    """One rank of a torch.multiprocessing job: join the gloo group on 127.0.0.1 and save each computation."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from layerprune import distributed

    distributed.initialize("gloo", timeout_s=300)
    try:
        for name in names:
            torch.save(COMPUTATIONS[name](), Path(out_dir) / f"{name}-rank{rank}.pt")
    finally:
        distributed.shutdown()


def _inject(where: str, failing_rank: int) -> None:
    rank = int(os.environ["RANK"])
    if rank != failing_rank:
        return
    if where == "loss":
        from layerprune.errors import InvalidInputError
        from layerprune.importance import losses

        original, calls = losses.head_loss, [0]

        def failing_head_loss(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                raise InvalidInputError(f"injected failure on rank {rank}")
            return original(*args, **kwargs)

        losses.head_loss = failing_head_loss
    elif where == "save":
        import layerprune.export

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

        layerprune.export.save_pruned = full_disk


if __name__ == "__main__":
    injection, failing = sys.argv[1], int(sys.argv[2])
    if injection not in ("loss", "save", "none"):
        raise SystemExit(f"unknown injection {injection!r}")
    _inject(injection, failing)
    from layerprune.cli import main

    sys.exit(main(sys.argv[3:]))
