"""tessera's test suite (CPU + gloo; GPU tests skip when no CUDA device is present)."""
