"""Checks of the compile stages that need no toolchain: TPU-MLIR log parsing, our acceptance of a
compiled graph against the ONNX reference, and the peak-RSS launcher."""
import subprocess
import sys

import numpy as np
import pytest

from buildplan.core import GateError, StageError
from compile.acceptance import accept
from compile.tpu_mlir import _similarities
from conftest import REPO
from export.specs import GRAPHS

LOG = """[Running]: npz_tool.py compare a_tpu_outputs.npz b_top_outputs.npz --tolerance 0.99,0.90 --except - -vv
0 compared
0 passed
min_similarity = (1.0, 1.0, inf)
[Success]: npz_tool.py compare a_tpu_outputs.npz b_top_outputs.npz --tolerance 0.99,0.90 --except - -vv
[Running]: npz_tool.py compare a_model_outputs.npz a_tpu_outputs.npz --tolerance 0.99,0.90 --except - -vv
1 compared
min_similarity = (0.998, 0.84, inf)
npz compare FAILED.
"""


def test_similarities_flag_empty_and_failed_comparisons():
    empty, failed = _similarities(LOG)
    assert empty == {"compared": "a_tpu_outputs.npz vs b_top_outputs.npz", "tolerance": "0.99,0.90", "tensors": 0,
                     "passed": True}  # no cosine: nothing was compared
    assert failed["tensors"] == 1 and failed["passed"] is False and failed["cosine"] == 0.998


def test_accept_checks_values_against_the_onnx_reference():
    spec = GRAPHS["blip_itm"]
    reference = {"itm_score": np.array([0.66], np.float32)}
    figures = accept(spec, reference, [np.array([[0.6601]], np.float32)], "F32")  # reshaped to [1]
    assert figures["itm_score"]["rel_max_abs"] < 1e-3
    # One element: cosine is 1 whatever the value, so the relative error must catch 1 - p.
    with pytest.raises(StageError, match="relative max error"):
        accept(spec, reference, [np.array([0.34], np.float32)], "BF16")
    with pytest.raises(StageError, match="outputs"):
        accept(spec, reference, [], "F32")


def test_accept_requires_identical_token_ids():

    spec = GRAPHS["blip_cap"]
    ids = np.arange(20, dtype=np.int64)[None]
    assert accept(spec, {"caption_ids": ids}, [ids.astype(np.int32)], "F16")["caption_ids"]["match"] == 1.0
    wrong = ids.copy()
    wrong[0, 7] = 0
    with pytest.raises(GateError, match="token match"):
        accept(spec, {"caption_ids": ids}, [wrong], "F32")


def test_peak_rss_is_the_commands_not_the_build_process():
    """A forked child's peak RSS starts at its parent's size; the launcher must report only the
    command's own (here: parent holds ~400 MB, the command ~100 MB)."""
    code = f"""
import subprocess, sys
held = bytearray(400 << 20)
held[::4096] = b"x" * len(held[::4096])
child = "buf = bytearray(100 << 20); buf[::4096] = b'y' * len(buf[::4096])"
subprocess.run([sys.executable, {str(REPO / 'buildplan' / 'measure_rss.py')!r}, sys.argv[1], sys.executable, "-c", child], check=True)
"""
    out = REPO / ".pytest_cache" / "peak_rss"
    out.parent.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    peak_mb = int(out.read_text()) / 2**20
    assert 100 <= peak_mb < 300, peak_mb


def test_device_memory_read_from_model_tool_info():
    from compile.tpu_mlir import device_memory

    info = ("output: next_ids_ArgMax, [1, 10], int32, scale: 1, zero_point: 0\n\n"
            "device mem size: 9507072 (weight: 8220672, instruct: 45312, runtime: 1241088)\n"
            "host mem size: 0 (weight: 0, runtime: 0)\n")
    assert device_memory(info) == {"device_bytes": 9507072, "weight_bytes": 8220672, "instruction_bytes": 45312,
                                   "runtime_bytes": 1241088}
    with pytest.raises(StageError, match="device mem size"):
        device_memory("bmodel version: B.2.2\n")


def test_top_mlir_outputs_are_named_by_its_return_statement():
    from compile.tpu_mlir import top_output_names

    mlir = '''module @m {
  func.func @main(%arg0: tensor<1x3xf32> loc(unknown)) -> (tensor<1xf32>, tensor<1x3xf32>) {
    %0 = "top.Input"(%arg0) : (tensor<1x3xf32>) -> tensor<1x3xf32> loc(#loc1)
    %1 = "top.Slice"(%0) : (tensor<1x3xf32>) -> tensor<1xf32> loc(#loc2)
    %2 = "top.Gather"(%1) : (tensor<1xf32>) -> tensor<1xf32> loc(#loc3)
    %3 = "top.Relu"(%0) : (tensor<1x3xf32>) -> tensor<1x3xf32> loc("feat")
    return %2, %3 : tensor<1xf32>, tensor<1x3xf32> loc(#loc)
  } loc(#loc)
} loc(#loc)
#loc = loc(unknown)
#loc1 = loc("input")
#loc2 = loc("score_Gather_slice")
#loc3 = loc("score_Gather")
'''
    # the returned tensors in order, not the intermediate whose name merely starts like the output's
    assert top_output_names(mlir) == ["score_Gather", "feat"]
    with pytest.raises(StageError, match="no return"):
        top_output_names("module {}")


def test_top_mlir_outputs_of_multi_result_operations():
    from compile.tpu_mlir import top_output_names

    mlir = '''    %indices, %values = "top.Arg"(%165) {axis = 2 : i64} : (tensor<1x10x30524xf32>) -> (tensor<1x10xf32>, none) loc(#loc166)
    %7:2 = "top.Split"(%6) : (tensor<2xf32>) -> (tensor<1xf32>, tensor<1xf32>) loc(#loc9)
    return %indices, %7#1 : tensor<1x10xf32>, tensor<1xf32> loc(#loc)
#loc166 = loc("next_ids_ArgMax")
#loc7 = loc("left")
#loc8 = loc("right")
#loc9 = loc(fused[#loc7, #loc8])
'''
    assert top_output_names(mlir) == ["next_ids_ArgMax", "right"]
