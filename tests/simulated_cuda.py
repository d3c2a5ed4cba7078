"""A simulated CUDA device on the CPU, for tests of the code paths that only run on a GPU.

Inside :func:`simulated_cuda`, a tensor created on or moved to ``cuda`` is a :class:`SimCuda`: it says
``device='cuda:0'`` and computes on a CPU tensor it wraps. Every aten op goes through :class:`SimCudaMode`, which
raises, as a CUDA kernel does, when an op mixes a ``cuda`` tensor with a CPU tensor of one or more dimensions
(CPU scalars, copies, device moves and CPU index tensors are allowed, as on CUDA). ``numpy()`` of a ``cuda`` tensor
fails as on CUDA, and ``torch.cuda``'s queries answer as for one 80 GiB GPU. Triton is off (the kernels have their
own tests): the dispatcher takes the torch reference on ``cuda`` tensors.

What it cannot run: a backward pass (the autograd engine starts a thread per CUDA device, which needs a driver).
Numbers equal the CPU run's up to float rounding (some composite ops decompose by device). Private torch hooks are
used; :func:`available` says whether this torch has them.
"""

from __future__ import annotations

import contextlib
import copy
import traceback
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

CUDA = torch.device("cuda", 0)
# ops that take a CPU tensor next to a CUDA one on a real GPU
ALLOW_MIX = {"copy_", "_to_copy", "index", "index_put_", "index_put", "_index_put_impl_", "lift_fresh",
             "lift_fresh_copy", "_copy_from", "copy", "set_"}


class DeviceMixError(RuntimeError):
    pass


class SimCuda(torch.Tensor):
    """A CPU tensor (``elem``) that says it is on cuda:0."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "SimCuda":
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=CUDA, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"SimCuda({self.elem!r})"

    def __deepcopy__(self, memo: dict) -> "SimCuda":
        out = SimCuda(copy.deepcopy(self.elem.detach(), memo))
        if self.requires_grad:
            out.requires_grad_(True)
        if getattr(self, "_is_param", False):
            out._is_param = True
        memo[id(self)] = out
        return out

    @property
    def data(self) -> "SimCuda":
        return SimCuda(self.elem.detach())

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if not isinstance(value, SimCuda):  # a CUDA parameter silently moved to the CPU: a bug on a GPU
            raise DeviceMixError("a cuda parameter's .data was set to a CPU tensor")
        torch._C.TensorBase.data.__set__(self, value)
        self.elem = value.elem

    def data_ptr(self) -> int:
        return self.elem.data_ptr()

    def tolist(self):
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # SimCudaMode handles every op


def _unwrap(t):
    return t.elem if isinstance(t, SimCuda) else t


class SimCudaMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices: set[str] = set()

        def collect(t):
            if isinstance(t, SimCuda):
                devices.add("cuda")
            elif isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0:
                devices.add("cpu")
            return t

        tree_map(collect, (args, kwargs))
        name = func.overloadpacket.__name__
        if devices == {"cuda", "cpu"} and name not in ALLOW_MIX:
            where = "".join(traceback.format_stack(limit=12)[:-2])
            raise DeviceMixError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                 f"cuda:0 and cpu! ({func})\n{where}")
        targets: list[torch.device] = []

        def to_host(v):  # a device argument (keyword or positional, as aten.to.device has it) names the target
            if isinstance(v, torch.device):
                targets.append(v)
                return torch.device("cpu")
            return _unwrap(v)

        uargs, ukwargs = tree_map(to_host, (args, kwargs))
        wrap = "cuda" in devices
        target = targets[-1] if targets else None
        if target is not None:
            wrap = target.type == "cuda"
            if not wrap:
                uargs, ukwargs = tree_map(lambda v: target if isinstance(v, torch.device) else v, (uargs, ukwargs))
        if ukwargs.get("pin_memory"):
            ukwargs = {**ukwargs, "pin_memory": False}
        out = func(*uargs, **ukwargs)
        first = func._schema.arguments[0] if func._schema.arguments else None
        if first is not None and first.alias_info is not None and first.alias_info.is_write:
            return args[0]  # in place: the tensor written to, whatever its device
        if name in ("_to_copy", "to") and target is None and not isinstance(args[0], SimCuda):
            wrap = False
        if wrap:
            out = tree_map(lambda t: SimCuda(t) if isinstance(t, torch.Tensor) and not isinstance(t, SimCuda) else t,
                           out)
        return out


def available() -> bool:
    """This torch has the hooks the simulation needs, and no real GPU is visible (then the real thing is run)."""
    return (hasattr(torch._C, "_ensureCUDADeviceGuardSet") and hasattr(torch._C, "_set_only_lift_cpu_tensors")
            and hasattr(torch.Tensor, "_make_wrapper_subclass") and not torch.cuda.is_available())


@contextlib.contextmanager
def simulated_cuda() -> Iterator[None]:
    """Inside, ``cuda`` is the simulated device (module docstring)."""
    import layerprune.scoring.dispatch as dispatch

    patches = {
        "is_available": lambda: True, "synchronize": lambda device=None: None, "_lazy_init": lambda: None,
        "mem_get_info": lambda device=None: (80 * 2**30, 80 * 2**30), "current_device": lambda: 0,
        "get_device_name": lambda device=None: "simulated", "device_count": lambda: 1,
    }
    saved = {name: getattr(torch.cuda, name) for name in patches}
    saved_triton = dispatch._triton_ok
    torch._C._ensureCUDADeviceGuardSet()  # CUDA device guards are no-ops without a driver
    saved_lift = torch._C._only_lift_cpu_tensors()
    saved_overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    try:
        for name, fn in patches.items():
            setattr(torch.cuda, name, fn)
        dispatch._triton_ok = lambda: False
        torch._C._set_only_lift_cpu_tensors(True)
        torch.__future__.set_overwrite_module_params_on_conversion(True)  # module.to("cuda") makes new parameters
        with SimCudaMode():
            yield
    finally:
        torch._C._set_only_lift_cpu_tensors(saved_lift)
        torch.__future__.set_overwrite_module_params_on_conversion(saved_overwrite)
        dispatch._triton_ok = saved_triton
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
