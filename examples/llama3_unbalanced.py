"""The unbalanced variant of LLM-Pruner's ``llama3.py``: per-layer rates from layer importance, pruned through
``layerprune.torch_pruning`` in place of ``torch_pruning``.

Layer importance (``removal``: the calibration-loss increase when a layer's attention or MLP is the identity)
is mapped to per-layer rates by an allocation solver (``seed``: the reference mapping, log / min-max / clip with
a minimum effective rate; or ``dp``) so that ``--pruning_ratio`` of ALL parameters goes.
``layerprune.allocation.to_pruning_ratio_dict`` turns the plan into the ``ch_sparsity_dict`` the MetaPruner
takes, keyed by every layer's k_proj and gate_proj, and those are the roots. After the last step every layer
holds exactly the planned KV groups and channels.

    python examples/llama3_unbalanced.py --base_model smollm2-135m --pruning_ratio 0.25 \
        --data_dir ../shared/data/wikitext-2-raw --eval_tokens 4096
"""

from __future__ import annotations

import argparse
import time

import torch

import layerprune.torch_pruning as tp
from layerprune.allocation import allocate, spec_from_model_config, to_pruning_ratio_dict
from layerprune.data import calibration_batch, eval_tokens
from layerprune.evaluation.perplexity import perplexity
from layerprune.export import save_pruned
from layerprune.importance import layer_importance
from layerprune.models import load_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="smollm2-135m", help="smollm2-135m or a Hugging Face folder")
    parser.add_argument("--pruning_ratio", type=float, default=0.25, help="fraction of ALL parameters to remove")
    parser.add_argument("--layer_importance", default="removal", choices=("removal", "activation"))
    parser.add_argument("--solver", default="seed", choices=("seed", "greedy", "lagrange", "dp"))
    parser.add_argument("--min_effective_rate", type=float, default=0.15, help="seed solver option")
    parser.add_argument("--iterative_steps", type=int, default=1)
    parser.add_argument("--num_examples", type=int, default=10)
    parser.add_argument("--data_dir", default=None, help="WikiText-2 raw folder (calibration: train, else valid)")
    parser.add_argument("--eval_tokens", type=int, default=0, help="WikiText-2 test perplexity on the first N tokens")
    parser.add_argument("--save_model", default=None, help="write the pruned model to this folder")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.base_model)
    before = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    forward_prompts = torch.tensor([[1, 306, 4658, 278, 6593, 310, 2834, 338]]) % model.config.vocab_size  # tracing only

    start = time.perf_counter()
    calib = calibration_batch(tokenizer, args.num_examples, 64, seed=args.seed, data_dir=args.data_dir)
    importance = layer_importance(model, calib, args.layer_importance, progress=False)
    spec = spec_from_model_config(model.config, args.pruning_ratio, attn_importance=importance.attn.clip(min=0),
                                  mlp_importance=importance.mlp.clip(min=0), min_effective_rate=args.min_effective_rate)
    plan = allocate(spec, solver=args.solver)
    rates = to_pruning_ratio_dict(model, plan)
    planned = time.perf_counter()
    print("per-layer rates (attention, MLP):",
          [(round(rates[l.self_attn.k_proj], 3), round(rates[l.mlp.gate_proj], 3)) for l in layers])

    for param in model.parameters():
        param.requires_grad_(True)
    imp = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    kwargs = {
        "importance": imp,
        "global_pruning": False,
        "iterative_steps": args.iterative_steps,
        "ch_sparsity": 0.0,
        "ch_sparsity_dict": rates,
        "ignored_layers": [],
        "channel_groups": {},
        "consecutive_groups": {layer.self_attn.k_proj: layer.self_attn.head_dim for layer in layers},
        "customized_pruners": {type(model.model.norm): tp.RMSNormPruner()},
        "root_module_types": None,
        "root_instances": list(rates),
    }
    pruner = tp.pruner.MetaPruner(model, forward_prompts, **kwargs)
    model.zero_grad()
    for i in range(args.iterative_steps):
        examples = calibration_batch(tokenizer, args.num_examples, 64, seed=args.seed + i, data_dir=args.data_dir)
        loss = model(examples, labels=examples).loss
        print(f"step {i + 1}: calibration loss {loss.item():.4f}")
        loss.backward()
        pruner.step()
        after = sum(p.numel() for p in model.parameters())
        print(f"After Iter {i + 1}/{args.iterative_steps}, #parameters: {after:,}")
    done = time.perf_counter()
    model.zero_grad(set_to_none=True)
    del pruner
    after = sum(p.numel() for p in model.parameters())
    print(f"#Param before: {before:,}, #Param after: {after:,} (planned {plan.params_after:,}), removed "
          f"{1 - after / before:.4f} of all parameters; plan {planned - start:.1f} s, pruning {done - planned:.1f} s")
    result = {"params_before": before, "params_after": after, "planned_params_after": plan.params_after,
              "plan_seconds": planned - start, "pruning_seconds": done - planned, "plan": plan,
              "kv_heads": [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in layers],
              "intermediate": [layer.mlp.gate_proj.out_features for layer in layers]}
    if args.eval_tokens:
        model.eval()
        ids = eval_tokens(tokenizer, data_dir=args.data_dir, max_tokens=args.eval_tokens)
        result["ppl"] = perplexity(model, ids, seq_len=128, progress=False)["ppl"]
        print(f"PPL after pruning (WikiText-2 test, first {args.eval_tokens} tokens): {result['ppl']:.3f}")
    if args.save_model:
        save_pruned(model, tokenizer, args.save_model, overwrite=True)
    return result


if __name__ == "__main__":
    main()
