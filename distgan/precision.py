"""Mixed precision: autocast for the forward passes, and one loss scaler per network under fp16.

    fp32  no autocast
    bf16  autocast to bfloat16 (same exponent range as fp32: no loss scaling needed)
    fp16  autocast to float16, with a GradScaler for G and another for D

Two scalers, because G's and D's gradients live at different scales and overflow at different times: with
one shared scaler an overflow in D would also shrink G's scale and skip G's step. Each network's scaler
skips only that network's step, and it skips it on every rank at once, because DDP all-reduces the gradients
(an inf on one rank becomes an inf on all) before the scaler looks at them. Losses are computed in fp32 from
logits cast up (see losses.py); penalties use their network's `Net.loss_scale()` (a device tensor: reading the
scale as a number would make the host wait for the GPU) to stay AMP-correct.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device_type = device.type
        self.dtype = DTYPES[mode]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is active under fp16 and a pass-through otherwise (one code path for all modes)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.mode == "fp16")
