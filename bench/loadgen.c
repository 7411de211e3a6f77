/*
 * loadgen: the load generator and "site service" of the rtunnel benchmark.
 *
 * Why C: the bench compares tunnels that move hundreds of MB/s; a Python load
 * generator would be the bottleneck and flatten the differences.  This one
 * drives direct loopback TCP at several GB/s (the bench prints that headroom).
 * Compiled by bench/run.py with `gcc -O2 -pthread` into _bench/ (never committed).
 *
 * Wire protocol (client -> site service), 16-byte header, little endian:
 *     char mode[4]; uint32 seed; uint64 count;
 *   "SINK": client sends `count` bytes of pattern(seed); the server checks
 *           them and answers 16 bytes {uint64 received; uint64 bad_chunks}.
 *   "SRCE": server sends `count` bytes of pattern(seed), then waits for EOF.
 *   "ECHO": server echoes everything until EOF.
 * One port serves all three so a tunnel needs exactly one forward.
 * Counts are known up front, so nothing relies on half-close.
 *
 * Pattern: byte at stream offset p is pat[(p + seed*7919) % 65521] where
 * pat is a fixed pseudo-random table.  65521 is prime, so a lost, duplicated
 * or reordered chunk (tunnels cut at powers of two) and bytes from another
 * stream (other seed) misalign and fail memcmp.  The check costs one memcmp
 * per read: cheap enough at several GB/s.
 *
 * Modes (all print one JSON object per result line on stdout):
 *   serve --listen HOST:PORT [--timeout S] [--max-count N]   site service (epoll + a thread per
 *         bulk stream); exits after N connections (default 10,000,000) or S seconds (3600)
 *   up    --host H --port P --bytes N [--streams K]   upload into SINK
 *   down  --host H --port P --bytes N [--streams K]   download from SRCE
 *   rtt   --host H --port P [--seconds S] [--max-count M] [--size 64] [--warmup 200]
 *   conn  --host H --port P [--seconds S] [--concurrency C] [--max-count M]
 *   hold  --host H --port P --count N [--concurrency C]
 *   --socks NAME:PORT (rtt, conn, hold): H:P is a SOCKS5 proxy (rtunnel's
 *         front door); every connection first does the SOCKS5 CONNECT by
 *         name (RFC 1928, no authentication), counted in its time.
 *         opens N connections, does one echo on each (so the tunnel really
 *         carries them end to end), prints {"ready":..}, then holds them until
 *         stdin gives EOF or a line, or the timeout.
 * Every mode is bounded in time by alarm(--timeout) (default 120 s; serve 3600 s).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define PLEN 65521u
#define CHUNK (256u * 1024u)
#define HDR 16
#define MAX_STREAMS 1024

static unsigned char *pat; /* PLEN + CHUNK bytes: any window of <= CHUNK is contiguous */

static void pat_init(void) {
    pat = malloc(PLEN + CHUNK);
    if (!pat) { perror("malloc"); exit(1); }
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (unsigned i = 0; i < PLEN; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        pat[i] = (unsigned char)(x >> 24);
    }
    for (unsigned i = 0; i < CHUNK; i++) pat[PLEN + i] = pat[i % PLEN];
}

static inline const unsigned char *pat_at(uint64_t pos, uint32_t seed) {
    return pat + (pos + (uint64_t)seed * 7919u) % PLEN;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------- options ---------- */
static const char *o_host = "127.0.0.1", *o_listen = NULL;
static int o_port = 0, o_streams = 1, o_conc = 1, o_size = 64, o_timeout = 0, o_warmup = 200;
static long long o_bytes = 0, o_count = 0, o_max = 1000000;
static double o_seconds = 1.0;
static const char *o_socks = NULL; /* NAME:PORT asked of a SOCKS5 proxy at --host/--port */

/* ---------- socket helpers ---------- */
static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void set_io_timeout(int fd, int secs) {
    struct timeval tv = {secs, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w; n -= (size_t)w;
    }
    return 0;
}

/* Read exactly n bytes (never more).  0 on success, -1 on error/EOF. */
static int read_full(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}

static void drain_until_eof(int fd) {
    char buf[4096];
    for (;;) {
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return;
    }
}

static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;

static void resolve(const char *host, int port) {
    struct addrinfo hints = {0}, *res;
    char ps[16];
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc) { fprintf(stderr, "loadgen: bad address %s: %s\n", host, gai_strerror(rc)); exit(1); }
    memcpy(&g_addr, res->ai_addr, res->ai_addrlen);
    g_addrlen = res->ai_addrlen;
    freeaddrinfo(res);
}

