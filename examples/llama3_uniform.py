"""LLM-Pruner's ``llama3.py --block_wise`` run, with ``layerprune.torch_pruning`` in place of ``torch_pruning``.

One rate in every layer of a range: each layer in [start, end) loses ``pruning_ratio`` of its KV groups and of
its MLP channels (Torch-Pruning's count, ``n - int(n * (1 - ratio))`` rows of the root, in whole KV heads), scored
by first-order Taylor |W·G| summed over each group (LLM-Pruner's ``param_first`` with ``sum``). The rest of the
script is the reference's: the same MetaPruner arguments, a backward on calibration text before every step.

    python examples/llama3_uniform.py --base_model smollm2-135m --pruning_ratio 0.25 \
        --data_dir ../shared/data/wikitext-2-raw --eval_tokens 4096
"""

from __future__ import annotations

import argparse
import time

import torch

import layerprune.torch_pruning as tp
from layerprune.data import calibration_batch, eval_tokens
from layerprune.evaluation.perplexity import perplexity
from layerprune.export import save_pruned
from layerprune.models import load_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="smollm2-135m", help="smollm2-135m or a Hugging Face folder")
    parser.add_argument("--pruning_ratio", type=float, default=0.25, help="per-layer rate inside the layer range")
    parser.add_argument("--block_attention_layer_start", type=int, default=3)
    parser.add_argument("--block_attention_layer_end", type=int, default=None, help="default: the last layer (kept)")
    parser.add_argument("--block_mlp_layer_start", type=int, default=3)
    parser.add_argument("--block_mlp_layer_end", type=int, default=None, help="default: the last layer (kept)")
    parser.add_argument("--iterative_steps", type=int, default=1)
    parser.add_argument("--grouping_strategy", default="sum", help="group_reduction of the Taylor importance")
    parser.add_argument("--global_pruning", action="store_true")
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
    for param in model.parameters():
        param.requires_grad_(True)
    before = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    last = len(layers) - 1
    attn_end = last if args.block_attention_layer_end is None else args.block_attention_layer_end
    mlp_end = last if args.block_mlp_layer_end is None else args.block_mlp_layer_end
    forward_prompts = torch.tensor([[1, 306, 4658, 278, 6593, 310, 2834, 338]]) % model.config.vocab_size  # tracing only

    imp = tp.importance.GroupTaylorImportance(group_reduction=args.grouping_strategy, normalizer=None)
    kwargs = {
        "importance": imp,
        "global_pruning": args.global_pruning,
        "iterative_steps": args.iterative_steps,
        "ch_sparsity": args.pruning_ratio,
        "ignored_layers": [],
        "channel_groups": {},
        "consecutive_groups": {layer.self_attn.k_proj: layer.self_attn.head_dim for layer in layers},
        "customized_pruners": {type(model.model.norm): tp.RMSNormPruner()},
        "root_module_types": None,
        "root_instances": [layers[i].self_attn.k_proj for i in range(args.block_attention_layer_start, attn_end)]
        + [layers[i].mlp.gate_proj for i in range(args.block_mlp_layer_start, mlp_end)],
    }
    start = time.perf_counter()
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
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    del pruner
    after = sum(p.numel() for p in model.parameters())
    print(f"#Param before: {before:,}, #Param after: {after:,}, removed {1 - after / before:.4f} of all parameters "
          f"in {seconds:.1f} s")
    result = {"params_before": before, "params_after": after, "seconds": seconds,
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
