/* trio-relay: the guest end of trio_qemu's relay channel.
 *
 * Usage: trio-relay PORT-NAME      (the virtio-serial port's name, e.g. org.trio-qemu.relay)
 *
 * One virtio-serial port carries any number of streams at once: TCP connections this
 * program makes inside the guest, and commands it runs with their stdin and stdout as the
 * stream. The wire format (frames, credits, the hello/sync handshake) is described in
 * trio_qemu/relay/_protocol.py, the host end; this file follows it. One poll() loop serves
 * the port, every stream's fds and a signalfd for SIGCHLD; nothing here blocks.
 *
 * Memory is bounded: each stream holds at most WINDOW bytes from the host (the host sends
 * no more than the credit granted; the buffer's pages are touched only as they are used),
 * and streams are read only while the port's output backlog is under OUT_HIGH and the host
 * has granted credit (host_window per stream to start with, from its sync).
 *
 * Built statically by trio_qemu.guest (cc -static -Os -s); MIT licence, like trio_qemu.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define VERSION 1
#define HDR 12
#define MAX_PAYLOAD 65536
#define WINDOW (256 * 1024) /* what the host may send a stream before it is granted more */
#define CREDIT_STEP (64 * 1024)
#define DATA_CHUNK (32768 - HDR) /* one frame per 32 KiB port write */
#define PORT_BUF (512 * 1024)
#define OUT_HIGH (256 * 1024)
#define ERR_MAX 4096
#define MAX_STREAMS 1024

static const char HELLO_MAGIC[16] = "trio-relay hello";
static const char SYNC_MAGIC[16] = "trio-relay synch";
static const char AGAIN_MAGIC[16] = "trio-relay again";

enum { K_TCP, K_EXEC };

struct stream {
    uint32_t id;
    int kind;
    int fd;       /* TCP: the socket; exec: the child's stdout (we read) */
    int in_fd;    /* TCP: the socket; exec: the child's stdin (we write) */
    int err_fd;   /* exec: the child's stderr (we read), else -1 */
    pid_t pid;    /* exec: the child, 0 once reaped */
    int status;   /* exec: its exit status once reaped (128+N for signal N) */
    int connecting;
    unsigned char *in; /* WINDOW bytes: data from the host not written yet */
    size_t in_off, in_len, uncredited;
    int host_eof;  /* the host sent EOF: shut our write side once `in` is drained */
    int wr_done;   /* write side shut (or broken: input is then dropped) */
    uint32_t credit; /* bytes we may still send the host */
    int rd_eof;    /* EOF sent to the host */
    int host_closed;
    int dead;      /* freed at the end of the loop iteration */
    char err[ERR_MAX];
    size_t err_len;
    struct stream *next;
};

static struct stream *streams;
static int nstreams;
static int port = -1;
static int port_hup;
static unsigned char *out;
static size_t out_off, out_len, out_cap;
static unsigned char pin[PORT_BUF]; /* from the port: pin[pin_off, pin_len) not parsed yet */
static size_t pin_off, pin_len;
static int hunting = 1;
static unsigned char nonce[8];
static uint32_t host_window = 256 * 1024; /* a stream's first credit: the host's sync says */

/* --- helpers ------------------------------------------------------------------------- */

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) {
        fputs("trio-relay: out of memory\n", stderr);
        exit(1);
    }
    return p;
}

