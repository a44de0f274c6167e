/*
 * _speedups: the native fast path of LogBuffer for MessagePack frames of whole trees.
 *
 * reassemble(payload, now, limits, dumps) takes the bytes of one MessagePack frame
 * (an array of log maps, or an envelope {"seq": n, "logs": [...]}) and, when every tree in
 * it is complete, returns the JSON lines that LogBuffer.feed_many would publish for it,
 * byte for byte, without building a Python object per event. It returns None ("decline")
 * as soon as anything is not the common case: the caller then takes the reference path
 * (wire.decode_msgpack + LogBuffer.feed_many), which owns every error and every rare rule.
 * Declining is always safe; accepting obliges this file to produce exactly what the
 * reference produces (tests/test_fastpath.py checks that on generated frames).
 *
 * It declines, among others, on: anything the wire decoder refuses or that breaks a wire
 * limit (bad MessagePack, invalid UTF-8, binary or extension values, non-string keys, too
 * deep, too long, too many keys or events, an array too long, a log map that may be too
 * big as JSON), duplicate keys in a map, a non-map event, any event the default mapper
 * refuses (ids, timestamps and durations outside their sane ranges included) or would
 * coerce from a string, an incomplete tree
 * (a begin without its end, a child whose parent is missing, no root), duplicate or
 * conflicting begins, ends and atomic events, parent cycles, trees deeper than the
 * engine's max_depth or larger than max_events_per_tx, keys the engine writes itself
 * (kind, children, complete), and nesting deeper than HARD_MAX_DEPTH.
 *
 * What stays with the caller (buffer.py): the engine's state. The result lists the uuids
 * of the trees it publishes; the caller declines when one of them is open or was already
 * published, or when the open-tree cap would evict, and otherwise records what the
 * engine remembers of each tree (the packed ids returned beside each uuid).
 *
 * split(payload, now, limits, partitions, other, max_event_bytes) is the ingest side of the
 * bus (async_logging/bus/ingest.py): the same parse and the same mapper's checks, then, for a
 * frame with nothing to refuse, each event's MessagePack bytes by partition (CRC-32 of the
 * mapped uuid modulo partitions; `other` for an event without one), in frame order. It
 * declines as reassemble does on anything the parse or the mapper would not take, and on
 * an event longer than max_event_bytes; it does not look at trees. Its oracle is the
 * reference mapping (wire.decode_msgpack + map_events + bus.partition.partition_of):
 * tests/test_native_split.py.
 *
 * Memory: everything is allocated per call (PyMem), bounded by the payload's size, and
 * freed before returning. No global state: calls from several threads are independent.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

/* ------------------------------------------------------------------ results and limits */

#define OK 0
#define NO 1   /* decline: the reference path decides */
#define ERR -1 /* a Python exception is set (memory) */

#if defined(__GNUC__)
#define HOT static inline __attribute__((always_inline))
#else
#define HOT static inline
#endif

#define TRY(expr)                      \
    do {                               \
        int rc_ = (expr);              \
        if (rc_ != OK) return rc_;     \
    } while (0)

/* Deepest nesting walked here (the log map is level 1); deeper frames decline. */
#define HARD_MAX_DEPTH 64
/* Distinct map keys in one frame; more decline. */
#define MAX_KEY_IDS 4096
/* The clock (what a missing timestamp becomes) outside +-2**62 declines (differences of
 * timestamps must fit). */
#define TS_BOUND ((int64_t)1 << 62)
/* The mapper's sane ranges (model.py: MAX_TIMESTAMP_MS, MAX_DURATION_MS, MAX_ID_LENGTH;
 * timestamps and durations from 0): values outside decline, the reference refuses them. */
#define MAX_TIMESTAMP_MS ((int64_t)253402300799999)
#define MAX_DURATION_MS MAX_TIMESTAMP_MS
#define MAX_ID_LENGTH 256
/* No MessagePack byte becomes more than this many bytes of JSON (wire.RECORD_EXPANSION):
 * a log map of n bytes whose n * RECORD_EXPANSION passes max_record_bytes declines (the
 * reference path measures it). */
#define RECORD_EXPANSION 6

typedef struct {
    Py_ssize_t max_message_bytes, max_events, max_depth, max_string, max_keys;
    Py_ssize_t max_array, max_record; /* max_array_length, max_record_bytes */
    Py_ssize_t tree_depth;  /* BufferLimits.max_depth */
    Py_ssize_t tx_events;   /* BufferLimits.max_events_per_tx */
    int compact;            /* BufferLimits.compact */
    int64_t now;
} Params;

/* ------------------------------------------------------------------ values */

enum { T_NIL, T_FALSE, T_TRUE, T_INT, T_UINT, T_FLOAT, T_STR, T_ARRAY, T_MAP };

typedef struct {
    const uint8_t *raw, *raw_end; /* the whole value's bytes (nested values are re-read) */
    const uint8_t *s;             /* T_STR: the UTF-8 bytes */
    uint32_t len;                 /* T_STR: bytes; T_ARRAY / T_MAP: items */
    uint8_t type;
    uint8_t clean;                /* T_STR: known to need no JSON escaping */
    union {
        int64_t i;
        uint64_t u;
        double f;
    } n;
} Value;

typedef struct {
    int32_t key; /* key id */
    Value v;
} Field;

/* ------------------------------------------------------------------ growable buffers */

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static int buf_grow(Buf *b, size_t extra) {
    size_t need = b->len + extra, cap = b->cap ? b->cap : 4096;
    if (need < b->len) goto fail;
    while (cap < need) {
        if (cap > PY_SSIZE_T_MAX / 2) goto fail;
        cap *= 2;
    }
    char *d = PyMem_RawRealloc(b->data, cap);
    if (d == NULL) goto fail;
    b->data = d;
    b->cap = cap;
    return OK;
fail:
    return ERR; /* out of memory: reassemble() raises MemoryError */
}

static inline int buf_reserve(Buf *b, size_t extra) {
    return (b->len + extra <= b->cap) ? OK : buf_grow(b, extra);
}

static inline int buf_put(Buf *b, const void *p, size_t n) {
    TRY(buf_reserve(b, n));
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return OK;
}

#define PUT_LIT(b, lit) buf_put((b), (lit), sizeof(lit) - 1)

/* An arena whose blocks never move: synthetic values point into it. */
typedef struct Block {
    struct Block *next;
    size_t used, cap;
    char data[];
} Block;

typedef struct {
    Block *head;
} Arena;

static void *arena_alloc(Arena *a, size_t n) {
    n = (n + 7) & ~(size_t)7;
    Block *b = a->head;
    if (b == NULL || b->cap - b->used < n) {
        size_t cap = n > 16384 ? n : 16384;
        b = PyMem_RawMalloc(sizeof(Block) + cap);
        if (b == NULL) return NULL; /* out of memory */
        b->next = a->head;
        b->used = 0;
        b->cap = cap;
        a->head = b;
    }
    void *p = b->data + b->used;
    b->used += n;
    return p;
}

static void arena_free(Arena *a) {
    Block *b = a->head;
    while (b != NULL) {
        Block *next = b->next;
        PyMem_RawFree(b);
        b = next;
    }
    a->head = NULL;
}

/* ------------------------------------------------------------------ UTF-8 */

/* Strict UTF-8 (RFC 3629: no overlongs, no surrogates, at most U+10FFFF), as Python's
 * decoder and msgspec require. */
static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        /* ASCII runs, eight bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ULL) break;
            i += 8;
        }
        if (i >= n) break;
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xC2) return 0;
        if (c < 0xE0) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
            i += 2;
        } else if (c < 0xF0) {
            if (i + 2 >= n) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80) return 0;
            if (c == 0xE0 && c1 < 0xA0) return 0; /* overlong */
            if (c == 0xED && c1 >= 0xA0) return 0; /* surrogate */
            i += 3;
        } else if (c < 0xF5) {
            if (i + 3 >= n) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80) return 0;
            if (c == 0xF0 && c1 < 0x90) return 0; /* overlong */
            if (c == 0xF4 && c1 >= 0x90) return 0; /* past U+10FFFF */
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

static size_t utf8_chars(const uint8_t *s, size_t n) {
    size_t chars = 0;
    for (size_t i = 0; i < n; i++) chars += (s[i] & 0xC0) != 0x80;
    return chars;
}

/* ------------------------------------------------------------------ bytes as words */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define KEEP_BYTES(k) ((k) ? ~0ULL << (64 - 8 * (k)) : 0ULL)
#else
#define KEEP_BYTES(k) ((k) ? ~0ULL >> (64 - 8 * (k)) : 0ULL)
#endif
#define ONES 0x0101010101010101ULL
#define HIGH 0x8080808080808080ULL

/* Whether any of the 8 bytes in x is below 0x20, '"' or '\\' (may flag a clean word after a
 * hit, never misses one: the word is then copied byte by byte). */
static inline uint64_t needs_escape(uint64_t x) {
    uint64_t q = x ^ (ONES * '"'), bs = x ^ (ONES * '\\');
    return (((x - ONES * 0x20) & ~x) | ((q - ONES) & ~q) | ((bs - ONES) & ~bs)) & HIGH;
}

/* Bytes past n of a word read from a short string count as this harmless ASCII letter. */
#define PAD (ONES * 'a')

/* Classify a string of at most 16 bytes with two word loads (needs 16 readable bytes at p):
 * 1 = ASCII with nothing to escape, 0 = ASCII that needs escaping, -1 = not ASCII. */
static inline int classify16(const uint8_t *p, uint32_t n) {
    uint64_t a, b;
    memcpy(&a, p, 8);
    memcpy(&b, p + 8, 8);
    uint64_t ka = n >= 8 ? ~0ULL : KEEP_BYTES(n), kb = n >= 16 ? ~0ULL : n > 8 ? KEEP_BYTES(n - 8) : 0;
    a = (a & ka) | (PAD & ~ka);
    b = (b & kb) | (PAD & ~kb);
    if ((a | b) & HIGH) return -1;
    return !(needs_escape(a) | needs_escape(b));
}

/* ------------------------------------------------------------------ MessagePack reader */

typedef struct {
    const uint8_t *p, *end;
} Reader;

static inline uint64_t be(const uint8_t *p, int width) {
    uint64_t v = 0;
    for (int i = 0; i < width; i++) v = (v << 8) | p[i];
    return v;
}

/* Read one token. Strings are checked (UTF-8, and the character limit when max_string
 * is >= 0); for arrays and maps only the header is read (len = item count), and the count
 * must be plausible for the bytes left. Declines on bin, ext and the never-used 0xc1. */
