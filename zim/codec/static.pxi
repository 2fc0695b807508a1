# Plain HTTP GETs on the WebSocket port (--demo): a request head without an Upgrade
# header is answered from a table of complete responses, path -> bytes, made once by
# Python at start (zim.demo); any other path gets the table's 404. The lookup is C on
# the reactor's read buffer: no Python call and no allocation per request. Included by
# zim/_codec.pyx.


cdef inline bint _lower_equals(const char* text, size_t length, const char* lower) noexcept nogil:
    """text[0:length] equals the lowercase ASCII ``lower``, ignoring case."""
    cdef size_t i
    cdef char c
    for i in range(length):
        c = text[i]
        if b'A' <= c <= b'Z':
            c = c + 32
        if lower[i] == 0 or c != lower[i]:
            return False
    return lower[length] == 0


cdef Py_ssize_t static_lookup(const static_table_t* table, const char* head, size_t length) noexcept nogil:
    """For a request head (ending in a blank line): the index of the table's response to
    send, ``table.count`` for its 404, or -1 when it is not a plain GET (an upgrade, another
    method, no table) and goes on to the WebSocket handshake."""
    cdef size_t i, path_end, line, colon, query
    if table.count == 0 or length < 14 or memcmp(head, b"GET /", 5) != 0:
        return -1
    path_end = 4
    while path_end < length and head[path_end] != b' ' and head[path_end] != b'\r':
        path_end += 1
    if path_end + 9 > length or memcmp(head + path_end, b" HTTP/1.", 8) != 0:
        return -1
    line = path_end
    while line < length:                # each header line: an Upgrade header means a handshake
        while line < length and head[line] != b'\n':
            line += 1
        line += 1
        colon = line
        while colon < length and head[colon] != b':' and head[colon] != b'\r':
            colon += 1
        if colon < length and head[colon] == b':' and _lower_equals(head + line, colon - line, b"upgrade"):
            return -1
    query = 4
    while query < path_end and head[query] != b'?':
        query += 1
    for i in range(table.count):
        if table.paths[i].length == query - 4 and memcmp(table.paths[i].text, head + 4, query - 4) == 0:
            return <Py_ssize_t>i
    return <Py_ssize_t>table.count


_NOT_FOUND = b"not found\n"
_HTTP_404 = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: "
             + str(len(_NOT_FOUND)).encode() + b"\r\nConnection: close\r\n\r\n" + _NOT_FOUND)


cdef tuple static_table_set(static_table_t* table, dict pages):
    """Point the table at the paths of ``pages`` ({path bytes: complete response bytes},
    which the caller keeps: the table points into its keys) and return the responses in
    the table's order, the 404 last (``static_lookup``'s indexes). A new table replaces
    the old one."""
    cdef path_t* entries = NULL
    cdef Py_ssize_t i = 0
    cdef bytes path
    if pages:
        entries = <path_t*>calloc(len(pages), sizeof(path_t))
        if entries == NULL:
            raise MemoryError("static pages")
        for path in pages:
            entries[i].text = <const char*>path
            entries[i].length = len(path)
            i += 1
    static_table_free(table)
    table.paths = entries
    table.count = len(pages)
    return tuple(pages.values()) + (_HTTP_404,)


cdef void static_table_free(static_table_t* table) noexcept nogil:
    free(table.paths)
    table.paths = NULL
    table.count = 0
