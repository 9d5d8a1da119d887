"""The appliance's budget for a shipped model: what the Coral-class device and its CPU fallback afford.

One place for the limits that `adapt`'s protocol checks and the shipped model's tests assert.
"""
from __future__ import annotations

#: .tflite bytes in all (CPU model plus its Edge TPU compilation, where there is one)
MAX_TFLITE_BYTES = 1_000_000
#: infer p50 on the appliance's CPU (2-core x86-64), in milliseconds
MAX_INFER_MS = 5.0
