"""The ground floor: errors, input checks, profiles, devices and seeds, models, data, safe saving, saved outputs.

- ``errors``, ``validation``, ``config``, ``device``: errors, input checks, profiles, devices and seeds
- ``loading``: the models of each profile (01-Setup); ``anatomy``: their decoder layers and linears (02-Prune)
- ``data``: calibration and evaluation text; ``checksums``: per-tensor digests
- ``manifests`` → ``locks`` → ``publish``: what a lab folder holds, one run per folder, publishing it atomically
- ``sparse`` (``bits``, ``format``, ``model``): the sparse checkpoint format; ``card``: the model card
- ``saved``: the lab's saved output folders (save / load / export a pruned model, bytes on disk)

Imports nothing from the other subpackages; every one of them builds on this."""
