# <sys/resource.h>: the open-file limit sizes the reactor's connection table.

cdef extern from "sys/resource.h" nogil:
    struct rlimit:
        unsigned long rlim_cur
        unsigned long rlim_max
    int getrlimit(int resource, rlimit* rlim)
    enum:
        RLIMIT_NOFILE
