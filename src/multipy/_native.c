/* multipy._native: the mechanism of the shared-memory call channel.
 *
 * Mechanism only: a multi-producer request ring, reply slots, and waits that
 * spin (with a CPU pause) and then sleep in FUTEX_WAIT on a word of shared
 * memory.  What a message means, when to spin, how long to wait and what to do
 * when the peer died is decided in Python (multipy/transport/channel.py, which
 * also holds the layout diagram and a pure-Python twin of this file).
 *
 * The GIL is released exactly around the blocking part of a wait, as in
 * CPython's Modules/_queuemodule.c; posting and taking copy bytes while
 * holding it.  Plain CPython C API, no torch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stddef.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Keep in step with channel.py. */
#define MAGIC 0x4d504348u /* "MPCH" */
#define VERSION 1u
#define HEADER_BYTES 512
#define RECORD_HEAD 16
#define SLOT_HEAD 64
#define SLICE_NS 2000000LL /* the watcher among a channel's sleepers looks at the peer's
                              liveness this often (see wait_for) */
#define QUIET_SLICE_NS 100000000LL /* ... and every other sleeper this often */
#define WATCH_MAX_NS 32000000LL /* a host watcher's slice doubles from SLICE_NS up to this */

enum { READY = 0, TIMEOUT = 1, DEAD = 2, CLOSED = 3, SLEPT = 4 };
#define POKED 5 /* (inside wait_for only) a request wait's sleep ended by a poke: spin again */
#define SHORT_SPIN_DIVISOR 8 /* a request wait's spin after a poke paid off: spin / 8 */
enum { SLOT_FREE = 0, SLOT_WAITING = 1, SLOT_REPLIED = 2 };
enum { REC_EMPTY = 0, REC_DATA = 1, REC_PAD = 2 };

typedef struct {
    uint32_t magic, version, ring_bytes, slots, slot_bytes, _pad0[11];
    uint32_t closed, _pad1[15];            /* 64: set once by close() */
    uint64_t tail, _pad2[7];               /* 128: producers reserve here */
    uint64_t head, _pad3[7];               /* 192: the consumer's position */
    uint32_t req_seq, req_sleeping, poked, _pad4[13]; /* 256: bumped on every post; poked:
                                                 the consumer's count of sleeps a poke ended */
    uint32_t slot_hint, _pad5[15];         /* 320 */
} header_t;

typedef struct {
    uint32_t state, len, tag, _pad;
} record_t;

typedef struct {
    uint32_t state, sleeping, len, tag;
    uint64_t go;       /* 16: whether the request posted with this slot runs (GO_*) */
    uint32_t _pad[10];
} slot_t;

/* A slot's ``go`` word: the one place where whether a request runs is decided, by
 * a compare-and-swap, so that it is either started or skipped, never both, never
 * neither.  claim() clears it (the request always runs); the host may arm it
 * (arm) with a deadline before posting; the interpreter decides (begin) when it
 * takes the request, the host may cancel it (cancel) until then. */
#define GO_UNARMED 0ull   /* runs without a decision (stale STARTED/SKIPPED read the same) */
#define GO_CANCELLED 1ull /* the host cancelled it before the interpreter decided: skip */
#define GO_STARTED 2ull   /* decided: the interpreter runs it */
#define GO_SKIPPED 3ull   /* decided: the interpreter answers it unrun */
_Static_assert(sizeof(slot_t) == SLOT_HEAD && offsetof(slot_t, go) == 16,
               "a slot's header is 64 bytes, its go word at 16 (channel.py's _SLOT_GO)");
#define GO_NO_DEADLINE UINT64_MAX /* armed without a deadline; any value >= 4: armed, a
                                     CLOCK_MONOTONIC deadline in nanoseconds */

static int spinners;       /* host threads of this process spinning now */
/* Host side, process-wide: requests posted whose reply was not taken yet, and the
 * channels (interpreters) with at least one.  A waiting caller spins only while
 * the machine has a core that neither a busy interpreter nor another host thread
 * needs (see may_spin); the counts of a channel leave them when it is detached. */
static long g_inflight;
static long g_busy;

/* Counters of what the waits did, for diagnostics (benchmarks/count_switches.py):
 * kept only when MULTIPY_CHANNEL_COUNTS=1 was set when the module loaded, so that
 * the shared cache line costs nothing otherwise.  Per process. */
enum {
    C_WAITS,        /* waits that did not find their message at once */
    C_SPIN_HITS,    /* ... that found it while spinning */
    C_NO_SPIN,      /* ... that were not allowed to spin (cap, or told not to) */
    C_SLEEPS,       /* FUTEX_WAIT calls */
    C_WAKES,        /* FUTEX_WAKE calls */
    C_GIL_WAITS,    /* waits after which taking the GIL back took over 2 µs */
    C_GIL_NS,       /* nanoseconds spent taking the GIL back after waits */
    C_YIELDS,       /* sched_yield calls while spinning */
    C_POKES,        /* request waits whose sleep a poke ended (Channel.poke) */
    C_POLLS,        /* host: lone awaited replies polled for (poll_awaited) */
    C_POLL_HITS,    /* ... found while polling (settled with no bell) */
    C_BELLS_SKIPPED, /* interpreter: replies whose bell was not rung (the host polled) */
    C_COUNT
};
static const char *const counter_names[C_COUNT] = {
    "waits", "spin_hits", "no_spin", "sleeps", "wakes", "gil_waits", "gil_ns", "yields",
    "pokes", "polls", "poll_hits", "bells_skipped"};
static int counting;
static uint64_t counters[C_COUNT];
#define COUNT(i, n) do { if (counting) __atomic_add_fetch(&counters[i], (n), __ATOMIC_RELAXED); } while (0)

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int attached;
    long inflight;         /* host side: posted here, reply not taken yet */
    int in_use;            /* waits in progress (they run without the GIL) */
    int watching;          /* a sleeper of this process watches the peer's liveness (wait_for) */
    int poke_paid;         /* consumer side: the last request wait slept, was poked, and then
                              found its request while spinning (wait_for: the next spin is short) */
    int detach_pending;
    unsigned poll_backoff; /* host side: lone replies not polled for after a poll that gave up */
    unsigned poll_skip;    /* (poll_awaited: 0 after a poll that found its reply) */
    header_t *h;
    char *ring;
    char *slots;
    /* The geometry, read once when attached: the header is shared memory that the
     * peer can overwrite, and every bound below is computed from these copies
     * (as the pure-Python twin keeps its own). */
    uint32_t ring_bytes, nslots, slot_bytes;
} ChannelObject;

static destructor channel_dealloc; /* how a Channel is recognised (set by native_exec) */

/* -- one interpreter's objects --------------------------------------------------
 *
 * The module loads in isolated subinterpreters too (Py_MOD_PER_INTERPRETER_GIL_SUPPORTED:
 * the subinterpreter backend's serving loops use Channel there), and its static
 * state is shared by every interpreter of the process.  It is of two kinds:
 *
 * - C values meant for the whole process, read and written with atomics or set
 *   once to the same value: spinners, g_inflight, g_busy (who may spin),
 *   counting/counters (diagnostics), channel_dealloc (a function's address), and
 *   t_api (torch's C table, read only where torch was set up).
 * - Python objects cached on first use: the types this module makes, interned
 *   names and torch's functions (t_* and s_* of tensor_setup, r_* and s_* of
 *   call_setup, held_type and s_free of held_blocks, caller_type and its names,
 *   the balancer's names of take_turn/give_back).  An object belongs to the
 *   interpreter that made it: under another interpreter's GIL its reference
 *   counts would race, and it dies with its interpreter.
 *
 * So only the first interpreter that fills such a cache (cache_owner) uses them.
 * In another one the functions that fill them (tensor_setup, call_setup,
 * held_blocks, caller) raise RuntimeError, take_turn and give_back decline (the
 * Python path serves), and the functions that read t_* or r_* are reached only
 * through codec.native_tensors() or interp.state, after a setup of that same
 * interpreter succeeded (run_call and serve_calls check r_interp themselves).
 * A subinterpreter's serving loop uses only Channel, which caches nothing.
 * Today one interpreter per process runs these functions (the host's main one,
 * or a process interpreter's); the guard keeps a second one from sharing them. */
static PyInterpreterState *cache_owner;

/* Whether this interpreter may use the cached objects (the first to ask owns them). */
static int cache_here(void) {
    PyInterpreterState *here = PyInterpreterState_Get();
    PyInterpreterState *owner = __atomic_load_n(&cache_owner, __ATOMIC_ACQUIRE);
    if (owner != NULL) /* the usual case: a plain read */
        return owner == here;
    if (__atomic_compare_exchange_n(&cache_owner, &owner, here, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE))
        return 1;
    return owner == here; /* the failed exchange read the owner */
}

/* NULL with a RuntimeError: `what` is used in another interpreter of this process. */
static PyObject *not_here(const char *what) {
    PyErr_Format(PyExc_RuntimeError,
                 "multipy._native.%s serves only the first interpreter of this process that "
                 "used the extension's cached objects; this interpreter uses the Python path "
                 "(MULTIPY_NATIVE=0)", what);
    return NULL;
}

/* Whether o is a Channel (the type takes no subclasses). */
static int is_channel(PyObject *o) {
    return channel_dealloc != NULL && Py_TYPE(o)->tp_dealloc == channel_dealloc;
}

/* -- primitives ----------------------------------------------------------- */

static inline void cpu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* 1 when a signal interrupted the sleep. */
static int futex_wait(uint32_t *word, uint32_t expected, int64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    COUNT(C_SLEEPS, 1);
    /* Not FUTEX_PRIVATE: the word is in memory shared with another process. */
    return syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0) == -1 && errno == EINTR;
}

static void futex_wake(uint32_t *word) {
    COUNT(C_WAKES, 1);
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static int fd_ready(int fd) {
    if (fd < 0)
        return 0;
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 0) > 0;
}

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define SC_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define SC_LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)

static inline uint32_t round16(uint32_t n) { return (n + 15u) & ~15u; }

/* A request was posted on (+1) or a reply taken from (-1) this channel. */
static void count_inflight(ChannelObject *c, long d) {
    long before = __atomic_fetch_add(&c->inflight, d, __ATOMIC_ACQ_REL);
    __atomic_add_fetch(&g_inflight, d, __ATOMIC_ACQ_REL);
    if (before == 0 && d > 0)
        __atomic_add_fetch(&g_busy, 1, __ATOMIC_ACQ_REL);
    else if (before + d == 0 && d < 0)
        __atomic_sub_fetch(&g_busy, 1, __ATOMIC_ACQ_REL);
}

/* The channel is let go of: whatever it still counts in flight never ends. */
static void forget_inflight(ChannelObject *c) {
    long left = __atomic_exchange_n(&c->inflight, 0, __ATOMIC_ACQ_REL);
    if (left > 0) {
        __atomic_sub_fetch(&g_inflight, left, __ATOMIC_ACQ_REL);
        __atomic_sub_fetch(&g_busy, 1, __ATOMIC_ACQ_REL);
    }
}

/* Whether one more host thread may spin now, on a machine of `cores` cores: one
 * core per busy interpreter, one for the host thread holding the GIL when other
 * calls are in flight (their callers run Python between waits), the rest may spin.
 * A spin beyond that takes the core of an interpreter or of the GIL's holder, and
 * the call it waits for only ends later. */
static int spin_allowed(int cores) {
    long spare = cores - __atomic_load_n(&g_busy, __ATOMIC_ACQUIRE) -
                 (__atomic_load_n(&g_inflight, __ATOMIC_ACQUIRE) > 1 ? 1 : 0);
    if (spare <= 0)
        return 0;
    if (__atomic_add_fetch(&spinners, 1, __ATOMIC_ACQ_REL) <= spare)
        return 1;
    __atomic_sub_fetch(&spinners, 1, __ATOMIC_ACQ_REL);
    return 0;
}

static inline slot_t *slot_at(ChannelObject *c, uint32_t i) {
    return (slot_t *)(c->slots + (size_t)i * ((size_t)SLOT_HEAD + c->slot_bytes));
}

/* The record at the consumer's position, skipping wrap padding; NULL if none is committed. */
static record_t *ring_front(ChannelObject *c) {
    header_t *h = c->h;
    for (;;) {
        uint64_t head = h->head;
        uint32_t pos = (uint32_t)(head & (c->ring_bytes - 1));
        record_t *r = (record_t *)(c->ring + pos);
        uint32_t st = LOAD(&r->state);
        if (st == REC_DATA)
            return r;
        if (st != REC_PAD)
            return NULL;
        memset(r, 0, RECORD_HEAD);
        STORE(&h->head, head + (c->ring_bytes - pos));
    }
}

/* The length of the committed record r, or -1 when the record would run past the
 * end of the ring (records never wrap: a length the peer corrupted). */
static int64_t record_len(ChannelObject *c, record_t *r) {
    uint32_t len = r->len; /* read once: what is checked is what is used */
    uint64_t room = (uint64_t)c->ring_bytes - (uint64_t)((char *)r - c->ring);
    return (uint64_t)RECORD_HEAD + (((uint64_t)len + 15u) & ~(uint64_t)15u) <= room ? (int64_t)len
                                                                                      : -1;
}

static void corrupt_record(void) {
    PyErr_SetString(PyExc_ValueError,
                    "a corrupt request record: its length runs past the end of the ring");
}

/* -- waiting -------------------------------------------------------------- */

typedef int (*ready_fn)(ChannelObject *, void *);

static int request_ready(ChannelObject *c, void *arg) {
    (void)arg;
    return ring_front(c) != NULL;
}

static int reply_ready(ChannelObject *c, void *arg) {
    return LOAD(&((slot_t *)arg)->state) == SLOT_REPLIED;
}

/* -- host: sleeping callers ---------------------------------------------------
 *
 * Many host threads may sleep at once on one channel, each on its own reply slot,
 * for as long as the calls queued before theirs take (64 callers of a model that
 * takes 1 ms: 64 ms each).  Each must notice a dead peer, but one of them is
 * enough: the first sleeper to find no watcher (c->watching) becomes it and looks
 * at the peer's liveness fd every SLICE_NS; the others sleep QUIET_SLICE_NS at a
 * time.  A watcher that finds the peer dead wakes every sleeper of the channel,
 * and each of them sees it at once; close() wakes them too.  (Every sleeper
 * looking every 2 ms cost 64 callers 28 wake-ups per call, whose CPU came out of
 * the interpreters' cores.)  On the host the watcher's slice doubles while its
 * wait lasts, up to WATCH_MAX_NS: a short wait looks as often as before, a long
 * one (its call queued behind many) wakes a few times, not every 2 ms.  When the
 * watcher leaves, the next sleeper to start a slice takes over; until then a
 * death is noticed within QUIET_SLICE_NS.  The interpreter is the only sleeper on
 * its side: always the watcher, every SLICE_NS. */

/* Wake every sleeper on this channel's reply slots (the peer died). */
static void wake_sleepers(ChannelObject *c) {
    for (uint32_t i = 0; i < c->nslots; i++) {
        slot_t *s = slot_at(c, i);
        if (LOAD(&s->sleeping))
            futex_wake(&s->state);
    }
}

/* wait_for's sleep: `ready_rc` when the message is there before the first sleep,
 * `slept_rc` after one.  `poked` (a request wait that may spin): a sleep that ends
 * with the word changed from `seen` (its value when the spin began) and nothing
 * ready returns POKED (Channel.poke bumped the word: a request is coming, spin for
 * it) instead of going back to sleep. */
static int sleep_for(ChannelObject *c, ready_fn ready, void *arg, uint32_t *word,
                     uint32_t *sleeping, int64_t start, int64_t timeout_ns, int ready_rc,
                     int slept_rc, int fd, int *watcher, int poked, uint32_t seen) {
    header_t *h = c->h;
    int64_t watch = SLICE_NS; /* the watcher's next slice */
    if (!poked)
        seen = SC_LOAD(word);
    for (int first = !poked;; first = 0) {
        if (!first) {
            /* Between two slices (and between the spin and the first) the sleeping
             * flag is down: a poke then bumps the word without a wake-up, and is
             * seen here against the value seen before. */
            uint32_t now = SC_LOAD(word);
            if (poked && now != seen && !LOAD(&h->closed)) {
                COUNT(C_POKES, 1);
                __atomic_add_fetch(&h->poked, 1u, __ATOMIC_RELAXED); /* the only writer */
                return POKED;
            }
            seen = now;
        }
        SC_STORE(sleeping, 1u);
        if (ready(c, arg)) {
            SC_STORE(sleeping, 0u);
            return ready_rc;
        }
        if (LOAD(&h->closed)) {
            SC_STORE(sleeping, 0u);
            return CLOSED;
        }
        if (!*watcher) {
            int vacant = 0;
            *watcher = __atomic_compare_exchange_n(&c->watching, &vacant, 1, 0, __ATOMIC_ACQ_REL,
                                                   __ATOMIC_RELAXED);
        }
        int64_t slice = fd < 0 ? SLICE_NS : *watcher ? watch : QUIET_SLICE_NS;
        if (*watcher && ready == reply_ready && watch < WATCH_MAX_NS)
            watch = watch * 2 < WATCH_MAX_NS ? watch * 2 : WATCH_MAX_NS;
        if (timeout_ns >= 0) {
            int64_t left = start + timeout_ns - now_ns();
            if (left <= 0) {
                SC_STORE(sleeping, 0u);
                return TIMEOUT;
            }
            if (left < slice)
                slice = left;
        }
        int interrupted = futex_wait(word, seen, slice);
        SC_STORE(sleeping, 0u);
        if (ready(c, arg))
            return slept_rc;
        if (fd_ready(fd)) {
            if (ready(c, arg)) /* re-check: a reply may precede EOF */
                return slept_rc;
            if (*watcher)
                wake_sleepers(c);
            return DEAD;
        }
        if (interrupted)
            return -1;
    }
}

/* Spin up to spin_ns, then sleep on `word` (while it holds the value seen before
 * the check) in slices, looking at the peer's fd and the closed flag between
 * them.  Called without the GIL.  Returns READY/TIMEOUT/DEAD/CLOSED, or -1 when
 * a signal interrupted the sleep (the caller runs Python's handlers).
 *
 * A request wait that spins is poked awake (Channel.poke): the word changing
 * while it spins starts a fresh spin window, and a sleep ended by a poke spins
 * again instead of sleeping on, so that the request the poke announced finds it
 * awake.  A post also changes the word, but its record is there first: the wait
 * takes it, whatever the poke did. */
static int wait_for(ChannelObject *c, ready_fn ready, void *arg, uint32_t *word,
                    uint32_t *sleeping, int64_t timeout_ns, int64_t spin_ns, int may_spin,
                    int fd) {
    header_t *h = c->h;
    int64_t start = now_ns();
    int spins = spin_ns > 0 && may_spin;
    int poked = spins && ready == request_ready;
    int watcher = 0, rc, woken = 0;
    uint32_t seen = 0;
    /* After a request found in the spin that a poke started, the host pokes before
     * it posts: a long spin after the reply would only burn the core until the
     * poke comes.  A short one still catches a request posted right behind. */
    int64_t window = poked && c->poke_paid ? spin_ns / SHORT_SPIN_DIVISOR : spin_ns;
    for (int64_t from = start;;) {
        if (spins) {
            int64_t until = from + window, look = from + SLICE_NS;
            seen = poked ? SC_LOAD(word) : 0;
            for (unsigned i = 1;; i++) {
                if (ready(c, arg)) {
                    COUNT(C_SPIN_HITS, 1);
                    rc = READY;
                    goto out;
                }
                if (LOAD(&h->closed)) {
                    rc = CLOSED;
                    goto out;
                }
                cpu_pause();
                if ((i & 63) == 0) {
                    /* Let a peer that shares this core run: a pure user-space spin would
                     * otherwise hold the core for a whole time slice when cores are scarce. */
                    COUNT(C_YIELDS, 1);
                    sched_yield();
                    int64_t t = now_ns();
                    if (poked) {
                        uint32_t now_seen = LOAD(word);
                        if (now_seen != seen) { /* poked while spinning: a fresh window */
                            seen = now_seen;
                            until = t + spin_ns;
                        }
                    }
                    if (t > until)
                        break;
                    if (t > look) { /* a long spin still notices a dead peer */
                        look = t + SLICE_NS;
                        if (fd_ready(fd)) {
                            rc = ready(c, arg) ? READY : DEAD;
                            goto out;
                        }
                    }
                }
            }
        }
        rc = sleep_for(c, ready, arg, word, sleeping, start, timeout_ns, spins ? SLEPT : READY,
                       spin_ns > 0 && !may_spin ? READY : SLEPT, fd, &watcher, poked, seen);
        if (rc != POKED)
            break;
        woken = 1;
        window = spin_ns;
        from = now_ns();
    }
out:
    if (watcher)
        STORE(&c->watching, 0);
    if (poked)
        c->poke_paid = woken && rc == READY;
    return rc;
}

/* Release the GIL once around wait_for; run signal handlers if one interrupted it. */
static PyObject *blocking_wait(ChannelObject *c, ready_fn ready, void *arg, uint32_t *word,
                               uint32_t *sleeping, double timeout, double spin,
                               int cores, int fd) {
    if (ready(c, arg))
        return PyLong_FromLong(READY);
    int64_t timeout_ns = timeout < 0 ? -1 : (int64_t)(timeout * 1e9);
    int64_t spin_ns = spin > 0 ? (int64_t)(spin * 1e9) : 0;
    int64_t deadline = timeout_ns < 0 ? -1 : now_ns() + timeout_ns;
    int rc;
    int64_t back = 0;
    COUNT(C_WAITS, 1);
    c->in_use++;
    for (;;) {
        int spins = 1;
        if (spin_ns > 0 && cores >= 0)
            spins = spin_allowed(cores);
        if (!spins || spin_ns <= 0)
            COUNT(C_NO_SPIN, 1);
        Py_BEGIN_ALLOW_THREADS
        rc = wait_for(c, ready, arg, word, sleeping, timeout_ns, spin_ns, spins, fd);
        if (counting)
            back = now_ns();
        Py_END_ALLOW_THREADS
        if (counting) {
            int64_t took = now_ns() - back;
            COUNT(C_GIL_NS, (uint64_t)took);
            if (took > 2000)
                COUNT(C_GIL_WAITS, 1);
        }
        if (spin_ns > 0 && cores >= 0 && spins)
            __atomic_sub_fetch(&spinners, 1, __ATOMIC_ACQ_REL);
        if (rc >= 0)
            break;
        if (PyErr_CheckSignals() < 0)
            break;
        spin_ns = 0;
        if (deadline >= 0) {
            timeout_ns = deadline - now_ns();
            if (timeout_ns < 0)
                timeout_ns = 0;
        }
    }
    c->in_use--;
    if (c->detach_pending && c->in_use == 0 && c->attached) {
        c->attached = 0;
        forget_inflight(c);
        PyBuffer_Release(&c->view);
    }
    if (rc < 0)
        return NULL;
    return PyLong_FromLong(rc);
}

/* -- the Channel type ----------------------------------------------------- */

static int check_attached(ChannelObject *c) {
    if (!c->attached || c->detach_pending) {
        PyErr_SetString(PyExc_ValueError, "the channel is detached");
        return -1;
    }
    return 0;
}

static int check_slot(ChannelObject *c, unsigned int slot) {
    if (slot >= c->nslots) {
        PyErr_Format(PyExc_IndexError, "slot %u out of range (%u slots)", slot, c->nslots);
        return -1;
    }
    return 0;
}

/* The slot that a one-argument method's ``arg`` names, on an attached channel;
   NULL with an exception set when it names none. */
static slot_t *slot_arg(ChannelObject *c, PyObject *arg) {
    unsigned int slot = (unsigned int)PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred() || check_attached(c) < 0 || check_slot(c, slot) < 0)
        return NULL;
    return slot_at(c, slot);
}

static int Channel_init(ChannelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"buffer", NULL};
    PyObject *buffer;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O", names, &buffer))
        return -1;
    if (self->attached) {
        PyErr_SetString(PyExc_TypeError, "Channel is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    header_t *h = (header_t *)self->view.buf;
    uint32_t ring_bytes = 0, slots = 0, slot_bytes = 0;
    int ok = self->view.len >= HEADER_BYTES && ((uintptr_t)h & 63) == 0;
    if (ok) { /* read once: what is checked is what is used */
        ring_bytes = h->ring_bytes;
        slots = h->slots;
        slot_bytes = h->slot_bytes;
        ok = h->magic == MAGIC && h->version == VERSION && ring_bytes >= 64 &&
             (ring_bytes & (ring_bytes - 1)) == 0 && slots > 0 && slot_bytes % 64 == 0;
    }
    if (ok) {
        uint64_t need;
        ok = !__builtin_mul_overflow((uint64_t)slots, (uint64_t)SLOT_HEAD + slot_bytes, &need) &&
             need + HEADER_BYTES + ring_bytes <= (uint64_t)self->view.len;
    }
    if (!ok) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError,
                        "not a channel: write its header with channel.prepare() first");
        return -1;
    }
    self->h = h;
    self->ring_bytes = ring_bytes;
    self->nslots = slots;
    self->slot_bytes = slot_bytes;
    self->ring = (char *)h + HEADER_BYTES;
    self->slots = self->ring + self->ring_bytes;
    self->attached = 1;
    return 0;
}

static void Channel_dealloc(ChannelObject *self) {
    /* A wait in progress holds a reference to the channel, so none runs here. */
    if (self->attached) {
        forget_inflight(self);
        PyBuffer_Release(&self->view);
    }
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp); /* a heap type: each instance holds a reference to it */
}

PyDoc_STRVAR(post_doc,
"post(data, tag, /) -> int\n\n"
"Copy ``data`` into the request ring with an opaque 32-bit ``tag``, holding the\n"
"GIL (no release), and wake the consumer if it sleeps.  Returns the ring position\n"
"just past the record (> 0: the consumer took it once ``taken`` reaches it), or 0\n"
"when the ring has no room for it now.");

/* Post the record `head` (hlen bytes) + `data` (len bytes) with `tag`: the ring
 * position past it, or 0 when the ring has no room now (the caller checked that
 * it fits the ring at all: hlen + len + RECORD_HEAD <= ring_bytes / 2). */
static uint64_t ring_post(ChannelObject *self, const void *head_bytes, size_t hlen,
                          const void *data, size_t len, uint32_t tag) {
    header_t *h = self->h;
    uint64_t cap = self->ring_bytes;
    uint32_t rec = RECORD_HEAD + round16((uint32_t)(hlen + len));
    uint64_t t, pad;
    for (;;) {
        t = __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE);
        uint64_t head = LOAD(&h->head);
        uint64_t pos = t & (cap - 1);
        pad = pos + rec > cap ? cap - pos : 0;
        if (t + pad + rec - head > cap)
            return 0;
        if (__atomic_compare_exchange_n(&h->tail, &t, t + pad + rec, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            break;
    }
    if (pad) {
        record_t *p = (record_t *)(self->ring + (t & (cap - 1)));
        p->len = 0;
        STORE(&p->state, (uint32_t)REC_PAD);
        t += pad;
    }
    record_t *r = (record_t *)(self->ring + (t & (cap - 1)));
    r->len = (uint32_t)(hlen + len);
    r->tag = tag;
    if (hlen)
        memcpy((char *)r + RECORD_HEAD, head_bytes, hlen);
    memcpy((char *)r + RECORD_HEAD + hlen, data, len);
    STORE(&r->state, (uint32_t)REC_DATA);
    count_inflight(self, 1);
    __atomic_add_fetch(&h->req_seq, 1u, __ATOMIC_SEQ_CST);
    if (SC_LOAD(&h->req_sleeping))
        futex_wake(&h->req_seq);
    return t + rec;
}

static PyObject *Channel_post(ChannelObject *self, PyObject *args) {
    Py_buffer data;
    unsigned int tag;
    if (!PyArg_ParseTuple(args, "y*I:post", &data, &tag))
        return NULL;
    if (check_attached(self) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    uint64_t cap = self->ring_bytes;
    if ((uint64_t)data.len + RECORD_HEAD > cap / 2) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "a message of %zd bytes does not fit this ring "
                     "(at most %llu): spill it", data.len,
                     (unsigned long long)(cap / 2 - RECORD_HEAD));
        return NULL;
    }
    uint64_t end = ring_post(self, NULL, 0, data.buf, (size_t)data.len, tag);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(end);
}

/* Consume the ring's front record r of len bytes.  The whole record is zeroed:
 * a later record header may land anywhere in it. */
static void consume(ChannelObject *c, record_t *r, uint32_t len) {
    memset(r, 0, RECORD_HEAD + round16(len));
    STORE(&c->h->head, c->h->head + RECORD_HEAD + round16(len));
}

/* Publish slot s's reply (len bytes written after its head, with tag) and wake
 * its waiter if it sleeps. */
static void publish_reply(slot_t *s, uint32_t len, uint32_t tag) {
    s->len = len;
    s->tag = tag;
    SC_STORE(&s->state, (uint32_t)SLOT_REPLIED);
    if (SC_LOAD(&s->sleeping))
        futex_wake(&s->state);
}

PyDoc_STRVAR(take_doc,
"take() -> (tag, bytes) | None\n\n"
"The oldest request, or None when the ring is empty.  One consumer only.");

static PyObject *Channel_take(ChannelObject *self, PyObject *unused) {
    if (check_attached(self) < 0)
        return NULL;
    record_t *r = ring_front(self);
    if (r == NULL)
        Py_RETURN_NONE;
    int64_t n = record_len(self, r);
    if (n < 0) {
        corrupt_record();
        return NULL;
    }
    uint32_t len = (uint32_t)n, tag = r->tag;
    PyObject *data = PyBytes_FromStringAndSize((char *)r + RECORD_HEAD, len);
    if (data == NULL)
        return NULL;
    consume(self, r, len);
    PyObject *out = Py_BuildValue("(IN)", tag, data);
    return out;
}

PyDoc_STRVAR(wait_request_doc,
"wait_request(timeout, spin, fd, /) -> int\n\n"
"Wait until a request can be taken: spin up to ``spin`` seconds, then sleep in\n"
"FUTEX_WAIT.  ``timeout`` < 0 waits for ever; ``fd`` >= 0 is polled between\n"
"sleeps and its readiness (with the ring still empty) means the peer is gone.\n"
"Returns READY (found without sleeping), SLEPT (found after sleeping, when no spin\n"
"was asked for or the spin ran out), TIMEOUT,\n"
"DEAD or CLOSED.  The GIL is released once.  With a spin, a poke (``poke()``) ends\n"
"a sleep and starts a fresh spin window, as it does during the spin.");

static PyObject *Channel_wait_request(ChannelObject *self, PyObject *args) {
    double timeout, spin;
    int fd;
    if (!PyArg_ParseTuple(args, "ddi:wait_request", &timeout, &spin, &fd))
        return NULL;
    if (check_attached(self) < 0)
        return NULL;
    header_t *h = self->h;
    return blocking_wait(self, request_ready, NULL, &h->req_seq, &h->req_sleeping, timeout, spin,
                         -1, fd);
}

PyDoc_STRVAR(poke_doc,
"poke() -> bool\n\n"
"A request is coming: wake the consumer if it sleeps in wait_request, so that it\n"
"spins for the request (a fresh spin window) instead of sleeping until the post.\n"
"Posts nothing; a consumer that spins or runs a call is left as it is (one atomic\n"
"add, no system call).  True when the consumer slept (one FUTEX_WAKE).  Harmless on\n"
"a closed channel: False.\n\n"
">>> ch.poke()  # doctest: +SKIP\n"
"True");

