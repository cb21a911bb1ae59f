"""The lab's sparse checkpoint, in five files (introduced in 02-Prune; 03 and 04 load it; 07 quantizes it):

- ``bits``: the masks' vocabulary and all bit packing. A *kept* mask is True where the weight was kept; a *pruned*
  mask (what ``prune.masks`` and the methods return) is True where it was removed; ``kept = ~pruned``. Packed bits
  are ``np.packbits``' order: row-major, first weight in the highest bit, 1 = kept. ``KeptMasks`` is the record of
  which weights pruning kept, remembered on the model.
- ``quant``: llama.cpp's q4_0 / q8_0 blocks (the gguf package), and the model's record of its quantization.
- ``format``: the format, one weight at a time — its kept values (or their blocks) and its packed mask or N:M
  positions.
- ``files``: the safetensors file (or shards and index) of a whole state dict, written and read back, checked.
- ``model``: a whole transformers model to and from those files; ``quantize_model``.
"""
