"""Install the transformers integration when it is needed, so that ``import hf_weightstream`` is cheap.

``import hf_weightstream`` must make ``from_pretrained(..., device_map="stream")`` work, which means wrapping
``PreTrainedModel.from_pretrained``. Importing transformers' model code for that costs seconds (it imports torch),
and the ``hf-weightstream`` command must answer ``--help`` and ``--version`` without it.

* If transformers' model code (``TRIGGER``) is already imported, the integration is installed at once.
* Otherwise a finder at the front of ``sys.meta_path`` waits for that one import, lets it run, removes itself
  and puts a stand-in in place of ``PreTrainedModel.from_pretrained``: the first call of it (for any model)
  installs the real integration and hands the call on. Nobody can load a model before that import, so this is as
  good as installing at once. The stand-in imports none of our modules when it is put in place: ``TRIGGER`` may
  be imported by one of our own modules (``engine`` -> ``units`` -> ... -> transformers), and installing
  there would import that module again while it is half done.

This relies on where ``PreTrainedModel`` is defined (``TRIGGER``); ``tests/test_autoinstall.py`` fails loudly if
that moves.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

TRIGGER = "transformers.modeling_utils"
_lock = threading.RLock()


def _install() -> None:
    from .integration import install

    install()


def _install_on_first_call(modeling_utils: ModuleType) -> None:
    """Replace ``PreTrainedModel.from_pretrained`` by a stand-in that installs the integration when first called."""
    models = modeling_utils.PreTrainedModel
    original = inspect.getattr_static(models, "from_pretrained")
    defined_here = "from_pretrained" in vars(models)

    @functools.wraps(original.__func__)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        with _lock:
            if vars(models).get("from_pretrained") is stand_in:  # first call: put the original back, wrap it
                if defined_here:
                    models.from_pretrained = original
                else:
                    del models.from_pretrained
                _install()
        return inspect.getattr_static(models, "from_pretrained").__func__(cls, *args, **kwargs)

    stand_in = classmethod(from_pretrained)
    models.from_pretrained = stand_in


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the other finders find ``TRIGGER``, and prepares the install once it has run."""

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
            _install_on_first_call(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader instance
        return spec


def install_with_transformers() -> None:
    """Install the integration now if transformers' model code is loaded, else as soon as a model loads."""
    if TRIGGER in sys.modules:
        _install()
        return
    with _lock:
        if not any(isinstance(finder, _InstallAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _InstallAfterImport())