static PyObject *Channel_poke(ChannelObject *self, PyObject *unused) {
    if (!self->attached || self->detach_pending)
        Py_RETURN_FALSE;
    header_t *h = self->h;
    if (LOAD(&h->closed))
        Py_RETURN_FALSE;
    /* The post's protocol: the word bumped, then the sleeper flag read (a sleeper
     * that set it after the bump finds the word changed and does not sleep).  The
     * flag is taken down here, before the wake-up: the post that follows, finding
     * it down, makes no second FUTEX_WAKE while the woken consumer is on its way
     * (it looks at the ring before it sleeps again, and sets the flag then). */
    __atomic_add_fetch(&h->req_seq, 1u, __ATOMIC_SEQ_CST);
    uint32_t asleep = 1u;
    if (!__atomic_compare_exchange_n(&h->req_sleeping, &asleep, 0u, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST))
        Py_RETURN_FALSE;
    futex_wake(&h->req_seq);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(claim_doc,
"claim() -> int | None\n\n"
"Take a free reply slot (its index goes with the request), or None if all are taken.");

/* A free reply slot, claimed; -1 when every slot is taken. */
static long claim_slot(ChannelObject *self) {
    uint32_t n = self->nslots;
    uint32_t start = LOAD(&self->h->slot_hint);
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = (start + k) % n;
        uint32_t expected = SLOT_FREE;
        slot_t *s = slot_at(self, i);
        if (__atomic_compare_exchange_n(&s->state, &expected, (uint32_t)SLOT_WAITING, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            /* Published to the interpreter by the post that names this slot. */
            __atomic_store_n(&s->go, GO_UNARMED, __ATOMIC_RELAXED);
            STORE(&self->h->slot_hint, (i + 1) % n);
            return (long)i;
        }
    }
    return -1;
}

static PyObject *Channel_claim(ChannelObject *self, PyObject *unused) {
    if (check_attached(self) < 0)
        return NULL;
    long i = claim_slot(self);
    if (i < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(i);
}

PyDoc_STRVAR(release_doc, "release(slot, /)\n\nGive a claimed slot back.");

static PyObject *Channel_release(ChannelObject *self, PyObject *arg) {
    slot_t *s = slot_arg(self, arg);
    if (s == NULL)
        return NULL;
    STORE(&s->state, (uint32_t)SLOT_FREE);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(reply_doc,
"reply(slot, data, tag, /) -> bool\n\n"
"Put ``data`` (with an opaque ``tag``) in ``slot`` and wake its waiter if it\n"
"sleeps.  False (nothing written) when it is larger than ``slot_bytes``.");

static PyObject *Channel_reply(ChannelObject *self, PyObject *args) {
    unsigned int slot, tag;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Iy*I:reply", &slot, &data, &tag))
        return NULL;
    if (check_attached(self) < 0 || check_slot(self, slot) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if ((size_t)data.len > self->slot_bytes) {
        PyBuffer_Release(&data);
        Py_RETURN_FALSE;
    }
    slot_t *s = slot_at(self, slot);
    memcpy((char *)s + SLOT_HEAD, data.buf, data.len);
    uint32_t len = (uint32_t)data.len;
    PyBuffer_Release(&data);
    publish_reply(s, len, tag);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(wait_reply_doc,
"wait_reply(slot, timeout, spin, cores, fd, /) -> int\n\n"
"Wait for ``slot``'s reply: spin up to ``spin`` seconds if, on a machine of\n"
"``cores`` cores (< 0: spin regardless), one is left once every interpreter with\n"
"a request of this process in flight has one, the GIL's holder has one (when\n"
"other requests are in flight) and the threads spinning now have theirs; then\n"
"sleep in FUTEX_WAIT, polling ``fd`` (the peer's liveness) between sleeps.\n"
"Returns READY, SLEPT, TIMEOUT, DEAD or CLOSED (see wait_request).  The GIL is\n"
"released once.");

static PyObject *Channel_wait_reply(ChannelObject *self, PyObject *args) {
    unsigned int slot;
    double timeout, spin;
    int cores, fd;
    if (!PyArg_ParseTuple(args, "Iddii:wait_reply", &slot, &timeout, &spin, &cores, &fd))
        return NULL;
    if (check_attached(self) < 0 || check_slot(self, slot) < 0)
        return NULL;
    slot_t *s = slot_at(self, slot);
    return blocking_wait(self, reply_ready, s, &s->state, &s->sleeping, timeout, spin, cores,
                         fd);
}

PyDoc_STRVAR(take_reply_doc,
"take_reply(slot, /) -> (tag, bytes) | None\n\n"
"The reply in ``slot`` (the slot stays claimed, ready for the next request), or None.");

static PyObject *Channel_take_reply(ChannelObject *self, PyObject *arg) {
    slot_t *s = slot_arg(self, arg);
    if (s == NULL)
        return NULL;
    if (LOAD(&s->state) != SLOT_REPLIED)
        Py_RETURN_NONE;
    uint32_t len = s->len;
    if (len > self->slot_bytes)
        len = self->slot_bytes; /* a corrupt length never reads past the slot */
    PyObject *out = Py_BuildValue("(Iy#)", s->tag, (char *)s + SLOT_HEAD, (Py_ssize_t)len);
    if (out == NULL)
        return NULL;
    STORE(&s->state, (uint32_t)SLOT_WAITING);
    count_inflight(self, -1);
    return out;
}

PyDoc_STRVAR(ready_doc,
"ready(slot, /) -> bool\n\nWhether ``slot`` holds a reply to take (never waits).");

static PyObject *Channel_ready(ChannelObject *self, PyObject *arg) {
    slot_t *s = slot_arg(self, arg);
    if (s == NULL)
        return NULL;
    return PyBool_FromLong(LOAD(&s->state) == SLOT_REPLIED);
}

PyDoc_STRVAR(arm_doc,
"arm(slot, deadline_ns, /)\n\n"
"Host, before posting the request that names ``slot`` (claimed): have the\n"
"interpreter decide with begin() whether it runs, skipping it when it takes it at\n"
"or past ``deadline_ns`` (time.monotonic_ns(); < 0: no deadline), and let cancel()\n"
"skip it until then.");

/* Arm a claimed slot's go word (deadline in ns on CLOCK_MONOTONIC, < 0: none);
 * published to the interpreter by the post that follows. */
static void arm_slot(slot_t *s, long long deadline) {
    uint64_t go = deadline < 0 ? GO_NO_DEADLINE
                  : (uint64_t)deadline <= GO_SKIPPED ? GO_SKIPPED + 1 : (uint64_t)deadline;
    __atomic_store_n(&s->go, go, __ATOMIC_RELAXED);
}

static PyObject *Channel_arm(ChannelObject *self, PyObject *args) {
    unsigned int slot;
    long long deadline;
    if (!PyArg_ParseTuple(args, "IL:arm", &slot, &deadline))
        return NULL;
    if (check_attached(self) < 0 || check_slot(self, slot) < 0)
        return NULL;
    arm_slot(slot_at(self, slot), deadline);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(begin_doc,
"begin(slot, /) -> bool\n\n"
"Interpreter, having taken a request: whether to run it (True) or answer it unrun\n"
"(False: the host cancelled it, or its deadline passed).  Decided once, atomically\n"
"against cancel(); a request whose slot was not armed always runs.");

/* 1: the interpreter runs the request posted with slot s, 0: it answers it unrun
 * (begin(); also the C serving loop's decision, serve_calls). */
static int go_begin(slot_t *s) {
    uint64_t *word = &s->go;
    uint64_t go = LOAD(word);
    for (;;) {
        if (go == GO_UNARMED || go == GO_STARTED || go == GO_SKIPPED)
            return 1;
        uint64_t to = go == GO_CANCELLED || (go != GO_NO_DEADLINE && (uint64_t)now_ns() >= go)
                          ? GO_SKIPPED : GO_STARTED;
        if (__atomic_compare_exchange_n(word, &go, to, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return to == GO_STARTED;
    }
}

static PyObject *Channel_begin(ChannelObject *self, PyObject *arg) {
    slot_t *s = slot_arg(self, arg);
    if (s == NULL)
        return NULL;
    return PyBool_FromLong(go_begin(s));
}

PyDoc_STRVAR(cancel_doc,
"cancel(slot, /) -> bool\n\n"
"Host: have the request armed in ``slot`` skipped unless the interpreter started it.\n"
"True when it is skipped (now, or by the interpreter already), False when it\n"
"started (or was not armed).  Atomic against begin().");

static PyObject *Channel_cancel(ChannelObject *self, PyObject *arg) {
    slot_t *s = slot_arg(self, arg);
    if (s == NULL)
        return NULL;
    uint64_t *word = &s->go;
    uint64_t go = LOAD(word);
    for (;;) {
        if (go == GO_UNARMED || go == GO_STARTED)
            Py_RETURN_FALSE;
        if (go == GO_CANCELLED || go == GO_SKIPPED)
            Py_RETURN_TRUE;
        if (__atomic_compare_exchange_n(word, &go, GO_CANCELLED, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            Py_RETURN_TRUE;
    }
}

PyDoc_STRVAR(started_doc,
"started(slot, /) -> bool\n\nWhether the interpreter decided to run the request armed in ``slot``.");

static PyObject *Channel_started(ChannelObject *self, PyObject *arg) {
    slot_t *s = slot_arg(self, arg);
    if (s == NULL)
        return NULL;
    return PyBool_FromLong(LOAD(&s->go) == GO_STARTED);
}

PyDoc_STRVAR(asleep_doc,
"asleep(slot, /) -> bool\n\nWhether ``slot``'s caller sleeps in FUTEX_WAIT now (for tests and diagnostics).");

static PyObject *Channel_asleep(ChannelObject *self, PyObject *arg) {
    slot_t *s = slot_arg(self, arg);
    if (s == NULL)
        return NULL;
    return PyBool_FromLong(LOAD(&s->sleeping) != 0);
}

PyDoc_STRVAR(close_doc,
"close()\n\nMark the channel closed in shared memory and wake every waiter on both sides.");

static PyObject *Channel_close(ChannelObject *self, PyObject *unused) {
    if (!self->attached)
        Py_RETURN_NONE;
    header_t *h = self->h;
    SC_STORE(&h->closed, 1u);
    __atomic_add_fetch(&h->req_seq, 1u, __ATOMIC_SEQ_CST);
    futex_wake(&h->req_seq);
    for (uint32_t i = 0; i < self->nslots; i++)
        futex_wake(&slot_at(self, i)->state);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(detach_doc,
"detach()\n\nLet go of the buffer (now, or when the last wait in progress returns).");

static PyObject *Channel_detach(ChannelObject *self, PyObject *unused) {
    if (!self->attached)
        Py_RETURN_NONE;
    if (self->in_use) {
        self->detach_pending = 1;
    } else {
        self->attached = 0;
        forget_inflight(self);
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static PyObject *Channel_get_closed(ChannelObject *self, void *unused) {
    if (check_attached(self) < 0)
        return NULL;
    return PyBool_FromLong(LOAD(&self->h->closed) != 0);
}

static PyObject *Channel_get_pending(ChannelObject *self, void *unused) {
    if (check_attached(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(LOAD(&self->h->tail) - LOAD(&self->h->head));
}

static PyObject *Channel_get_taken(ChannelObject *self, void *unused) {
    if (check_attached(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(LOAD(&self->h->head));
}

static PyObject *Channel_get_geometry(ChannelObject *self, void *unused) {
    if (check_attached(self) < 0)
        return NULL;
    return Py_BuildValue("(III)", self->ring_bytes, self->nslots, self->slot_bytes);
}

static PyMethodDef Channel_methods[] = {
    {"post", (PyCFunction)Channel_post, METH_VARARGS, post_doc},
    {"take", (PyCFunction)Channel_take, METH_NOARGS, take_doc},
    {"wait_request", (PyCFunction)Channel_wait_request, METH_VARARGS, wait_request_doc},
    {"poke", (PyCFunction)Channel_poke, METH_NOARGS, poke_doc},
    {"claim", (PyCFunction)Channel_claim, METH_NOARGS, claim_doc},
    {"release", (PyCFunction)Channel_release, METH_O, release_doc},
    {"reply", (PyCFunction)Channel_reply, METH_VARARGS, reply_doc},
    {"wait_reply", (PyCFunction)Channel_wait_reply, METH_VARARGS, wait_reply_doc},
    {"take_reply", (PyCFunction)Channel_take_reply, METH_O, take_reply_doc},
    {"ready", (PyCFunction)Channel_ready, METH_O, ready_doc},
    {"asleep", (PyCFunction)Channel_asleep, METH_O, asleep_doc},
    {"arm", (PyCFunction)Channel_arm, METH_VARARGS, arm_doc},
    {"begin", (PyCFunction)Channel_begin, METH_O, begin_doc},
    {"cancel", (PyCFunction)Channel_cancel, METH_O, cancel_doc},
    {"started", (PyCFunction)Channel_started, METH_O, started_doc},
    {"close", (PyCFunction)Channel_close, METH_NOARGS, close_doc},
    {"detach", (PyCFunction)Channel_detach, METH_NOARGS, detach_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Channel_getset[] = {
    {"closed", (getter)Channel_get_closed, NULL, "True once either side called close().", NULL},
    {"geometry", (getter)Channel_get_geometry, NULL, "(ring_bytes, slots, slot_bytes)", NULL},
    {"pending", (getter)Channel_get_pending, NULL,
     "Ring bytes posted but not yet taken (0: the consumer took every request).", NULL},
    {"taken", (getter)Channel_get_taken, NULL,
     "Ring position up to which the consumer took requests (compare with post()'s result).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Channel_doc,
"Channel(buffer)\n\n"
"The call channel laid out in ``buffer`` (writable, shared, formatted by\n"
"multipy.transport.channel.prepare).  Example::\n\n"
"    >>> ch = Channel(memory)            # doctest: +SKIP\n"
"    >>> slot = ch.claim(); ch.post(b'ping', slot)\n");

static PyType_Slot Channel_slots[] = {
    {Py_tp_doc, (void *)Channel_doc},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, (void *)Channel_init},
    {Py_tp_dealloc, (void *)Channel_dealloc},
    {Py_tp_methods, Channel_methods},
    {Py_tp_getset, Channel_getset},
    {0, NULL},
};

static PyType_Spec Channel_spec = {
    .name = "multipy._native.Channel",
    .basicsize = sizeof(ChannelObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Channel_slots,
};

static PyObject *native_spinners(PyObject *m, PyObject *unused) {
    return PyLong_FromLong(__atomic_load_n(&spinners, __ATOMIC_ACQUIRE));
}

/* copy(dst, src, nbytes): memcpy between two addresses of this process (the codec
 * places tensors in the arenas with it).  Unlike ctypes.memmove it keeps the GIL
 * for copies that take less than a few hundred microseconds: every release is a
 * chance for another thread to take the GIL, and for this one to wait for it. */
#define COPY_WITHOUT_GIL (8u << 20)

static PyObject *native_copy(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy(dst, src, nbytes) takes 3 arguments");
        return NULL;
    }
    void *dst = PyLong_AsVoidPtr(args[0]);
    if (dst == NULL && PyErr_Occurred())
        return NULL;
    void *src = PyLong_AsVoidPtr(args[1]);
    if (src == NULL && PyErr_Occurred())
        return NULL;
    size_t n = PyLong_AsSize_t(args[2]);
    if (n == (size_t)-1 && PyErr_Occurred())
        return NULL;
    if (n && (dst == NULL || src == NULL)) {
        PyErr_SetString(PyExc_ValueError, "copy: a null address");
        return NULL;
    }
    if (n >= COPY_WITHOUT_GIL) {
        Py_BEGIN_ALLOW_THREADS
        memmove(dst, src, n);
        Py_END_ALLOW_THREADS
    } else {
        memmove(dst, src, n);
    }
    Py_RETURN_NONE;
}

static PyObject *native_counters(PyObject *m, PyObject *unused) {
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (int i = 0; i < C_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(__atomic_load_n(&counters[i], __ATOMIC_RELAXED));
        if (v == NULL || PyDict_SetItemString(out, counter_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

static PyObject *native_in_flight(PyObject *m, PyObject *unused) {
    return Py_BuildValue("(ll)", __atomic_load_n(&g_inflight, __ATOMIC_ACQUIRE),
                         __atomic_load_n(&g_busy, __ATOMIC_ACQUIRE));
}

/* -- the reply header of the common call (transport.messages.FAST_REPLY) ----------
 *
 * Byte layout only: which replies take this form and what the fields mean is
 * transport.messages' (it keeps the pure-Python twin of both functions).  In C the
 * header costs a few hundred instructions instead of the several thousand that the
 * Python code around struct spends on it, once per call on each side.
 *
 *   call u64 | 0x01 | flags u8 (1 output, 2 value) | npinned u16 | nunpinned u16
 *   | nblocks u16 | pinned u64[] | unpinned u64[] | blocks u64[] | value bytes
 */
#define REPLY_HEAD 16
#define REPLY_TAG 0x01
#define REPLY_OUTPUT 1
#define REPLY_VALUE 2
#define REPLY_MAX_LIST 16

static PyObject *u64_tuple(const unsigned char *p, Py_ssize_t n) {
    PyObject *t = PyTuple_New(n);
    if (t == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v;
        memcpy(&v, p + 8 * i, 8);
        PyObject *o = PyLong_FromUnsignedLongLong(v);
        if (o == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, o);
    }
    return t;
}

/* unpack_reply(frame) -> (call, value, None, pinned, unpinned, output, blocks),
 * the fields of messages.Reply; ValueError when the frame is not one. */
static PyObject *native_unpack_reply(PyObject *m, PyObject *frame) {
    (void)m;
    Py_buffer view;
    if (PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t len = view.len;
    PyObject *out = NULL, *value = NULL, *pinned = NULL, *unpinned = NULL, *blocks = NULL;
    if (len < REPLY_HEAD || p[8] != REPLY_TAG || (p[9] & ~(REPLY_OUTPUT | REPLY_VALUE))) {
        PyErr_Format(PyExc_ValueError, "malformed reply frame (%zd bytes): not a Reply", len);
        goto done;
    }
    uint64_t call;
    uint16_t n[3];
    memcpy(&call, p, 8);
    memcpy(n, p + 10, 6);
    Py_ssize_t pos = REPLY_HEAD + 8 * ((Py_ssize_t)n[0] + n[1] + n[2]);
    int has_value = (p[9] & REPLY_VALUE) != 0;
    if (pos > len || (has_value ? pos >= len : pos != len)) {
        PyErr_Format(PyExc_ValueError, "malformed reply frame (%zd bytes): not a Reply", len);
        goto done;
    }
    if (has_value) {
        value = PyBytes_FromStringAndSize((const char *)p + pos, len - pos);
    } else {
        value = Py_None;
        Py_INCREF(value);
    }
    if (value == NULL)
        goto done;
    pinned = u64_tuple(p + REPLY_HEAD, n[0]);
    unpinned = pinned ? u64_tuple(p + REPLY_HEAD + 8 * n[0], n[1]) : NULL;
    blocks = unpinned ? u64_tuple(p + REPLY_HEAD + 8 * ((Py_ssize_t)n[0] + n[1]), n[2]) : NULL;
    if (blocks == NULL)
        goto done;
    out = PyTuple_New(7);
    if (out == NULL)
        goto done;
    PyObject *id = PyLong_FromUnsignedLongLong(call);
    if (id == NULL) {
        Py_CLEAR(out);
        goto done;
    }
    PyObject *output = (p[9] & REPLY_OUTPUT) ? Py_True : Py_False;
    Py_INCREF(Py_None);
    Py_INCREF(output);
    PyTuple_SET_ITEM(out, 0, id);
    PyTuple_SET_ITEM(out, 1, value);       /* the tuple takes these references */
    PyTuple_SET_ITEM(out, 2, Py_None);
    PyTuple_SET_ITEM(out, 3, pinned);
    PyTuple_SET_ITEM(out, 4, unpinned);
    PyTuple_SET_ITEM(out, 5, output);
    PyTuple_SET_ITEM(out, 6, blocks);
    value = pinned = unpinned = blocks = NULL;
done:
    Py_XDECREF(value);
    Py_XDECREF(pinned);
    Py_XDECREF(unpinned);
    Py_XDECREF(blocks);
    PyBuffer_Release(&view);
    return out;
}

/* pack_reply(call, value, pinned, unpinned, output, blocks) -> bytes: the binary
 * reply (value: bytes or None; each list a tuple of at most 16 ints). */
static PyObject *native_pack_reply(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "pack_reply(call, value, pinned, unpinned, output, blocks) takes 6 arguments");
        return NULL;
    }
    unsigned long long call = PyLong_AsUnsignedLongLong(args[0]);
    if (call == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *value = args[1];
    if (value != Py_None && !PyBytes_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "pack_reply: value must be bytes or None");
        return NULL;
    }
    PyObject *lists[3] = {args[2], args[3], args[5]};
    Py_ssize_t n[3], items = 0;
    for (int k = 0; k < 3; k++) {
        if (!PyTuple_Check(lists[k])) {
            PyErr_SetString(PyExc_TypeError, "pack_reply: block lists must be tuples");
            return NULL;
        }
        n[k] = PyTuple_GET_SIZE(lists[k]);
        if (n[k] > REPLY_MAX_LIST) {
            PyErr_SetString(PyExc_ValueError, "pack_reply: more than 16 blocks in a list");
            return NULL;
        }
        items += n[k];
    }
    int output = PyObject_IsTrue(args[4]);
    if (output < 0)
        return NULL;
    Py_ssize_t vlen = value == Py_None ? 0 : PyBytes_GET_SIZE(value);
    PyObject *out = PyBytes_FromStringAndSize(NULL, REPLY_HEAD + 8 * items + vlen);
    if (out == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    uint64_t c = call;
    memcpy(p, &c, 8);
    p[8] = REPLY_TAG;
    p[9] = (unsigned char)((output ? REPLY_OUTPUT : 0) | (value == Py_None ? 0 : REPLY_VALUE));
    for (int k = 0; k < 3; k++) {
        uint16_t nk = (uint16_t)n[k];
        memcpy(p + 10 + 2 * k, &nk, 2);
    }
    unsigned char *q = p + REPLY_HEAD;
    for (int k = 0; k < 3; k++) {
        for (Py_ssize_t i = 0; i < n[k]; i++, q += 8) {
            uint64_t v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(lists[k], i));
            if (v == (uint64_t)-1 && PyErr_Occurred()) {
                Py_DECREF(out);
                return NULL;
            }
            memcpy(q, &v, 8);
        }
    }
    if (vlen)
        memcpy(q, PyBytes_AS_STRING(value), vlen);
    return out;
}

/* -- tensor items, through DLPack ----------------------------------------- *
 *
 * The codec's binary tensor item (see transport/codec.py, "the binary forms"):
 *
 *   5 | seg u8 | dtype u8 | ndim u8 | strided u8 | offset u64 | nbytes u64
 *     | storage_offset i64 | shape i64[ndim] (| stride i64[ndim])
 *
 * tensor_item() writes one for a torch tensor and tensor_read() makes a tensor
 * over the arena block one names, both without a Python call into torch: they
 * read and make tensors through DLPack (torch's C exchange API where torch has
 * one, its to/from "dltensor" capsules otherwise).  No torch linkage: the DLPack
 * structs below are DLPack's stable C ABI (dlpack.h, version 1.x).  Whatever
 * these functions do not handle they answer with None, and the codec takes its
 * Python path for that tensor. */

typedef struct { uint32_t major, minor; } DLPackVersion;
typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape, *strides;
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;
typedef struct DLPackExchangeAPIHeader {
    DLPackVersion version;
    struct DLPackExchangeAPIHeader *prev_api;
} DLPackExchangeAPIHeader;
typedef struct {
    DLPackExchangeAPIHeader header;
    void *managed_tensor_allocator;
    int (*managed_tensor_from_py_object_no_sync)(void *py_object, DLManagedTensorVersioned **out);
    int (*managed_tensor_to_py_object_no_sync)(DLManagedTensorVersioned *tensor, void **out_py_object);
    int (*dltensor_from_py_object_no_sync)(void *py_object, DLTensor *out);
    void *current_work_stream;
} DLPackExchangeAPI;

#define kDLCPU 1
#define ITEM_TENSOR 5
#define TENSOR_HEAD 29 /* struct "<BBBBBQQq" */
#define MAX_DIMS 16
#define SEG_OUTBOUND 0
#define SEG_RETURNED 1
#define SEG_EMPTY 2
#define CODE_COMPLEX 10 /* this wire dtype code and the ones after it are complex */

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the codec's binary forms are little-endian; this file writes them natively"
#endif

/* The binary item of a scalar (codec.Encoder._item: None, bool, an int of 64 bits,
 * a float; tags 0-4) written into b: its length (1 or 9), or 0, no error set, for
 * a value the Python path encodes.  One set of rules for calls (pack_call) and
 * results (scalar_item). */
static Py_ssize_t scalar_bytes(PyObject *v, unsigned char b[9]) {
    if (v == Py_None) {
        b[0] = 0;
        return 1;
    }
    if (v == Py_False || v == Py_True) {
        b[0] = v == Py_True ? 2 : 1;
        return 1;
    }
    if (PyLong_CheckExact(v)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (x == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        b[0] = 3;
        memcpy(b + 1, &x, 8);
        return 9;
    }
    if (PyFloat_CheckExact(v)) {
        double x = PyFloat_AS_DOUBLE(v);
        b[0] = 4;
        memcpy(b + 1, &x, 8);
        return 9;
    }
    return 0;
}

/* codec._FAST_DTYPES by code: float32 float64 float16 bfloat16 int64 int32 int16
 * int8 uint8 bool complex64 complex128, as DLPack type codes (kDLInt 0, kDLUInt 1,
 * kDLFloat 2, kDLBfloat 4, kDLComplex 5, kDLBool 6) and bits. */
static const DLDataType wire_dtypes[] = {
    {2, 32, 1}, {2, 64, 1}, {2, 16, 1}, {4, 16, 1}, {0, 64, 1}, {0, 32, 1},
    {0, 16, 1}, {0, 8, 1}, {1, 8, 1}, {6, 8, 1}, {5, 64, 1}, {5, 128, 1}};
#define WIRE_DTYPES ((int)(sizeof(wire_dtypes) / sizeof(wire_dtypes[0])))

/* Set by tensor_setup() in the interpreter that imported torch (torch runs in the
 * main interpreter only; a subinterpreter never calls it, and these functions
 * answer None there). */
static PyObject *t_tensor_type, *t_parameter_type, *t_to_dlpack, *t_from_dlpack, *t_block_type;
static const DLPackExchangeAPI *t_api;
static PyObject *s_is_neg, *s_is_conj, *s_storage_offset, *s_alloc, *s_segment, *s_address, *s_size, *s_mm, *s_classes, *s_used;

/* TensorBlock: what a tensor made by tensor_read() keeps alive (its storage holds
 * the only reference, through the DLPack deleter's context): an export of the
 * segment's mapping, so that a remap (the segment grew) never unmaps bytes a
 * tensor still views, as the numpy array of the Python path does.  The codec
 * watches it with a weak reference, as it watches the numpy array of
 * a tensor it made in Python, to learn when the block's last tensor died. */
typedef struct {
    PyObject_HEAD
    PyObject *weakreflist;
    Py_buffer mapping; /* an export of the segment's mmap: it stays mapped while viewed */
    PyObject *book;    /* told of this block's death (see "Result blocks" below), or NULL */
    uint64_t offset;   /* the block's offset in its segment, for the book */
} BlockObject;

static void book_block_died(PyObject *book, uint64_t offset);

static void Block_dealloc(BlockObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->book != NULL) {
        book_block_died(self->book, self->offset);
        Py_CLEAR(self->book);
    }
    if (self->mapping.obj != NULL)
        PyBuffer_Release(&self->mapping);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMemberDef Block_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(BlockObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Block_slots[] = {
    {Py_tp_doc, (void *)"What a tensor over an arena block made by tensor_read() keeps alive."},
    {Py_tp_dealloc, (void *)Block_dealloc},
    {Py_tp_members, Block_members},
    {0, NULL},
};

static PyType_Spec Block_spec = {
    .name = "multipy._native.TensorBlock",
    .basicsize = sizeof(BlockObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Block_slots,
};

static int finalizing(void) {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

/* A tensor's storage dies: drop its block's holder.  torch may free a storage on
 * any thread, with or without the GIL, so take it; at interpreter exit the holder
 * is left alone (the process is ending). */
static void drop_holder(void *ctx) {
    if (ctx == NULL || finalizing())
        return;
    PyGILState_STATE state = PyGILState_Ensure();
    Py_DECREF((PyObject *)ctx);
    PyGILState_Release(state);
}

typedef struct {
    DLManagedTensorVersioned mt;
    int64_t dims[2 * MAX_DIMS]; /* shape, then strides */
} versioned_t;

typedef struct {
    DLManagedTensor mt;
    int64_t dims[2 * MAX_DIMS];
} unversioned_t;

static void versioned_deleter(DLManagedTensorVersioned *mt) {
    drop_holder(mt->manager_ctx);
    PyMem_RawFree(mt);
}

static void unversioned_deleter(DLManagedTensor *mt) {
    drop_holder(mt->manager_ctx);
    PyMem_RawFree(mt);
}

/* A "dltensor" capsule that torch never consumed (it renames the ones it takes). */
static void capsule_destructor(PyObject *capsule) {
    if (PyCapsule_IsValid(capsule, "dltensor")) {
        DLManagedTensor *mt = PyCapsule_GetPointer(capsule, "dltensor");
        if (mt != NULL && mt->deleter != NULL)
            mt->deleter(mt);
    }
}

static PyObject *native_tensor_setup(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "tensor_setup(tensor_type, parameter_type, api, to_dlpack, from_dlpack)");
        return NULL;
    }
    if (!cache_here())
        return not_here("tensor_setup");
    const DLPackExchangeAPI *api = NULL;
    if (args[2] != Py_None) {
        api = PyCapsule_GetPointer(args[2], "dlpack_exchange_api");
        if (api == NULL)
            return NULL;
        /* The table grew by appending: 1.2 is the first version with all we use. */
        if (api->header.version.major != 1 || api->header.version.minor < 2 ||
            api->managed_tensor_to_py_object_no_sync == NULL ||
            api->dltensor_from_py_object_no_sync == NULL)
            api = NULL;
    }
    if (t_block_type == NULL) {
        t_block_type = PyType_FromModuleAndSpec(m, &Block_spec, NULL);
        if (t_block_type == NULL)
            return NULL;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
        INTERN(s_is_neg, "is_neg");
        INTERN(s_is_conj, "is_conj");
        INTERN(s_storage_offset, "storage_offset");
        INTERN(s_alloc, "alloc");
        INTERN(s_segment, "segment");
        INTERN(s_address, "address");
        INTERN(s_size, "size");
        INTERN(s_mm, "mm");
        INTERN(s_classes, "_classes");
        INTERN(s_used, "_used");
#undef INTERN
    }
    Py_XSETREF(t_tensor_type, Py_NewRef(args[0]));
    Py_XSETREF(t_parameter_type, Py_NewRef(args[1]));
    Py_XSETREF(t_to_dlpack, Py_NewRef(args[3]));
    Py_XSETREF(t_from_dlpack, Py_NewRef(args[4]));
    t_api = api;
    return PyBool_FromLong(api != NULL);
}

/* An int attribute of obj (an address or a size); -1 with an error set on failure. */
static int64_t int_attr(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int64_t out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (out < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "a negative address or size");
    return out;
}

/* 1 when the method `name` of t answers True, 0 False, -1 on an error. */
static int ask(PyObject *t, PyObject *name) {
    PyObject *r = PyObject_CallMethodNoArgs(t, name);
    if (r == NULL)
        return -1;
    int out = PyObject_IsTrue(r);
    Py_DECREF(r);
    return out;
}

/* storage_offset() == 0: a contiguous tensor in place is described as a plain block
 * only when it starts where its storage does (codec._in_place). */
static int at_storage_start(PyObject *t) {
    PyObject *r = PyObject_CallMethodNoArgs(t, s_storage_offset);
    if (r == NULL)
        return -1;
    long long off = PyLong_AsLongLong(r);
    Py_DECREF(r);
    if (off == -1 && PyErr_Occurred())
        return -1;
    return off == 0;
}

static PyObject *make_item(int seg, int code, const DLTensor *dl, uint64_t offset, uint64_t nbytes) {
    Py_ssize_t n = TENSOR_HEAD + 8 * (Py_ssize_t)dl->ndim;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    int64_t storage_offset = 0;
    p[0] = ITEM_TENSOR;
    p[1] = (unsigned char)seg;
    p[2] = (unsigned char)code;
    p[3] = (unsigned char)dl->ndim;
    p[4] = 0; /* a plain block: no strides */
    memcpy(p + 5, &offset, 8);
    memcpy(p + 13, &nbytes, 8);
    memcpy(p + 21, &storage_offset, 8);
    if (dl->ndim)
        memcpy(p + TENSOR_HEAD, dl->shape, 8 * (size_t)dl->ndim);
    return out;
}

/* Arena.alloc's fast path (transport/shm.py), without its Python frame: a freed
 * block of nbytes's size class, taken from arena._classes[size] and entered in
 * arena._used as Arena.alloc does (each one C call under the GIL, as there).
 * NULL without an error when the class has no free block (or nbytes is too big
 * for the classes): the caller calls Arena.alloc. */
#define ARENA_ALIGN 64
#define ARENA_SMALL (1u << 16)

static PyObject *small_block(PyObject *arena, uint64_t nbytes) {
    if (nbytes > ARENA_SMALL)
        return NULL;
    uint64_t need = nbytes > ARENA_ALIGN ? (nbytes + ARENA_ALIGN - 1) & ~(uint64_t)(ARENA_ALIGN - 1)
                                         : ARENA_ALIGN;
    need = need <= 1 ? 1 : (uint64_t)1 << (64 - __builtin_clzll(need - 1));
    PyObject *classes = PyObject_GetAttr(arena, s_classes);
    if (classes == NULL)
        return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(need), *off = NULL;
    if (key == NULL) {
        Py_DECREF(classes);
        return NULL;
    }
    PyObject *free_list = PyDict_Check(classes) ? PyDict_GetItemWithError(classes, key) : NULL;
    Py_ssize_t n;
    if (free_list != NULL && PyList_Check(free_list) && (n = PyList_GET_SIZE(free_list)) > 0) {
        PyObject *used = PyObject_GetAttr(arena, s_used);
        if (used != NULL) {
            off = Py_NewRef(PyList_GET_ITEM(free_list, n - 1));
            if (PyList_SetSlice(free_list, n - 1, n, NULL) < 0 || PyObject_SetItem(used, off, key) < 0)
                Py_CLEAR(off); /* (the block stays out of its list: lost, never handed twice) */
            Py_DECREF(used);
        }
    }
    Py_DECREF(key);
    Py_DECREF(classes);
    return off;
}

static PyObject *tensor_item(PyObject *t, PyObject *returnable, PyObject *arena, int reuse,
                             PyObject *placed);

/* tensor_item(t, returnable, arena, reuse_arena, placed) -> bytes | None */
static PyObject *native_tensor_item(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "tensor_item(t, returnable, arena, reuse_arena, placed) takes 5 arguments");
        return NULL;
    }
    int reuse = PyObject_IsTrue(args[3]);
    if (reuse < 0)
        return NULL;
    return tensor_item(args[0], args[1], args[2], reuse, args[4]);
}

static PyObject *tensor_item(PyObject *t, PyObject *returnable, PyObject *arena, int reuse,
                             PyObject *placed) {
    if (t_tensor_type == NULL ||
        ((PyObject *)Py_TYPE(t) != t_tensor_type && (PyObject *)Py_TYPE(t) != t_parameter_type))
        Py_RETURN_NONE;
    if (!PyList_Check(placed)) {
        PyErr_SetString(PyExc_TypeError, "tensor_item: placed must be a list");
        return NULL;
    }
    DLTensor dl;
    PyObject *capsule = NULL, *out = NULL;
    if (t_api != NULL) {
        if (t_api->dltensor_from_py_object_no_sync(t, &dl) != 0) {
            PyErr_Clear(); /* sparse, quantized, ...: the Python path says what it can */
            Py_RETURN_NONE;
        }
    } else {
        capsule = PyObject_CallOneArg(t_to_dlpack, t);
        if (capsule == NULL) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        DLManagedTensor *mt = PyCapsule_GetPointer(capsule, "dltensor");
        if (mt == NULL) {
            PyErr_Clear();
            goto fallback;
        }
        dl = mt->dl_tensor;
    }
    if (dl.device.device_type != kDLCPU || dl.ndim < 0 || dl.ndim > MAX_DIMS)
        goto fallback;
    int code = 0;
    while (code < WIRE_DTYPES && !(wire_dtypes[code].code == dl.dtype.code &&
                                   wire_dtypes[code].bits == dl.dtype.bits &&
                                   wire_dtypes[code].lanes == dl.dtype.lanes))
        code++;
    if (code == WIRE_DTYPES)
        goto fallback;
    uint64_t numel = 1, expect = 1;
    int contiguous = 1;
    for (int i = dl.ndim - 1; i >= 0; i--) {
        int64_t d = dl.shape[i];
        if (d < 0 || __builtin_mul_overflow(numel, (uint64_t)d, &numel))
            goto fallback;
        if (d != 1 && dl.strides != NULL && dl.strides[i] != (int64_t)expect)
            contiguous = 0;
        if (__builtin_mul_overflow(expect, (uint64_t)(d ? d : 1), &expect))
            goto fallback;
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, (uint64_t)(dl.dtype.bits / 8), &nbytes))
        goto fallback;
    if (nbytes == 0) {
        out = make_item(SEG_EMPTY, code, &dl, 0, 0);
        goto done;
    }
    if (!contiguous)
        goto fallback; /* a copy through torch: the Python path */
    /* A negative or conjugate bit is not in DLPack: such a tensor's bytes are not its
     * values.  The Python path resolves the bits into a copy. */
    int bit = ask(t, s_is_neg);
    if (bit == 0 && code >= CODE_COMPLEX)
        bit = ask(t, s_is_conj);
    if (bit != 0) {
        if (bit < 0)
            goto done;
        goto fallback;
    }
    char *address = (char *)dl.data + dl.byte_offset;
    if (returnable != Py_None) {
        int64_t base = int_attr(returnable, s_address), size;
        if (base < 0 || (size = int_attr(returnable, s_size)) < 0)
            goto done;
        if ((uintptr_t)address >= (uintptr_t)base && (uintptr_t)address < (uintptr_t)(base + size)) {
            int start = at_storage_start(t);
            if (start < 0)
                goto done;
            if (!start)
                goto fallback;
            out = make_item(SEG_RETURNED, code, &dl, (uint64_t)((uintptr_t)address - (uintptr_t)base), nbytes);
            goto done;
        }
    }
    if (arena == Py_None)
        goto fallback; /* the Python path says that tensors cannot cross this link */
    PyObject *segment = PyObject_GetAttr(arena, s_segment);
    if (segment == NULL)
        goto done;
    int64_t base = int_attr(segment, s_address), size = base < 0 ? -1 : int_attr(segment, s_size);
    Py_DECREF(segment);
    if (size < 0)
        goto done;
    if (reuse && (uintptr_t)address >= (uintptr_t)base && (uintptr_t)address < (uintptr_t)(base + size)) {
        int start = at_storage_start(t);
        if (start < 0)
            goto done;
        if (!start)
            goto fallback;
        out = make_item(SEG_OUTBOUND, code, &dl, (uint64_t)((uintptr_t)address - (uintptr_t)base), nbytes);
        goto done;
    }
    int grew = 0;
    PyObject *off = small_block(arena, nbytes);
    if (off == NULL && !PyErr_Occurred()) { /* no free block of its class: Arena.alloc */
        PyObject *n = PyLong_FromUnsignedLongLong(nbytes);
        if (n == NULL)
            goto done;
        off = PyObject_CallMethodOneArg(arena, s_alloc, n);
        Py_DECREF(n);
        grew = 1;
    }
    if (off == NULL)
        goto done;
    int appended = PyList_Append(placed, off);
    int64_t offset = PyLong_AsLongLong(off);
    Py_DECREF(off);
    if (appended < 0 || (offset < 0 && PyErr_Occurred()))
        goto done;
    if (grew) {
        segment = PyObject_GetAttr(arena, s_segment); /* alloc may have grown (remapped) it */
        if (segment == NULL)
            goto done;
        base = int_attr(segment, s_address);
        Py_DECREF(segment);
        if (base < 0)
            goto done;
    }
    if ((uint64_t)offset + nbytes > (uint64_t)size && !grew) {
        PyErr_SetString(PyExc_RuntimeError, "tensor_item: a free block past the arena's segment");
        goto done;
    }
    if (nbytes >= COPY_WITHOUT_GIL) {
        Py_BEGIN_ALLOW_THREADS
        memcpy((char *)(uintptr_t)base + offset, address, nbytes);
        Py_END_ALLOW_THREADS
    } else {
        memcpy((char *)(uintptr_t)base + offset, address, nbytes);
    }
    out = make_item(SEG_OUTBOUND, code, &dl, (uint64_t)offset, nbytes);
    goto done;
fallback:
    out = Py_NewRef(Py_None);
done:
    Py_XDECREF(capsule);
    return out;
}

/* pack_call(args, freed, returnable, arena, reuse_arena, placed) -> bytes | None
 *
 * The request CALL_REPLICATED(*args) with nothing to drop as the codec's
 * FAST_CALL (codec.Encoder.encode_request: header "<BBHHqI", method, freed u64s,
 * items), its tensors written by tensor_item.  None when the Python path must
 * encode it (keyword arguments, a recipe, an argument or field the binary form
 * does not carry, a tensor tensor_item leaves to Python); the blocks it placed
 * are then in `placed` for the caller to give back. */
#define CALL_HEAD 18
#define MAX_ITEMS 64

static PyObject *native_pack_call(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "pack_call(args, freed, returnable, arena, reuse_arena, placed) takes 6 arguments");
        return NULL;
    }
    PyObject *call = args[0], *freed = args[1];
    int reuse = PyObject_IsTrue(args[4]);
    if (reuse < 0)
        return NULL;
    if (!PyTuple_CheckExact(call) || PyTuple_GET_SIZE(call) != 6 || !PyTuple_CheckExact(freed))
        Py_RETURN_NONE;
    PyObject *rid = PyTuple_GET_ITEM(call, 0), *method = PyTuple_GET_ITEM(call, 1),
             *positional = PyTuple_GET_ITEM(call, 2), *kwargs = PyTuple_GET_ITEM(call, 3),
             *grad = PyTuple_GET_ITEM(call, 4), *recipe = PyTuple_GET_ITEM(call, 5);
    if (recipe != Py_None || !PyTuple_CheckExact(positional) || !PyLong_CheckExact(rid) ||
        (grad != Py_None && !PyLong_CheckExact(grad)) || (method != Py_None && !PyUnicode_CheckExact(method)))
        Py_RETURN_NONE;
    int has_kwargs = PyObject_IsTrue(kwargs);
    if (has_kwargs != 0)
        return has_kwargs < 0 ? NULL : Py_NewRef(Py_None);
    Py_ssize_t n = PyTuple_GET_SIZE(positional), nfreed = PyTuple_GET_SIZE(freed);
    if (n > MAX_ITEMS || nfreed > 0xFFFFFFFFLL)
        Py_RETURN_NONE; /* rare: the Python path */
    int overflow;
    long long rid_v = PyLong_AsLongLongAndOverflow(rid, &overflow);
    if (overflow || (rid_v == -1 && PyErr_Occurred()))
        goto python;
    long grad_v = 255;
    if (grad != Py_None) {
        grad_v = PyLong_AsLongAndOverflow(grad, &overflow);
        if (overflow || grad_v < 0 || grad_v > 254)
            goto python;
    }
    Py_ssize_t mlen = 0;
    const char *mbytes = NULL;
    if (method != Py_None) {
        mbytes = PyUnicode_AsUTF8AndSize(method, &mlen);
        if (mbytes == NULL || mlen >= 65535)
            goto python;
    }
    /* the items, each as bytes (tensors) or 9 bytes at most (scalars) */
    PyObject *tensors[MAX_ITEMS];
    unsigned char scalars[MAX_ITEMS][9];
    Py_ssize_t sizes[MAX_ITEMS], total = CALL_HEAD + mlen + 8 * nfreed;
    Py_ssize_t made = 0;
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < n; i++, made++) {
        PyObject *v = PyTuple_GET_ITEM(positional, i);
        tensors[i] = NULL;
        if ((sizes[i] = scalar_bytes(v, scalars[i])) == 0) {
            if (PyLong_CheckExact(v))
                goto give_up; /* an int past 64 bits */
            PyObject *item = tensor_item(v, args[2], args[3], reuse, args[5]);
            if (item == NULL)
                goto cleanup;
            if (item == Py_None) {
                Py_DECREF(item);
                goto give_up;
            }
            tensors[i] = item;
            sizes[i] = PyBytes_GET_SIZE(item);
        }
        total += sizes[i];
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        goto cleanup;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    uint16_t nargs16 = (uint16_t)n, mlen16 = method == Py_None ? 65535 : (uint16_t)mlen;
    uint32_t nfreed32 = (uint32_t)nfreed;
    p[0] = 0x02; /* FAST_CALL */
    p[1] = (unsigned char)grad_v;
    memcpy(p + 2, &nargs16, 2);
    memcpy(p + 4, &mlen16, 2);
    memcpy(p + 6, &rid_v, 8);
    memcpy(p + 14, &nfreed32, 4);
    p += CALL_HEAD;
    if (mlen) {
        memcpy(p, mbytes, (size_t)mlen);
        p += mlen;
    }
    for (Py_ssize_t i = 0; i < nfreed; i++, p += 8) {
        unsigned long long f = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(freed, i));
        if (f == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            Py_CLEAR(out);
            goto give_up; /* the Python path raises what it raises for it */
        }
        memcpy(p, &f, 8);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(p, tensors[i] != NULL ? (unsigned char *)PyBytes_AS_STRING(tensors[i]) : scalars[i],
               (size_t)sizes[i]);
        p += sizes[i];
    }
    goto cleanup;
give_up:
    PyErr_Clear();
    out = Py_NewRef(Py_None);
cleanup:
    for (Py_ssize_t i = 0; i < made && i < n; i++)
        Py_XDECREF(tensors[i]);
    return out;
python:
    PyErr_Clear();
    Py_RETURN_NONE;
}

typedef struct {
    PyObject *tensor, *holder;
    int seg;
    uint64_t offset;
    Py_ssize_t end;
} read_t;

/* The tensor item at buf[pos]: 1 with *out filled (two new references), 0 for an
 * item the Python path reads instead, -1 with an error set. */
static int tensor_at(const unsigned char *buf, Py_ssize_t len, Py_ssize_t pos, PyObject *outbound,
                     PyObject *own, read_t *out) {
    const unsigned char *p = buf + pos;
    if (t_block_type == NULL || pos < 0 || len - pos < TENSOR_HEAD || p[0] != ITEM_TENSOR)
        return 0;
    int seg = p[1], code = p[2], ndim = p[3], strided = p[4];
    uint64_t offset, nbytes;
    memcpy(&offset, p + 5, 8);
    memcpy(&nbytes, p + 13, 8);
    if (strided || seg > SEG_RETURNED || code >= WIRE_DTYPES || ndim > MAX_DIMS || nbytes == 0 ||
        len - pos < TENSOR_HEAD + 8 * ndim)
        return 0;
    int64_t dims[2 * MAX_DIMS];
    memcpy(dims, p + TENSOR_HEAD, 8 * (size_t)ndim);
    uint64_t numel = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        if (dims[i] < 0)
            return 0;
        dims[ndim + i] = (int64_t)numel; /* contiguous strides, in elements */
        if (__builtin_mul_overflow(numel, (uint64_t)dims[i], &numel))
            return 0;
    }
    DLDataType dtype = wire_dtypes[code];
    uint64_t want;
    if (__builtin_mul_overflow(numel, (uint64_t)(dtype.bits / 8), &want) || want != nbytes ||
        offset % (dtype.bits / 8) != 0) /* torch's kernels assume aligned elements */
        return 0;
    PyObject *segment = seg == SEG_OUTBOUND ? outbound : own;
    if (segment == Py_None)
        return 0;
    PyObject *mm = PyObject_GetAttr(segment, s_mm);
    if (mm == NULL)
        return -1;
    BlockObject *holder = (BlockObject *)PyType_GenericAlloc((PyTypeObject *)t_block_type, 0);
    if (holder == NULL) {
        Py_DECREF(mm);
        return -1;
    }
    int exported = PyObject_GetBuffer(mm, &holder->mapping, PyBUF_SIMPLE);
    Py_DECREF(mm);
    if (exported < 0) {
        Py_DECREF(holder);
        return -1;
    }
    if (offset > (uint64_t)holder->mapping.len || nbytes > (uint64_t)holder->mapping.len - offset) {
        Py_DECREF(holder);
        return 0; /* past the mapping: the Python path remaps, or refuses it */
    }
    char *block = (char *)holder->mapping.buf + offset;
    PyObject *tensor = NULL;
    DLTensor *dl;
    if (t_api != NULL) {
        versioned_t *v = PyMem_RawMalloc(sizeof(versioned_t));
        if (v == NULL) {
            Py_DECREF(holder);
            PyErr_NoMemory();
            return -1;
        }
        v->mt.version.major = 1;
        v->mt.version.minor = 0;
        v->mt.manager_ctx = Py_NewRef((PyObject *)holder);
        v->mt.deleter = versioned_deleter;
        v->mt.flags = 0;
        dl = &v->mt.dl_tensor;
        memcpy(v->dims, dims, sizeof(int64_t) * 2 * (size_t)ndim);
        dl->shape = v->dims;
    } else {
        unversioned_t *u = PyMem_RawMalloc(sizeof(unversioned_t));
        if (u == NULL) {
            Py_DECREF(holder);
            PyErr_NoMemory();
            return -1;
        }
        u->mt.manager_ctx = Py_NewRef((PyObject *)holder);
        u->mt.deleter = unversioned_deleter;
        dl = &u->mt.dl_tensor;
        memcpy(u->dims, dims, sizeof(int64_t) * 2 * (size_t)ndim);
        dl->shape = u->dims;
    }
    dl->data = block;
    dl->device.device_type = kDLCPU;
    dl->device.device_id = 0;
    dl->ndim = ndim;
    dl->dtype = dtype;
    dl->strides = dl->shape + ndim;
    dl->byte_offset = 0;
    if (t_api != NULL) {
        DLManagedTensorVersioned *mt = (DLManagedTensorVersioned *)((char *)dl - offsetof(DLManagedTensorVersioned, dl_tensor));
        void *made = NULL;
        /* torch owns mt from this call on (it runs the deleter itself on failure) */
        if (t_api->managed_tensor_to_py_object_no_sync(mt, &made) == 0)
            tensor = (PyObject *)made;
    } else {
        DLManagedTensor *mt = (DLManagedTensor *)dl; /* dl_tensor is its first member */
        PyObject *capsule = PyCapsule_New(mt, "dltensor", capsule_destructor);
        if (capsule == NULL) {
            unversioned_deleter(mt);
        } else {
            tensor = PyObject_CallOneArg(t_from_dlpack, capsule);
            Py_DECREF(capsule); /* consumed: torch renamed it; not: its deleter runs here */
        }
    }
    if (tensor == NULL) {
        Py_DECREF(holder);
        return -1;
    }
    out->tensor = tensor;
    out->holder = (PyObject *)holder;
    out->seg = seg;
    out->offset = offset;
    out->end = pos + TENSOR_HEAD + 8 * (Py_ssize_t)ndim;
    return 1;
}

/* tensor_read(data, pos, outbound, own) -> (tensor, holder, seg, offset, end) | None
 *
 * The tensor item at data[pos]: a tensor over its block of `outbound` (seg 0) or
 * `own` (seg 1), two Segments (or None), keeping `holder` alive.  None for what the
 * Python path reads instead: an empty or strided item, a block past the segment's
 * mapped size (the Python path remaps), or anything it would call corrupt. */
static PyObject *native_tensor_read(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "tensor_read(data, pos, outbound, own) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    read_t r;
    int got = tensor_at(view.buf, view.len, pos, args[2], args[3], &r);
    PyBuffer_Release(&view);
    if (got <= 0) {
        if (got < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *out = PyTuple_New(5);
    PyObject *seg = PyLong_FromLong(r.seg), *offset = PyLong_FromUnsignedLongLong(r.offset),
             *end = PyLong_FromSsize_t(r.end);
    if (out == NULL || seg == NULL || offset == NULL || end == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(seg);
        Py_XDECREF(offset);
        Py_XDECREF(end);
        Py_DECREF(r.tensor);
        Py_DECREF(r.holder);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, r.tensor); /* (Py_BuildValue parsed its format per call) */
    PyTuple_SET_ITEM(out, 1, r.holder);
    PyTuple_SET_ITEM(out, 2, seg);
    PyTuple_SET_ITEM(out, 3, offset);
    PyTuple_SET_ITEM(out, 4, end);
    return out;
}

/* read_call(data, pos, outbound, own)
 *     -> (rid, method, positional, grad, freed, blocks) | None
 *
 * The codec's FAST_CALL at data[pos] (header "<BBHHqI", method, freed u64s, items;
 * see codec.Decoder.decode_call), its tensors made by tensor_at.  blocks holds
 * (seg, offset, holder) for every tensor, for the decoder's books.  None for a
 * call the Python path reads instead: an item tensor_at leaves to it, or
 * anything the Python path refuses as corrupt (it says why). */
static PyObject *read_call(const unsigned char *buf, Py_ssize_t len, Py_ssize_t pos,
                           PyObject *outbound, PyObject *own);

static PyObject *native_read_call(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "read_call(data, pos, outbound, own) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = read_call(view.buf, view.len, pos, args[2], args[3]);
    PyBuffer_Release(&view);
    return out;
}

/* read_call over the bytes buf[0:len] (a bytes object's, or a ring record's). */
static PyObject *read_call(const unsigned char *buf, Py_ssize_t len, Py_ssize_t pos,
                           PyObject *outbound, PyObject *own) {
    PyObject *out = NULL, *method = NULL, *freed = NULL, *positional = NULL, *blocks = NULL;
    if (pos < 0 || len - pos < CALL_HEAD || buf[pos] != 0x02)
        goto fallback;
    int grad = buf[pos + 1];
    uint16_t nargs16, mlen;
    int64_t rid;
    uint32_t nfreed;
    memcpy(&nargs16, buf + pos + 2, 2);
    memcpy(&mlen, buf + pos + 4, 2);
    memcpy(&rid, buf + pos + 6, 8);
    memcpy(&nfreed, buf + pos + 14, 4);
    pos += CALL_HEAD;
    if (mlen == 65535) {
        method = Py_NewRef(Py_None);
    } else {
        if (len - pos < mlen)
            goto fallback;
        method = PyUnicode_DecodeUTF8((const char *)buf + pos, mlen, NULL);
        if (method == NULL) {
            PyErr_Clear();
            goto fallback;
        }
        pos += mlen;
    }
    if ((uint64_t)(len - pos) < 8 * (uint64_t)nfreed)
        goto fallback;
    freed = PyTuple_New(nfreed);
    if (freed == NULL)
        goto error;
    for (uint32_t i = 0; i < nfreed; i++, pos += 8) {
        uint64_t v;
        memcpy(&v, buf + pos, 8);
        PyObject *o = PyLong_FromUnsignedLongLong(v);
        if (o == NULL)
            goto error;
        PyTuple_SET_ITEM(freed, i, o);
    }
    positional = PyTuple_New(nargs16);
    blocks = PyList_New(0);
    if (positional == NULL || blocks == NULL)
        goto error;
    for (int i = 0; i < nargs16; i++) {
        if (pos >= len)
            goto fallback;
        PyObject *item;
        switch (buf[pos]) {
        case 0: item = Py_NewRef(Py_None); pos += 1; break;
        case 1: item = Py_NewRef(Py_False); pos += 1; break;
        case 2: item = Py_NewRef(Py_True); pos += 1; break;
        case 3:
        case 4: {
            if (len - pos < 9)
                goto fallback;
            int64_t iv;
            double dv;
            memcpy(&iv, buf + pos + 1, 8);
            memcpy(&dv, buf + pos + 1, 8);
            item = buf[pos] == 3 ? PyLong_FromLongLong(iv) : PyFloat_FromDouble(dv);
            if (item == NULL)
                goto error;
            pos += 9;
            break;
        }
        case ITEM_TENSOR: {
            read_t r;
            int got = tensor_at(buf, len, pos, outbound, own, &r);
            if (got <= 0) {
                if (got < 0)
                    goto error;
                goto fallback;
            }
            PyObject *entry = PyTuple_New(3), *seg = PyLong_FromLong(r.seg),
                     *offset = PyLong_FromUnsignedLongLong(r.offset);
            if (entry == NULL || seg == NULL || offset == NULL) {
                Py_XDECREF(entry);
                Py_XDECREF(seg);
                Py_XDECREF(offset);
                Py_DECREF(r.holder);
                Py_DECREF(r.tensor);
                goto error;
            }
            PyTuple_SET_ITEM(entry, 0, seg);
            PyTuple_SET_ITEM(entry, 1, offset);
            PyTuple_SET_ITEM(entry, 2, r.holder);
            if (PyList_Append(blocks, entry) < 0) {
                Py_DECREF(entry);
                Py_DECREF(r.tensor);
                goto error;
            }
            Py_DECREF(entry);
            item = r.tensor;
            pos = r.end;
            break;
        }
        default:
            goto fallback;
        }
        PyTuple_SET_ITEM(positional, i, item);
    }
    if (pos != len)
        goto fallback;
    PyObject *grad_obj = grad == 255 ? Py_NewRef(Py_None) : PyLong_FromLong(grad);
    PyObject *rid_obj = PyLong_FromLongLong(rid);
    if (grad_obj == NULL || rid_obj == NULL) {
        Py_XDECREF(grad_obj);
        Py_XDECREF(rid_obj);
        goto error;
    }
    out = PyTuple_Pack(6, rid_obj, method, positional, grad_obj, freed, blocks);
    Py_DECREF(grad_obj);
    Py_DECREF(rid_obj);
    goto error; /* (drops this function's references; out is kept) */
fallback:
    out = Py_NewRef(Py_None);
error:
    Py_XDECREF(method);
    Py_XDECREF(freed);
    Py_XDECREF(positional);
    Py_XDECREF(blocks);
    return out;
}

/* -- the interpreter's serving loop ------------------------------------------ *
 *
 * The interpreter side of the common call, in C: run_call calls a model the way
 * interp/state.py's _run does (an nn.Module's forward directly when torch's
 * nn.Module.__call__ would do nothing else, under the caller's autograd mode set
 * with torch's C switches), and serve_calls is the serving loop of a process
 * interpreter (backends/_process_main.py, transport/channel.py's InterpreterEnd):
 * it waits for a request, takes it, decides with the go word whether it runs,
 * reads the binary call, calls the model, writes the result's item and the reply
 * into the caller's slot and rings the bell when the host asked for it.  Whatever
 * is not that common call it hands back to the Python loop, which serves it as it
 * serves every request without this loop. */

#define SPILLED_TAG (1u << 16) /* channel.py's SPILLED */
#define FAST_CALL_TAG 0x02     /* codec.FAST_CALL */
#define FAST_VALUE_TAG 0x01    /* codec.FAST_VALUE */
#define BELL_WORD 384          /* channel.py's _BELL */
#define POLLED_WORD 388        /* channel.py's _POLLED: 1 + the slot whose reply the host polls
                                  for (poll_awaited), 0 when none: that reply rings no bell */
enum { GRAD_ON = 0, GRAD_OFF = 1, GRAD_INFERENCE = 2 }; /* messages.GradMode */

/* What a call needs of torch (call_setup), in the interpreter that set it up. */
static PyInterpreterState *r_interp;
static PyObject *r_is_inference, *r_is_grad, *r_set_grad, *r_inference_mode, *r_tracing,
    *r_hooks, *r_module_call, *r_call_impl;
static PyObject *s_dunder_call, *s_compiled_call_impl, *s_call_impl, *s_forward, *s_enter,
    *s_exit, *s_initialized, *s_dirty, *s_stdout, *s_stderr, *s_module_hooks[4], *s_global_hooks[4];

static PyObject *native_call_setup(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "call_setup(is_inference, is_grad, set_grad, "
                        "inference_mode, tracing, hooks, module_call, call_impl) takes 8 arguments");
        return NULL;
    }
    if (!cache_here())
        return not_here("call_setup");
    if (s_dunder_call == NULL) {
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
        INTERN(s_dunder_call, "__call__");
        INTERN(s_compiled_call_impl, "_compiled_call_impl");
        INTERN(s_call_impl, "_call_impl");
        INTERN(s_forward, "forward");
        INTERN(s_enter, "__enter__");
        INTERN(s_exit, "__exit__");
        INTERN(s_initialized, "_initialized");
        INTERN(s_dirty, "dirty");
        INTERN(s_stdout, "stdout");
        INTERN(s_stderr, "stderr");
        INTERN(s_module_hooks[0], "_forward_pre_hooks");
        INTERN(s_module_hooks[1], "_forward_hooks");
        INTERN(s_module_hooks[2], "_backward_pre_hooks");
        INTERN(s_module_hooks[3], "_backward_hooks");
        INTERN(s_global_hooks[0], "_global_forward_pre_hooks");
        INTERN(s_global_hooks[1], "_global_forward_hooks");
        INTERN(s_global_hooks[2], "_global_backward_pre_hooks");
        INTERN(s_global_hooks[3], "_global_backward_hooks");
#undef INTERN
    }
    PyObject **slots[8] = {&r_is_inference, &r_is_grad, &r_set_grad, &r_inference_mode,
                           &r_tracing, &r_hooks, &r_module_call, &r_call_impl};
    for (int i = 0; i < 8; i++)
        Py_XSETREF(*slots[i], Py_NewRef(args[i]));
    r_interp = PyInterpreterState_Get();
    Py_RETURN_NONE;
}

static int calls_ready(void) {
    return r_interp != NULL && r_interp == PyInterpreterState_Get();
}

/* 1 when calling `module` would call only its forward (state._direct_forward's
 * condition, read every call), 0 when not, -1 with an error set. */
static int forward_only(PyObject *module) {
    PyTypeObject *tp = Py_TYPE(module);
    PyObject *d = PyObject_GenericGetDict(module, NULL);
    if (d == NULL) {
        PyErr_Clear();
        return 0; /* no instance dict: nn.Module's own call says what is wrong */
    }
    int out = 0;
    if (!PyDict_Check(d))
        goto done;
    PyObject *compiled = PyDict_GetItemWithError(d, s_compiled_call_impl);
    if (compiled == NULL) {
        if (PyErr_Occurred())
            goto error;
        compiled = _PyType_Lookup(tp, s_compiled_call_impl);
    }
    if (compiled != Py_None)
        goto done;
    int own = PyDict_Contains(d, s_call_impl);
    if (own != 0) {
        if (own < 0)
            goto error;
        goto done;
    }
    if (_PyType_Lookup(tp, s_call_impl) != r_call_impl)
        goto done;
    for (int i = 0; i < 4; i++) {
        PyObject *hooks = PyDict_GetItemWithError(d, s_module_hooks[i]);
        if (hooks == NULL) {
            if (PyErr_Occurred())
                goto error;
            goto done; /* not nn.Module's attributes: its call says so */
        }
        int any = PyObject_IsTrue(hooks);
        if (any != 0) {
            if (any < 0)
                goto error;
            goto done;
        }
    }
    for (int i = 0; i < 4; i++) { /* torch.nn.modules.module's globals, read every call */
        PyObject *hooks = PyModule_Check(r_hooks)
                              ? Py_XNewRef(PyDict_GetItemWithError(PyModule_GetDict(r_hooks),
                                                                   s_global_hooks[i]))
                              : PyObject_GetAttr(r_hooks, s_global_hooks[i]);
        if (hooks == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_AttributeError, "torch.nn.modules.module has no %U",
                             s_global_hooks[i]);
            goto error;
        }
        int any = PyObject_IsTrue(hooks);
        Py_DECREF(hooks);
        if (any != 0) {
            if (any < 0)
                goto error;
            goto done;
        }
    }
    PyObject *tracing = PyObject_CallNoArgs(r_tracing);
    if (tracing == NULL)
        goto error;
    int traced = PyObject_IsTrue(tracing);
    Py_DECREF(tracing);
    if (traced < 0)
        goto error;
    out = !traced;
    goto done;
error:
    out = -1;
done:
    Py_DECREF(d);
    return out;
}

/* 1/0: what a no-argument switch of torch answers; -1 with an error set. */
static int ask_switch(PyObject *fn) {
    PyObject *r = PyObject_CallNoArgs(fn);
    if (r == NULL)
        return -1;
    int out = PyObject_IsTrue(r);
    Py_DECREF(r);
    return out;
}

static PyObject *call_fn(PyObject *fn, PyObject *args, PyObject *kwargs) {
    return kwargs != NULL ? PyObject_Call(fn, args, kwargs) : PyObject_CallObject(fn, args);
}

/* Call `exit_fn(*exit_args)` after a call that returned `result` (NULL: it raised,
 * the error set), keeping the call's outcome: the call's error wins over exit's. */
static PyObject *after(PyObject *result, PyObject *exit_fn, PyObject *const *exit_args,
                       size_t n) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_Vectorcall(exit_fn, exit_args, n, NULL);
    if (r == NULL) {
        if (type != NULL) { /* the call's own error: the exit's is lost, as in a finally */
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
        Py_XDECREF(result);
        return NULL;
    }
    Py_DECREF(r);
    if (type != NULL)
        PyErr_Restore(type, value, tb);
    return result;
}

/* fn(*args, **kwargs) with gradients enabled or not, the setting (`before`, or
 * asked here when < 0) put back after. */
static PyObject *with_grad(int enabled, int before, PyObject *fn, PyObject *args,
                           PyObject *kwargs) {
    if (before < 0 && (before = ask_switch(r_is_grad)) < 0)
        return NULL;
    PyObject *r = PyObject_CallOneArg(r_set_grad, enabled ? Py_True : Py_False);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    PyObject *result = call_fn(fn, args, kwargs);
    PyObject *arg = before ? Py_True : Py_False;
    return after(result, r_set_grad, &arg, 1);
}

/* state._run's call once torch is here: fn(*args, **kwargs) (kwargs may be NULL)
 * under the caller's autograd mode `grad` (< 0: the thread's own), an nn.Module's
 * forward called directly when that is all its call would do. */
static PyObject *run_call(PyObject *fn, PyObject *args, PyObject *kwargs, int grad) {
    PyObject *target = fn;
    Py_INCREF(target);
    if (_PyType_Lookup(Py_TYPE(fn), s_dunder_call) == r_module_call) {
        int direct = forward_only(fn);
        if (direct < 0) {
            Py_DECREF(target);
            return NULL;
        }
        if (direct) {
            Py_SETREF(target, PyObject_GetAttr(fn, s_forward));
            if (target == NULL)
                return NULL;
        }
    }
    PyObject *result = NULL;
    if (grad < 0) {
        result = call_fn(target, args, kwargs);
        goto done;
    }
    int inference = ask_switch(r_is_inference);
    if (inference < 0)
        goto done;
    if (inference) {
        result = grad == GRAD_INFERENCE ? call_fn(target, args, kwargs)
                                        : with_grad(grad == GRAD_ON, -1, target, args, kwargs);
    } else if (grad == GRAD_INFERENCE) { /* what `with torch._C._InferenceMode(True):` does */
        PyObject *guard = PyObject_CallOneArg(r_inference_mode, Py_True);
        if (guard == NULL)
            goto done;
        PyObject *entered = PyObject_CallMethodNoArgs(guard, s_enter);
        if (entered != NULL) {
            Py_DECREF(entered);
            result = call_fn(target, args, kwargs);
            PyObject *exit_args[4] = {guard, Py_None, Py_None, Py_None};
            PyObject *exit_fn = PyObject_GetAttr((PyObject *)Py_TYPE(guard), s_exit);
            if (exit_fn == NULL) {
                Py_CLEAR(result);
            } else {
                result = after(result, exit_fn, exit_args, 4);
                Py_DECREF(exit_fn);
            }
        }
        Py_DECREF(guard);
    } else {
        int enabled = ask_switch(r_is_grad);
        if (enabled < 0)
            goto done;
        result = enabled != (grad == GRAD_ON)
                     ? with_grad(grad == GRAD_ON, enabled, target, args, kwargs)
                     : call_fn(target, args, kwargs);
    }
done:
    Py_DECREF(target);
    return result;
}

/* run_call(fn, args, kwargs, grad) -> fn(*args, **kwargs) */
static PyObject *native_run_call(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 4 || !PyTuple_Check(args[1]) || (args[2] != Py_None && !PyDict_Check(args[2]))) {
        PyErr_SetString(PyExc_TypeError, "run_call(fn, args: tuple, kwargs: dict | None, grad) "
                        "takes 4 arguments");
        return NULL;
    }
    if (!calls_ready()) {
        PyErr_SetString(PyExc_RuntimeError, "run_call: call_setup was not called in this interpreter");
        return NULL;
    }
    int grad = -1;
    if (args[3] != Py_None) {
        grad = (int)PyLong_AsLong(args[3]);
        if (grad == -1 && PyErr_Occurred())
            return NULL;
    }
    PyObject *kwargs = args[2] == Py_None || PyDict_GET_SIZE(args[2]) == 0 ? NULL : args[2];
    return run_call(args[0], args[1], kwargs, grad);
}

/* 1 when torch.cuda may be in use here (`cuda` is state's _TORCH_CUDA[0]; None
 * before the Python path first looked torch up): the
 * Python path then runs the call (it moves to the interpreter's own stream). */
static int cuda_maybe(PyObject *cuda) {
    if (cuda == Py_None)
        return 1;
    PyObject *v = PyObject_GetAttr(cuda, s_initialized);
    if (v == NULL) {
        PyErr_Clear();
        return 1;
    }
    int out = v != Py_False;
    Py_DECREF(v);
    return out;
}

/* 1 when something was written to the interpreter's stdout or stderr (or either is
 * not the loop's tracked stream): the Python loop's _answer flushes and says so. */
static int output_written(PyObject *sys_dict) {
    PyObject *streams[2] = {PyDict_GetItemWithError(sys_dict, s_stdout),
                            PyDict_GetItemWithError(sys_dict, s_stderr)};
    for (int i = 0; i < 2; i++) {
        if (streams[i] == NULL) {
            PyErr_Clear();
            return 1;
        }
        PyObject *dirty = PyObject_GetAttr(streams[i], s_dirty);
        if (dirty == NULL) {
            PyErr_Clear();
            return 1;
        }
        Py_DECREF(dirty);
        if (dirty != Py_False)
            return 1;
    }
    return 0;
}

/* The record's bytes as a (kind, tag or slot, bytes) for the Python loop, consumed. */
static PyObject *hand_back(ChannelObject *c, record_t *r, uint32_t len, long kind,
                           unsigned long which) {
    PyObject *data = PyBytes_FromStringAndSize((char *)r + RECORD_HEAD, len);
    if (data == NULL)
        return NULL;
    consume(c, r, len);
    return Py_BuildValue("(lkN)", kind, which, data);
}

/* A scalar result as its binary item (codec.Encoder._item); NULL without an error
 * for what the Python path encodes. */
static PyObject *scalar_item(PyObject *v) {
    unsigned char b[9];
    Py_ssize_t n = scalar_bytes(v, b);
    return n ? PyBytes_FromStringAndSize((char *)b, n) : NULL;
}

/* Write the binary reply (messages.encode_reply: nothing pinned or unpinned, no
 * output) into slot s and wake its waiter; 0 when it does not fit the slot. */
static int put_reply(ChannelObject *c, slot_t *s, uint64_t call, PyObject *item, PyObject *placed) {
    Py_ssize_t nblocks = PyList_GET_SIZE(placed);
    Py_ssize_t vlen = item == NULL ? 0 : 1 + PyBytes_GET_SIZE(item);
    if (nblocks > REPLY_MAX_LIST ||
        (size_t)(REPLY_HEAD + 8 * nblocks + vlen) > (size_t)c->slot_bytes)
        return 0;
    unsigned char *p = (unsigned char *)s + SLOT_HEAD;
    memcpy(p, &call, 8);
    p[8] = REPLY_TAG;
    p[9] = item == NULL ? 0 : REPLY_VALUE;
    uint16_t n[3] = {0, 0, (uint16_t)nblocks};
    memcpy(p + 10, n, 6);
    unsigned char *q = p + REPLY_HEAD;
    for (Py_ssize_t i = 0; i < nblocks; i++, q += 8) {
        uint64_t v = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(placed, i));
        memcpy(q, &v, 8);
    }
    if (item != NULL) {
        *q = FAST_VALUE_TAG;
        memcpy(q + 1, PyBytes_AS_STRING(item), vlen - 1);
    }
    publish_reply(s, (uint32_t)(REPLY_HEAD + 8 * nblocks + vlen), 0);
    return 1;
}

/* After publish_reply (a sequentially consistent store of the slot's state): the
 * polled word is read with a sequentially consistent load, so a host that stops
 * polling (stores 0, then looks at the slot again: poll_stop) either finds the
 * reply or is rung for it (the two stores and the two loads in one total order). */
static void ring_bell(ChannelObject *c, int bell_w, uint32_t slot) {
    if (bell_w >= 0 && LOAD((uint32_t *)((char *)c->h + BELL_WORD))) {
        if (SC_LOAD((uint32_t *)((char *)c->h + POLLED_WORD)) == slot + 1u) {
            COUNT(C_BELLS_SKIPPED, 1); /* the host polls for this reply: no bell */
            return;
        }
        ssize_t w = write(bell_w, "!", 1); /* full (EAGAIN): readable already */
        (void)w;
    }
}

/* [2, slot, call, result, value, error, watched, placed]: a call whose reply the
 * Python loop finishes (Loop.finish); watched holds (offset, holder) of the argument
 * blocks of the peer's arena, as Decoder.received does.  Borrows every argument. */
static PyObject *finish_list(unsigned long slot, uint64_t call, PyObject *result,
                             PyObject *value, PyObject *error, PyObject *blocks, PyObject *placed) {
    PyObject *out = Py_BuildValue("[lkKOOO[]O]", 2L, slot, (unsigned long long)call,
                                  result ? result : Py_None, value ? value : Py_None,
                                  error ? error : Py_None, placed);
    if (out == NULL)
        return NULL;
    PyObject *watched = PyList_GET_ITEM(out, 6);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(blocks); i++) {
        PyObject *b = PyList_GET_ITEM(blocks, i);
        if (PyLong_AsLong(PyTuple_GET_ITEM(b, 0)) != SEG_OUTBOUND)
            continue;
        PyObject *entry = PyTuple_Pack(2, PyTuple_GET_ITEM(b, 1), PyTuple_GET_ITEM(b, 2));
        if (entry == NULL || PyList_Append(watched, entry) < 0) {
            Py_XDECREF(entry);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(entry);
    }
    return out;
}

PyDoc_STRVAR(serve_calls_doc,
"serve_calls(channel, spin, req_r, bell_w, replicated, args_segment, results_segment,\n"
"            results_arena, free_result, returned, pin_pending, unpinned, kept_pending,\n"
"            open_segments, links, cuda, call_plain, use_own_stream, /)\n"
"    -> None | tuple | list\n\n"
"The interpreter's serving loop for the common call (see\n"
"backends/_process_main.Loop.run): serve binary calls of loaded replicated objects\n"
"until a request needs the Python loop, then hand it back:\n"
"``(0, tag, data)`` a request taken, not served (its go word may be decided:\n"
"begin() answers True again); ``(1, slot, data)`` a request to answer unrun\n"
"(skip); ``[2, slot, call, result, value, error, watched, placed]`` a call that\n"
"ran, whose reply the Python loop finishes (Loop.finish).  None once the host\n"
"closed the channel or its request pipe, or died.");

static PyObject *native_serve_calls(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 18) {
        PyErr_SetString(PyExc_TypeError, "serve_calls takes 18 arguments");
        return NULL;
    }
    if (!is_channel(args[0])) {
        PyErr_SetString(PyExc_TypeError, "serve_calls: not a Channel");
        return NULL;
    }
    ChannelObject *c = (ChannelObject *)args[0];
    double spin = PyFloat_AsDouble(args[1]);
    int req_r = (int)PyLong_AsLong(args[2]), bell_w = (int)PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *replicated = args[4], *outbound = args[5], *own = args[6], *arena = args[7],
             *free_result = args[8], *returned = args[9], *pin_pending = args[10],
             *unpinned = args[11], *kept_pending = args[12], *open_segments = args[13],
             *links = args[14], *cuda = args[15], *call_plain = args[16],
             *use_own_stream = args[17];
    if (!PyDict_Check(replicated) || !PyList_Check(returned) || !PyList_Check(unpinned) ||
        !PyList_Check(open_segments) || !PyDict_Check(links) || !PyList_Check(cuda) ||
        PyList_GET_SIZE(cuda) != 1) {
        PyErr_SetString(PyExc_TypeError, "serve_calls: replicated and links must be dicts, "
                        "returned, unpinned and open_segments lists, cuda a list of one");
        return NULL;
    }
    PyObject *sys_module = PyImport_AddModule("sys"); /* borrowed */
    PyObject *sys_dict = sys_module == NULL ? NULL : PyModule_GetDict(sys_module);
    if (sys_dict == NULL)
        return NULL;
    for (;;) {
        if (check_attached(c) < 0)
            return NULL;
        header_t *h = c->h;
        record_t *r = ring_front(c);
        if (r == NULL) {
            PyObject *w = blocking_wait(c, request_ready, NULL, &h->req_seq, &h->req_sleeping,
                                        -1.0, spin, -1, req_r);
            if (w == NULL)
                return NULL;
            long rc = PyLong_AsLong(w);
            Py_DECREF(w);
            if (rc != READY && rc != SLEPT)
                Py_RETURN_NONE;
            continue;
        }
        int64_t n = record_len(c, r);
        if (n < 0) {
            corrupt_record();
            return NULL;
        }
        uint32_t len = (uint32_t)n, tag = r->tag, slot = tag & 0xFFFF;
        const unsigned char *buf = (const unsigned char *)r + RECORD_HEAD;
        /* The loop's state that the Python loop settles before a request: then it serves it. */
        int common = !(tag & SPILLED_TAG) && len > 8 && buf[8] == FAST_CALL_TAG &&
                     slot < c->nslots && t_tensor_type != NULL && calls_ready() &&
                     PyObject_Length(kept_pending) == 0 && PyList_GET_SIZE(open_segments) == 0 &&
                     PyDict_GET_SIZE(links) == 0;
        if (PyErr_Occurred())
            return NULL;
        if (!common)
            return hand_back(c, r, len, 0, tag);
        slot_t *s = slot_at(c, slot);
        if (!go_begin(s))
            return hand_back(c, r, len, 1, slot);
        uint64_t call;
        memcpy(&call, buf, 8);
        PyObject *read = read_call(buf, len, 8, outbound, own);
        if (read == NULL)
            PyErr_Clear(); /* the Python loop reads it again, and answers with why */
        if (read == NULL || read == Py_None) {
            Py_XDECREF(read);
            return hand_back(c, r, len, 0, tag);
        }
        consume(c, r, len);
        /* (rid, method, positional, grad, freed, blocks) */
        PyObject *rid = PyTuple_GET_ITEM(read, 0), *method = PyTuple_GET_ITEM(read, 1),
                 *grad_obj = PyTuple_GET_ITEM(read, 3), *freed = PyTuple_GET_ITEM(read, 4),
                 *blocks = Py_NewRef(PyTuple_GET_ITEM(read, 5));
        PyObject *positional = Py_NewRef(PyTuple_GET_ITEM(read, 2));
        PyObject *result = NULL, *item = NULL, *placed = PyList_New(0);
        int tail = 0; /* the Python loop finishes the reply */
        if (placed == NULL)
            goto failed;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(freed); i++) {
            PyObject *r2 = PyObject_CallOneArg(free_result, PyTuple_GET_ITEM(freed, i));
            if (r2 == NULL)
                goto failed;
            Py_DECREF(r2);
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(blocks); i++) { /* Decoder._book */
            PyObject *b = PyList_GET_ITEM(blocks, i);
            if (PyLong_AsLong(PyTuple_GET_ITEM(b, 0)) == SEG_OUTBOUND)
                continue;
            PyObject *entry = PyTuple_Pack(2, PyTuple_GET_ITEM(b, 1), PyTuple_GET_ITEM(b, 2));
            if (entry == NULL || PyList_Append(returned, entry) < 0) {
                Py_XDECREF(entry);
                goto failed;
            }
            Py_DECREF(entry);
            tail = 1; /* the Python loop watches the blocks handed back (_answer) */
        }
        PyObject *obj = PyDict_GetItemWithError(replicated, rid);
        if (obj == NULL && PyErr_Occurred())
            goto failed;
        if (obj == NULL || cuda_maybe(PyList_GET_ITEM(cuda, 0))) {
            /* not loaded (it says why), or CUDA may be in use: state.call_plain */
            PyObject *cargs[4] = {rid, method, positional, grad_obj};
            result = PyObject_Vectorcall(call_plain, cargs, 4, NULL);
        } else {
            PyObject *fn = method == Py_None ? Py_NewRef(obj) : PyObject_GetAttr(obj, method);
            if (fn == NULL)
                goto failed;
            int grad = grad_obj == Py_None ? -1 : (int)PyLong_AsLong(grad_obj);
            result = run_call(fn, positional, NULL, grad);
            Py_DECREF(fn);
            if (result != NULL && cuda_maybe(PyList_GET_ITEM(cuda, 0))) { /* the call first touched CUDA (_run) */
                PyObject *r2 = PyObject_CallNoArgs(use_own_stream);
                if (r2 == NULL)
                    Py_CLEAR(result);
                Py_XDECREF(r2);
            }
        }
        Py_CLEAR(read);
        Py_CLEAR(positional);
        if (result == NULL)
            goto failed;
        if (result != Py_None) {
            if (Py_TYPE(result) == (PyTypeObject *)t_tensor_type ||
                Py_TYPE(result) == (PyTypeObject *)t_parameter_type) {
                item = tensor_item(result, outbound, arena, 0, placed);
                if (item == NULL)
                    goto failed;
                if (item == Py_None)
                    Py_CLEAR(item);
            } else {
                item = scalar_item(result);
            }
            if (item == NULL)
                tail = 1; /* encoded by the Python path (Encoder.encode: a pickle) */
        }
        if (!tail) {
            Py_CLEAR(result);
            /* A tensor over an argument block that outlived the call: _answer pins it. */
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(blocks) && !tail; i++)
                if (Py_REFCNT(PyTuple_GET_ITEM(PyList_GET_ITEM(blocks, i), 2)) > 1)
                    tail = 1;
            if (!tail) {
                int pending = PyObject_Length(pin_pending);
                if (pending < 0)
                    goto failed;
                tail = pending > 0 || PyList_GET_SIZE(unpinned) > 0 || output_written(sys_dict);
            }
        }
        if (!tail && put_reply(c, s, call, item, placed)) {
            ring_bell(c, bell_w, slot);
            Py_XDECREF(item);
            Py_DECREF(placed);
            Py_DECREF(blocks);
            continue;
        }
        /* [2, slot, call, result, value, None, watched, placed] for Loop.finish */
        {
            PyObject *value = NULL, *out = NULL;
            if (item != NULL) {
                value = PyBytes_FromStringAndSize(NULL, 1 + PyBytes_GET_SIZE(item));
                if (value != NULL) {
                    PyBytes_AS_STRING(value)[0] = FAST_VALUE_TAG;
                    memcpy(PyBytes_AS_STRING(value) + 1, PyBytes_AS_STRING(item),
                           PyBytes_GET_SIZE(item));
                }
            }
            if (item == NULL || value != NULL)
                out = finish_list(slot, call, result, value, NULL, blocks, placed);
            Py_XDECREF(value);
            Py_XDECREF(item);
            Py_XDECREF(result);
            Py_DECREF(placed);
            Py_DECREF(blocks);
            return out;
        }
    failed: /* the call raised (or its reading or encoding did): [2, ..., error, ...] */
        {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL && value != NULL)
                PyException_SetTraceback(value, tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
            Py_XDECREF(read);
            Py_XDECREF(positional);
            Py_XDECREF(result);
            Py_XDECREF(item);
            PyObject *out = NULL;
            if (placed != NULL && value != NULL)
                out = finish_list(slot, call, NULL, NULL, value, blocks, placed);
            else if (value != NULL) /* no list to hand it back in (out of memory): raise it */
                PyErr_SetObject((PyObject *)Py_TYPE(value), value);
            Py_XDECREF(value);
            Py_XDECREF(placed);
            Py_DECREF(blocks);
            return out;
        }
    }
}

/* -- host: the books of result blocks ------------------------------------------
 *
 * A tensor that the host reads from a reply views an arena block: a block of the
 * interpreter's results arena (given back to it once the tensor died: reported
 * with the next request), or a block of the host's own arguments arena (an
 * argument handed back in place: free again once no tensor views it, its call
 * has ended and the interpreter does not keep it).  The TensorBlock that such a
 * tensor keeps alive reports its own death to its book: no weak reference, no
 * lock, no Python frame per result.  Its deallocation runs with the GIL held
 * (drop_holder takes it), so what it does to a book is one step for every other
 * thread; it never calls Python code.
 *
 * A book is a callable (the decoder's released.append: the block's offset is
 * appended as a plain int) or a HeldBlocks: per-block counts of the host's views
 * of its own argument blocks, which frees a block of up to 64 KiB into its
 * arena's size class itself (the same two dict and list steps as shm.Arena.free)
 * and leaves a larger one to settle() (shm.Arena.free takes a lock there). */

typedef struct {
    PyObject_HEAD
    PyObject *arena;   /* shm.Arena of the host's arguments */
    PyObject *used;    /* arena._used: offset -> size of the blocks in use */
    PyObject *classes; /* arena._classes: size -> free offsets, for blocks up to 64 KiB */
    PyObject *pins;    /* set: blocks the interpreter keeps after their call */
    PyObject *counts;  /* dict: offset -> live holders viewing the block */
    PyObject *pending; /* list: larger blocks whose last view died, freed by settle() */
    PyObject *refs;    /* dict: id(weakref) -> (weakref, offset), for other holders */
    PyObject *died;    /* self.died: the callback of those weak references */
} HeldObject;

static PyObject *held_type; /* made by the first held_blocks() call */
static PyObject *s_free;

#if PY_VERSION_HEX >= 0x030C0000
#define SAVE_ERROR(var) PyObject *var = PyErr_GetRaisedException()
#define RESTORE_ERROR(var) PyErr_SetRaisedException(var)
#else
#define SAVE_ERROR(var) PyObject *var##_t, *var##_v, *var##_tb; PyErr_Fetch(&var##_t, &var##_v, &var##_tb)
#define RESTORE_ERROR(var) PyErr_Restore(var##_t, var##_v, var##_tb)
#endif

/* Free the block at `key` unless the interpreter keeps it (pins) or it is free
 * already: a small block into its size class here; a larger one into pending
 * (deferred: in a deallocation or a weak reference's callback) or through
 * arena.free.  0, or -1 with an error set. */
static int held_free(HeldObject *h, PyObject *key, int deferred) {
    int pinned = PySet_Contains(h->pins, key);
    if (pinned != 0)
        return pinned < 0 ? -1 : 0;
    PyObject *size = PyDict_GetItemWithError(h->used, key); /* borrowed */
    if (size == NULL)
        return PyErr_Occurred() ? -1 : 0; /* free already */
    unsigned long long n = PyLong_AsUnsignedLongLong(size);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    PyObject *list = n <= ARENA_SMALL ? PyDict_GetItemWithError(h->classes, size) : NULL;
    if (list == NULL && PyErr_Occurred())
        return -1;
    if (list == NULL || !PyList_Check(list)) {
        if (deferred)
            return PyList_Append(h->pending, key);
        PyObject *r = PyObject_CallMethodOneArg(h->arena, s_free, key);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    Py_INCREF(list);
    int rc = PyDict_DelItem(h->used, key) < 0 ? -1 : PyList_Append(list, key);
    Py_DECREF(list);
    return rc;
}

static int held_free_unviewed(HeldObject *h, PyObject *key) {
    int viewed = PyDict_Contains(h->counts, key);
    if (viewed != 0)
        return viewed < 0 ? -1 : 0;
    return held_free(h, key, 0);
}

/* Take one view off the block at `key`'s count: 1 when it was the last (the count
 * is gone), 0 when others remain or it had none, -1 with an error set. */
static int held_uncount(HeldObject *h, PyObject *key) {
    PyObject *n = PyDict_GetItemWithError(h->counts, key);
    if (n == NULL)
        return PyErr_Occurred() ? -1 : 0;
    long c = PyLong_AsLong(n);
    if (c > 1) {
        PyObject *v = PyLong_FromLong(c - 1);
        int rc = v == NULL ? -1 : PyDict_SetItem(h->counts, key, v);
        Py_XDECREF(v);
        return rc;
    }
    return PyDict_DelItem(h->counts, key) < 0 ? -1 : 1;
}

/* One holder of the block at `key` died: freed (see held_free) after its last. */
static int held_drop(HeldObject *h, PyObject *key) {
    int last = held_uncount(h, key);
    return last <= 0 ? last : held_free(h, key, 1);
}

static int held_count(HeldObject *h, PyObject *key) {
    PyObject *n = PyDict_GetItemWithError(h->counts, key);
    if (n == NULL && PyErr_Occurred())
        return -1;
    PyObject *v = PyLong_FromLong(n == NULL ? 1 : PyLong_AsLong(n) + 1);
    int rc = v == NULL ? -1 : PyDict_SetItem(h->counts, key, v);
    Py_XDECREF(v);
    return rc;
}

/* A TensorBlock whose book was set died (from Block_dealloc). */
static void book_block_died(PyObject *book, uint64_t offset) {
    if (finalizing())
        return;
    SAVE_ERROR(saved);
    PyObject *key = PyLong_FromUnsignedLongLong(offset);
    if (key != NULL) {
        if (held_type != NULL && Py_TYPE(book) == (PyTypeObject *)held_type) {
            held_drop((HeldObject *)book, key);
        } else {
            PyObject *r = PyObject_CallOneArg(book, key);
            Py_XDECREF(r);
        }
        Py_DECREF(key);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(book);
    RESTORE_ERROR(saved);
}

/* Make `holder` (a TensorBlock of this process's reads) report its death to
 * `book`; 1 if it will, 0 if holder is not a TensorBlock or already reports. */
static int block_report(PyObject *holder, PyObject *book, uint64_t offset) {
    if (t_block_type == NULL || Py_TYPE(holder) != (PyTypeObject *)t_block_type)
        return 0;
    BlockObject *b = (BlockObject *)holder;
    if (b->book != NULL)
        return 0;
    b->book = Py_NewRef(book);
    b->offset = offset;
    return 1;
}

static int held_add(HeldObject *h, PyObject *key, PyObject *holder) {
    unsigned long long offset = PyLong_AsUnsignedLongLong(key);
    if (offset == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (held_count(h, key) < 0)
        return -1;
    if (block_report(holder, (PyObject *)h, offset))
        return 0;
    /* Another holder (a numpy array of the Python path): watched by a weak reference. */
    PyObject *ref = PyWeakref_NewRef(holder, h->died), *id = NULL, *entry = NULL;
    int rc = -1;
    if (ref != NULL && (id = PyLong_FromVoidPtr(ref)) != NULL &&
        (entry = PyTuple_Pack(2, ref, key)) != NULL)
        rc = PyDict_SetItem(h->refs, id, entry);
    Py_XDECREF(ref);
    Py_XDECREF(id);
    Py_XDECREF(entry);
    if (rc < 0) { /* not watched: not counted either (nor freed: its call has not ended) */
        SAVE_ERROR(saved);
        if (held_uncount(h, key) < 0)
            PyErr_Clear();
        RESTORE_ERROR(saved);
    }
    return rc;
}

static PyObject *Held_add(HeldObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(offset, holder) takes 2 arguments");
        return NULL;
    }
    if (held_add(self, args[0], args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Held_died(HeldObject *self, PyObject *ref) {
    PyObject *id = PyLong_FromVoidPtr(ref);
    if (id == NULL)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(self->refs, id);
    int rc = 0;
    if (entry != NULL) {
        Py_INCREF(entry);
        rc = PyDict_DelItem(self->refs, id);
        if (rc == 0)
            rc = held_drop(self, PyTuple_GET_ITEM(entry, 1));
        Py_DECREF(entry);
    } else if (PyErr_Occurred()) {
        rc = -1;
    }
    Py_DECREF(id);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int held_settle(HeldObject *h) {
    while (PyList_GET_SIZE(h->pending) > 0) {
        Py_ssize_t n = PyList_GET_SIZE(h->pending);
        PyObject *key = Py_NewRef(PyList_GET_ITEM(h->pending, n - 1));
        int rc = PyList_SetSlice(h->pending, n - 1, n, NULL);
        if (rc == 0)
            rc = held_free_unviewed(h, key);
        Py_DECREF(key);
        if (rc < 0)
            return -1;
    }
    return 0;
}

static PyObject *Held_settle(HeldObject *self, PyObject *unused) {
    (void)unused;
    if (held_settle(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* release(placed, pinned=(), unpinned=()): see the method's doc. */
static PyObject *Held_release(HeldObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "release(placed, pinned=(), unpinned=())");
        return NULL;
    }
    PyObject *seqs[3] = {NULL, NULL, NULL};
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < nargs; i++)
        if ((seqs[i] = PySequence_Fast(args[i], "release takes sequences of offsets")) == NULL)
            goto done;
    if (seqs[2] != NULL) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seqs[2]); i++) {
            PyObject *key = PySequence_Fast_GET_ITEM(seqs[2], i);
            if (PySet_Discard(self->pins, key) < 0 || held_free_unviewed(self, key) < 0)
                goto done;
        }
    }
    if (seqs[1] != NULL) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seqs[1]); i++)
            if (PySet_Add(self->pins, PySequence_Fast_GET_ITEM(seqs[1], i)) < 0)
                goto done;
    }
    if (held_settle(self) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seqs[0]); i++)
        if (held_free_unviewed(self, PySequence_Fast_GET_ITEM(seqs[0], i)) < 0)
            goto done;
    out = Py_NewRef(Py_None);
done:
    for (int i = 0; i < 3; i++)
        Py_XDECREF(seqs[i]);
    return out;
}

static int Held_contains(HeldObject *self, PyObject *key) {
    return PyDict_Contains(self->counts, key);
}

static PyObject *Held_get_pending(HeldObject *self, void *unused) {
    (void)unused;
    return Py_NewRef(self->pending);
}

static PyObject *Held_get_viewed(HeldObject *self, void *unused) {
    (void)unused;
    return PyDict_Copy(self->counts);
}

static int Held_traverse(HeldObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->arena);
    Py_VISIT(self->used);
    Py_VISIT(self->classes);
    Py_VISIT(self->pins);
    Py_VISIT(self->counts);
    Py_VISIT(self->pending);
    Py_VISIT(self->refs);
    Py_VISIT(self->died);
    return 0;
}

static int Held_clear(HeldObject *self) {
    Py_CLEAR(self->arena);
    Py_CLEAR(self->used);
    Py_CLEAR(self->classes);
    Py_CLEAR(self->pins);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->refs);
    Py_CLEAR(self->died);
    return 0;
}

/* The deallocator of this module's garbage-collected heap types (HeldBlocks,
 * Caller): untracked, its references dropped by its tp_clear, freed, and its
 * type's reference given back (each instance of a heap type holds one). */
static void gc_dealloc(PyObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    tp->tp_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef Held_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Held_add, METH_FASTCALL,
     "add(offset, holder, /)\n\nCount a view of the block at offset, kept alive by holder, until\n"
     "holder dies."},
    {"died", (PyCFunction)Held_died, METH_O,
     "died(ref, /)\n\nThe callback of the weak references to holders that are not TensorBlocks."},
    {"settle", (PyCFunction)Held_settle, METH_NOARGS,
     "settle()\n\nFree the blocks larger than 64 KiB whose last view died (pending)."},
    {"release", (PyCFunction)(void (*)(void))Held_release, METH_FASTCALL,
     "release(placed, pinned=(), unpinned=(), /)\n\nA call ended: the blocks in unpinned leave the pins (and are freed\n"
     "unless viewed), those in pinned join them, and the call's placed blocks are\n"
     "freed unless viewed or pinned."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Held_getset[] = {
    {"pending", (getter)Held_get_pending, NULL,
     "Blocks larger than 64 KiB whose last view died, until settle().", NULL},
    {"viewed", (getter)Held_get_viewed, NULL, "A copy of the counts: offset -> live views.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Held_slots[] = {
    {Py_tp_doc, (void *)"The host's books of its argument blocks that result tensors view "
                        "(see multipy.transport.shm.held_blocks)."},
    {Py_tp_dealloc, (void *)gc_dealloc},
    {Py_tp_traverse, (void *)Held_traverse},
    {Py_tp_clear, (void *)Held_clear},
    {Py_tp_methods, Held_methods},
    {Py_tp_getset, Held_getset},
    {Py_sq_contains, (void *)Held_contains},
    {0, NULL},
};

static PyType_Spec Held_spec = {
    .name = "multipy._native.HeldBlocks",
    .basicsize = sizeof(HeldObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Held_slots,
};

static PyObject *native_held_blocks(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PySet_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "held_blocks(arena, pins): pins is a set");
        return NULL;
    }
    if (!cache_here())
        return not_here("held_blocks");
    if (held_type == NULL) {
        if ((s_free = PyUnicode_InternFromString("free")) == NULL)
            return NULL;
        if (s_used == NULL && (s_used = PyUnicode_InternFromString("_used")) == NULL)
            return NULL;
        if (s_classes == NULL && (s_classes = PyUnicode_InternFromString("_classes")) == NULL)
            return NULL;
        if ((held_type = PyType_FromModuleAndSpec(m, &Held_spec, NULL)) == NULL)
            return NULL;
    }
    HeldObject *h = (HeldObject *)PyType_GenericAlloc((PyTypeObject *)held_type, 0);
    if (h == NULL)
        return NULL;
    h->arena = Py_NewRef(args[0]);
    h->pins = Py_NewRef(args[1]);
    if ((h->used = PyObject_GetAttr(args[0], s_used)) == NULL ||
        (h->classes = PyObject_GetAttr(args[0], s_classes)) == NULL ||
        (h->counts = PyDict_New()) == NULL || (h->pending = PyList_New(0)) == NULL ||
        (h->refs = PyDict_New()) == NULL ||
        (h->died = PyObject_GetAttrString((PyObject *)h, "died")) == NULL) {
        Py_DECREF(h);
        return NULL;
    }
    if (!PyDict_Check(h->used) || !PyDict_Check(h->classes)) {
        PyErr_SetString(PyExc_TypeError, "held_blocks(arena, pins): arena is a multipy shm.Arena");
        Py_DECREF(h);
        return NULL;
    }
    return (PyObject *)h;
}

/* tensor_value(data, outbound, own, released, held) -> tensor | None
 *
 * The common reply's value, a binary FAST_VALUE that is one tensor item
 * (data[0] is the tag, the item fills the rest): the tensor, over its block,
 * whose holder reports its death itself: a block of outbound by calling
 * released(offset), a block of own to held (a HeldBlocks).  None for what the
 * decoder reads otherwise. */
/* Book the block a read result tensor views: a block of the interpreter's results
 * arena is reported to released at its holder's death, one of the host's own
 * arguments arena is counted in held (Py_None: neither is booked).  0, or -1 with
 * an error set. */
static int book_value(const read_t *r, PyObject *released, PyObject *held) {
    if (r->seg == SEG_OUTBOUND) {
        if (released != Py_None)
            block_report(r->holder, released, r->offset);
        return 0;
    }
    if (held == Py_None)
        return 0;
    PyObject *key = PyLong_FromUnsignedLongLong(r->offset);
    int rc = key == NULL ? -1 : held_add((HeldObject *)held, key, r->holder);
    Py_XDECREF(key);
    return rc;
}

static PyObject *native_tensor_value(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "tensor_value(data, outbound, own, released, held) takes 5 arguments");
        return NULL;
    }
    PyObject *released = args[3], *held = args[4];
    if (held != Py_None && (held_type == NULL || Py_TYPE(held) != (PyTypeObject *)held_type)) {
        PyErr_SetString(PyExc_TypeError, "tensor_value: held is a HeldBlocks or None");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    read_t r;
    int got = tensor_at(view.buf, view.len, 1, args[1], args[2], &r);
    Py_ssize_t len = view.len;
    PyBuffer_Release(&view);
    if (got < 0)
        return NULL;
    if (got == 0)
        Py_RETURN_NONE;
    int rc = 0;
    if (r.end != len) {
        rc = 1; /* not the whole value: the decoder reads it */
    } else {
        rc = book_value(&r, released, held);
    }
    Py_DECREF(r.holder);
    if (rc != 0) {
        Py_DECREF(r.tensor);
        if (rc < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    return r.tensor;
}

/* watch_block(holder, offset, book) -> bool: make a TensorBlock report its death
 * to book (a callable, given the offset); False for any other holder. */
static PyObject *native_watch_block(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "watch_block(holder, offset, book) takes 3 arguments");
        return NULL;
    }
    unsigned long long offset = PyLong_AsUnsignedLongLong(args[1]);
    if (offset == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(block_report(args[0], args[2], offset));
}

/* -- host: the end of a blocking call, in one C call -----------------------------
 *
 * A Caller is what the process backend's blocking caller needs to end its call on
 * one generation's channel: the channel, the worker's books of the calls in
 * flight (call id -> reply slot, ring position, argument blocks) and of the
 * result blocks (the decoder's released.append, HeldBlocks), the two arenas'
 * segments, and the HostEnd whose spin the wait adapts (as HostEnd.wait does).
 * finish() waits for the reply (the GIL released once), and when it is the common
 * one (in the slot, binary, answering this call, no output to pump, its value
 * none or one tensor) settles it here: the slot given back, the call's books
 * closed, the tensor made over its block, the argument blocks released.  Any
 * other reply is left in its slot for the Python path, which also handles a
 * timeout, a dead interpreter and a detached channel. */

typedef struct {
    PyObject_HEAD
    ChannelObject *channel;
    PyObject *slots, *ends, *owed; /* dicts: call id -> slot, ring position, placed blocks */
    PyObject *held;                /* HeldBlocks of the arguments arena */
    PyObject *outbound, *own;      /* Segments: the results arena's, the arguments arena's */
    PyObject *released;            /* released.append: a results block's death */
    PyObject *end;                 /* the HostEnd: its spin and backoff (spin, _skip, _backoff) */
    PyObject *worker;              /* the ProcessWorker: its _next_call */
    PyObject *callers;             /* dict: call id -> thread of its blocking caller */
    PyObject *arena;               /* shm.Arena of the arguments */
    Py_ssize_t limit;              /* the largest request the ring takes (HostEnd.limit) */
    int cores, fd;
} CallerObject;

static PyObject *s_next_call;

static PyObject *s_spin, *s_skip, *s_backoff;

/* obj.name, for a plain instance attribute: read from the instance's __dict__
 * without looking at its type first (a getattr's type lookup costs more than the
 * dict's); anything else (a class attribute, a property, no __dict__) by getattr.
 * The attributes read so are plain instance attributes that no class of theirs
 * defines as a descriptor. */
static PyObject *iattr(PyObject *obj, PyObject *name) {
    PyObject **dict = _PyObject_GetDictPtr(obj);
    if (dict != NULL && *dict != NULL) {
        PyObject *v = PyDict_GetItemWithError(*dict, name);
        if (v != NULL)
            return Py_NewRef(v);
        if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_GetAttr(obj, name);
}

/* obj.name = v, into the instance's __dict__ when the attribute is there already. */
static int iset(PyObject *obj, PyObject *name, PyObject *v) {
    PyObject **dict = _PyObject_GetDictPtr(obj);
    if (dict != NULL && *dict != NULL && PyDict_GetItemWithError(*dict, name) != NULL)
        return PyDict_SetItem(*dict, name, v);
    return PyErr_Occurred() ? -1 : PyObject_SetAttr(obj, name, v);
}

static long long_attr(PyObject *obj, PyObject *name) {
    PyObject *v = iattr(obj, name);
    if (v == NULL)
        return -1;
    long n = PyLong_AsLong(v);
    Py_DECREF(v);
    return n;
}

static int set_long_attr(PyObject *obj, PyObject *name, long n) {
    PyObject *v = PyLong_FromLong(n);
    int rc = v == NULL ? -1 : iset(obj, name, v);
    Py_XDECREF(v);
    return rc;
}

static PyObject *caller_type;

/* The blocks of a reply header (u64 little-endian) as offsets: pinned ones join
 * held's pins, unpinned ones leave them (freed unless viewed), then the call's
 * placed blocks are freed unless viewed or pinned (HeldBlocks.release). */
static int held_end_call(HeldObject *h, PyObject *placed, const unsigned char *pinned, int npinned,
                         const unsigned char *unpinned, int nunpinned) {
    for (int i = 0; i < nunpinned; i++) {
        uint64_t v;
        memcpy(&v, unpinned + 8 * i, 8);
        PyObject *key = PyLong_FromUnsignedLongLong(v);
        int rc = key == NULL ? -1 : PySet_Discard(h->pins, key);
        if (rc >= 0)
            rc = held_free_unviewed(h, key);
        Py_XDECREF(key);
        if (rc < 0)
            return -1;
    }
    for (int i = 0; i < npinned; i++) {
        uint64_t v;
        memcpy(&v, pinned + 8 * i, 8);
        PyObject *key = PyLong_FromUnsignedLongLong(v);
        int rc = key == NULL ? -1 : PySet_Add(h->pins, key);
        Py_XDECREF(key);
        if (rc < 0)
            return -1;
    }
    if (held_settle(h) < 0)
        return -1;
    if (placed != NULL && PyList_Check(placed)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(placed); i++)
            if (held_free_unviewed(h, PyList_GET_ITEM(placed, i)) < 0)
                return -1;
    }
    return 0;
}

/* The reply in slot s, when it is the common one answering call (in the slot,
 * binary, no output to pump, its value none or one tensor): settled here (the
 * slot given back, the call's books closed, the tensor made over its block, the
 * argument blocks released) and *out = (value, None): returns 1.  0 when it is
 * not there or not the common one (left in its slot for the Python path), -1 on
 * an error.  posted: the worker's posted calls (call id -> entry), or NULL: a
 * posted call's entry leaves them too, and the bell word is cleared once none is
 * left, in this same step (see Caller.unwant_bell). */
static int settle_common(CallerObject *self, slot_t *s, unsigned long long call, PyObject *posted,
                         PyObject **out) {
    ChannelObject *c = self->channel;
    if (LOAD(&s->state) != SLOT_REPLIED || (s->tag & SPILLED_TAG))
        return 0;
    uint32_t len = s->len;
    if (len > c->slot_bytes)
        return 0;
    const unsigned char *p = (const unsigned char *)s + SLOT_HEAD;
    if (len < REPLY_HEAD || p[8] != REPLY_TAG || (p[9] & ~REPLY_VALUE))
        return 0; /* not binary, or output to pump, or malformed: Python's */
    uint64_t id;
    uint16_t n[3];
    memcpy(&id, p, 8);
    memcpy(n, p + 10, 6);
    Py_ssize_t pos = REPLY_HEAD + 8 * ((Py_ssize_t)n[0] + n[1] + n[2]);
    int has_value = (p[9] & REPLY_VALUE) != 0;
    if (id != call || pos > (Py_ssize_t)len || (has_value ? pos >= (Py_ssize_t)len : pos != (Py_ssize_t)len))
        return 0;
    PyObject *key = PyLong_FromUnsignedLongLong(call);
    if (key == NULL)
        return -1;
    int owed = PyDict_Contains(self->owed, key);
    if (owed <= 0) {
        Py_DECREF(key);
        return owed;
    }
    read_t r = {NULL, NULL, 0, 0, 0};
    if (has_value) {
        if (p[pos] != FAST_VALUE_TAG) {
            Py_DECREF(key);
            return 0;
        }
        int got = tensor_at(p + pos, (Py_ssize_t)len - pos, 1, self->outbound, self->own, &r);
        if (got <= 0 || r.end != (Py_ssize_t)len - pos) {
            if (got > 0) {
                Py_DECREF(r.tensor);
                Py_DECREF(r.holder);
            }
            Py_DECREF(key);
            return got < 0 ? -1 : 0; /* a scalar, several items...: the decoder's */
        }
    }
    /* Ours: settle it.  No signal handler runs from here to the return, so the
     * call's books close together with the slot.  The slot is given back last:
     * its header is read until then (a collection run by an allocation here may
     * let another thread claim a free slot and the interpreter answer in it). */
    PyObject *placed = PyDict_GetItemWithError(self->owed, key);
    Py_XINCREF(placed);
    int failed = placed == NULL || PyDict_DelItem(self->owed, key) < 0;
    if (!failed && PyDict_DelItem(self->slots, key) < 0)
        PyErr_Clear(); /* (not recorded: nothing to forget) */
    if (!failed && PyDict_DelItem(self->ends, key) < 0)
        PyErr_Clear();
    if (!failed && posted != NULL) {
        if (PyDict_DelItem(posted, key) < 0)
            PyErr_Clear();
        if (PyDict_GET_SIZE(posted) == 0) /* no posted call left: no more rings */
            STORE((uint32_t *)((char *)c->h + BELL_WORD), 0u);
    }
    Py_DECREF(key);
    PyObject *value = Py_None;
    if (!failed && r.tensor != NULL) {
        value = r.tensor;
        failed = book_value(&r, self->released, self->held) < 0;
    }
    Py_XDECREF(r.holder);
    if (!failed && self->held != Py_None)
        failed = held_end_call((HeldObject *)self->held, placed, p + REPLY_HEAD, n[0],
                               p + REPLY_HEAD + 8 * n[0], n[1]) < 0;
    Py_XDECREF(placed);
    STORE(&s->state, (uint32_t)SLOT_FREE); /* take_reply and release, in one */
    count_inflight(c, -1);
    if (failed) {
        Py_XDECREF(r.tensor);
        return -1;
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_XDECREF(r.tensor);
        return -1;
    }
    PyTuple_SET_ITEM(pair, 0, value == Py_None ? Py_NewRef(Py_None) : value);
    PyTuple_SET_ITEM(pair, 1, Py_NewRef(Py_None));
    *out = pair;
    return 1;
}

/* finish(call, slot, timeout) -> (value, None) | int
 *
 * (value, None): the common reply, settled.  An int: what the wait said
 * (transport.channel.Wait) when the reply is not settled here: READY or SLEPT (it
 * is in the slot, for the Python path), TIMEOUT, DEAD or CLOSED.  ValueError when
 * the channel is detached. */
static PyObject *caller_finish(CallerObject *self, unsigned long long call, unsigned long slot,
                               double timeout);

static PyObject *Caller_finish(CallerObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "finish(call, slot, timeout) takes 3 arguments");
        return NULL;
    }
    unsigned long long call = PyLong_AsUnsignedLongLong(args[0]);
    unsigned long slot = PyLong_AsUnsignedLong(args[1]);
    double timeout = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    return caller_finish(self, call, slot, timeout);
}

/* Caller.finish, its arguments read (timeout < 0: none). */
static PyObject *caller_finish(CallerObject *self, unsigned long long call, unsigned long slot,
                               double timeout) {
    ChannelObject *c = self->channel;
    if (check_attached(c) < 0 || check_slot(c, (unsigned int)slot) < 0)
        return NULL;
    slot_t *s = slot_at(c, (unsigned int)slot);
    /* HostEnd.wait's adaptive spin, on the HostEnd's own state */
    PyObject *spin_obj = iattr(self->end, s_spin);
    double spin = spin_obj == NULL ? -1.0 : PyFloat_AsDouble(spin_obj);
    Py_XDECREF(spin_obj);
    long skip = spin > 0 ? long_attr(self->end, s_skip) : 0;
    if (PyErr_Occurred())
        return NULL;
    if (spin > 0 && skip > 0) {
        if (set_long_attr(self->end, s_skip, skip - 1) < 0)
            return NULL;
        spin = 0.0;
    }
    PyObject *waited = blocking_wait(c, reply_ready, s, &s->state, &s->sleeping, timeout, spin,
                                     self->cores, self->fd);
    if (waited == NULL)
        return NULL;
    long rc = PyLong_AsLong(waited);
    if (rc == SLEPT && spin > 0) {
        long backoff = long_attr(self->end, s_backoff);
        backoff = backoff < 1 ? 2 : backoff * 2 > 64 ? 64 : backoff * 2;
        if (set_long_attr(self->end, s_backoff, backoff) < 0 ||
            set_long_attr(self->end, s_skip, backoff) < 0) {
            Py_DECREF(waited);
            return NULL;
        }
    } else if (rc == READY) {
        if (set_long_attr(self->end, s_backoff, 1) < 0) {
            Py_DECREF(waited);
            return NULL;
        }
    }
    if ((rc != READY && rc != SLEPT) || check_attached(c) < 0) {
        PyErr_Clear(); /* detached meanwhile: the Python path says so */
        return waited;
    }
    PyObject *out = NULL;
    int settled = settle_common(self, s, call, NULL, &out);
    if (settled == 0)
        return waited;
    Py_DECREF(waited);
    return settled > 0 ? out : NULL;
}


/* Give back the blocks a send placed before it gave up. */
static void give_back(CallerObject *self, PyObject *placed) {
    SAVE_ERROR(saved);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(placed); i++) {
        PyObject *r = PyObject_CallMethodOneArg(self->arena, s_free, PyList_GET_ITEM(placed, i));
        if (r == NULL)
            PyErr_WriteUnraisable(self->arena);
        Py_XDECREF(r);
    }
    RESTORE_ERROR(saved);
}

static int set_item_ull(PyObject *dict, PyObject *key, unsigned long long v) {
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int rc = o == NULL ? -1 : PyDict_SetItem(dict, key, o);
    Py_XDECREF(o);
    return rc;
}

/* Send the call (args: the call's arguments, freed: the released blocks it
 * reports) the way send() and post() do: the binary call written (pack_call), a
 * reply slot claimed (armed with deadline for a posted call: entry not NULL), the
 * request posted with its call id (worker._next_call + 1), and the call's books
 * kept in the same step (owed, slots, ends, _next_call; callers for a blocking
 * call, posted[call] = entry for a posted one, whose reply rings the bell).
 * Returns the call id and sets *placed_out (new references), Py_None (new) for
 * what the Python path sends, NULL on an error. */
static PyObject *caller_post(CallerObject *self, PyObject *call_args, PyObject *freed,
                             PyObject *entry, PyObject *posted, long long deadline,
                             PyObject **placed_out, long *slot_out) {
    ChannelObject *c = self->channel;
    if (!c->attached || c->detach_pending)
        Py_RETURN_NONE;
    PyObject *placed = PyList_New(0);
    if (placed == NULL)
        return NULL;
    PyObject *pack_args[6] = {call_args, freed, self->outbound, self->arena, Py_True, placed};
    PyObject *data = native_pack_call(NULL, pack_args, 6);
    PyObject *out = NULL, *key = NULL;
    if (data == NULL || data == Py_None)
        goto give_up;
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (len + 8 > self->limit)
        goto give_up;
    PyObject *next = iattr(self->worker, s_next_call);
    if (next == NULL)
        goto give_up;
    unsigned long long call = PyLong_AsUnsignedLongLong(next) + 1;
    Py_DECREF(next);
    if (PyErr_Occurred() || (key = PyLong_FromUnsignedLongLong(call)) == NULL)
        goto give_up;
    long slot = claim_slot(c);
    if (slot < 0)
        goto give_up;
    if (entry != NULL) {
        arm_slot(slot_at(c, (uint32_t)slot), deadline);
        /* Before the request is published (the post is a full barrier): its reply rings. */
        STORE((uint32_t *)((char *)c->h + BELL_WORD), 1u);
    }
    uint64_t id = call;
    uint64_t end = ring_post(c, &id, 8, PyBytes_AS_STRING(data), (size_t)len, (uint32_t)slot);
    if (end == 0) {
        STORE(&slot_at(c, (uint32_t)slot)->state, (uint32_t)SLOT_FREE);
        goto give_up;
    }
    /* Sent: the books, in this same step. */
    Py_CLEAR(data);
    if (PyDict_SetItem(self->owed, key, placed) < 0 ||
        (entry == NULL ? set_item_ull(self->callers, key, PyThread_get_thread_ident())
                       : PyDict_SetItem(posted, key, entry)) < 0 ||
        set_item_ull(self->slots, key, (unsigned long long)slot) < 0 ||
        set_item_ull(self->ends, key, end) < 0 ||
        iset(self->worker, s_next_call, key) < 0)
        goto done;
    out = Py_NewRef(key);
    *placed_out = Py_NewRef(placed);
    if (slot_out != NULL)
        *slot_out = slot;
    goto done;
give_up:
    if (PyList_GET_SIZE(placed) > 0)
        give_back(self, placed);
    if (!PyErr_Occurred())
        out = Py_NewRef(Py_None);
done:
    Py_XDECREF(data);
    Py_XDECREF(key);
    Py_DECREF(placed);
    return out;
}

/* send(op, args, freed, timeout) -> (call, placed, op, timeout) | None
 *
 * The common blocking call CALL_REPLICATED(*args) sent under the worker lock
 * (caller_post), its books kept in the same step, so that no signal handler can
 * run between the post and the books.  None, with nothing sent or kept, for what
 * the Python path sends (a request pack_call leaves to it, one too big for the
 * ring, no free slot, no room in the ring, a detached channel). */
static PyObject *Caller_send(CallerObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send(op, args, freed, timeout) takes 4 arguments");
        return NULL;
    }
    PyObject *placed = NULL;
    PyObject *key = caller_post(self, args[1], args[2], NULL, NULL, -1, &placed, NULL);
    if (key == NULL || key == Py_None)
        return key;
    PyObject *out = PyTuple_Pack(4, key, placed, args[0], args[3]);
    Py_DECREF(key);
    Py_DECREF(placed);
    return out;
}

/* -- host: posted calls, sent and settled in C ----------------------------------
 *
 * A posted call (submit, acall, a batch, a served request) is sent by whichever
 * thread dispatches it and collected by a completion context once the bell says
 * its reply is there.  Its common case takes one C call each way, as a blocking
 * call's does: post() sends it and keeps its books (caller_post), collect()
 * settles its common reply (settle_common) without waiting.  The worker's dict of
 * posted calls and the bell word change together in these calls (and in
 * unwant_bell for the Python path), so no thread can clear the bell between
 * another's post and its reply. */

/* post(args, freed, entry, posted, deadline_ns) -> (call, placed) | None */
static PyObject *Caller_post(CallerObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "post(args, freed, entry, posted, deadline_ns) takes 5 arguments, posted a dict");
        return NULL;
    }
    long long deadline = PyLong_AsLongLong(args[4]);
    if (deadline == -1 && PyErr_Occurred())
        return NULL;
    PyObject *placed = NULL;
    PyObject *key = caller_post(self, args[0], args[1], args[2], args[3], deadline, &placed, NULL);
    if (key == NULL || key == Py_None)
        return key;
    PyObject *out = PyTuple_Pack(2, key, placed);
    Py_DECREF(key);
    Py_DECREF(placed);
    return out;
}

/* collect(call, slot, posted) -> (value, None) | None */
static PyObject *Caller_collect(CallerObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "collect(call, slot, posted) takes 3 arguments, posted a dict");
        return NULL;
    }
    ChannelObject *c = self->channel;
    unsigned long long call = PyLong_AsUnsignedLongLong(args[0]);
    unsigned long slot = PyLong_AsUnsignedLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (!c->attached || c->detach_pending || slot >= c->nslots)
        Py_RETURN_NONE; /* the Python path says what happened */
    PyObject *out = NULL;
    int settled = settle_common(self, slot_at(c, (unsigned int)slot), call, args[2], &out);
    if (settled == 0)
        Py_RETURN_NONE;
    return settled > 0 ? out : NULL;
}

/* unwant_bell(posted) -> None */
static PyObject *Caller_unwant_bell(CallerObject *self, PyObject *posted) {
    if (!PyDict_Check(posted)) {
        PyErr_SetString(PyExc_TypeError, "unwant_bell(posted): posted is a dict");
        return NULL;
    }
    ChannelObject *c = self->channel;
    if (c->attached && PyDict_GET_SIZE(posted) == 0)
        STORE((uint32_t *)((char *)c->h + BELL_WORD), 0u);
    Py_RETURN_NONE;
}

static int Caller_traverse(CallerObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->channel);
    Py_VISIT(self->slots);
    Py_VISIT(self->ends);
    Py_VISIT(self->owed);
    Py_VISIT(self->held);
    Py_VISIT(self->outbound);
    Py_VISIT(self->own);
    Py_VISIT(self->released);
    Py_VISIT(self->end);
    Py_VISIT(self->worker);
    Py_VISIT(self->callers);
    Py_VISIT(self->arena);
    return 0;
}

