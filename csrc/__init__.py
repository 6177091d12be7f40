"""C++ and CUDA sources of fastdiff, shipped as package data (fastdiff._csrc) so the CUDA backend
can compile csrc/cuda/*.cu with NVRTC at run time."""
