"""python -m lldist.bench [MODE] ...: see lldist/bench/__init__.py."""

from . import cli

cli()