/* SOCKS5 CONNECT to --socks NAME:PORT over fd: greeting, request, 10-byte reply.  0 on success. */
static int socks5(int fd) {
    const char *colon = strrchr(o_socks, ':');
    size_t n = colon ? (size_t)(colon - o_socks) : 0;
    if (!colon || n == 0 || n > 255) return -1;
    int port = atoi(colon + 1);
    unsigned char req[3 + 5 + 255 + 2], in[10];
    memcpy(req, "\x05\x01\x00", 3);
    if (write_all(fd, req, 3) || read_full(fd, in, 2) || in[0] != 5 || in[1] != 0) return -1;
    memcpy(req, "\x05\x01\x00\x03", 4);
    req[4] = (unsigned char)n;
    memcpy(req + 5, o_socks, n);
    req[5 + n] = (unsigned char)(port >> 8);
    req[6 + n] = (unsigned char)port;
    if (write_all(fd, req, 7 + n) || read_full(fd, in, 10) || in[1] != 0) return -1;
    return 0;
}

static int dial(void) {
    int fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    set_nodelay(fd);
    set_io_timeout(fd, 30);
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) < 0) { close(fd); return -1; }
    if (o_socks && socks5(fd)) { close(fd); return -1; }
    return fd;
}

static void put_hdr(unsigned char *h, const char *mode, uint32_t seed, uint64_t count) {
    memcpy(h, mode, 4);
    memcpy(h + 4, &seed, 4);
    memcpy(h + 8, &count, 8);
}

/* ---------- server ----------
 * One epoll thread accepts, reads headers and serves ECHO (cheap per new
 * connection: no thread per connect, so the connection-rate test measures the
 * tunnel, and 1,000 idle held connections cost no threads).  SINK and SRCE
 * connections are handed to their own blocking thread, one core each. */
typedef struct { unsigned char hdr[HDR]; int got, echo; } sconn_t;
static sconn_t **g_conns;
static int g_nconns, g_ep;

static void serve_close(int fd) {
    free(g_conns[fd]);
    g_conns[fd] = NULL;
    close(fd);
}

typedef struct { int fd; unsigned char hdr[HDR]; } bulk_arg_t;

static void *serve_bulk_conn(void *arg) {
    bulk_arg_t *a = arg;
    int fd = a->fd;
    uint32_t seed; uint64_t count;
    memcpy(&seed, a->hdr + 4, 4);
    memcpy(&count, a->hdr + 8, 8);
    if (!memcmp(a->hdr, "SINK", 4)) {
        unsigned char *buf = malloc(CHUNK);
        uint64_t pos = 0, bad = 0;
        while (buf && pos < count) {
            size_t want = count - pos < CHUNK ? (size_t)(count - pos) : CHUNK;
            ssize_t r = recv(fd, buf, want, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            if (memcmp(buf, pat_at(pos, seed), (size_t)r)) bad++;
            pos += (uint64_t)r;
        }
        free(buf);
        unsigned char rep[16];
        memcpy(rep, &pos, 8);
        memcpy(rep + 8, &bad, 8);
        if (write_all(fd, rep, 16) == 0) drain_until_eof(fd);
    } else {
        uint64_t pos = 0;
        while (pos < count) {
            size_t n = count - pos < CHUNK ? (size_t)(count - pos) : CHUNK;
            ssize_t w = send(fd, pat_at(pos, seed), n, MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) break;
            pos += (uint64_t)w;
        }
        drain_until_eof(fd);
    }
    close(fd);
    free(a);
    return NULL;
}

static pthread_attr_t g_tattr;

static void serve_event(int fd) {
    sconn_t *c = g_conns[fd];
    char buf[16384];
    while (!c->echo) {
        ssize_t r = recv(fd, c->hdr + c->got, (size_t)(HDR - c->got), 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) return;
        if (r <= 0) { serve_close(fd); return; }
        c->got += (int)r;
        if (c->got < HDR) continue;
        if (!memcmp(c->hdr, "ECHO", 4)) { c->echo = 1; break; }
        if (memcmp(c->hdr, "SINK", 4) && memcmp(c->hdr, "SRCE", 4)) { serve_close(fd); return; }
        bulk_arg_t *a = malloc(sizeof *a);
        a->fd = fd;
        memcpy(a->hdr, c->hdr, HDR);
        epoll_ctl(g_ep, EPOLL_CTL_DEL, fd, NULL);
        free(c);
        g_conns[fd] = NULL;
        int fl = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
        pthread_t t;
        if (pthread_create(&t, &g_tattr, serve_bulk_conn, a)) { close(fd); free(a); }
        return;
    }
    for (;;) { /* ECHO */
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) return;
        if (r <= 0) { serve_close(fd); return; }
        size_t off = 0;
        while (off < (size_t)r) {
            ssize_t w = send(fd, buf + off, (size_t)r - off, MSG_NOSIGNAL);
            if (w < 0 && errno == EAGAIN) { /* rare for echo: wait briefly for room */
                struct pollfd p = {fd, POLLOUT, 0};
                if (poll(&p, 1, 30000) <= 0) { serve_close(fd); return; }
                continue;
            }
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) { serve_close(fd); return; }
            off += (size_t)w;
        }
    }
}

