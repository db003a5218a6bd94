"""Stand-in of mindformers.tools.cloud_adapter (no ModelArts)."""
mox_adapter = None
