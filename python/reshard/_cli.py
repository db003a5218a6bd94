"""Shared pieces of the mindformers-compatible command-line modules."""
import sys

from .errors import ReshardError


def str2bool(b):
    """mindformers' ``str2bool`` (true/false, any case), plus 1/0."""
    if isinstance(b, bool):
        return b
    v = str(b).strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise ValueError(f"Invalid Bool Value {b!r}")


def none_if_empty(value):
    """mindformers treats an empty value and the text ``None`` as "no strategy"."""
    if value is None or value == "" or value == "None":
        return None
    return value


def run(main):
    """Runs ``main()``; a reshard error becomes one ``error: ...`` line and exit status 1."""
    try:
        main()
    except ReshardError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
