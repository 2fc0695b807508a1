# <sys/socket.h>, <netinet/in.h>, <netinet/tcp.h>: accepting connections and reading
# the client's address (its peer key for --max-conns-per-address).
from libc.stdint cimport uint32_t

cdef extern from "sys/socket.h" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct sockaddr_storage:
        unsigned short ss_family
    int accept4(int fd, sockaddr* addr, socklen_t* addrlen, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int optname, const void* optval, socklen_t optlen)
    enum:
        SOCK_NONBLOCK, SOCK_CLOEXEC, SHUT_WR

cdef extern from "netinet/in.h" nogil:
    enum:
        IPPROTO_TCP, AF_INET, AF_INET6
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        in6_addr sin6_addr
    uint32_t ntohl(uint32_t value)

cdef extern from "netinet/tcp.h" nogil:
    enum:
        TCP_NODELAY
