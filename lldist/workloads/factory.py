"""`python:<module>:<name>` references of job files, imported: the user's models, data sets,
losses and metrics. A job file that names one runs that module's code (see the README).

    fn = import_object("python:mypkg.models:resnet", "model")
"""

from __future__ import annotations

import importlib

from ..errors import UserError


def import_object(spec: str, what: str):
    """The callable `spec` names; a UserError naming `what` when it cannot be imported or is
    not callable."""
    _, module, name = spec.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name == module.split(".")[0]
        raise UserError(f"{what} {spec}: cannot import module {module!r}: {e}"
                        + ("; is its folder on PYTHONPATH? (PYTHONPATH=. python -m lldist...)" if missing else ""))
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UserError(f"{what} {spec}: module {module!r} has no callable {name!r}")
    return fn
