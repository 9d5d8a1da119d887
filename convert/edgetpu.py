"""Edge TPU compatibility report (before any compiler) and the ``edgetpu_compiler`` step."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..device.runtime import find_runtime, make_interpreter, ops_of

log = logging.getLogger(__name__)

#: TFLite builtins the Edge TPU maps (Coral "supported operations" table).
EDGETPU_OPS = frozenset(
    {
        "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS", "FULLY_CONNECTED", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC",
        "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM",
        "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU",
        "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE", "STRIDED_SLICE",
        "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
    }
)
QUANTIZED = {np.dtype(np.int8), np.dtype(np.uint8)}
COMPILER = "edgetpu_compiler"
COMPILER_HINT = (
    "edgetpu_compiler is not installed (x86-64 Debian/Ubuntu only): add Coral's apt repository "
    "(https://coral.ai/docs/edgetpu/compiler/) and `apt-get install edgetpu-compiler`, then re-run with --edgetpu"
)


class EdgeTpuError(RuntimeError):
    pass


@dataclass
class OpCheck:
    index: int
    op: str
    layer: str
    dtypes: str
    static_shape: bool
    mapped: bool
    reason: str


def _layer_name(tensor_name: str) -> str:
    """'m/relu1_1/Relu;m/conv1_1/convolution' -> 'relu1+conv1': the Keras layers fused into an op."""
    names: list[str] = []
    for part in tensor_name.split(";"):
        segs = part.split("/")
        seg = re.sub(r"_\d+$", "", segs[1] if len(segs) > 2 else segs[0])
        if seg not in names:
            names.append(seg)
    return "+".join(names)


def check_ops(tflite_path: Path) -> list[OpCheck]:
    """Every op of the model with whether the Edge TPU would map it, and why not."""
    interp = make_interpreter(tflite_path, find_runtime())
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    checks: list[OpCheck] = []
    for op in ops_of(interp):
        name = op["op_name"]
        if name == "DELEGATE":  # XNNPACK's node, not part of the model
            continue
        idx = [int(i) for i in list(op["inputs"]) + list(op["outputs"]) if int(i) >= 0 and int(i) in tensors]
        act = [tensors[i] for i in idx if np.dtype(tensors[i]["dtype"]) != np.int32]  # int32 = bias
        dtypes = sorted({np.dtype(t["dtype"]).name for t in act})
        static = all(
            -1 not in list(t.get("shape_signature", t["shape"])) for t in (tensors[i] for i in idx)
        )
        outs = [tensors[int(i)] for i in op["outputs"] if int(i) in tensors]
        layer = _layer_name(outs[0]["name"]) if outs else ""
        reasons = []
        if name not in EDGETPU_OPS:
            reasons.append("op not supported by the Edge TPU")
        bad = [d for d in dtypes if np.dtype(d) not in QUANTIZED]
        if bad:
            reasons.append(f"not int8 ({', '.join(bad)})")
        if not static:
            reasons.append("dynamic shape")
        checks.append(
            OpCheck(int(op["index"]), name, layer, "/".join(dtypes), static, not reasons,
                    "; ".join(reasons) or "int8 builtin, static shape")
        )
    return checks


def non_int8_ops(checks: list[OpCheck]) -> list[OpCheck]:
    return [c for c in checks if any(d.startswith("float") for d in c.dtypes.split("/"))]


def format_report(checks: list[OpCheck]) -> str:
    mapped = sum(c.mapped for c in checks)
    lines = [
        f"Edge TPU compatibility: {mapped} of {len(checks)} ops would be mapped to the Edge TPU",
        f"  {'#':>3}  {'op':<18} {'tensors':<12} {'edge tpu':<8} {'layer':<16} note",
    ]
    for c in checks:
        lines.append(
            f"  {c.index:>3}  {c.op:<18} {c.dtypes:<12} {'yes' if c.mapped else 'NO':<8} {c.layer[:16]:<16} {c.reason}"
        )
    return "\n".join(lines)


def report_dict(checks: list[OpCheck]) -> dict:
    return {
        "ops_total": len(checks),
        "ops_mapped": sum(c.mapped for c in checks),
        "all_mapped": all(c.mapped for c in checks),
        "ops": [asdict(c) for c in checks],
        "note": "static check against Coral's supported-ops table; edgetpu_compiler has the final word",
    }


def compile_edgetpu(tflite_path: Path, compiler: Optional[str] = None, timeout: int = 600) -> dict:
    """Run edgetpu_compiler; keep its log and NAME_edgetpu.tflite beside the model."""
    exe = compiler or shutil.which(COMPILER)
    if not exe:
        raise EdgeTpuError(COMPILER_HINT)
    out_dir = tflite_path.parent
    cmd = [exe, "-s", "-o", str(out_dir), str(tflite_path)]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log_path = out_dir / f"{tflite_path.stem}_edgetpu.log"
    compiled = out_dir / f"{tflite_path.stem}_edgetpu.tflite"
    if not log_path.exists() or proc.stdout:
        log_path.write_text(proc.stdout + ("\n" + proc.stderr if proc.stderr else ""))
    if proc.returncode != 0 or not compiled.exists():
        raise EdgeTpuError(
            f"edgetpu_compiler failed (exit {proc.returncode}); see {log_path}: "
            + (proc.stderr.strip() or proc.stdout.strip())[-300:]
        )
    version = ""
    m = re.search(r"Edge TPU Compiler version (\S+)", proc.stdout)
    if m:
        version = m.group(1)
    return {"file": compiled.name, "log": log_path.name, "compiler_version": version,
            "bytes": os.path.getsize(compiled)}
