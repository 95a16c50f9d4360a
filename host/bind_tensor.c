/* bind_tensor.c: placeholder until its author lands it. */
