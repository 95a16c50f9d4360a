/* module_entry.c: placeholder until its author lands it. */
