"""Evaluation, tables, plots and benchmarks. `python -m eval...` first preloads the fast allocator
where it is installed (train/allocator.py); a plain `import eval` changes nothing."""
from train import allocator as _allocator

_allocator.ensure_for_module_run()
