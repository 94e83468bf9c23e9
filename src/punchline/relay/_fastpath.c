/*
 * punchline.relay._fastpath: the TURN relay's data plane (RFC 8656 ChannelData over UDP).
 *
 * The TURN state machine stays in Python. Once Python has an allocation with a bound channel
 * whose permission is alive, it calls Forwarder.bind() and from then on the datagrams of that
 * channel never become Python objects: a batch of datagrams is read with recvmmsg(), each
 * sender is looked up in a hash table, and the forwarded ones go out with sendmmsg(), one call
 * per destination socket. Only what the fast path does not know (STUN requests, unbound
 * channels, peers with only a permission, garbage) goes to Python. forwarder.PyForwarder is the
 * same thing in pure Python (pump mode only); the tests run both and expect identical
 * behaviour.
 *
 * Two ways to drive it:
 *
 * - Pump mode: pump_client(fd) / pump_relay(fd), called from the asyncio loop when a socket is
 *   readable, read that socket and return what is for Python as [(bytes, (host, port))].
 * - Threaded mode: watch(fd, kind) every socket, start() a thread of our own that owns the
 *   reading (epoll_wait, recvmmsg, sendmmsg), and drain() what is for Python as
 *   [(kind, fd, bytes, (host, port))] whenever notify_fd() (an eventfd) is readable. The
 *   thread never takes the GIL and never touches a Python object or the Python allocators
 *   (with tracemalloc on, even PyMem_Raw* would take the GIL), so its memory is all allocated
 *   beforehand, under the GIL.
 *
 * One mutex guards the tables, the counters, the watched set and the queue for Python. The
 * thread holds it for one batch of one socket (recvmmsg, lookups, sendmmsg), so a binding it
 * found cannot be freed under it, and once unwatch() or unbind_relay() returned it cannot read
 * or send on that fd any more: Python may close it. Python takes the mutex while holding the
 * GIL; that cannot deadlock because the thread never needs the GIL, and nothing that could run
 * Python code (creating GC-tracked objects, raising) happens while Python holds the mutex.
 *
 * In pump mode Python code can run inside a pump when creating the result objects triggers the
 * garbage collector (a finalizer could call unbind() or even pump again), so a pump touches no
 * binding after it lets go of the mutex, and a re-entrant pump is refused.
 *
 * All memory comes from PyMem_* (under the GIL), so tracemalloc sees it (the leak test relies
 * on that).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: its pyconfig.h defines _GNU_SOURCE, which recvmmsg/sendmmsg need */

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64         /* datagrams per recvmmsg(); a pump's budget spans several batches */
#define SLOT_HEAD 4      /* free bytes before each received datagram, for a ChannelData header */
#define SLOT_DATA 65536  /* more than any UDP payload (65527), so nothing is ever truncated */
#define SLOT (SLOT_HEAD + SLOT_DATA)
#define CHANNEL_HEADER 4
#define MAX_RATE (1LL << 48) /* bytes/s; far beyond any link, keeps the double arithmetic exact */
#define MAX_BUDGET INT_MAX

/* Threaded mode */
#define KIND_CLIENT 1
#define KIND_RELAY 2
#define FD_TURN (4 * BATCH)  /* datagrams the thread reads from one socket before the next */
#define EPOLL_EVENTS 256     /* readiness events per epoll_wait() */
#define SLOW_ENTRIES 4096    /* datagrams waiting for Python at most... */
#define SLOW_BYTES (4u << 20) /* ...and bytes of them (a power of two, >= 2 * SLOT_DATA) */
#define DEFAULT_DRAIN 1024

/* ---------------------------------------------------------------------------------------------
 * Keys and hash tables
 * ------------------------------------------------------------------------------------------- */

/* One lookup key, hashed and compared as raw bytes, so it must have no padding and be zeroed
 * before it is filled. The client table uses (listening fd, client address, channel), the peer
 * table (relayed fd, peer address) with channel 0. scope_id keeps link-local senders apart
 * (Python sees them as "fe80::1%eth0", which never equals a bound address either). */
typedef struct {
    int32_t fd;
    uint16_t channel;
    uint16_t port; /* network byte order, as in the sockaddr */
    uint32_t family;
    uint32_t scope_id;
    uint8_t addr[16]; /* IPv4 in the first 4 bytes */
} addr_key;

_Static_assert(sizeof(addr_key) == 32, "addr_key must have no padding");

typedef union {
    struct sockaddr sa;
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
} sockaddr_any;

/* A chained hash table of intrusive nodes: a binding carries one node per table, so a binding
 * is one allocation and removing it from a table needs no lookup of its own. */
typedef struct node {
    struct node *next;
    Py_hash_t hash;
    addr_key key;
} node;

typedef struct {
    node **buckets;
    size_t mask; /* bucket count - 1; the count is a power of two */
    size_t count;
} table;

static Py_hash_t
key_hash(const addr_key *key)
{
    /* SipHash with the interpreter's random secret (what hashes bytes objects): senders are
     * chosen by strangers, so a predictable hash would let them lengthen chains at will. */
    return _Py_HashBytes(key, sizeof *key);
}

static int
table_init(table *t)
{
    t->mask = 15;
    t->count = 0;
    t->buckets = PyMem_Calloc(t->mask + 1, sizeof(node *));
    return t->buckets ? 0 : -1;
}

static node *
table_find(const table *t, const addr_key *key, Py_hash_t hash)
{
    for (node *n = t->buckets[(size_t)hash & t->mask]; n; n = n->next) {
        if (n->hash == hash && memcmp(&n->key, key, sizeof *key) == 0) {
            return n;
        }
    }
    return NULL;
}

/* Doubles the buckets when there are more nodes than buckets, keeping chains short on average.
 * Returns -1 only when the memory for that is missing; the table is unchanged then. */
static int
table_insert(table *t, node *n)
{
    if (t->count + 1 > t->mask + 1) {
        size_t size = (t->mask + 1) * 2;
        node **buckets = PyMem_Calloc(size, sizeof(node *));
        if (!buckets) {
            return -1;
        }
        for (size_t i = 0; i <= t->mask; i++) {
            node *m = t->buckets[i];
            while (m) {
                node *next = m->next;
                size_t b = (size_t)m->hash & (size - 1);
                m->next = buckets[b];
                buckets[b] = m;
                m = next;
            }
        }
        PyMem_Free(t->buckets);
        t->buckets = buckets;
        t->mask = size - 1;
    }
    size_t b = (size_t)n->hash & t->mask;
    n->next = t->buckets[b];
    t->buckets[b] = n;
    t->count++;
    return 0;
}

