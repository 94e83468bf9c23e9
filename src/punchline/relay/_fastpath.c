/*
 * punchline.relay._fastpath: the TURN relay's data plane (RFC 8656 ChannelData over UDP).
 *
 * The TURN state machine stays in Python. Once Python has an allocation with a bound channel
 * whose permission is alive, it calls Forwarder.bind() and from then on the datagrams of that
 * channel never become Python objects: pump_client() and pump_relay() read a batch of datagrams
 * with recvmmsg(), look each sender up in a hash table, and send the forwarded ones with
 * sendmmsg(), one call per destination socket. Only what the fast path does not know (STUN
 * requests, unbound channels, peers with only a permission, garbage) comes back to Python as
 * (bytes, (host, port)), in arrival order. forwarder.PyForwarder is the same thing in pure
 * Python; the tests run both and expect identical behaviour.
 *
 * Single-threaded by design: the pumps run in the asyncio loop's thread and keep the GIL for
 * their whole run (every socket call is non-blocking, so holding it costs nothing). That is
 * what makes it safe to hold plain pointers to bindings during a batch: no other thread can
 * unbind meanwhile. Python code can still run inside a pump when creating the result objects
 * triggers the garbage collector (a finalizer could call unbind() or even pump again), so a
 * pump touches no binding after it starts creating Python objects, and a re-entrant pump is
 * refused.
 *
 * All memory comes from PyMem_*, so tracemalloc sees it (the leak test relies on that).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: its pyconfig.h defines _GNU_SOURCE, which recvmmsg/sendmmsg need */

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64         /* datagrams per recvmmsg(); a pump's budget spans several batches */
#define SLOT_HEAD 4      /* free bytes before each received datagram, for a ChannelData header */
#define SLOT_DATA 65536  /* more than any UDP payload (65527), so nothing is ever truncated */
#define SLOT (SLOT_HEAD + SLOT_DATA)
#define CHANNEL_HEADER 4
#define MAX_RATE (1LL << 48) /* bytes/s; far beyond any link, keeps the double arithmetic exact */
#define MAX_BUDGET INT_MAX

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
    uint64_t slow_packets, dropped_rate, send_errors;
} totals;

/* One datagram to send, pointing into the receive buffer (no copy). */
typedef struct {
    int fd;
    binding *b;
    size_t payload; /* application bytes, for the counters */
} pending;

typedef struct {
    PyObject_HEAD
    table clients, peers;
    binding **relay_heads; /* indexed by relay fd: fds are small, dense integers */
    size_t relay_cap;
    totals total;
    int busy;
    /* Batch state, allocated at the first pump. */
    uint8_t *buf; /* BATCH slots of SLOT bytes */
    struct mmsghdr rx[BATCH];
    struct iovec rx_iov[BATCH];
    sockaddr_any rx_addr[BATCH];
    pending tx[BATCH];
    struct iovec tx_iov[BATCH];
    struct mmsghdr tx_msg[BATCH]; /* one destination fd's share of tx, in order */
    int tx_index[BATCH];
} Forwarder;

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

    node *cn = table_find(&self->clients, &client_key, client_hash);
    node *pn = table_find(&self->peers, &peer_key, peer_hash);
    binding *old_client = cn ? BINDING_OF(cn, by_client) : NULL;
    binding *old_peer = pn ? BINDING_OF(pn, by_peer) : NULL;
    if (old_client && old_client == old_peer) {
        /* The same channel bound again (ChannelBind refresh): keep its counters and just
         * take the rate, refilling the buckets if the rate changed. */
        if (old_client->rate != (uint64_t)rate) {
            old_client->rate = (uint64_t)rate;
            bucket_fill(&old_client->to_peer_bucket, (uint64_t)rate, now);
            bucket_fill(&old_client->to_client_bucket, (uint64_t)rate, now);
        }
        Py_RETURN_NONE;
    }

    /* Make room in the per-fd list array before changing anything, so a MemoryError leaves
     * the forwarder as it was. */
    if ((size_t)relay_fd >= self->relay_cap) {
        size_t cap = self->relay_cap ? self->relay_cap : 64;
        while (cap <= (size_t)relay_fd) {
            cap *= 2;
        }
        binding **heads = PyMem_Realloc(self->relay_heads, cap * sizeof(binding *));
        if (!heads) {
            return PyErr_NoMemory();
        }
        memset(heads + self->relay_cap, 0, (cap - self->relay_cap) * sizeof(binding *));
        self->relay_heads = heads;
        self->relay_cap = cap;
    }
    binding *b = PyMem_Calloc(1, sizeof *b);
    if (!b) {
        return PyErr_NoMemory();
    }
    /* A channel rebound to another peer, or a peer moved to another channel: the control
     * plane decided; the tables keep one binding per key either way. */
    if (old_client) {
        binding_free(self, old_client);
    }
    if (old_peer) {
        binding_free(self, old_peer);
    }
    b->by_client.key = client_key;
    b->by_client.hash = client_hash;
    b->by_peer.key = peer_key;
    b->by_peer.hash = peer_hash;
    b->client_sa = client_sa;
    b->client_salen = client_salen;
    b->peer_sa = peer_sa;
    b->peer_salen = peer_salen;
    b->rate = (uint64_t)rate;
    bucket_fill(&b->to_peer_bucket, b->rate, now);
    bucket_fill(&b->to_client_bucket, b->rate, now);
    if (table_insert(&self->clients, &b->by_client) < 0) {
        PyMem_Free(b);
        return PyErr_NoMemory();
    }
    if (table_insert(&self->peers, &b->by_peer) < 0) {
        table_remove(&self->clients, &b->by_client);
        PyMem_Free(b);
        return PyErr_NoMemory();
    }
    b->relay_next = self->relay_heads[relay_fd];
    if (b->relay_next) {
        b->relay_next->relay_prev = b;
    }
    self->relay_heads[relay_fd] = b;
    Py_RETURN_NONE;
}

