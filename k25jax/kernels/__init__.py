"""Custom kernels for what XLA lacks on a platform (XLA FFI custom calls)."""