static void
table_remove(table *t, node *n)
{
    node **link = &t->buckets[(size_t)n->hash & t->mask];
    while (*link && *link != n) {
        link = &(*link)->next;
    }
    if (*link) {
        *link = n->next;
        t->count--;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Bindings
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    double tokens; /* bytes that may pass now; at most one second's worth */
    uint64_t last_ns;
} token_bucket;

typedef struct {
    uint64_t packets, bytes;
} flow_count;

/* One bound channel, both directions. Byte counts and the rate limit count application data,
 * without the 4-byte ChannelData header. */
typedef struct binding {
    node by_client; /* key: client_fd, channel, client address */
    node by_peer;   /* key: relay_fd, 0, peer address */
    struct binding *relay_prev, *relay_next; /* all bindings on one relayed socket */
    sockaddr_any client_sa, peer_sa;
    socklen_t client_salen, peer_salen;
    uint64_t rate; /* bytes/s in each direction; 0 = unlimited */
    token_bucket to_peer_bucket, to_client_bucket;
    flow_count to_peer, to_client;
    uint64_t dropped_rate, send_errors;
} binding;

#define BINDING_OF(n, member) ((binding *)((char *)(n) - offsetof(binding, member)))

typedef struct {
    flow_count to_peer, to_client;
    uint64_t slow_packets, slow_dropped, dropped_rate, send_errors;
} totals;

/* One datagram to send, pointing into the receive buffer (no copy). */
typedef struct {
    int fd;
    binding *b;
    size_t payload; /* application bytes, for the counters */
} pending;

/* The buffers of one reader (the pumps have one, the thread another). */
typedef struct {
    uint8_t *buf; /* BATCH slots of SLOT bytes */
    struct mmsghdr rx[BATCH];
    struct iovec rx_iov[BATCH];
    sockaddr_any rx_addr[BATCH];
    pending tx[BATCH];
    struct iovec tx_iov[BATCH];
    struct mmsghdr tx_msg[BATCH]; /* one destination fd's share of tx, in order */
    int tx_index[BATCH];
    int slow[BATCH]; /* indices of the datagrams for Python, in arrival order */
    int nslow;
} batch;

/* A datagram waiting for Python (threaded mode). fd -1: its socket was unwatched since. */
typedef struct {
    uint64_t start; /* position of its bytes in the ring; they never wrap around its end */
    uint32_t len;
    int fd;
    int kind;
    sockaddr_any addr;
} slow_entry;

/* FIFO of datagrams for Python: SLOW_ENTRIES entries over a byte ring of SLOW_BYTES.
 * Positions only grow (mod SLOW_BYTES gives the offset); the used bytes are
 * [read_pos, write_pos), and both go back to 0 whenever the queue empties. */
typedef struct {
    slow_entry *entries;
    uint8_t *bytes;
    size_t head, count;
    uint64_t read_pos, write_pos;
} slow_queue;

enum { STOPPED, RUNNING, STOPPING };

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock; /* everything below except the pump state and the thread handle */
    int lock_ready;
    table clients, peers;
    binding **relay_heads; /* indexed by relay fd: fds are small, dense integers */
    size_t relay_cap;
    totals total;
    /* Pump mode, under the GIL. */
    int busy;
    batch *pump; /* allocated at the first pump */
    /* Threaded mode, set up at the first watch(), start() or notify_fd(). */
    int threaded_ready;
    int epfd, wake_fd, notify_fd;
    uint8_t *watched; /* indexed by fd: 0, KIND_CLIENT or KIND_RELAY */
    size_t watched_cap;
    batch *reader; /* the thread's */
    slow_queue slow;
    int signaled; /* notify_fd has been written since Python last emptied the queue */
    int stop_requested;
    int state; /* STOPPED, RUNNING, STOPPING: under the GIL */
    pthread_t thread;
} Forwarder;

static void
lock(Forwarder *self)
{
    pthread_mutex_lock(&self->lock);
}

static void
unlock(Forwarder *self)
{
    pthread_mutex_unlock(&self->lock);
}

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void
bucket_fill(token_bucket *bk, uint64_t rate, uint64_t now)
{
    bk->tokens = (double)rate;
    bk->last_ns = now;
}

/* Token bucket: refills at `rate` bytes/s up to one second's worth (the allowed burst). */
static int
bucket_take(token_bucket *bk, uint64_t rate, size_t bytes, uint64_t now)
{
    if (rate == 0) {
        return 1;
    }
    if (now > bk->last_ns) {
        bk->tokens += (double)(now - bk->last_ns) * (double)rate / 1e9;
        if (bk->tokens > (double)rate) {
            bk->tokens = (double)rate;
        }
        bk->last_ns = now;
    }
    if (bk->tokens < (double)bytes) {
        return 0;
    }
    bk->tokens -= (double)bytes;
    return 1;
}

static void
relay_unlink(Forwarder *self, binding *b)
{
    if (b->relay_prev) {
        b->relay_prev->relay_next = b->relay_next;
    }
    else {
        self->relay_heads[b->by_peer.key.fd] = b->relay_next;
    }
    if (b->relay_next) {
        b->relay_next->relay_prev = b->relay_prev;
    }
}

static void
binding_free(Forwarder *self, binding *b)
{
    table_remove(&self->clients, &b->by_client);
    table_remove(&self->peers, &b->by_peer);
    relay_unlink(self, b);
    PyMem_Free(b);
}

/* ---------------------------------------------------------------------------------------------
 * Argument parsing. The Python implementation checks exactly the same things: TypeError for a
 * wrong type, ValueError for a wrong value.
 * ------------------------------------------------------------------------------------------- */

static int
get_int(PyObject *obj, const char *what, long long lo, long long hi, long long *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || value < lo || value > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in %lld..%lld", what, lo, hi);
        return -1;
    }
    *out = value;
    return 0;
}

static int
get_fd(PyObject *obj, const char *what, int *fd)
{
    long long value;
    if (get_int(obj, what, 0, INT_MAX, &value) < 0) {
        return -1;
    }
    *fd = (int)value;
    return 0;
}

static int
get_channel(PyObject *obj, uint16_t *channel)
{
    long long value;
    if (get_int(obj, "channel", 0x4000, 0x7FFF, &value) < 0) {
        return -1;
    }
    *channel = (uint16_t)value;
    return 0;
}

/* (host, port) with a numeric IPv4 or IPv6 host -> sockaddr. No name resolution: the control
 * plane only ever has addresses it received. */
static int
get_addr(PyObject *obj, const char *what, sockaddr_any *sa, socklen_t *salen)
{
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2) {
        PyErr_Format(PyExc_TypeError, "%s must be a (host, port) tuple", what);
        return -1;
    }
    PyObject *host = PyTuple_GET_ITEM(obj, 0);
    if (!PyUnicode_Check(host)) {
        PyErr_Format(PyExc_TypeError, "%s host must be a str", what);
        return -1;
    }
    long long port;
    if (get_int(PyTuple_GET_ITEM(obj, 1), "port", 0, 65535, &port) < 0) {
        return -1;
    }
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(host, &size);
    if (!text) {
        return -1;
    }
    memset(sa, 0, sizeof *sa);
    if ((size_t)size == strlen(text) && inet_pton(AF_INET, text, &sa->in4.sin_addr) == 1) {
        sa->in4.sin_family = AF_INET;
        sa->in4.sin_port = htons((uint16_t)port);
        *salen = sizeof sa->in4;
        return 0;
    }
    if ((size_t)size == strlen(text) && inet_pton(AF_INET6, text, &sa->in6.sin6_addr) == 1) {
        sa->in6.sin6_family = AF_INET6;
        sa->in6.sin6_port = htons((uint16_t)port);
        *salen = sizeof sa->in6;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "%s host %R is not a numeric IPv4 or IPv6 address", what, host);
    return -1;
}

