// normlab's exception types, shared by the operators and the entry module: each is a mistake that
// torch reports as a RuntimeError, and normlab as the ValueError or TypeError it is.
#pragma once

#include <c10/util/Exception.h>

namespace normlab {

// A shape that does not fit (weight, bias or running statistics against the input,
// normalized_shape, channels against groups): where torch raises RuntimeError. The entry module
// (python.cpp) raises it as normlab.ShapeError, both a ValueError and a RuntimeError, so code
// written for torch's errors still catches it; through torch.ops it is a ValueError.
class ShapeError : public c10::ValueError {
 public:
  using c10::ValueError::ValueError;
};

// Running statistics missing where they are needed (normalizing with them): normlab.StateError.
class StateError : public c10::ValueError {
 public:
  using c10::ValueError::ValueError;
};

// A parameter or running statistic whose dtype does not go with the input's (torch's rule: the
// same dtype, or float32 with a half-precision input): normlab.DTypeError, a TypeError.
class DTypeError : public c10::TypeError {
 public:
  using c10::TypeError::TypeError;
};

}  // namespace normlab

#define NORMLAB_CHECK_AS(type, cond, ...)                                                                \
  if (C10_UNLIKELY(!(cond))) {                                                                          \
    throw ::normlab::type({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, c10::str(__VA_ARGS__)); \
  }
#define NORMLAB_CHECK_SHAPE(cond, ...) NORMLAB_CHECK_AS(ShapeError, cond, __VA_ARGS__)
#define NORMLAB_CHECK_STATE(cond, ...) NORMLAB_CHECK_AS(StateError, cond, __VA_ARGS__)
#define NORMLAB_CHECK_DTYPE(cond, ...) NORMLAB_CHECK_AS(DTypeError, cond, __VA_ARGS__)
