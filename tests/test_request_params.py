"""RequestParams / validate_sampling: every value that reaches a device array must fit it.

An int past int32 (top_k=2**31 in an HTTP request) used to pass validation and
kill the engine's thread with an OverflowError when the step's arrays were built.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flashjax.serving.sampling import INT32_MAX, MAX_SEED, SamplingParams, stack_params, validate_sampling
from flashjax.serving.scheduler import RequestParams

BAD = [
    ("top_k", INT32_MAX + 1), ("top_k", 2**63), ("top_k", -1), ("top_k", 1.0),
    ("seed", MAX_SEED + 1), ("seed", -1), ("seed", 2**64),
    ("temperature", 1e30), ("temperature", 10**400), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", -1e-9),
    ("top_p", 1e30), ("top_p", math.nan), ("top_p", -math.inf), ("top_p", 0), ("top_p", 10**400),
    ("max_tokens", INT32_MAX + 1), ("max_tokens", 10**30), ("max_tokens", 0),
    ("n", INT32_MAX + 1), ("n", 0), ("beam_width", INT32_MAX + 1), ("beam_width", 0),
    ("stop_token_ids", (INT32_MAX + 1,)), ("stop_token_ids", (-1,)), ("stop_token_ids", (10**30,)),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_out_of_range_fields_name_themselves(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        RequestParams(**{field: value})


def test_largest_values_fit_the_device_arrays():
    p = RequestParams(top_k=INT32_MAX, seed=MAX_SEED, max_tokens=INT32_MAX, n=INT32_MAX,
                      stop_token_ids=(INT32_MAX,), temperature=1e4, top_p=1.0)
    arrays = stack_params([p.sampling(0), p.sampling(1)], host=True)
    assert arrays.top_k.tolist() == [INT32_MAX] * 2 and arrays.top_k.dtype == np.int32
    assert arrays.seed.tolist() == [MAX_SEED, 0]  # seed + index wraps within uint32
    assert np.isfinite(arrays.temperature).all()
    np.asarray(p.stop_token_ids + (p.max_tokens, p.n), np.int32)  # no OverflowError
    with pytest.raises(ValueError, match="^temperature "):
        SamplingParams(temperature=1e4 * 1.01)
    validate_sampling(0, 0, 1e-30, 0)
