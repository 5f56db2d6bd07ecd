"""Files of classifier outputs: reading them safely, checking them once, writing outputs whole.

``common``: kinds, formats, :class:`InputError`; ``check``: the one validator of what a file holds
(layout before reading, values chunk by chunk, sizes before allocation); ``arrays``: .npy, .npz,
.pt and pickles; ``tabular``: CSV/TSV and Parquet; ``source``: the chunked sources all of them
return; ``write``: the output formats; ``atomic``: outputs checked against the inputs by identity
and written to a temporary file that is renamed into place only when complete.
:mod:`softcal._io` is the entry point that the command line uses.
"""
