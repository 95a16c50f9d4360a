/* device_cuda.c: placeholder until its author lands it. */