/* The key for (fd, sender, channel); -1 for an address family we never bind (cannot happen
 * on the UDP sockets we are given, but costs nothing to check). */
static int
make_key(addr_key *key, int fd, const sockaddr_any *sa, uint16_t channel)
{
    memset(key, 0, sizeof *key);
    key->fd = fd;
    key->channel = channel;
    if (sa->sa.sa_family == AF_INET) {
        key->family = AF_INET;
        key->port = sa->in4.sin_port;
        memcpy(key->addr, &sa->in4.sin_addr, 4);
        return 0;
    }
    if (sa->sa.sa_family == AF_INET6) {
        key->family = AF_INET6;
        key->port = sa->in6.sin6_port;
        key->scope_id = sa->in6.sin6_scope_id;
        memcpy(key->addr, &sa->in6.sin6_addr, 16);
        return 0;
    }
    return -1;
}

/* The fd must be a UDP socket of the address's family: sending IPv6 addresses on an IPv4
 * socket would only fail later, packet by packet. */
static int
check_socket(int fd, const char *what, int family)
{
    int domain = 0, type = 0, protocol = 0;
    socklen_t len = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0
        || (len = sizeof type, getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        || (len = sizeof protocol,
            getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) < 0)) {
        PyErr_Format(PyExc_ValueError, "%s %d is not a socket", what, fd);
        return -1;
    }
    if (type != SOCK_DGRAM || protocol != IPPROTO_UDP
        || (domain != AF_INET && domain != AF_INET6)) {
        PyErr_Format(PyExc_ValueError, "%s %d is not a UDP socket", what, fd);
        return -1;
    }
    if (domain != family) {
        PyErr_Format(PyExc_ValueError, "%s %d is not an %s socket", what, fd,
                     family == AF_INET ? "IPv4" : "IPv6");
        return -1;
    }
    return 0;
}

static int
client_key_from_args(PyObject *fd_obj, PyObject *addr_obj, PyObject *channel_obj, addr_key *key,
                     sockaddr_any *sa, socklen_t *salen)
{
    int fd;
    uint16_t channel;
    if (get_fd(fd_obj, "client_fd", &fd) < 0 || get_addr(addr_obj, "client_addr", sa, salen) < 0
        || get_channel(channel_obj, &channel) < 0) {
        return -1;
    }
    make_key(key, fd, sa, channel);
    return 0;
}

static binding *
find_client(Forwarder *self, const addr_key *key)
{
    node *n = table_find(&self->clients, key, key_hash(key));
    return n ? BINDING_OF(n, by_client) : NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Forwarder methods: bind, unbind, unbind_relay, stats, counters
 * ------------------------------------------------------------------------------------------- */

/* The tables' side of bind(), under the lock: -1 when memory is missing, and then the forwarder
 * is as it was. */
static int
bind_locked(Forwarder *self, const addr_key *client_key, Py_hash_t client_hash,
            const sockaddr_any *client_sa, socklen_t client_salen, const addr_key *peer_key,
            Py_hash_t peer_hash, const sockaddr_any *peer_sa, socklen_t peer_salen,
            uint64_t rate, uint64_t now)
{
    node *cn = table_find(&self->clients, client_key, client_hash);
    node *pn = table_find(&self->peers, peer_key, peer_hash);
    binding *old_client = cn ? BINDING_OF(cn, by_client) : NULL;
    binding *old_peer = pn ? BINDING_OF(pn, by_peer) : NULL;
    if (old_client && old_client == old_peer) {
        /* The same channel bound again (ChannelBind refresh): keep its counters and just
         * take the rate, refilling the buckets if the rate changed. */
        if (old_client->rate != rate) {
            old_client->rate = rate;
            bucket_fill(&old_client->to_peer_bucket, rate, now);
            bucket_fill(&old_client->to_client_bucket, rate, now);
        }
        return 0;
    }

    /* Make room in the per-fd list array before changing anything, so a MemoryError leaves
     * the forwarder as it was. */
    int relay_fd = peer_key->fd;
    if ((size_t)relay_fd >= self->relay_cap) {
        size_t cap = self->relay_cap ? self->relay_cap : 64;
        while (cap <= (size_t)relay_fd) {
            cap *= 2;
        }
        binding **heads = PyMem_Realloc(self->relay_heads, cap * sizeof(binding *));
        if (!heads) {
            return -1;
        }
        memset(heads + self->relay_cap, 0, (cap - self->relay_cap) * sizeof(binding *));
        self->relay_heads = heads;
        self->relay_cap = cap;
    }
    binding *b = PyMem_Calloc(1, sizeof *b);
    if (!b) {
        return -1;
    }
    b->by_client.key = *client_key;
    b->by_client.hash = client_hash;
    b->by_peer.key = *peer_key;
    b->by_peer.hash = peer_hash;
    b->client_sa = *client_sa;
    b->client_salen = client_salen;
    b->peer_sa = *peer_sa;
    b->peer_salen = peer_salen;
    b->rate = rate;
    bucket_fill(&b->to_peer_bucket, b->rate, now);
    bucket_fill(&b->to_client_bucket, b->rate, now);
    /* A channel rebound to another peer, or a peer moved to another channel: the control
     * plane decided; the tables keep one binding per key either way. */
    if (old_client) {
        binding_free(self, old_client);
    }
    if (old_peer) {
        binding_free(self, old_peer);
    }
    if (table_insert(&self->clients, &b->by_client) < 0) {
        PyMem_Free(b);
        return -1;
    }
    if (table_insert(&self->peers, &b->by_peer) < 0) {
        table_remove(&self->clients, &b->by_client);
        PyMem_Free(b);
        return -1;
    }
    b->relay_next = self->relay_heads[relay_fd];
    if (b->relay_next) {
        b->relay_next->relay_prev = b;
    }
    self->relay_heads[relay_fd] = b;
    return 0;
}

static PyObject *
Forwarder_bind(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client_fd",      "client_addr", "channel", "relay_fd", "peer_addr",
                             "rate_bytes_per_s", NULL};
    PyObject *client_fd_obj, *client_addr_obj, *channel_obj, *relay_fd_obj, *peer_addr_obj;
    PyObject *rate_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|O:bind", kwlist, &client_fd_obj,
                                     &client_addr_obj, &channel_obj, &relay_fd_obj,
                                     &peer_addr_obj, &rate_obj)) {
        return NULL;
    }
    addr_key client_key, peer_key;
    sockaddr_any client_sa, peer_sa;
    socklen_t client_salen, peer_salen;
    int relay_fd;
    long long rate = 0;
    if (client_key_from_args(client_fd_obj, client_addr_obj, channel_obj, &client_key,
                             &client_sa, &client_salen) < 0
        || get_fd(relay_fd_obj, "relay_fd", &relay_fd) < 0
        || get_addr(peer_addr_obj, "peer_addr", &peer_sa, &peer_salen) < 0
        || (rate_obj && get_int(rate_obj, "rate_bytes_per_s", 0, MAX_RATE, &rate) < 0)
        || check_socket(client_key.fd, "client_fd", client_sa.sa.sa_family) < 0
        || check_socket(relay_fd, "relay_fd", peer_sa.sa.sa_family) < 0) {
        return NULL;
    }
    make_key(&peer_key, relay_fd, &peer_sa, 0);
    Py_hash_t client_hash = key_hash(&client_key), peer_hash = key_hash(&peer_key);
    uint64_t now = now_ns();

    lock(self);
    int failed = bind_locked(self, &client_key, client_hash, &client_sa, client_salen, &peer_key,
                             peer_hash, &peer_sa, peer_salen, (uint64_t)rate, now);
    unlock(self);
    if (failed) {
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

/* The (client_fd, client_addr, channel) arguments of unbind() and stats(); `format` is
 * "OOO:name" so that errors name the method. */
static int
parse_client_key(PyObject *args, PyObject *kwds, const char *format, addr_key *key)
{
    static char *kwlist[] = {"client_fd", "client_addr", "channel", NULL};
    PyObject *fd_obj, *addr_obj, *channel_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, format, kwlist, &fd_obj, &addr_obj,
                                     &channel_obj)) {
        return -1;
    }
    sockaddr_any sa;
    socklen_t salen;
    return client_key_from_args(fd_obj, addr_obj, channel_obj, key, &sa, &salen);
}

