// normlab._C: the Python entry points of the norm operators, for eager calls.
//
// `torch.ops.normlab.layer_norm(...)` parses its arguments against the schema on every call,
// which costs several microseconds, as much as a small LayerNorm itself. These functions take
// the arguments positionally, unpack them directly and call the same operator through the
// dispatcher (autograd, the kernels, every dispatch key as usual), so that a normlab layer
// costs what torch's own does. While torch.compile traces, normlab.functional calls the
// torch.ops form instead, which dynamo understands.

#include "errors.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

c10::OperatorHandle handle(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

thread_local const char* g_op = "";  // the op being parsed, for the messages

const Tensor& tensor(PyObject* o, const char* what) {
  if (!THPVariable_Check(o)) {
    TORCH_CHECK_TYPE(false, g_op, ": expected ", what, " to be a torch.Tensor, got ", Py_TYPE(o)->tp_name);
  }
  return THPVariable_Unpack(o);
}

OptTensor optional(PyObject* o, const char* what) {
  if (o == Py_None) return std::nullopt;
  return tensor(o, what);
}

std::vector<int64_t> ints(PyObject* o, const char* what) {
  std::vector<int64_t> out;
  if (PyLong_Check(o)) {
    out.push_back(PyLong_AsLongLong(o));
  } else {
    PyObject* seq = PySequence_Fast(o, "");
    if (seq == nullptr) {
      PyErr_Clear();
      TORCH_CHECK_TYPE(false, g_op, ": ", what, " must be an int or a sequence of ints, got ", Py_TYPE(o)->tp_name);
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
      if (!PyLong_Check(item) && !PyIndex_Check(item)) {
        Py_DECREF(seq);
        TORCH_CHECK_TYPE(false, g_op, ": ", what, " must contain ints, got ", Py_TYPE(item)->tp_name);
      }
      out.push_back(PyLong_AsLongLong(item));
    }
    Py_DECREF(seq);
  }
  if (PyErr_Occurred()) throw python_error();
  return out;
}

// one int (functional.py passes num_groups through _int_arg first: the same rule, the same words)
int64_t one_int(PyObject* o, const char* what) {
  NORMLAB_RULE(PyLong_Check(o) && !PyBool_Check(o), int_arg, {{"op", g_op}, {"what", what}, {"type", Py_TYPE(o)->tp_name}});
  const int64_t v = PyLong_AsLongLong(o);
  if (PyErr_Occurred()) throw python_error();
  return v;
}

double number(PyObject* o, const char* what) {
  double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, g_op, ": ", what, " must be a number, got ", Py_TYPE(o)->tp_name);
  }
  return v;
}

void nargs(Py_ssize_t n, Py_ssize_t want, const char* op) {
  g_op = op;
  TORCH_CHECK_TYPE(n == want, "normlab._C.", op, " takes ", want, " arguments, got ", n);
}

// the operator call without the GIL (the kernels run as torch's do), its result as a Python tensor
// normlab.errors.<name>, looked up once and kept for the life of the process
PyObject* error_type(const char* name) {
  PyObject* mod = PyImport_ImportModule("normlab.errors");
  PyObject* t = mod ? PyObject_GetAttrString(mod, name) : nullptr;
  Py_XDECREF(mod);
  if (t == nullptr) throw python_error();
  return t;
}

// the operator call without the GIL (the kernels run as torch's do), its result as a Python tensor;
// normlab's own errors are raised, with the GIL, as normlab.errors' classes of the same name
template <typename F>
PyObject* run(F&& call) {
  Tensor y;
  std::optional<std::string> message;
  const char* kind = nullptr;
  {
    pybind11::gil_scoped_release nogil;
    try {
      y = call();
    } catch (const normlab::ShapeError& e) {
      kind = "ShapeError", message = e.what_without_backtrace();
    } catch (const normlab::StateError& e) {
      kind = "StateError", message = e.what_without_backtrace();
    } catch (const normlab::DTypeError& e) {
      kind = "DTypeError", message = e.what_without_backtrace();
    }
  }
  if (message) {
    static PyObject* shape = error_type("ShapeError");
    static PyObject* state = error_type("StateError");
    static PyObject* dtype = error_type("DTypeError");
    PyObject* type = kind[0] == 'S' ? (kind[1] == 'h' ? shape : state) : dtype;
    PyErr_SetString(type, message->c_str());
    throw python_error();
  }
  return THPVariable_Wrap(std::move(y));
}

