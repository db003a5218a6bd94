"""Make a running mindformers job convert checkpoints with reshard.

One line in the launch script (before the trainer starts)::

    import reshard.mindformers; reshard.mindformers.install()

mindformers' ``auto_trans_ckpt`` (``trainer/utils.py::transform_and_load_checkpoint``)
and its offline tool go through ``TransformCkpt``
(``mindformers/tools/ckpt_transform/transform_checkpoint.py``), which keeps
its own orchestration (which ranks convert, strategy collection, barriers,
success files) and calls four MindSpore functions through its module's
``ms``: ``transform_checkpoints``, ``transform_checkpoint_by_rank``,
``rank_list_for_transform`` and ``merge_pipeline_strategys``. ``install()``
replaces, in every loaded ``mindformers`` module, the ``mindspore`` module
reference by a view of ``mindspore`` whose four functions are reshard's (and
any of the four imported by name), so the conversion runs in reshard and
everything else stays mindformers' and MindSpore's. ``uninstall()`` undoes it.
"""
import importlib
import sys
import types

from . import _compat

PATCHED = ("transform_checkpoints", "transform_checkpoint_by_rank", "rank_list_for_transform",
           "merge_pipeline_strategys")

# The modules mindformers calls MindSpore's transforms from (1.x and 2.x).
TARGETS = (
    "mindformers.tools.ckpt_transform.transform_checkpoint",
    "mindformers.tools.ckpt_transform",
    "mindformers.trainer.utils",
    "mindformers.tools.transform_ckpt_lora",
)

_saved = []  # (module, attribute, original value)


class MindSporeWithReshard(types.ModuleType):
    """``mindspore`` with its checkpoint transforms replaced by reshard's."""

    def __init__(self, mindspore):
        super().__init__(mindspore.__name__, mindspore.__doc__)
        self.__dict__["_mindspore"] = mindspore
        for name in PATCHED:
            self.__dict__[name] = getattr(_compat, name)

    def __getattr__(self, name):
        return getattr(self.__dict__["_mindspore"], name)


def install(modules=TARGETS):
    """Patches the loaded (or importable) mindformers modules; returns the
    names of the modules patched. Raises ``ImportError`` when mindspore or
    none of ``modules`` can be imported. Calling it twice is harmless."""
    import mindspore

    patched = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    proxy = None
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "mindformers" or name.startswith("mindformers.")):
            continue
        changed = False
        for attr, value in list(vars(module).items()):
            if value is mindspore:
                proxy = proxy or MindSporeWithReshard(mindspore)
                _saved.append((module, attr, value))
                setattr(module, attr, proxy)
                changed = True
            elif attr in PATCHED and value is getattr(mindspore, attr, None):
                _saved.append((module, attr, value))
                setattr(module, attr, getattr(_compat, attr))
                changed = True
        if changed:
            patched.append(name)
    if not patched and not any(m for m, _, _ in _saved):
        raise ImportError("reshard.mindformers.install(): none of " + ", ".join(modules) +
                          " could be imported (is mindformers installed?)")
    return patched


def uninstall():
    """Restores what :func:`install` replaced."""
    while _saved:
        module, attr, value = _saved.pop()
        setattr(module, attr, value)