static PyObject *
Forwarder_unbind(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client_fd", "client_addr", "channel", NULL};
    PyObject *fd_obj, *addr_obj, *channel_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:unbind", kwlist, &fd_obj, &addr_obj,
                                     &channel_obj)) {
        return NULL;
    }
    addr_key key;
    sockaddr_any sa;
    socklen_t salen;
    if (client_key_from_args(fd_obj, addr_obj, channel_obj, &key, &sa, &salen) < 0) {
        return NULL;
    }
    binding *b = find_client(self, &key);
    if (b) {
        binding_free(self, b);
    }
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
    while ((size_t)fd < self->relay_cap && self->relay_heads[fd]) {
        binding_free(self, self->relay_heads[fd]);
    }
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
    static char *kwlist[] = {"client_fd", "client_addr", "channel", NULL};
    PyObject *fd_obj, *addr_obj, *channel_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:stats", kwlist, &fd_obj, &addr_obj,
                                     &channel_obj)) {
        return NULL;
    }
    addr_key key;
    sockaddr_any sa;
    socklen_t salen;
    if (client_key_from_args(fd_obj, addr_obj, channel_obj, &key, &sa, &salen) < 0) {
        return NULL;
    }
    binding *b = find_client(self, &key);
    if (!b) {
        Py_RETURN_NONE;
    }
    return count_dict("to_peer_packets", b->to_peer.packets, "to_peer_bytes", b->to_peer.bytes,
                      "to_client_packets", b->to_client.packets, "to_client_bytes",
                      b->to_client.bytes, "dropped_rate", b->dropped_rate, "send_errors",
                      b->send_errors, NULL);
}

