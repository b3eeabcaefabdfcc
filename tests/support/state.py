"""Everything a call of the library could leave behind, captured before and compared after.

``Snapshot(model, params)`` records the module (parameter and buffer *objects*, their values,
``requires_grad`` and ``.grad``, ``training`` flags, hooks of every kind, attribute names), the
caller's ``params`` dict, and process-global state: global module hooks, grad / inference mode,
``torch.func`` transform levels, ``TorchFunctionMode`` stack, attention backend flags, the global
RNG, default dtype, and torchex_fn's own context variables and reference-counted holds.
``Snapshot.check()`` raises an ``AssertionError`` naming the first difference.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.modules import module as _module

from torchex_fn.core import autodiff as _autodiff
from torchex_fn.core import capture as _capture

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
               "_state_dict_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
                 "_global_module_registration_hooks", "_global_parameter_registration_hooks",
                 "_global_buffer_registration_hooks")


def module_hooks(model: nn.Module) -> dict:
    """``{module name: {hook dict: number of hooks}}`` for every module with a hook of any kind."""
    found = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        counts = {attr: len(getattr(mod, attr, {}) or {}) for attr in _HOOK_DICTS}
        counts = {k: v for k, v in counts.items() if v}
        if counts:
            found[name] = counts
    return found


def global_state() -> dict:
    """Process-global state that a call must leave as it found it (values comparable with ``==``)."""
    state = {f"nn.{name}": len(getattr(_module, name, {}) or {}) for name in _GLOBAL_HOOKS}
    state.update(
        grad_enabled=torch.is_grad_enabled(),
        inference_mode=torch.is_inference_mode_enabled(),
        anomaly=torch.is_anomaly_enabled(),
        default_dtype=torch.get_default_dtype(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        function_modes=torch._C._len_torch_function_stack(),
        dispatch_modes=torch._C._len_torch_dispatch_stack(),
        functorch_level=torch._C._functorch.maybe_current_level(),
        flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
        mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
        math_sdp=torch.backends.cuda.math_sdp_enabled(),
        cudnn_sdp=torch.backends.cuda.cudnn_sdp_enabled(),
        mha_fastpath=torch.backends.mha.get_fastpath_enabled(),
        capture_session=_capture.active() is None,
        inner_gradient=_autodiff._INNER.get() is None,
        math_hold=_autodiff._MATH.count,
        fastpath_hold=_autodiff._NO_FASTPATH.count,
    )
    return state


class Snapshot:
    """The state of ``model``, of the caller's ``params`` dict and of the process, at construction."""

    def __init__(self, model: nn.Module = None, params: dict = None, *, rng: bool = True):
        self.model, self.params, self.rng = model, params, rng
        self.globals = global_state()
        self.rng_state = torch.get_rng_state() if rng else None
        if model is not None:
            self.parameters = [(name, p, p.detach().clone(), p.requires_grad,
                                None if p.grad is None else p.grad.clone())
                               for name, p in model.named_parameters(remove_duplicate=False)]
            self.buffers = [(name, b, b.clone()) for name, b in model.named_buffers(remove_duplicate=False)]
            self.modes = [(name, m.training) for name, m in model.named_modules(remove_duplicate=False)]
            self.attrs = [(name, sorted(vars(m)), sorted(m._parameters), sorted(m._buffers), sorted(m._modules))
                          for name, m in model.named_modules(remove_duplicate=False)]
            self.state_keys = list(model.state_dict().keys())
        if params is not None:
            self.param_items = [(k, v, v.clone(), v.requires_grad) for k, v in params.items()]

    def check(self) -> None:
        assert global_state() == self.globals, _diff(self.globals, global_state())
        if self.rng:
            assert torch.equal(torch.get_rng_state(), self.rng_state), "the global RNG was drawn from"
        model = self.model
        if model is not None:
            assert module_hooks(model) == {}, f"hooks left behind: {module_hooks(model)}"
            now = list(model.named_parameters(remove_duplicate=False))
            assert [n for n, _ in now] == [n for n, *_ in self.parameters], "parameter names changed"
            for (name, p, value, requires_grad, grad), (_, q) in zip(self.parameters, now):
                assert q is p, f"parameter {name} was replaced by another object"
                assert type(q) is type(p) and isinstance(q, nn.Parameter), f"{name} is no longer a Parameter"
                assert torch.equal(q.detach(), value), f"parameter {name} changed value"
                assert q.requires_grad == requires_grad, f"requires_grad of {name} changed"
                assert (q.grad is None) == (grad is None), f".grad of {name} changed"
                assert grad is None or torch.equal(q.grad, grad), f".grad of {name} changed value"
            now = list(model.named_buffers(remove_duplicate=False))
            assert [n for n, _ in now] == [n for n, *_ in self.buffers], "buffer names changed"
            for (name, b, value), (_, c) in zip(self.buffers, now):
                assert c is b, f"buffer {name} was replaced by another object"
                assert torch.equal(c, value), f"buffer {name} changed value"
            modes = [(name, m.training) for name, m in model.named_modules(remove_duplicate=False)]
            assert modes == self.modes, "training flags changed"
            attrs = [(name, sorted(vars(m)), sorted(m._parameters), sorted(m._buffers), sorted(m._modules))
                     for name, m in model.named_modules(remove_duplicate=False)]
            assert attrs == self.attrs, "module attributes added or removed"
            assert list(model.state_dict().keys()) == self.state_keys
        if self.params is not None:
            now = list(self.params.items())
            assert [k for k, _ in now] == [k for k, *_ in self.param_items], "keys of params changed"
            for (key, v, value, requires_grad), (_, w) in zip(self.param_items, now):
                assert w is v, f"params[{key!r}] was replaced"
                assert torch.equal(w, value), f"params[{key!r}] changed value"
                assert w.requires_grad == requires_grad, f"requires_grad of params[{key!r}] changed"


def _diff(before: dict, after: dict) -> str:
    changed = {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
    return f"global state changed (before, after): {changed}"