static int Caller_clear(CallerObject *self) {
    Py_CLEAR(self->channel);
    Py_CLEAR(self->slots);
    Py_CLEAR(self->ends);
    Py_CLEAR(self->owed);
    Py_CLEAR(self->held);
    Py_CLEAR(self->outbound);
    Py_CLEAR(self->own);
    Py_CLEAR(self->released);
    Py_CLEAR(self->end);
    Py_CLEAR(self->worker);
    Py_CLEAR(self->callers);
    Py_CLEAR(self->arena);
    return 0;
}

static PyMethodDef Caller_methods[] = {
    {"send", (PyCFunction)(void (*)(void))Caller_send, METH_FASTCALL,
     "send(op, args, freed, timeout, /) -> (call, placed, op, timeout) | None\n\n"
     "Send the common call CALL_REPLICATED(*args) (the worker lock held) and keep its\n"
     "books; None, with nothing sent, for what the Python path sends."},
    {"finish", (PyCFunction)(void (*)(void))Caller_finish, METH_FASTCALL,
     "finish(call, slot, timeout, /) -> (value, None) | int\n\n"
     "Wait for the reply to call in slot (timeout in seconds, < 0: none; the GIL\n"
     "released once) and settle it when it is the common one: (value, None).  Else\n"
     "what the wait said (transport.channel.Wait), the reply, if any, left in its slot."},
    {"post", (PyCFunction)(void (*)(void))Caller_post, METH_FASTCALL,
     "post(args, freed, entry, posted, deadline_ns, /) -> (call, placed) | None\n\n"
     "Send the common posted call CALL_REPLICATED(*args) (the worker lock held), its\n"
     "slot armed with deadline_ns (CLOCK_MONOTONIC, < 0: none) and its reply ringing\n"
     "the bell, and keep its books (posted[call] = entry); None, with nothing sent,\n"
     "for what the Python path sends."},
    {"collect", (PyCFunction)(void (*)(void))Caller_collect, METH_FASTCALL,
     "collect(call, slot, posted, /) -> (value, None) | None\n\n"
     "Settle the reply to the posted call in slot when it is there and the common one\n"
     "(its books closed, posted[call] removed, the bell cleared once posted is empty),\n"
     "without waiting; None, the reply (if any) left in its slot, otherwise."},
    {"unwant_bell", (PyCFunction)Caller_unwant_bell, METH_O,
     "unwant_bell(posted, /) -> None\n\n"
     "Clear the bell word if no posted call is left in posted (one step: never\n"
     "between another thread's post() and its publication)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Caller_slots[] = {
    {Py_tp_doc, (void *)"The host's end of the common calls on one channel, blocking (send, finish) and posted (post, collect, unwant_bell), in C (see caller())."},
    {Py_tp_dealloc, (void *)gc_dealloc},
    {Py_tp_traverse, (void *)Caller_traverse},
    {Py_tp_clear, (void *)Caller_clear},
    {Py_tp_methods, Caller_methods},
    {0, NULL},
};

static PyType_Spec Caller_spec = {
    .name = "multipy._native.Caller",
    .basicsize = sizeof(CallerObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Caller_slots,
};

static PyObject *native_caller(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "caller(worker, channel, end) takes 3 arguments");
        return NULL;
    }
    if (!is_channel(args[1])) {
        PyErr_SetString(PyExc_TypeError, "caller(worker, channel, end): channel is a Channel");
        return NULL;
    }
    if (!cache_here())
        return not_here("caller");
    if (caller_type == NULL) {
        if ((s_spin = PyUnicode_InternFromString("spin")) == NULL ||
            (s_skip = PyUnicode_InternFromString("_skip")) == NULL ||
            (s_backoff = PyUnicode_InternFromString("_backoff")) == NULL ||
            (s_next_call = PyUnicode_InternFromString("_next_call")) == NULL ||
            (caller_type = PyType_FromModuleAndSpec(m, &Caller_spec, NULL)) == NULL)
            return NULL;
    }
    CallerObject *self = (CallerObject *)PyType_GenericAlloc((PyTypeObject *)caller_type, 0);
    if (self == NULL)
        return NULL;
    PyObject *worker = args[0], *end = args[2], *decoder = NULL, *v;
    self->channel = (ChannelObject *)Py_NewRef(args[1]);
    self->worker = Py_NewRef(worker);
    self->end = Py_NewRef(end);
    if ((self->slots = PyObject_GetAttrString(worker, "_slots")) == NULL ||
        (self->ends = PyObject_GetAttrString(worker, "_ends")) == NULL ||
        (self->owed = PyObject_GetAttrString(worker, "_owed")) == NULL ||
        (self->callers = PyObject_GetAttrString(worker, "_callers")) == NULL ||
        (self->held = PyObject_GetAttrString(worker, "_held")) == NULL ||
        (self->outbound = PyObject_GetAttrString(worker, "_results")) == NULL ||
        (self->arena = PyObject_GetAttrString(worker, "_args")) == NULL ||
        (self->own = PyObject_GetAttrString(self->arena, "segment")) == NULL ||
        (decoder = PyObject_GetAttrString(worker, "_decoder")) == NULL ||
        (self->released = PyObject_GetAttrString(decoder, "_died")) == NULL)
        goto error;
    Py_CLEAR(decoder);
    if (!PyDict_Check(self->slots) || !PyDict_Check(self->ends) || !PyDict_Check(self->owed) ||
        !PyDict_Check(self->callers) ||
        (self->held != Py_None && (held_type == NULL || Py_TYPE(self->held) != (PyTypeObject *)held_type))) {
        PyErr_SetString(PyExc_TypeError, "caller(worker, ...): the worker's books are dicts and a "
                                         "HeldBlocks");
        goto error;
    }
    if ((v = PyObject_GetAttrString(end, "cores")) == NULL)
        goto error;
    self->cores = (int)PyLong_AsLong(v);
    Py_DECREF(v);
    if ((v = PyObject_GetAttrString(end, "alive_fd")) == NULL)
        goto error;
    self->fd = (int)PyLong_AsLong(v);
    Py_DECREF(v);
    if ((v = PyObject_GetAttrString(end, "limit")) == NULL)
        goto error;
    self->limit = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    if (PyErr_Occurred())
        goto error;
    return (PyObject *)self;
error:
    Py_XDECREF(decoder);
    Py_DECREF(self);
    return NULL;
}

