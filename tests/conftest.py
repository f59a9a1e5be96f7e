import os
import sys

# Triton reads TRITON_INTERPRET when a kernel is first decorated, so the flag must be set before any
# test module imports kernels/. Without a GPU the interpreter is the only way to run the kernels.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