static PyObject *
Forwarder_counters(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    totals *t = &self->total;
    return count_dict("fast_to_peer_packets", t->to_peer.packets, "fast_to_peer_bytes",
                      t->to_peer.bytes, "fast_to_client_packets", t->to_client.packets,
                      "fast_to_client_bytes", t->to_client.bytes, "slow_packets",
                      t->slow_packets, "dropped_rate", t->dropped_rate, "send_errors",
                      t->send_errors, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * The pumps
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
flush(Forwarder *self, int ntx, int to_client)
{
    uint64_t done_mask[(BATCH + 63) / 64] = {0};
    for (int i = 0; i < ntx; i++) {
        if (done_mask[i / 64] & (1ULL << (i % 64))) {
            continue;
        }
        int fd = self->tx[i].fd, k = 0;
        for (int j = i; j < ntx; j++) {
            if (self->tx[j].fd == fd && !(done_mask[j / 64] & (1ULL << (j % 64)))) {
                binding *b = self->tx[j].b;
                struct msghdr *h = &self->tx_msg[k].msg_hdr;
                memset(h, 0, sizeof *h);
                h->msg_name = to_client ? &b->client_sa : &b->peer_sa;
                h->msg_namelen = to_client ? b->client_salen : b->peer_salen;
                h->msg_iov = &self->tx_iov[j];
                h->msg_iovlen = 1;
                self->tx_index[k++] = j;
                done_mask[j / 64] |= 1ULL << (j % 64);
            }
        }
        int off = 0;
        while (off < k) {
            int sent = sendmmsg(fd, &self->tx_msg[off], (unsigned int)(k - off), MSG_DONTWAIT);
            if (sent < 0) {
                if (errno == EINTR) {
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                    for (; off < k; off++) {
                        count_error(self, &self->tx[self->tx_index[off]]);
                    }
                    break;
                }
                count_error(self, &self->tx[self->tx_index[off]]);
                off++;
                continue;
            }
            for (int s = 0; s < sent; s++, off++) {
                count_sent(self, &self->tx[self->tx_index[off]], to_client);
            }
        }
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

static int
ensure_buffers(Forwarder *self)
{
    if (self->buf) {
        return 0;
    }
    self->buf = PyMem_Malloc((size_t)BATCH * SLOT);
    if (!self->buf) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Decides the fate of received datagram i: 1 = queued in tx, 0 = dropped by the rate limit,
 * -1 = for Python. */
static int
classify(Forwarder *self, int fd, int i, int to_client, uint64_t now, int ntx)
{
    uint8_t *slot = self->buf + (size_t)i * SLOT;
    uint8_t *data = slot + SLOT_HEAD;
    size_t len = self->rx[i].msg_len;
    addr_key key;
    binding *b;
    pending *p = &self->tx[ntx];
    struct iovec *iov = &self->tx_iov[ntx];

    if (self->rx[i].msg_hdr.msg_flags & MSG_TRUNC) {
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
            || make_key(&key, fd, &self->rx_addr[i], channel) < 0) {
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
        if (len > 0xFFFF || make_key(&key, fd, &self->rx_addr[i], 0) < 0) {
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
    if (ensure_buffers(self) < 0) {
        return NULL;
    }
    PyObject *slow = PyList_New(0);
    if (!slow) {
        return NULL;
    }
    self->busy = 1;
    long long done = 0;
    while (done < budget) {
        unsigned int want = (unsigned int)(budget - done < BATCH ? budget - done : BATCH);
        for (unsigned int i = 0; i < want; i++) {
            struct msghdr *h = &self->rx[i].msg_hdr;
            self->rx_iov[i].iov_base = self->buf + (size_t)i * SLOT + SLOT_HEAD;
            self->rx_iov[i].iov_len = SLOT_DATA;
            h->msg_name = &self->rx_addr[i];
            h->msg_namelen = sizeof self->rx_addr[i];
            h->msg_iov = &self->rx_iov[i];
            h->msg_iovlen = 1;
            h->msg_control = NULL;
            h->msg_controllen = 0;
            h->msg_flags = 0;
        }
        int n = recvmmsg(fd, self->rx, want, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EBADF || errno == ENOTSOCK) {
                PyErr_Format(PyExc_ValueError, "fd %d is not a socket", fd);
                goto fail;
            }
            /* EAGAIN: drained. Anything else (a queued ICMP error, ENOMEM) is a network
             * condition: stop here; the loop calls us again when there is more to read. */
            break;
        }
        done += n;

        /* Phase 1, no Python objects: classify, queue and send. */
        uint64_t now = now_ns();
        int slow_index[BATCH], nslow = 0, ntx = 0;
        for (int i = 0; i < n; i++) {
            int fate = classify(self, fd, i, to_client, now, ntx);
            if (fate > 0) {
                ntx++;
            }
            else if (fate < 0) {
                slow_index[nslow++] = i;
            }
        }
        flush(self, ntx, to_client);

        /* Phase 2: hand the rest to Python. From here on bindings may change under us (see
         * the top of the file), so only the receive buffers are read. */
        self->total.slow_packets += (uint64_t)nslow;
        for (int s = 0; s < nslow; s++) {
            int i = slow_index[s];
            PyObject *data = PyBytes_FromStringAndSize(
                (const char *)self->buf + (size_t)i * SLOT + SLOT_HEAD,
                (Py_ssize_t)self->rx[i].msg_len);
            PyObject *addr = data ? addr_tuple(&self->rx_addr[i]) : NULL;
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
    if (table_init(&self->clients) < 0 || table_init(&self->peers) < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void
Forwarder_dealloc(Forwarder *self)
{
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
    PyMem_Free(self->buf);
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
