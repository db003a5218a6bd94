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
    """Runs ``main()``; a reshard error, or a bad argument the script's own
    checks refuse (mindformers' ``ValueError``s: a path that does not exist,
    a process count that does not divide the world size…, and OS errors
    naming a path), becomes one ``error: ...`` line and exit status 1."""
    try:
        main()
    except (ReshardError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def progress_bar(label):
    """A callback drawing ``label: 37% (1.2 of 3.3 GB)`` on stderr when it is a
    terminal (None otherwise), for the engine's ``progress`` keyword."""
    if not sys.stderr.isatty():
        return None

    def draw(done, total):
        if total:
            sys.stderr.write(f"\r{label}: {100 * done // total:3d}% ({done / 1e9:.1f} of {total / 1e9:.1f} GB)")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return draw
