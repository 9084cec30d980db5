"""The inference fast path of `service.score.model.Scorer`: host buffers, IO binding, GPU provider options, fp16 check.

Why each piece exists:

* **Pinned host buffers.** A host-to-device copy from pageable memory goes through a
  staging buffer in the driver; from page-locked ("pinned") memory it is one DMA.
  `HostBuffer` allocates the batch buffer once, pinned when a CUDA runtime is there
  (ONNX Runtime's own host-accessible allocator, else ``cudaHostRegister`` on a numpy
  buffer), and callers fill its rows in place, so a batch is copied to the GPU exactly once.
* **IO binding.** `BoundRunner` binds that buffer as the model input, so ONNX Runtime
  copies it to the device once at bind time and reads the output back into host memory
  without per-run allocation of a feed dict.
* **TensorRT fp16.** Worth about 2x on tensor cores, but the graph normalises raw pixel
  values (sums of squares of values in the thousands), which fp16 can overflow;
  `max_score_difference` checks a fp16 session against the fp32 CPU session on the same
  stamps, and the caller keeps fp32 when the scores differ by more than the tolerance.

Everything here falls back to plain CPU memory and the ordinary ``session.run`` path when
no GPU is there, with the reason logged; CPU results are bit-identical either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import ONNX_INPUT, ONNX_OUTPUT, StampContract

log = logging.getLogger(__name__)

#: Largest difference between fp16 and fp32 scores for fp16 to be used.
FP16_TOLERANCE = 1e-3

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def trt_cache_dir() -> Path:
    """Where TensorRT engines are cached (env ``RBSTREAM_TRT_CACHE``): building one takes minutes."""
    return Path(os.environ.get("RBSTREAM_TRT_CACHE", Path.home() / ".cache" / "rbstream" / "tensorrt"))


def provider_options(providers: list[str], contract: StampContract, fp16: bool) -> list[Any]:
    """Providers with their options, in the form ``InferenceSession(providers=...)`` takes.

    TensorRT gets a persistent engine and timing cache (building an engine takes minutes).
    No explicit optimisation profile: TensorRT takes only the float32 part of the graph
    (the normaliser computes in float64, which it does not support), whose input is not
    the graph's ``stamps``, so ONNX Runtime's own dynamic profile — widened as new batch
    sizes arrive, and cached — is the one that is right by construction. ``contract`` is
    kept for options that depend on the stamp shape.
    """
    out: list[Any] = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            cache = trt_cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            out.append((name, {
                "device_id": 0,
                "trt_fp16_enable": bool(fp16),
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            }))
        elif name == "CUDAExecutionProvider":
            out.append((name, {"device_id": 0}))
        else:
            out.append(name)
    return out


# --- pinned host memory ---------------------------------------------------------------------------------

def _ort_host_accessible(shape: tuple[int, ...]):
    """A float32 array in ONNX Runtime's CUDA host-accessible (pinned) memory, or None."""
    import onnxruntime as ort

    if not hasattr(ort, "get_ep_devices"):
        return None
    for ep_device in ort.get_ep_devices():
        if ep_device.ep_name != "CUDAExecutionProvider":
            continue
        info = ep_device.memory_info(ort.OrtDeviceMemoryType.HOST_ACCESSIBLE)
        if info is None:
            continue
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, memory_info=info)
        array = value.numpy()
        if array.ctypes.data != value.data_ptr():  # a copy, not a view: useless as a fill-in-place buffer
            return None
        return array, value
    return None


def _cudart():
    """The CUDA runtime library (already loaded by the CUDA provider, the nvidia wheel's, or the system's), or None."""
    import site

    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", ctypes.util.find_library("cudart")]
    for folder in site.getsitepackages():
        names += sorted(str(p) for p in Path(folder).glob("nvidia/cuda_runtime/lib/libcudart.so*"))
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _registered(shape: tuple[int, ...]):
    """A numpy float32 array page-locked with ``cudaHostRegister``, or None."""
    cudart = _cudart()
    if cudart is None:
        return None
    array = np.empty(shape, dtype=np.float32)
    pointer = ctypes.c_void_p(array.ctypes.data)
    if cudart.cudaHostRegister(pointer, ctypes.c_size_t(array.nbytes), ctypes.c_uint(0)) != 0:
        return None
    # Unregister before numpy frees the memory, or the driver keeps a stale mapping.
    weakref.finalize(array, cudart.cudaHostUnregister, pointer)
    return array, None


