// normlab's norms as torch operators, with torch.nn.functional's signatures:
//   normlab::layer_norm, rms_norm, group_norm, batch_norm, instance_norm;
// and BatchNorm in parts (SyncBatchNorm all-reduces between them, BatchRenorm corrects):
//   normlab::batch_stats, batch_norm_apply, update_running.
//
// One operator call per norm, as torch's own: the checks (ValueError/TypeError with normlab's
// messages), the choice of canonical form (norm_cpu.cpp) and the autograd node all live here.
// Autograd is a C++ Function whose backward is the fused backward kernel; when a graph is being
// built (double backward), or the gradient is a batched tensor (is_grads_batched), it is
// normlab's reference — the written-out formula of the survey's eq. (4)-(9),
//   ∂l/∂x = r·(g − mean(g) − x̂·mean(g·x̂)),  g = γ·∂l/∂y  (RMSNorm: no mean(g)),
// in plain differentiable torch ops, with the statistics recomputed from x so that they depend
// on it — called as the operator normlab::formula_backward. Forward-mode AD (a tangent on any
// input) and devices without kernels run the reference's forward, normlab::formula, whose ops
// carry the tangents. (Both are registered from Python by normlab.kernels.reference: the
// formula lives in the reference and the kernels only.)
// BatchNorm/InstanceNorm update their running statistics here, after every check has passed,
// both buffers or neither (torch's rule: new = (1 − momentum)·old + momentum·batch, the
// unbiased variance, computed in float64).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/api/include/torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "errors.h"

#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace normlab {
namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// ------------------------------------------------------------------------------ messages

std::string tuple(IntArrayRef s) {  // as Python prints a shape: (4, 8), (8,), ()
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

void check_input(const Tensor& x, const char* op, int64_t min_ndim) {
  NORMLAB_RULE(at::isFloatingType(x.scalar_type()), input_dtype, {{"op", op}, {"dtype", dtype_name(x.scalar_type())}});
  NORMLAB_RULE(x.dim() >= min_ndim, input_ndim,
               {{"op", op}, {"min_ndim", c10::str(min_ndim)}, {"ndim", c10::str(x.dim())},
                {"shape", tuple(x.sizes())}});
}

// any_dtype: RMSNorm's rule, where torch takes parameters of every float dtype (its output has the input's)
void check_param(const OptTensor& t, const char* name, IntArrayRef shape, const char* op, const Tensor& x,
                 bool any_dtype = false) {
  if (!given(t)) return;
  NORMLAB_RULE(t->sizes() == shape, param_shape,
               {{"op", op}, {"name", name}, {"want", tuple(shape)}, {"got", tuple(t->sizes())}});
  NORMLAB_RULE(!t->is_meta() || x.is_meta(), param_meta,
               {{"op", op}, {"name", name}, {"device", c10::str(x.device())}});
  NORMLAB_RULE(t->device() == x.device(), param_device,
               {{"op", op}, {"name", name}, {"device", c10::str(t->device())}, {"input_device", c10::str(x.device())}});
  NORMLAB_RULE(at::isFloatingType(t->scalar_type()), param_float,
               {{"op", op}, {"name", name}, {"dtype", dtype_name(t->scalar_type())}});
  const auto xt = x.scalar_type(), pt = t->scalar_type();
  NORMLAB_RULE(any_dtype || pt == xt || (pt == at::kFloat && (xt == at::kHalf || xt == at::kBFloat16)), param_dtype,
               {{"op", op}, {"name", name}, {"dtype", dtype_name(pt)}, {"input_dtype", dtype_name(xt)}});
}

// torch's rule: the parameters and running statistics given share one dtype
void check_one_dtype(const char* op, std::initializer_list<std::pair<const OptTensor*, const char*>> ps) {
  const OptTensor* first = nullptr;
  const char* first_name = nullptr;
  for (auto [t, name] : ps) {
    if (!given(*t)) continue;
    if (first == nullptr) {
      first = t, first_name = name;
      continue;
    }
    NORMLAB_RULE((*t)->scalar_type() == (*first)->scalar_type(), one_dtype,
                 {{"op", op}, {"name", name}, {"dtype", dtype_name((*t)->scalar_type())}, {"first", first_name},
                  {"first_dtype", dtype_name((*first)->scalar_type())}});
  }
}

// statistics over an empty set are an error; an input with no statistics to take (an empty batch
// of rows or samples) is not: it gives an empty output
void require_values(const Tensor& x, IntArrayRef dims, const char* op) {
  int64_t n = 1, count = 1;
  for (int64_t d = 0; d < x.dim(); ++d)
    (std::find(dims.begin(), dims.end(), d) != dims.end() ? n : count) *= x.size(d);
  NORMLAB_RULE(n > 0 || count == 0, no_values, {{"op", op}, {"shape", tuple(x.sizes())}, {"dims", tuple(dims)}});
}

// -------------------------------------------------------------------------------- forms

enum Kind : int64_t { ROWS = 0, CHANNELS = 1, GROUPS = 2 };

// How one call maps onto a canonical form of norm_cpu.cpp: the view x is computed in, and
// how γ, β index it.
struct Form {
  int64_t kind = ROWS;
  std::vector<int64_t> shape;    // (R, D), (N, C, S) or (N, S, C)
  std::vector<int64_t> permute;  // dims that make x contiguous (channels_last), or none
  int64_t groups = 1, seg = 1;
  bool center = true;

  // the same data as a tensor the reference reduces over `dims`, γ, β viewed as `pshape`
  std::vector<int64_t> dims() const {
    if (kind == ROWS) return {2, 3};
    if (kind == CHANNELS) return {0, 2};
    return {1, 3};
  }
  std::vector<int64_t> view_shape() const {
    if (kind == ROWS) return {shape[0] / groups, groups, shape[1] / seg, seg};
    if (kind == CHANNELS) return shape;
    return {shape[0], shape[1], groups, shape[2] / groups};
  }
  std::vector<int64_t> pshape() const {
    if (kind == ROWS) return {groups, shape[1] / seg, 1};
    if (kind == CHANNELS) return {shape[1], 1};
    return {groups, shape[2] / groups};
  }
};

// x (own layout) in the formula's view, and back
Tensor to_view(const Tensor& t, const Form& f) {
  Tensor v = f.permute.empty() ? t : t.permute(f.permute);
  return v.reshape(f.view_shape());
}

Tensor from_view(const Tensor& t, const Form& f, const Tensor& like) {
  if (f.permute.empty()) return t.reshape(like.sizes());
  std::vector<int64_t> psizes, inverse(f.permute.size());
  for (size_t i = 0; i < f.permute.size(); ++i) {
    psizes.push_back(like.size(f.permute[i]));
    inverse[f.permute[i]] = static_cast<int64_t>(i);
  }
  return t.reshape(psizes).permute(inverse);
}

std::vector<int64_t> channels_last_permute(const Tensor& x) {
  // (N, C, *S) stored as (N, *S, C): the permutation that makes it contiguous, or none
  const int64_t nd = x.dim();
  if (x.is_contiguous()) return {};
  bool cl = (nd == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
            (nd == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (!cl) return {};
  std::vector<int64_t> p = {0};
  for (int64_t d = 2; d < nd; ++d) p.push_back(d);
  p.push_back(1);
  return p;
}

// ------------------------------------------------------------------ the kernels (dispatcher)

using FwdOut = std::tuple<Tensor, Tensor, Tensor>;

c10::OperatorHandle handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

FwdOut form_forward(const Form& f, const Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
  if (f.kind == ROWS) {
    static auto op = handle("normlab::rows_forward")
                         .typed<FwdOut(const Tensor&, const OptTensor&, const OptTensor&, double, bool, int64_t,
                                       int64_t, IntArrayRef)>();
    return op.call(x, w, b, eps, f.center, f.groups, f.seg, f.shape);
  }
  if (f.kind == CHANNELS) {
    static auto op = handle("normlab::channels_forward")
                         .typed<FwdOut(const Tensor&, const OptTensor&, const OptTensor&, double, IntArrayRef,
                                       IntArrayRef)>();
    return op.call(x, w, b, eps, f.shape, f.permute);
  }
  static auto op = handle("normlab::groups_forward")
                       .typed<FwdOut(const Tensor&, const OptTensor&, const OptTensor&, double, int64_t, IntArrayRef,
                                     IntArrayRef)>();
  return op.call(x, w, b, eps, f.groups, f.shape, f.permute);
}

FwdOut form_backward(const Form& f, const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& var,
                     const OptTensor& w, double eps) {
  if (f.kind == ROWS) {
    static auto op = handle("normlab::rows_backward")
                         .typed<FwdOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                       double, bool, int64_t, int64_t, IntArrayRef)>();
    return op.call(dy, x, mean, var, w, eps, f.center, f.groups, f.seg, f.shape);
  }
  if (f.kind == CHANNELS) {
    static auto op = handle("normlab::channels_backward")
                         .typed<FwdOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                       double, IntArrayRef, IntArrayRef)>();
    return op.call(dy, x, mean, var, w, eps, f.shape, f.permute);
  }
  static auto op = handle("normlab::groups_backward")
                       .typed<FwdOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                     double, int64_t, IntArrayRef, IntArrayRef)>();
  return op.call(dy, x, mean, var, w, eps, f.groups, f.shape, f.permute);
}