HOT int read_token(Reader *r, Value *v, Py_ssize_t max_string) {
    const uint8_t *p = r->p, *end = r->end;
    if (p >= end) return NO;
    uint8_t c = *p++;
    v->raw = p - 1;
    size_t left = (size_t)(end - p);
    uint64_t len;
    if (c <= 0x7F) {
        v->type = T_INT;
        v->n.i = c;
        goto done;
    }
    if (c >= 0xE0) {
        v->type = T_INT;
        v->n.i = (int8_t)c;
        goto done;
    }
    if (c <= 0x8F) {
        v->type = T_MAP;
        len = c & 0x0F;
        goto map;
    }
    if (c <= 0x9F) {
        v->type = T_ARRAY;
        len = c & 0x0F;
        goto array;
    }
    if (c <= 0xBF) {
        len = c & 0x1F;
        goto str;
    }
    switch (c) {
        case 0xC0:
            v->type = T_NIL;
            goto done;
        case 0xC2:
            v->type = T_FALSE;
            goto done;
        case 0xC3:
            v->type = T_TRUE;
            goto done;
        case 0xCA: {
            if (left < 4) return NO;
            uint32_t bits = (uint32_t)be(p, 4);
            float f;
            memcpy(&f, &bits, 4);
            v->type = T_FLOAT;
            v->n.f = (double)f;
            p += 4;
            goto done;
        }
        case 0xCB: {
            if (left < 8) return NO;
            uint64_t bits = be(p, 8);
            double d;
            memcpy(&d, &bits, 8);
            v->type = T_FLOAT;
            v->n.f = d;
            p += 8;
            goto done;
        }
        case 0xCC:
        case 0xCD:
        case 0xCE:
        case 0xCF: {
            int width = 1 << (c - 0xCC);
            if (left < (size_t)width) return NO;
            uint64_t u = be(p, width);
            p += width;
            if (u > (uint64_t)INT64_MAX) {
                v->type = T_UINT;
                v->n.u = u;
            } else {
                v->type = T_INT;
                v->n.i = (int64_t)u;
            }
            goto done;
        }
        case 0xD0:
        case 0xD1:
        case 0xD2:
        case 0xD3: {
            int width = 1 << (c - 0xD0);
            if (left < (size_t)width) return NO;
            uint64_t u = be(p, width);
            p += width;
            int64_t i;
            if (width == 1) i = (int8_t)u;
            else if (width == 2) i = (int16_t)u;
            else if (width == 4) i = (int32_t)u;
            else i = (int64_t)u;
            v->type = T_INT;
            v->n.i = i;
            goto done;
        }
        case 0xD9:
        case 0xDA:
        case 0xDB: {
            int width = 1 << (c - 0xD9);
            if (left < (size_t)width) return NO;
            len = be(p, width);
            p += width;
            left -= width;
            goto str;
        }
        case 0xDC:
        case 0xDD: {
            int width = c == 0xDC ? 2 : 4;
            if (left < (size_t)width) return NO;
            len = be(p, width);
            p += width;
            left -= width;
            v->type = T_ARRAY;
            goto array;
        }
        case 0xDE:
        case 0xDF: {
            int width = c == 0xDE ? 2 : 4;
            if (left < (size_t)width) return NO;
            len = be(p, width);
            p += width;
            left -= width;
            v->type = T_MAP;
            goto map;
        }
        default: /* 0xc1, bin 0xc4-0xc6, ext 0xc7-0xc9 and 0xd4-0xd8 */
            return NO;
    }
str:
    if (len > left) return NO;
    v->clean = 0;
    if (len <= 16 && left >= 16) { /* short: ASCII and escaping told by two word loads */
        int kind = classify16(p, (uint32_t)len);
        if (kind < 0 && !utf8_valid(p, (size_t)len)) return NO;
        v->clean = kind > 0;
    } else if (!utf8_valid(p, (size_t)len)) {
        return NO;
    }
    if (max_string >= 0 && len > (uint64_t)max_string &&
        utf8_chars(p, (size_t)len) > (size_t)max_string)
        return NO;
    v->type = T_STR;
    v->s = p;
    v->len = (uint32_t)len;
    p += len;
    goto done;
array:
    if (len > left) return NO; /* every item takes a byte at least */
    v->len = (uint32_t)len;
    goto done;
map:
    if (len > left / 2) return NO; /* every entry takes two bytes at least */
    v->len = (uint32_t)len;
done:
    r->p = p;
    v->raw_end = p;
    return OK;
}

/* ------------------------------------------------------------------ keys */

/* Keys the engine reads or writes; interned first, so their ids are these numbers. */
enum {
    K_CLAZZ,
    K_UUID,
    K_EVENT,
    K_PARENT,
    K_TYPE,
    K_TIMESTAMP,
    K_DURATION,
    K_STATUS,
    K_IP,
    K_IPADDRESS,
    K_TID,
    K_PID,
    K_REQUEST,
    K_NAME,
    K_MSG,
    K_KIND,
    K_CHILDREN,
    K_COMPLETE,
    K_CHILDCOUNT,
    K_MACHINE,
    K_POOL,
    K_RLOGID,
    NK
};

static const char *const KNOWN[NK] = {
    "clazz", "uuid", "event", "parent", "type", "timestamp", "duration", "status", "ip",
    "ipAddress", "tid", "pid", "request", "name", "msg", "kind", "children", "complete",
    "childCount", "machine", "pool", "rlogid",
};

/* engine.COMPACT_KEYS: a compact record keeps them below its root only where they differ */
#define NCOMPACT 9
static const int32_t COMPACT[NCOMPACT] = {K_UUID, K_REQUEST, K_TID,  K_PID,   K_MACHINE,
                                          K_IPADDRESS, K_IP, K_POOL, K_RLOGID};

typedef struct {
    const uint8_t *p;
    uint32_t len;
    uint32_t stamp;   /* for duplicate and membership checks */
    uint64_t w0, w1;  /* the first 16 bytes, zero-padded: equality without memcmp */
    uint64_t hash;
    const char *json; /* "key": escaped, ready to copy (followed by 16 bytes of slack) */
    uint32_t json_len;
} Key;

typedef struct {
    Key *keys;
    int32_t nkeys, cap_keys;
    int32_t *slots; /* open addressing: key id + 1, 0 = empty */
    uint32_t mask;
    uint32_t stamp;
} Keys;

/* p[:n]'s first 16 bytes as two words, zero-padded; reads past n only before `end`. */
static inline void load16(const uint8_t *p, uint32_t n, const uint8_t *end, uint64_t *w0,
                          uint64_t *w1) {
    uint64_t a = 0, b = 0;
    if (end - p >= 16) {
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        if (n < 8) {
            a &= KEEP_BYTES(n);
            b = 0;
        } else if (n < 16) {
            b &= KEEP_BYTES(n - 8);
        }
    } else {
        uint8_t tmp[16] = {0};
        memcpy(tmp, p, n < 16 ? n : 16);
        memcpy(&a, tmp, 8);
        memcpy(&b, tmp + 8, 8);
    }
    *w0 = a;
    *w1 = b;
}

