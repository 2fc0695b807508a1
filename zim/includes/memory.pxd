# <malloc.h>, <sys/mman.h>: how freed output buffers are kept (mallopt) and given back
# (malloc_trim), and how a shared address-table region gives its pages back (madvise).

cdef extern from "malloc.h" nogil:
    int mallopt(int param, int value)
    int malloc_trim(size_t pad)
    enum:
        M_TRIM_THRESHOLD

cdef extern from "sys/mman.h" nogil:
    int madvise(void* addr, size_t length, int advice)
    enum:
        MADV_REMOVE
