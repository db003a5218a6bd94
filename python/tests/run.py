"""Runs the Python package's tests; the last line gives the counts.

usage: python python/tests/run.py   (with reshard installed)
"""
import os
import sys
import unittest

here = os.path.dirname(os.path.abspath(__file__))
suite = unittest.defaultTestLoader.discover(here, top_level_dir=here)
result = unittest.TextTestRunner(verbosity=1).run(suite)
bad = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
print(f"python tests: {result.testsRun} run, {result.testsRun - bad - len(result.skipped)} passed, "
      f"{len(result.failures)} failed, {len(result.errors)} errors, {len(result.skipped)} skipped")
sys.exit(0 if result.wasSuccessful() else 1)
