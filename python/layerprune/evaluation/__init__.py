"""Evaluation: perplexity (LLM-Pruner's protocol), throughput and greedy generations."""

from layerprune.evaluation.perplexity import generate_greedy, perplexity, throughput

__all__ = ["generate_greedy", "perplexity", "throughput"]