static inline uint64_t hash_words(uint64_t w0, uint64_t w1, const uint8_t *p, size_t n) {
    uint64_t h = (w0 * 0x9E3779B97F4A7C15ULL) ^ (w1 * 0xC2B2AE3D27D4EB4FULL) ^ n;
    for (size_t i = 16; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL; /* long keys only */
    h ^= h >> 32;
    h *= 0x165667B19E3779F9ULL;
    return h ^ (h >> 29);
}

static uint64_t key_hash(const uint8_t *p, size_t n) {
    uint64_t w0, w1;
    load16(p, (uint32_t)n, p + n, &w0, &w1);
    return hash_words(w0, w1, p, n);
}

static int write_json_str(Buf *b, const uint8_t *s, size_t n);

/* The id of key p[:n] (w0, w1: its first 16 bytes, see load16), interned if new; NO past
 * MAX_KEY_IDS. */
static int intern_words(Keys *k, Arena *arena, const uint8_t *p, uint32_t n, uint64_t w0,
                        uint64_t w1, int32_t *id) {
    uint64_t h = hash_words(w0, w1, p, n);
    uint32_t i = (uint32_t)h & k->mask;
    for (;;) {
        int32_t slot = k->slots[i];
        if (slot == 0) break;
        Key *e = &k->keys[slot - 1];
        if (e->w0 == w0 && e->w1 == w1 && e->len == n &&
            (n <= 16 || memcmp(e->p + 16, p + 16, n - 16) == 0)) {
            *id = slot - 1;
            return OK;
        }
        i = (i + 1) & k->mask;
    }
    if (k->nkeys >= MAX_KEY_IDS) return NO;
    if (k->nkeys == k->cap_keys) {
        int32_t cap = k->cap_keys * 2;
        Key *keys = PyMem_RawRealloc(k->keys, sizeof(Key) * (size_t)cap);
        if (keys == NULL) return ERR;
        k->keys = keys;
        k->cap_keys = cap;
    }
    /* the key's JSON text ("key":), built once per frame */
    Buf tmp = {0};
    if (write_json_str(&tmp, p, n) != OK || buf_put(&tmp, ":", 1) != OK) {
        PyMem_RawFree(tmp.data);
        return ERR;
    }
    char *json = arena_alloc(arena, tmp.len + 16);
    if (json == NULL) {
        PyMem_RawFree(tmp.data);
        return ERR;
    }
    memcpy(json, tmp.data, tmp.len);
    memset(json + tmp.len, 0, 16);
    Key *e = &k->keys[k->nkeys];
    e->p = p;
    e->len = n;
    e->stamp = 0;
    e->w0 = w0;
    e->w1 = w1;
    e->hash = h;
    e->json = json;
    e->json_len = (uint32_t)tmp.len;
    PyMem_RawFree(tmp.data);
    k->slots[i] = ++k->nkeys;
    *id = k->nkeys - 1;
    /* keep the table at most half full */
    if ((uint32_t)k->nkeys * 2 > k->mask) {
        uint32_t mask = k->mask * 2 + 1;
        int32_t *slots = PyMem_RawCalloc((size_t)mask + 1, sizeof(int32_t));
        if (slots == NULL) return ERR;
        for (int32_t j = 0; j < k->nkeys; j++) {
            uint32_t s = (uint32_t)k->keys[j].hash & mask;
            while (slots[s] != 0) s = (s + 1) & mask;
            slots[s] = j + 1;
        }
        PyMem_RawFree(k->slots);
        k->slots = slots;
        k->mask = mask;
    }
    return OK;
}

static int intern(Keys *k, Arena *arena, const uint8_t *p, uint32_t n, int32_t *id) {
    uint64_t w0, w1;
    load16(p, n, p + n, &w0, &w1);
    return intern_words(k, arena, p, n, w0, w1, id);
}

/* Read a map key: a string, checked like read_token does, and interned. The common
 * short ASCII key costs two word loads, a hash of them and one probe. */
/* The key last read at one position of a log map: events of a frame mostly repeat the
 * same keys in the same order, so most keys are found here without hashing. */
typedef struct {
    uint64_t w0, w1;
    uint32_t n; /* 0: empty (a zero-length key is never cached) */
    int32_t id;
} KeySlot;

#define KEY_CACHE 32 /* positions cached */

HOT int read_key(Reader *r, Keys *k, Arena *arena, Py_ssize_t max_string, int32_t *id,
                 KeySlot *cached) {
    const uint8_t *p = r->p, *end = r->end;
    uint32_t n;
    if (p < end && (*p & 0xE0) == 0xA0) { /* fixstr */
        n = *p & 0x1F;
        p++;
        if ((size_t)(end - p) < n) return NO;
    } else {
        Value v;
        TRY(read_token(r, &v, max_string));
        if (v.type != T_STR) return NO; /* keys must be strings */
        return intern(k, arena, v.s, v.len, id);
    }
    uint64_t w0, w1;
    load16(p, n, end, &w0, &w1);
    if (cached != NULL && n != 0 && cached->n == n && cached->w0 == w0 && cached->w1 == w1) {
        /* the same bytes as a key already checked and interned (n <= 16: all compared) */
        r->p = p + n;
        *id = cached->id;
        return OK;
    }
    if (n > 16 || ((w0 | w1) & HIGH)) { /* longer, or not ASCII: the full check */
        if (!utf8_valid(p, n)) return NO;
        if (max_string >= 0 && n > (uint64_t)max_string && utf8_chars(p, n) > (size_t)max_string)
            return NO;
    } else if (max_string >= 0 && n > (uint64_t)max_string) {
        return NO;
    }
    r->p = p + n;
    TRY(intern_words(k, arena, p, n, w0, w1, id));
    if (cached != NULL && n > 0 && n <= 16) {
        cached->w0 = w0;
        cached->w1 = w1;
        cached->n = n;
        cached->id = *id;
    }
    return OK;
}

/* ------------------------------------------------------------------ md5 (tid digit) */

/* The seed's default tid ends in the last hex digit of md5(uuid) (model.tid_for). MD5 as
 * RFC 1321 defines it; its sine table is computed at import (K[i] = floor(|sin(i + 1)| *
 * 2**32), the RFC's own definition). tests/test_fastpath.py compares with hashlib. */
static uint32_t MD5_K[64];
static const uint8_t MD5_S[64] = {
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
    5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20,
    4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
    6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
};

static void md5_init_table(void) {
    for (int i = 0; i < 64; i++) MD5_K[i] = (uint32_t)(uint64_t)floor(fabs(sin(i + 1.0)) * 4294967296.0);
}

static void md5_block(uint32_t h[4], const uint8_t *block) {
    uint32_t m[16];
    for (int i = 0; i < 16; i++)
        m[i] = (uint32_t)block[4 * i] | (uint32_t)block[4 * i + 1] << 8 |
               (uint32_t)block[4 * i + 2] << 16 | (uint32_t)block[4 * i + 3] << 24;
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
    for (int i = 0; i < 64; i++) {
        uint32_t f;
        int g;
        if (i < 16) {
            f = (b & c) | (~b & d);
            g = i;
        } else if (i < 32) {
            f = (d & b) | (~d & c);
            g = (5 * i + 1) & 15;
        } else if (i < 48) {
            f = b ^ c ^ d;
            g = (3 * i + 5) & 15;
        } else {
            f = c ^ (b | ~d);
            g = (7 * i) & 15;
        }
        f += a + MD5_K[i] + m[g];
        a = d;
        d = c;
        c = b;
        b += (f << MD5_S[i]) | (f >> (32 - MD5_S[i]));
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
}

/* The last hex digit of md5(p[:n]).hexdigest(): the low nibble of the digest's last byte. */
static char md5_last_hex(const uint8_t *p, size_t n) {
    uint32_t h[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
    size_t i = 0;
    for (; i + 64 <= n; i += 64) md5_block(h, p + i);
    uint8_t tail[128];
    size_t rest = n - i;
    memcpy(tail, p + i, rest);
    tail[rest] = 0x80;
    size_t len = rest + 1 <= 56 ? 64 : 128;
    memset(tail + rest + 1, 0, len - rest - 1);
    uint64_t bits = (uint64_t)n * 8;
    for (int k = 0; k < 8; k++) tail[len - 8 + k] = (uint8_t)(bits >> (8 * k));
    md5_block(h, tail);
    if (len == 128) md5_block(h, tail + 64);
    return "0123456789abcdef"[(h[3] >> 24) & 15];
}

/* ------------------------------------------------------------------ events and trees */

enum { C_ATOMIC, C_HEARTBEAT, C_BEGIN, C_END };

typedef struct {
    Field *fields;            /* the log map's pairs, in order (arena: never moves) */
    int32_t nf;
    int32_t vdepth;           /* deepest nesting of its values (the log map is 1) */
    int16_t at[NK];           /* position of each known key among the fields, -1 absent */
    const Value *ov[NK];      /* a known key's mapped value replacing the field's */
    const Value *app_request; /* values the mapper appends, in its order; NULL when not */
    const Value *app_parent;
    const Value *app_type;
    const Value *app_timestamp;
    const Value *app_ipaddress;
    const Value *app_tid;
    const Value *uuid;  /* mapped uuid (T_STR), NULL when none or empty */
    const Value *eid;   /* mapped event id (T_STR), NULL when none */
    const Value *parent; /* mapped parent (T_STR) */
    double ts;        /* its timestamp in ms (an int below 2**53 is exact as a double) */
    uint8_t ts_float; /* the timestamp was sent as a float (kept so: microseconds) */
    uint8_t clazz;
    int32_t uuid_ix;  /* index in the uuid table, -1 without a uuid */
    int32_t slot;     /* begin / end: its id slot */
    int32_t gnext;    /* next event of its group */
    int32_t next;     /* next kid of its parent, or next root of its group */
    const uint8_t *raw; /* the log map's MessagePack bytes in the frame (split) */
    uint32_t raw_len;
} Event;

typedef struct {
    int32_t uuid_ix;
    int32_t first, last; /* events of the group, in arrival order (Event.next) */
    int32_t count;
    int32_t roots_first, roots_last;
    int32_t visited;
} Group;

typedef struct {
    const uint8_t *p;
    uint32_t len;
    uint64_t hash;
    int32_t group; /* -1: only stand-alone events use this uuid so far */
    PyObject *str; /* the uuid as a Python str, made on demand */
    char digit;    /* last hex digit of md5(uuid), 0 until needed */
    int32_t part;  /* split: its partition, -1 until needed */
} Uuid;

typedef struct {
    int32_t group;
    const Value *id;
    uint64_t hash;
    int32_t begin, end;       /* event indices, -1 until seen */
    int32_t kids_first, kids_last, kids_n;
} Slot;

typedef struct {
    Params prm;
    PyObject *dumps_fn;
    uint64_t seq;      /* the envelope's seq, when has_seq */
    int has_seq;
    Arena arena;
    Keys keys;
    int32_t *scratch; /* key ids of nested maps being checked */
    Py_ssize_t nscratch, cap_scratch;
    Event *events;
    int32_t nevents;
    Uuid *uuids;
    int32_t nuuids;
    uint32_t uuid_mask;
    int32_t *uuid_slots;
    Group *groups;
    int32_t ngroups;
    Slot *slots;
    int32_t nslots;
    uint32_t slot_mask;
    int32_t *slot_table;
    uint64_t *atomic_keys;
    uint32_t atomic_mask;
    int32_t *sort_tmp, *sort_tmp2;
    char *block, *zeroed; /* the two allocations behind the arrays above */
    KeySlot key_cache[KEY_CACHE]; /* by position in a log map (see read_key) */
    Buf out;
    int32_t n_tx, n_atomic, n_heartbeat;
    const Value *root_vals[NCOMPACT]; /* compact: the root's value of each COMPACT key */
} Ctx;

/* ------------------------------------------------------------------ parsing */

static int push_scratch(Ctx *c, int32_t id) {
    if (c->nscratch == c->cap_scratch) {
        Py_ssize_t cap = c->cap_scratch ? c->cap_scratch * 2 : 256;
        int32_t *s = PyMem_RawRealloc(c->scratch, sizeof(int32_t) * (size_t)cap);
        if (s == NULL) return ERR;
        c->scratch = s;
        c->cap_scratch = cap;
    }
    c->scratch[c->nscratch++] = id;
    return OK;
}

/* NO when two of the key ids in ids[:n] are equal. */
static int no_duplicates(Keys *k, const int32_t *ids, Py_ssize_t n) {
    uint32_t stamp = ++k->stamp;
    for (Py_ssize_t i = 0; i < n; i++) {
        Key *e = &k->keys[ids[i]];
        if (e->stamp == stamp) return NO;
        e->stamp = stamp;
    }
    return OK;
}

static int check_nested(Ctx *c, Reader *r, Value *v, int depth, int32_t *deepest);

/* Check the items of an array or map whose header v was just read (depth: its level). */
static int check_container(Ctx *c, Reader *r, Value *v, int depth, int32_t *deepest) {
    if (depth > c->prm.max_depth || depth > HARD_MAX_DEPTH) return NO;
    if (depth > *deepest) *deepest = depth;
    Value item;
    if (v->type == T_ARRAY) {
        if ((Py_ssize_t)v->len > c->prm.max_array) return NO; /* the reference refuses the event */
        for (uint32_t i = 0; i < v->len; i++) TRY(check_nested(c, r, &item, depth + 1, deepest));
    } else {
        if ((Py_ssize_t)v->len > c->prm.max_keys) return NO;
        Py_ssize_t base = c->nscratch;
        for (uint32_t i = 0; i < v->len; i++) {
            int32_t id;
            TRY(read_key(r, &c->keys, &c->arena, c->prm.max_string, &id, NULL));
            TRY(push_scratch(c, id));
            TRY(check_nested(c, r, &item, depth + 1, deepest));
        }
        TRY(no_duplicates(&c->keys, c->scratch + base, c->nscratch - base));
        c->nscratch = base;
    }
    v->raw_end = r->p;
    return OK;
}

/* Check one value nested in a log map (depth: its level; the log map is 1) and skip it;
 * *deepest is raised to the deepest level reached. */
static int check_nested(Ctx *c, Reader *r, Value *v, int depth, int32_t *deepest) {
    TRY(read_token(r, v, c->prm.max_string));
    if (v->type != T_ARRAY && v->type != T_MAP) return OK;
    return check_container(c, r, v, depth, deepest);
}

static int parse_event(Ctx *c, Reader *r, Event *ev) {
    Value m;
    const uint8_t *start = r->p;
    TRY(read_token(r, &m, c->prm.max_string));
    if (m.type != T_MAP) return NO; /* the engine refuses non-map items one by one */
    if ((Py_ssize_t)m.len > c->prm.max_keys) return NO;
    memset(ev->at, 0xFF, sizeof ev->at);
    ev->nf = (int32_t)m.len;
    ev->vdepth = 1;
    ev->fields = arena_alloc(&c->arena, sizeof(Field) * (m.len ? m.len : 1));
    if (ev->fields == NULL) return ERR;
    uint32_t stamp = ++c->keys.stamp;
    for (uint32_t i = 0; i < m.len; i++) {
        Field *f = &ev->fields[i];
        KeySlot *cached = i < KEY_CACHE ? &c->key_cache[i] : NULL;
        TRY(read_key(r, &c->keys, &c->arena, c->prm.max_string, &f->key, cached));
        if (c->keys.keys[f->key].stamp == stamp) return NO; /* a duplicate key */
        c->keys.keys[f->key].stamp = stamp;
        TRY(read_token(r, &f->v, c->prm.max_string)); /* scalars: inline */
        if (f->v.type == T_MAP || f->v.type == T_ARRAY) {
            TRY(check_container(c, r, &f->v, 2, &ev->vdepth));
            /* nested maps took stamps of their own: take this map's again */
            stamp = ++c->keys.stamp;
            for (uint32_t j = 0; j <= i; j++) c->keys.keys[ev->fields[j].key].stamp = stamp;
        }
        if (f->key < NK) ev->at[f->key] = (int16_t)i;
    }
    /* its JSON is at most RECORD_EXPANSION times its bytes; past the limit, the reference
     * path measures it (and may refuse it alone: record_too_big) */
    if ((size_t)(r->p - start) > (size_t)c->prm.max_record / RECORD_EXPANSION) return NO;
    ev->raw = start;
    ev->raw_len = (uint32_t)(r->p - start);
    return OK;
}

/* ------------------------------------------------------------------ the default mapper */

static const Value V_URL = {.type = T_STR, .s = (const uint8_t *)"URL", .len = 3, .clean = 1};
static const Value V_ROOT = {.type = T_STR, .s = (const uint8_t *)"0", .len = 1, .clean = 1};
static const Value V_UNKNOWN_STATUS = {
    .type = T_STR, .s = (const uint8_t *)"-1", .len = 2, .clean = 1};

static Value *new_value(Ctx *c) {
    Value *v = arena_alloc(&c->arena, sizeof(Value));
    if (v != NULL) memset(v, 0, sizeof(Value));
    return v;
}

static Value *new_str(Ctx *c, const char *s, size_t n) {
    Value *v = new_value(c);
    if (v == NULL) return NULL;
    char *d = arena_alloc(&c->arena, n ? n : 1);
    if (d == NULL) return NULL;
    memcpy(d, s, n);
    v->type = T_STR;
    v->s = (const uint8_t *)d;
    v->len = (uint32_t)n;
    return v;
}

static Value *new_int(Ctx *c, int64_t i) {
    Value *v = new_value(c);
    if (v == NULL) return NULL;
    v->type = T_INT;
    v->n.i = i;
    return v;
}

static Value *new_float(Ctx *c, double f) {
    Value *v = new_value(c);
    if (v == NULL) return NULL;
    v->type = T_FLOAT;
    v->n.f = f;
    return v;
}

static char DIGIT_PAIRS[200];

static void digit_pairs_init(void) {
    for (int i = 0; i < 100; i++) {
        DIGIT_PAIRS[2 * i] = (char)('0' + i / 10);
        DIGIT_PAIRS[2 * i + 1] = (char)('0' + i % 10);
    }
}

static int fmt_u64(char *d, uint64_t u) {
    char tmp[24];
    int n = 24;
    while (u >= 100) {
        unsigned pair = (unsigned)(u % 100);
        u /= 100;
        n -= 2;
        tmp[n] = DIGIT_PAIRS[2 * pair];
        tmp[n + 1] = DIGIT_PAIRS[2 * pair + 1];
    }
    if (u >= 10) {
        n -= 2;
        tmp[n] = DIGIT_PAIRS[2 * u];
        tmp[n + 1] = DIGIT_PAIRS[2 * u + 1];
    } else {
        tmp[--n] = (char)('0' + u);
    }
    memcpy(d, tmp + n, (size_t)(24 - n));
    return 24 - n;
}

static int fmt_i64(char *d, int64_t i) {
    if (i >= 0) return fmt_u64(d, (uint64_t)i);
    d[0] = '-';
    return 1 + fmt_u64(d + 1, (uint64_t)0 - (uint64_t)i);
}

/* normalise_id(): a string stays (the value itself), an integer or an integral float
 * becomes its decimal string; *out = NULL for nil; NO for anything else. */
static int map_id(Ctx *c, const Value *v, const Value **out) {
    char d[24];
    int n;
    switch (v->type) {
        case T_STR: /* at most MAX_ID_LENGTH characters */
            if (v->len > MAX_ID_LENGTH && utf8_chars(v->s, v->len) > MAX_ID_LENGTH) return NO;
            *out = v;
            return OK;
        case T_NIL:
            *out = NULL;
            return OK;
        case T_INT:
            n = fmt_i64(d, v->n.i);
            break;
        case T_UINT:
            n = fmt_u64(d, v->n.u);
            break;
        case T_FLOAT:
            if (!(v->n.f > -9.2e18 && v->n.f < 9.2e18) || v->n.f != (double)(int64_t)v->n.f)
                return NO;
            n = fmt_i64(d, (int64_t)v->n.f);
            break;
        default:
            return NO;
    }
    Value *s = new_str(c, d, (size_t)n);
    if (s == NULL) return ERR;
    s->clean = 1; /* digits and a minus sign */
    *out = s;
    return OK;
}

/* ms_in_range() for ints and finite floats from 0 to high, kept as sent (a float keeps
 * its microseconds); strings decline. */
static int map_ms(const Value *v, int64_t high, double *ms) {
    if (v->type == T_INT) {
        if (v->n.i > high || v->n.i < 0) return NO;
        *ms = (double)v->n.i; /* high < 2**53: exact as a double */
        return OK;
    }
    if (v->type == T_FLOAT) {
        double f = v->n.f;
        if (!(f >= 0.0 && f <= (double)high)) return NO; /* NaN and infinities too */
        *ms = f;
        return OK;
    }
    return NO;
}

static inline const Value *field_value(Ctx *c, const Event *ev, int k) {
    return ev->at[k] < 0 ? NULL : &ev->fields[ev->at[k]].v;
}

static inline int str_is(const Value *v, const char *s, size_t n) {
    return v->len == n && memcmp(v->s, s, n) == 0;
}

static int uuid_index(Ctx *c, const Value *u, int32_t *ix);

/* map_events() for one event: the same checks and the same mapped values, recorded as
 * overrides and appended values instead of a mutated dict. */
static int map_event(Ctx *c, Event *ev) {
    const Value *v;
    memset(ev->ov, 0, sizeof ev->ov);
    ev->app_request = ev->app_parent = ev->app_type = NULL;
    ev->app_timestamp = ev->app_ipaddress = ev->app_tid = NULL;
    ev->uuid = ev->eid = NULL;
    ev->uuid_ix = -1;
    ev->slot = -1;
    ev->next = -1;
    if (ev->at[K_KIND] >= 0 || ev->at[K_CHILDREN] >= 0 || ev->at[K_COMPLETE] >= 0)
        return NO; /* keys the engine writes: the reference path decides */

    v = field_value(c, ev, K_CLAZZ);
    if (v == NULL || v->type == T_NIL) ev->clazz = C_ATOMIC;
    else if (v->type != T_STR) return NO;
    else if (str_is(v, "begin", 5)) ev->clazz = C_BEGIN;
    else if (str_is(v, "end", 3)) ev->clazz = C_END;
    else if (str_is(v, "atomicEvent", 11)) ev->clazz = C_ATOMIC;
    else if (str_is(v, "heartbeat", 9)) ev->clazz = C_HEARTBEAT;
    else return NO;

    v = field_value(c, ev, K_UUID);
    if (v != NULL) {
        const Value *u;
        TRY(map_id(c, v, &u));
        if (u != v && u != NULL) ev->ov[K_UUID] = u;
        if (u != NULL && u->len > 0) {
            ev->uuid = u;
            if (ev->at[K_REQUEST] >= 0) ev->ov[K_REQUEST] = u;
            else ev->app_request = u;
            TRY(uuid_index(c, u, &ev->uuid_ix));
        }
    }
    v = field_value(c, ev, K_EVENT);
    if (v != NULL) {
        TRY(map_id(c, v, &ev->eid));
        if (ev->eid != v && ev->eid != NULL) ev->ov[K_EVENT] = ev->eid;
    }
    v = field_value(c, ev, K_PARENT);
    if (v == NULL) {
        ev->parent = ev->app_parent = &V_ROOT;
    } else if (v->type == T_NIL) {
        ev->parent = ev->ov[K_PARENT] = &V_ROOT;
    } else {
        TRY(map_id(c, v, &ev->parent));
        if (ev->parent != v) ev->ov[K_PARENT] = ev->parent;
    }
    if (ev->clazz == C_BEGIN || ev->clazz == C_END) {
        if (ev->uuid == NULL || ev->eid == NULL || ev->eid->len == 0) return NO;
    }
    if (ev->at[K_TYPE] < 0) ev->app_type = &V_URL;
    v = field_value(c, ev, K_TIMESTAMP);
    ev->ts_float = 0;
    if (v == NULL || v->type == T_NIL) {
        ev->ts = (double)c->prm.now;
        const Value *now = new_int(c, c->prm.now);
        if (now == NULL) return ERR;
        if (v == NULL) ev->app_timestamp = now;
        else ev->ov[K_TIMESTAMP] = now;
    } else {
        TRY(map_ms(v, MAX_TIMESTAMP_MS, &ev->ts));
        ev->ts_float = v->type == T_FLOAT;
    }
    v = field_value(c, ev, K_DURATION);
    if (v != NULL && v->type != T_NIL) {
        double ms;
        TRY(map_ms(v, MAX_DURATION_MS, &ms));
    }
    v = field_value(c, ev, K_STATUS);
    if (v != NULL && v->type != T_NIL && v->type != T_STR) {
        const Value *s;
        TRY(map_id(c, v, &s)); /* _status(): ints and integral floats, as ids are */
        ev->ov[K_STATUS] = s;
    }
    if (ev->at[K_IP] >= 0 && ev->at[K_IPADDRESS] < 0) ev->app_ipaddress = field_value(c, ev, K_IP);
    if (ev->uuid != NULL && ev->at[K_TID] < 0) {
        v = field_value(c, ev, K_PID);
        if (v != NULL && v->type != T_NIL) {
            /* f"{pid}-{digit}": only str and int pids; others decline */
            char d[24];
            const char *text;
            size_t n;
            if (v->type == T_STR) {
                text = (const char *)v->s;
                n = v->len;
            } else if (v->type == T_INT) {
                n = (size_t)fmt_i64(d, v->n.i);
                text = d;
            } else if (v->type == T_UINT) {
                n = (size_t)fmt_u64(d, v->n.u);
                text = d;
            } else {
                return NO;
            }
            Uuid *u = &c->uuids[ev->uuid_ix];
            if (u->digit == 0) u->digit = md5_last_hex(u->p, u->len);
            Value *tid = new_value(c);
            char *s = tid ? arena_alloc(&c->arena, n + 2) : NULL;
            if (s == NULL) return ERR;
            memcpy(s, text, n);
            s[n] = '-';
            s[n + 1] = u->digit;
            tid->type = T_STR;
            tid->s = (const uint8_t *)s;
            tid->len = (uint32_t)(n + 2);
            ev->app_tid = tid;
        }
    }
    return OK;
}

/* ------------------------------------------------------------------ hash tables */

static int uuid_index(Ctx *c, const Value *u, int32_t *ix) {
    uint64_t h = key_hash(u->s, u->len);
    uint32_t i = (uint32_t)h & c->uuid_mask;
    for (;;) {
        int32_t s = c->uuid_slots[i];
        if (s == 0) break;
        Uuid *e = &c->uuids[s - 1];
        if (e->hash == h && e->len == u->len && memcmp(e->p, u->s, u->len) == 0) {
            *ix = s - 1;
            return OK;
        }
        i = (i + 1) & c->uuid_mask;
    }
    Uuid *e = &c->uuids[c->nuuids]; /* sized for one per event: never full */
    e->p = u->s;
    e->len = u->len;
    e->hash = h;
    e->group = -1;
    e->str = NULL;
    e->digit = 0;
    e->part = -1;
    c->uuid_slots[i] = ++c->nuuids;
    *ix = c->nuuids - 1;
    return OK;
}

/* The slot of transaction id `id` in `group`, made when `make` (else -1 when missing). */
static int32_t find_slot(Ctx *c, int32_t group, const Value *id, int make) {
    uint64_t h = key_hash(id->s, id->len) ^ ((uint64_t)group * 0x9E3779B97F4A7C15ULL);
    uint32_t i = (uint32_t)h & c->slot_mask;
    for (;;) {
        int32_t s = c->slot_table[i];
        if (s == 0) break;
        Slot *e = &c->slots[s - 1];
        if (e->hash == h && e->group == group && e->id->len == id->len &&
            memcmp(e->id->s, id->s, id->len) == 0)
            return s - 1;
        i = (i + 1) & c->slot_mask;
    }
    if (!make) return -1;
    Slot *e = &c->slots[c->nslots];
    e->group = group;
    e->id = id;
    e->hash = h;
    e->begin = e->end = -1;
    e->kids_first = e->kids_last = -1;
    e->kids_n = 0;
    c->slot_table[i] = ++c->nslots;
    return c->nslots - 1;
}

/* A 64-bit finaliser (MurmurHash3's fmix64): every input bit reaches every output bit. */
static inline uint64_t fmix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDULL;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ULL;
    return x ^ (x >> 33);
}

/* The timestamp as the duplicate key compares it (5.0 equals 5, as in Python): an
 * integral value as its int64, another as its double's bits (marked apart). */
static inline uint64_t ts_key(const Event *ev) {
    double t = ev->ts;
    if (t == (double)(int64_t)t) return (uint64_t)(int64_t)t;
    uint64_t bits;
    memcpy(&bits, &t, 8);
    return bits ^ 0xD1B54A32D192ED03ULL;
}

/* NO when the atomic event's duplicate key (event, parent, timestamp, str msg) was seen
 * in its group: the reference path then compares the events themselves. Only a 64-bit
 * hash of the key is kept, so a collision declines too (safe, just slower); each part is
 * mixed in whole, so that ids of neighbouring trees cannot cancel out (a byte-wise XOR
 * of the group and the id did: tree 1's event "2" hashed like tree 0's event "3"). */
static int atomic_unique(Ctx *c, const Event *ev, int32_t group) {
    uint64_t h = fmix64((uint64_t)group + 0x9E3779B97F4A7C15ULL);
    h = fmix64(h ^ (ev->eid ? key_hash(ev->eid->s, ev->eid->len) : 0x51ED270B27D6A1F3ULL));
    h = fmix64(h + key_hash(ev->parent->s, ev->parent->len));
    h = fmix64(h ^ ts_key(ev));
    const Value *msg = field_value(c, ev, K_MSG);
    if (msg && msg->type == T_STR) h = fmix64(h + key_hash(msg->s, msg->len) + 1);
    if (h == 0) h = 1;
    uint32_t i = (uint32_t)(h ^ (h >> 32)) & c->atomic_mask;
    while (c->atomic_keys[i] != 0) {
        if (c->atomic_keys[i] == h) return NO;
        i = (i + 1) & c->atomic_mask;
    }
    c->atomic_keys[i] = h;
    return OK;
}

/* ------------------------------------------------------------------ reassembly */

static inline int is_root(const Event *ev) {
    return ev->parent->len == 1 && ev->parent->s[0] == '0';
}

/* Stand-alone: no uuid, or a top-level atomic event or heartbeat (published at once). */
static inline int is_standalone(const Event *ev) {
    return ev->uuid == NULL || ((ev->clazz == C_ATOMIC || ev->clazz == C_HEARTBEAT) && is_root(ev));
}

static int group_events(Ctx *c) {
    for (int32_t i = 0; i < c->nevents; i++) {
        Event *ev = &c->events[i];
        ev->gnext = ev->next = -1;
        if (is_standalone(ev)) continue;
        Uuid *u = &c->uuids[ev->uuid_ix];
        if (u->group < 0) {
            Group *g = &c->groups[c->ngroups];
            g->uuid_ix = ev->uuid_ix;
            g->first = g->last = -1;
            g->count = 0;
            g->roots_first = g->roots_last = -1;
            g->visited = 0;
            u->group = c->ngroups++;
        }
        Group *g = &c->groups[u->group];
        if (++g->count > c->prm.tx_events) return NO; /* the cap would evict this tree */
        if (g->last < 0) g->first = i;
        else c->events[g->last].gnext = i;
        g->last = i;
        if (ev->clazz == C_BEGIN || ev->clazz == C_END) {
            Slot *slot = &c->slots[find_slot(c, u->group, ev->eid, 1)];
            int32_t *seen = ev->clazz == C_BEGIN ? &slot->begin : &slot->end;
            if (*seen >= 0) return NO; /* a duplicate or a conflict */
            *seen = i;
            ev->slot = (int32_t)(slot - c->slots);
        } else {
            TRY(atomic_unique(c, ev, u->group));
        }
    }
    /* every transaction closed */
    for (int32_t s = 0; s < c->nslots; s++) {
        if (c->slots[s].begin < 0 || c->slots[s].end < 0) return NO;
    }
    /* roots and children, in arrival order; every parent a transaction of the tree */
    for (int32_t gi = 0; gi < c->ngroups; gi++) {
        Group *g = &c->groups[gi];
        for (int32_t i = g->first; i >= 0; i = c->events[i].gnext) {
            Event *ev = &c->events[i];
            if (ev->clazz == C_END) continue;
            if (ev->clazz == C_BEGIN && is_root(ev)) {
                if (g->roots_last < 0) g->roots_first = i;
                else c->events[g->roots_last].next = i;
                g->roots_last = i;
                continue;
            }
            int32_t s = find_slot(c, gi, ev->parent, 0);
            if (s < 0) return NO; /* its parent never came: an orphan */
            Slot *p = &c->slots[s];
            if (p->kids_last < 0) p->kids_first = i;
            else c->events[p->kids_last].next = i;
            p->kids_last = i;
            p->kids_n++;
        }
        if (g->roots_first < 0) return NO; /* no root: incomplete */
    }
    /* exact completeness: an end's childCount more than the children here means some are
     * still on their way (the reference path holds the tree open); a count that is not a
     * non-negative integer is refused there */
    for (int32_t s = 0; s < c->nslots; s++) {
        const Slot *slot = &c->slots[s];
        const Value *n = field_value(c, &c->events[slot->end], K_CHILDCOUNT);
        if (n == NULL || n->type == T_NIL) continue;
        if (n->type == T_UINT) {
            if (n->n.u > (uint64_t)slot->kids_n) return NO;
        } else if (n->type != T_INT || n->n.i < 0 || n->n.i > (int64_t)slot->kids_n) {
            return NO;
        }
    }
    return OK;
}

/* Children sorted by timestamp, stable (list.sort(key=timestamp)). */
static void sort_kids(Ctx *c, Slot *s) {
    if (s->kids_n < 2) return;
    int32_t *a = c->sort_tmp, *t = c->sort_tmp2, n = 0;
    Event *ev = c->events;
    for (int32_t i = s->kids_first; i >= 0; i = ev[i].next) a[n++] = i;
    int sorted = 1;
    for (int32_t k = 1; k < n && sorted; k++) sorted = ev[a[k - 1]].ts <= ev[a[k]].ts;
    if (sorted) return;
    if (n <= 32) { /* insertion sort */
        for (int32_t k = 1; k < n; k++) {
            int32_t x = a[k];
            double ts = ev[x].ts;
            int32_t j = k - 1;
            while (j >= 0 && ev[a[j]].ts > ts) {
                a[j + 1] = a[j];
                j--;
            }
            a[j + 1] = x;
        }
    } else { /* bottom-up merge sort, stable */
        for (int32_t width = 1; width < n; width *= 2) {
            for (int32_t lo = 0; lo < n; lo += 2 * width) {
                int32_t mid = lo + width < n ? lo + width : n;
                int32_t hi = lo + 2 * width < n ? lo + 2 * width : n;
                int32_t i = lo, j = mid, k = lo;
                while (i < mid && j < hi) t[k++] = ev[a[j]].ts < ev[a[i]].ts ? a[j++] : a[i++];
                while (i < mid) t[k++] = a[i++];
                while (j < hi) t[k++] = a[j++];
            }
            int32_t *swap = a;
            a = t;
            t = swap;
        }
    }
    for (int32_t k = 0; k < n; k++) ev[a[k]].next = k + 1 < n ? a[k + 1] : -1;
    s->kids_first = a[0];
    s->kids_last = a[n - 1];
}

/* ------------------------------------------------------------------ JSON output */

static const char HEX[] = "0123456789abcdef";

/* orjson's escaping: \" \\ \b \t \n \f \r, other controls as \u00xx, the rest as is. */
static int write_json_str(Buf *b, const uint8_t *s, size_t n) {
    TRY(buf_reserve(b, n * 6 + 2 + 8));
    char *d = b->data + b->len;
    *d++ = '"';
    size_t i = 0;
    while (i < n) {
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (needs_escape(w)) break;
            memcpy(d, &w, 8);
            d += 8;
            i += 8;
        }
        size_t stop = i + 8 < n ? i + 8 : n;
        for (; i < stop; i++) {
            uint8_t ch = s[i];
            if (ch >= 0x20 && ch != '"' && ch != '\\') {
                *d++ = (char)ch;
                continue;
            }
            *d++ = '\\';
            switch (ch) {
                case '"':
                    *d++ = '"';
                    break;
                case '\\':
                    *d++ = '\\';
                    break;
                case '\b':
                    *d++ = 'b';
                    break;
                case '\t':
                    *d++ = 't';
                    break;
                case '\n':
                    *d++ = 'n';
                    break;
                case '\f':
                    *d++ = 'f';
                    break;
                case '\r':
                    *d++ = 'r';
                    break;
                default:
                    *d++ = 'u';
                    *d++ = '0';
                    *d++ = '0';
                    *d++ = HEX[ch >> 4];
                    *d++ = HEX[ch & 15];
            }
        }
    }
    *d++ = '"';
    b->len = (size_t)(d - b->data);
    return OK;
}

/* Floats are formatted by orjson itself (a Python call): the shortest repr it picks is not
 * worth re-deriving, and floats are rare in logs. */
static int write_float(Ctx *c, double f) {
    int rc = ERR;
    PyObject *obj = PyFloat_FromDouble(f);
    PyObject *res = obj ? PyObject_CallOneArg(c->dumps_fn, obj) : NULL;
    Py_XDECREF(obj);
    if (res != NULL && !PyBytes_Check(res))
        PyErr_SetString(PyExc_TypeError, "dumps() must return bytes");
    else if (res != NULL)
        rc = buf_put(&c->out, PyBytes_AS_STRING(res), (size_t)PyBytes_GET_SIZE(res));
    if (rc == ERR && !PyErr_Occurred()) PyErr_NoMemory();
    Py_XDECREF(res);
    return rc;
}

static int write_value(Ctx *c, const Value *v);

/* A nested array or map, re-read from its (already checked) bytes. */
static int write_nested(Ctx *c, Reader *r, const Value *v) {
    Buf *b = &c->out;
    Value item;
    if (v->type == T_ARRAY) {
        TRY(buf_put(b, "[", 1));
        for (uint32_t i = 0; i < v->len; i++) {
            if (i) TRY(buf_put(b, ",", 1));
            TRY(read_token(r, &item, -1));
            TRY(write_nested(c, r, &item));
        }
        return buf_put(b, "]", 1);
    }
    if (v->type == T_MAP) {
        TRY(buf_put(b, "{", 1));
        for (uint32_t i = 0; i < v->len; i++) {
            if (i) TRY(buf_put(b, ",", 1));
            TRY(read_token(r, &item, -1));
            if (item.type != T_STR) return NO; /* checked already; never here */
            TRY(write_json_str(b, item.s, item.len));
            TRY(buf_put(b, ":", 1));
            TRY(read_token(r, &item, -1));
            TRY(write_nested(c, r, &item));
        }
        return buf_put(b, "}", 1);
    }
    return write_value(c, v);
}

static int write_value(Ctx *c, const Value *v) {
    Buf *b = &c->out;
    char d[24];
    if (v->type == T_STR && v->clean) {
        TRY(buf_reserve(b, (size_t)v->len + 2));
        char *o = b->data + b->len;
        o[0] = '"';
        memcpy(o + 1, v->s, v->len);
        o[v->len + 1] = '"';
        b->len += (size_t)v->len + 2;
        return OK;
    }
    if (v->type == T_INT) {
        TRY(buf_reserve(b, 24));
        b->len += (size_t)fmt_i64(b->data + b->len, v->n.i);
        return OK;
    }
    switch (v->type) {
        case T_NIL:
            return PUT_LIT(b, "null");
        case T_FALSE:
            return PUT_LIT(b, "false");
        case T_TRUE:
            return PUT_LIT(b, "true");
        case T_INT:
            return buf_put(b, d, (size_t)fmt_i64(d, v->n.i));
        case T_UINT:
            return buf_put(b, d, (size_t)fmt_u64(d, v->n.u));
        case T_FLOAT:
            return write_float(c, v->n.f);
        case T_STR:
            return write_json_str(b, v->s, v->len);
        default: {
            Reader r = {v->raw, v->raw_end};
            Value head;
            TRY(read_token(&r, &head, -1));
            return write_nested(c, &r, &head);
        }
    }
}

/* One entry of a record being written: a key id and its value. */
typedef struct {
    int32_t key;
    const Value *v;
} Entry;

typedef struct {
    Entry *e;
    int32_t n;
} Entries;

/* The mapped event as the ordered (key, value) pairs of the dict the mapper leaves
 * (without clazz, which every record drops). `e` has room for nf + 6 entries. */
static void mapped_entries(Ctx *c, const Event *ev, Entries *out) {
    Entry *e = out->e;
    int32_t n = 0;
    const Field *f = ev->fields;
    for (int32_t i = 0; i < ev->nf; i++) {
        int32_t k = f[i].key;
        if (k == K_CLAZZ) continue;
        e[n].key = k;
        e[n].v = (k < NK && ev->ov[k] != NULL) ? ev->ov[k] : &f[i].v;
        n++;
    }
#define APPEND(field, k)         \
    if (ev->field != NULL) {     \
        e[n].key = (k);          \
        e[n].v = ev->field;      \
        n++;                     \
    }
    APPEND(app_request, K_REQUEST)
    APPEND(app_parent, K_PARENT)
    APPEND(app_type, K_TYPE)
    APPEND(app_timestamp, K_TIMESTAMP)
    APPEND(app_ipaddress, K_IPADDRESS)
    APPEND(app_tid, K_TID)
#undef APPEND
    out->n = n;
}

/* "key":value, */
static inline int write_entry(Ctx *c, int32_t key, const Value *v) {
    Buf *b = &c->out;
    const Key *k = &c->keys.keys[key];
    TRY(buf_put(b, k->json, k->json_len));
    TRY(write_value(c, v));
    return buf_put(b, ",", 1);
}

static int write_entries(Ctx *c, const Entries *en) {
    TRY(buf_put(&c->out, "{", 1));
    for (int32_t i = 0; i < en->n; i++) TRY(write_entry(c, en->e[i].key, en->e[i].v));
    return OK;
}

static Entry *entries_alloc(Ctx *c, int32_t n) {
    return arena_alloc(&c->arena, sizeof(Entry) * (size_t)n);
}

/* JSON nesting a record may reach: orjson refuses past 254 levels; stay well below. */
#define MAX_JSON_LEVEL 200

/* An atomic event as a record; `level` is the JSON level of its object (1 at top). */
/* engine._compact()'s test: whether the value of key k below a root equals the root's
 * (the same Python type, equal): OK to write it, NO to skip it; ERR when it cannot tell
 * (two arrays or maps: the reference path compares them). */
static int keep_below_root(Ctx *c, int32_t k, const Value *v) {
    if (!c->prm.compact || k >= NK) return OK;
    const Value *r = NULL;
    for (int i = 0; i < NCOMPACT; i++) {
        if (COMPACT[i] == k) {
            r = c->root_vals[i];
            break;
        }
    }
    if (r == NULL) return OK;
    int vi = v->type == T_INT || v->type == T_UINT, ri = r->type == T_INT || r->type == T_UINT;
    if (vi && ri) {
        if (v->type == r->type) return v->n.u == r->n.u ? NO : OK;
        const Value *neg = v->type == T_INT ? v : r; /* the other is a T_UINT */
        return neg->n.i >= 0 && (uint64_t)neg->n.i == (neg == v ? r : v)->n.u ? NO : OK;
    }
    if (v->type != r->type) return OK;
    switch (v->type) {
        case T_STR:
            return v->len == r->len && memcmp(v->s, r->s, v->len) == 0 ? NO : OK;
        case T_FLOAT:
            return v->n.f == r->n.f ? NO : OK;
        case T_NIL:
        case T_TRUE:
        case T_FALSE:
            return NO;
        default:
            return ERR; /* arrays, maps */
    }
}

/* write_entry(), but below a root in a compact record, skip what the root says already */
static inline int write_below(Ctx *c, int32_t k, const Value *v) {
    int keep = keep_below_root(c, k, v);
    if (keep == ERR) return NO; /* the frame declines */
    return keep == OK ? write_entry(c, k, v) : OK;
}

static int write_atomic(Ctx *c, const Event *ev, int level) {
    if (level - 1 + ev->vdepth > MAX_JSON_LEVEL) return NO;
    /* what write_entries(mapped_entries(ev)) writes, without building the entries */
    TRY(buf_put(&c->out, "{", 1));
    const Field *f = ev->fields;
    int (*put)(Ctx *, int32_t, const Value *) = level > 1 ? write_below : write_entry;
    for (int32_t i = 0; i < ev->nf; i++) {
        int32_t k = f[i].key;
        if (k == K_CLAZZ) continue;
        TRY(put(c, k, (k < NK && ev->ov[k] != NULL) ? ev->ov[k] : &f[i].v));
    }
    if (ev->app_request != NULL) TRY(put(c, K_REQUEST, ev->app_request));
    if (ev->app_parent != NULL) TRY(put(c, K_PARENT, ev->app_parent));
    if (ev->app_type != NULL) TRY(put(c, K_TYPE, ev->app_type));
    if (ev->app_timestamp != NULL) TRY(put(c, K_TIMESTAMP, ev->app_timestamp));
    if (ev->app_ipaddress != NULL) TRY(put(c, K_IPADDRESS, ev->app_ipaddress));
    if (ev->app_tid != NULL) TRY(put(c, K_TID, ev->app_tid));
    if (ev->clazz == C_HEARTBEAT) return PUT_LIT(&c->out, "\"kind\":\"heartbeat\"}");
    return PUT_LIT(&c->out, "\"kind\":\"atomicEvent\"}");
}

/* _merge_end(): the end's name, msg, status and duration (when not None) over the begin's,
 * then the keys only the end has, in its order; duration and status defaults. */
static int merge_end(Ctx *c, Entries *node, const Event *begin, const Event *end) {
    Entries en = {entries_alloc(c, end->nf + 6), 0};
    if (en.e == NULL) return ERR;
    mapped_entries(c, end, &en);
    static const int32_t MERGED[4] = {K_NAME, K_MSG, K_STATUS, K_DURATION};
    for (int m = 0; m < 4; m++) {
        int32_t k = MERGED[m];
        const Value *v = NULL;
        for (int32_t j = 0; j < en.n; j++) {
            if (en.e[j].key == k) {
                v = en.e[j].v;
                break;
            }
        }
        if (v == NULL || v->type == T_NIL) continue;
        int32_t j;
        for (j = 0; j < node->n; j++) {
            if (node->e[j].key == k) break;
        }
        node->e[j].key = k;
        node->e[j].v = v;
        if (j == node->n) node->n++;
    }
    Keys *keys = &c->keys;
    uint32_t stamp = ++keys->stamp;
    for (int32_t j = 0; j < node->n; j++) keys->keys[node->e[j].key].stamp = stamp;
    int has_duration = keys->keys[K_DURATION].stamp == stamp;
    int has_status = keys->keys[K_STATUS].stamp == stamp;
    for (int32_t j = 0; j < en.n; j++) {
        Key *k = &keys->keys[en.e[j].key];
        if (k->stamp == stamp) continue;
        k->stamp = stamp;
        node->e[node->n++] = en.e[j];
        if (en.e[j].key == K_DURATION) has_duration = 1;
        if (en.e[j].key == K_STATUS) has_status = 1;
    }
    if (!has_duration) {
        const Value *d = end->ts_float || begin->ts_float
                             ? new_float(c, end->ts - begin->ts)
                             : new_int(c, (int64_t)end->ts - (int64_t)begin->ts);
        if (d == NULL) return ERR;
        node->e[node->n].key = K_DURATION;
        node->e[node->n].v = d;
        node->n++;
    }
    if (!has_status) {
        node->e[node->n].key = K_STATUS;
        node->e[node->n].v = &V_UNKNOWN_STATUS;
        node->n++;
    }
    return OK;
}

static int write_transaction(Ctx *c, Group *g, int32_t bi, int depth) {
    const Event *begin = &c->events[bi];
    Slot *slot = &c->slots[begin->slot];
    const Event *end = &c->events[slot->end];
    int level = 2 * depth + 1; /* root object 1, its children array 2, a child 3, ... */
    if (level - 1 + (begin->vdepth > end->vdepth ? begin->vdepth : end->vdepth) > MAX_JSON_LEVEL)
        return NO;
    /* room: the begin's entries, 4 merged, the end's entries, 2 defaults */
    Entries node = {entries_alloc(c, begin->nf + end->nf + 20), 0};
    if (node.e == NULL) return ERR;
    mapped_entries(c, begin, &node);
    TRY(merge_end(c, &node, begin, end));
    if (depth == 0) {
        TRY(write_entries(c, &node));
        if (c->prm.compact) {
            for (int i = 0; i < NCOMPACT; i++) c->root_vals[i] = NULL;
            for (int32_t j = 0; j < node.n; j++) {
                for (int i = 0; i < NCOMPACT; i++) {
                    if (COMPACT[i] == node.e[j].key) c->root_vals[i] = node.e[j].v;
                }
            }
        }
    } else {
        TRY(buf_put(&c->out, "{", 1));
        for (int32_t j = 0; j < node.n; j++) TRY(write_below(c, node.e[j].key, node.e[j].v));
    }
    TRY(PUT_LIT(&c->out, "\"kind\":\"transaction\",\"complete\":true,\"children\":["));
    g->visited += 2;
    sort_kids(c, slot);
    int first = 1;
    for (int32_t i = slot->kids_first; i >= 0; i = c->events[i].next) {
        if (!first) TRY(buf_put(&c->out, ",", 1));
        first = 0;
        const Event *kid = &c->events[i];
        if (kid->clazz == C_BEGIN) {
            if (depth + 1 >= c->prm.tree_depth) return NO; /* the engine cuts it (depth_cut) */
            TRY(write_transaction(c, g, i, depth + 1));
        } else {
            g->visited += 1;
            TRY(write_atomic(c, kid, level + 2));
        }
    }
    return PUT_LIT(&c->out, "]}");
}

/* ------------------------------------------------------------------ the packed memory */

/* What the engine remembers of a published tree: digests, never content (see
 * buffer/memory.py, which makes the same bytes for the reference path). A digest is
 * Python's hash of canonical bytes: an id's UTF-8 bytes; for an atomic event, its id, its
 * parent and a string msg each as a u32 LE length and bytes (ff ff ff ff for none), the
 * timestamp as 'i' and an int64 LE. */

static int put_part(Buf *b, const Value *v) {
    if (v == NULL) return buf_put(b, "\xff\xff\xff\xff", 4);
    uint8_t n[4];
    for (int k = 0; k < 4; k++) n[k] = (uint8_t)(v->len >> (8 * k));
    TRY(buf_put(b, n, 4));
    return buf_put(b, v->s, v->len);
}

static int64_t atomic_digest(Ctx *c, const Event *ev, Buf *key) {
    const Value *msg = field_value(c, ev, K_MSG);
    if (msg != NULL && msg->type != T_STR) msg = NULL;
    /* as memory.atomic_digest: 'i' and an int64 for an integral value, else 'd' and the
     * double's bits */
    uint8_t ts[9] = {'i'};
    uint64_t bits;
    if (ev->ts == (double)(int64_t)ev->ts) {
        bits = (uint64_t)(int64_t)ev->ts;
    } else {
        ts[0] = 'd';
        memcpy(&bits, &ev->ts, 8);
    }
    for (int k = 0; k < 8; k++) ts[1 + k] = (uint8_t)(bits >> (8 * k));
    key->len = 0;
    if (put_part(key, ev->eid) != OK || put_part(key, ev->parent) != OK ||
        buf_put(key, ts, 9) != OK || put_part(key, msg) != OK)
        return -1;
    return (int64_t)_Py_HashBytes(key->data, (Py_ssize_t)key->len);
}

/* [u32 LE counts of begins, ends, atomic keys][int64 digests, native order], each part in
 * arrival order (LogBuffer._publish packs the same with memory.pack_digests). */
static PyObject *pack_memory(Ctx *c, const Group *g) {
    Buf b = {0}, key = {0};
    uint32_t counts[3] = {0, 0, 0};
    for (int32_t i = g->first; i >= 0; i = c->events[i].gnext) {
        uint8_t cl = c->events[i].clazz;
        counts[cl == C_BEGIN ? 0 : cl == C_END ? 1 : 2]++;
    }
    PyObject *res = NULL;
    uint8_t head[12];
    for (int part = 0; part < 3; part++)
        for (int k = 0; k < 4; k++) head[4 * part + k] = (uint8_t)(counts[part] >> (8 * k));
    if (buf_put(&b, head, 12) != OK) goto done;
    for (int part = 0; part < 3; part++) {
        for (int32_t i = g->first; i >= 0; i = c->events[i].gnext) {
            const Event *ev = &c->events[i];
            int which = ev->clazz == C_BEGIN ? 0 : ev->clazz == C_END ? 1 : 2;
            if (which != part) continue;
            int64_t d;
            if (part < 2) {
                d = (int64_t)_Py_HashBytes(ev->eid->s, (Py_ssize_t)ev->eid->len);
            } else {
                d = atomic_digest(c, ev, &key); /* a hash is never -1: that is no memory */
                if (d == -1) goto done;
            }
            if (buf_put(&b, &d, 8) != OK) goto done;
        }
    }
    res = PyBytes_FromStringAndSize(b.data, (Py_ssize_t)b.len);
done:
    PyMem_RawFree(b.data);
    PyMem_RawFree(key.data);
    if (res == NULL && !PyErr_Occurred()) PyErr_NoMemory();
    return res;
}

/* ------------------------------------------------------------------ entry point */

static uint32_t table_mask(Py_ssize_t n) {
    uint32_t size = 16;
    while ((Py_ssize_t)size < n * 2) size <<= 1;
    return size - 1;
}

/* Allocate for n events, then parse and map them from r. */
static inline size_t round8(size_t n) { return (n + 7) & ~(size_t)7; }

static int parse_logs(Ctx *c, Reader *r, uint32_t n) {
    if (c->events != NULL) return NO; /* a second "logs" */
    if ((Py_ssize_t)n > c->prm.max_events) return NO;
    size_t ne = n ? n : 1;
    /* two allocations per frame: the per-event arrays, and the zeroed hash tables */
    size_t sizes[6] = {sizeof(Event) * ne, sizeof(Uuid) * ne,    sizeof(Group) * ne,
                       sizeof(Slot) * ne,  sizeof(int32_t) * ne, sizeof(int32_t) * ne};
    size_t total = 0;
    for (int i = 0; i < 6; i++) total += round8(sizes[i]);
    char *block = PyMem_RawMalloc(total);
    c->uuid_mask = c->slot_mask = c->atomic_mask = table_mask((Py_ssize_t)ne);
    size_t tables = (size_t)c->atomic_mask + 1;
    char *zeroed = PyMem_RawCalloc(tables, sizeof(uint64_t) + 2 * sizeof(int32_t));
    c->block = block;
    c->zeroed = zeroed;
    if (block == NULL || zeroed == NULL) return ERR;
    c->events = (Event *)block;
    block += round8(sizes[0]);
    c->uuids = (Uuid *)block;
    block += round8(sizes[1]);
    c->groups = (Group *)block;
    block += round8(sizes[2]);
    c->slots = (Slot *)block;
    block += round8(sizes[3]);
    c->sort_tmp = (int32_t *)block;
    block += round8(sizes[4]);
    c->sort_tmp2 = (int32_t *)block;
    c->atomic_keys = (uint64_t *)zeroed;
    c->uuid_slots = (int32_t *)(zeroed + tables * sizeof(uint64_t));
    c->slot_table = c->uuid_slots + tables;
    for (uint32_t i = 0; i < n; i++) {
        Event *ev = &c->events[i];
        TRY(parse_event(c, r, ev));
        c->nevents = (int32_t)i + 1;
        TRY(map_event(c, ev));
    }
    return OK;
}

/* Parse and map a whole frame (an array of log maps or an envelope): c->events. */
static int parse_frame(Ctx *c, const uint8_t *data, Py_ssize_t size) {
    if (size > c->prm.max_message_bytes) return NO;
    Reader r = {data, data + size};
    Value top;
    TRY(read_token(&r, &top, -1));
    if (top.type == T_ARRAY) {
        TRY(parse_logs(c, &r, top.len));
    } else if (top.type == T_MAP) {
        /* an envelope: "logs" (an array) and optionally "seq" (an int >= 0), nothing else */
        for (uint32_t i = 0; i < top.len; i++) {
            Value k = {0}, v = {0};
            TRY(read_token(&r, &k, -1));
            if (k.type != T_STR) return NO;
            TRY(read_token(&r, &v, -1));
            if (str_is(&k, "logs", 4)) {
                if (v.type != T_ARRAY) return NO;
                TRY(parse_logs(c, &r, v.len));
            } else if (str_is(&k, "seq", 3) && !c->has_seq) {
                if (v.type == T_INT && v.n.i >= 0) c->seq = (uint64_t)v.n.i;
                else if (v.type == T_UINT) c->seq = v.n.u;
                else return NO;
                c->has_seq = 1;
            } else {
                return NO;
            }
        }
        if (c->events == NULL) return NO; /* a single log map: the reference path */
    } else {
        return NO;
    }
    if (r.p != data + size) return NO; /* trailing bytes */
    return OK;
}

static int run(Ctx *c, const uint8_t *data, Py_ssize_t size) {
    TRY(parse_frame(c, data, size));
    TRY(group_events(c));
    /* stand-alone records first, in arrival order, then each tree */
    TRY(buf_reserve(&c->out, (size_t)size + (size_t)size / 2 + 64));
    for (int32_t i = 0; i < c->nevents; i++) {
        Event *ev = &c->events[i];
        if (!is_standalone(ev)) continue;
        TRY(write_atomic(c, ev, 1));
        TRY(buf_put(&c->out, "\n", 1));
        if (ev->clazz == C_HEARTBEAT) c->n_heartbeat++;
        else c->n_atomic++;
    }
    for (int32_t gi = 0; gi < c->ngroups; gi++) {
        Group *g = &c->groups[gi];
        for (int32_t i = g->roots_first; i >= 0; i = c->events[i].next) {
            TRY(write_transaction(c, g, i, 0));
            TRY(buf_put(&c->out, "\n", 1));
            c->n_tx++;
        }
        if (g->visited != g->count) return NO; /* a parent cycle left events unreached */
    }
    return OK;
}

static void ctx_free(Ctx *c) {
    for (int32_t i = 0; i < c->nuuids; i++) Py_XDECREF(c->uuids[i].str);
    arena_free(&c->arena);
    PyMem_RawFree(c->keys.keys);
    PyMem_RawFree(c->keys.slots);
    PyMem_RawFree(c->scratch);
    PyMem_RawFree(c->block);
    PyMem_RawFree(c->zeroed);
    PyMem_RawFree(c->out.data);
}

/* The key table every call starts from: the known keys, interned once at import. */
static Keys KNOWN_TABLE;
static Arena KNOWN_ARENA; /* their JSON texts; lives as long as the module */

static int known_table_init(void) {
    Keys *k = &KNOWN_TABLE;
    k->cap_keys = 64;
    k->keys = PyMem_RawMalloc(sizeof(Key) * 64);
    k->mask = 127;
    k->slots = PyMem_RawCalloc(128, sizeof(int32_t));
    if (k->keys == NULL || k->slots == NULL) return ERR;
    for (int i = 0; i < NK; i++) {
        int32_t id;
        TRY(intern(k, &KNOWN_ARENA, (const uint8_t *)KNOWN[i], (uint32_t)strlen(KNOWN[i]), &id));
    }
    return OK;
}

static int ctx_init(Ctx *c) {
    Keys *t = &KNOWN_TABLE;
    c->keys.cap_keys = t->cap_keys;
    c->keys.nkeys = t->nkeys;
    c->keys.mask = t->mask;
    c->keys.keys = PyMem_RawMalloc(sizeof(Key) * (size_t)t->cap_keys);
    c->keys.slots = PyMem_RawMalloc(sizeof(int32_t) * ((size_t)t->mask + 1));
    if (c->keys.keys == NULL || c->keys.slots == NULL) return ERR;
    memcpy(c->keys.keys, t->keys, sizeof(Key) * (size_t)t->nkeys);
    memcpy(c->keys.slots, t->slots, sizeof(int32_t) * ((size_t)t->mask + 1));
    return OK;
}

PyDoc_STRVAR(reassemble_doc,
"reassemble(payload, now, limits, dumps) -> Reassembled | None\n"
"\n"
"The JSON lines LogBuffer.feed_many would publish for a MessagePack frame of whole\n"
"trees, or None when the frame needs the reference path.\n"
"\n"
"limits: (max_message_bytes, max_events_per_frame, max_depth, max_string_length,\n"
"max_keys_per_map, max_array_length, max_record_bytes, tree max_depth,\n"
"max_events_per_tx); dumps(float) -> its JSON bytes\n"
"(orjson.dumps, so that floats read exactly as the reference path writes them).\n"
"\n"
"Returns a Reassembled (a named tuple): the envelope's seq or None, the records as JSON\n"
"lines, the records by kind, the events taken, and for each tree published its uuid and\n"
"the packed ids the engine remembers.");

/* The result's named type (a struct sequence: a tuple whose items have names). */
static PyStructSequence_Field reassembled_fields[] = {
    {"seq", "the envelope's seq, or None"},
    {"lines", "the records as JSON lines (bytes), in publication order"},
    {"transactions", "transaction records in lines"},
    {"atomic_events", "stand-alone atomic event records in lines"},
    {"heartbeats", "heartbeat records in lines"},
    {"events", "events taken: every event of the frame"},
    {"uuids", "the uuid of each tree published (a tuple of str)"},
    {"memories", "for each uuid, the packed ids the engine remembers (a tuple of bytes)"},
    {NULL, NULL},
};

static PyStructSequence_Desc reassembled_desc = {
    "async_logging._speedups.Reassembled",
    "One MessagePack frame of whole trees, reassembled: what reassemble() returns.",
    reassembled_fields,
    8,
};

static PyTypeObject *ReassembledType;

/* A Reassembled from its parts; steals every reference (NULL items make it fail). */
static PyObject *make_reassembled(PyObject *seq, PyObject *lines, Ctx *c, PyObject *uuids,
                                  PyObject *memories) {
    PyObject *items[8] = {
        seq,
        lines,
        PyLong_FromLong(c->n_tx),
        PyLong_FromLong(c->n_atomic),
        PyLong_FromLong(c->n_heartbeat),
        PyLong_FromLong(c->nevents),
        uuids,
        memories,
    };
    PyObject *result = PyStructSequence_New(ReassembledType);
    for (int i = 0; i < 8; i++) {
        if (items[i] == NULL) Py_CLEAR(result);
    }
    if (result == NULL) {
        for (int i = 0; i < 8; i++) Py_XDECREF(items[i]);
        return NULL;
    }
    for (int i = 0; i < 8; i++) PyStructSequence_SET_ITEM(result, i, items[i]);
    return result;
}

/* c->prm from the `now` and `limits` arguments: ERR (an exception is set), NO (now out of
 * range: decline) or OK. */
static int set_params(Ctx *c, PyObject *now_arg, PyObject *limits) {
    long long now = PyLong_AsLongLong(now_arg);
    if (now == -1 && PyErr_Occurred()) return ERR;
    if (now > TS_BOUND || now < -TS_BOUND) return NO;
    c->prm.now = now;
    if (!PyTuple_Check(limits) || PyTuple_GET_SIZE(limits) != 10) {
        PyErr_SetString(PyExc_TypeError, "limits must be a tuple of 10 ints");
        return ERR;
    }
    Py_ssize_t lim[10];
    for (int i = 0; i < 10; i++) {
        lim[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(limits, i));
        if (lim[i] == -1 && PyErr_Occurred()) return ERR;
    }
    c->prm.max_message_bytes = lim[0];
    c->prm.max_events = lim[1];
    c->prm.max_depth = lim[2];
    c->prm.max_string = lim[3];
    c->prm.max_keys = lim[4];
    c->prm.max_array = lim[5];
    c->prm.max_record = lim[6];
    c->prm.tree_depth = lim[7];
    c->prm.tx_events = lim[8];
    c->prm.compact = lim[9] != 0;
    return OK;
}

static PyObject *reassemble(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "reassemble() takes 4 arguments");
        return NULL;
    }
    Ctx c;
    memset(&c, 0, sizeof c);
    int prc = set_params(&c, args[1], args[2]);
    if (prc == ERR) return NULL;
    if (prc == NO) Py_RETURN_NONE;
    c.dumps_fn = args[3];
    /* bytes only: the frames the server receives; anything else takes the reference path */
    if (!PyBytes_Check(args[0])) Py_RETURN_NONE;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *seq = NULL, *result = NULL;
    /* The GIL stays held: releasing it for the ~50 us a frame takes measured slower in
     * the server (its event loop then had to win the GIL back from the publisher thread
     * after every frame: 517-609k events/s against 635-659k held). */
    int rc = ctx_init(&c);
    if (rc == OK) rc = run(&c, view.buf, view.len);
    if (rc == ERR && !PyErr_Occurred()) PyErr_NoMemory();
    if (rc == OK && c.has_seq) {
        seq = PyLong_FromUnsignedLongLong(c.seq);
        if (seq == NULL) rc = ERR;
    }
    if (rc == OK) {
        PyObject *uuids = PyTuple_New(c.ngroups);
        PyObject *memories = PyTuple_New(c.ngroups);
        PyObject *lines = PyBytes_FromStringAndSize(c.out.data, (Py_ssize_t)c.out.len);
        if (uuids && memories && lines) {
            int32_t gi;
            for (gi = 0; gi < c.ngroups; gi++) {
                Uuid *u = &c.uuids[c.groups[gi].uuid_ix];
                if (u->str == NULL) {
                    u->str = PyUnicode_DecodeUTF8((const char *)u->p, u->len, "strict");
                    if (u->str == NULL) break;
                }
                Py_INCREF(u->str);
                PyTuple_SET_ITEM(uuids, gi, u->str);
                PyObject *memo = pack_memory(&c, &c.groups[gi]);
                if (memo == NULL) break;
                PyTuple_SET_ITEM(memories, gi, memo);
            }
            if (gi == c.ngroups) {
                result = make_reassembled(seq ? Py_NewRef(seq) : Py_NewRef(Py_None), lines, &c,
                                          uuids, memories);
                lines = uuids = memories = NULL;
            }
        }
        Py_XDECREF(uuids);
        Py_XDECREF(memories);
        Py_XDECREF(lines);
    } else if (rc == NO) {
        result = Py_NewRef(Py_None);
    }
    Py_XDECREF(seq);
    PyBuffer_Release(&view);
    ctx_free(&c);
    return result;
}