Tensor eval_forward(const Form& f, const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& w,
                    const OptTensor& b, double eps) {
  static auto op = handle("normlab::channels_eval")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                     double, IntArrayRef, IntArrayRef)>();
  return op.call(x, mean, var, w, b, eps, f.shape, f.permute);
}

FwdOut eval_backward(const Form& f, const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& var,
                     const OptTensor& w, double eps) {
  static auto op = handle("normlab::channels_eval_backward")
                       .typed<FwdOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                     double, IntArrayRef, IntArrayRef)>();
  return op.call(dy, x, mean, var, w, eps, f.shape, f.permute);
}

// Does a compiled kernel exist for x's device? (CUDA: the Triton kernels normlab registers from
// Python when Triton is there.) Otherwise the reference computes the call (formula_forward).
bool has_kernel(const Tensor& x, const Form& f) {
  if (x.device().is_cpu() || x.device().is_meta()) return true;
  if (x.scalar_type() == at::kDouble) return false;  // the Triton kernels: float32, float16, bfloat16
  const char* name = f.kind == ROWS ? "normlab::rows_forward"
                                    : (f.kind == CHANNELS ? "normlab::channels_forward" : "normlab::groups_forward");
  auto key = c10::computeDispatchKey(std::nullopt, std::nullopt, x.device());
  return handle(name).hasKernelForDispatchKey(key);
}

// ---------------------------------------------------------------- where there is no kernel

OptTensor pview(const OptTensor& t, const Form& f) {
  return given(t) ? t->reshape(f.pshape()) : OptTensor();
}

// Where there is no kernel to run — a forward-mode tangent, a graph to build through the backward
// (double backward), batched gradients, a device without kernels — the reference runs, as the
// operators normlab::formula and formula_backward that normlab.kernels.reference registers from
// Python (CompositeImplicitAutograd: autograd, forward AD and vmap see the plain torch ops inside),
// on the form's view. `mean`, `var`: the fixed statistics of BatchNorm in eval, or none.
c10::OperatorHandle reference_op(const char* name) {
  auto op = c10::Dispatcher::singleton().findOp({name, ""});
  TORCH_CHECK(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd), name,
              " is not registered: it is normlab's Python reference, registered by `import normlab`");
  return *op;
}