static int do_serve(void) {
    if (!o_listen) { fprintf(stderr, "serve needs --listen HOST:PORT\n"); return 1; }
    char host[128];
    const char *colon = strrchr(o_listen, ':');
    if (!colon || (size_t)(colon - o_listen) >= sizeof host) { fprintf(stderr, "bad --listen\n"); return 1; }
    memcpy(host, o_listen, (size_t)(colon - o_listen));
    host[colon - o_listen] = 0;
    char *h = host;
    if (h[0] == '[') { h++; h[strlen(h) - 1] = 0; }
    resolve(h, atoi(colon + 1));
    int ls = socket(g_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ls < 0 || bind(ls, (struct sockaddr *)&g_addr, g_addrlen) || listen(ls, 4096)) {
        perror("loadgen serve: bind/listen");
        return 1;
    }
    struct sockaddr_storage a; socklen_t al = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &al);
    int port = ntohs(a.ss_family == AF_INET ? ((struct sockaddr_in *)&a)->sin_port
                                            : ((struct sockaddr_in6 *)&a)->sin6_port);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    g_nconns = rl.rlim_cur > 1000000 ? 1000000 : (int)rl.rlim_cur;
    g_conns = calloc((size_t)g_nconns, sizeof *g_conns);
    pthread_attr_init(&g_tattr);
    pthread_attr_setstacksize(&g_tattr, 128 * 1024);
    pthread_attr_setdetachstate(&g_tattr, PTHREAD_CREATE_DETACHED);
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(g_ep, EPOLL_CTL_ADD, ls, &ev);
    printf("{\"ready\": true, \"port\": %d}\n", port);
    fflush(stdout);
    struct epoll_event evs[256];
    long long accepted = 0; /* bounded in count (--max-count, default 10M) as well as time (alarm) */
    for (;;) {
        if (accepted >= o_max) { fprintf(stderr, "loadgen serve: %lld connections, exiting\n", accepted); return 0; }
        int n = epoll_wait(g_ep, evs, 256, -1);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd != ls) { if (g_conns[fd]) serve_event(fd); continue; }
            for (int k = 0; k < 64; k++) {
                int cfd = accept4(ls, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (cfd < 0) break; /* EAGAIN, or EMFILE: retried on the next event */
                accepted++;
                if (cfd >= g_nconns) { close(cfd); continue; }
                set_nodelay(cfd);
                g_conns[cfd] = calloc(1, sizeof(sconn_t));
                struct epoll_event ce = {.events = EPOLLIN, .data.fd = cfd};
                epoll_ctl(g_ep, EPOLL_CTL_ADD, cfd, &ce);
                serve_event(cfd); /* the header often arrived with the handshake */
            }
        }
    }
}

/* ---------- bulk clients ---------- */
static int cmp_d(const void *a, const void *b);
typedef struct {
    int idx, up, fd;
    uint64_t count, moved, bad;
    int ok;
    double end;
} stream_t;

static pthread_barrier_t g_barrier;
static double g_t0;