/* -- host: the balancer's common turn -----------------------------------------
 *
 * runtime.balancer.LoadBalancer keeps its counts in a list under a lock.  Its
 * common case, the next interpreter in turn is free, and a release, are one
 * step each here: C runs under the GIL without giving it up in between, so the
 * counts change together; when a Python method of the balancer holds its lock
 * (a scan, a posted call's choice), these decline and the caller takes the
 * Python method. */

static PyObject *s_lock, *s_load, *s_limit, *s_start, *s_locked, *s_warm;

static int balancer_busy(PyObject *balancer) {
    PyObject *lock = iattr(balancer, s_lock);
    if (lock == NULL)
        return -1;
    PyObject *locked = PyObject_CallMethodNoArgs(lock, s_locked);
    Py_DECREF(lock);
    if (locked == NULL)
        return -1;
    int busy = PyObject_IsTrue(locked);
    Py_DECREF(locked);
    return busy;
}

static int balancer_strings(void) {
    if (s_locked != NULL)
        return 0;
    return (s_lock = PyUnicode_InternFromString("_lock")) == NULL ||
           (s_load = PyUnicode_InternFromString("_load")) == NULL ||
           (s_limit = PyUnicode_InternFromString("_limit")) == NULL ||
           (s_start = PyUnicode_InternFromString("_start")) == NULL ||
           (s_warm = PyUnicode_InternFromString("_warm")) == NULL ||
           (s_locked = PyUnicode_InternFromString("locked")) == NULL ? -1 : 0;
}