Tensor formula_forward(const Form& f, const Tensor& x, const OptTensor& w, const OptTensor& b, double eps,
                       const OptTensor& mean = std::nullopt, const OptTensor& var = std::nullopt) {
  static auto op = reference_op("normlab::formula")
                       .typed<Tensor(const Tensor&, IntArrayRef, const OptTensor&, const OptTensor&, double, bool,
                                     const OptTensor&, const OptTensor&)>();
  Tensor y = op.call(to_view(x, f), f.dims(), pview(w, f), pview(b, f), eps, f.center, pview(mean, f), pview(var, f));
  return from_view(y, f, x);
}

// (dx, dw, db) of formula_forward: dw and db summed to the form's parameter shape
std::tuple<Tensor, Tensor, Tensor> formula_backward(const Form& f, const Tensor& dy, const Tensor& x,
                                                    const OptTensor& w, double eps,
                                                    const OptTensor& mean = std::nullopt,
                                                    const OptTensor& var = std::nullopt) {
  static auto op = reference_op("normlab::formula_backward")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, IntArrayRef,
                                                                 const OptTensor&, double, bool, const OptTensor&,
                                                                 const OptTensor&, IntArrayRef)>();
  auto [dx, dw, db] = op.call(to_view(dy, f), to_view(x, f), f.dims(), pview(w, f), eps, f.center, pview(mean, f),
                              pview(var, f), f.pshape());
  return {from_view(dx, f, x), dw, db};
}

bool has_fw_grad(std::initializer_list<const OptTensor*> ts) {
  for (auto* t : ts)
    if (given(*t) && (*t)->_fw_grad(/*level=*/0).defined()) return true;
  return false;
}

bool batched(const Tensor& t) {
  auto ks = t.key_set();
  return ks.has(c10::DispatchKey::Batched) || ks.has(c10::DispatchKey::FuncTorchBatched);
}

Tensor converted(const Tensor& t, at::ScalarType dtype);

Tensor shaped_as(const Tensor& g, IntArrayRef sizes, at::ScalarType dtype) {  // a flat parameter gradient
  return converted(g.sizes() == sizes ? g : g.reshape(sizes), dtype);
}

Tensor shaped_like(const Tensor& g, const Tensor& like) { return shaped_as(g, like.sizes(), like.scalar_type()); }

// ----------------------------------------------------------------------- autograd: batch stats

// which of x, γ, β need a gradient (autograd numbers only the tensors that were given)
std::tuple<bool, bool, bool> needs(AutogradContext* ctx, const Tensor& w, bool has_bias) {
  size_t i = 0;
  const bool x = ctx->needs_input_grad(i++);
  const bool gw = w.defined() && ctx->needs_input_grad(i++);
  const bool gb = has_bias && ctx->needs_input_grad(i++);
  return {x, gw, gb};
}

// what both Functions keep for backward besides x and γ
struct Kept {
  Tensor mean, var;  // the statistics used (batch, or copies of the running ones)
  double eps = 0;
  Form f;
  bool has_bias = false;  // β itself is not needed, only its shape and dtype
  std::vector<int64_t> bias_shape;
  at::ScalarType bias_dtype = at::kFloat;
};

// no graph to record: the kernel straight away (inference, or nothing requires grad)
bool recording(std::initializer_list<const OptTensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (auto* t : ts)
    if (given(*t) && (*t)->requires_grad()) return true;
  return false;
}

// The tensors go to save_for_backward, the rest into saved_data as two plain values (an int list
// and ε): compiled autograd hashes what a node keeps, which a capsule is not, and a map entry per
// field would cost a string hash and an IValue each on every call
void save(AutogradContext* ctx, const Tensor& x, const OptTensor& w, const OptTensor& b, Tensor mean, Tensor var,
          double eps, const Form& f, variable_list extra = {}) {
  // (an in-place change of β between forward and backward must not be an error, as it is not
  // in torch); the statistics' gradients are never used: undefined, not materialized as zeros
  ctx->set_materialize_grads(false);
  extra.insert(extra.begin(), {x, given(w) ? *w : Tensor(), std::move(mean), std::move(var)});
  ctx->save_for_backward(std::move(extra));
  std::vector<int64_t> k = {f.kind, f.groups, f.seg, f.center, given(b),
                            given(b) ? static_cast<int64_t>(b->scalar_type()) : 0,
                            static_cast<int64_t>(f.shape.size()), static_cast<int64_t>(f.permute.size())};
  k.insert(k.end(), f.shape.begin(), f.shape.end());
  k.insert(k.end(), f.permute.begin(), f.permute.end());
  if (given(b)) k.insert(k.end(), b->sizes().begin(), b->sizes().end());
  ctx->saved_data["k"] = std::move(k);
  ctx->saved_data["eps"] = eps;
}

// save()'s values back
Kept kept(AutogradContext* ctx, const variable_list& saved) {
  Kept k;
  k.mean = saved[2], k.var = saved[3];
  k.eps = ctx->saved_data["eps"].toDouble();
  const auto v = ctx->saved_data["k"].toIntVector();
  k.f.kind = v[0], k.f.groups = v[1], k.f.seg = v[2], k.f.center = v[3] != 0;
  k.has_bias = v[4] != 0, k.bias_dtype = static_cast<at::ScalarType>(v[5]);
  const auto ns = static_cast<size_t>(v[6]), np = static_cast<size_t>(v[7]);
  k.f.shape.assign(v.begin() + 8, v.begin() + 8 + ns);
  k.f.permute.assign(v.begin() + 8 + ns, v.begin() + 8 + ns + np);
  k.bias_shape.assign(v.begin() + 8 + ns + np, v.end());
  return k;
}

struct Saved {
  Tensor x, w;
  variable_list extra;  // what save() was given besides x, γ and the statistics
  Kept k;
  OptTensor wo;
  bool need_x, need_w, need_b;
  bool formula;  // a graph to build, batched gradients, or no kernel for the device