/* ------------------------------------------------------------------ split (the bus) */

static uint32_t CRC_TABLE[256];

static void crc_init_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t x = i;
        for (int k = 0; k < 8; k++) x = (x >> 1) ^ (0xEDB88320U & (0U - (x & 1U)));
        CRC_TABLE[i] = x;
    }
}

/* CRC-32 as zlib.crc32 computes it (the partition of a uuid: bus/partition.py). */
static uint32_t crc32_of(const uint8_t *p, size_t n) {
    uint32_t x = 0xFFFFFFFFU;
    for (size_t i = 0; i < n; i++) x = CRC_TABLE[(x ^ p[i]) & 0xFF] ^ (x >> 8);
    return x ^ 0xFFFFFFFFU;
}

PyDoc_STRVAR(split_doc,
"split(payload, now, limits, partitions, other, max_event_bytes) -> tuple | None\n"
"\n"
"For a MessagePack frame whose every event the default mapper takes, each event's\n"
"MessagePack bytes by partition (CRC-32 of its mapped uuid modulo partitions; `other`\n"
"for an event without a uuid), in frame order; None when the frame needs the reference\n"
"path (as reassemble declines, or an event longer than max_event_bytes).\n"
"\n"
"limits: as for reassemble. Returns (seq or None, events, parts), parts a tuple of\n"
"(partition, count, bytes) in ascending partition order, bytes the events back to back.");

