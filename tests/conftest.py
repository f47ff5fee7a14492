"""Shared test setup. Without a GPU, Triton kernels run through the Triton
interpreter; the variable must be set before any kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