  Saved(AutogradContext* ctx, const Tensor& dy) {
    auto saved = ctx->get_saved_variables();
    x = saved[0], w = saved[1];
    extra.assign(saved.begin() + 4, saved.end());
    k = kept(ctx, saved);
    std::tie(need_x, need_w, need_b) = needs(ctx, w, k.has_bias);
    wo = w.defined() ? OptTensor(w) : std::nullopt;
    formula = at::GradMode::is_enabled() || batched(dy) || !has_kernel(x, k.f);
  }

  // the gradients of (x, γ, β), then none for the `rest` other arguments of forward
  variable_list grads(const Tensor& dx, const Tensor& dw, const Tensor& db, size_t rest) const {
    variable_list out = {need_x ? dx : Tensor(), need_w ? shaped_like(dw, w) : Tensor(),
                         need_b ? shaped_as(db, k.bias_shape, k.bias_dtype) : Tensor()};
    out.resize(3 + rest);
    return out;
  }
};

struct NormFn : public torch::autograd::Function<NormFn> {
  // returns y; the statistics (float64, flat, not differentiable) go to *stats, not through
  // autograd (each output of a Function costs a wrapping on every call)
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& w, const OptTensor& b,
                               Form f, double eps, FwdOut* stats) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, var] = form_forward(f, x, w, b, eps);
    save(ctx, x, w, b, mean, var, eps, f);
    *stats = {Tensor(), mean, var};
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(6);
    const Saved s(ctx, dy);
    Tensor dx, dw, db;
    if (s.formula) {
      std::tie(dx, dw, db) = formula_backward(s.k.f, dy, s.x, s.wo, s.k.eps);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dw, db) = form_backward(s.k.f, dy, s.x, s.k.mean, s.k.var, s.wo, s.k.eps);
    }
    return s.grads(dx, dw, db, 3);
  }
};

// y (and the flat float64 statistics) of a norm over batch statistics, with autograd
FwdOut normalize(const Form& f, const Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
  if (has_fw_grad({&w, &b}) || x._fw_grad(0).defined() || !has_kernel(x, f)) {
    Tensor y = formula_forward(f, x, w, b, eps);
    return {y, Tensor(), Tensor()};  // statistics for the running update, without the tangents
  }
  const OptTensor xo(x);
  if (!recording({&xo, &w, &b})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return form_forward(f, x, w, b, eps);
  }
  FwdOut stats;
  Tensor y = NormFn::apply(x, w, b, f, eps, &stats)[0];
  return {y, std::get<1>(stats), std::get<2>(stats)};
}

// -------------------------------------------------------------------- autograd: fixed stats

// BatchNorm's shapes of x (N, C, *): its statistics' dims, and a per-channel vector's view
std::vector<int64_t> batch_dims(const Tensor& x) {  // (0, 2, 3, ...)
  std::vector<int64_t> dims = {0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_view(const Tensor& x) {  // (1, C, 1, ...)
  std::vector<int64_t> v(x.dim(), 1);
  v[1] = x.size(1);
  return v;
}

// a tensor whose data this code may read and write through its pointer: on the CPU, neither fake
// nor functional (those go through aten ops)
bool plain(const Tensor& t) {
  return t.device().is_cpu() && !t.key_set().has(c10::DispatchKey::Python) &&
         !at::functionalization::impl::isFunctionalTensor(t);
}

// small per-channel vectors (statistics, parameter gradients) on the plain CPU path are copied
// and converted value by value: an aten clone or cast costs a few dispatches, more than the work
bool small_plain(const Tensor& t, int64_t most) { return plain(t) && t.is_contiguous() && t.numel() <= most; }

// a copy of t (for backward: a later in-place update of a running buffer, a train step, must not
// reach what backward reads)
Tensor copied(const Tensor& t) {
  if (!small_plain(t, 1 << 16)) return t.clone();
  Tensor out = at::empty(t.sizes(), t.options());
  std::memcpy(out.mutable_data_ptr(), t.const_data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  return out;
}

// t in dtype
Tensor converted(const Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  if (!small_plain(t, 2048) || !at::isFloatingType(dtype)) return t.to(dtype);  // (then aten's vector loop wins)
  Tensor out = at::empty(t.sizes(), t.options().dtype(dtype));
  const int64_t n = t.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "converted", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "converted", [&] {
      using out_t = scalar_t;
      out_t* q = out.mutable_data_ptr<out_t>();
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<out_t>(p[i]);
    });
  });
  return out;
}

