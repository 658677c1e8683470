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

The auto classes' ``from_pretrained`` (the classes are defined in ``AUTO_TRIGGER``, imported before any model
code) is wrapped the same way, at once or when that module is imported: a streamed load from the Hub starts its
round trips there (`checkpoint.open_hub_repo_ahead`), so that they run while the auto class imports the model's
code.

``transformers.pipelines.pipeline`` is wrapped the same way (``PIPELINES``), so that ``pipeline(...,
streaming=True)`` hands that option to the load.

This relies on where ``PreTrainedModel``, the auto classes and ``pipeline`` are defined (``TRIGGER``,
``AUTO_TRIGGER``, next to ``auto_factory._BaseAutoModelClass``, ``PIPELINES``); ``tests/test_autoinstall.py`` fails
loudly if one moves.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

TRIGGER = "transformers.modeling_utils"
AUTO_TRIGGER = "transformers.models.auto.modeling_auto"
PIPELINES = "transformers.pipelines"
STREAM_OPTIONS = ("streaming", "stream_config")  # from_pretrained options a pipeline call must hand to the load
_lock = threading.RLock()
logger = logging.getLogger(__name__)


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


def _open_ahead_on_call(modeling_auto: ModuleType) -> None:
    """Wrap the auto classes' ``from_pretrained``: a streamed load from the Hub starts its round trips first.

    Each auto class holds its own copy of ``_BaseAutoModelClass.from_pretrained`` (transformers' ``auto_class_update``
    copies it to give it its own docstring), so each is wrapped, and the base for classes made later.
    """
    base = sys.modules[modeling_auto.__name__.rpartition(".")[0] + ".auto_factory"]._BaseAutoModelClass
    classes = [base, *(c for c in vars(modeling_auto).values() if isinstance(c, type) and issubclass(c, base))]
    for cls in classes:
        if "from_pretrained" in vars(cls):
            _wrap_auto_from_pretrained(cls)


def _wrap_auto_from_pretrained(cls: type) -> None:
    original = inspect.getattr_static(cls, "from_pretrained")
    if getattr(original.__func__, "_hf_weightstream", False):
        return

    @functools.wraps(original.__func__)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        discard = _open_ahead(args, kwargs)
        try:
            return original.__func__(cls, *args, **kwargs)
        finally:
            if discard is not None:
                discard()

    from_pretrained._hf_weightstream = True  # type: ignore[attr-defined]
    cls.from_pretrained = classmethod(from_pretrained)


def _route_pipeline_options(pipelines: ModuleType) -> None:
    """``pipeline(..., streaming=True)`` (or ``stream_config=``) loads the model streamed.

    ``pipeline`` passes ``device_map`` to the load but hands keywords it does not know to ``generate()``: the model
    was loaded whole, then the first call failed with "model_kwargs are not used by the model: ['streaming']".
    They are moved into ``model_kwargs``, where the pipeline's documentation says load options go.
    """
    original = pipelines.pipeline
    if getattr(original, "_hf_weightstream", False):
        return

    @functools.wraps(original)
    def pipeline(*args: Any, **kwargs: Any) -> Any:
        moved = {name: kwargs.pop(name) for name in STREAM_OPTIONS if name in kwargs}
        if moved:
            model_kwargs = dict(kwargs.get("model_kwargs") or {})
            both = sorted(moved.keys() & model_kwargs.keys())
            if both:
                from .errors import StreamConfigError

                raise StreamConfigError(f"{both[0]}= was given both to pipeline() and in its model_kwargs: keep one.")
            kwargs["model_kwargs"] = {**model_kwargs, **moved}
        return original(*args, **kwargs)

    pipeline._hf_weightstream = True  # type: ignore[attr-defined]
    pipelines.pipeline = pipeline
    transformers = sys.modules.get("transformers")
    if transformers is not None and vars(transformers).get("pipeline") is original:  # the lazy module's cache
        transformers.pipeline = pipeline


def _open_ahead(args: tuple, kwargs: dict[str, Any]) -> Callable[[], None] | None:
    name = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    if name is None:
        return None
    try:
        from .config import stream_request

        if stream_request(dict(kwargs)) is None:
            return None  # not streamed: none of our loading code is imported for it
        from .checkpoint import open_hub_repo_ahead

        return open_hub_repo_ahead(name, kwargs)
    except Exception as err:  # noqa: BLE001 - only a head start: the load itself reports what is wrong
        logger.debug("Could not start indexing %s ahead of its load: %r", name, err)
        return None


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the other finders find each watched module, and runs its hook once it has run."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]) -> None:
        self._hooks = hooks
        self._finding = threading.local()  # our own find_spec call below must not come back here

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._hooks or getattr(self._finding, "active", False):
            return None
        with _lock:
            hook = self._hooks.pop(fullname, None)
            if not self._hooks and self in sys.meta_path:
                sys.meta_path.remove(self)  # every hook is placed
        if hook is None:
            return None
        self._finding.active = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            hook(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader instance
        return spec


def install_with_transformers() -> None:
    """Install the integration now if transformers' model code is loaded, else as soon as a model loads; the same
    for the auto classes' head start and for ``pipeline``'s streaming options."""
    hooks: dict[str, Callable[[ModuleType], None]] = {}
    if TRIGGER in sys.modules:
        _install()
    else:
        hooks[TRIGGER] = _install_on_first_call
    if AUTO_TRIGGER in sys.modules:
        _open_ahead_on_call(sys.modules[AUTO_TRIGGER])
    else:
        hooks[AUTO_TRIGGER] = _open_ahead_on_call
    if PIPELINES in sys.modules:
        _route_pipeline_options(sys.modules[PIPELINES])
    else:
        hooks[PIPELINES] = _route_pipeline_options
    if not hooks:
        return
    with _lock:
        if not any(isinstance(finder, _InstallAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _InstallAfterImport(hooks))
