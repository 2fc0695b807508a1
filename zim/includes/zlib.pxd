# zlib's C declarations (zlib.h), for permessage-deflate and TCP's compressed
# packets (zim/codec/deflate.pxi).
# Only the z_stream fields the codec touches are named; Cython takes the real
# layout from the header. The extension links with -lz (setup.py).

cdef extern from "zlib.h" nogil:
    ctypedef struct z_stream:
        const unsigned char* next_in
        unsigned int avail_in
        unsigned char* next_out
        unsigned int avail_out

    enum:
        Z_OK, Z_STREAM_END, Z_BUF_ERROR, Z_NO_FLUSH, Z_SYNC_FLUSH, Z_FINISH, Z_DEFLATED, Z_DEFAULT_STRATEGY
    const char* ZLIB_VERSION
    int deflateInit2(z_stream* strm, int level, int method, int window_bits, int mem_level, int strategy)
    int deflate(z_stream* strm, int flush)
    int deflateReset(z_stream* strm)
    int deflateParams(z_stream* strm, int level, int strategy)
    int deflateEnd(z_stream* strm)
    unsigned long deflateBound(z_stream* strm, unsigned long source_len)
    int inflateInit2(z_stream* strm, int window_bits)
    int inflate(z_stream* strm, int flush)
    int inflateReset(z_stream* strm)
    int inflateEnd(z_stream* strm)
