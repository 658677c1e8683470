"""Install the transformers integration when transformers' model code loads, so ``import hf_weightstream`` is cheap.

``import hf_weightstream`` must make ``from_pretrained(..., device_map="stream")`` work, which means wrapping
``PreTrainedModel.from_pretrained``. Importing transformers' model code for that costs seconds (it imports torch),
and the ``hf-weightstream`` command must answer ``--help`` and ``--version`` without it. Nobody can call
``from_pretrained`` before ``transformers.modeling_utils`` has been imported, so installing right after that
import is as good as installing at once: if it is already imported we install now; otherwise a finder at the front
of ``sys.meta_path`` waits for that one import, runs it, installs, and removes itself.

This relies on where ``PreTrainedModel`` is defined (``TRIGGER``); ``tests/test_autoinstall.py`` fails loudly if
that moves.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Sequence
from types import ModuleType

TRIGGER = "transformers.modeling_utils"
_lock = threading.Lock()


def _install() -> None:
    from .integration import install

    install()


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the other finders find ``TRIGGER`` and runs the install after it executes."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER:
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # one shot; and the real finders must not find us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _install()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader instance
        return spec


def install_with_transformers() -> None:
    """Install the integration now if transformers' model code is loaded, else right after it loads."""
    if TRIGGER in sys.modules:
        _install()
        return
    with _lock:
        if not any(isinstance(finder, _InstallAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _InstallAfterImport())
