"""The launchers of every ``fastdiff._C`` call: tensors to raw pointers and sizes, nothing else.

The C++ kernels (``csrc/``, pybind11, OpenMP, no torch linkage) take ``data_ptr()`` integers, so
each function here states the shapes, dtypes and contiguity its kernel assumes; the op modules
(``fastdiff/ops/<op>.py``) call these only with tensors the public API has validated.  A misuse
reads past the end of a buffer, which is why nothing outside ``fastdiff.ops`` calls them.
"""
from __future__ import annotations
