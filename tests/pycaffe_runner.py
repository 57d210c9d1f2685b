"""Runs BVLC pycaffe's own unit tests (``python/caffe/test/*.py``, unchanged) against this
repository's ``caffe`` package, in one process, and prints one JSON line of per-test outcomes.

    python tests/pycaffe_runner.py TEST_DIR [PATTERN]

What the files need and Python 3.12 no longer has is provided here, not by editing them:
unittest's ``assertEquals`` / ``assertRaisesRegexp`` aliases. ``test_nccl`` asserts nothing
when ``caffe.has_nccl()`` is False, so it is reported as skipped then. The tests run from a
temporary working directory (``test_solver`` snapshots into the working directory) with the
test folder first on ``sys.path`` (Python layers import ``test_python_layer`` from it).

The tests build some sixty tiny nets, most of them the same net again (each ``setUp``); the
caller may point ``JAX_COMPILATION_CACHE_DIR`` at an empty folder so that XLA compiles each
distinct program once per run (``tests/test_pycaffe.py`` does).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    test_dir = os.path.abspath(argv[1])
    pattern = argv[2] if len(argv) > 2 else "test_*.py"
    sys.path[:0] = [test_dir, ROOT]
    for old, new in (("assertEquals", "assertEqual"), ("assertRaisesRegexp", "assertRaisesRegex")):
        if not hasattr(unittest.TestCase, old):
            setattr(unittest.TestCase, old, getattr(unittest.TestCase, new))
    import caffe

    caffe.init_log(1)  # warnings and errors only: the tests build hundreds of nets
    os.chdir(tempfile.mkdtemp(prefix="pycaffe_tests_"))
    suite = unittest.defaultTestLoader.discover(test_dir, pattern=pattern, top_level_dir=test_dir)
    outcomes: dict[str, dict] = {}

    class Result(unittest.TestResult):
        def startTest(self, test):
            self._t0 = time.perf_counter()
            super().startTest(test)

        def _record(self, test, outcome, detail=""):
            outcomes[test.id()] = {"outcome": outcome, "detail": detail[-3000:],
                                   "seconds": round(time.perf_counter() - self._t0, 3)}

        def addSuccess(self, test):
            if test.id().startswith("test_nccl.") and not caffe.has_nccl():
                self._record(test, "skipped", "caffe.has_nccl() is False")
            else:
                self._record(test, "passed")

        def addFailure(self, test, err):
            self._record(test, "failed", self._exc_info_to_string(err, test))

        def addError(self, test, err):
            self._record(test, "error", self._exc_info_to_string(err, test))

        def addSkip(self, test, reason):
            self._record(test, "skipped", reason)

    result = Result()
    suite.run(result)
    for test, err in result.errors:  # module import / setUpClass errors have no startTest
        if test.id() not in outcomes:
            outcomes[test.id()] = {"outcome": "error", "detail": err[-3000:], "seconds": 0}
    print("PYCAFFE_RESULTS " + json.dumps({"caffe": caffe.__file__, "tests": outcomes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