class HostBuffer:
    """A reusable float32 batch buffer ``[capacity, *row_shape]``, pinned when it can be.

    Parameters
    ----------
    row_shape : tuple of int
        Shape of one stamp, ``contract.input_shape``.
    pinned : bool
        Try page-locked memory (only useful when a GPU consumes the buffer).
    """

    def __init__(self, row_shape: tuple[int, ...], pinned: bool):
        self.row_shape = tuple(row_shape)
        self.want_pinned = pinned
        self.kind = "none"
        self.array = np.empty((0, *self.row_shape), dtype=np.float32)
        self._owner: Any = None

    def view(self, rows: int) -> np.ndarray:
        """The first ``rows`` rows, growing the buffer (to the next power of two) when needed."""
        if rows > len(self.array):
            self._allocate(1 << max(rows - 1, 0).bit_length())
        return self.array[:rows]

    def owns(self, array: np.ndarray) -> bool:
        """Whether ``array`` is a leading view of this buffer (then no copy is needed)."""
        return (len(self.array) > 0 and array.dtype == np.float32 and array.flags.c_contiguous
                and array.ctypes.data == self.array.ctypes.data and array.shape[1:] == self.row_shape)

    def _allocate(self, capacity: int) -> None:
        shape = (capacity, *self.row_shape)
        allocated = None
        if self.want_pinned:
            for kind, allocate in (("onnxruntime-host-accessible", _ort_host_accessible),
                                   ("cudaHostRegister", _registered)):
                try:
                    allocated = allocate(shape)
                except Exception as exc:  # driver / ORT errors differ across versions: fall back, say why
                    log.warning("pinned host buffer via %s failed (%s); trying the next way", kind, exc)
                    allocated = None
                if allocated is not None:
                    self.kind = kind
                    break
            if allocated is None:
                log.warning("no pinned host memory available; the batch buffer is pageable")
        if allocated is None:
            allocated = (np.empty(shape, dtype=np.float32), None)
            self.kind = "pageable"
        self.array, self._owner = allocated


class BoundRunner:
    """Runs one session through IO binding with per-thread host buffers.

    IO binding objects and the host buffer are not safe to share between threads
    (the API scores from a thread pool), so each thread gets its own pair; the
    session itself is thread-safe.
    """

    def __init__(self, session, row_shape: tuple[int, ...], pinned: bool):
        self.session = session
        self.row_shape = tuple(row_shape)
        self.pinned = pinned
        self._local = threading.local()

    def _state(self):
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = (self.session.io_binding(), HostBuffer(self.row_shape, self.pinned))
        return state

    def buffer(self, rows: int) -> np.ndarray:
        """This thread's host buffer, ``rows`` rows, to fill in place before `run`."""
        return self._state()[1].view(rows)

    @property
    def buffer_kind(self) -> str:
        return self._state()[1].kind

    def run(self, stamps: np.ndarray) -> np.ndarray:
        """Scores of ``stamps`` (float32, C-contiguous, validated by the caller)."""
        binding, host = self._state()
        if self.pinned and not host.owns(stamps):
            # One host-to-host copy into pinned memory buys a single DMA to the device.
            staged = host.view(len(stamps))
            np.copyto(staged, stamps)
            stamps = staged
        binding.bind_cpu_input(ONNX_INPUT, stamps)
        binding.bind_output(ONNX_OUTPUT, "cpu")
        self.session.run_with_iobinding(binding)
        scores = binding.copy_outputs_to_cpu()[0]
        binding.clear_binding_inputs()  # drop the reference to the caller's array
        return np.asarray(scores, dtype=np.float32).reshape(-1)


# --- fp16 check -----------------------------------------------------------------------------------------

def check_stamps(contract: StampContract, count: int = 256, seed: int = 20171108) -> np.ndarray:
    """Deterministic stamps that look like survey cutouts, to compare precisions on.

    Sky of ~1000 counts with Poisson-like noise, a PSF-like source of random flux and
    position near the centre in science and difference, and NaN padding (CCD edges) on
    a quarter of them: the value ranges fp16 must survive in the graph's normalisation.
    """
    rng = np.random.default_rng(seed)
    channels, size, _ = contract.input_shape
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stamps = np.empty((count, channels, size, size), dtype=np.float32)
    for i in range(count):
        sky = rng.uniform(100.0, 3000.0)
        flux = rng.lognormal(7.0, 1.5)
        cy, cx = (size - 1) / 2 + rng.normal(0, 1.5, size=2)
        sigma = rng.uniform(0.8, 3.0)
        source = flux * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        for c, name in enumerate(contract.raw_inputs):
            noise = rng.normal(0.0, np.sqrt(sky), size=(size, size)).astype(np.float32)
            if name == "difference":
                stamps[i, c] = source * rng.uniform(0.0, 1.0) + noise
            elif name == "science":
                stamps[i, c] = sky + source + noise
            else:
                stamps[i, c] = sky + source * rng.uniform(0.0, 1.2) + noise
        if i % 4 == 0:
            stamps[i, :, : rng.integers(1, size // 3), :] = np.nan
    return stamps


def max_score_difference(session, reference, stamps: np.ndarray, batch: int = 64) -> float:
    """Largest |score(session) - score(reference)| over ``stamps`` (run in batches)."""
    worst = 0.0
    for start in range(0, len(stamps), batch):
        chunk = np.ascontiguousarray(stamps[start:start + batch])
        a = session.run([ONNX_OUTPUT], {ONNX_INPUT: chunk})[0].reshape(-1).astype(np.float64)
        b = reference.run([ONNX_OUTPUT], {ONNX_INPUT: chunk})[0].reshape(-1).astype(np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return float("inf")
        worst = max(worst, float(np.max(np.abs(a - b))))
    return worst