static PyObject *split(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "split() takes 6 arguments");
        return NULL;
    }
    Py_ssize_t partitions = PyLong_AsSsize_t(args[3]);
    Py_ssize_t other = PyLong_AsSsize_t(args[4]);
    Py_ssize_t max_event = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (partitions < 1 || partitions > 65536 || other < 0 || other >= partitions) {
        PyErr_SetString(PyExc_ValueError, "need 1 <= partitions <= 65536, 0 <= other < partitions");
        return NULL;
    }
    Ctx c;
    memset(&c, 0, sizeof c);
    int rc = set_params(&c, args[1], args[2]);
    if (rc == ERR) return NULL;
    if (rc == NO || !PyBytes_Check(args[0])) Py_RETURN_NONE;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t *sizes = NULL, *counts = NULL;
    PyObject *result = NULL;
    rc = ctx_init(&c);
    if (rc == OK) rc = parse_frame(&c, view.buf, view.len);
    if (rc == OK) {
        sizes = PyMem_RawCalloc((size_t)partitions, sizeof(Py_ssize_t));
        counts = PyMem_RawCalloc((size_t)partitions, sizeof(Py_ssize_t));
        if (sizes == NULL || counts == NULL) rc = ERR;
    }
    /* each event's partition, in sort_tmp (sized one per event) */
    for (int32_t i = 0; rc == OK && i < c.nevents; i++) {
        Event *ev = &c.events[i];
        if ((Py_ssize_t)ev->raw_len > max_event) {
            rc = NO; /* refused record_too_big on the reference path */
            break;
        }
        int32_t part = (int32_t)other;
        if (ev->uuid != NULL) {
            Uuid *u = &c.uuids[ev->uuid_ix];
            if (u->part < 0) u->part = (int32_t)(crc32_of(u->p, u->len) % (uint32_t)partitions);
            part = u->part;
        }
        c.sort_tmp[i] = part;
        sizes[part] += ev->raw_len;
        counts[part]++;
    }
    if (rc == OK) {
        Py_ssize_t used = 0;
        for (Py_ssize_t p = 0; p < partitions; p++) used += counts[p] > 0;
        PyObject *parts = PyTuple_New(used);
        PyObject *seq = c.has_seq ? PyLong_FromUnsignedLongLong(c.seq) : Py_NewRef(Py_None);
        Py_ssize_t k = 0;
        for (Py_ssize_t p = 0; parts != NULL && seq != NULL && p < partitions; p++) {
            if (counts[p] == 0) continue;
            PyObject *body = PyBytes_FromStringAndSize(NULL, sizes[p]);
            PyObject *item = body ? Py_BuildValue("(nnN)", p, counts[p], body) : NULL;
            if (item == NULL) {
                Py_CLEAR(parts);
                break;
            }
            PyTuple_SET_ITEM(parts, k, item);
            counts[p] = k++; /* now its index in parts */
            sizes[p] = 0;    /* now the fill offset */
        }
        if (parts != NULL && seq != NULL) {
            for (int32_t i = 0; i < c.nevents; i++) {
                Event *ev = &c.events[i];
                int32_t part = c.sort_tmp[i];
                PyObject *body = PyTuple_GET_ITEM(PyTuple_GET_ITEM(parts, counts[part]), 2);
                memcpy(PyBytes_AS_STRING(body) + sizes[part], ev->raw, ev->raw_len);
                sizes[part] += ev->raw_len;
            }
            result = Py_BuildValue("(NiN)", seq, (int)c.nevents, parts);
            seq = parts = NULL;
        }
        Py_XDECREF(parts);
        Py_XDECREF(seq);
    } else if (rc == NO) {
        result = Py_NewRef(Py_None);
    }
    if (rc == ERR && !PyErr_Occurred()) PyErr_NoMemory();
    PyMem_RawFree(sizes);
    PyMem_RawFree(counts);
    PyBuffer_Release(&view);
    ctx_free(&c);
    return result;
}