/* take_turn(balancer) -> index | None: LoadBalancer.acquire() (counted, the turn
 * moved on): the next in turn when it is free, else the first free one after it,
 * else the least loaded (the first of equals from the turn on), as acquire()
 * chooses; with many callers per interpreter the next in turn is seldom free.
 * None, nothing changed, while the balancer's lock is held or its fields are not
 * what acquire() keeps. */
static PyObject *native_take_turn(PyObject *m, PyObject *balancer) {
    (void)m;
    if (!cache_here())
        Py_RETURN_NONE; /* another interpreter's names: the Python path */
    if (balancer_strings() < 0)
        return NULL;
    int busy = balancer_busy(balancer);
    if (busy != 0)
        return busy < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *load = iattr(balancer, s_load), *v = NULL;
    if (load == NULL)
        return NULL;
    long n = -1, start = -1;
    if ((v = iattr(balancer, s_limit)) != NULL) {
        n = PyLong_AsLong(v);
        Py_DECREF(v);
    }
    if (!PyErr_Occurred() && (v = iattr(balancer, s_start)) != NULL) {
        start = PyLong_AsLong(v);
        Py_DECREF(v);
    }
    PyObject *out = NULL;
    if (PyErr_Occurred())
        goto done;
    if (!PyList_CheckExact(load) || n <= 0 || start < 0 || start >= n ||
        start >= PyList_GET_SIZE(load)) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    if (n > PyList_GET_SIZE(load)) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    long best = -1, best_count = 0;
    for (long k = 0; k < n; k++) {
        long i = (start + k) % n;
        PyObject *count = PyList_GET_ITEM(load, i);
        long v = PyLong_CheckExact(count) ? PyLong_AsLong(count) : -1;
        if (v < 0) { /* not a count acquire() keeps: its own choice */
            PyErr_Clear();
            out = Py_NewRef(Py_None);
            goto done;
        }
        if (v == 0) {
            best = i, best_count = 0;
            break;
        }
        if (best < 0 || v < best_count)
            best = i, best_count = v;
    }
    PyObject *counted = PyLong_FromLong(best_count + 1), *next = PyLong_FromLong((start + 1) % n);
    if (counted == NULL || next == NULL || iset(balancer, s_start, next) < 0) {
        Py_XDECREF(counted);
        Py_XDECREF(next);
        goto done;
    }
    Py_DECREF(next);
    PyList_SetItem(load, best, counted); /* steals counted */
    out = PyLong_FromLong(best);
done:
    Py_DECREF(load);
    return out;
}

/* give_back(balancer, index) -> bool: LoadBalancer.release(index, notify=False)
 * done here (True), or left to it (False, nothing changed).  The caller runs
 * balancer.on_release itself. */
static PyObject *native_give_back(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "give_back(balancer, index) takes 2 arguments");
        return NULL;
    }
    if (!cache_here())
        Py_RETURN_FALSE; /* another interpreter's names: the Python path */
    if (balancer_strings() < 0)
        return NULL;
    int busy = balancer_busy(args[0]);
    if (busy != 0)
        return busy < 0 ? NULL : Py_NewRef(Py_False);
    Py_ssize_t index = PyLong_AsSsize_t(args[1]);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    PyObject *load = iattr(args[0], s_load);
    if (load == NULL)
        return NULL;
    PyObject *out = NULL;
    if (!PyList_CheckExact(load) || index < 0 || index >= PyList_GET_SIZE(load) ||
        !PyLong_CheckExact(PyList_GET_ITEM(load, index))) {
        out = Py_NewRef(Py_False);
    } else {
        long c = PyLong_AsLong(PyList_GET_ITEM(load, index));
        PyObject *v = c == -1 && PyErr_Occurred() ? NULL : PyLong_FromLong(c - 1);
        /* release(): the interpreter that went idle last is the warm one (set first:
         * on failure nothing changed but that hint) */
        if (v != NULL && c == 1 && PyObject_SetAttr(args[0], s_warm, args[1]) < 0)
            Py_CLEAR(v);
        if (v != NULL) {
            PyList_SetItem(load, index, v); /* steals v */
            out = Py_NewRef(Py_True);
        }
    }
    Py_DECREF(load);
    return out;
}

/* -- host: the whole blocking call ----------------------------------------------
 *
 * ReplicatedObj.__call__ in one C call (call_replicated): the balancer's turn
 * taken (take_turn), the worker's lock, the common call sent (caller_post) and
 * its books kept, the lock given back, the reply awaited and settled
 * (caller_finish), the worker's statistics kept (calls, latencies), the turn
 * given back (give_back).  Only what runtime.manager._call_replicated and
 * backends.base.Worker._request_in_flight do in their common case, through the
 * worker protocol (a worker's Caller is its ``_caller``, None for backends
 * without one); anything else goes back to them at the step it was reached:
 *
 * - before anything is taken (a closed manager, the balancer's lock held, the
 *   extension loaded by another interpreter): _call_replicated from the start;
 * - the turn taken, nothing sent (no Caller, a first load, links, drops, a
 *   request pack_call leaves to Python): _call_replicated with that index;
 * - after the send, or when taking the lock or sending raised: the worker's
 *   _request_in_flight resumes the call (sent=...) as if it had made it, and
 *   the turn is given back here, whatever it returns or raises.
 *
 * C code runs no signal handler until it calls Python code or waits, so the
 * common call has no window in which a Ctrl-C strands a count or a reply: the
 * wait and the lock are the only places one lands, and the hooks. */

