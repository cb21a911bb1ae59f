"""Pruning (02-Prune): what to prune (``spec``, ``masks``), the calibration passes that feed the statistics
(``calibration``, ``streaming``), the scores (``methods/``), OWL's per-layer sparsities (``owl``), the
layer-by-layer ``driver`` and the fingerprints of what it did (``sparsity``). Builds on ``core`` only."""
