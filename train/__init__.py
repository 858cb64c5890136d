"""The trainer. `python -m train` first preloads the fast allocator where it is installed
(train/allocator.py); a plain `import train` changes nothing."""
from train import allocator as _allocator

_allocator.ensure_for_module_run()