// BatchNorm with given statistics: y = (x − μ)·a + β per channel, a = γ·r, r = 1/√(σ² + ε) (the
// lesson's affine view of BN in inference). ∂l/∂x = a·∂l/∂y, ∂l/∂γ = r·Σ ∂l/∂y·(x − μ),
// ∂l/∂β = Σ ∂l/∂y; and where the statistics are functions of something (SyncBatchNorm's
// all-reduced moments, BatchRenorm's batch moments: batch_norm_apply) their own gradients, the
// survey's eq. (6) and (5) with μ, σ² given: ∂l/∂μ = −a·Σ ∂l/∂y, ∂l/∂σ² = −½·γ·r²·Σ ∂l/∂y·x̂.
// Running buffers get none: they are copied, so a later update in place (a train step) does not
// reach what backward reads.
struct EvalFn : public torch::autograd::Function<EvalFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& w, const OptTensor& b,
                               const Tensor& mean, const Tensor& var, Form f, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = eval_forward(f, x, mean, var, w, b, eps);
    // statistics that require grad are kept themselves: a graph built through the backward
    // (double backward) then runs through them
    const bool functions = mean.requires_grad() || var.requires_grad();
    save(ctx, x, w, b, copied(mean), copied(var), eps, f, functions ? variable_list{mean, var} : variable_list{});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(7);
    const Saved s(ctx, dy);
    const bool functions = !s.extra.empty();
    const Tensor &x = s.x, &mean = functions ? s.extra[0] : s.k.mean, &var = functions ? s.extra[1] : s.k.var;
    const size_t at = 1 + given(s.wo) + s.k.has_bias;  // μ's place among the tensors autograd numbered
    const bool need_m = functions && ctx->needs_input_grad(at), need_v = functions && ctx->needs_input_grad(at + 1);
    Tensor dx, dw, db, dmean, dvar;
    if (s.formula) {
      std::tie(dx, dw, db) = formula_backward(s.k.f, dy, x, s.wo, s.k.eps, mean, var);
      if (need_m || need_v) std::tie(dmean, dvar) = stats_grads(dy, x, s.wo, mean, var, s.k.eps, need_m, need_v);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dw, db) = eval_backward(s.k.f, dy, x, mean, var, s.wo, s.k.eps);
      if (need_m || need_v) {  // from the kernel's sums: Σ ∂l/∂y is ∂l/∂β, Σ ∂l/∂y·x̂ is ∂l/∂γ
        Tensor r = (var.to(at::kDouble) + s.k.eps).rsqrt(), g = given(s.wo) ? s.wo->to(at::kDouble) * r : r;
        if (need_m) dmean = (-g * db.to(at::kDouble)).to(mean.scalar_type());
        if (need_v) dvar = (-0.5 * g * r * dw.to(at::kDouble)).to(var.scalar_type());
      }
    }
    variable_list out = s.grads(dx, dw, db, 4);
    out[3] = dmean, out[4] = dvar;
    return out;
  }

  // the statistics' gradients in plain aten ops on x's own layout (N, C, *), differentiable
  static std::pair<Tensor, Tensor> stats_grads(const Tensor& dy, const Tensor& x, const OptTensor& w,
                                               const Tensor& mean, const Tensor& var, double eps, bool need_m,
                                               bool need_v) {
    const auto dims = batch_dims(x), view = channel_view(x);
    Tensor r = (var.to(at::kDouble) + eps).rsqrt();
    Tensor g = given(w) ? dy.to(at::kDouble) * w->to(at::kDouble).view(view) : dy.to(at::kDouble);
    Tensor dmean, dvar;
    if (need_m) dmean = (-(g.sum(dims) * r)).to(mean.scalar_type());
    if (need_v) {
      Tensor xc = x.to(at::kDouble) - mean.to(at::kDouble).view(view);
      dvar = (-0.5 * (g * xc).sum(dims) * r * r * r).to(var.scalar_type());
    }
    return {dmean, dvar};
  }
};

// ------------------------------------------------------------------------ running statistics

void check_running(const OptTensor& t, const char* name, const char* op) {
  // torch refuses this too
  NORMLAB_RULE(!(given(t) && t->requires_grad() && at::GradMode::is_enabled()), running_grad,
               {{"op", op}, {"name", name}});
}

// new = (1 − momentum)·old + momentum·batch per channel, in float64, written into both
// buffers only once both new values exist (a failed call changes neither)
void update_running(const OptTensor& rm, const OptTensor& rv, const Tensor& mean, const Tensor& var, double momentum) {
  at::NoGradGuard no_grad;
  for (auto [t, name] : {std::make_pair(&rm, "running_mean"), std::make_pair(&rv, "running_var")}) {
    if (!given(*t)) continue;  // both checked before either is written: the Python rule, same words
    const char* why = (*t)->is_inference() && !c10::InferenceMode::is_enabled()
                          ? "it was made under torch.inference_mode()"
                      : at::has_internal_overlap(**t) == at::MemOverlap::Yes
                          ? "several of its elements share one memory location (an expanded tensor)"
                          : nullptr;
    NORMLAB_RULE(why == nullptr, unwritable, {{"name", name}, {"why", why ? why : ""}});
  }
  // plain CPU buffers are updated in place; fake, functional or other tensors through aten ops
  auto direct = [&](const OptTensor& t) {
    const auto dt = given(t) ? t->scalar_type() : at::kFloat;
    return !given(t) || (plain(*t) && t->is_contiguous() && !t->is_inference() &&
                         (dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16));
  };
  if (direct(rm) && direct(rv) && plain(mean) && plain(var) && mean.scalar_type() == at::kDouble) {
    Tensor m = mean.contiguous(), v = var.contiguous();
    const double *pm = m.const_data_ptr<double>(), *pv = v.const_data_ptr<double>();
    for (auto [t, batch] : {std::make_pair(&rm, pm), std::make_pair(&rv, pv)}) {
      if (!given(*t)) continue;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (*t)->scalar_type(), "update_running", [&] {
        scalar_t* p = (*t)->mutable_data_ptr<scalar_t>();
        for (int64_t c = 0, n = (*t)->numel(); c < n; ++c)
          p[c] = static_cast<scalar_t>(static_cast<double>(p[c]) * (1.0 - momentum) + batch[c] * momentum);
      });
      torch::autograd::impl::bump_version(**t);  // as an in-place op would
    }
    return;
  }
  std::vector<std::pair<Tensor, Tensor>> todo;
  for (auto [t, batch] : {std::make_pair(&rm, &mean), std::make_pair(&rv, &var)}) {
    if (!given(*t)) continue;
    Tensor old = (*t)->to(at::kDouble);
    todo.emplace_back(**t, (old * (1.0 - momentum) + batch->to(at::kDouble).reshape(old.sizes()) * momentum)
                               .to((*t)->scalar_type()));
  }
  for (auto& [t, v] : todo) t.copy_(v);
}

// --------------------------------------------------------------------------------- the ops

