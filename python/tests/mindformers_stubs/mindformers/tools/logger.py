"""Stand-in of mindformers.tools.logger."""
import logging

logger = logging.getLogger("mindformers")
