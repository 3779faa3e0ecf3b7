"""normlab's exception types.

normlab raises ``ValueError``/``TypeError`` for a user's mistakes, with the value and the fix in
the message. Where torch raises ``RuntimeError`` for the same mistake, normlab's error is also a
``RuntimeError``, so code written against torch's errors catches it too:

* :class:`ShapeError` — a weight, bias or running statistic whose shape does not fit the input,
  a ``normalized_shape`` that is not the input's trailing dims, channels that the groups do not
  divide, an input of the wrong rank or channel count;
* :class:`StateError` — running statistics missing where they are needed (eval mode of a norm
  made with ``track_running_stats=False`` and no statistics passed);
* :class:`DTypeError` — an input that is not floating point, or a parameter or running
  statistic whose dtype does not go with the input's (torch's rule: the same dtype, or float32
  with a float16/bfloat16 input).

>>> import torch, normlab.functional as F
>>> try:
...     F.layer_norm(torch.randn(2, 3), (3,), weight=torch.ones(4))
... except RuntimeError as e:
...     print(type(e).__name__, isinstance(e, ValueError))
ShapeError True
"""

__all__ = ["ShapeError", "StateError", "DTypeError"]


class ShapeError(ValueError, RuntimeError):
    """A shape that does not fit: a ``ValueError`` as all of normlab's, and a ``RuntimeError`` as
    torch's error for the same mistake."""


class StateError(ValueError, RuntimeError):
    """Running statistics missing where they are needed: a ``ValueError`` as all of normlab's, and
    a ``RuntimeError`` as torch's error for the same mistake."""


class DTypeError(TypeError, RuntimeError):
    """A parameter's dtype that does not go with the input's: a ``TypeError``, and a
    ``RuntimeError`` as torch's error for the same mistake."""