static void *bulk_stream(void *arg) {
    stream_t *s = arg;
    unsigned char h[HDR];
    int fd = s->fd;
    pthread_barrier_wait(&g_barrier); /* all connected; main thread stamps g_t0 */
    pthread_barrier_wait(&g_barrier);
    if (fd < 0) { s->end = now_s(); return NULL; }
    uint32_t seed = (uint32_t)s->idx + 1;
    put_hdr(h, s->up ? "SINK" : "SRCE", seed, s->count);
    if (write_all(fd, h, HDR)) goto out;
    if (s->up) {
        uint64_t pos = 0;
        while (pos < s->count) {
            size_t n = s->count - pos < CHUNK ? (size_t)(s->count - pos) : CHUNK;
            ssize_t w = send(fd, pat_at(pos, seed), n, MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) goto out;
            pos += (uint64_t)w;
        }
        s->moved = pos;
        unsigned char rep[16];
        if (read_full(fd, rep, 16)) goto out;
        uint64_t got, bad;
        memcpy(&got, rep, 8);
        memcpy(&bad, rep + 8, 8);
        s->bad = bad;
        s->ok = (got == s->count && bad == 0);
    } else {
        unsigned char *buf = malloc(CHUNK);
        uint64_t pos = 0;
        while (buf && pos < s->count) {
            size_t want = s->count - pos < CHUNK ? (size_t)(s->count - pos) : CHUNK;
            ssize_t r = recv(fd, buf, want, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            if (memcmp(buf, pat_at(pos, seed), (size_t)r)) s->bad++;
            pos += (uint64_t)r;
        }
        free(buf);
        s->moved = pos;
        s->ok = (pos == s->count && s->bad == 0);
    }
out:
    s->end = now_s();
    close(fd);
    return NULL;
}

static int do_bulk(int up) {
    int k = o_streams;
    if (k < 1 || k > MAX_STREAMS || o_bytes <= 0) { fprintf(stderr, "bad --streams/--bytes\n"); return 1; }
    stream_t *st = calloc((size_t)k, sizeof *st);
    pthread_t *th = calloc((size_t)k, sizeof *th);
    pthread_barrier_init(&g_barrier, NULL, (unsigned)k + 1);
    uint64_t per = (uint64_t)o_bytes / (uint64_t)k;
    int connect_fail = 0;
    for (int i = 0; i < k; i++) {
        st[i].idx = i; st[i].up = up; st[i].count = per;
        st[i].fd = dial();
        if (st[i].fd < 0) connect_fail++;
        pthread_create(&th[i], NULL, bulk_stream, &st[i]);
    }
    pthread_barrier_wait(&g_barrier);
    g_t0 = now_s();
    pthread_barrier_wait(&g_barrier);
    uint64_t moved = 0, bad = 0;
    int failed = 0;
    double end = g_t0;
    for (int i = 0; i < k; i++) {
        pthread_join(th[i], NULL);
        moved += st[i].moved; bad += st[i].bad;
        if (!st[i].ok) failed++;
        if (st[i].end > end) end = st[i].end;
    }
    double secs = end - g_t0;
    /* Fairness: when the first and the median stream finished (the aggregate uses the last). */
    double *ends = malloc(sizeof(double) * (size_t)k);
    for (int i = 0; i < k; i++) ends[i] = st[i].end - g_t0;
    qsort(ends, (size_t)k, sizeof(double), cmp_d);
    printf("{\"mode\": \"%s\", \"streams\": %d, \"bytes\": %llu, \"expected\": %llu, \"seconds\": %.6f, "
           "\"mb_per_s\": %.3f, \"first_done_s\": %.6f, \"median_done_s\": %.6f, \"bad_chunks\": %llu, "
           "\"failed_streams\": %d, \"connect_failures\": %d, \"ok\": %s}\n",
           up ? "up" : "down", k, (unsigned long long)moved, (unsigned long long)(per * (uint64_t)k), secs,
           secs > 0 ? moved / secs / 1e6 : 0.0, ends[0], ends[k / 2], (unsigned long long)bad, failed, connect_fail,
           failed ? "false" : "true");
    return failed ? 2 : 0;
}

/* ---------- latency clients ---------- */
static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, long n, double p) {
    if (n <= 0) return 0;
    long i = (long)(p * (double)(n - 1) + 0.5);
    return v[i];
}

