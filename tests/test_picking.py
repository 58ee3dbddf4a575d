"""The next-token picker (runtime/picking.py): the last step's argmax (first maximum, as numpy's)
and its float32 logits, computed by ONNX Runtime on the session's device."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from onnx_peft.runtime.picking import Picker, picker_model


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_picks_the_first_maximum_of_the_last_step(dtype, ort_providers):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 40)).astype(dtype)
    logits[1, -1, [7, 21]] = 9  # a tie: the first index wins, as numpy's argmax
    picker = Picker(ort.InferenceSession(picker_model(np.dtype(dtype)), providers=ort_providers))
    last = logits[:, -1, :].astype(np.float32)
    np.testing.assert_array_equal(picker.pick(logits, greedy=True), last.argmax(-1))
    assert picker.pick(logits, greedy=True)[1] == 7
    picked = picker.pick(logits, greedy=False)
    assert picked.dtype == np.float32 and np.array_equal(picked, last)
