"""Where the model computes, and in which floating-point type: checked before anything loads.

Every entry point (``ReplacementModel.from_pretrained``, ``load_transcoders``, the CLI, the
stages, the study jobs) passes its ``device`` and ``dtype`` through :func:`check_device_dtype`,
so a device this machine does not have, or a dtype that device cannot compute in, stops with
one line naming the fix instead of a traceback from deep inside torch (``Torch not compiled
with CUDA enabled``, an ``AssertionError``) after minutes of loading.

The names are torch's: devices ``cpu``, ``cuda``, ``cuda:N``, ``mps``; dtypes ``float32``,
``float64``, ``bfloat16``, ``float16`` (:data:`DTYPES`).

:func:`pin_cpu_arithmetic` asks MKL (torch's CPU matrix products on x86) for results that do
not change from run to run on one machine (``native``), or, in ``portable`` mode (the default), for
code that every x86-64 CPU runs alike, so that machines can agree (docs/design.md says where that was checked).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import torch

#: the floating-point types a model and its transcoders may be loaded in
DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")


class DeviceError(ValueError):
    """A device this machine does not have, or a dtype that device cannot run."""


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, without asking whether this machine has it (a study plans
    on a login node for jobs that run on GPU nodes)."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(str(device).strip())
    except RuntimeError:
        raise DeviceError(f"device {device!r} is not a device name: use cpu, cuda, cuda:N or mps") from None


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` (a torch.dtype or one of :data:`DTYPES`, with or without ``torch.``) as a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if str(dtype).removeprefix("torch.") not in DTYPES:
            raise DeviceError(f"dtype {dtype} cannot hold a model: use one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).strip().removeprefix("torch.")
    if name not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether ``a`` and ``b`` name one device (``cuda`` is the current GPU, as torch places it)."""
    a, b = parse_device(a), parse_device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def check_device_dtype(device: str | torch.device, dtype: str | torch.dtype = torch.float32) -> torch.device:
    """The device, checked: this machine has it and it computes in ``dtype``; otherwise a
    :class:`DeviceError` naming what is missing and the fix."""
    dev = parse_device(device)
    dt = parse_dtype(dtype)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                release = torch.__version__.split("+")[0]
                why = f"this torch ({torch.__version__}) is a CPU-only build"
                fix = (
                    f"on the GPU machine install torch's CUDA build (pip install torch=={release} "
                    "--index-url https://download.pytorch.org/whl/cu<NNN>, NNN the CUDA version its driver supports)"
                )
            else:
                why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
                fix = "check nvidia-smi and CUDA_VISIBLE_DEVICES, run on a machine with a GPU"
            raise DeviceError(f"device {str(dev)!r} asked for, but {why}: {fix}, or use device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(
                f"device {str(dev)!r} asked for, but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})"
            )
        if dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            raise DeviceError(
                f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) cannot compute in "
                "bfloat16 (it needs 8.0, Ampere or newer): load the model in float16 or float32"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' asked for, but this machine has no Apple GPU (MPS): use device cpu")
        if dt == torch.float64:
            raise DeviceError("the Apple GPU (mps) cannot compute in float64: load the model in float32")
    elif dev.type != "cpu":
        raise DeviceError(f"device {str(dev)!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev


#: MKL's conditional numerical reproducibility on the instruction set this machine has: fixed
#: cache sizes, deterministic reductions, static scheduling. On the machines measured it gives
#: the bits MKL's default gives; adding STRICT (results independent of operand alignment)
#: changes them, and torch's allocator aligns every buffer the same way in every run anyway
MKL_REPRODUCIBLE = "AUTO"
_MKL_CBWR_BRANCH_OFF = 1  # mkl_cbwr_get's answer when no reproducible mode is set
_MKL_CBWR_COMPATIBLE = 3

#: how far the CPU's arithmetic is pinned (``runtime.arithmetic``). ``native``: MKL's reproducible
#: mode on this CPU's own instruction set and torch's kernels for it: the same bytes on every run
#: of one machine, other bytes (another trained organism) on another CPU. ``portable``: MKL's
#: SSE2 path (``MKL_CBWR=COMPATIBLE``) and torch's baseline kernels (``ATEN_CPU_CAPABILITY=default``),
#: the code every x86-64 CPU runs, so that machines agree; slower (the organism's model trains in
#: 50 s instead of 30 s on 2 cores)
ARITHMETIC_MODES: tuple[str, ...] = ("native", "portable")
#: the mode when neither the caller nor the environment names one: ``portable``, since the default
#: organism was chosen on it and CI machines differ in their CPUs (docs/design.md)
DEFAULT_ARITHMETIC = "portable"
#: the environment variable that carries the mode to later calls in the process, to the CLI and
#: to the bench scripts (``CIRCUIT_PIPELINE_ARITHMETIC=portable python bench/...``)
ARITHMETIC_ENV = "CIRCUIT_PIPELINE_ARITHMETIC"
_MKL_MODE = {"native": MKL_REPRODUCIBLE, "portable": "COMPATIBLE"}


def pin_cpu_arithmetic(mode: str | None = None) -> bool:
    """Pin the CPU's arithmetic to ``mode`` of :data:`ARITHMETIC_MODES` (None: the environment's
    ``CIRCUIT_PIPELINE_ARITHMETIC``, else :data:`DEFAULT_ARITHMETIC`); return whether it is pinned now.

    Without it MKL may pick another code path for the same product from one process to the
    next on some CPUs, so a retrained organism need not give the same bytes. MKL reads its
    setting (``MKL_CBWR``, unless the environment already names one) at its first call and
    torch its kernels' instruction set (``ATEN_CPU_CAPABILITY``) at its first kernel: call this
    before any computation of the process. Too late, it warns naming the fix. A torch without
    MKL has no MKL to pin.
    """
    mode = mode or os.environ.get(ARITHMETIC_ENV) or DEFAULT_ARITHMETIC
    if mode not in ARITHMETIC_MODES:
        raise ValueError(f"arithmetic mode {mode!r} is not one of {ARITHMETIC_MODES}")
    os.environ[ARITHMETIC_ENV] = mode  # later calls of this process (the organism's trainers) keep it
    os.environ.setdefault("MKL_CBWR", _MKL_MODE[mode])
    if mode == "portable":
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
    late = []
    mkl = mkl_cbwr_mode()
    if mkl is not None and (
        mkl == _MKL_CBWR_BRANCH_OFF or (mode == "portable" and mkl % 65536 != _MKL_CBWR_COMPATIBLE)
    ):
        late.append(f"MKL_CBWR={_MKL_MODE[mode]}")
    if mode == "portable" and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        late.append("ATEN_CPU_CAPABILITY=default")
    if late:
        warnings.warn(
            f"the {mode} arithmetic is not in force in this process (MKL or torch computed before it was "
            "pinned, or the environment names another mode), so the bytes may differ from other runs: set "
            f"{' '.join(late)} in the environment before starting Python",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def arithmetic_environment(mode: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) for a fresh Python process that pins
    ``mode`` (None: names no mode, so the process takes :data:`DEFAULT_ARITHMETIC`): the variables
    :func:`pin_cpu_arithmetic` reads or sets (``MKL_CBWR``, ``ATEN_CPU_CAPABILITY``, the mode)
    are dropped, so this process's own pin does not leak into the new one."""
    if mode is not None and mode not in ARITHMETIC_MODES:
        raise ValueError(f"arithmetic mode {mode!r} is not one of {ARITHMETIC_MODES}")
    drop = {"MKL_CBWR", "ATEN_CPU_CAPABILITY", ARITHMETIC_ENV}
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in drop}
    return env | ({ARITHMETIC_ENV: mode} if mode else {})


def arithmetic_in_force() -> dict:
    """What computes on the CPU in this process: ``mode`` (:data:`ARITHMETIC_MODES`, as pinned),
    ``kernels`` (torch's CPU instruction set, e.g. ``AVX512``), ``mkl_cbwr`` (MKL's mode, None
    without MKL) and ``cpu`` (the processor's name): what a trained organism's bytes depend on."""
    return {
        "mode": os.environ.get(ARITHMETIC_ENV, DEFAULT_ARITHMETIC),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": mkl_cbwr_mode(),
        "cpu": _cpu_name(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def mkl_cbwr_mode() -> int | None:
    """MKL's reproducibility mode in this process (its ``mkl_cbwr_get``: 1 off, 2 AUTO,
    3 COMPATIBLE, +65536 STRICT), or None when this torch carries no MKL."""
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return int(get(-1))  # MKL_CBWR_ALL: the branch and the STRICT flag
