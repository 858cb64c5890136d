"""seqzoo's ops: one folder per op (reference.py, chunked.py, kernels, a dispatcher in
__init__.py). `impl.py` holds the one implementation vocabulary (`Impl`) and dispatcher;
`common.py` the chunk helpers the ops share. Imports nothing of seqzoo outside this package."""
