"""normlab's exception type of its own.

normlab raises ``ValueError``/``TypeError`` for a user's mistakes, with the value and the fix in
the message. Where torch raises ``RuntimeError`` for the same mistake (a weight, bias or running
statistic whose shape does not fit the input, a ``normalized_shape`` that is not the input's
trailing dims, channels that the groups do not divide), normlab raises :class:`ShapeError`,
which is both, so code written against torch's errors catches it too.

>>> import torch, normlab.functional as F
>>> try:
...     F.layer_norm(torch.randn(2, 3), (3,), weight=torch.ones(4))
... except RuntimeError as e:
...     print(type(e).__name__, isinstance(e, ValueError))
ShapeError True
"""

__all__ = ["ShapeError"]


class ShapeError(ValueError, RuntimeError):
    """A shape that does not fit: a ``ValueError`` as all of normlab's, and a ``RuntimeError`` as
    torch's error for the same mistake."""
