"""Jinja environment shared by the emitters (strict: undefined names fail; deterministic), and the
context every path's template gives the shared pieces (templates/pieces/)."""

from __future__ import annotations

import json
import math
from functools import lru_cache

import jinja2

from .params import FAULT_PAGE, FAULT_Q_TOKENS, FAULT_SEQ_LEN, SplitWorkspace, c_declarations

CTYPES = {"fp16": "cute::half_t", "bf16": "cute::bfloat16_t", "e4m3": "cute::float_e4m3_t"}


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("xqagen.emitters", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def piece_context(spec, *, mma_dtype: str, workspace: SplitWorkspace) -> dict:
    """What the shared pieces read: the spec, C++ type names, the tensor-core operand type, the
    parameter list, the split-KV workspace layout and the fault bits."""
    return dict(spec=spec, spec_json=json.dumps(spec.to_dict(), sort_keys=True), ctype=CTYPES,
                mma_dtype=mma_dtype, rsqrt_head_dim=repr(1.0 / math.sqrt(spec.head_dim)),
                params=c_declarations(), workspace=workspace,
                fault_bits=dict(seq_len=FAULT_SEQ_LEN, page=FAULT_PAGE, q_tokens=FAULT_Q_TOKENS))


def render(template: str, **context) -> str:
    return _environment().get_template(template).render(**context)
