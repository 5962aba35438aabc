"""fastnn's thread pool as a threadpoolctl library: `threadpool_info()` lists it and `threadpool_limits`
limits it, as it does the BLAS and OpenMP pools (scikit-learn and joblib rely on this).

The controller is registered with threadpoolctl (>= 3.5, `threadpoolctl.register`) when threadpoolctl is
imported: at once if it already is, else by a one-shot import hook, so that importing fastnn does not
import threadpoolctl (about 4 ms, 15 ms cold). Its user_api is "openmp": fastnn's pool takes the place of
the OpenMP runtime its kernels used to run on, and `threadpool_limits(limits, user_api="openmp")` is what
libraries call to keep native thread pools from oversubscribing the cores (e.g. scikit-learn around its
own parallel loops); its internal_api is "fastnn". The controller finds fastnn._C among the loaded shared
objects and calls its exported C functions fastnn_get_num_threads / fastnn_set_num_threads.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register(threadpoolctl) -> None:
    register = getattr(threadpoolctl, "register", None)
    if register is None:  # threadpoolctl < 3.5 has no plug-in controllers
        return
    if any(getattr(c, "internal_api", None) == "fastnn" for c in getattr(threadpoolctl, "_ALL_CONTROLLERS", ())):
        return

    class FastnnController(threadpoolctl.LibController):
        """fastnn's kernel thread pool (fastnn.set_num_threads is the direct control)."""

        user_api = "openmp"
        internal_api = "fastnn"
        # Extension modules named _C.* are matched, then kept only if they export the symbols below.
        filename_prefixes = ("_c.",)
        check_symbols = ("fastnn_get_num_threads", "fastnn_set_num_threads")

        def get_num_threads(self):
            get = getattr(self.dynlib, "fastnn_get_num_threads", None)
            return get() if get is not None else None

        def set_num_threads(self, num_threads):
            set_ = getattr(self.dynlib, "fastnn_set_num_threads", None)
            if set_ is not None:
                set_(int(num_threads))

        def get_version(self):
            from . import __version__

            return __version__

    register(FastnnController)


class _Hook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when threadpoolctl is about to be imported, wraps its loader so that the
    controller is registered right after the module has run, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "threadpoolctl":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader

        class _Loader(importlib.abc.Loader):
            def __getattr__(self, attr):  # get_source, get_code, ...: the real loader's
                return getattr(loader, attr)

            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                try:
                    _register(module)
                except Exception:  # a threadpoolctl whose plug-in API changed: leave fastnn unlisted
                    pass

        spec.loader = _Loader()
        return spec


_hook = _Hook()


def _remove_hook() -> None:
    try:
        sys.meta_path.remove(_hook)
    except ValueError:
        pass


def install() -> None:
    """Registers the controller now if threadpoolctl is imported, else when it is."""
    module = sys.modules.get("threadpoolctl")
    if module is not None:
        try:
            _register(module)
        except Exception:
            pass
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
