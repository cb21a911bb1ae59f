"""Evaluating a (pruned) model: perplexity (02), generation and drift from the dense model (03), zero-shot accuracy
through lm-eval (``zeroshot/``, 04). Builds on ``core`` only."""
