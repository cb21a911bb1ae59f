"""Pruning (02-Prune). Builds on ``core`` only.

Wanda's algorithm, in reading order (the default, resident path; one line per file):

1. ``driver``      — ``prune_model`` checks its arguments, then ``prune_all`` runs the layer loop: per decoder layer,
                     ``prune_layer`` (statistics, then score / mask / apply per linear) and ``feed_next_layer``.
2. ``placement``   — where the layers and activations live (``Placement``): resident by default; the loop's visits.
3. ``calibration`` — capture the first decoder layer's inputs once per batch; run one layer on every batch.
4. ``statistics``  — the hooks that sum each linear's input-channel norms Σ_t x_tj² (in,) while the layer runs.
5. ``methods/wanda`` — the score |W_ij| · ‖X_j‖₂ (out, in) and its mask, per output row.
6. ``masks``       — choosing the pruned weights: per row or layer, or N:M (``SparsityTarget``).
7. ``sparsity``    — what was pruned: measured sparsity and the masks' fingerprint (``mask_sha256``).
8. ``report``      — ``PruneReport``: one row per pruned linear, weights left dense, times.

Beside the path: ``spec`` (what to prune), ``methods/`` (the other methods), ``owl`` (per-layer sparsities),
``routing`` (routed experts' statistics), ``offload`` (the low-memory mode: layers and activations in CPU memory,
``copies``), ``disk`` (streaming a model from disk), ``parallel`` (data-parallel calibration), ``recovery`` and
``lora`` (05-Recover).
"""