static void set_nonblock(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Room for `need` more bytes at the end of the output buffer. */
static unsigned char *out_reserve(size_t need) {
    if (out_off == out_len)
        out_off = out_len = 0;
    if (out_len + need > out_cap && out_off > 0) {
        memmove(out, out + out_off, out_len - out_off);
        out_len -= out_off;
        out_off = 0;
    }
    if (out_len + need > out_cap) {
        size_t cap = out_cap ? out_cap : 2 * OUT_HIGH;
        while (cap < out_len + need)
            cap *= 2;
        unsigned char *bigger = realloc(out, cap);
        if (!bigger) {
            fputs("trio-relay: out of memory\n", stderr);
            exit(1);
        }
        out = bigger;
        out_cap = cap;
    }
    return out + out_len;
}

static void header(unsigned char *p, int type, uint32_t id, uint32_t len) {
    p[0] = (unsigned char)type;
    p[1] = p[2] = p[3] = 0;
    put32(p + 4, id);
    put32(p + 8, len);
}

static void emit(int type, uint32_t id, const void *a, size_t alen, const void *b, size_t blen) {
    unsigned char *p = out_reserve(HDR + alen + blen);
    header(p, type, id, (uint32_t)(alen + blen));
    if (alen)
        memcpy(p + HDR, a, alen);
    if (blen)
        memcpy(p + HDR + alen, b, blen);
    out_len += HDR + alen + blen;
}

/* A frame of a 32-bit number and a text (open failures, resets, exits). */
static void emit_num(int type, uint32_t id, uint32_t num, const char *text, size_t len) {
    unsigned char n[4];
    put32(n, num);
    emit(type, id, n, 4, text, len);
}

static void emit_errno(int type, uint32_t id, int err) {
    const char *text = strerror(err);
    emit_num(type, id, (uint32_t)err, text, strlen(text));
}

static void new_nonce(void) {
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, nonce, sizeof nonce) != (ssize_t)sizeof nonce) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint32_t a = (uint32_t)ts.tv_nsec ^ (uint32_t)getpid() << 16, b = (uint32_t)ts.tv_sec;
        put32(nonce, a);
        put32(nonce + 4, b ^ nonce[0]);
    }
    if (fd >= 0)
        close(fd);
}

static void send_hello(void) {
    unsigned char p[16 + 4 + 4 + 8 + 4];
    memcpy(p, HELLO_MAGIC, 16);
    put32(p + 16, VERSION);
    put32(p + 20, (uint32_t)getpid());
    memcpy(p + 24, nonce, 8);
    put32(p + 32, WINDOW);
    emit('H', 0, p, sizeof p, NULL, 0);
}

/* --- streams ------------------------------------------------------------------------- */

static struct stream *find(uint32_t id) {
    for (struct stream *s = streams; s; s = s->next)
        if (s->id == id && !s->dead)
            return s;
    return NULL;
}

static struct stream *new_stream(uint32_t id, int kind) {
    struct stream *s = xmalloc(sizeof *s);
    memset(s, 0, sizeof *s);
    s->id = id;
    s->kind = kind;
    s->fd = s->in_fd = s->err_fd = -1;
    s->in = xmalloc(WINDOW);
    s->credit = host_window;
    s->next = streams;
    streams = s;
    nstreams++;
    return s;
}

static void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* Close everything of `s` and mark it for freeing; an exec child is killed. */
static void drop(struct stream *s) {
    if (s->kind == K_TCP) {
        close_fd(&s->fd);
        s->in_fd = -1;
    } else {
        close_fd(&s->fd);
        close_fd(&s->in_fd);
        close_fd(&s->err_fd);
        if (s->pid > 0)
            kill(-s->pid, SIGKILL);
    }
    s->dead = 1;
}

static void free_dead(void) {
    struct stream **link = &streams;
    while (*link) {
        struct stream *s = *link;
        if (s->dead) {
            *link = s->next;
            free(s->in);
            free(s);
            nstreams--;
        } else {
            link = &s->next;
        }
    }
}

/* A command's stream ends once its stdout and stderr are at EOF (or the host closed it) and
 * it has been reaped: then its exit status and stderr go to the host. */
static void exec_maybe_done(struct stream *s) {
    if (s->kind != K_EXEC || s->dead || s->pid != 0)
        return;
    if (!s->host_closed && (s->fd >= 0 || s->err_fd >= 0))
        return;
    emit_num('Z', s->id, (uint32_t)s->status, s->err, s->err_len);
    drop(s);
}

static void reset_all(void) {
    for (struct stream *s = streams; s; s = s->next)
        if (!s->dead)
            drop(s);
}

static void resync(void) {
    reset_all();
    new_nonce();
    send_hello();
    hunting = 1;
}

static void grant(struct stream *s, int force) {
    if (s->uncredited >= CREDIT_STEP || (force && s->uncredited)) {
        unsigned char n[4];
        put32(n, (uint32_t)s->uncredited);
        emit('W', s->id, n, 4, NULL, 0);
        s->uncredited = 0;
    }
}

/* The stream broke in the guest (a TCP reset): tell the host, forget it. */
static void broken(struct stream *s, int err) {
    emit_errno('R', s->id, err);
    drop(s);
}

