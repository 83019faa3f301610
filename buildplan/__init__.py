
import sys as _sys

# Where PYTHONDONTWRITEBYTECODE is set, a module edited since ./bootstrap.sh (which byte-compiles
# the project) would be compiled from source on every run, ~0.5-1.5 ms each on the no-op path.
# doit imports this package first (its plugins), so from here on our bytecode is kept.
_sys.dont_write_bytecode = False