static PyObject *
Forwarder_unbind(Forwarder *self, PyObject *args, PyObject *kwds)
{
    addr_key key;
    if (parse_client_key(args, kwds, "OOO:unbind", &key) < 0) {
        return NULL;
    }
    lock(self);
    binding *b = find_client(self, &key);
    if (b) {
        binding_free(self, b);
    }
    unlock(self);
    Py_RETURN_NONE;
}

static PyObject *
Forwarder_unbind_relay(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"relay_fd", NULL};
    PyObject *fd_obj;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:unbind_relay", kwlist, &fd_obj)
        || get_fd(fd_obj, "relay_fd", &fd) < 0) {
        return NULL;
    }
    lock(self);
    while ((size_t)fd < self->relay_cap && self->relay_heads[fd]) {
        binding_free(self, self->relay_heads[fd]);
    }
    unlock(self);
    Py_RETURN_NONE;
}

/* Builds a dict from alternating key strings and uint64 values; the list ends with NULL. */
static PyObject *
count_dict(const char *first, ...)
{
    PyObject *dict = PyDict_New();
    if (!dict) {
        return NULL;
    }
    va_list ap;
    va_start(ap, first);
    for (const char *name = first; name; name = va_arg(ap, const char *)) {
        PyObject *value = PyLong_FromUnsignedLongLong(va_arg(ap, uint64_t));
        if (!value || PyDict_SetItemString(dict, name, value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(dict);
            va_end(ap);
            return NULL;
        }
        Py_DECREF(value);
    }
    va_end(ap);
    return dict;
}

static PyObject *
Forwarder_stats(Forwarder *self, PyObject *args, PyObject *kwds)
{
    addr_key key;
    if (parse_client_key(args, kwds, "OOO:stats", &key) < 0) {
        return NULL;
    }
    lock(self);
    binding *b = find_client(self, &key);
    binding copy;
    memset(&copy, 0, sizeof copy);
    if (b) {
        copy = *b;
    }
    unlock(self);
    if (!b) {
        Py_RETURN_NONE;
    }
    return count_dict("to_peer_packets", copy.to_peer.packets, "to_peer_bytes",
                      copy.to_peer.bytes, "to_client_packets", copy.to_client.packets,
                      "to_client_bytes", copy.to_client.bytes, "dropped_rate",
                      copy.dropped_rate, "send_errors", copy.send_errors, NULL);
}

static PyObject *
Forwarder_counters(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    lock(self);
    totals t = self->total; /* one consistent snapshot */
    unlock(self);
    return count_dict("fast_to_peer_packets", t.to_peer.packets, "fast_to_peer_bytes",
                      t.to_peer.bytes, "fast_to_client_packets", t.to_client.packets,
                      "fast_to_client_bytes", t.to_client.bytes, "slow_packets", t.slow_packets,
                      "slow_dropped", t.slow_dropped, "dropped_rate", t.dropped_rate,
                      "send_errors", t.send_errors, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * Reading and forwarding one batch: the same code for the pumps and the thread
 * ------------------------------------------------------------------------------------------- */

static void
count_sent(Forwarder *self, const pending *p, int to_client)
{
    flow_count *mine = to_client ? &p->b->to_client : &p->b->to_peer;
    flow_count *all = to_client ? &self->total.to_client : &self->total.to_peer;
    mine->packets++;
    mine->bytes += p->payload;
    all->packets++;
    all->bytes += p->payload;
}

static void
count_error(Forwarder *self, const pending *p)
{
    p->b->send_errors++;
    self->total.send_errors++;
}

/* Sends the queued datagrams, one sendmmsg() run per destination fd, keeping the order within
 * each fd (so a flow is never reordered). The O(n^2) grouping is at most 64*64 comparisons and
 * needs no allocation. Errors are counted, never raised: a full socket buffer (EAGAIN,
 * ENOBUFS) drops the rest of that fd's share without trying, since retrying at once would only
 * spend a system call per datagram to fail again (PyForwarder does try each; the counts come
 * out the same); any other error (e.g. an invalid destination) belongs to one datagram, so
 * only that one is skipped. */
static void
flush(Forwarder *self, batch *bt, int ntx, int to_client)
{
    uint64_t done_mask[(BATCH + 63) / 64] = {0};
    for (int i = 0; i < ntx; i++) {
        if (done_mask[i / 64] & (1ULL << (i % 64))) {
            continue;
        }
        int fd = bt->tx[i].fd, k = 0;
        for (int j = i; j < ntx; j++) {
            if (bt->tx[j].fd == fd && !(done_mask[j / 64] & (1ULL << (j % 64)))) {
                binding *b = bt->tx[j].b;
                struct msghdr *h = &bt->tx_msg[k].msg_hdr;
                memset(h, 0, sizeof *h);
                h->msg_name = to_client ? &b->client_sa : &b->peer_sa;
                h->msg_namelen = to_client ? b->client_salen : b->peer_salen;
                h->msg_iov = &bt->tx_iov[j];
                h->msg_iovlen = 1;
                bt->tx_index[k++] = j;
                done_mask[j / 64] |= 1ULL << (j % 64);
            }
        }
        int off = 0;
        while (off < k) {
            int sent = sendmmsg(fd, &bt->tx_msg[off], (unsigned int)(k - off), MSG_DONTWAIT);
            if (sent < 0) {
                if (errno == EINTR) {
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                    for (; off < k; off++) {
                        count_error(self, &bt->tx[bt->tx_index[off]]);
                    }
                    break;
                }
                count_error(self, &bt->tx[bt->tx_index[off]]);
                off++;
                continue;
            }
            for (int s = 0; s < sent; s++, off++) {
                count_sent(self, &bt->tx[bt->tx_index[off]], to_client);
            }
        }
    }
}

/* Decides the fate of received datagram i: 1 = queued in tx, 0 = dropped by the rate limit,
 * -1 = for Python. */
static int
classify(Forwarder *self, batch *bt, int fd, int i, int to_client, uint64_t now, int ntx)
{
    uint8_t *slot = bt->buf + (size_t)i * SLOT;
    uint8_t *data = slot + SLOT_HEAD;
    size_t len = bt->rx[i].msg_len;
    addr_key key;
    binding *b;
    pending *p = &bt->tx[ntx];
    struct iovec *iov = &bt->tx_iov[ntx];

    if (bt->rx[i].msg_hdr.msg_flags & MSG_TRUNC) {
        return -1;
    }
    if (!to_client) {
        /* From a client: ChannelData (first byte 0x40-0x7F: channels 0x4000-0x7FFF, RFC 5766's
         * range, which coturn's own client still uses) whose length fits in the datagram;
         * what follows the data is padding. */
        if (len < CHANNEL_HEADER || (data[0] & 0xC0) != 0x40) {
            return -1;
        }
        uint16_t channel = (uint16_t)(data[0] << 8 | data[1]);
        size_t length = (size_t)(data[2] << 8 | data[3]);
        if (CHANNEL_HEADER + length > len
            || make_key(&key, fd, &bt->rx_addr[i], channel) < 0) {
            return -1;
        }
        node *n = table_find(&self->clients, &key, key_hash(&key));
        if (!n) {
            return -1;
        }
        b = BINDING_OF(n, by_client);
        if (!bucket_take(&b->to_peer_bucket, b->rate, length, now)) {
            goto dropped;
        }
        p->fd = b->by_peer.key.fd;
        p->payload = length;
        iov->iov_base = data + CHANNEL_HEADER;
        iov->iov_len = length;
    }
    else {
        /* From a peer with a channel: the datagram becomes ChannelData, its header written
         * into the slot's spare bytes in front of it, so nothing is copied. */
        if (len > 0xFFFF || make_key(&key, fd, &bt->rx_addr[i], 0) < 0) {
            return -1;
        }
        node *n = table_find(&self->peers, &key, key_hash(&key));
        if (!n) {
            return -1;
        }
        b = BINDING_OF(n, by_peer);
        if (!bucket_take(&b->to_client_bucket, b->rate, len, now)) {
            goto dropped;
        }
        uint16_t channel = b->by_client.key.channel;
        slot[0] = (uint8_t)(channel >> 8);
        slot[1] = (uint8_t)channel;
        slot[2] = (uint8_t)(len >> 8);
        slot[3] = (uint8_t)len;
        p->fd = b->by_client.key.fd;
        p->payload = len;
        iov->iov_base = slot;
        iov->iov_len = CHANNEL_HEADER + len;
    }
    p->b = b;
    return 1;

dropped:
    b->dropped_rate++;
    self->total.dropped_rate++;
    return 0;
}

/* Under the lock: reads up to `want` datagrams from fd, forwards what the tables know, sends,
 * and lists the rest in bt->slow. Returns how many were read, or -1 with errno set (EAGAIN
 * when there was nothing). */
static int
forward_batch(Forwarder *self, batch *bt, int fd, int to_client, unsigned int want)
{
    for (unsigned int i = 0; i < want; i++) {
        struct msghdr *h = &bt->rx[i].msg_hdr;
        bt->rx_iov[i].iov_base = bt->buf + (size_t)i * SLOT + SLOT_HEAD;
        bt->rx_iov[i].iov_len = SLOT_DATA;
        h->msg_name = &bt->rx_addr[i];
        h->msg_namelen = sizeof bt->rx_addr[i];
        h->msg_iov = &bt->rx_iov[i];
        h->msg_iovlen = 1;
        h->msg_control = NULL;
        h->msg_controllen = 0;
        h->msg_flags = 0;
    }
    bt->nslow = 0;
    int n;
    do {
        n = recvmmsg(fd, bt->rx, want, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        return n;
    }
    uint64_t now = now_ns();
    int ntx = 0;
    for (int i = 0; i < n; i++) {
        int fate = classify(self, bt, fd, i, to_client, now, ntx);
        if (fate > 0) {
            ntx++;
        }
        else if (fate < 0) {
            bt->slow[bt->nslow++] = i;
        }
    }
    flush(self, bt, ntx, to_client);
    return n;
}

static batch *
batch_new(void)
{
    batch *bt = PyMem_Calloc(1, sizeof *bt);
    if (!bt) {
        return NULL;
    }
    bt->buf = PyMem_Malloc((size_t)BATCH * SLOT);
    if (!bt->buf) {
        PyMem_Free(bt);
        return NULL;
    }
    return bt;
}

static void
batch_free(batch *bt)
{
    if (bt) {
        PyMem_Free(bt->buf);
        PyMem_Free(bt);
    }
}

/* (host, port) as Python's socket module reports it, scope included. */
static PyObject *
addr_tuple(const sockaddr_any *sa)
{
    char text[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    unsigned port;
    if (sa->sa.sa_family == AF_INET) {
        inet_ntop(AF_INET, &sa->in4.sin_addr, text, sizeof text);
        port = ntohs(sa->in4.sin_port);
    }
    else if (sa->sa.sa_family == AF_INET6) {
        inet_ntop(AF_INET6, &sa->in6.sin6_addr, text, sizeof text);
        port = ntohs(sa->in6.sin6_port);
        if (sa->in6.sin6_scope_id) {
            size_t len = strlen(text);
            char name[IF_NAMESIZE];
            if (if_indextoname(sa->in6.sin6_scope_id, name)) {
                snprintf(text + len, sizeof text - len, "%%%s", name);
            }
            else {
                snprintf(text + len, sizeof text - len, "%%%u", sa->in6.sin6_scope_id);
            }
        }
    }
    else {
        text[0] = '\0';
        port = 0;
    }
    return Py_BuildValue("(sI)", text, port);
}

/* ---------------------------------------------------------------------------------------------
 * Pump mode
 * ------------------------------------------------------------------------------------------- */

static PyObject *
pump(Forwarder *self, PyObject *args, PyObject *kwds, int to_client)
{
    static char *kwlist[] = {"fd", "budget", NULL};
    PyObject *fd_obj, *budget_obj = NULL;
    int fd;
    long long budget = 256;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, to_client ? "O|O:pump_relay" : "O|O:pump_client",
                                     kwlist, &fd_obj, &budget_obj)
        || get_fd(fd_obj, "fd", &fd) < 0
        || (budget_obj && get_int(budget_obj, "budget", 1, MAX_BUDGET, &budget) < 0)) {
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder pump called re-entrantly");
        return NULL;
    }
    if (!self->pump && !(self->pump = batch_new())) {
        return PyErr_NoMemory();
    }
    batch *bt = self->pump;
    PyObject *slow = PyList_New(0);
    if (!slow) {
        return NULL;
    }
    self->busy = 1;
    long long done = 0;
    while (done < budget) {
        unsigned int want = (unsigned int)(budget - done < BATCH ? budget - done : BATCH);

        /* Phase 1, under the lock and with no Python objects: read, classify, send. */
        lock(self);
        int n = forward_batch(self, bt, fd, to_client, want);
        int error = errno;
        if (n > 0) {
            self->total.slow_packets += (uint64_t)bt->nslow;
        }
        unlock(self);
        if (n < 0) {
            if (error == EBADF || error == ENOTSOCK) {
                PyErr_Format(PyExc_ValueError, "fd %d is not a socket", fd);
                goto fail;
            }
            /* EAGAIN: drained. Anything else (a queued ICMP error, ENOMEM) is a network
             * condition: stop here; the loop calls us again when there is more to read. */
            break;
        }
        done += n;

        /* Phase 2: hand the rest to Python. From here on bindings may change under us (see
         * the top of the file), so only the receive buffers are read. */
        for (int s = 0; s < bt->nslow; s++) {
            int i = bt->slow[s];
            PyObject *data = PyBytes_FromStringAndSize(
                (const char *)bt->buf + (size_t)i * SLOT + SLOT_HEAD,
                (Py_ssize_t)bt->rx[i].msg_len);
            PyObject *addr = data ? addr_tuple(&bt->rx_addr[i]) : NULL;
            PyObject *item = addr ? PyTuple_Pack(2, data, addr) : NULL;
            Py_XDECREF(data);
            Py_XDECREF(addr);
            if (!item || PyList_Append(slow, item) < 0) {
                Py_XDECREF(item);
                goto fail;
            }
            Py_DECREF(item);
        }
        if ((unsigned int)n < want) {
            break; /* the socket had less than we asked for: drained, skip the EAGAIN call */
        }
    }
    self->busy = 0;
    return slow;

fail:
    self->busy = 0;
    Py_DECREF(slow);
    return NULL;
}

static PyObject *
Forwarder_pump_client(Forwarder *self, PyObject *args, PyObject *kwds)
{
    return pump(self, args, kwds, 0);
}

static PyObject *
Forwarder_pump_relay(Forwarder *self, PyObject *args, PyObject *kwds)
{
    return pump(self, args, kwds, 1);
}

/* ---------------------------------------------------------------------------------------------
 * Threaded mode: the queue for Python
 * ------------------------------------------------------------------------------------------- */

static uint8_t *
slow_data(slow_queue *q, const slow_entry *e)
{
    return q->bytes + (size_t)(e->start & (SLOW_BYTES - 1));
}

/* Under the lock: copies one datagram in, or returns -1 when the queue is full. */
static int
slow_push(slow_queue *q, int kind, int fd, const sockaddr_any *addr, const uint8_t *data,
          size_t len)
{
    if (q->count == SLOW_ENTRIES) {
        return -1;
    }
    uint64_t start = q->write_pos;
    size_t off = (size_t)(start & (SLOW_BYTES - 1));
    if (off + len > SLOW_BYTES) {
        start += SLOW_BYTES - off; /* keep each datagram contiguous: skip to the ring's start */
    }
    if (start + len - q->read_pos > SLOW_BYTES) {
        return -1;
    }
    slow_entry *e = &q->entries[(q->head + q->count) % SLOW_ENTRIES];
    e->start = start;
    e->len = (uint32_t)len;
    e->fd = fd;
    e->kind = kind;
    e->addr = *addr;
    memcpy(slow_data(q, e), data, len);
    q->write_pos = start + len;
    q->count++;
    return 0;
}

/* Under the lock: forgets the oldest datagram (its bytes are free from now on). */
static void
slow_pop(slow_queue *q)
{
    const slow_entry *e = &q->entries[q->head];
    q->read_pos = e->start + e->len;
    q->head = (q->head + 1) % SLOW_ENTRIES;
    q->count--;
    if (q->count == 0) {
        q->head = 0;
        q->read_pos = q->write_pos = 0;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Threaded mode: the thread
 * ------------------------------------------------------------------------------------------- */

/* Reads one readable socket for up to FD_TURN datagrams, a batch at a time, taking the lock
 * for each batch; returns 1 when something was queued for Python. */
static int
serve_fd(Forwarder *self, int fd)
{
    batch *bt = self->reader;
    int queued = 0;
    for (int done = 0; done < FD_TURN;) {
        lock(self);
        int kind = (size_t)fd < self->watched_cap ? self->watched[fd] : 0;
        if (!kind) { /* unwatched since epoll_wait() reported it: the fd is not ours now */
            unlock(self);
            break;
        }
        int n = forward_batch(self, bt, fd, kind == KIND_RELAY, BATCH);
        for (int s = 0; n > 0 && s < bt->nslow; s++) {
            int i = bt->slow[s];
            if (slow_push(&self->slow, kind, fd, &bt->rx_addr[i],
                          bt->buf + (size_t)i * SLOT + SLOT_HEAD, bt->rx[i].msg_len) == 0) {
                self->total.slow_packets++;
                queued = 1;
            }
            else {
                self->total.slow_dropped++;
            }
        }
        if (queued && !self->signaled) {
            uint64_t one = 1;
            self->signaled = 1;
            if (write(self->notify_fd, &one, sizeof one) < 0) {
                /* cannot happen: the counter is far from overflowing */
            }
        }
        unlock(self);
        if (n < BATCH) {
            break; /* drained (or an error, which the next readiness retries) */
        }
        done += n;
    }
    return queued;
}

static void *
thread_main(void *arg)
{
    Forwarder *self = arg;
    struct epoll_event events[EPOLL_EVENTS];
    for (;;) {
        int n = epoll_wait(self->epfd, events, EPOLL_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return NULL; /* EBADF/EINVAL: cannot happen while the forwarder lives */
        }
        for (int e = 0; e < n; e++) {
            int fd = events[e].data.fd;
            if (fd == self->wake_fd) {
                uint64_t value;
                if (read(self->wake_fd, &value, sizeof value) < 0) {
                    /* EAGAIN: another reader took it; the flag below is what counts */
                }
                lock(self);
                int stop = self->stop_requested;
                unlock(self);
                if (stop) {
                    return NULL;
                }
                continue;
            }
            serve_fd(self, fd);
        }
    }
}

static void
close_fds(Forwarder *self)
{
    int *fds[] = {&self->epfd, &self->wake_fd, &self->notify_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0) {
            close(*fds[i]);
        }
        *fds[i] = -1;
    }
}

/* Sets up what threaded mode needs, once: the epoll set, both eventfds, the thread's buffers
 * and the queue. All under the GIL, so the thread never allocates. */
static int
ensure_threaded(Forwarder *self)
{
    if (self->threaded_ready) {
        return 0;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->epfd < 0 || self->wake_fd < 0 || self->notify_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = self->wake_fd};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    self->reader = batch_new();
    self->slow.entries = PyMem_Calloc(SLOW_ENTRIES, sizeof(slow_entry));
    self->slow.bytes = PyMem_Malloc(SLOW_BYTES);
    if (!self->reader || !self->slow.entries || !self->slow.bytes) {
        PyErr_NoMemory();
        goto fail;
    }
    self->threaded_ready = 1;
    return 0;

fail:
    close_fds(self);
    batch_free(self->reader);
    self->reader = NULL;
    PyMem_Free(self->slow.entries);
    PyMem_Free(self->slow.bytes);
    self->slow.entries = NULL;
    self->slow.bytes = NULL;
    return -1;
}

/* Asks the thread to end and waits for it. The caller holds the GIL, which the thread never
 * needs; releasing it while waiting is only a courtesy to other Python threads. */
static void
join_thread(Forwarder *self, int release_gil)
{
    pthread_t thread = self->thread;
    self->state = STOPPING;
    lock(self);
    self->stop_requested = 1;
    unlock(self);
    uint64_t one = 1;
    if (write(self->wake_fd, &one, sizeof one) < 0) {
        /* cannot happen: the counter is far from overflowing */
    }
    if (release_gil) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(thread, NULL);
        Py_END_ALLOW_THREADS
    }
    else {
        pthread_join(thread, NULL);
    }
    self->state = STOPPED;
}

/* ---------------------------------------------------------------------------------------------
 * Threaded mode: the methods
 * ------------------------------------------------------------------------------------------- */

static PyObject *kind_names[3]; /* index KIND_CLIENT, KIND_RELAY: "client", "relay" */

static PyObject *
Forwarder_watch(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "kind", NULL};
    PyObject *fd_obj, *kind_obj;
    int fd, kind = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:watch", kwlist, &fd_obj, &kind_obj)
        || get_fd(fd_obj, "fd", &fd) < 0) {
        return NULL;
    }
    if (!PyUnicode_Check(kind_obj)) {
        PyErr_Format(PyExc_TypeError, "kind must be a str, not %.100s",
                     Py_TYPE(kind_obj)->tp_name);
        return NULL;
    }
    if (PyUnicode_CompareWithASCIIString(kind_obj, "client") == 0) {
        kind = KIND_CLIENT;
    }
    else if (PyUnicode_CompareWithASCIIString(kind_obj, "relay") == 0) {
        kind = KIND_RELAY;
    }
    else {
        PyErr_Format(PyExc_ValueError, "kind must be 'client' or 'relay', not %R", kind_obj);
        return NULL;
    }
    int domain = 0;
    socklen_t len = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0) {
        PyErr_Format(PyExc_ValueError, "fd %d is not a socket", fd);
        return NULL;
    }
    if (check_socket(fd, "fd", domain == AF_INET6 ? AF_INET6 : AF_INET) < 0
        || ensure_threaded(self) < 0) {
        return NULL;
    }
    int error = 0;
    lock(self);
    if ((size_t)fd >= self->watched_cap) {
        size_t cap = self->watched_cap ? self->watched_cap : 256;
        while (cap <= (size_t)fd) {
            cap *= 2;
        }
        uint8_t *watched = PyMem_Realloc(self->watched, cap);
        if (!watched) {
            error = ENOMEM;
            goto done;
        }
        memset(watched + self->watched_cap, 0, cap - self->watched_cap);
        self->watched = watched;
        self->watched_cap = cap;
    }
    /* ADD, or MOD when epoll still has the fd (closed and reused without unwatch). */
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0
        && (errno != EEXIST || epoll_ctl(self->epfd, EPOLL_CTL_MOD, fd, &ev) < 0)) {
        error = errno;
        goto done;
    }
    self->watched[fd] = (uint8_t)kind;