// the output for an empty input: empty, and in the graph of x, γ and β as torch's is (their
// gradients are zeros, not an error of autograd.grad); `pshape` is the parameters' broadcast shape
Tensor empty_output(const Tensor& x, const OptTensor& w, const OptTensor& b, IntArrayRef pshape) {
  Tensor y = x.clone();
  if (given(w)) y = y * w->reshape(pshape).to(x.scalar_type());
  if (given(b)) y = y + b->reshape(pshape).to(x.scalar_type());
  return y;
}

Tensor layer_norm_impl(const Tensor& x, IntArrayRef normalized_shape, const OptTensor& w, const OptTensor& b,
                       double eps, bool center, const char* op) {
  check_input(x, op, 1);
  const int64_t k = static_cast<int64_t>(normalized_shape.size()), nd = x.dim();
  NORMLAB_RULE(k > 0 && nd >= k && x.sizes().slice(nd - k) == normalized_shape, normalized_shape,
               {{"op", op}, {"normalized_shape", tuple(normalized_shape)}, {"shape", tuple(x.sizes())}});
  check_param(w, "weight", normalized_shape, op, x, /*any_dtype=*/!center);
  if (center) check_param(b, "bias", normalized_shape, op, x);
  if (center) check_one_dtype(op, {{&w, "weight"}, {&b, "bias"}});
  std::vector<int64_t> dims;
  for (int64_t d = nd - k; d < nd; ++d) dims.push_back(d);
  require_values(x, dims, op);
  if (x.numel() == 0) return empty_output(x, w, center ? b : std::nullopt, normalized_shape);
  Form f;
  int64_t D = 1;
  for (auto s : normalized_shape) D *= s;
  f.shape = {x.numel() / D, D};
  f.center = center;
  // a strided input (a permuted view) is copied once: the rows kernel reads rows contiguously.
  // The CPU operators copy it themselves (a tiled transposition, see packed() in norm_cpu.cpp;
  // backward transposes the saved x again rather than keep a second activation)
  Tensor xc = x.is_contiguous() || x.device().is_cpu() ? x : x.contiguous();
  Tensor y = std::get<0>(normalize(f, xc, w, center ? b : std::nullopt, eps));
  // torch's RMSNorm (elementwise ops) keeps a channels_last input's format; its LayerNorm does not
  const auto fmt = x.suggest_memory_format();
  if (!center && fmt != at::MemoryFormat::Contiguous && !x.is_contiguous() && x.is_contiguous(fmt))
    y = y.contiguous(fmt);
  return y;
}

Tensor layer_norm(const Tensor& x, IntArrayRef normalized_shape, const OptTensor& w, const OptTensor& b, double eps) {
  return layer_norm_impl(x, normalized_shape, w, b, eps, true, "layer_norm");
}

Tensor rms_norm(const Tensor& x, IntArrayRef normalized_shape, const OptTensor& w, std::optional<double> eps) {
  // eps=None: the machine epsilon of the dtype the statistics are accumulated in (torch's rule)
  double e = eps.has_value() ? *eps
                             : (at::promote_types(x.scalar_type(), at::kFloat) == at::kDouble
                                    ? std::numeric_limits<double>::epsilon()
                                    : static_cast<double>(std::numeric_limits<float>::epsilon()));
  return layer_norm_impl(x, normalized_shape, w, std::nullopt, e, false, "rms_norm");
}

void check_channels(const Tensor& x, const char* op, std::initializer_list<std::pair<const OptTensor*, const char*>> ps) {
  const int64_t c = x.size(1);
  for (auto [t, name] : ps) check_param(*t, name, {c}, op, x);
  check_one_dtype(op, ps);
}

Tensor group_norm(const Tensor& x, int64_t num_groups, const OptTensor& w, const OptTensor& b, double eps) {
  const char* op = "group_norm";
  check_input(x, op, 2);
  check_channels(x, op, {{&w, "weight"}, {&b, "bias"}});
  const int64_t N = x.size(0), C = x.size(1);
  NORMLAB_RULE(num_groups > 0 && C % num_groups == 0, groups_divide,
               {{"groups", c10::str(num_groups)}, {"channels", c10::str(C)}});
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < x.dim(); ++d) dims.push_back(d);
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  require_values(x, dims, op);  // statistics over (C/G, *S) per sample and group
  // torch's rule: a group of one value normalizes to 0 whatever it holds
  NORMLAB_RULE(x.numel() == 0 || (C / num_groups) * S > 1, group_values,
               {{"shape", tuple(x.sizes())}, {"groups", c10::str(num_groups)}});
  if (x.numel() == 0) return empty_output(x, w, b, channel_view(x));
  Form f;
  f.groups = num_groups;
  auto perm = channels_last_permute(x);
  if (!perm.empty() && x.device().is_cpu()) {  // (N, *S, C) in memory: groups of adjacent channels, no copy
    f.kind = GROUPS;
    f.shape = {N, S, C};
    f.permute = perm;
    return std::get<0>(normalize(f, x, w, b, eps));
  }
  f.shape = {N * num_groups, (C / num_groups) * S};
  f.seg = S;
  Tensor xc = x.is_contiguous() ? x : x.contiguous();
  Tensor y = std::get<0>(normalize(f, xc, w, b, eps));
  return perm.empty() ? y : y.contiguous(x.suggest_memory_format());
}

// BatchNorm's form of x (N, C, *): (N, C, S), or (N·S, C, 1) for channels_last on the CPU
Form channels_form(const Tensor& x, Tensor& xc) {
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(1, N * C);
  auto perm = channels_last_permute(x);
  xc = perm.empty() && !x.is_contiguous() ? x.contiguous() : x;
  Form f;
  f.kind = CHANNELS;
  f.shape = perm.empty() ? std::vector<int64_t>{N, C, S} : std::vector<int64_t>{N * S, C, 1};
  f.permute = perm;
  return f;
}