static PyObject *s_manager, *s_rid, *s_closed_m, *s_balancer, *s_workers, *s_call_timeout,
    *s_dispatcher, *s_empty, *s_dead_reason, *s_broken, *s_closed, *s_caller, *s_wlock,
    *s_started, *s_materialized, *s_drops, *s_links, *s_links_in, *s_wanted, *s_freed,
    *s_decoder, *s_watched, *s_offset, *s_popleft, *s_extend, *s_left, *s_on_free,
    *s_on_release, *s_calls, *s_latencies, *s_draining, *s_notify_drained, *s_acquire,
    *s_release, *s_call_replicated, *s_request_in_flight, *s_torch, *s_is_inference_name,
    *s_is_grad_name, *s_recipe;
static PyObject *resume_kwnames; /* ("timeout", "materializes", "recipe", "sent") */
static PyObject *g_is_inference, *g_is_grad; /* torch's, once torch is imported */

static int whole_call_strings(void) {
    if (resume_kwnames != NULL)
        return 0;
#define S(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    S(s_manager, "_manager"); S(s_rid, "_id"); S(s_recipe, "_recipe"); S(s_closed_m, "_closed");
    S(s_balancer, "_balancer"); S(s_workers, "_workers"); S(s_call_timeout, "_call_timeout");
    S(s_dispatcher, "_dispatcher"); S(s_empty, "_empty"); S(s_dead_reason, "dead_reason");
    S(s_broken, "broken"); S(s_closed, "closed"); S(s_caller, "_caller"); S(s_wlock, "lock");
    S(s_started, "_started"); S(s_materialized, "materialized"); S(s_drops, "drops");
    S(s_links, "_links"); S(s_links_in, "_links"); S(s_wanted, "_wanted"); S(s_freed, "_freed");
    S(s_decoder, "_decoder"); S(s_watched, "_watched"); S(s_offset, "offset");
    S(s_popleft, "popleft"); S(s_extend, "extend"); S(s_left, "_left"); S(s_on_free, "on_free");
    S(s_on_release, "on_release"); S(s_calls, "calls"); S(s_latencies, "latencies");
    S(s_draining, "_draining"); S(s_notify_drained, "_notify_drained"); S(s_acquire, "acquire");
    S(s_release, "release"); S(s_call_replicated, "_call_replicated");
    S(s_request_in_flight, "_request_in_flight"); S(s_torch, "torch");
    S(s_is_inference_name, "is_inference_mode_enabled"); S(s_is_grad_name, "is_grad_enabled");
#undef S
    resume_kwnames = Py_BuildValue("(ssss)", "timeout", "materializes", "recipe", "sent");
    return resume_kwnames == NULL ? -1 : 0;
}

/* The exception being raised, normalized with its traceback, cleared (NULL: none). */
static PyObject *fetch_error(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    if (t == NULL)
        return NULL;
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb != NULL && v != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(tb);
    Py_DECREF(t);
    return v;
#endif
}

/* Raise exc again (steals it). */
static void restore_error(PyObject *exc) {
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* session.caller_grad_mode: GradMode's GRAD 0, NO_GRAD 1, INFERENCE 2 (new
 * references), None while torch is not imported in the host. */
static PyObject *grad_mode(void) {
    if (g_is_grad == NULL) {
        PyObject *torch = PyImport_GetModule(s_torch);
        if (torch == NULL)
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        PyObject *inf = PyObject_GetAttr(torch, s_is_inference_name);
        PyObject *grad = inf == NULL ? NULL : PyObject_GetAttr(torch, s_is_grad_name);
        Py_DECREF(torch);
        if (grad == NULL) { /* not (yet) imported */
            Py_XDECREF(inf);
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        g_is_inference = inf;
        g_is_grad = grad;
    }
    PyObject *r = PyObject_CallNoArgs(g_is_inference);
    int on = r == NULL ? -1 : PyObject_IsTrue(r);
    Py_XDECREF(r);
    if (on != 0)
        return on < 0 ? NULL : PyLong_FromLong(2);
    r = PyObject_CallNoArgs(g_is_grad);
    on = r == NULL ? -1 : PyObject_IsTrue(r);
    Py_XDECREF(r);
    return on < 0 ? NULL : PyLong_FromLong(on ? 0 : 1);
}

/* An attribute's truth (-1: an error). */
static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = iattr(obj, name);
    if (v == NULL)
        return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* Whether hook must run: the dispatcher's pump does nothing while its queue is
 * empty (Dispatcher.pump's first test), so it is not called then. */
static int hook_needed(PyObject *hook, PyObject *dispatcher) {
    if (hook == Py_None)
        return 0;
    if (dispatcher != NULL && PyMethod_Check(hook) && PyMethod_GET_SELF(hook) == dispatcher) {
        PyObject *empty = iattr(dispatcher, s_empty);
        if (empty == NULL)
            return -1;
        Py_DECREF(empty);
        return empty != Py_True;
    }
    return 1;
}

static int run_hook(PyObject *owner, PyObject *name, PyObject *dispatcher) {
    PyObject *hook = iattr(owner, name);
    if (hook == NULL)
        return -1;
    int needed = hook_needed(hook, dispatcher);
    PyObject *r = needed > 0 ? PyObject_CallNoArgs(hook) : NULL;
    Py_DECREF(hook);
    if (needed <= 0)
        return needed;
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* Decoder.released_offsets on the worker's _freed (ints, or BlockRefs whose
 * offset leaves decoder._watched when it is theirs). */
static PyObject *released_offsets(PyObject *worker, PyObject *freed) {
    PyObject *out = PyList_New(0), *watched = NULL;
    if (out == NULL)
        return NULL;
    while (PyObject_Length(freed) > 0) {
        PyObject *item = PyObject_CallMethodNoArgs(freed, s_popleft);
        if (item == NULL) {
            if (PyErr_ExceptionMatches(PyExc_IndexError)) { /* another thread took the last */
                PyErr_Clear();
                break;
            }
            goto error;
        }
        if (!PyLong_CheckExact(item)) {
            PyObject *offset = PyObject_GetAttr(item, s_offset);
            if (offset == NULL) {
                Py_DECREF(item);
                goto error;
            }
            if (watched == NULL) {
                PyObject *decoder = iattr(worker, s_decoder);
                watched = decoder == NULL ? NULL : iattr(decoder, s_watched);
                Py_XDECREF(decoder);
                if (watched == NULL) {
                    Py_DECREF(item);
                    Py_DECREF(offset);
                    goto error;
                }
            }
            PyObject *ref = PyDict_Check(watched) ? PyDict_GetItemWithError(watched, offset) : NULL;
            if (ref == item && PyDict_DelItem(watched, offset) < 0)
                PyErr_Clear();
            Py_DECREF(item);
            item = offset;
        }
        int rc = PyList_Append(out, item);
        Py_DECREF(item);
        if (rc < 0 || PyErr_Occurred())
            goto error;
    }
    if (PyErr_Occurred())
        goto error;
    Py_XDECREF(watched);
    Py_SETREF(out, PyList_AsTuple(out));
    return out;
error:
    Py_XDECREF(watched);
    Py_DECREF(out);
    return NULL;
}

/* worker.calls += 1 and worker.latencies gets the call's time (Worker._request_in_flight's). */
static int count_call(PyObject *worker, int64_t started_ns, int calls) {
    if (calls) {
        PyObject *n = iattr(worker, s_calls), *n1 = NULL;
        if (n != NULL) {
            PyObject *one = PyLong_FromLong(1);
            n1 = one == NULL ? NULL : PyNumber_Add(n, one);
            Py_XDECREF(one);
        }
        Py_XDECREF(n);
        int rc = n1 == NULL ? -1 : iset(worker, s_calls, n1);
        Py_XDECREF(n1);
        if (rc < 0)
            return -1;
    }
    if (started_ns < 0)
        return 0;
    PyObject *lat = iattr(worker, s_latencies);
    if (lat == NULL)
        return -1;
    PyObject *took = PyFloat_FromDouble((double)(now_ns() - started_ns) / 1e9);
    int rc = took == NULL ? -1 : PyList_Check(lat) ? PyList_Append(lat, took) : -1;
    if (rc < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "a worker's latencies are a list");
    if (rc == 0 && PyList_GET_SIZE(lat) > 4096)
        rc = PyList_SetSlice(lat, 0, 2048, NULL);
    Py_XDECREF(took);
    Py_DECREF(lat);
    return rc;
}

/* _call_replicated(obj, None, args, kwargs, None[, index]): the Python path. */
static PyObject *python_call(PyObject *manager, PyObject *obj, PyObject *args, PyObject *kwargs,
                             PyObject *index) {
    PyObject *vec[7] = {manager, obj, Py_None, args, kwargs, Py_None, index};
    return PyObject_VectorcallMethod(s_call_replicated, vec, index == NULL ? 6 : 7, NULL);
}

/* Give the turn back (LoadBalancer.release with its hook), an error being raised
 * or not: like a finally block, an error of its own replaces the one raised. */
static int give_turn_back(PyObject *balancer, PyObject *index, PyObject *dispatcher) {
    PyObject *pending = fetch_error();
    PyObject *av[2] = {balancer, index};
    PyObject *given = native_give_back(NULL, av, 2);
    int rc;
    if (given == Py_True) {
        rc = run_hook(balancer, s_on_release, dispatcher);
    } else if (given == Py_False) {
        PyObject *r = PyObject_CallMethodOneArg(balancer, s_release, index);
        rc = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    } else {
        rc = -1;
    }
    Py_XDECREF(given);
    if (rc < 0) {
        if (pending != NULL) { /* as a finally block's error: the first one is its context */
            PyObject *now = fetch_error();
            if (now != NULL)
                PyException_SetContext(now, pending); /* steals pending */
            else
                Py_DECREF(pending);
            if (now != NULL)
                restore_error(now);
        }
        return -1;
    }
    if (pending != NULL) {
        restore_error(pending);
        return -1;
    }
    return 0;
}

/* Give the worker's lock back, the error being raised (if any) kept as it is. */
static void release_keeping_error(PyObject *lock) {
    PyObject *exc = fetch_error();
    PyObject *r = PyObject_CallMethodNoArgs(lock, s_release);
    if (r == NULL)
        PyErr_WriteUnraisable(lock);
    Py_XDECREF(r);
    if (exc != NULL)
        restore_error(exc);
}

/* A short look for the reply with the GIL held, before the wait lets it go.  A
 * call that comes back within REPLY_LOOK_NS (a light model's) is then settled
 * without a GIL hand-off; with many host threads on one interpreter, a caller that
 * waits at once finds every spinning place taken and sleeps (a futex round trip
 * and a context switch each way) where a few µs later its reply was there. */
#define REPLY_LOOK_NS 4000
static void reply_look(ChannelObject *c, unsigned long slot) {
    if (!c->attached || c->detach_pending || slot >= c->nslots)
        return; /* caller_finish says why */
    slot_t *s = slot_at(c, (unsigned int)slot);
    if (reply_ready(c, s))
        return;
    int64_t until = now_ns() + REPLY_LOOK_NS;
    do {
        for (int i = 0; i < 32; i++) {
            if (reply_ready(c, s))
                return;
            cpu_pause();
        }
    } while (now_ns() < until);
}

/* call_replicated(obj, args, kwargs, op) -> value: ReplicatedObj.__call__ (see above). */
static PyObject *native_call_replicated(PyObject *m, PyObject *const *a, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 4 || !PyTuple_CheckExact(a[1]) || !PyDict_Check(a[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "call_replicated(obj, args, kwargs, op) takes 4 arguments, args a tuple, "
                        "kwargs a dict");
        return NULL;
    }
    PyObject *obj = a[0], *args = a[1], *kwargs = a[2], *op = a[3];
    if (whole_call_strings() < 0 || balancer_strings() < 0)
        return NULL;
    PyObject *manager = iattr(obj, s_manager);
    if (manager == NULL)
        return NULL;
    PyObject *out = NULL, *balancer = NULL, *index = NULL, *workers = NULL, *worker = NULL,
             *dispatcher = NULL, *lock = NULL, *rid = NULL, *grad = NULL, *timeout = NULL,
             *materialized = NULL, *freed = NULL, *freed_q = NULL, *full = NULL, *key = NULL,
             *placed = NULL, *waited = NULL, *ticket = NULL, *got = NULL;
    CallerObject *caller = NULL;
    long slot = -1;
    unsigned long long since = 0;
    int64_t started = -1;
    if (!cache_here())
        goto from_start;
    PyObject *closed = iattr(manager, s_closed_m);
    if (closed == NULL)
        goto done;
    Py_DECREF(closed);
    if (closed != Py_False)
        goto from_start;
    if ((balancer = iattr(manager, s_balancer)) == NULL)
        goto done;
    if ((index = native_take_turn(NULL, balancer)) == NULL)
        goto done;
    if (index == Py_None) {
        Py_CLEAR(index);
        goto from_start;
    }
    /* The turn is taken: from here every way out gives it back. */
    if ((dispatcher = iattr(manager, s_dispatcher)) == NULL ||
        (workers = iattr(manager, s_workers)) == NULL ||
        (worker = PyObject_GetItem(workers, index)) == NULL)
        goto give_back_turn;
    PyObject *v = iattr(worker, s_dead_reason);
    int down = v == NULL ? -1 : v != Py_None;
    Py_XDECREF(v);
    if (!down) {
        v = iattr(worker, s_broken);
        down = v == NULL ? -1 : v != Py_None;
        Py_XDECREF(v);
    }
    if (!down)
        down = attr_true(worker, s_closed);
    if (down < 0)
        goto give_back_turn;
    if (down) { /* another one if any: the Python path's choice, the turn given back first */
        if (give_turn_back(balancer, index, dispatcher) < 0)
            goto done;
        Py_CLEAR(index);
        goto from_start;
    }
    v = iattr(worker, s_caller);
    if (v == NULL)
        goto give_back_turn;
    int native = caller_type != NULL && Py_TYPE(v) == (PyTypeObject *)caller_type;
    Py_DECREF(v);
    if (!native)
        goto with_index; /* a backend without the extension's call, or the pipes */
    if ((rid = iattr(obj, s_rid)) == NULL ||
        (timeout = iattr(manager, s_call_timeout)) == NULL ||
        (grad = grad_mode()) == NULL || (lock = iattr(worker, s_wlock)) == NULL)
        goto give_back_turn;
    double seconds = -1.0;
    if (timeout != Py_None && ((seconds = PyFloat_AsDouble(timeout)) == -1.0 && PyErr_Occurred()))
        goto give_back_turn;
    started = now_ns();
    PyObject *r = PyObject_CallMethodNoArgs(lock, s_acquire);
    if (r == NULL) /* a signal handler raised while waiting for it: the Python path's books */
        goto resume;
    Py_DECREF(r);
    /* Under the lock, what Worker._request_in_flight and ProcessWorker._send_call
     * look at; anything but the common call is theirs. */
    int common = attr_true(worker, s_closed);
    if (common == 0)
        common = attr_true(worker, s_started);
    else
        common = common < 0 ? -1 : 0;
    if (common > 0) {
        v = iattr(worker, s_caller); /* this generation's */
        if (v == NULL)
            common = -1;
        else if (Py_TYPE(v) != (PyTypeObject *)caller_type)
            Py_DECREF(v), common = 0;
        else
            caller = (CallerObject *)v;
    }
    if (common > 0) {
        materialized = iattr(worker, s_materialized);
        common = materialized == NULL ? -1 : PySet_Check(materialized)
                                                 ? PySet_Contains(materialized, rid) : 0;
    }
    if (common > 0) {
        PyObject *drops = iattr(worker, s_drops);
        Py_ssize_t n = drops == NULL ? -1 : PyObject_Length(drops);
        Py_XDECREF(drops);
        common = n < 0 ? -1 : n == 0;
    }
    if (common > 0) {
        PyObject *links = iattr(worker, s_links);
        int active = links == NULL ? -1 : attr_true(links, s_links_in);
        if (active == 0)
            active = attr_true(links, s_wanted);
        Py_XDECREF(links);
        common = active < 0 ? -1 : !active;
    }
    if (common < 0)
        goto unlock_give_back;
    if (!common)
        goto unlock_with_index;
    /* The call: freed blocks reported, pending argument blocks settled, sent. */
    if ((freed_q = iattr(worker, s_freed)) == NULL)
        goto unlock_give_back;
    Py_ssize_t nfreed = PyObject_Length(freed_q);
    if (nfreed < 0)
        goto unlock_give_back;
    freed = nfreed ? released_offsets(worker, freed_q) : PyTuple_New(0);
    if (freed == NULL)
        goto unlock_give_back;
    if (caller->held != Py_None && PyList_GET_SIZE(((HeldObject *)caller->held)->pending) > 0 &&
        held_settle((HeldObject *)caller->held) < 0)
        goto unsent;
    if ((full = PyTuple_Pack(6, rid, Py_None, args, kwargs, grad, Py_None)) == NULL)
        goto unsent;
    PyObject *next = iattr(worker, s_next_call);
    if (next == NULL)
        goto unsent;
    since = PyLong_AsUnsignedLongLong(next);
    Py_DECREF(next);
    if (PyErr_Occurred())
        goto unsent;
    key = caller_post(caller, full, freed, NULL, NULL, -1, &placed, &slot);
    if (key == NULL)
        goto unsent;
    if (key == Py_None) { /* not the common call after all: the Python path sends it */
        Py_CLEAR(key);
        PyObject *r2 = PyObject_CallMethodOneArg(freed_q, s_extend, freed);
        if (r2 == NULL)
            goto unlock_give_back;
        Py_DECREF(r2);
        goto unlock_with_index;
    }
    /* Sent: counted, the lock given back, the worker's hook (its dispatcher's pump). */
    ticket = PyTuple_Pack(4, key, placed, op, timeout);
    if (ticket == NULL) { /* (no memory left: the call stays owed, its reply unread) */
        PyErr_WriteUnraisable(worker);
        PyErr_NoMemory();
    }
    if (ticket == NULL || count_call(worker, -1, 1) < 0)
        goto unlock_resume;
    if ((r = PyObject_CallMethodNoArgs(lock, s_release)) == NULL)
        goto resume;
    Py_DECREF(r);
    if (run_hook(worker, s_on_free, dispatcher) < 0)
        goto resume;
    if (attr_true(worker, s_left) != 0)
        goto resume; /* callers who left (or an error): _await_call sweeps their replies */
    reply_look(caller->channel, (unsigned long)slot);
    got = caller_finish(caller, PyLong_AsUnsignedLongLong(key), (unsigned long)slot, seconds);
    if (got == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            goto resume;
        PyErr_Clear(); /* detached: this generation is over */
        waited = PyLong_FromLong(CLOSED);
        goto resume;
    }
    if (!PyTuple_CheckExact(got)) {
        waited = got;
        got = NULL;
        goto resume;
    }
    /* The common reply, settled: the caller leaves the books. */
    if (PyDict_DelItem(caller->callers, key) < 0)
        PyErr_Clear();
    int draining = PyDict_GET_SIZE(caller->callers) ? 0 : attr_true(worker, s_draining);
    if (draining > 0) {
        PyObject *r3 = PyObject_CallMethodNoArgs(worker, s_notify_drained);
        Py_XDECREF(r3);
        if (r3 == NULL)
            draining = -1;
    }
    if (draining < 0 || PySet_Add(materialized, rid) < 0 || count_call(worker, started, 0) < 0) {
        Py_CLEAR(got);
        goto give_back_turn; /* (errors of the books, after the call ended) */
    }
    out = Py_NewRef(PyTuple_GET_ITEM(got, 0));
    goto give_back_turn;

unsent: /* the send raised, nothing sent: the freed blocks go with the next call */
    {
        PyObject *exc = fetch_error();
        if (freed != NULL) {
            PyObject *r2 = PyObject_CallMethodOneArg(freed_q, s_extend, freed);
            if (r2 == NULL)
                PyErr_WriteUnraisable(worker);
            Py_XDECREF(r2);
        }
        if (count_call(worker, -1, 1) < 0)
            PyErr_WriteUnraisable(worker);
        restore_error(exc);
    }
unlock_resume:
    release_keeping_error(lock);
resume:
    /* Worker._request_in_flight from where this call is: sent (ticket) or not
     * (None), waited says what the wait said or what was raised (None: not waited). */
    {
        if (waited == NULL) {
            waited = fetch_error();
            if (waited == NULL)
                waited = Py_NewRef(Py_None);
        }
        PyObject *since_o = key == NULL ? Py_NewRef(Py_None) : PyLong_FromUnsignedLongLong(since);
        PyObject *started_o = PyFloat_FromDouble((double)started / 1e9);
        PyObject *sent = since_o == NULL || started_o == NULL ? NULL
            : PyTuple_Pack(5, started_o, since_o, materialized == NULL ? Py_None : materialized,
                           ticket == NULL ? Py_None : ticket, waited);
        Py_XDECREF(since_o);
        Py_XDECREF(started_o);
        PyObject *call_args = sent == NULL ? NULL : PyTuple_Pack(5, rid, Py_None, args, kwargs, grad);
        PyObject *recipe = call_args == NULL ? NULL : iattr(obj, s_recipe);
        if (recipe != NULL) {
            PyObject *vec[7] = {worker, op, call_args, timeout, rid, recipe, sent};
            out = PyObject_VectorcallMethod(s_request_in_flight, vec, 3, resume_kwnames);
        }
        Py_XDECREF(recipe);
        Py_XDECREF(call_args);
        Py_XDECREF(sent);
        goto give_back_turn;
    }
unlock_give_back:
unlock_with_index:
    release_keeping_error(lock);
    if (PyErr_Occurred())
        goto give_back_turn;
with_index: /* the turn taken, nothing else: the Python path, which gives it back */
    out = python_call(manager, obj, args, kwargs, index);
    goto done;
give_back_turn:
    if (give_turn_back(balancer, index, dispatcher) < 0)
        Py_CLEAR(out);
    goto done;
from_start:
    out = python_call(manager, obj, args, kwargs, NULL);
done:
    Py_XDECREF(got);
    Py_XDECREF(waited);
    Py_XDECREF(ticket);
    Py_XDECREF(placed);
    Py_XDECREF(key);
    Py_XDECREF(full);
    Py_XDECREF(freed);
    Py_XDECREF(freed_q);
    Py_XDECREF(materialized);
    Py_XDECREF((PyObject *)caller);
    Py_XDECREF(lock);
    Py_XDECREF(timeout);
    Py_XDECREF(grad);
    Py_XDECREF(rid);
    Py_XDECREF(worker);
    Py_XDECREF(workers);
    Py_XDECREF(dispatcher);
    Py_XDECREF(index);
    Py_XDECREF(balancer);
    Py_DECREF(manager);
    return out;
}

/* -- host: an awaited call's reply, settled and its future resolved in C ---------
 *
 * ring_awaited(watch, completions) -> bool: BellWatch.on_bell's common case on an
 * event loop that reads its own replies (a served request, submit_async with
 * on_loop=True): the loop's bell rang and the one posted call in flight on that
 * channel is a lone awaited request of this loop whose reply is the common one.
 * What the Python path does from the bell to the caller's future, in one C call:
 * the bell watch cleared (watching) and the bell emptied (HostEnd.drain_bell), the
 * reply settled (settle_common, as Caller.collect), the call ended
 * (_PostedCall._end: posted_in_flight, calls, latencies, the worker lock when it
 * holds it), the dispatcher's end of it (Dispatcher._done: the balancer's count
 * given back and its queue pumped, as give_turn_back) and the loop's future set.
 *
 * False, with nothing changed but the watch cleared and the bell emptied (which the
 * Python path does again, harmlessly), when anything is not that case: the bell's
 * end-of-file (the interpreter died), a reply not there yet or not the common one
 * (an error, output, a pickled or spilled reply), several calls in flight, a batch,
 * a timeout's timer, a first load, a thread's completions, a held lock; then
 * on_bell goes on in Python.  Past the settle, a worker tally held by another
 * thread hands the rest to _PostedCall._end.  The Python objects and functions it
 * recognises are registered once by runtime.dispatch (ring_setup). */

/* Replies ring_awaited (and poll_awaited) settled in C (their True answers), in this
 * process: always counted (one add under the GIL), so that a test notices when the
 * case is no longer recognised and every served request goes the Python way
 * (ring_settled()). */
static unsigned long long ring_settled;

static PyObject *native_ring_settled(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
    return PyLong_FromUnsignedLongLong(ring_settled);
}

static PyObject *ring_hand_over, *ring_posted_type, *ring_finish_fn, *ring_done_fn,
    *ring_loop_future_type, *ring_partial_type, *ring_running_loop;
static PyObject *s_retired, *s_posted, *s_wlock_b, *s_watching, *s_end_b, *s_bell_r,
    *s_bell_closed, *s_hand, *s_handed, *s_completions_a, *s_outcome, *s_finished, *s_then,
    *s_timer, *s_posted_a, *s_worker_a, *s_slots, *s_draining_a, *s_counted, *s_tally,
    *s_posted_in_flight, *s_holds, *s_started_a, *s_done_a, *s_func, *s_args, *s_requests,
    *s_balanced, *s_convert, *s_future, *s_on_loop, *s_waiter, *s_sent, *s_cancelled,
    *s_set_result, *s_watch_m, *s_end_m, *s_balancer_a, *s_finish, *s_materializes,
    *s_materialized_a, *s_loop_a, *s_set_exception, *s_failures;

static int ring_strings(void) {
    if (s_balancer_a != NULL)
        return 0;
#define S(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    S(s_retired, "retired"); S(s_posted, "posted"); S(s_wlock_b, "lock"); S(s_watching, "watching");
    S(s_end_b, "end"); S(s_bell_r, "bell_r"); S(s_bell_closed, "bell_closed"); S(s_hand, "_hand");
    S(s_handed, "handed"); S(s_completions_a, "completions"); S(s_outcome, "outcome");
    S(s_finished, "finished"); S(s_then, "then"); S(s_timer, "timer"); S(s_posted_a, "_posted");
    S(s_worker_a, "worker"); S(s_slots, "_slots"); S(s_draining_a, "_draining");
    S(s_counted, "counted"); S(s_tally, "_tally"); S(s_posted_in_flight, "posted_in_flight");
    S(s_holds, "holds"); S(s_started_a, "started"); S(s_done_a, "done"); S(s_func, "func");
    S(s_args, "args"); S(s_requests, "requests"); S(s_balanced, "balanced");
    S(s_convert, "convert"); S(s_future, "future"); S(s_on_loop, "on_loop");
    S(s_waiter, "waiter"); S(s_sent, "sent"); S(s_cancelled, "cancelled");
    S(s_set_result, "set_result"); S(s_watch_m, "watch"); S(s_end_m, "_end");
    S(s_balancer_a, "_balancer"); S(s_finish, "finish"); S(s_materializes, "materializes");
    S(s_materialized_a, "materialized"); S(s_loop_a, "_loop");
    S(s_set_exception, "set_exception"); S(s_failures, "failures");
#undef S
    return 0;
}

/* ring_setup(hand_over, posted_call_type, dispatcher_done, loop_future_type, partial_type,
 *            running_loop) */
static PyObject *native_ring_setup(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "ring_setup() takes 6 arguments");
        return NULL;
    }
    if (!cache_here())
        Py_RETURN_NONE; /* another interpreter's objects: ring_awaited says False */
    if (ring_strings() < 0 || whole_call_strings() < 0 || balancer_strings() < 0)
        return NULL;
    PyObject *finish = PyObject_GetAttrString(args[1], "finish");
    if (finish == NULL)
        return NULL;
    Py_XSETREF(ring_hand_over, Py_NewRef(args[0]));
    Py_XSETREF(ring_posted_type, Py_NewRef(args[1]));
    Py_XSETREF(ring_finish_fn, finish);
    Py_XSETREF(ring_done_fn, Py_NewRef(args[2]));
    Py_XSETREF(ring_loop_future_type, Py_NewRef(args[3]));
    Py_XSETREF(ring_partial_type, Py_NewRef(args[4]));
    Py_XSETREF(ring_running_loop, Py_NewRef(args[5]));
    Py_RETURN_NONE;
}

/* getattr(obj, name) is want: 1 yes, 0 no, -1 error. */
static int attr_is(PyObject *obj, PyObject *name, PyObject *want) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int is = v == want;
    Py_DECREF(v);
    return is;
}

/* A threading.Lock taken without waiting: 1 taken, 0 held elsewhere, -1 error. */
static int lock_now(PyObject *lock) {
    PyObject *r = PyObject_CallMethodOneArg(lock, s_acquire, Py_False);
    if (r == NULL)
        return -1;
    int taken = r == Py_True;
    Py_DECREF(r);
    return taken;
}

static int unlock(PyObject *lock) {
    PyObject *r = PyObject_CallMethodNoArgs(lock, s_release);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* HostEnd.drain_bell: 1 emptied, 0 end-of-file or closed (bell_closed set), -1 error. */
static int drain_bell_fd(PyObject *end) {
    PyObject *fd_o = PyObject_GetAttr(end, s_bell_r);
    if (fd_o == NULL)
        return -1;
    int fd = (int)PyLong_AsLong(fd_o);
    Py_DECREF(fd_o);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0) /* closed by the host: this generation is over */
        return PyObject_SetAttr(end, s_bell_closed, Py_True) < 0 ? -1 : 0;
    char buf[4096];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 1;
        if (n <= 0) /* end-of-file: the interpreter died; or closed by the host */
            return PyObject_SetAttr(end, s_bell_closed, Py_True) < 0 ? -1 : 0;
        if (n < (ssize_t)sizeof buf)
            return 1;
    }
}

#define TAKE_DIVISOR 10 /* poll_awaited: an awake interpreter takes the request within a
                             tenth of the poll (one that slept, or lost its core, later) */
#define LIVENESS_POLLS 1024u /* poll_spin: looks at the slot between two at the peer's life */

/* The polled word (see ring_bell): set to name slot before a reply is polled for, so
 * that the interpreter rings no bell for it; poll_stop clears it. */
static inline uint32_t *polled_word(ChannelObject *c) {
    return (uint32_t *)((char *)c->h + POLLED_WORD);
}

/* Spin until the reply in s is there or until deadline_ns: 1 found, 0 not yet (or
 * the interpreter died: its liveness fd readable).  With past > 0, until the
 * interpreter took the request (the ring's head at past): 2. */
static int poll_spin(ChannelObject *c, slot_t *s, uint64_t past, int64_t deadline_ns, int fd) {
    for (unsigned i = 1;; i++) {
        if (reply_ready(c, s))
            return 1;
        if (past > 0 && LOAD(&c->h->head) >= past)
            return 2;
        if ((i & 15) == 0 && now_ns() >= deadline_ns)
            return 0;
        if (i % LIVENESS_POLLS == 0 && fd_ready(fd))
            return reply_ready(c, s);
        cpu_pause();
    }
}

/* A poll that did not pay (the reply or the take came too late): the next lone calls
 * on this channel are not polled for, 1, 3, 7, ... up to 63 of them after as many
 * such polls in a row; a poll that finds its reply starts again at 0. */
static void poll_back_off(ChannelObject *c) {
    c->poll_backoff = c->poll_backoff * 2u + 1u > 63u ? 63u : c->poll_backoff * 2u + 1u;
    c->poll_skip = c->poll_backoff;
}

/* The poll is over: the polled word cleared first, then the slot looked at again
 * (ring_bell's order reversed), so that a reply not found now rings the bell.  1 when
 * the reply is there (no bell rung for it, or at worst one left over). */
static int poll_stop(ChannelObject *c, slot_t *s) {
    SC_STORE(polled_word(c), 0u);
    /* Sequentially consistent, pairing with the interpreter's SC store of the slot's
     * state and SC load of the polled word: one of the two sees the other's store. */
    return SC_LOAD(&s->state) == SLOT_REPLIED;
}

/* ring_awaited's work: want_key NULL, a ring (the bell watch's callback on the loop);
 * else poll_awaited's, for the call just sent from the loop's thread whose entry in
 * the watch's posted calls is want_key (the request's sent handle), its slot s of
 * channel c polled for already (the polled word set; the interpreter took it): polled
 * for until deadline_ns. */
/* LoopCompletions.here(): 1 when this thread runs the loop of ``completions`` (a
 * LoopCompletions: its ``_loop`` is a weak reference), 0 when not, -1 with an
 * exception set. */
static int loop_running_here(PyObject *completions) {
    PyObject *ref = PyObject_GetAttr(completions, s_loop_a);
    PyObject *loop = ref == NULL ? NULL : PyObject_CallNoArgs(ref);
    Py_XDECREF(ref);
    if (loop == NULL)
        return -1;
    PyObject *running = PyObject_CallNoArgs(ring_running_loop);
    int r = running == NULL ? -1 : loop != Py_None && running == loop;
    Py_DECREF(loop);
    Py_XDECREF(running);
    return r;
}

static PyObject *awaited_reply(PyObject *watch, PyObject *completions, PyObject *want_key,
                               ChannelObject *pc_channel, slot_t *ps, int64_t deadline_ns);

static PyObject *native_ring_awaited(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ring_awaited(watch, completions) takes 2 arguments");
        return NULL;
    }
    if (ring_posted_type == NULL || !cache_here())
        Py_RETURN_FALSE;
    return awaited_reply(args[0], args[1], NULL, NULL, NULL, 0);
}

static PyObject *s_sent_a, *s_future_a, *s_on_loop_a, *s_reply_poll, *s_bells, *s_on_bell,
    *s_ready, *s_watches_a, *s_call_a;

