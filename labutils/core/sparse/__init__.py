"""The lab's sparse checkpoint, in three files (introduced in 02-Prune; 03 and 04 load it):

- ``bits``: the masks' vocabulary and all bit packing. A *kept* mask is True where the weight was kept; a *pruned*
  mask (what ``prune.masks`` and the methods return) is True where it was removed; ``kept = ~pruned``. Packed bits
  are ``np.packbits``' order: row-major, first weight in the highest bit, 1 = kept. ``KeptMasks`` is the record of
  which weights pruning kept, remembered on the model.
- ``format``: the file format, one weight at a time — its kept values and its packed mask or N:M positions.
- ``model``: a whole transformers model to and from that format.
"""