static int do_rtt(void) {
    int fd = dial();
    if (fd < 0) { printf("{\"mode\": \"rtt\", \"ok\": false, \"error\": \"connect\"}\n"); return 2; }
    int n = o_size < 1 ? 1 : (o_size > 65536 ? 65536 : o_size);
    unsigned char h[HDR], *out = malloc((size_t)n), *in = malloc((size_t)n);
    put_hdr(h, "ECHO", 0, 0);
    if (write_all(fd, h, HDR)) return 2;
    double *lat = malloc(sizeof(double) * (size_t)o_max);
    long cnt = 0, bad = 0;
    double t_end = 0;
    for (long i = -(long)o_warmup; i < o_max; i++) { /* warm-up round trips are not counted */
        if (i == 0) t_end = now_s() + o_seconds;
        memset(out, (int)(i & 0xff), (size_t)n);
        double t = now_s();
        if (write_all(fd, out, (size_t)n) || read_full(fd, in, (size_t)n)) { bad++; break; }
        double dt = now_s() - t;
        if (memcmp(in, out, (size_t)n)) bad++;
        if (i >= 0) {
            lat[cnt++] = dt * 1e6;
            if (now_s() >= t_end) break;
        }
    }
    close(fd);
    qsort(lat, (size_t)cnt, sizeof(double), cmp_d);
    double sum = 0;
    for (long i = 0; i < cnt; i++) sum += lat[i];
    printf("{\"mode\": \"rtt\", \"size\": %d, \"count\": %ld, \"p50_us\": %.1f, \"p99_us\": %.1f, "
           "\"mean_us\": %.1f, \"max_us\": %.1f, \"errors\": %ld, \"ok\": %s}\n",
           n, cnt, pct(lat, cnt, 0.5), pct(lat, cnt, 0.99), cnt ? sum / cnt : 0, cnt ? lat[cnt - 1] : 0,
           bad, (bad || !cnt) ? "false" : "true");
    return (bad || !cnt) ? 2 : 0;
}

static double *g_lat;
static atomic_long g_idx, g_err;
static double g_deadline;

/* One "new connection": connect, send header + 64 bytes, read the echo, close. */
static int one_conn(int *keep_fd) {
    unsigned char msg[HDR + 64], in[64];
    put_hdr(msg, "ECHO", 0, 0);
    for (int i = 0; i < 64; i++) msg[HDR + i] = (unsigned char)(i * 7 + 3);
    int fd = dial();
    if (fd < 0) return -1;
    if (write_all(fd, msg, sizeof msg) || read_full(fd, in, 64) || memcmp(in, msg + HDR, 64)) {
        close(fd);
        return -1;
    }
    if (keep_fd) *keep_fd = fd; else close(fd);
    return 0;
}

static void *conn_worker(void *arg) {
    (void)arg;
    while (now_s() < g_deadline && atomic_load(&g_err) < 100) {
        long i = atomic_fetch_add(&g_idx, 1);
        if (i >= o_max) break;
        double t = now_s();
        if (one_conn(NULL)) {
            atomic_fetch_add(&g_err, 1);
            g_lat[i] = -1;
            usleep(1000);
            continue;
        }
        g_lat[i] = (now_s() - t) * 1e6;
    }
    return NULL;
}

static int do_conn(void) {
    int c = o_conc < 1 ? 1 : (o_conc > MAX_STREAMS ? MAX_STREAMS : o_conc);
    g_lat = malloc(sizeof(double) * (size_t)o_max);
    pthread_t th[MAX_STREAMS];
    double t0 = now_s();
    g_deadline = t0 + o_seconds;
    for (int i = 0; i < c; i++) pthread_create(&th[i], NULL, conn_worker, NULL);
    for (int i = 0; i < c; i++) pthread_join(th[i], NULL);
    double secs = now_s() - t0;
    long n = atomic_load(&g_idx);
    if (n > o_max) n = o_max;
    long good = 0;
    for (long i = 0; i < n; i++) if (g_lat[i] >= 0) g_lat[good++] = g_lat[i];
    qsort(g_lat, (size_t)good, sizeof(double), cmp_d);
    long err = atomic_load(&g_err);
    printf("{\"mode\": \"conn\", \"concurrency\": %d, \"count\": %ld, \"seconds\": %.6f, \"per_s\": %.1f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f, \"errors\": %ld, \"ok\": %s}\n",
           c, good, secs, secs > 0 ? good / secs : 0, pct(g_lat, good, 0.5), pct(g_lat, good, 0.99), err,
           (err || !good) ? "false" : "true");
    return (err || !good) ? 2 : 0;
}

