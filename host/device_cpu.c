/* device_cpu.c: placeholder until its author lands it. */
