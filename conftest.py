"""pytest set-up shared by tests/ and bench/: make `import fastnn` find the installed package.

`python -m pytest` puts the repository root on sys.path, where fastnn/ is the source package without its
compiled extension (unless it was built in place by tools/dev_build.sh). Then the root is dropped from
sys.path so that the tests exercise the installed package, as users get it.
"""
import importlib.machinery
import os
import sys

_root = os.path.dirname(os.path.abspath(__file__))
# The compiled module itself (fastnn/_C.pyi, the type stub, is not one).
_built_in_place = any(f.startswith("_C.") and f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
                      for f in os.listdir(os.path.join(_root, "fastnn")))
if not _built_in_place:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    if "fastnn" in sys.modules and os.path.dirname(getattr(sys.modules["fastnn"], "__file__", "") or "") == os.path.join(_root, "fastnn"):
        del sys.modules["fastnn"]