/* poll_awaited(request) -> True (settled) | False (polled, gave up) | None (not polled)
 *
 * Cheap looks first (every served request pays them): the one call in flight of
 * the process (the one busy channel, with one call in flight), the loop's poll on, the interpreter awake; then the polled word set
 * and the interpreter given TAKE_NS to take the request.  Once it did, the rest of
 * ring_awaited's recognition runs while the interpreter runs the call. */
static PyObject *native_poll_awaited(PyObject *m, PyObject *request) {
    (void)m;
    if (__atomic_load_n(&g_busy, __ATOMIC_ACQUIRE) != 1 || ring_posted_type == NULL ||
        !cache_here())
        Py_RETURN_NONE; /* (several channels, so several calls, in flight in the process) */
    if (s_call_a == NULL) {
#define S(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
        S(s_sent_a, "sent"); S(s_future_a, "future"); S(s_on_loop_a, "on_loop");
        S(s_reply_poll, "reply_poll"); S(s_bells, "_bells"); S(s_on_bell, "on_bell");
        S(s_ready, "ready"); S(s_watches_a, "_watches"); S(s_call_a, "call");
#undef S
    }
    PyObject *out = NULL, *sent = NULL, *future = NULL, *completions = NULL, *watch = NULL,
             *budget = NULL, *caller = NULL, *key = NULL, *worker, *entry;
    if ((sent = PyObject_GetAttr(request, s_sent_a)) == NULL)
        goto unknown;
    if (!PyTuple_CheckExact(sent) || PyTuple_GET_SIZE(sent) != 2)
        goto not_ours;
    worker = PyTuple_GET_ITEM(sent, 0);
    entry = PyTuple_GET_ITEM(sent, 1);
    if ((future = PyObject_GetAttr(request, s_future_a)) == NULL ||
        (completions = PyObject_GetAttr(future, s_on_loop_a)) == NULL)
        goto unknown;
    if (completions == Py_None)
        goto not_ours;
    if ((budget = PyObject_GetAttr(completions, s_reply_poll)) == NULL)
        goto unknown;
    double seconds = PyFloat_AsDouble(budget);
    if (seconds == -1.0 && PyErr_Occurred())
        goto unknown;
    if (!(seconds > 0.0))
        goto not_ours;
    if ((caller = iattr(worker, s_caller)) == NULL)
        goto unknown;
    if (Py_TYPE(caller) != (PyTypeObject *)caller_type)
        goto not_ours;
    CallerObject *cl = (CallerObject *)caller;
    ChannelObject *c = cl->channel;
    /* the one channel with calls in flight in the process, with one */
    if (!c->attached || c->detach_pending || __atomic_load_n(&c->inflight, __ATOMIC_ACQUIRE) != 1)
        goto not_ours;
    if (c->poll_skip > 0) { /* the last poll on this channel gave up: a slow model */
        c->poll_skip--;
        goto not_ours;
    }
    if (SC_LOAD(&c->h->req_sleeping))
        goto not_ours;
    if ((key = PyObject_GetAttr(entry, s_call_a)) == NULL)
        goto unknown;
    PyObject *slot_o = PyDict_GetItemWithError(cl->slots, key), /* borrowed */
             *past_o = slot_o == NULL ? NULL : PyDict_GetItemWithError(cl->ends, key);
    if (past_o == NULL) {
        if (PyErr_Occurred())
            goto unknown;
        goto not_ours;
    }
    unsigned long slot = PyLong_AsUnsignedLong(slot_o);
    uint64_t past = PyLong_AsUnsignedLongLong(past_o);
    if (PyErr_Occurred())
        goto unknown;
    if (slot >= c->nslots || past == 0)
        goto not_ours;
    slot_t *s = slot_at(c, (uint32_t)slot);
    /* -- the interpreter takes the request (or has not: asleep, or off its core) ---- */
    int64_t poll_ns = (int64_t)(seconds > 3600.0 ? 3600e9 : seconds * 1e9);
    SC_STORE(polled_word(c), (uint32_t)slot + 1u);
    int64_t start = now_ns();
    int got = poll_spin(c, s, past, start + poll_ns / TAKE_DIVISOR, cl->fd);
    if (got == 0 && !poll_stop(c, s)) {
        /* Not taken (the interpreter lost its core: a busy machine): the bell rings for
         * its reply, and the next lone calls are not polled for, as after a poll that
         * gave up (poll_back_off). */
        poll_back_off(c);
        goto not_ours;
    }
    COUNT(C_POLLS, 1);
    if ((watch = iattr(worker, s_bells)) == NULL) {
        PyErr_Clear();
        watch = Py_NewRef(Py_None);
    }
    /* (the polled word cleared by awaited_reply, whatever it finds) */
    out = awaited_reply(watch, completions, entry, c, s, start + poll_ns);
    goto done;
unknown:
    PyErr_Clear();
not_ours:
    out = Py_NewRef(Py_None);
done:
    Py_XDECREF(key);
    Py_XDECREF(caller);
    Py_XDECREF(budget);
    Py_XDECREF(watch);
    Py_XDECREF(completions);
    Py_XDECREF(future);
    Py_XDECREF(sent);
    return out;
}

static PyObject *awaited_reply(PyObject *watch, PyObject *completions, PyObject *want_key,
                               ChannelObject *pc_channel, slot_t *ps, int64_t deadline_ns) {
    int polled = 0; /* the reply was found by the poll: no bell rings for it */
    int polling = want_key != NULL; /* the polled word still set */
    PyObject *out = NULL, *posted = NULL, *key = NULL, *entry = NULL, *pc = NULL,
             *worker = NULL, *caller = NULL, *slot_o = NULL, *done = NULL, *dispatcher = NULL,
             *index = NULL, *group = NULL, *request = NULL, *future = NULL, *waiter = NULL,
             *balancer = NULL, *lock = NULL, *end = NULL, *value = NULL, *got = NULL,
             *tmp = NULL, *failed = NULL;
    /* -- the case, recognised before anything changes ------------------------- */
    int r;
#define CHECK(expr) do { r = (expr); if (r < 0) goto unknown; if (!r) goto not_ours; } while (0)
    CHECK(attr_is(watch, s_retired, Py_False));
    CHECK(attr_is(watch, s_hand, ring_hand_over));
    if ((posted = PyObject_GetAttr(watch, s_posted)) == NULL)
        goto unknown;
    CHECK(PyDict_CheckExact(posted) && PyDict_GET_SIZE(posted) == 1);
    {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        PyDict_Next(posted, &pos, &k, &v);
        key = Py_NewRef(k);
        entry = Py_NewRef(v);
    }
    CHECK(attr_is(entry, s_handed, Py_False));
    CHECK(attr_is(entry, s_completions_a, completions));
    CHECK(attr_is(entry, s_outcome, Py_None));
    if ((tmp = PyObject_GetAttr(entry, s_finish)) == NULL)
        goto unknown;
    CHECK(PyMethod_Check(tmp) && PyMethod_GET_FUNCTION(tmp) == ring_finish_fn &&
          Py_TYPE(PyMethod_GET_SELF(tmp)) == (PyTypeObject *)ring_posted_type);
    pc = Py_NewRef(PyMethod_GET_SELF(tmp));
    Py_CLEAR(tmp);
    CHECK(attr_is(pc, s_finished, Py_False));
    CHECK(attr_is(pc, s_then, Py_None));
    CHECK(attr_is(pc, s_timer, Py_None));
    CHECK(attr_is(pc, s_posted, entry));
    if ((worker = PyObject_GetAttr(pc, s_worker_a)) == NULL)
        goto unknown;
    CHECK(attr_is(worker, s_posted_a, posted));
    r = attr_true(worker, s_draining_a); /* threads waiting in _drain (a count) */
    CHECK(r < 0 ? r : !r);
    if ((tmp = iattr(worker, s_left)) == NULL)
        goto unknown;
    CHECK(PyObject_Length(tmp) == 0);
    Py_CLEAR(tmp);
    if ((caller = iattr(worker, s_caller)) == NULL)
        goto unknown;
    CHECK(Py_TYPE(caller) == (PyTypeObject *)caller_type);
    {   /* worker._links._links, as _collect's test (CUDA link buffers: Python's) */
        PyObject *links = iattr(worker, s_links);
        if (links == NULL)
            goto unknown;
        tmp = iattr(links, s_links_in);
        Py_DECREF(links);
        if (tmp == NULL)
            goto unknown;
        r = PyObject_IsTrue(tmp);
        Py_CLEAR(tmp);
        CHECK(r < 0 ? r : !r);
    }
    {
        PyObject *slots = iattr(worker, s_slots);
        if (slots == NULL)
            goto unknown;
        slot_o = PyDict_Check(slots) ? PyDict_GetItemWithError(slots, key) : NULL;
        Py_XINCREF(slot_o);
        Py_DECREF(slots);
        if (slot_o == NULL && PyErr_Occurred())
            goto unknown;
        CHECK(slot_o != NULL);
    }
    if ((done = PyObject_GetAttr(pc, s_done_a)) == NULL)
        goto unknown;
    CHECK(Py_TYPE(done) == (PyTypeObject *)ring_partial_type);
    if ((tmp = PyObject_GetAttr(done, s_func)) == NULL)
        goto unknown;
    CHECK(PyMethod_Check(tmp) && PyMethod_GET_FUNCTION(tmp) == ring_done_fn);
    dispatcher = Py_NewRef(PyMethod_GET_SELF(tmp));
    Py_CLEAR(tmp);
    if ((tmp = PyObject_GetAttr(done, s_args)) == NULL)
        goto unknown;
    CHECK(PyTuple_CheckExact(tmp) && PyTuple_GET_SIZE(tmp) == 2);
    index = Py_NewRef(PyTuple_GET_ITEM(tmp, 0));
    group = Py_NewRef(PyTuple_GET_ITEM(tmp, 1));
    Py_CLEAR(tmp);
    CHECK(attr_is(group, s_balanced, Py_True));
    if ((tmp = PyObject_GetAttr(group, s_requests)) == NULL)
        goto unknown;
    CHECK(PyList_CheckExact(tmp) && PyList_GET_SIZE(tmp) == 1);
    request = Py_NewRef(PyList_GET_ITEM(tmp, 0));
    Py_CLEAR(tmp);
    CHECK(attr_is(request, s_convert, Py_None));
    if ((future = PyObject_GetAttr(request, s_future)) == NULL)
        goto unknown;
    CHECK(Py_TYPE(future) == (PyTypeObject *)ring_loop_future_type);
    CHECK(attr_is(future, s_on_loop, completions));
    if (want_key == NULL)   /* on that loop's thread, while it runs (a stopped loop's watches are run by the
         * completion thread: the bridge hands their results over) */
        CHECK(loop_running_here(completions));
    if ((waiter = PyObject_GetAttr(future, s_waiter)) == NULL ||
        (balancer = PyObject_GetAttr(dispatcher, s_balancer_a)) == NULL ||
        (end = PyObject_GetAttr(watch, s_end_b)) == NULL ||
        (lock = PyObject_GetAttr(watch, s_wlock_b)) == NULL)
        goto unknown;
    /* -- on_bell's start: the watch cleared, the bell emptied --------------------- */
    if (want_key == NULL) {
        CHECK(lock_now(lock));
        r = PyObject_SetAttr(watch, s_watching, Py_None);
        if (unlock(lock) < 0 || r < 0)
            goto unknown;
        CHECK(drain_bell_fd(end)); /* end-of-file: the Python path says the interpreter died */
    }
    /* -- the reply: settled here when it is there and the common one ------------ */
    {
        CallerObject *cl = (CallerObject *)caller;
        ChannelObject *c = cl->channel;
        unsigned long long call = PyLong_AsUnsignedLongLong(key);
        unsigned long slot = PyLong_AsUnsignedLong(slot_o);
        if (PyErr_Occurred())
            goto unknown;
        CHECK(c->attached && !c->detach_pending && slot < c->nslots);
        if (want_key != NULL) {
            /* poll_awaited: the call just sent (its books' entry is the request's sent
             * handle), taken by its interpreter, its slot polled for */
            CHECK(entry == want_key && c == pc_channel && slot_at(c, (uint32_t)slot) == ps);
            poll_spin(c, ps, 0, deadline_ns, cl->fd);
            polling = 0;
            if (!poll_stop(c, ps)) {
                /* The model takes longer than the poll: the next lone calls on this
                 * channel are not polled for (1, 3, 7, ... up to 63 of them). */
                poll_back_off(c);
                goto not_ours;
            }
            COUNT(C_POLL_HITS, 1);
            c->poll_backoff = 0;
            /* From here the call is settled here, or handed to on_bell (not_ours) as
             * the bell, which did not ring for it, would have. */
            polled = 1;
            CHECK(lock_now(lock));
            r = PyObject_SetAttr(watch, s_watching, Py_None);
            if (unlock(lock) < 0 || r < 0)
                goto unknown;
            /* The loop's watch armed for this reply is spent (a watch's next arming
             * replaces it; a bell that rings meanwhile finds none) */
            PyObject *fd = PyObject_GetAttr(end, s_bell_r), *watches = NULL;
            if (fd != NULL)
                watches = PyObject_GetAttr(completions, s_watches_a);
            if (watches != NULL && PyDict_CheckExact(watches) && PyDict_DelItem(watches, fd) < 0)
                PyErr_Clear(); /* (none: a KeyError) */
            Py_XDECREF(watches);
            Py_XDECREF(fd);
            if (PyErr_Occurred())
                goto unknown;
        }
        CHECK(reply_ready(c, slot_at(c, (unsigned int)slot)));
        if (PyObject_SetAttr(entry, s_handed, Py_True) < 0)
            goto unknown;
        int settled = settle_common(cl, slot_at(c, (unsigned int)slot), call, posted, &got);
        if (settled == 0) { /* not the common reply: on_bell hands it to finish() */
            if (PyObject_SetAttr(entry, s_handed, Py_False) < 0)
                goto done;
            goto not_ours;
        }
        if (settled < 0) { /* _collect's and finish()'s except: the call ends with it */
            PyObject *exc = fetch_error();
            if (PyDict_DelItem(posted, key) < 0)
                PyErr_Clear();
            tmp = PyObject_CallMethodObjArgs(pc, s_end_m, Py_None, exc, NULL);
            Py_XDECREF(exc);
            if (tmp == NULL)
                goto done;
            Py_CLEAR(tmp);
            goto ended;
        }
        value = Py_NewRef(PyTuple_GET_ITEM(got, 0));
    }
    {   /* finish(): the object is loaded in the generation the call went to */
        PyObject *rid = PyObject_GetAttr(pc, s_materializes);
        if (rid == NULL)
            goto hand_end;
        if (rid != Py_None) {
            PyObject *loaded = PyObject_GetAttr(pc, s_materialized_a);
            int rc = loaded == NULL ? -1 : PySet_Check(loaded) ? PySet_Add(loaded, rid)
                : (tmp = PyObject_CallMethod(loaded, "add", "O", rid)) == NULL ? -1 : 0;
            Py_CLEAR(tmp);
            Py_XDECREF(loaded);
            if (rc < 0) { /* finish()'s except: the call ends with the error */
                Py_DECREF(rid);
                PyObject *exc = fetch_error();
                tmp = PyObject_CallMethodObjArgs(pc, s_end_m, Py_None, exc, NULL);
                Py_XDECREF(exc);
                if (tmp == NULL)
                    goto done;
                Py_CLEAR(tmp);
                goto ended;
            }
        }
        Py_DECREF(rid);
    }
    /* -- _PostedCall._end -----------------------------------------------------------
     * From the first step on, the reply is the call's alone: every later step is
     * taken whatever the one before it met.  An error (no memory for a count, a
     * lock that will not let go) is kept, the first one, and the call ends with it:
     * the worker's lock and the balancer's count are given back and the future gets
     * the exception (a call that never ends would hold its interpreter for ever). */
#define KEEP_ERROR() do { if (failed == NULL) failed = fetch_error(); else PyErr_Clear(); } while (0)
    if (PyObject_SetAttr(pc, s_finished, Py_True) < 0)
        goto hand_end;
    r = attr_is(pc, s_counted, Py_True);
    if (r < 0)
        goto hand_end;
    if (r) {
        PyObject *tally = iattr(worker, s_tally);
        int taken = tally == NULL ? -1 : lock_now(tally);
        if (taken <= 0) { /* held by another thread: _end waits for it */
            Py_XDECREF(tally);
            if (taken < 0)
                PyErr_Clear();
            goto hand_end;
        }
        PyObject *n = iattr(worker, s_posted_in_flight), *n1 = NULL;
        if (n != NULL) {
            PyObject *one = PyLong_FromLong(1);
            n1 = one == NULL ? NULL : PyNumber_Subtract(n, one);
            Py_XDECREF(one);
            Py_DECREF(n);
        }
        int rc = n1 == NULL ? -1 : iset(worker, s_posted_in_flight, n1);
        Py_XDECREF(n1);
        if (rc < 0 || PyObject_SetAttr(pc, s_counted, Py_False) < 0)
            KEEP_ERROR();
        if (unlock(tally) < 0)
            KEEP_ERROR();
        Py_DECREF(tally);
    }
    {
        PyObject *started = PyObject_GetAttr(pc, s_started_a);
        double t = started == NULL ? -1.0 : PyFloat_AsDouble(started);
        Py_XDECREF(started);
        if (PyErr_Occurred() || count_call(worker, (int64_t)(t * 1e9), 1) < 0)
            KEEP_ERROR();
    }
    if (PyObject_SetAttr(pc, s_posted, Py_None) < 0)
        KEEP_ERROR();
    r = attr_is(pc, s_holds, Py_True);
    if (r < 0) {
        KEEP_ERROR(); /* (a slot that cannot be read: whether it holds the lock is unknown) */
    } else if (r) {
        PyObject *wl = iattr(worker, s_wlock);
        if (wl == NULL || unlock(wl) < 0)
            KEEP_ERROR();
        Py_XDECREF(wl);
    }
    if (PyObject_SetAttr(pc, s_done_a, Py_None) < 0)
        KEEP_ERROR();
    /* -- Dispatcher._done: the request ended, the count given back (the queue pumped),
     * the caller's future set ------------------------------------------------------ */
    if (PyObject_SetAttr(request, s_sent, Py_None) < 0)
        KEEP_ERROR();
    if (failed != NULL) { /* counted as _end counts a call that ended with an error */
        PyObject *f = iattr(worker, s_failures), *f1 = NULL;
        if (f != NULL) {
            PyObject *one = PyLong_FromLong(1);
            f1 = one == NULL ? NULL : PyNumber_Add(f, one);
            Py_XDECREF(one);
            Py_DECREF(f);
        }
        if (f1 == NULL || iset(worker, s_failures, f1) < 0)
            PyErr_Clear(); /* (the call's own error is the one its caller gets) */
        Py_XDECREF(f1);
    }
    {
        int gave = give_turn_back(balancer, index, dispatcher);
        PyObject *first = gave < 0 ? fetch_error() : NULL; /* raised after the future is set */
        tmp = PyObject_CallMethodNoArgs(waiter, s_cancelled);
        if (tmp != NULL && tmp == Py_False) {
            Py_DECREF(tmp);
            tmp = failed == NULL ? PyObject_CallMethodOneArg(waiter, s_set_result, value)
                                 : PyObject_CallMethodOneArg(waiter, s_set_exception, failed);
        }
        if (first != NULL) {
            Py_XDECREF(tmp);
            tmp = NULL;
            PyErr_Clear();
            restore_error(first);
        }
        if (tmp == NULL)
            goto done;
        Py_CLEAR(tmp);
    }
#undef KEEP_ERROR
ended:
    ring_settled++;
    /* on_bell's end: the bell watched again for calls posted meanwhile (by the pump) */
    if (PyDict_GET_SIZE(posted) > 0) {
        tmp = PyObject_CallMethodNoArgs(watch, s_watch_m);
        if (tmp == NULL)
            goto done;
        Py_CLEAR(tmp);
    }
    out = Py_NewRef(Py_True);
    goto done;
hand_end: /* settled; _PostedCall._end does the rest (and the dispatcher's done), which
           * meets again an error met here, if any, and reports it */
    PyErr_Clear();
    tmp = PyObject_CallMethodObjArgs(pc, s_end_m, value, Py_None, NULL);
    if (tmp == NULL)
        goto done;
    Py_CLEAR(tmp);
    goto ended;
unknown: /* an error while recognising the case: the Python path meets it again */
    PyErr_Clear();
not_ours:
    if (polling && poll_stop(pc_channel, ps))
        polled = 1; /* its reply came while it was recognised */
    if (polled) { /* its reply is there and rang no bell: on_bell takes it as a bell would */
        tmp = PyObject_CallMethodObjArgs(watch, s_on_bell, completions, s_ready, NULL);
        if (tmp == NULL)
            goto done;
        Py_CLEAR(tmp);
    }
    out = Py_NewRef(Py_False);
done:
#undef CHECK
    Py_XDECREF(failed);
    Py_XDECREF(tmp);
    Py_XDECREF(got);
    Py_XDECREF(value);
    Py_XDECREF(end);
    Py_XDECREF(lock);
    Py_XDECREF(balancer);
    Py_XDECREF(waiter);
    Py_XDECREF(future);
    Py_XDECREF(request);
    Py_XDECREF(group);
    Py_XDECREF(index);
    Py_XDECREF(dispatcher);
    Py_XDECREF(done);
    Py_XDECREF(slot_o);
    Py_XDECREF(caller);
    Py_XDECREF(worker);
    Py_XDECREF(pc);
    Py_XDECREF(entry);
    Py_XDECREF(key);
    Py_XDECREF(posted);
    return out;
}

/* -- host: an awaited call's send in C --------------------------------------------
 *
 * post_awaited(dispatcher, request) -> bool: Dispatcher.submit's common case for a
 * request of submit_async(..., on_loop=True) (a served request): nothing queued,
 * the request alone (no batch, not pinned, no timeout, no handles), its object
 * loaded in the interpreter chosen, on its loop's thread.  What _post_now, _post,
 * Worker.post, Worker._send_posted and ProcessWorker._post do, in one C call:
 * the interpreter chosen as LoadBalancer.acquire_room chooses (an idle usable one,
 * the one that went idle last first, else the first in turn; else the least loaded
 * with room in its queue), counted, its lock taken without waiting; the dispatcher's
 * group, the worker's _PostedCall and the backend's posted entry made; counted in
 * posted_in_flight; sent and its books kept (caller_post); the bell watched
 * (BellWatch.watch); the lock let go when the interpreter queues calls; request.sent
 * set.  Its reply is then settled by ring_awaited (or the Python path: the books
 * are the Python path's own).
 *
 * False, with nothing changed, for anything else (then Dispatcher.submit runs):
 * another backend or the pipes, a closed manager or dispatcher, requests queued,
 * every interpreter busy and full, a lock held by another thread, a first load,
 * drops or CUDA links to send, a request the ring does not take.  An error before
 * the send gives back what was taken: a KeyboardInterrupt (a Python call it made,
 * e.g. an object's __init__) is raised, any other error leaves it to the Python path
 * (False).  After the send the call is in flight and ends through its reply, as a
 * call the Python path sent; an error then (of the bell watch, of the on_free hook)
 * is raised once the books are kept, as Worker._send_posted raises it. */

static PyObject *send_group_type, *send_posted_type, *send_worker_type, *send_call_op;
static long send_depth; /* process.PIPELINE_DEPTH */
static PyObject *sd_batch, *sd_index, *sd_op, *sd_handles, *sd_timeout, *sd_usable, *sd_end_w,
    *sd_bells, *sd_posted_depth, *sd_call_a, *sd_placed, *sd_handed_g, *sd_kept, *sd_watches, *sd_on_bell,
    *sd_watch_kept, *sd_ready, *sd_call_soon, *sd_unwatch;

static int send_strings(void) {
    if (sd_handed_g != NULL)
        return 0;
#define S(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    S(sd_batch, "batch"); S(sd_index, "index"); S(sd_op, "op"); S(sd_handles, "handles");
    S(sd_timeout, "timeout"); S(sd_usable, "_usable"); S(sd_end_w, "_end"); S(sd_bells, "_bells");
    S(sd_posted_depth, "posted_depth"); S(sd_call_a, "call"); S(sd_placed, "placed");
    S(sd_handed_g, "handed"); S(sd_kept, "_kept"); S(sd_watches, "_watches"); S(sd_on_bell, "on_bell");
    S(sd_watch_kept, "watch_kept"); S(sd_ready, "ready"); S(sd_call_soon, "call_soon");
    S(sd_unwatch, "_unwatch");
#undef S
    return 0;
}

/* The books' objects made without their classes' __init__ (a Python frame each):
 * allocated by the class and their __slots__ written at the offsets of the class's
 * member descriptors, found once by send_setup.  A class whose __slots__ are not
 * exactly the names expected here leaves send_setup unregistered (post_awaited
 * then sends nothing): what __init__ sets must be set here too. */
#define SEND_MAX_SLOTS 16
typedef struct {
    PyTypeObject *type;
    int n;
    Py_ssize_t off[SEND_MAX_SLOTS];
} send_class_t;

static send_class_t send_group_c, send_pc_c, send_posted_c;

static const char *const send_group_slots[] = {"requests", "balanced", "retried", "handed", NULL};
static const char *const send_pc_slots[] = {"worker", "done", "materializes", "timeout", "posted",
                                            "timer", "finished", "started", "lock", "early", "then",
                                            "holds", "completions", "counted", "materialized", NULL};
static const char *const send_posted_slots[] = {"op", "call", "placed", "completions", "finish",
                                                "handed", "outcome", "timeout", NULL};

/* 0 registered, 1 not the class expected (nothing registered), -1 an error. */
static int send_class(PyObject *type, const char *const *names, send_class_t *out) {
    if (!PyType_Check(type))
        return 1;
    PyTypeObject *t = (PyTypeObject *)type;
    if (t->tp_dictoffset != 0 || t->tp_init == NULL)
        return 1;
    PyObject *declared = PyObject_GetAttrString(type, "__slots__");
    if (declared == NULL)
        return -1;
    int n = 0;
    while (names[n] != NULL)
        n++;
    int same = PyTuple_Check(declared) && PyTuple_GET_SIZE(declared) == n && n <= SEND_MAX_SLOTS;
    for (int i = 0; same && i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(declared, i);
        same = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, names[i]) == 0;
    }
    Py_DECREF(declared);
    if (!same)
        return 1;
    send_class_t c = {t, n, {0}};
    for (int i = 0; i < n; i++) {
        PyObject *d = PyDict_GetItemString(t->tp_dict, names[i]); /* borrowed */
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type)
            return 1;
        PyMemberDef *def = ((PyMemberDescrObject *)d)->d_member;
        if (def->type != T_OBJECT_EX)
            return 1;
        c.off[i] = def->offset;
    }
    Py_INCREF(type);
    Py_XDECREF((PyObject *)out->type);
    *out = c;
    return 0;
}

/* A new instance of c's class with its slots set to values (new references taken). */
static PyObject *send_new(send_class_t *c, PyObject *const *values) {
    PyObject *o = c->type->tp_alloc(c->type, 0);
    if (o == NULL)
        return NULL;
    for (int i = 0; i < c->n; i++)
        *(PyObject **)((char *)o + c->off[i]) = Py_NewRef(values[i]);
    return o;
}

static PyObject *send_allocate_lock; /* _thread.allocate_lock */

/* send_setup(group_type, posted_type, process_worker_type, call_op, pipeline_depth) */
static PyObject *native_send_setup(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "send_setup() takes 5 arguments");
        return NULL;
    }
    if (!cache_here())
        Py_RETURN_NONE; /* another interpreter's objects: post_awaited says False */
    long depth = PyLong_AsLong(args[4]);
    if (depth == -1 && PyErr_Occurred())
        return NULL;
    if (send_strings() < 0 || ring_strings() < 0 || whole_call_strings() < 0 ||
        balancer_strings() < 0)
        return NULL;
    if (ring_posted_type == NULL)
        Py_RETURN_FALSE; /* (ring_setup first: the _PostedCall class) */
    int rc = send_class(args[0], send_group_slots, &send_group_c);
    if (rc == 0)
        rc = send_class(ring_posted_type, send_pc_slots, &send_pc_c);
    if (rc == 0)
        rc = send_class(args[1], send_posted_slots, &send_posted_c);
    if (rc != 0)
        return rc < 0 ? NULL : Py_NewRef(Py_False); /* not the classes expected: Python's */
    if (send_allocate_lock == NULL) {
        PyObject *thread = PyImport_ImportModule("_thread");
        send_allocate_lock = thread == NULL ? NULL : PyObject_GetAttrString(thread, "allocate_lock");
        Py_XDECREF(thread);
        if (send_allocate_lock == NULL)
            return NULL;
    }
    Py_XSETREF(send_group_type, Py_NewRef(args[0]));
    Py_XSETREF(send_posted_type, Py_NewRef(args[1]));
    Py_XSETREF(send_worker_type, Py_NewRef(args[2]));
    Py_XSETREF(send_call_op, Py_NewRef(args[3]));
    send_depth = depth;
    Py_RETURN_TRUE;
}

/* usable(index) (the dispatcher's test): 1, 0, -1 on an error. */
static int send_usable(PyObject *usable, long i) {
    PyObject *io = PyLong_FromLong(i);
    PyObject *r = io == NULL ? NULL : PyObject_CallOneArg(usable, io);
    Py_XDECREF(io);
    int ok = r == NULL ? -1 : PyObject_IsTrue(r);
    Py_XDECREF(r);
    return ok;
}

/* The worker's CUDA links in use (links._links or links._wanted): 1, 0, -1. */
static int send_links_active(PyObject *worker) {
    PyObject *links = iattr(worker, s_links);
    if (links == NULL)
        return -1;
    int active = attr_true(links, s_links_in);
    if (active == 0)
        active = attr_true(links, s_wanted);
    Py_DECREF(links);
    return active;
}

/* Worker.posted_depth of a ProcessWorker, written out: 1 while it queues no calls
 * (the pipes, CUDA links in use), else PIPELINE_DEPTH.  -1 on an error. */
static long send_worker_depth(PyObject *worker) {
    if (Py_TYPE(worker) != (PyTypeObject *)send_worker_type) {
        PyObject *v = PyObject_GetAttr(worker, sd_posted_depth);
        long d = v == NULL ? -1 : PyLong_AsLong(v);
        Py_XDECREF(v);
        return d;
    }
    PyObject *end = iattr(worker, sd_end_w);
    if (end == NULL)
        return -1;
    Py_DECREF(end);
    if (end == Py_None)
        return 1;
    int active = send_links_active(worker);
    return active < 0 ? -1 : active ? 1 : send_depth;
}

/* LoadBalancer.acquire_room(None, usable), then acquire_room(depth, usable), under
 * the balancer's lock taken without waiting: the index counted, -1 when none (or the
 * lock held elsewhere: *busy set), -2 on an error (nothing counted). */
static long send_choose(PyObject *balancer, PyObject *usable, PyObject *workers, int *busy) {
    PyObject *lock = iattr(balancer, s_lock);
    if (lock == NULL)
        return -2;
    int taken = lock_now(lock);
    if (taken <= 0) {
        Py_DECREF(lock);
        *busy = 1;
        return taken < 0 ? -2 : -1;
    }
    long best = -2, n = -1, start = -1;
    PyObject *load = iattr(balancer, s_load), *v;
    if (load == NULL)
        goto out;
    if ((v = iattr(balancer, s_limit)) != NULL) {
        n = PyLong_AsLong(v);
        Py_DECREF(v);
    }
    if (!PyErr_Occurred() && (v = iattr(balancer, s_start)) != NULL) {
        start = PyLong_AsLong(v);
        Py_DECREF(v);
    }
    if (PyErr_Occurred())
        goto out;
    if (!PyList_CheckExact(load) || n <= 0 || n > PyList_GET_SIZE(load) || start < 0 ||
        start >= n) {
        best = -1, *busy = 1; /* not what acquire_room keeps: its own choice */
        goto out;
    }
    long counts[64];
    if (n > 64) {
        best = -1, *busy = 1;
        goto out;
    }
    for (long i = 0; i < n; i++) {
        PyObject *c = PyList_GET_ITEM(load, i);
        counts[i] = PyLong_CheckExact(c) ? PyLong_AsLong(c) : -1;
        if (counts[i] < 0) {
            PyErr_Clear();
            best = -1, *busy = 1;
            goto out;
        }
    }
    best = -1;
    /* An idle one: the warm one (went idle last) first, else the first in turn. */
    PyObject *warm = iattr(balancer, s_warm);
    if (warm == NULL)
        goto error;
    long w = warm == Py_None ? -1 : PyLong_AsLong(warm);
    Py_DECREF(warm);
    if (w == -1 && PyErr_Occurred())
        goto error;
    if (w >= 0 && w < n && counts[w] == 0) {
        int ok = send_usable(usable, w);
        if (ok < 0)
            goto error;
        if (ok)
            best = w;
    }
    for (long k = 0; best < 0 && k < n; k++) {
        long i = (start + k) % n;
        if (counts[i])
            continue;
        int ok = send_usable(usable, i);
        if (ok < 0)
            goto error;
        if (ok)
            best = i;
    }
    /* Else the least loaded with room in its queue (the first of equals in turn;
     * the idle ones were asked above). */
    if (best < 0) {
        long room = -1;
        for (long k = 0; k < n; k++) {
            long i = (start + k) % n;
            if (counts[i] == 0 || (room >= 0 && counts[i] >= counts[room]))
                continue;
            PyObject *worker = PySequence_GetItem(workers, i);
            long depth = worker == NULL ? -1 : send_worker_depth(worker);
            Py_XDECREF(worker);
            if (depth < 0)
                goto error;
            if (counts[i] >= depth)
                continue;
            int ok = send_usable(usable, i);
            if (ok < 0)
                goto error;
            if (ok)
                room = i;
        }
        best = room;
    }
    if (best >= 0) {
        PyObject *next = PyLong_FromLong((best + 1) % n), *counted = PyLong_FromLong(counts[best] + 1);
        if (next == NULL || counted == NULL || iset(balancer, s_start, next) < 0) {
            Py_XDECREF(next);
            Py_XDECREF(counted);
            goto error;
        }
        Py_DECREF(next);
        PyList_SetItem(load, best, counted); /* steals counted */
    }
    goto out;
error:
    best = -2;
out:
    Py_XDECREF(load);
    if (unlock(lock) < 0 && best >= 0) {
        /* (cannot happen for a lock taken here; the count stays this call's) */
        PyErr_WriteUnraisable(lock);
    }
    Py_DECREF(lock);
    return best;
}

