"""Stand-in of mindformers.utils.file_utils (2.x): the 1.x functions."""
from mindformers.tools.utils import create_file, delete_file, remake_folder  # noqa: F401