done:
    unlock(self);
    if (error) {
        errno = error;
        return error == ENOMEM ? PyErr_NoMemory() : PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
Forwarder_unwatch(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", NULL};
    PyObject *fd_obj;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:unwatch", kwlist, &fd_obj)
        || get_fd(fd_obj, "fd", &fd) < 0) {
        return NULL;
    }
    if (!self->threaded_ready) {
        Py_RETURN_NONE;
    }
    /* The thread reads an fd only under the lock and only while it is watched, so once this
     * returns the fd is the caller's alone. */
    lock(self);
    if ((size_t)fd < self->watched_cap && self->watched[fd]) {
        self->watched[fd] = 0;
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL); /* EBADF if already closed: fine */
    }
    /* Datagrams it read before and Python has not taken yet are dropped: the fd number may
     * soon name another socket. */
    slow_queue *q = &self->slow;
    for (size_t i = 0; i < q->count; i++) {
        slow_entry *e = &q->entries[(q->head + i) % SLOW_ENTRIES];
        if (e->fd == fd) {
            e->fd = -1;
        }
    }
    unlock(self);
    Py_RETURN_NONE;
}

static PyObject *
Forwarder_start(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->state == RUNNING) {
        Py_RETURN_NONE;
    }
    if (self->state == STOPPING) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder.stop() is in progress");
        return NULL;
    }
    if (ensure_threaded(self) < 0) {
        return NULL;
    }
    uint64_t value;
    if (read(self->wake_fd, &value, sizeof value) < 0) {
        /* EAGAIN: no stale wake-up, as expected */
    }
    lock(self);
    self->stop_requested = 0;
    unlock(self);
    /* The thread takes no signals: Python handles them in the main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int error = pthread_create(&self->thread, NULL, thread_main, self);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (error) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->state = RUNNING;
    Py_RETURN_NONE;
}

static PyObject *
Forwarder_stop(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->state == RUNNING) {
        join_thread(self, 1);
    }
    Py_RETURN_NONE;
}

static PyObject *
Forwarder_notify_fd(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    if (ensure_threaded(self) < 0) {
        return NULL;
    }
    return PyLong_FromLong(self->notify_fd);
}

typedef struct {
    size_t offset, len; /* in the copy */
    int kind, fd;
    sockaddr_any addr;
} drained;