/* The balancer's count of index given back without its hook (release(index,
 * notify=False)), the error being raised (if any) kept; an error of its own is
 * reported as unraisable (the count then stays taken, as release() leaves it). */
static void send_give_back(PyObject *balancer, PyObject *index) {
    PyObject *pending = fetch_error();
    PyObject *av[2] = {balancer, index};
    PyObject *given = native_give_back(NULL, av, 2);
    if (given == Py_False) {
        PyObject *kwnames = Py_BuildValue("(s)", "notify");
        PyObject *vec[3] = {balancer, index, Py_False};
        PyObject *r = kwnames == NULL ? NULL
            : PyObject_VectorcallMethod(s_release, vec, 2, kwnames);
        Py_XDECREF(kwnames);
        if (r == NULL)
            PyErr_WriteUnraisable(balancer);
        Py_XDECREF(r);
    } else if (given == NULL) {
        PyErr_WriteUnraisable(balancer);
    }
    Py_XDECREF(given);
    if (pending != NULL)
        restore_error(pending);
}

/* worker.posted_in_flight += d under worker._tally (taken without waiting when
 * wait is 0: 0 returned, nothing changed, while another thread holds it).  1 done,
 * -1 on an error. */
static int send_tally(PyObject *worker, long d, int wait) {
    PyObject *tally = iattr(worker, s_tally);
    if (tally == NULL)
        return -1;
    int taken;
    if (wait) {
        PyObject *r = PyObject_CallMethodNoArgs(tally, s_acquire);
        taken = r == NULL ? -1 : 1;
        Py_XDECREF(r);
    } else {
        taken = lock_now(tally);
    }
    if (taken <= 0) {
        Py_DECREF(tally);
        return taken;
    }
    PyObject *n = iattr(worker, s_posted_in_flight), *n1 = NULL;
    if (n != NULL) {
        PyObject *one = PyLong_FromLong(d);
        n1 = one == NULL ? NULL : PyNumber_Add(n, one);
        Py_XDECREF(one);
        Py_DECREF(n);
    }
    int rc = n1 == NULL ? -1 : iset(worker, s_posted_in_flight, n1);
    Py_XDECREF(n1);
    if (rc < 0) {
        release_keeping_error(tally);
        Py_DECREF(tally);
        return -1;
    }
    rc = unlock(tally);
    Py_DECREF(tally);
    return rc < 0 ? -1 : 1;
}

/* BellWatch.watch() for a call just posted by post_awaited, in its common case:
 * nobody watches the bell, the oldest call not handed over is this loop's, no reply
 * is in its slot yet, and the loop keeps reading this end's bell (watch_kept's
 * reader in place): the watch is armed (completions._watches[bell_r] = the bell's
 * callback) and marked (watching) in one step under the watch's lock.  1 done (or
 * nothing to do, as watch() finds), 0 for BellWatch.watch() to do (nothing changed),
 * -1 on an error (nothing changed). */
static int send_watch(CallerObject *cl, PyObject *bells, PyObject *completions, PyObject *posted) {
    PyObject *lock = iattr(bells, s_wlock_b);
    if (lock == NULL)
        return -1;
    int r = lock_now(lock);
    if (r <= 0) {
        Py_DECREF(lock);
        return r;
    }
    PyObject *end = NULL, *kept_map = NULL, *fd = NULL, *watches = NULL, *on_bell = NULL,
             *callback = NULL, *v;
    int there = 0, soon = 0;
    r = attr_is(bells, s_watching, Py_None);
    if (r > 0)
        r = attr_is(bells, s_retired, Py_False);
    if (r == 0) { /* watched already, or retired: watch() returns */
        r = 1;
        goto out;
    }
    if (r < 0)
        goto out;
    /* The oldest call not handed over: this loop's; no reply there yet (any_reply) */
    Py_ssize_t pos = 0;
    PyObject *k, *entry;
    int oldest = 1;
    while (PyDict_Next(posted, &pos, &k, &entry)) {
        r = attr_is(entry, s_handed, Py_False);
        if (r <= 0) {
            if (r < 0)
                goto out;
            continue;
        }
        if (oldest) {
            oldest = 0;
            r = attr_is(entry, s_completions_a, completions);
            if (r <= 0)
                goto out;
        }
        PyObject *call = PyObject_GetAttr(entry, sd_call_a);
        if (call == NULL) {
            r = -1;
            goto out;
        }
        PyObject *slot = PyDict_GetItemWithError(cl->slots, call);
        Py_DECREF(call);
        if (slot == NULL) {
            r = PyErr_Occurred() ? -1 : 0;
            goto out;
        }
        unsigned long i = PyLong_AsUnsignedLong(slot);
        if (PyErr_Occurred()) {
            r = -1;
            goto out;
        }
        ChannelObject *c = cl->channel;
        if (!c->attached || c->detach_pending || i >= c->nslots) {
            r = 0;
            goto out;
        }
        if (reply_ready(c, slot_at(c, (unsigned int)i)))
            there = 1;
    }
    if (oldest) { /* every call handed over: watch() returns */
        r = 1;
        goto out;
    }
    if ((end = PyObject_GetAttr(bells, s_end_b)) == NULL) {
        r = -1;
        goto out;
    }
    r = attr_is(end, s_bell_closed, Py_True);
    if (r < 0)
        goto out;
    if (r || there) {
        /* HostEnd.watch_bell's "a reply is there already, or the interpreter is gone":
         * on_bell runs soon, from the loop, the watch marked meanwhile */
        if ((on_bell = PyObject_GetAttr(bells, sd_on_bell)) == NULL ||
            (callback = PyObject_CallFunctionObjArgs(ring_partial_type, on_bell, completions,
                                                     sd_ready, NULL)) == NULL ||
            PyObject_SetAttr(bells, s_watching, completions) < 0) {
            r = -1;
            goto out;
        }
        soon = 1;
        r = 1;
        goto out;
    }
    /* LoopCompletions.watch_kept's common case: its reader on this end's bell kept
     * (and its method not replaced on the instance, as a test that counts watches does) */
    {
        PyObject **dict = _PyObject_GetDictPtr(completions);
        if (dict == NULL || *dict == NULL) {
            r = 0;
            goto out;
        }
        v = PyDict_GetItemWithError(*dict, sd_watch_kept);
        if (v != NULL || PyErr_Occurred()) {
            r = v != NULL ? 0 : -1;
            goto out;
        }
    }
    if ((fd = PyObject_GetAttr(end, s_bell_r)) == NULL ||
        (kept_map = PyObject_GetAttr(completions, sd_kept)) == NULL ||
        (watches = PyObject_GetAttr(completions, sd_watches)) == NULL) {
        r = -1;
        goto out;
    }
    r = PyDict_CheckExact(kept_map) && PyDict_CheckExact(watches) && PyLong_CheckExact(fd);
    if (r <= 0)
        goto out;
    v = PyDict_GetItemWithError(kept_map, fd);
    if (v == NULL) {
        r = PyErr_Occurred() ? -1 : 0;
        goto out;
    }
    r = PyTuple_CheckExact(v) && PyTuple_GET_SIZE(v) == 2 && PyTuple_GET_ITEM(v, 0) == end;
    if (r <= 0)
        goto out;
    if ((on_bell = PyObject_GetAttr(bells, sd_on_bell)) == NULL ||
        (callback = PyObject_CallFunctionObjArgs(ring_partial_type, on_bell, completions, NULL))
            == NULL ||
        PyDict_SetItem(watches, fd, callback) < 0) {
        r = -1;
        goto out;
    }
    if (PyObject_SetAttr(bells, s_watching, completions) < 0) {
        PyObject *exc = fetch_error();
        if (PyDict_DelItem(watches, fd) < 0)
            PyErr_Clear();
        restore_error(exc);
        r = -1;
        goto out;
    }
    r = 1;
out:
    Py_XDECREF(watches);
    Py_XDECREF(kept_map);
    Py_XDECREF(fd);
    Py_XDECREF(end);
    if (unlock(lock) < 0) {
        PyErr_WriteUnraisable(lock);
        r = -1;
    }
    Py_DECREF(lock);
    if (soon) { /* (outside the lock, as BellWatch._arm) */
        v = PyObject_CallMethodOneArg(completions, sd_call_soon, callback);
        if (v == NULL) { /* not armed after all: the next watch arms one */
            PyObject *exc = fetch_error();
            v = PyObject_CallMethodOneArg(bells, sd_unwatch, completions);
            if (v == NULL)
                PyErr_WriteUnraisable(bells);
            restore_error(exc);
            Py_XDECREF(v);
            v = NULL;
            r = -1;
        }
        Py_XDECREF(v);
    }
    Py_XDECREF(callback);
    Py_XDECREF(on_bell);
    return r;
}

static PyObject *native_post_awaited(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "post_awaited(dispatcher, request) takes 2 arguments");
        return NULL;
    }
    PyObject *dispatcher = args[0], *request = args[1];
    if (send_group_type == NULL || ring_loop_future_type == NULL || !cache_here())
        Py_RETURN_FALSE;
    PyObject *out = NULL, *future = NULL, *on_loop = NULL, *waiter = NULL, *rid = NULL,
             *balancer = NULL, *usable = NULL, *workers = NULL, *index = NULL, *worker = NULL,
             *wlock = NULL, *caller = NULL, *materialized = NULL, *freed_q = NULL, *freed = NULL,
             *call_args = NULL, *full = NULL, *group = NULL, *requests = NULL, *method = NULL,
             *done = NULL, *pc = NULL, *finish = NULL, *entry = NULL, *posted = NULL,
             *key = NULL, *placed = NULL, *sent = NULL, *bells = NULL, *tmp = NULL,
             *started_o = NULL, *pc_lock = NULL;
    int r, counted = 0, holds = 1;
    /* -- the case, recognised before anything is taken ---------------------------- */
#define CHECK(expr) do { r = (expr); if (r < 0) goto unknown; if (!r) goto not_ours; } while (0)
    CHECK(attr_is(dispatcher, s_closed_m, Py_False));
    CHECK(attr_is(dispatcher, s_empty, Py_True));
    CHECK(attr_is(request, sd_batch, Py_None));
    CHECK(attr_is(request, sd_index, Py_None));
    CHECK(attr_is(request, sd_op, send_call_op));
    CHECK(attr_is(request, sd_handles, Py_None));
    CHECK(attr_is(request, sd_timeout, Py_None));
    if ((rid = PyObject_GetAttr(request, s_materializes)) == NULL)
        goto unknown;
    CHECK(rid != Py_None);
    if ((call_args = PyObject_GetAttr(request, s_args)) == NULL)
        goto unknown;
    CHECK(PyTuple_CheckExact(call_args));
    if ((future = PyObject_GetAttr(request, s_future)) == NULL)
        goto unknown;
    CHECK(Py_TYPE(future) == (PyTypeObject *)ring_loop_future_type);
    if ((on_loop = PyObject_GetAttr(future, s_on_loop)) == NULL ||
        (waiter = PyObject_GetAttr(future, s_waiter)) == NULL)
        goto unknown;
    CHECK(on_loop != Py_None);
    CHECK(loop_running_here(on_loop));   /* LoopCompletions.here() */
    /* set_running_or_notify_cancel(): a task cancelled already is the Python path's */
    if ((tmp = PyObject_CallMethodNoArgs(waiter, s_cancelled)) == NULL)
        goto unknown;
    CHECK(tmp == Py_False);
    Py_CLEAR(tmp);
    if ((balancer = PyObject_GetAttr(dispatcher, s_balancer_a)) == NULL ||
        (usable = PyObject_GetAttr(dispatcher, sd_usable)) == NULL ||
        (workers = PyObject_GetAttr(dispatcher, s_workers)) == NULL)
        goto unknown;
    /* -- the interpreter: counted in the balancer, its lock taken -------------------- */
    {
        int busy = 0;
        long chosen = send_choose(balancer, usable, workers, &busy);
        if (chosen == -2)
            goto before_count;
        CHECK(chosen >= 0);
        if ((index = PyLong_FromLong(chosen)) == NULL) {
            /* (no memory: the count cannot be named to give it back) */
            PyErr_WriteUnraisable(balancer);
            goto unknown;
        }
    }
    /* The count is taken: from here every way out before the send gives it back. */
    if ((worker = PyObject_GetItem(workers, index)) == NULL)
        goto give_back;
    if (Py_TYPE(worker) != (PyTypeObject *)send_worker_type)
        goto give_back;
    if ((wlock = iattr(worker, s_wlock)) == NULL)
        goto give_back;
    r = lock_now(wlock);
    if (r <= 0) /* held outside the balancer (a pinned session, a restart): Python's */
        goto give_back;
    /* Under the lock: what Worker.post and ProcessWorker._post look at. */
    r = attr_true(worker, s_closed);
    r = r != 0 ? (r < 0 ? -1 : 0) : attr_true(worker, s_started);
    if (r > 0) {
        caller = iattr(worker, s_caller); /* this generation's */
        r = caller == NULL ? -1 : Py_TYPE(caller) == (PyTypeObject *)caller_type;
    }
    if (r > 0) {
        tmp = iattr(worker, sd_end_w);
        r = tmp == NULL ? -1 : tmp != Py_None;
        Py_CLEAR(tmp);
    }
    if (r > 0) {
        int active = send_links_active(worker);
        r = active < 0 ? -1 : !active;
    }
    if (r > 0) {
        tmp = iattr(worker, s_drops);
        Py_ssize_t nd = tmp == NULL ? -1 : PyObject_Length(tmp);
        Py_CLEAR(tmp);
        r = nd < 0 ? -1 : nd == 0;
    }
    if (r > 0) {
        materialized = iattr(worker, s_materialized);
        r = materialized == NULL ? -1 : PySet_Check(materialized) ? PySet_Contains(materialized, rid) : 0;
    }
    if (r > 0) {
        bells = iattr(worker, sd_bells);
        posted = bells == NULL ? NULL : iattr(worker, s_posted_a);
        r = posted == NULL ? -1 : PyDict_Check(posted) && bells != Py_None;
    }
    if (r <= 0)
        goto unlock_give_back;
    holds = send_depth <= 1; /* Worker._pipelines(): links and _end looked at above */
    /* -- the books: the dispatcher's group, the worker's call, the backend's entry ----- */
    if ((requests = PyList_New(1)) == NULL)
        goto unlock_give_back;
    PyList_SET_ITEM(requests, 0, Py_NewRef(request));
    /* (their classes' __init__, written out: see send_class) */
    {
        PyObject *g[] = {requests, Py_True, Py_False, Py_False};
        if ((group = send_new(&send_group_c, g)) == NULL ||
            (method = PyMethod_New(ring_done_fn, dispatcher)) == NULL ||
            (done = PyObject_CallFunctionObjArgs(ring_partial_type, method, index, group, NULL))
                == NULL ||
            (started_o = PyFloat_FromDouble((double)now_ns() / 1e9)) == NULL ||
            (pc_lock = PyObject_CallNoArgs(send_allocate_lock)) == NULL)
            goto unlock_give_back;
        PyObject *c[] = {worker, done, rid, Py_None, Py_None, Py_None, Py_False, started_o, pc_lock,
                         Py_None, Py_None, holds ? Py_True : Py_False, Py_None, Py_False,
                         materialized};
        if ((pc = send_new(&send_pc_c, c)) == NULL ||
            (finish = PyMethod_New(ring_finish_fn, pc)) == NULL)
            goto unlock_give_back;
        PyObject *e[] = {send_call_op, Py_None, Py_None, on_loop, finish, Py_False, Py_None, Py_None};
        if ((entry = send_new(&send_posted_c, e)) == NULL)
            goto unlock_give_back;
    }
    /* Counted before the send (as _send_posted): its reply may be read before this
     * returns only on this thread, but the count is read by others. */
    if (PyObject_SetAttr(pc, s_counted, Py_True) < 0)
        goto unlock_give_back;
    r = send_tally(worker, 1, 0);
    if (r <= 0)
        goto unlock_give_back;
    counted = 1;
    /* -- the send: freed blocks reported, pending argument blocks settled ------------- */
    if ((freed_q = iattr(worker, s_freed)) == NULL)
        goto unsent;
    Py_ssize_t nfreed = PyObject_Length(freed_q);
    if (nfreed < 0)
        goto unsent;
    freed = nfreed ? released_offsets(worker, freed_q) : PyTuple_New(0);
    if (freed == NULL)
        goto unsent;
    CallerObject *cl = (CallerObject *)caller;
    if (cl->held != Py_None && PyList_GET_SIZE(((HeldObject *)cl->held)->pending) > 0 &&
        held_settle((HeldObject *)cl->held) < 0)
        goto unsent;
    {   /* Worker.post: the recipe left out, the object being loaded there */
        Py_ssize_t na = PyTuple_GET_SIZE(call_args);
        if ((full = PyTuple_New(na + 1)) == NULL)
            goto unsent;
        for (Py_ssize_t i = 0; i < na; i++)
            PyTuple_SET_ITEM(full, i, Py_NewRef(PyTuple_GET_ITEM(call_args, i)));
        PyTuple_SET_ITEM(full, na, Py_NewRef(Py_None));
    }
    key = caller_post(cl, full, freed, entry, posted, -1, &placed, NULL);
    if (key == NULL)
        goto unsent;
    if (key == Py_None) { /* not the common call after all: nothing sent */
        Py_CLEAR(key);
        goto unsent;
    }
    /* -- sent: the books, then the bell watched, the lock let go --------------------- */
    if (PyObject_SetAttr(entry, sd_call_a, key) < 0 ||
        PyObject_SetAttr(entry, sd_placed, placed) < 0 ||
        PyObject_SetAttr(pc, s_posted, entry) < 0 ||
        PyObject_SetAttr(group, sd_handed_g, Py_True) < 0 ||
        (sent = PyTuple_Pack(2, worker, entry)) == NULL ||
        PyObject_SetAttr(request, s_sent, sent) < 0) {
        /* (no memory for the books: the reply is read as the Python path reads it,
         * pc.posted aside, which its finish needs) */
        PyErr_WriteUnraisable(worker);
    }
    r = send_watch(cl, bells, on_loop, posted);
    if (r < 0)
        PyErr_Clear(); /* BellWatch.watch() meets it again */
    tmp = r > 0 ? Py_NewRef(Py_None) : PyObject_CallMethodNoArgs(bells, s_watch_m);
    if (tmp == NULL) { /* watched again, as ProcessWorker._post does, then raised */
        PyObject *exc = fetch_error();
        tmp = PyObject_CallMethodNoArgs(bells, s_watch_m);
        if (tmp == NULL)
            PyErr_WriteUnraisable(bells);
        Py_CLEAR(tmp);
        restore_error(exc);
    }
    Py_CLEAR(tmp);
    if (!holds) { /* the next request may follow it into the interpreter */
        release_keeping_error(wlock);
        PyObject *exc = fetch_error();
        if (run_hook(worker, s_on_free, dispatcher) < 0 && exc != NULL)
            PyErr_WriteUnraisable(worker); /* (the first error goes on) */
        if (exc != NULL)
            restore_error(exc);
    }
    out = PyErr_Occurred() ? NULL : Py_NewRef(Py_True);
    goto done;

unsent: /* nothing sent: the freed blocks go with the next call, the count back */
    {
        PyObject *exc = fetch_error();
        if (freed != NULL) {
            PyObject *r2 = PyObject_CallMethodOneArg(freed_q, s_extend, freed);
            if (r2 == NULL)
                PyErr_WriteUnraisable(worker);
            Py_XDECREF(r2);
        }
        if (counted && send_tally(worker, -1, 1) < 0)
            PyErr_WriteUnraisable(worker);
        if (pc != NULL && PyObject_SetAttr(pc, s_counted, Py_False) < 0)
            PyErr_WriteUnraisable(worker);
        if (exc != NULL)
            restore_error(exc);
    }
unlock_give_back:
    release_keeping_error(wlock);
give_back:
    send_give_back(balancer, index);
before_count:
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
        goto done; /* a KeyboardInterrupt (a Python call made here): raised */
unknown: /* an error while recognising the case: the Python path meets it again */
    PyErr_Clear();
not_ours:
    out = Py_NewRef(Py_False);
done:
#undef CHECK
    Py_XDECREF(tmp);
    Py_XDECREF(pc_lock);
    Py_XDECREF(started_o);
    Py_XDECREF(bells);
    Py_XDECREF(sent);
    Py_XDECREF(placed);
    Py_XDECREF(key);
    Py_XDECREF(posted);
    Py_XDECREF(entry);
    Py_XDECREF(finish);
    Py_XDECREF(pc);
    Py_XDECREF(done);
    Py_XDECREF(method);
    Py_XDECREF(requests);
    Py_XDECREF(group);
    Py_XDECREF(full);
    Py_XDECREF(call_args);
    Py_XDECREF(freed);
    Py_XDECREF(freed_q);
    Py_XDECREF(materialized);
    Py_XDECREF(caller);
    Py_XDECREF(wlock);
    Py_XDECREF(worker);
    Py_XDECREF(index);
    Py_XDECREF(workers);
    Py_XDECREF(usable);
    Py_XDECREF(balancer);
    Py_XDECREF(rid);
    Py_XDECREF(waiter);
    Py_XDECREF(on_loop);
    Py_XDECREF(future);
    return out;
}

static PyMethodDef module_methods[] = {
    {"spinners", native_spinners, METH_NOARGS, "Host threads of this process spinning now."},
    {"in_flight", native_in_flight, METH_NOARGS,
     "in_flight() -> (requests, channels)\n\nRequests this process posted whose reply it has not\n"
     "taken, and the channels holding them (what decides whether a waiting caller spins)."},
    {"counters", native_counters, METH_NOARGS,
     "counters() -> dict\n\nWhat the waits of this process did so far (all zero unless\n"
     "MULTIPY_CHANNEL_COUNTS=1 was set when the module loaded): waits, spin_hits,\n"
     "no_spin, sleeps (FUTEX_WAIT), wakes (FUTEX_WAKE), gil_waits, gil_ns, yields, pokes\n"
     "(request waits whose sleep a poke ended)."},
    {"copy", (PyCFunction)(void (*)(void))native_copy, METH_FASTCALL,
     "copy(dst, src, nbytes, /)\n\nCopy nbytes from address src to address dst (memmove)."},
    {"unpack_reply", native_unpack_reply, METH_O,
     "unpack_reply(frame, /)\n\nThe fields of a binary reply frame (see transport.messages)."},
    {"pack_reply", (PyCFunction)(void (*)(void))native_pack_reply, METH_FASTCALL,
     "pack_reply(call, value, pinned, unpinned, output, blocks, /)\n\nA binary reply frame."},
    {"tensor_setup", (PyCFunction)(void (*)(void))native_tensor_setup, METH_FASTCALL,
     "tensor_setup(tensor_type, parameter_type, api, to_dlpack, from_dlpack, /) -> bool\n\n"
     "Let tensor_item and tensor_read work on tensors of torch (torch.Tensor,\n"
     "torch.nn.Parameter, the \"dlpack_exchange_api\" capsule or None,\n"
     "torch._C._to_dlpack, torch._C._from_dlpack).  True when the exchange API is used."},
    {"tensor_item", (PyCFunction)(void (*)(void))native_tensor_item, METH_FASTCALL,
     "tensor_item(t, returnable, arena, reuse_arena, placed, /) -> bytes | None\n\n"
     "The codec's binary item for tensor t (see transport.codec.Encoder._item), its\n"
     "bytes copied into a block of arena (its offset appended to placed) unless t\n"
     "lies in returnable (or, with reuse_arena, in arena); None for a tensor the\n"
     "Python path encodes."},
    {"pack_call", (PyCFunction)(void (*)(void))native_pack_call, METH_FASTCALL,
     "pack_call(args, freed, returnable, arena, reuse_arena, placed, /) -> bytes | None\n\n"
     "The request CALL_REPLICATED(*args) as the binary call (codec.FAST_CALL), its\n"
     "tensors written as tensor_item writes them; None for a request the Python\n"
     "path encodes (the blocks placed meanwhile are in placed)."},
    {"call_setup", (PyCFunction)(void (*)(void))native_call_setup, METH_FASTCALL,
     "call_setup(is_inference, is_grad, set_grad, inference_mode, tracing, hooks,\n"
     "           module_call, call_impl, /)\n\n"
     "What run_call and serve_calls need of torch (interp.state._TorchCalls), in this\n"
     "interpreter."},
    {"run_call", (PyCFunction)(void (*)(void))native_run_call, METH_FASTCALL,
     "run_call(fn, args, kwargs, grad, /)\n\n"
     "fn(*args, **kwargs) under the autograd mode grad (messages.GradMode, or None:\n"
     "the thread's own), an nn.Module's forward called directly when its call would\n"
     "call only that (interp.state._run)."},
    {"serve_calls", (PyCFunction)(void (*)(void))native_serve_calls, METH_FASTCALL,
     serve_calls_doc},
    {"read_call", (PyCFunction)(void (*)(void))native_read_call, METH_FASTCALL,
     "read_call(data, pos, outbound, own, /) -> (rid, method, positional, grad, freed, blocks) | None\n\n"
     "The binary call (codec.FAST_CALL) at data[pos], its tensors made as tensor_read\n"
     "makes them; blocks lists (seg, offset, holder) per tensor.  None for a call the\n"
     "Python path reads."},
    {"tensor_read", (PyCFunction)(void (*)(void))native_tensor_read, METH_FASTCALL,
     "tensor_read(data, pos, outbound, own, /) -> (tensor, holder, seg, offset, end) | None\n\n"
     "A tensor over the block that the tensor item at data[pos] names, in segment\n"
     "outbound (seg 0) or own (seg 1); holder lives as long as a tensor views the\n"
     "block.  None for an item the Python path reads."},
    {"held_blocks", (PyCFunction)(void (*)(void))native_held_blocks, METH_FASTCALL,
     "held_blocks(arena, pins, /) -> HeldBlocks\n\n"
     "The host's books of its argument blocks (arena, an shm.Arena) that result\n"
     "tensors view, pins the set of those the interpreter keeps (see\n"
     "multipy.transport.shm.held_blocks)."},
    {"tensor_value", (PyCFunction)(void (*)(void))native_tensor_value, METH_FASTCALL,
     "tensor_value(data, outbound, own, released, held, /) -> tensor | None\n\n"
     "The tensor of a one-tensor binary value, whose block's death is reported\n"
     "by its holder itself: released(offset) for a block of outbound, to held\n"
     "(a HeldBlocks) for one of own.  None for a value the decoder reads."},
    {"caller", (PyCFunction)(void (*)(void))native_caller, METH_FASTCALL,
     "caller(worker, channel, end, /) -> Caller\n\n"
     "The common calls of one generation of a process worker (its channel, its\n"
     "HostEnd end, the books it keeps) sent and ended in C: blocking ones by\n"
     "Caller.send and Caller.finish; posted ones by Caller.post, their replies read\n"
     "by Caller.collect, the bell given up by Caller.unwant_bell."},
    {"take_turn", native_take_turn, METH_O,
     "take_turn(balancer, /) -> int | None\n\n"
     "LoadBalancer.acquire() in one step: the next interpreter in turn when it is free,\n"
     "else the first free one, else the least loaded; None (nothing changed) while the\n"
     "balancer's lock is held."},
    {"give_back", (PyCFunction)(void (*)(void))native_give_back, METH_FASTCALL,
     "give_back(balancer, index, /) -> bool\n\n"
     "LoadBalancer.release(index, notify=False) done here (True), or left to it (False,\n"
     "while the balancer's lock is held)."},
    {"call_replicated", (PyCFunction)(void (*)(void))native_call_replicated, METH_FASTCALL,
     "call_replicated(obj, args, kwargs, op, /) -> value\n\n"
     "ReplicatedObj.__call__(obj, *args, **kwargs) (op: Op.CALL_REPLICATED): the\n"
     "common blocking call in one C call (the balancer's turn, the worker's lock, the\n"
     "send, the wait, the statistics); anything else by the manager's and the\n"
     "worker's Python path, from the step it was reached."},
    {"ring_setup", (PyCFunction)(void (*)(void))native_ring_setup, METH_FASTCALL,
     "ring_setup(hand_over, posted_call_type, dispatcher_done, loop_future_type,\n"
     "           partial_type, running_loop, /) -> None\n\n"
     "The Python objects ring_awaited recognises (registered by runtime.dispatch)."},
    {"send_setup", (PyCFunction)(void (*)(void))native_send_setup, METH_FASTCALL,
     "send_setup(group_type, posted_type, process_worker_type, call_op, pipeline_depth, /)\n\n"
     "The Python objects post_awaited makes and recognises (registered by runtime.dispatch)."},
    {"post_awaited", (PyCFunction)(void (*)(void))native_post_awaited, METH_FASTCALL,
     "post_awaited(dispatcher, request, /) -> bool\n\n"
     "Send an awaited request read on its loop (submit_async(..., on_loop=True)) in its\n"
     "common case: an interpreter taken as the balancer's acquire_room takes it, the\n"
     "call sent on the process backend's channel and its books kept, the bell watched.\n"
     "False, with nothing taken, for what Dispatcher.submit sends."},
    {"ring_awaited", (PyCFunction)(void (*)(void))native_ring_awaited, METH_FASTCALL,
     "ring_awaited(watch, completions, /) -> bool\n\n"
     "BellWatch.on_bell's common case on an event loop: the one posted call in flight\n"
     "is a lone awaited request of this loop whose reply is the common one; it is\n"
     "settled, ended and its future set here (True).  False, the bell emptied and\n"
     "nothing else changed, for anything else (on_bell goes on in Python)."},
    {"ring_settled", native_ring_settled, METH_NOARGS,
     "ring_settled() -> int\n\n"
     "How many rings ring_awaited settled in C in this process (its True answers):\n"
     "a served request's reply that went the Python way does not count.\n\n"
     ">>> ring_settled() >= 0\n"
     "True"},
    {"poll_awaited", native_poll_awaited, METH_O,
     "poll_awaited(request, /) -> bool | None\n\n"
     "Right after an awaited request (submit_async(..., on_loop=True)) was sent from\n"
     "its loop's thread: when it is the one call in flight of this process and its\n"
     "interpreter, awake, takes it within a fifth of the poll, poll its reply slot for\n"
     "up to the loop's completions.reply_poll seconds and settle it here as\n"
     "ring_awaited does (True: its future is set; no bell rang for it).  False: polled,\n"
     "and the poll gave up (the bell rings for the reply) or the reply went to\n"
     "BellWatch.on_bell.  None, with nothing changed, when it is not that case.\n"
     "Called on the loop's thread only."},
    {"watch_block", (PyCFunction)(void (*)(void))native_watch_block, METH_FASTCALL,
     "watch_block(holder, offset, book, /) -> bool\n\n"
     "Make a TensorBlock call book(offset) when it dies; False for another holder."},
    {NULL, NULL, 0, NULL},
};

/* Multi-phase initialisation with a heap type: the module loads in isolated
 * subinterpreters (each with its own GIL) as well as in the main one. */
static int native_exec(PyObject *m) {
    const char *env = getenv("MULTIPY_CHANNEL_COUNTS");
    counting = env != NULL && env[0] == '1';
    PyObject *type = PyType_FromModuleAndSpec(m, &Channel_spec, NULL);
    if (type == NULL)
        return -1;
    channel_dealloc = (destructor)Channel_dealloc;
    if (PyModule_AddObject(m, "Channel", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "READY", READY) < 0 ||
        PyModule_AddIntConstant(m, "TIMEOUT", TIMEOUT) < 0 ||
        PyModule_AddIntConstant(m, "DEAD", DEAD) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "SLEPT", SLEPT) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_BYTES", HEADER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "RECORD_HEAD", RECORD_HEAD) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_HEAD", SLOT_HEAD) < 0 ||
        PyModule_AddIntConstant(m, "VERSION", VERSION) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "multipy._native",
    "Mechanism of multipy's shared-memory call channel (see multipy.transport.channel).", 0,
    module_methods, native_slots,
};

PyMODINIT_FUNC PyInit__native(void) {
    return PyModuleDef_Init(&native_module);
}
