"""Stand-in of mindformers.tools (see ../__init__.py)."""
