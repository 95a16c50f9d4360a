/* comm_backends.c: the host backends this build has. The build decides
 * which backend files it compiles, so the list of them lives here and
 * nowhere else. */
#include "comm_internal.h"

const ws_comm_host_ops *const ws_comm_host_backends[] = {
#ifdef WS_HAVE_MPI
    &ws_comm_mpi_ops,
#endif
    NULL,
};
