"""Stand-in of mindformers.utils.parallel_utils (2.x)."""
from mindformers.tools.utils import barrier_world  # noqa: F401
