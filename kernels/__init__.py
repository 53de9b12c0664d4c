"""Device code: @triton.jit kernels and the device helpers they share. Installed as stn_triton.kernels."""