static PyObject *
Forwarder_drain(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"budget", NULL};
    PyObject *budget_obj = NULL;
    long long budget = DEFAULT_DRAIN;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:drain", kwlist, &budget_obj)
        || (budget_obj && get_int(budget_obj, "budget", 1, MAX_BUDGET, &budget) < 0)) {
        return NULL;
    }
    if (!self->threaded_ready) {
        return PyList_New(0);
    }
    size_t cap = budget < SLOW_ENTRIES ? (size_t)budget : SLOW_ENTRIES;
    drained *items = PyMem_Malloc(cap * sizeof *items);
    if (!items) {
        return PyErr_NoMemory();
    }
    /* Under the lock the datagrams are only copied out (PyMem never runs Python code; making
     * objects could, through the garbage collector, and that code could want the lock). */
    lock(self);
    slow_queue *q = &self->slow;
    size_t k = 0, total = 0, taken = 0;
    for (; taken < q->count && k < cap; taken++) {
        const slow_entry *e = &q->entries[(q->head + taken) % SLOW_ENTRIES];
        if (e->fd >= 0) {
            total += e->len;
            k++;
        }
    }
    uint8_t *copy = PyMem_Malloc(total ? total : 1);
    if (!copy) {
        unlock(self);
        PyMem_Free(items);
        return PyErr_NoMemory();
    }
    size_t at = 0;
    k = 0;
    for (; taken > 0; taken--) {
        const slow_entry *e = &q->entries[q->head];
        if (e->fd >= 0) {
            memcpy(copy + at, slow_data(q, e), e->len);
            items[k].offset = at;
            items[k].len = e->len;
            items[k].kind = e->kind;
            items[k].fd = e->fd;
            items[k].addr = e->addr;
            at += e->len;
            k++;
        }
        slow_pop(q);
    }
    if (q->count == 0 && self->signaled) {
        /* Empty: the next datagram signals again. Otherwise the eventfd stays readable and
         * the loop calls drain() again. */
        uint64_t value;
        if (read(self->notify_fd, &value, sizeof value) < 0) {
            /* EAGAIN: nothing to clear */
        }
        self->signaled = 0;
    }
    unlock(self);

    PyObject *result = PyList_New((Py_ssize_t)k);
    for (size_t i = 0; result && i < k; i++) {
        PyObject *fd = PyLong_FromLong(items[i].fd);
        PyObject *data = fd ? PyBytes_FromStringAndSize((const char *)copy + items[i].offset,
                                                        (Py_ssize_t)items[i].len)
                            : NULL;
        PyObject *addr = data ? addr_tuple(&items[i].addr) : NULL;
        PyObject *item = addr ? PyTuple_Pack(4, kind_names[items[i].kind], fd, data, addr)
                              : NULL;
        Py_XDECREF(fd);
        Py_XDECREF(data);
        Py_XDECREF(addr);
        if (!item) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)i, item);
    }
    PyMem_Free(copy);
    PyMem_Free(items);
    return result;
}

