"""The ``caffe`` package (pycaffe's interface on jcaffe).

Caffe's own pycaffe tests (``../shared/pycaffe/caffe/python/caffe/test``, BVLC 9b891540,
unchanged) run in one bounded subprocess (``tests/pycaffe_runner.py``); each of their 52 test
methods is one case here: 51 pass, ``test_nccl`` is skipped (``has_nccl()`` is False). The
rest checks pycaffe semantics those tests leave open against hand-computed values and numpy:
Blob views, layer ranges, diff accumulation, reshaping, solver steps, compile counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "pycaffe", "caffe")
TEST_DIR = os.path.join(SHARED, "python", "caffe", "test")

# Caffe's 52 pycaffe test methods (python/caffe/test at 9b891540).
BVLC_TESTS = {
    "test_coord_map.TestCoordMap": ["test_catch_negative_crop", "test_catch_scale_mismatch",
                                    "test_catch_unconnected", "test_conv_pool_deconv",
                                    "test_crop_helper", "test_crop_of_crop", "test_multi_conv",
                                    "test_nd_conv", "test_padding", "test_pass", "test_rect"],
    "test_draw.TestDraw": ["test_draw_net"],
    "test_io.TestArrayToDatum": ["test_label_none_size"],
    "test_io.TestBlobProtoToArray": ["test_new_format", "test_no_shape", "test_old_format",
                                     "test_scalar"],
    "test_layer_type_list.TestLayerTypeList": ["test_standard_types"],
    "test_nccl.TestNCCL": ["test_newuid"],
    "test_net.TestAllInOne": ["test_deploy", "test_train", "test_val"],
    "test_net.TestLevels": ["test_0", "test_1"],
    "test_net.TestNet": ["test_backward_start_end", "test_clear_param_diffs",
                         "test_forward_backward", "test_forward_start_end",
                         "test_inputs_outputs", "test_layer_dict", "test_memory",
                         "test_save_and_read", "test_save_hdf5", "test_top_bottom_names"],
    "test_net.TestStages": ["test_A", "test_AandB", "test_B"],
    "test_net_spec.TestNetSpec": ["test_lenet", "test_type_error", "test_zero_tops"],
    "test_python_layer.TestPythonLayer": ["test_backward", "test_exception", "test_forward",
                                          "test_parameter", "test_phase", "test_reshape"],
    "test_python_layer_with_param_str.TestLayerWithParam": ["test_backward", "test_forward"],
    "test_solver.TestSolver": ["test_apply_update", "test_net_memory", "test_snapshot",
                               "test_solve"],
}
BVLC_IDS = [f"{cls}.{m}" for cls, ms in BVLC_TESTS.items() for m in ms]

needs_shared = pytest.mark.skipif(not os.path.isdir(TEST_DIR),
                                  reason="../shared/pycaffe (Caffe's pycaffe tests) is absent")


@pytest.fixture(scope="module")
def bvlc_results():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "pycaffe_runner.py"),
                            TEST_DIR], capture_output=True, text=True, timeout=420, env=env,
                           cwd=ROOT)
    lines = [l for l in r.stdout.splitlines() if l.startswith("PYCAFFE_RESULTS ")]
    assert r.returncode == 0 and lines, f"runner failed (rc {r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


@needs_shared
def test_bvlc_suite_is_complete(bvlc_results):
    assert os.path.samefile(bvlc_results["caffe"], os.path.join(ROOT, "caffe", "__init__.py"))
    assert sorted(bvlc_results["tests"]) == sorted(BVLC_IDS)


@needs_shared
@pytest.mark.parametrize("test_id", BVLC_IDS)
def test_bvlc_pycaffe(bvlc_results, test_id):
    got = bvlc_results["tests"].get(test_id)
    assert got is not None, f"{test_id} did not run"
    expected = "skipped" if test_id.startswith("test_nccl.") else "passed"
    assert got["outcome"] == expected, got["detail"]
