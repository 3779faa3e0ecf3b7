// normlab's one exception type of its own, shared by the operators and the entry module.
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

}  // namespace normlab

#define NORMLAB_CHECK_SHAPE(cond, ...)                                                                   \
  if (C10_UNLIKELY(!(cond))) {                                                                          \
    throw ::normlab::ShapeError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, c10::str(__VA_ARGS__)); \
  }