/* ---------------------------------------------------------------------------------------------
 * Type and module
 * ------------------------------------------------------------------------------------------- */

static PyObject *
Forwarder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Forwarder() takes no arguments");
        return NULL;
    }
    Forwarder *self = (Forwarder *)type->tp_alloc(type, 0); /* zeroed */
    if (!self) {
        return NULL;
    }
    self->epfd = self->wake_fd = self->notify_fd = -1;
    if (pthread_mutex_init(&self->lock, NULL) != 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->lock_ready = 1;
    if (table_init(&self->clients) < 0 || table_init(&self->peers) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void
Forwarder_dealloc(Forwarder *self)
{
    if (self->state == RUNNING) {
        join_thread(self, 0); /* the thread uses all of what follows */
    }
    close_fds(self);
    batch_free(self->reader);
    batch_free(self->pump);
    PyMem_Free(self->slow.entries);
    PyMem_Free(self->slow.bytes);
    PyMem_Free(self->watched);
    /* Every binding is in the client table exactly once; the fds belong to Python. */
    if (self->clients.buckets) {
        for (size_t i = 0; i <= self->clients.mask; i++) {
            node *n = self->clients.buckets[i];
            while (n) {
                node *next = n->next;
                PyMem_Free(BINDING_OF(n, by_client));
                n = next;
            }
        }
    }
    PyMem_Free(self->clients.buckets);
    PyMem_Free(self->peers.buckets);
    PyMem_Free(self->relay_heads);
    if (self->lock_ready) {
        pthread_mutex_destroy(&self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Forwarder_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))Forwarder_bind, METH_VARARGS | METH_KEYWORDS,
     "bind(client_fd, client_addr, channel, relay_fd, peer_addr, rate_bytes_per_s=0)\n"
     "Forward a bound channel in both directions."},
    {"unbind", (PyCFunction)(void (*)(void))Forwarder_unbind, METH_VARARGS | METH_KEYWORDS,
     "unbind(client_fd, client_addr, channel)\nStop forwarding a channel; no error if absent."},
    {"unbind_relay", (PyCFunction)(void (*)(void))Forwarder_unbind_relay,
     METH_VARARGS | METH_KEYWORDS,
     "unbind_relay(relay_fd)\nStop forwarding every channel of a relayed socket."},
    {"pump_client", (PyCFunction)(void (*)(void))Forwarder_pump_client,
     METH_VARARGS | METH_KEYWORDS,
     "pump_client(fd, budget=256)\nRead the listening socket; return what is not forwarded."},
    {"pump_relay", (PyCFunction)(void (*)(void))Forwarder_pump_relay,
     METH_VARARGS | METH_KEYWORDS,
     "pump_relay(fd, budget=256)\nRead a relayed socket; return what is not forwarded."},
    {"stats", (PyCFunction)(void (*)(void))Forwarder_stats, METH_VARARGS | METH_KEYWORDS,
     "stats(client_fd, client_addr, channel)\nOne binding's counters, or None."},
    {"counters", (PyCFunction)Forwarder_counters, METH_NOARGS,
     "counters()\nTotals over the forwarder's life."},
    {"watch", (PyCFunction)(void (*)(void))Forwarder_watch, METH_VARARGS | METH_KEYWORDS,
     "watch(fd, kind)\nThreaded mode: the thread reads this UDP socket; kind is 'client' (a\n"
     "listening socket) or 'relay' (a relayed socket)."},
    {"unwatch", (PyCFunction)(void (*)(void))Forwarder_unwatch, METH_VARARGS | METH_KEYWORDS,
     "unwatch(fd)\nThreaded mode: stop reading fd; once this returns the thread no longer\n"
     "uses it and drain() returns nothing more from it. No error if not watched."},
    {"start", (PyCFunction)Forwarder_start, METH_NOARGS,
     "start()\nStart the forwarding thread (no-op when running)."},
    {"stop", (PyCFunction)Forwarder_stop, METH_NOARGS,
     "stop()\nStop the forwarding thread and wait for it (no-op when stopped)."},
    {"notify_fd", (PyCFunction)Forwarder_notify_fd, METH_NOARGS,
     "notify_fd()\nAn eventfd that is readable while drain() has datagrams to return."},
    {"drain", (PyCFunction)(void (*)(void))Forwarder_drain, METH_VARARGS | METH_KEYWORDS,
     "drain(budget=1024)\nThe datagrams the thread did not forward, oldest first, as\n"
     "(kind, fd, data, (host, port)); clears notify_fd() once they are all taken."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ForwarderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "punchline.relay._fastpath.Forwarder",
    .tp_doc = PyDoc_STR("TURN ChannelData forwarding between UDP sockets, in C."),
    .tp_basicsize = sizeof(Forwarder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Forwarder_new,
    .tp_dealloc = (destructor)Forwarder_dealloc,
    .tp_methods = Forwarder_methods,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "punchline.relay._fastpath",
    .m_doc = "The TURN relay's data plane: ChannelData forwarding without Python objects.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&ForwarderType) < 0) {
        return NULL;
    }
    if (!kind_names[KIND_CLIENT]) {
        kind_names[KIND_CLIENT] = PyUnicode_InternFromString("client");
        kind_names[KIND_RELAY] = PyUnicode_InternFromString("relay");
        if (!kind_names[KIND_CLIENT] || !kind_names[KIND_RELAY]) {
            Py_CLEAR(kind_names[KIND_CLIENT]);
            Py_CLEAR(kind_names[KIND_RELAY]);
            return NULL;
        }
    }
    PyObject *module = PyModule_Create(&fastpath_module);
    if (!module) {
        return NULL;
    }
    if (PyModule_AddType(module, &ForwarderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