/* Write what the host sent to the socket or the child's stdin; shut the write side at the
 * host's EOF once everything is written. */
static void flush_in(struct stream *s) {
    while (!s->wr_done && s->in_off < s->in_len && s->in_fd >= 0) {
        ssize_t n = write(s->in_fd, s->in + s->in_off, s->in_len - s->in_off);
        if (n > 0) {
            s->in_off += (size_t)n;
            s->uncredited += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            break;
        if (s->kind == K_TCP) {
            broken(s, n < 0 ? errno : EPIPE);
            return;
        }
        /* The command stopped reading: drop its input (still credited, so the host never
         * waits for it); its exit status tells the rest. */
        s->wr_done = 1;
        close_fd(&s->in_fd);
    }
    if (s->wr_done && s->in_off < s->in_len) {
        s->uncredited += s->in_len - s->in_off;
        s->in_off = s->in_len;
    }
    int drained = s->in_off == s->in_len;
    if (drained) {
        s->in_off = s->in_len = 0;
        if (s->host_eof && !s->wr_done) {
            s->wr_done = 1;
            if (s->kind == K_TCP)
                shutdown(s->fd, SHUT_WR);
            else
                close_fd(&s->in_fd);
        }
    }
    grant(s, drained); /* all of it once drained: the host may use a smaller window */
}

static void open_tcp(uint32_t id, const unsigned char *p, uint32_t len) {
    char host[64];
    struct sockaddr_storage addr;
    socklen_t alen;
    memset(&addr, 0, sizeof addr);
    if (len < 3 || len - 2 >= sizeof host) {
        emit_errno('F', id, EINVAL);
        return;
    }
    unsigned port_no = (unsigned)p[0] << 8 | p[1];
    memcpy(host, p + 2, len - 2);
    host[len - 2] = 0;
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    struct sockaddr_in *v4 = (struct sockaddr_in *)&addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port_no);
        alen = sizeof *v4;
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port_no);
        alen = sizeof *v6;
    } else {
        static const char msg[] = "not a numeric IP address";
        emit_num('F', id, EINVAL, msg, sizeof msg - 1);
        return;
    }
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        emit_errno('F', id, errno);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct stream *s = new_stream(id, K_TCP);
    s->fd = s->in_fd = fd;
    if (connect(fd, (struct sockaddr *)&addr, alen) == 0) {
        emit('O', id, NULL, 0, NULL, 0);
    } else if (errno == EINPROGRESS) {
        s->connecting = 1;
    } else {
        emit_errno('F', id, errno);
        drop(s);
    }
}

static void connected(struct stream *s) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == EINPROGRESS || err == EALREADY)
        return;
    s->connecting = 0;
    if (err) {
        emit_errno('F', s->id, err);
        drop(s);
    } else {
        emit('O', s->id, NULL, 0, NULL, 0);
    }
}

