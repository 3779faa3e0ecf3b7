"""The rulebook: every check a norm makes on its arguments, with its exception class and message.

Each rule is written here once. The Python routes raise :func:`error` with the rule's name and the
values its message names; the compiled core (``kernels/csrc``) raises the same rules from a
C++ header generated from this table when the core is built (:func:`cpp_header`), so the class
and the words are the same on every route by construction. The conditions themselves are code
on both sides, in the same order; ``tests/test_functional.py`` runs each mistake through every
route (the core, ``torch.ops``, ``torch.compile``, the fallback on torch's ops, the reference)
and requires one class and one message.

Fields are filled in as ``{name}``, already formatted by the caller as Python prints them:
a shape as a tuple ``(2, 3)``, a dtype as ``torch.float16``, ε with ``:g``.

>>> from normlab.rules import error
>>> e = error("eps", op="batch_norm", sign="positive", stats="batch", eps="0")
>>> type(e).__name__, str(e)[:38]
('ValueError', 'batch_norm: eps must be positive when ')
"""

from __future__ import annotations

import re

from .errors import DTypeError, ShapeError, StateError

__all__ = ["RULES", "error", "cpp_header"]

# name: (exception class, message). The classes: ValueError and TypeError for a user's mistake;
# normlab's ShapeError, StateError and DTypeError where torch raises RuntimeError for the same
# one (they are RuntimeErrors too, see normlab.errors).
RULES: dict[str, tuple[type[Exception], str]] = {
    # the input
    "input_dtype": (DTypeError, "{op}: expected a floating-point tensor, got dtype {dtype}; convert it first, "
                                "e.g. x.float()"),
    "input_ndim": (ShapeError, "{op}: expected at least {min_ndim}-D input, got {ndim}-D input of shape {shape}"),
    "instance_ndim": (ShapeError, "instance_norm: expected at least 3-D input (N, C, *spatial), got {ndim}-D input "
                                  "of shape {shape}"),
    "normalized_shape": (ShapeError, "{op}: normalized_shape {normalized_shape} must equal the trailing dims of the "
                                     "input, got input of shape {shape}; pass normalized_shape=input.shape[-k:] for "
                                     "the last k dims"),
    "int_arg": (TypeError, "{op}: {what} must be an int, got {type}"),
    # weight, bias and running statistics against the input
    "param_shape": (ShapeError, "{op}: {name} must have shape {want} to match the input, got {got}"),
    "param_meta": (ValueError, "{op}: {name} is on meta (made without data, e.g. under torch.device('meta')) but the "
                               "input is on {device}; give the module storage first: "
                               "module.to_empty(device=input.device), then module.reset_parameters() or "
                               "load_state_dict(...)"),
    "param_device": (ValueError, "{op}: {name} is on {device} but the input is on {input_device}; move them to one "
                                 "device, e.g. module.to(input.device)"),
    "param_float": (DTypeError, "{op}: {name} must be floating-point, got dtype {dtype}"),
    "param_dtype": (DTypeError, "{op}: {name} is {dtype} but the input is {input_dtype}; use one dtype (e.g. "
                                "module.to({input_dtype})), or float32 {name} with a half-precision input"),
    "one_dtype": (DTypeError, "{op}: {name} is {dtype} but {first} is {first_dtype}; give the parameters and "
                              "running statistics one dtype"),
    # what there is to normalize
    "no_values": (ValueError, "{op}: no values to compute statistics over: input of shape {shape} is empty along "
                              "dims {dims}; skip empty batches before calling it"),
    "groups_divide": (ShapeError, "group_norm: num_groups={groups} must divide the {channels} channels; choose a "
                                  "divisor of {channels}"),
    "group_values": (ValueError, "group_norm: expected more than 1 value per group, got 1 (input of shape {shape}, "
                                 "num_groups={groups}); use fewer groups, or LayerNorm"),
    "channel_values": (ValueError, "{op}: expected more than 1 value per channel when training, got 1 (input of "
                                   "shape {shape}); use a batch of at least 2 (e.g. drop_last=True in the "
                                   "DataLoader), or eval mode, or GroupNorm/LayerNorm for single samples"),
    # BatchNorm's and InstanceNorm's ε and running statistics
    "eps": (ValueError, "{op}: eps must be {sign} when normalizing with {stats} statistics, got eps={eps}; the usual "
                        "value is 1e-5"),
    "running_grad": (ValueError, "{op}: {name} requires grad, but no gradient flows into running statistics; pass "
                                 "{name}.detach() (or a buffer)"),
    "running_required": (StateError, "{op}: running_mean and running_var are required to normalize with running "
                                     "statistics; pass them, or use batch statistics (training=True / "
                                     "use_input_stats=True)"),
    "unwritable": (ValueError, "{name} cannot be updated in place: {why}; pass a tensor of its own, e.g. "
                               "{name}.clone()"),
}

_FIELD = re.compile(r"\{(\w+)\}")


def error(rule: str, **fields) -> Exception:
    """The exception of ``rule`` with its message filled in (every field the message names,
    converted with ``str``); raise it."""
    cls, text = RULES[rule]
    return cls(_FIELD.sub(lambda m: str(fields[m.group(1)]), text))


# the C++ classes of kernels/csrc/errors.h that the generated header throws, per Python class
_CPP_KIND = {ValueError: 0, TypeError: 1, ShapeError: 2, StateError: 3, DTypeError: 4}


def cpp_header() -> str:
    """The rulebook as C++ (``rules.h``, written beside the sources when the core is built): a
    ``normlab::Rule`` constant per rule, its class and its message, for ``NORMLAB_RULE``."""
    lines = ["// Generated from normlab/rules.py when the core is built: edit the rules there.", "#pragma once", "",
             "namespace normlab {", "namespace rules {"]
    for name, (cls, text) in RULES.items():
        literal = text.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'inline constexpr Rule {name}{{{_CPP_KIND[cls]}, "{literal}"}};')
    lines += ["}  // namespace rules", "}  // namespace normlab", ""]
    return "\n".join(lines)
