/*
 * nodelay.so: an LD_PRELOAD shim that turns TCP_NODELAY on for every TCP socket a
 * program connects or accepts.
 *
 * Why: OpenSSH with `ssh -N` leaves Nagle's algorithm on, so every new forwarded
 * stream waits on a 40 ms delayed ACK (measured on loopback: ~28 new connections
 * a second with Nagle, thousands without).  The bench's "ssh -R aes128-gcm + TCP_NODELAY" column runs the same ssh
 * client and private sshd with this shim preloaded (the variable survives sshd's
 * re-exec and its per-connection forks), so that rtunnel's connection rate is
 * compared with ssh without that stall, as the performance target asks.
 *
 * Bench only: silent (never writes to stdout/stderr), leaves errno as the real call
 * set it (callers test errno == EINPROGRESS after a non-blocking connect), touches
 * only AF_INET/AF_INET6 SOCK_STREAM sockets and ignores a failing setsockopt.
 * Built by bench/run.py: gcc -O2 -Wall -shared -fPIC -o _bench/nodelay.so bench/nodelay.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

/* glibc declares the address arguments as (transparent-union) __SOCKADDR_ARG types under
 * _GNU_SOURCE; the wrappers use the same types so their prototypes match. */
typedef int (*connect_fn)(int, __CONST_SOCKADDR_ARG, socklen_t);
typedef int (*accept_fn)(int, __SOCKADDR_ARG, socklen_t *__restrict);
typedef int (*accept4_fn)(int, __SOCKADDR_ARG, socklen_t *__restrict, int);

static void set_nodelay(int fd) {
    int saved = errno, domain = 0, type = 0, one = 1;
    socklen_t len = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && (domain == AF_INET || domain == AF_INET6)) {
        len = sizeof type;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM)
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    errno = saved;
}

/* The next definition of `name` (libc's); looked up once (a race only looks it up twice). */
static void *next(const char *name, void **cache) {
    if (!*cache) *cache = dlsym(RTLD_NEXT, name);
    return *cache;
}

int connect(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len) {
    static void *real;
    connect_fn f = (connect_fn)next("connect", &real);
    if (!f) { errno = ENOSYS; return -1; }
    int rc = f(fd, addr, len);
    if (rc == 0 || errno == EINPROGRESS) set_nodelay(fd);  /* ssh connects non-blocking */
    return rc;
}

int accept(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len) {
    static void *real;
    accept_fn f = (accept_fn)next("accept", &real);
    if (!f) { errno = ENOSYS; return -1; }
    int s = f(fd, addr, len);
    if (s >= 0) set_nodelay(s);
    return s;
}

int accept4(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len, int flags) {
    static void *real;
    accept4_fn f = (accept4_fn)next("accept4", &real);
    if (!f) { errno = ENOSYS; return -1; }
    int s = f(fd, addr, len, flags);
    if (s >= 0) set_nodelay(s);
    return s;
}