// x (N, C, *) normalized per channel with the statistics given (running buffers, or functions of
// something: see EvalFn), after the caller's checks
Tensor normalize_given(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& w, const OptTensor& b,
                       double eps) {
  if (x.numel() == 0) return empty_output(x, w, b, channel_view(x));
  Tensor xc;
  Form f = channels_form(x, xc);
  const OptTensor mo(mean), vo(var);
  if (has_fw_grad({&w, &b, &mo, &vo}) || xc._fw_grad(0).defined() || !has_kernel(xc, f))
    return formula_forward(f, xc, w, b, eps, mo, vo);
  const OptTensor xo(xc);
  if (!recording({&xo, &w, &b, &mo, &vo})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return eval_forward(f, xc, mean, var, w, b, eps);
  }
  return EvalFn::apply(xc, w, b, mean, var, f, eps)[0];
}

// BatchNorm and InstanceNorm: per-channel parameters and running statistics
Tensor channel_norm(const char* op, const Tensor& x, const OptTensor& rm, const OptTensor& rv, const OptTensor& w,
                    const OptTensor& b, bool batch_stats, double momentum, double eps, bool instance) {
  check_input(x, op, 2);
  check_channels(x, op, {{&rm, "running_mean"}, {&rv, "running_var"}, {&w, "weight"}, {&b, "bias"}});
  check_running(rm, "running_mean", op);
  check_running(rv, "running_var", op);
  const int64_t nd = x.dim(), N = x.size(0), C = x.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < nd; ++d) S *= x.size(d);
  auto perm = channels_last_permute(x);
  Form f;
  f.kind = CHANNELS;
  // torch's rule for ε: positive for BatchNorm with batch statistics, else non-negative (InstanceNorm takes 0)
  const bool positive = !instance && batch_stats;
  NORMLAB_RULE(positive ? eps > 0 : eps >= 0, eps,
               {{"op", op}, {"sign", positive ? "positive" : "non-negative"},
                {"stats", batch_stats ? "batch" : "running"},
                {"eps", c10::str(eps)}});
  if (!batch_stats) {
    NORMLAB_RULE(given(rm) && given(rv), running_required, {{"op", op}});
    return normalize_given(x, *rm, *rv, w, b, eps);
  }
  // an empty batch: an empty output, the running statistics as they were (torch's semantics)
  if (x.numel() == 0) return empty_output(x, w, b, channel_view(x));
  const int64_t n = instance ? S : N * S;
  NORMLAB_RULE(n > 1, channel_values, {{"op", op}, {"shape", tuple(x.sizes())}});
  Tensor y, mean, var;
  if (instance) {
    if (!perm.empty() && x.device().is_cpu()) {  // GroupNorm's view with one channel per group
      f.kind = GROUPS;
      f.shape = {N, S, C};
      f.permute = perm;
      f.groups = C;
      std::tie(y, mean, var) = normalize(f, x, w, b, eps);
    } else {
      Tensor xc = x.is_contiguous() ? x : x.contiguous();
      f.kind = ROWS;
      f.shape = {N * C, S};
      f.groups = C;
      f.seg = S;
      std::tie(y, mean, var) = normalize(f, xc, w, b, eps);
      if (!perm.empty()) y = y.contiguous(x.suggest_memory_format());
    }
  } else {
    Tensor xc;
    f = channels_form(x, xc);
    std::tie(y, mean, var) = normalize(f, xc, w, b, eps);
  }
  if (given(rm) || given(rv)) {
    at::NoGradGuard no_grad;
    if (!mean.defined()) {  // forward-mode AD took the formula: the statistics again, without tangents
      Tensor xd = to_view(x.detach()._fw_primal(0), f).to(at::kDouble);
      auto vm = at::var_mean(xd, f.dims(), /*correction=*/0, /*keepdim=*/false);
      var = std::get<0>(vm).reshape(-1);
      mean = std::get<1>(vm).reshape(-1);
    }
    Tensor bm = instance ? mean.view({N, C}).mean(0) : mean;
    Tensor bv = (instance ? var.view({N, C}).mean(0) : var) * (static_cast<double>(n) / (n - 1));  // unbiased
    update_running(rm, rv, bm, bv, momentum);
  }
  return y;
}

Tensor batch_norm(const Tensor& x, const OptTensor& rm, const OptTensor& rv, const OptTensor& w, const OptTensor& b,
                  bool training, double momentum, double eps) {
  if (x.dim() == 1 && x.numel() == 0 && at::isFloatingType(x.scalar_type())) return x.clone();  // as torch
  return channel_norm("batch_norm", x, rm, rv, w, b, training, momentum, eps, false);
}

// ---------------------------------------------------- BatchNorm in parts: statistics, then apply

// The statistics of BatchNorm's batch alone, μ and σ² per channel over (N, *), float64, as
// functions of x: ∂μ/∂x = 1/n, ∂σ²/∂x = 2·(x − μ)/n. The backward runs in aten ops in x's
// compute precision, x − μ taken as (x − m₀) − (μ − m₀) with m₀ = μ rounded to it (a large
// offset costs no digits); while a graph is built through it, μ is taken again from x.
struct StatsFn : public torch::autograd::Function<StatsFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, Form f) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = handle("normlab::channels_stats")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, IntArrayRef, IntArrayRef)>();
    auto [mean, var] = op.call(x, f.shape, f.permute);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x});
    ctx->saved_data["mean"] = mean;
    return {mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor &dmean = grads[0], &dvar = grads[1];
    const Tensor x = ctx->get_saved_variables()[0];
    if (!dmean.defined() && !dvar.defined()) return {Tensor(), Tensor()};
    const auto dims = batch_dims(x), view = channel_view(x);
    const auto acc = at::promote_types(x.scalar_type(), at::kFloat);
    const double n = static_cast<double>(x.numel() / x.size(1));
    Tensor dx = dmean.defined() ? (dmean / n).to(acc).view(view) : Tensor();
    if (dvar.defined()) {
      Tensor mean = at::GradMode::is_enabled() ? x.to(at::kDouble).mean(dims) : ctx->saved_data["mean"].toTensor();
      Tensor m0 = mean.to(acc);
      Tensor d = (x.to(acc) - m0.view(view)) - (mean - m0.to(at::kDouble)).to(acc).view(view);
      Tensor t = d * (dvar * (2.0 / n)).to(acc).view(view);
      dx = dx.defined() ? t + dx : t;
    }
    return {dx.expand(x.sizes()).to(x.scalar_type()), Tensor()};
  }
};

