"""Compiled kernels: the linear engine's sparse dropout step and its evaluation (``sparse_step``, C++ built on first
use and loaded with ctypes)."""