PyObject* layer_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  nargs(n, 5, "layer_norm");
  static auto op = handle("normlab::layer_norm")
                       .typed<Tensor(const Tensor&, at::IntArrayRef, const OptTensor&, const OptTensor&, double)>();
  const Tensor& x = tensor(a[0], "input");
  auto shape = ints(a[1], "normalized_shape");
  OptTensor w = optional(a[2], "weight"), b = optional(a[3], "bias");
  double eps = number(a[4], "eps");
  return run([&] { return op.call(x, shape, w, b, eps); });
  END_HANDLE_TH_ERRORS
}

PyObject* rms_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  nargs(n, 4, "rms_norm");
  static auto op = handle("normlab::rms_norm")
                       .typed<Tensor(const Tensor&, at::IntArrayRef, const OptTensor&, std::optional<double>)>();
  const Tensor& x = tensor(a[0], "input");
  auto shape = ints(a[1], "normalized_shape");
  OptTensor w = optional(a[2], "weight");
  std::optional<double> eps;
  if (a[3] != Py_None) eps = number(a[3], "eps");
  return run([&] { return op.call(x, shape, w, eps); });
  END_HANDLE_TH_ERRORS
}

PyObject* group_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  nargs(n, 5, "group_norm");
  static auto op = handle("normlab::group_norm")
                       .typed<Tensor(const Tensor&, int64_t, const OptTensor&, const OptTensor&, double)>();
  const Tensor& x = tensor(a[0], "input");
  const int64_t groups = one_int(a[1], "num_groups");
  OptTensor w = optional(a[2], "weight"), b = optional(a[3], "bias");
  double eps = number(a[4], "eps");
  return run([&] { return op.call(x, groups, w, b, eps); });
  END_HANDLE_TH_ERRORS
}

// batch_norm and instance_norm: (input, running_mean, running_var, weight, bias, batch_stats, momentum, eps)
using ChannelSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
                          double, double);

PyObject* channel_norm(const char* name, const c10::TypedOperatorHandle<ChannelSig>& op, PyObject* const* a,
                       Py_ssize_t n) {
  nargs(n, 8, name);
  const Tensor& x = tensor(a[0], "input");
  OptTensor rm = optional(a[1], "running_mean"), rv = optional(a[2], "running_var");
  OptTensor w = optional(a[3], "weight"), b = optional(a[4], "bias");
  const int truth = PyObject_IsTrue(a[5]);
  if (truth < 0) throw python_error();
  double momentum = number(a[6], "momentum"), eps = number(a[7], "eps");
  return run([&] { return op.call(x, rm, rv, w, b, truth == 1, momentum, eps); });
}

PyObject* batch_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  static auto op = handle("normlab::batch_norm").typed<ChannelSig>();
  return channel_norm("batch_norm", op, a, n);
  END_HANDLE_TH_ERRORS
}

PyObject* instance_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  static auto op = handle("normlab::instance_norm").typed<ChannelSig>();
  return channel_norm("instance_norm", op, a, n);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"layer_norm", (PyCFunction)(void (*)())layer_norm, METH_FASTCALL, "layer_norm(input, normalized_shape, weight, bias, eps)"},
    {"rms_norm", (PyCFunction)(void (*)())rms_norm, METH_FASTCALL, "rms_norm(input, normalized_shape, weight, eps)"},
    {"group_norm", (PyCFunction)(void (*)())group_norm, METH_FASTCALL, "group_norm(input, num_groups, weight, bias, eps)"},
    {"batch_norm", (PyCFunction)(void (*)())batch_norm, METH_FASTCALL,
     "batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)"},
    {"instance_norm", (PyCFunction)(void (*)())instance_norm, METH_FASTCALL,
     "instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "normlab._C", "normlab's compiled core (see normlab.kernels.build)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