PyDoc_STRVAR(atomic_digest_doc,
"atomic_digest(event, parent, timestamp, msg, /) -> int | None\n\n"
"The digest pack_memory keeps of an atomic event's duplicate key (see\n"
"async_logging.buffer.memory.atomic_digest, which this computes faster): None when a\n"
"part is outside what a frame can carry (a timestamp not an int64, an id not a str).");

static int part_of(PyObject *o, Value *v, const Value **out) {
    *out = NULL;
    if (o == Py_None) return OK;
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s == NULL || (size_t)n > UINT32_MAX) {
        PyErr_Clear(); /* a lone surrogate: the caller's own code takes it */
        return ERR;
    }
    v->s = (const uint8_t *)s;
    v->len = (uint32_t)n;
    *out = v;
    return OK;
}

static PyObject *py_atomic_digest(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "atomic_digest() takes 4 arguments");
        return NULL;
    }
    PyObject *eid = args[0], *parent = args[1], *ts = args[2], *msg = args[3];
    if (!PyLong_CheckExact(ts) || !PyUnicode_CheckExact(parent) ||
        (eid != Py_None && !PyUnicode_CheckExact(eid)))
        Py_RETURN_NONE;
    int overflow = 0;
    long long t = PyLong_AsLongLongAndOverflow(ts, &overflow);
    if (overflow) Py_RETURN_NONE;
    if (t == -1 && PyErr_Occurred()) return NULL;
    Value ve = {0}, vp = {0}, vm = {0};
    const Value *pe, *pp, *pm;
    if (part_of(eid, &ve, &pe) != OK || part_of(parent, &vp, &pp) != OK ||
        part_of(PyUnicode_CheckExact(msg) ? msg : Py_None, &vm, &pm) != OK)
        Py_RETURN_NONE;
    uint8_t stamp[9] = {'i'};
    for (int k = 0; k < 8; k++) stamp[1 + k] = (uint8_t)((uint64_t)t >> (8 * k));
    Buf key = {0};
    PyObject *res = NULL;
    if (put_part(&key, pe) == OK && put_part(&key, pp) == OK && buf_put(&key, stamp, 9) == OK &&
        put_part(&key, pm) == OK)
        res = PyLong_FromSsize_t(_Py_HashBytes(key.data, (Py_ssize_t)key.len));
    else
        PyErr_NoMemory();
    PyMem_RawFree(key.data);
    return res;
}

static PyMethodDef methods[] = {
    {"reassemble", (PyCFunction)(void (*)(void))reassemble, METH_FASTCALL, reassemble_doc},
    {"atomic_digest", (PyCFunction)(void (*)(void))py_atomic_digest, METH_FASTCALL,
     atomic_digest_doc},
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL, split_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups",
    "The native fast path of LogBuffer (see buffer.py and _speedups.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    md5_init_table();
    digit_pairs_init();
    crc_init_table();
    if (known_table_init() != OK) return PyErr_NoMemory();
    ReassembledType = PyStructSequence_NewType(&reassembled_desc);
    if (ReassembledType == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Reassembled", (PyObject *)ReassembledType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
