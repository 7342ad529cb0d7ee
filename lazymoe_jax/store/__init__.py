"""The store: the only code that reads (and, for the converter, writes) model bytes on disk.

STORE/manifest.json   written last: a store without it is incomplete and refused
STORE/dense/<part>/   orbax checkpoints of the dense params ("globals", "layer_000", ...)
STORE/embed/          tensorstore zarr3 table [vocab, hidden] of the embedding, read by rows (v5)
STORE/experts/<name>/ tensorstore zarr3 arrays [moe_layer, expert, rows, cols], one chunk per
                      (layer, expert), raw little-endian bytes, crc32 of every chunk in the manifest
STORE/tokenizer.*     copied from the source model
"""
