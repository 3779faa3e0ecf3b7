// normlab's exception types, shared by the operators and the entry module: each is a mistake that
// torch reports as a RuntimeError, and normlab as the ValueError or TypeError it is.
#pragma once

#include <c10/util/Exception.h>

#include <cstring>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

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

namespace normlab {

// A rule of the rulebook (normlab/rules.py; rules.h, generated from it when the core is built,
// has one constant per rule): the class to raise and the message with its {fields}
struct Rule {
  int kind;  // 0 ValueError, 1 TypeError, 2 ShapeError, 3 StateError, 4 DTypeError
  const char* text;
};

using Fields = std::initializer_list<std::pair<std::string_view, std::string>>;

// the rule's message with every {field} filled in, raised as the rule's class
[[noreturn]] inline void fail(const Rule& rule, Fields fields, const c10::SourceLocation& where) {
  std::string msg;
  for (const char* p = rule.text; *p;) {
    const char* close = *p == '{' ? std::strchr(p, '}') : nullptr;
    if (close == nullptr) {
      msg += *p++;
      continue;
    }
    const std::string_view key(p + 1, close - p - 1);
    for (const auto& [k, v] : fields)
      if (k == key) msg += v;
    p = close + 1;
  }
  switch (rule.kind) {
    case 1: throw c10::TypeError(where, msg);
    case 2: throw ShapeError(where, msg);
    case 3: throw StateError(where, msg);
    case 4: throw DTypeError(where, msg);
    default: throw c10::ValueError(where, msg);
  }
}

}  // namespace normlab

#include "rules.h"

// NORMLAB_RULE(cond, name, {{"field", value-as-string}, ...}): unless cond, raise rules::name
#define NORMLAB_RULE(cond, rule, ...)                                                                  \
  if (C10_UNLIKELY(!(cond))) {                                                                         \
    ::normlab::fail(::normlab::rules::rule, __VA_ARGS__, {__func__, __FILE__, static_cast<uint32_t>(__LINE__)}); \
  }
