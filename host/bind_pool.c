/* bind_pool.c: placeholder until its author lands it. */