static void open_exec(uint32_t id, const unsigned char *p, uint32_t len) {
    int in[2], outp[2], errp[2];
    char *cmd = xmalloc(len + 1);
    memcpy(cmd, p, len);
    cmd[len] = 0;
    if (pipe2(in, O_CLOEXEC) < 0) {
        emit_errno('F', id, errno);
        free(cmd);
        return;
    }
    if (pipe2(outp, O_CLOEXEC) < 0) {
        emit_errno('F', id, errno);
        close(in[0]), close(in[1]), free(cmd);
        return;
    }
    if (pipe2(errp, O_CLOEXEC) < 0) {
        emit_errno('F', id, errno);
        close(in[0]), close(in[1]), close(outp[0]), close(outp[1]), free(cmd);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setsid();
        dup2(in[0], 0);
        dup2(outp[1], 1);
        dup2(errp[1], 2);
        if (chdir("/") < 0)
            _exit(127);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int err = errno;
    free(cmd);
    close(in[0]), close(outp[1]), close(errp[1]);
    if (pid < 0) {
        close(in[1]), close(outp[0]), close(errp[0]);
        emit_errno('F', id, err);
        return;
    }
    struct stream *s = new_stream(id, K_EXEC);
    s->pid = pid;
    s->in_fd = in[1];
    s->fd = outp[0];
    s->err_fd = errp[0];
    set_nonblock(s->in_fd);
    set_nonblock(s->fd);
    set_nonblock(s->err_fd);
    emit('O', id, NULL, 0, NULL, 0);
}

static void host_close(struct stream *s) {
    if (s->kind == K_TCP) {
        flush_in(s); /* what fits in the socket now; the kernel sends it after close */
        if (!s->dead)
            drop(s);
        return;
    }
    s->host_closed = 1;
    close_fd(&s->fd);
    close_fd(&s->in_fd);
    close_fd(&s->err_fd);
    if (s->pid > 0)
        kill(-s->pid, SIGKILL);
    exec_maybe_done(s);
}

/* --- frames from the host ------------------------------------------------------------ */

static void frame(int type, uint32_t id, const unsigned char *p, uint32_t len) {
    struct stream *s;
    switch (type) {
    case 'Q': /* a new host: start over */
        resync();
        return;
    case 'S': /* a repeated sync: nothing to do */
        return;
    case 'T':
    case 'X':
        if (find(id) || nstreams >= MAX_STREAMS) {
            emit_errno('F', id, find(id) ? EEXIST : EMFILE);
            return;
        }
        if (type == 'T')
            open_tcp(id, p, len);
        else
            open_exec(id, p, len);
        return;
    case 'D':
        s = find(id);
        if (!s || s->connecting || s->host_eof)
            return; /* a stream already gone here: the host learns it from its R/Z */
        if (s->wr_done) {
            s->uncredited += len;
            grant(s, 1);
            return;
        }
        if (len > WINDOW - (s->in_len - s->in_off)) {
            broken(s, EPROTO); /* more than the credit granted */
            return;
        }
        if (s->in_len + len > WINDOW) {
            memmove(s->in, s->in + s->in_off, s->in_len - s->in_off);
            s->in_len -= s->in_off;
            s->in_off = 0;
        }
        memcpy(s->in + s->in_len, p, len);
        s->in_len += len;
        flush_in(s);
        return;
    case 'E':
        s = find(id);
        if (s && !s->host_eof) {
            s->host_eof = 1;
            flush_in(s);
        }
        return;
    case 'W':
        s = find(id);
        if (s && len == 4) {
            uint64_t c = (uint64_t)s->credit + get32(p);
            s->credit = c > 0x7fffffff ? 0x7fffffff : (uint32_t)c;
        }
        return;
    case 'C':
        s = find(id);
        if (s)
            host_close(s);
        return;
    default:
        resync(); /* not our protocol: start over */
        return;
    }
}

/* The first offset in pin[from, pin_len) where `pat` starts, or -1. */
static long search(size_t from, const unsigned char *pat, size_t plen) {
    if (pin_len < from + plen)
        return -1;
    void *hit = memmem(pin + from, pin_len - from, pat, plen);
    return hit ? (long)((unsigned char *)hit - pin) : -1;
}

static void parse(void) {
    size_t pos = pin_off;
    unsigned char sync[HDR + 24], again[HDR + 16]; /* a sync's window follows its nonce */
    for (;;) {
        if (hunting) {
            /* Skip everything up to the sync answering our hello (stale bytes meant for
             * an earlier relay come first), or a host's request to start over. */
            header(sync, 'S', 0, 28);
            memcpy(sync + HDR, SYNC_MAGIC, 16);
            memcpy(sync + HDR + 16, nonce, 8);
            header(again, 'Q', 0, 16);
            memcpy(again + HDR, AGAIN_MAGIC, 16);
            long a = search(pos, sync, sizeof sync), b = search(pos, again, sizeof again);
            if (a < 0 && b < 0) {
                if (pin_len - pos > sizeof sync)
                    pos = pin_len - sizeof sync;
                break;
            }
            if (a >= 0 && (b < 0 || a < b)) {
                if ((size_t)a + sizeof sync + 4 > pin_len) {
                    pos = (size_t)a; /* its window is still to come */
                    break;
                }
                uint32_t w = get32(pin + a + sizeof sync);
                host_window = w < 4096 ? 4096 : w > (64u << 20) ? (64u << 20) : w;
                hunting = 0;
                pos = (size_t)a + sizeof sync + 4;
            } else {
                /* Not synced yet: nothing to drop; say the same hello again (a new nonce
                 * would make the host drop what it opened after our first). */
                pos = (size_t)b + sizeof again;
                send_hello();
            }
            continue;
        }
        if (pin_len - pos < HDR)
            break;
        const unsigned char *h = pin + pos;
        uint32_t len = get32(h + 8);
        if (h[1] || h[2] || h[3] || len > MAX_PAYLOAD) {
            resync();
            pos++;
            continue;
        }
        if (pin_len - pos < HDR + len)
            break;
        frame(h[0], get32(h + 4), h + HDR, len);
        pos += HDR + len;
    }
    /* What is left stays where it is: a read gives at most 4 KiB, and moving a partial
     * frame to the front after each would copy it many times over. */
    pin_off = pos;
    if (pin_off == pin_len)
        pin_off = pin_len = 0;
}

/* --- the loop ------------------------------------------------------------------------ */

static void read_port(void) {
    for (;;) {
        if (pin_len == sizeof pin) { /* full: move the unparsed rest (< one frame) to the front */
            if (pin_off == 0) {          /* cannot be a frame: start over */
                pin_len = 0;
                resync();
            }
            memmove(pin, pin + pin_off, pin_len - pin_off);
            pin_len -= pin_off;
            pin_off = 0;
        }
        ssize_t n = read(port, pin + pin_len, sizeof pin - pin_len);
        if (n > 0) {
            pin_len += (size_t)n;
            parse();
            continue;
        }
        if (n == 0)
            port_hup = 1; /* nobody on the host side: look again later */
        break;
    }
}

static void write_port(void) {
    while (out_off < out_len) {
        ssize_t n = write(port, out + out_off, out_len - out_off);
        if (n > 0) {
            out_off += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n < 0 && errno == ENODEV) {
            fputs("trio-relay: the port is gone\n", stderr);
            exit(1);
        }
        return;
    }
    out_off = out_len = 0;
}

/* Read from the socket or the child's stdout into DATA frames, within the host's credit. */
static void read_stream(struct stream *s) {
    for (int i = 0; i < 4 && !s->dead && s->fd >= 0 && !s->rd_eof; i++) {
        if (s->credit == 0 || out_len - out_off >= OUT_HIGH)
            return;
        size_t want = s->credit < DATA_CHUNK ? s->credit : DATA_CHUNK;
        unsigned char *p = out_reserve(HDR + want);
        ssize_t n = read(s->fd, p + HDR, want);
        if (n > 0) {
            header(p, 'D', s->id, (uint32_t)n);
            out_len += HDR + (size_t)n;
            s->credit -= (uint32_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n < 0 && s->kind == K_TCP) {
            broken(s, errno);
            return;
        }
        s->rd_eof = 1;
        emit('E', s->id, NULL, 0, NULL, 0);
        if (s->kind == K_EXEC) {
            close_fd(&s->fd);
            exec_maybe_done(s);
        }
        return;
    }
}

static void read_stderr(struct stream *s) {
    char buf[4096];
    for (;;) {
        ssize_t n = read(s->err_fd, buf, sizeof buf);
        if (n > 0) {
            size_t keep = ERR_MAX - s->err_len;
            if (keep > (size_t)n)
                keep = (size_t)n;
            memcpy(s->err + s->err_len, buf, keep);
            s->err_len += keep;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        close_fd(&s->err_fd);
        exec_maybe_done(s);
        return;
    }
}

static void reap(int sigfd) {
    struct signalfd_siginfo info;
    while (read(sigfd, &info, sizeof info) > 0) {
    }
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (struct stream *s = streams; s; s = s->next) {
            if (s->kind == K_EXEC && s->pid == pid) {
                s->pid = 0;
                s->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                if (!s->dead)
                    exec_maybe_done(s);
                break;
            }
        }
    }
}

/* The port's device (/dev/vportNpM) by its name, or -1. */
static int open_port(const char *name) {
    DIR *dir = opendir("/sys/class/virtio-ports");
    if (!dir)
        return -1;
    struct dirent *e;
    int fd = -1;
    while (fd < 0 && (e = readdir(dir))) {
        char path[512], got[256];
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        int nfd = open(path, O_RDONLY | O_CLOEXEC);
        if (nfd < 0)
            continue;
        ssize_t n = read(nfd, got, sizeof got - 1);
        close(nfd);
        if (n <= 0)
            continue;
        got[n] = 0;
        got[strcspn(got, "\n")] = 0;
        if (strcmp(got, name) == 0) {
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
        }
    }
    closedir(dir);
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fputs("usage: trio-relay PORT-NAME\n", stderr);
        return 2;
    }
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0)
            open("/dev/null", O_RDWR);
    signal(SIGPIPE, SIG_IGN);

    /* virtio_console learns port names from QEMU asynchronously and offers nothing to
     * wait on: look every 20 ms for 20 s. Without the port, sleep for good rather than
     * exit (init would start us again at once). */
    struct timespec tick = {0, 20 * 1000 * 1000};
    for (int i = 0; i < 1000 && (port = open_port(argv[1])) < 0; i++)
        nanosleep(&tick, NULL);
    if (port < 0)
        for (;;)
            pause();

    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigfd < 0) {
        perror("trio-relay: signalfd");
        return 1;
    }

    new_nonce();
    send_hello();

    struct pollfd *fds = NULL;
    struct { struct stream *s; int role; } *who = NULL;
    size_t cap = 0;
    for (;;) {
        size_t need = 2 + 3 * (size_t)nstreams, n = 0;
        if (need > cap) {
            cap = need * 2;
            fds = realloc(fds, cap * sizeof *fds);
            who = realloc(who, cap * sizeof *who);
            if (!fds || !who) {
                fputs("trio-relay: out of memory\n", stderr);
                return 1;
            }
        }
        fds[n] = (struct pollfd){sigfd, POLLIN, 0};
        who[n].s = NULL, who[n++].role = 0;
        /* While nobody is on the host side the port reports POLLHUP at once: leave it out
         * of the poll for a second. */
        short pev = (short)(POLLIN | (out_off < out_len ? POLLOUT : 0));
        fds[n] = (struct pollfd){port_hup ? -1 : port, pev, 0};
        who[n].s = NULL, who[n++].role = 1;
        int room = out_len - out_off < OUT_HIGH;
        for (struct stream *s = streams; s; s = s->next) {
            if (s->dead)
                continue;
            if (s->kind == K_TCP) {
                short ev = 0;
                if (s->connecting)
                    ev = POLLOUT;
                else {
                    if (!s->rd_eof && s->credit && room)
                        ev |= POLLIN;
                    if (s->in_off < s->in_len && !s->wr_done)
                        ev |= POLLOUT;
                }
                if (ev) {
                    fds[n] = (struct pollfd){s->fd, ev, 0};
                    who[n].s = s, who[n++].role = 0;
                }
                continue;
            }
            if (s->fd >= 0 && !s->rd_eof && s->credit && room) {
                fds[n] = (struct pollfd){s->fd, POLLIN, 0};
                who[n].s = s, who[n++].role = 0;
            }
            if (s->in_fd >= 0 && s->in_off < s->in_len) {
                fds[n] = (struct pollfd){s->in_fd, POLLOUT, 0};
                who[n].s = s, who[n++].role = 1;
            }
            if (s->err_fd >= 0) {
                fds[n] = (struct pollfd){s->err_fd, POLLIN, 0};
                who[n].s = s, who[n++].role = 2;
            }
        }
        int ready = poll(fds, n, port_hup ? 1000 : -1);
        if (ready < 0 && errno != EINTR) {
            perror("trio-relay: poll");
            return 1;
        }
        if (ready == 0)
            port_hup = 0;
        for (size_t i = 0; ready > 0 && i < n; i++) {
            short re = fds[i].revents;
            if (!re)
                continue;
            struct stream *s = who[i].s;
            if (!s) {
                if (who[i].role == 0)
                    reap(sigfd);
                else {
                    if (re & (POLLIN | POLLHUP | POLLERR))
                        read_port();
                    if (re & POLLOUT)
                        write_port();
                }
                continue;
            }
            if (s->dead)
                continue;
            if (s->kind == K_TCP && s->connecting) {
                connected(s);
                continue;
            }
            if (who[i].role == 2) {
                read_stderr(s);
                continue;
            }
            if (s->kind == K_EXEC && who[i].role == 1) {
                flush_in(s);
                continue;
            }
            if (re & POLLOUT)
                flush_in(s);
            if (!s->dead && (re & (POLLIN | POLLHUP | POLLERR)))
                read_stream(s);
        }
        free_dead();
        write_port();
    }
}
