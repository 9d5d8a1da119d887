"""One small loader for the TFLite interpreter and the Edge TPU delegate.

Prefers LiteRT (``ai-edge-litert``), the maintained successor; falls back to
``tflite-runtime`` (whose last release, 2.14, cannot build an Interpreter under
numpy 2: we say so instead of crashing) and, in a toolchain install, to
TensorFlow's own interpreter.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)

EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}


class RuntimeUnavailable(RuntimeError):
    """No usable TFLite interpreter, or the requested accelerator cannot be used."""


@dataclass
class Runtime:
    name: str
    version: str
    interpreter_cls: Any
    load_delegate: Optional[Callable[..., Any]]


def _try_litert() -> Optional[Runtime]:
    try:
        from ai_edge_litert import interpreter as mod  # type: ignore
    except ImportError:
        return None
    try:
        from importlib.metadata import version

        ver = version("ai-edge-litert")
    except Exception:  # noqa: BLE001
        ver = "unknown"
    return Runtime("ai-edge-litert", ver, mod.Interpreter, getattr(mod, "load_delegate", None))


def _try_tflite_runtime() -> Optional[Runtime]:
    try:
        from tflite_runtime import interpreter as mod  # type: ignore
    except ImportError:
        return None
    ver = getattr(__import__("tflite_runtime"), "__version__", "unknown")
    return Runtime("tflite-runtime", ver, mod.Interpreter, getattr(mod, "load_delegate", None))


def _try_tensorflow() -> Optional[Runtime]:
    if os.environ.get("PNEUMOFLAG_NO_TF_RUNTIME"):
        return None
    try:
        import tensorflow as tf  # type: ignore
    except ImportError:
        return None
    return Runtime("tensorflow", tf.__version__, tf.lite.Interpreter,
                   getattr(tf.lite.experimental, "load_delegate", None))


def find_runtime(prefer: Optional[str] = None) -> Runtime:
    """The first importable runtime (``prefer`` first: ai-edge-litert, tflite-runtime, tensorflow)."""
    order = [_try_litert, _try_tflite_runtime, _try_tensorflow]
    names = ["ai-edge-litert", "tflite-runtime", "tensorflow"]
    if prefer:
        if prefer not in names:
            raise ValueError(f"unknown runtime {prefer!r}; choose from {', '.join(names)}")
        i = names.index(prefer)
        order.insert(0, order.pop(i))
    for probe in order:
        rt = probe()
        if rt is not None:
            return rt
    raise RuntimeUnavailable(
        "no TFLite runtime found: pip install ai-edge-litert (or tflite-runtime with numpy<2)"
    )


_NATIVE_LEVELS = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
_native = logging.getLogger(__name__ + ".native")
_native_lock = threading.Lock()


@contextmanager
def native_log_to_logging() -> Iterator[None]:
    """The runtime's C++ log lines (``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``) go straight
    to file descriptor 2, past ``-q`` and the log format: catch them while an interpreter is built and log
    them at their own level. Anything else written to fd 2 meanwhile (another thread) is passed on as it was.
    """
    with _native_lock, tempfile.TemporaryFile() as caught:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2 (a daemon without stderr): nothing to catch
            yield
            return
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode("utf-8", "replace").splitlines():
                level, sep, text = line.partition(": ")
                if sep and level in _NATIVE_LEVELS:
                    _native.log(_NATIVE_LEVELS[level], "%s", text)
                elif line:
                    os.write(2, (line + "\n").encode())


def make_interpreter(
    model_path: Path | str,
    runtime: Optional[Runtime] = None,
    num_threads: Optional[int] = None,
    delegates: Optional[list] = None,
):
    """Build and allocate an interpreter, turning runtime quirks into clear errors."""
    rt = runtime or find_runtime()
    kwargs: dict[str, Any] = {"model_path": str(model_path)}
    if num_threads:
        kwargs["num_threads"] = int(num_threads)
    if delegates:
        kwargs["experimental_delegates"] = delegates
    try:
        with native_log_to_logging():
            interp = rt.interpreter_cls(**kwargs)
            interp.allocate_tensors()
    except (AttributeError, TypeError, SystemError):  # SystemError: "_ARRAY_API not found"
        if rt.name == "tflite-runtime" and int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeUnavailable(
                f"tflite-runtime {rt.version} was built for numpy 1 and cannot build an Interpreter under numpy "
                f"{np.__version__}: install ai-edge-litert (the same Interpreter API), or pin numpy<2"
            ) from None
        raise
    except ValueError as exc:
        raise RuntimeUnavailable(f"{model_path}: not a valid TFLite model ({exc})") from exc
    except RuntimeError as exc:
        raise RuntimeUnavailable(f"{model_path}: the runtime cannot load this model ({exc})") from exc
    return interp


def load_edgetpu_delegate(runtime: Optional[Runtime] = None, library: Optional[str] = None):
    """Load ``libedgetpu``; raises RuntimeUnavailable with the reason when it cannot."""
    import platform

    rt = runtime or find_runtime()
    lib = library or os.environ.get("PNEUMOFLAG_EDGETPU_LIBRARY") or EDGETPU_LIBRARY.get(
        platform.system(), "libedgetpu.so.1"
    )
    if rt.load_delegate is None:
        raise RuntimeUnavailable(f"{rt.name} {rt.version} cannot load external delegates")
    try:
        # Probe with ctypes first: a failed load_delegate() leaves a half-built
        # Delegate whose __del__ prints a traceback at exit.
        ctypes.CDLL(lib)
    except OSError as exc:
        raise RuntimeUnavailable(
            f"Edge TPU delegate {lib} could not be loaded ({exc}); install the Edge TPU runtime "
            "(package libedgetpu1-std from Coral's apt repository) and check the device is plugged in"
        ) from None
    try:
        return rt.load_delegate(lib)
    except (ValueError, OSError, RuntimeError) as exc:
        raise RuntimeUnavailable(
            f"Edge TPU delegate {lib} could not be loaded ({exc}); install the Edge TPU runtime "
            "(package libedgetpu1-std from Coral's apt repository) and check the device is plugged in"
        ) from exc


def ops_of(interp) -> list[dict]:
    """The interpreter's op list (name, index, inputs, outputs): for the Edge TPU report."""
    getter = getattr(interp, "_get_ops_details", None)
    if getter is None:
        raise RuntimeUnavailable("this TFLite runtime cannot list a model's ops")
    return list(getter())
