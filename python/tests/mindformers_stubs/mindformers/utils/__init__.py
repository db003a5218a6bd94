"""Stand-in of mindformers.utils (2.x; see ../__init__.py)."""