static int *g_fds;

static void *hold_worker(void *arg) {
    (void)arg;
    for (;;) {
        long i = atomic_fetch_add(&g_idx, 1);
        if (i >= o_count) break;
        if (one_conn(&g_fds[i])) { g_fds[i] = -1; atomic_fetch_add(&g_err, 1); }
    }
    return NULL;
}

static int do_hold(void) {
    int c = o_conc < 1 ? 1 : (o_conc > MAX_STREAMS ? MAX_STREAMS : o_conc);
    g_fds = malloc(sizeof(int) * (size_t)(o_count > 0 ? o_count : 1));
    pthread_t th[MAX_STREAMS];
    double t0 = now_s();
    for (int i = 0; i < c; i++) pthread_create(&th[i], NULL, hold_worker, NULL);
    for (int i = 0; i < c; i++) pthread_join(th[i], NULL);
    long err = atomic_load(&g_err);
    printf("{\"mode\": \"hold\", \"ready\": %lld, \"failed\": %ld, \"seconds\": %.3f}\n", o_count - err, err,
           now_s() - t0);
    fflush(stdout);
    char b[64];
    while (read(0, b, sizeof b) < 0 && errno == EINTR) {} /* hold until a line or EOF */
    for (long i = 0; i < o_count; i++) if (g_fds[i] >= 0) close(g_fds[i]);
    printf("{\"mode\": \"hold\", \"closed\": true}\n");
    return err ? 2 : 0;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen serve|up|down|rtt|conn|hold [--listen H:P] [--host H] [--port P]\n"
                    "  [--bytes N] [--streams K] [--seconds S] [--max-count M] [--concurrency C]\n"
                    "  [--count N] [--size B] [--warmup N] [--timeout S] [--socks NAME:PORT]\n");
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *mode = argv[1];
    static struct option opts[] = {
        {"listen", 1, 0, 'l'}, {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"bytes", 1, 0, 'b'},
        {"streams", 1, 0, 's'}, {"seconds", 1, 0, 'S'}, {"max-count", 1, 0, 'm'}, {"concurrency", 1, 0, 'c'},
        {"count", 1, 0, 'n'}, {"size", 1, 0, 'z'}, {"timeout", 1, 0, 't'}, {"warmup", 1, 0, 'w'},
        {"socks", 1, 0, 'x'}, {0, 0, 0, 0}};
    int ch, max_given = 0;
    optind = 2;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'l': o_listen = optarg; break;
        case 'h': o_host = optarg; break;
        case 'p': o_port = atoi(optarg); break;
        case 'b': o_bytes = atoll(optarg); break;
        case 's': o_streams = atoi(optarg); break;
        case 'S': o_seconds = atof(optarg); break;
        case 'm': o_max = atoll(optarg); max_given = 1; break;
        case 'c': o_conc = atoi(optarg); break;
        case 'n': o_count = atoll(optarg); break;
        case 'z': o_size = atoi(optarg); break;
        case 't': o_timeout = atoi(optarg); break;
        case 'w': o_warmup = atoi(optarg); break;
        case 'x': o_socks = optarg; break;
        default: usage();
        }
    }
    if (o_max < 1) o_max = 1;
    if (!strcmp(mode, "serve") && !max_given) o_max = 10000000;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    pat_init();
    int is_serve = !strcmp(mode, "serve");
    alarm((unsigned)(o_timeout > 0 ? o_timeout : (is_serve ? 3600 : 120))); /* hard bound on every run */
    if (is_serve) return do_serve();
    resolve(o_host, o_port);
    if (!strcmp(mode, "up")) return do_bulk(1);
    if (!strcmp(mode, "down")) return do_bulk(0);
    if (!strcmp(mode, "rtt")) return do_rtt();
    if (!strcmp(mode, "conn")) return do_conn();
    if (!strcmp(mode, "hold")) return do_hold();
    usage();
    return 1;
}