std::tuple<Tensor, Tensor> batch_stats(const Tensor& x) {
  const char* op = "batch_stats";
  check_input(x, op, 2);
  const auto dims = batch_dims(x);
  require_values(x, dims, op);  // (an input of no channels has none to give: empty statistics)
  Tensor xc;
  Form f = channels_form(x, xc);
  if (x._fw_grad(0).defined() || !has_kernel(xc, f)) {  // torch's op carries tangents (and runs anywhere)
    auto [var, mean] = at::var_mean(x.to(at::kDouble), dims, /*correction=*/0, /*keepdim=*/false);
    return {mean, var};
  }
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto k = handle("normlab::channels_stats")
                        .typed<std::tuple<Tensor, Tensor>(const Tensor&, IntArrayRef, IntArrayRef)>();
    return k.call(xc, f.shape, f.permute);
  }
  auto out = StatsFn::apply(xc, f);
  return {out[0], out[1]};
}

// BatchNorm with statistics given as tensors that may be functions of something (their gradients
// flow back, see EvalFn): y = (x − μ)·γ/√(σ² + ε) + β per channel
Tensor batch_norm_apply(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& w,
                        const OptTensor& b, double eps) {
  const char* op = "batch_norm_apply";
  check_input(x, op, 2);
  check_channels(x, op, {{&w, "weight"}, {&b, "bias"}});
  const int64_t C = x.size(1);
  const OptTensor mo(mean), vo(var);
  check_param(mo, "mean", {C}, op, x, /*any_dtype=*/true);
  check_param(vo, "var", {C}, op, x, /*any_dtype=*/true);
  NORMLAB_RULE(eps >= 0, eps, {{"op", op}, {"sign", "non-negative"}, {"stats", "given"}, {"eps", c10::str(eps)}});
  return normalize_given(x, mean, var, w, b, eps);
}

// the running statistics' rule alone (BatchNorm's, see update_running): SyncBatchNorm and
// BatchRenorm, which take their statistics in parts, update by it too (after their own checks)
void update_running_op(const OptTensor& rm, const OptTensor& rv, const Tensor& mean, const Tensor& var,
                       double momentum) {
  update_running(rm, rv, mean, var, momentum);
}

Tensor instance_norm(const Tensor& x, const OptTensor& rm, const OptTensor& rv, const OptTensor& w,
                     const OptTensor& b, bool use_input_stats, double momentum, double eps) {
  NORMLAB_RULE(x.dim() >= 3, instance_ndim, {{"ndim", c10::str(x.dim())}, {"shape", tuple(x.sizes())}});
  return channel_norm("instance_norm", x, rm, rv, w, b, use_input_stats, momentum, eps, true);
}

}  // namespace
}  // namespace normlab

TORCH_LIBRARY_FRAGMENT(normlab, m) {
  m.def("layer_norm(Tensor input, int[] normalized_shape, Tensor? weight=None, Tensor? bias=None, "
        "float eps=1e-05) -> Tensor");
  m.def("rms_norm(Tensor input, int[] normalized_shape, Tensor? weight=None, float? eps=None) -> Tensor");
  m.def("group_norm(Tensor input, int num_groups, Tensor? weight=None, Tensor? bias=None, float eps=1e-05) -> Tensor");
  m.def("batch_norm(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight=None, "
        "Tensor? bias=None, bool training=False, float momentum=0.1, float eps=1e-05) -> Tensor");
  m.def("instance_norm(Tensor input, Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, "
        "Tensor? weight=None, Tensor? bias=None, bool use_input_stats=True, float momentum=0.1, "
        "float eps=1e-05) -> Tensor");
  m.def("batch_stats(Tensor input) -> (Tensor, Tensor)");
  m.def("batch_norm_apply(Tensor input, Tensor mean, Tensor var, Tensor? weight=None, Tensor? bias=None, "
        "float eps=1e-05) -> Tensor");
  m.def("update_running(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, Tensor var, "
        "float momentum) -> ()");
}

// Autograd: the planning above and the C++ Functions. Below autograd (inference mode, and the
// Meta/fake tensors of torch.compile once autograd is traced) the same code runs, its
// Functions then recording nothing.
TORCH_LIBRARY_IMPL(normlab, Autograd, m) {
  m.impl("layer_norm", &normlab::layer_norm);
  m.impl("rms_norm", &normlab::rms_norm);
  m.impl("group_norm", &normlab::group_norm);
  m.impl("batch_norm", &normlab::batch_norm);
  m.impl("instance_norm", &normlab::instance_norm);
  m.impl("batch_stats", &normlab::batch_stats);
  m.impl("batch_norm_apply", &normlab::batch_norm_apply);
  m.impl("update_running", &normlab::update_running_op);
}

TORCH_LIBRARY_IMPL(normlab, CompositeExplicitAutograd, m) {
  m.impl("layer_norm", &normlab::layer_norm);
  m.impl("rms_norm", &normlab::rms_norm);
  m.impl("group_norm", &normlab::group_norm);
  m.impl("batch_norm", &normlab::batch_norm);
  m.impl("instance_norm", &normlab::instance_norm);
  m.impl("batch_stats", &normlab::batch_stats);
  m.impl("batch_norm_apply", &normlab::batch_norm_apply);
  m.impl("update_running", &normlab::update_running_op);
}
