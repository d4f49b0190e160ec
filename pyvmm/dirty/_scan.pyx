# cython: language_level=3, boundscheck=False, wraparound=False
# cython: initializedcheck=False, cdivision=True
"""Hot loops of dirty tracking and RAM migration (layer L2, pyvmm.dirty).

Every function validates its arguments with the GIL held (ValueError, one line, naming the bad
value) and then runs its loop in a ``with nogil:`` block, so vCPU threads and the QMP server keep
running while the migration thread scans.

Conventions, all fixed by KVM on x86-64:

* a page is 4096 bytes; page numbers are uint64 (numpy ``np.uint64``);
* a dirty bitmap is a C-contiguous ``np.uint64`` array, bit ``i`` of word ``w`` = page
  ``w * 64 + i`` (KVM_GET_DIRTY_LOG's layout: little-endian 64-bit words);
* guest memory ``mem`` is any C-contiguous byte buffer (the GuestMemory mmap, a numpy uint8
  array, bytes); page ``p`` is ``mem[p * 4096:(p + 1) * 4096]``.

See docs/scan.md for what each loop is for and the figures measured on the project machines.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import operator

import numpy as np

# C helpers that Cython cannot spell itself: compiler builtins, the atomics of the dirty-ring
# protocol, an unaligned 64-bit load, and 64-bit constants (kept in C so they stay C literals).
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static inline int scan_ctz64(uint64_t w) { return __builtin_ctzll(w); }
    static inline int scan_popcount64(uint64_t w) { return __builtin_popcountll(w); }

    /* memcpy is how C spells "load 8 bytes from any address"; it compiles to one mov. */
    static inline uint64_t scan_load64(const uint8_t *p) { uint64_t w; memcpy(&w, p, 8); return w; }

    static inline uint32_t scan_load_acquire_u32(const uint32_t *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void scan_store_release_u32(uint32_t *p, uint32_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

    static const uint64_t SCAN_TOP_BIT = 0x8000000000000000ULL;
    /* The five primes of xxHash64 (XXH_PRIME64_1..5). */
    static const uint64_t SCAN_XXH_P1 = 0x9E3779B185EBCA87ULL;
    static const uint64_t SCAN_XXH_P2 = 0xC2B2AE3D27D4EB4FULL;
    static const uint64_t SCAN_XXH_P3 = 0x165667B19E3779F9ULL;
    static const uint64_t SCAN_XXH_P4 = 0x85EBCA77C2B2AE63ULL;
    """
    int scan_ctz64(uint64_t w) nogil
    int scan_popcount64(uint64_t w) nogil
    uint64_t scan_load64(const uint8_t *p) nogil
    uint32_t scan_load_acquire_u32(const uint32_t *p) nogil
    void scan_store_release_u32(uint32_t *p, uint32_t v) nogil
    const uint64_t SCAN_TOP_BIT
    const uint64_t SCAN_XXH_P1
    const uint64_t SCAN_XXH_P2
    const uint64_t SCAN_XXH_P3
    const uint64_t SCAN_XXH_P4


PAGE_SIZE = 4096
PAGE_SHIFT = 12
KVM_DIRTY_GFN_F_DIRTY = 1
KVM_DIRTY_GFN_F_RESET = 2
KVM_DIRTY_GFN_SIZE = 16  # sizeof(struct kvm_dirty_gfn)

cdef enum:
    _PAGE_SIZE = 4096
    _PAGE_SHIFT = 12
    _WORDS_PER_PAGE = 512
    _GFN_F_DIRTY = 1
    _GFN_F_RESET = 2

# struct kvm_dirty_gfn from <linux/kvm.h>: 16 bytes, the layout the kernel writes into the ring.
cdef struct kvm_dirty_gfn:
    uint32_t flags
    uint32_t slot     # address-space id << 16 | slot id
    uint64_t offset   # page index inside the slot


# --------------------------------------------------------------------------------------------
# Small shared pieces
# --------------------------------------------------------------------------------------------

cdef inline uint64_t _popcount(const uint64_t *words, Py_ssize_t nwords) noexcept nogil:
    # Four running sums instead of one: each addition then waits only for the popcount of its
    # own word, not for the previous addition (measured 1.5x faster on a 2 MiB bitmap).
    cdef Py_ssize_t i = 0
    cdef uint64_t t0 = 0, t1 = 0, t2 = 0, t3 = 0
    while i + 4 <= nwords:
        t0 += scan_popcount64(words[i])
        t1 += scan_popcount64(words[i + 1])
        t2 += scan_popcount64(words[i + 2])
        t3 += scan_popcount64(words[i + 3])
        i += 4
    while i < nwords:
        t0 += scan_popcount64(words[i])
        i += 1
    return t0 + t1 + t2 + t3


cdef int _check_pages_below(const uint64_t[::1] pages, uint64_t limit, str where) except -1:
    """Raise ValueError naming the first page number >= limit (the scan itself runs nogil)."""
    cdef Py_ssize_t i, bad = -1, n = pages.shape[0]
    with nogil:
        for i in range(n):
            if pages[i] >= limit:
                bad = i
                break
    if bad >= 0:
        raise ValueError(f"pages[{bad}] = {pages[bad]} is outside {where} ({limit} pages)")
    return 0


cdef uint64_t _mem_pages(const uint8_t[::1] mem):
    """Whole pages in mem (a trailing partial page cannot be addressed)."""
    return <uint64_t>mem.shape[0] >> _PAGE_SHIFT


cdef object _as_index(object value, str name, object limit):
    """value as a Python int in [0, limit), else ValueError (TypeError if it is not an int)."""
    value = operator.index(value)
    if not 0 <= value < limit:
        raise ValueError(f"{name} = {value} is out of range [0, {limit})")
    return value


# --------------------------------------------------------------------------------------------
# 1-3. Bitmaps
# --------------------------------------------------------------------------------------------

cdef Py_ssize_t _flatten_exact(const uint64_t *words, Py_ssize_t start, Py_ssize_t nwords,
                               uint64_t *out, Py_ssize_t pos) noexcept nogil:
    """The textbook loop: for each set bit, lowest first, write its page number.

    ctz (count trailing zeros) gives the lowest set bit; w & (w - 1) clears it. Zero words cost
    one well-predicted branch, so this is the fastest loop when almost every word is zero.
    """
    cdef Py_ssize_t i
    cdef uint64_t w, base
    for i in range(start, nwords):
        w = words[i]
        base = (<uint64_t>i) << 6
        while w != 0:
            out[pos] = base + <uint64_t>scan_ctz64(w)
            w &= w - 1
            pos += 1
    return pos


cdef inline Py_ssize_t _flatten_blocked(const uint64_t *words, Py_ssize_t nwords, uint64_t *out,
                                        Py_ssize_t total, int block) noexcept nogil:
    """Same result as _flatten_exact, with fewer branch mispredictions on busy bitmaps.

    When words hold 0, 1, 2, ... bits at random, the CPU cannot predict how often the inner
    `while w` runs and pays ~15 cycles per wrong guess. So for every word we write `block`
    entries unconditionally (a fixed-count loop the compiler unrolls), and only loop for the
    bits beyond `block`; then pos advances by the word's real popcount. Entries written past
    the word's last bit are garbage but sit in slots that later words overwrite. `w | TOP_BIT`
    keeps ctz defined once w runs out of bits (ctz(0) is undefined in C).

    The garbage writes must stay inside out[0:total], so this loop runs while pos + block <=
    total and _flatten_exact finishes the last few words.
    """
    cdef Py_ssize_t i = 0, pos = 0, k
    cdef uint64_t w, base
    cdef int j
    while i < nwords and pos + block <= total:
        w = words[i]
        base = (<uint64_t>i) << 6
        k = pos + scan_popcount64(w)  # where the next word starts
        for j in range(block):
            out[pos + j] = base + <uint64_t>scan_ctz64(w | SCAN_TOP_BIT)
            w &= w - 1
        pos += block
        while w != 0:                 # rare unless the word has more than `block` bits
            out[pos] = base + <uint64_t>scan_ctz64(w)
            w &= w - 1
            pos += 1
        pos = k
        i += 1
    return _flatten_exact(words, i, nwords, out, pos)


def bitmap_to_pages(const uint64_t[::1] bitmap not None, out=None):
    """Page numbers of the set bits of `bitmap`, ascending, as a uint64 numpy array.

    `out`, if given, is a preallocated C-contiguous uint64 numpy array with room for at least
    count_set(bitmap) pages; the filled slice out[:count] is returned (no allocation).
    """
    cdef Py_ssize_t nwords = bitmap.shape[0], filled = 0
    cdef const uint64_t *words = &bitmap[0] if nwords else NULL
    cdef uint64_t total
    cdef uint64_t[::1] out_view
    cdef uint64_t *dst
    with nogil:
        total = _popcount(words, nwords)  # a first pass is cheap: the bitmap stays in cache
    if out is None:
        out = np.empty(total, dtype=np.uint64)
    out_view = out
    if <uint64_t>out_view.shape[0] < total:
        raise ValueError(
            f"out has room for {out_view.shape[0]} pages but the bitmap has {total} set bits"
        )
    dst = &out_view[0] if total else NULL
    with nogil:
        # Pick the loop by average set bits per word (measured crossovers, see docs/scan.md).
        if total == 0:
            filled = 0
        elif total * 4 < <uint64_t>nwords:     # < 0.25 bits/word: most words are zero
            filled = _flatten_exact(words, 0, nwords, dst, 0)
        elif total < 4 * <uint64_t>nwords:     # < 4 bits/word
            filled = _flatten_blocked(words, nwords, dst, total, 4)
        else:
            filled = _flatten_blocked(words, nwords, dst, total, 8)
    return out[:filled]


def count_set(const uint64_t[::1] bitmap not None):
    """Number of set bits (dirty pages) in `bitmap`."""
    cdef uint64_t total
    with nogil:
        total = _popcount(&bitmap[0], bitmap.shape[0])
    return total


def set_pages(uint64_t[::1] bitmap not None, const uint64_t[::1] pages not None):
    """Set the bit of every page in `pages` (any order, duplicates allowed)."""
    cdef Py_ssize_t i
    cdef uint64_t p
    _check_pages_below(pages, <uint64_t>bitmap.shape[0] * 64, "the bitmap")
    with nogil:
        for i in range(pages.shape[0]):
            p = pages[i]
            bitmap[p >> 6] |= (<uint64_t>1) << (p & 63)


cdef int _check_same_length(Py_ssize_t a, Py_ssize_t b, str names) except -1:
    if a != b:
        raise ValueError(f"{names} have different lengths: {a} and {b} words")
    return 0


def or_into(uint64_t[::1] dst not None, const uint64_t[::1] src not None):
    """dst |= src, word by word (e.g. merge the VMM's own writes into KVM's dirty bitmap)."""
    cdef Py_ssize_t i
    _check_same_length(dst.shape[0], src.shape[0], "dst and src")
    with nogil:
        for i in range(dst.shape[0]):
            dst[i] |= src[i]


# A block summary says which parts of a bitmap may hold bits: bit b of word k stands for
# block 64 k + b, bitmap words [64 (64 k + b), 64 (64 k + b) + 64), 4096 pages (16 MiB).
# Functions given one touch only those blocks, so that work follows the dirty pages rather
# than the size of the guest (ring mode: docs/dirty-tracking.md, "What a sync costs").
BLOCK_PAGES = 4096

cdef enum:
    _BLOCK_WORDS = 64
    _BLOCK_SHIFT = 12       # pages per block: 1 << 12


cdef inline Py_ssize_t _summary_words(Py_ssize_t nwords) noexcept nogil:
    return (nwords + 64 * _BLOCK_WORDS - 1) // (64 * _BLOCK_WORDS)


cdef int _check_blocks(Py_ssize_t nwords, Py_ssize_t nsummary) except -1:
    if nsummary < _summary_words(nwords):
        raise ValueError(
            f"blocks has {nsummary} words; a bitmap of {nwords} words needs "
            f"{_summary_words(nwords)}"
        )
    return 0


cdef inline Py_ssize_t _next_block(const uint64_t *summary, Py_ssize_t nsummary,
                                   Py_ssize_t *k, uint64_t *word) noexcept nogil:
    """The next block flagged in summary (state in *k, *word), or -1."""
    cdef int b
    while word[0] == 0:
        k[0] += 1
        if k[0] >= nsummary:
            return -1
        word[0] = summary[k[0]]
    b = scan_ctz64(word[0])
    word[0] &= word[0] - 1
    return k[0] * 64 + b


def take_and_clear(uint64_t[::1] src not None, uint64_t[::1] dst not None, blocks=None):
    """dst |= src, then src = 0; returns the number of bits taken (popcount of src).
    blocks: a block summary of src; only its blocks are read (the rest must be zero)."""
    cdef Py_ssize_t i, n = src.shape[0], k = -1, blk, end
    cdef uint64_t w, moved = 0, cur = 0
    cdef const uint64_t[::1] summary
    _check_same_length(src.shape[0], dst.shape[0], "src and dst")
    if &src[0] == &dst[0] and src.shape[0] > 0:
        raise ValueError("src and dst are the same buffer; take_and_clear would lose every bit")
    if blocks is not None:
        summary = blocks
        _check_blocks(n, summary.shape[0])
        if summary.shape[0] == 0:
            return 0
        with nogil:
            while True:
                blk = _next_block(&summary[0], summary.shape[0], &k, &cur)
                if blk < 0 or blk * _BLOCK_WORDS >= n:
                    break
                end = min(n, (blk + 1) * _BLOCK_WORDS)
                for i in range(blk * _BLOCK_WORDS, end):
                    w = src[i]
                    moved += scan_popcount64(w)
                    dst[i] |= w
                    src[i] = 0
        return moved
    with nogil:
        for i in range(n):
            w = src[i]
            moved += scan_popcount64(w)
            dst[i] |= w
            src[i] = 0
    return moved


def or_new_into(uint64_t[::1] dst not None, const uint64_t[::1] src not None, blocks=None):
    """dst |= src; returns how many bits were clear in dst and set in src (newly set pages).

    The fan-out of a sync into one user's view: the count is what that user has not seen yet.
    blocks: a block summary of src; only its blocks are read (the rest must be zero).
    """
    cdef Py_ssize_t i, n = dst.shape[0], k = -1, blk, end
    cdef uint64_t w, fresh = 0, cur = 0
    cdef const uint64_t[::1] summary
    _check_same_length(dst.shape[0], src.shape[0], "dst and src")
    if blocks is not None:
        summary = blocks
        _check_blocks(n, summary.shape[0])
        if summary.shape[0] == 0:
            return 0
        with nogil:
            while True:
                blk = _next_block(&summary[0], summary.shape[0], &k, &cur)
                if blk < 0 or blk * _BLOCK_WORDS >= n:
                    break
                end = min(n, (blk + 1) * _BLOCK_WORDS)
                for i in range(blk * _BLOCK_WORDS, end):
                    w = src[i] & ~dst[i]
                    fresh += scan_popcount64(w)
                    dst[i] |= w
        return fresh
    with nogil:
        for i in range(n):
            w = src[i] & ~dst[i]
            fresh += scan_popcount64(w)
            dst[i] |= w
    return fresh


def clear_blocks(uint64_t[::1] bitmap not None, const uint64_t[::1] blocks not None):
    """Zero the words of the blocks flagged in the summary `blocks`."""
    cdef Py_ssize_t n = bitmap.shape[0], k = -1, blk
    cdef uint64_t cur = 0
    _check_blocks(n, blocks.shape[0])
    if blocks.shape[0] == 0:
        return
    with nogil:
        while True:
            blk = _next_block(&blocks[0], blocks.shape[0], &k, &cur)
            if blk < 0 or blk * _BLOCK_WORDS >= n:
                break
            memset(&bitmap[blk * _BLOCK_WORDS], 0,
                   (min(n, (blk + 1) * _BLOCK_WORDS) - blk * _BLOCK_WORDS) * 8)


def block_summary_words(Py_ssize_t nwords):
    """Words of a block summary for a bitmap of nwords words."""
    return _summary_words(nwords)


def and_not(uint64_t[::1] dst not None, const uint64_t[::1] src not None,
            const uint64_t[::1] mask not None):
    """dst = src & ~mask, word by word; dst may be src or mask (each word is read first).

    Takes bits out of a set: what KVM reported minus what every user has already been told,
    or the pages still waiting to be re-armed minus the ones just re-armed.
    """
    cdef Py_ssize_t i
    _check_same_length(dst.shape[0], src.shape[0], "dst and src")
    _check_same_length(dst.shape[0], mask.shape[0], "dst and mask")
    with nogil:
        for i in range(dst.shape[0]):
            dst[i] = src[i] & ~mask[i]


# --------------------------------------------------------------------------------------------
# 4. Zero pages
# --------------------------------------------------------------------------------------------

cdef inline bint _page_is_zero(const uint8_t *page) noexcept nogil:
    """OR the page's words together in 512-byte chunks and stop at the first non-zero chunk.

    The first word is tested alone because a page that holds data almost always shows it
    there; all-zero pages must be read to the end, at memory bandwidth. Within a chunk there is
    no branch, so the compiler vectorises the OR. Measured here against a per-cache-line early
    exit and against memcmp with a static zero page: all three run at memory speed on zeros;
    this one was at or near the top in every run (docs/scan.md).
    """
    cdef int chunk, j
    cdef uint64_t acc
    if scan_load64(page) != 0:
        return False
    for chunk in range(0, _PAGE_SIZE, 512):
        acc = 0
        for j in range(0, 512, 8):
            acc |= scan_load64(page + chunk + j)
        if acc != 0:
            return False
    return True


def zero_pages(const uint8_t[::1] mem not None, const uint64_t[::1] pages not None,
               uint8_t[::1] out not None):
    """out[k] = 1 if page pages[k] of mem is all zero bytes, else 0; returns the zero count."""
    cdef Py_ssize_t k, n = pages.shape[0]
    cdef uint64_t zeros = 0
    cdef const uint8_t *base = &mem[0]
    cdef uint8_t z
    _check_pages_below(pages, _mem_pages(mem), "mem")
    if out.shape[0] < n:
        raise ValueError(f"out has {out.shape[0]} bytes but there are {n} pages")
    with nogil:
        for k in range(n):
            z = _page_is_zero(base + (pages[k] << _PAGE_SHIFT))
            out[k] = z
            zeros += z
    return zeros


def is_zero_page(const uint8_t[::1] mem not None, page):
    """True if page number `page` of mem is all zero bytes."""
    cdef uint64_t p = _as_index(page, "page", _mem_pages(mem))
    cdef bint z
    with nogil:
        z = _page_is_zero(&mem[0] + (p << _PAGE_SHIFT))
    return z


# --------------------------------------------------------------------------------------------
# 5. Page hashes: xxHash64 (seed 0) of each 4 KiB page
# --------------------------------------------------------------------------------------------
# xxHash64 is a published, well-tested 64-bit hash (https://github.com/Cyan4973/xxHash): two
# different pages collide with probability about 2**-64, results are the same in every process
# and on every machine, and they equal xxhash.xxh64(page_bytes, seed=0).intdigest(). Four
# independent accumulators let the CPU overlap their multiplications. A page is 4096 bytes =
# 128 stripes of 32 bytes, so xxHash64's tail handling for odd lengths never runs here.

cdef inline uint64_t _rotl64(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _xxh_round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc += lane * SCAN_XXH_P2
    acc = _rotl64(acc, 31)
    return acc * SCAN_XXH_P1


cdef inline uint64_t _xxh_merge(uint64_t h, uint64_t acc) noexcept nogil:
    h ^= _xxh_round(0, acc)
    return h * SCAN_XXH_P1 + SCAN_XXH_P4


cdef inline uint64_t _xxh64_page(const uint8_t *p) noexcept nogil:
    cdef uint64_t v1 = SCAN_XXH_P1 + SCAN_XXH_P2   # the seed (0) is added to all four
    cdef uint64_t v2 = SCAN_XXH_P2
    cdef uint64_t v3 = 0
    cdef uint64_t v4 = (<uint64_t>0) - SCAN_XXH_P1
    cdef uint64_t h
    cdef int i
    for i in range(0, _PAGE_SIZE, 32):
        v1 = _xxh_round(v1, scan_load64(p + i))
        v2 = _xxh_round(v2, scan_load64(p + i + 8))
        v3 = _xxh_round(v3, scan_load64(p + i + 16))
        v4 = _xxh_round(v4, scan_load64(p + i + 24))
    h = _rotl64(v1, 1) + _rotl64(v2, 7) + _rotl64(v3, 12) + _rotl64(v4, 18)
    h = _xxh_merge(h, v1)
    h = _xxh_merge(h, v2)
    h = _xxh_merge(h, v3)
    h = _xxh_merge(h, v4)
    h += _PAGE_SIZE                                   # the input length
    # Final avalanche: every input bit affects every output bit.
    h ^= h >> 33
    h *= SCAN_XXH_P2
    h ^= h >> 29
    h *= SCAN_XXH_P3
    h ^= h >> 32
    return h


def page_hashes(const uint8_t[::1] mem not None, const uint64_t[::1] pages not None,
                uint64_t[::1] out not None):
    """out[k] = xxHash64 (seed 0) of page pages[k] of mem."""
    cdef Py_ssize_t k, n = pages.shape[0]
    cdef const uint8_t *base = &mem[0]
    _check_pages_below(pages, _mem_pages(mem), "mem")
    if out.shape[0] < n:
        raise ValueError(f"out has room for {out.shape[0]} hashes but there are {n} pages")
    with nogil:
        for k in range(n):
            out[k] = _xxh64_page(base + (pages[k] << _PAGE_SHIFT))


# --------------------------------------------------------------------------------------------
# 6. Dirty-ring harvest
# --------------------------------------------------------------------------------------------

def harvest_ring(ring, nentries, fetch_index, bitmaps,
                 const uint64_t[::1] slot_pages not None, uint64_t[::1] newly_set=None,
                 blocks=None):
    """Harvest one vCPU's KVM dirty ring into per-slot dirty bitmaps.

    ring:        writable buffer (the vCPU fd's ring mmap) of nentries 16-byte kvm_dirty_gfn.
    nentries:    ring size in entries, a power of two.
    fetch_index: this vCPU's free-running harvest counter (entry = fetch_index % nentries).
    bitmaps:     sequence indexed by slot id of C-contiguous uint64 bitmaps (None: no slot).
    slot_pages:  slot_pages[s] = pages in slot s; same length as bitmaps.

    Returns (new_fetch_index, harvested, invalid): `harvested` entries were consumed and marked
    RESET; `invalid` of them named an unknown slot or an offset past the slot's end and set no
    bit. At most nentries entries are taken per call. The caller then issues
    KVM_RESET_DIRTY_RINGS so the kernel re-protects those pages and can reuse the entries.
    newly_set: optional 1-element array; the number of bits this call set that were clear
    before (distinct newly dirty pages) is added to newly_set[0].
    blocks: optional sequence, like bitmaps, of block summaries (see take_and_clear): each
    page recorded also flags its block, so later passes touch only those blocks.
    """
    cdef Py_ssize_t nslots, s
    cdef uint8_t[::1] ring_view
    cdef uint64_t[::1] bm_view
    cdef uint64_t n, mask, fetch, harvested = 0, invalid = 0, offset, fresh = 0, bit
    cdef uint64_t *word
    cdef uint32_t flags, slot_id
    cdef kvm_dirty_gfn *entries
    cdef kvm_dirty_gfn *e
    cdef uint64_t **bm_ptrs = NULL
    cdef uint64_t **sum_ptrs = NULL
    cdef uint64_t *bm_limits = NULL
    cdef uint64_t[::1] sum_view

    # ---- validation and pointer collection, with the GIL ----
    n = _as_index(nentries, "nentries", 1 << 32)
    if n == 0 or (n & (n - 1)) != 0:
        raise ValueError(f"nentries = {n} is not a power of two")
    fetch = _as_index(fetch_index, "fetch_index", 1 << 64)
    try:
        ring_view = memoryview(ring).cast("B")
    except (TypeError, BufferError) as exc:
        raise ValueError(f"ring must be a writable C-contiguous buffer: {exc}") from None
    if <uint64_t>ring_view.shape[0] < n * sizeof(kvm_dirty_gfn):
        raise ValueError(
            f"ring has {ring_view.shape[0]} bytes, less than nentries = {n} x 16"
        )
    if (<uintptr_t>&ring_view[0]) % 8 != 0:
        raise ValueError("ring buffer is not 8-byte aligned (an mmap or numpy array always is)")
    entries = <kvm_dirty_gfn *>&ring_view[0]

    nslots = len(bitmaps)
    if slot_pages.shape[0] != nslots:
        raise ValueError(
            f"slot_pages has {slot_pages.shape[0]} entries but bitmaps has {nslots}"
        )
    # The views stay referenced by `keep` so their buffers cannot go away under the nogil loop.
    keep = []
    if blocks is not None and len(blocks) != nslots:
        raise ValueError(f"blocks has {len(blocks)} entries but bitmaps has {nslots}")
    bm_ptrs = <uint64_t **>malloc((nslots + 1) * sizeof(uint64_t *))
    sum_ptrs = <uint64_t **>malloc((nslots + 1) * sizeof(uint64_t *))
    bm_limits = <uint64_t *>malloc((nslots + 1) * sizeof(uint64_t))
    if bm_ptrs == NULL or bm_limits == NULL or sum_ptrs == NULL:
        free(bm_ptrs)
        free(sum_ptrs)
        free(bm_limits)
        raise MemoryError("harvest_ring: cannot allocate the slot table")
    try:
        for s in range(nslots):
            bm = bitmaps[s]
            bm_ptrs[s] = NULL
            sum_ptrs[s] = NULL
            bm_limits[s] = 0          # limit 0: every offset in this slot counts as invalid
            if bm is None:
                continue
            bm_view = bm
            if slot_pages[s] > <uint64_t>bm_view.shape[0] * 64:
                raise ValueError(
                    f"slot_pages[{s}] = {slot_pages[s]} but bitmaps[{s}] holds only "
                    f"{bm_view.shape[0] * 64} bits"
                )
            keep.append(bm_view)
            if bm_view.shape[0] > 0:
                bm_ptrs[s] = &bm_view[0]
                bm_limits[s] = slot_pages[s]
            if blocks is not None and blocks[s] is not None and bm_view.shape[0] > 0:
                sum_view = blocks[s]
                _check_blocks(bm_view.shape[0], sum_view.shape[0])
                keep.append(sum_view)
                sum_ptrs[s] = &sum_view[0]

        # ---- the harvest itself, without the GIL ----
        mask = n - 1
        with nogil:
            # Stop after one lap: a sane kernel never has more than nentries unharvested
            # entries, and the bound keeps a misbehaving one from holding us here forever.
            while harvested < n:
                e = &entries[fetch & mask]
                # Acquire: the kernel writes slot and offset first and then publishes the entry
                # by setting flags (with a write barrier). Our acquire load pairs with that, so
                # the slot/offset reads below cannot see values older than the flags we saw.
                # (On x86 this is a plain load; the ordering matters to the compiler and to
                # weakly ordered CPUs, which is what KVM_CAP_DIRTY_LOG_RING_ACQ_REL is about.)
                flags = scan_load_acquire_u32(&e.flags)
                # Test bit 0, as the kernel documentation says (QEMU tests flags == DIRTY).
                # The two differ only for a corrupt flags value, where harvesting again (one
                # extra page sent) is harmless and stopping (a ring that never drains) is not.
                if (flags & _GFN_F_DIRTY) == 0:
                    break
                slot_id = e.slot & 0xffff          # low 16 bits: slot id; high: address space
                offset = e.offset
                if slot_id < <uint32_t>nslots and offset < bm_limits[slot_id]:
                    word = &bm_ptrs[slot_id][offset >> 6]
                    bit = (<uint64_t>1) << (offset & 63)
                    if word[0] & bit == 0:
                        fresh += 1
                    word[0] |= bit
                    if sum_ptrs[slot_id] != NULL:
                        sum_ptrs[slot_id][offset >> 18] |= (<uint64_t>1) << ((offset >> 12) & 63)
                else:
                    invalid += 1
                # Release: pairs with the kernel's acquire load of flags in
                # KVM_RESET_DIRTY_RINGS, so our reads of slot/offset are complete before the
                # kernel can see RESET and recycle the entry.
                scan_store_release_u32(&e.flags, _GFN_F_RESET)
                fetch += 1
                harvested += 1
    finally:
        free(bm_ptrs)
        free(sum_ptrs)
        free(bm_limits)
    if newly_set is not None and newly_set.shape[0] > 0:
        newly_set[0] += fresh
    return fetch, harvested, invalid


# --------------------------------------------------------------------------------------------
# 7-8. Send buffers and iovecs
# --------------------------------------------------------------------------------------------

def gather_pages(const uint8_t[::1] mem not None, const uint64_t[::1] pages not None,
                 uint8_t[::1] out not None):
    """Copy the listed pages of mem back to back into out; returns the bytes written."""
    cdef Py_ssize_t k, n = pages.shape[0]
    cdef const uint8_t *src = &mem[0]
    cdef uint8_t *dst = &out[0]
    _check_pages_below(pages, _mem_pages(mem), "mem")
    if <uint64_t>out.shape[0] < <uint64_t>n * _PAGE_SIZE:
        raise ValueError(f"out has {out.shape[0]} bytes but {n} pages need {n * _PAGE_SIZE}")
    with nogil:
        for k in range(n):
            memcpy(dst + k * _PAGE_SIZE, src + (pages[k] << _PAGE_SHIFT), _PAGE_SIZE)
    return n * _PAGE_SIZE


def pages_to_runs(const uint64_t[::1] pages not None, uint64_t[::1] starts not None,
                  uint64_t[::1] lengths not None):
    """Coalesce strictly ascending page numbers into runs of consecutive pages.

    Writes run r as (starts[r], lengths[r]) in pages and returns the run count; e.g. pages
    [3, 4, 5, 9] give starts [3, 9], lengths [3, 1]. One run = one iovec.
    """
    cdef Py_ssize_t i, r, n = pages.shape[0], bad = -1, nruns = 0
    # Pass 1: check the order and count the runs, so the caller's arrays can be checked.
    with nogil:
        if n > 0:
            nruns = 1
        for i in range(1, n):
            if pages[i] <= pages[i - 1]:
                bad = i
                break
            if pages[i] != pages[i - 1] + 1:
                nruns += 1
    if bad >= 0:
        raise ValueError(
            f"pages are not strictly ascending: pages[{bad}] = {pages[bad]} "
            f"after pages[{bad - 1}] = {pages[bad - 1]}"
        )
    if starts.shape[0] < nruns or lengths.shape[0] < nruns:
        raise ValueError(
            f"starts/lengths have room for {min(starts.shape[0], lengths.shape[0])} runs "
            f"but the pages form {nruns}"
        )
    # Pass 2: fill.
    with nogil:
        r = -1
        for i in range(n):
            if i == 0 or pages[i] != pages[i - 1] + 1:
                r += 1
                starts[r] = pages[i]
                lengths[r] = 1
            else:
                lengths[r] += 1
    return nruns


# --------------------------------------------------------------------------------------------
# 9. xxHash64 of any bytes, fed in pieces (the migration stream's record checksums)
# --------------------------------------------------------------------------------------------
# The same hash as section 5, for inputs of any length and any seed, computed over the
# concatenation of the buffers given to update() one after another: a record's header, its
# small fixed part and the guest pages it carries are hashed where they lie, never copied
# together. The result equals xxhash.xxh64(b"".join(pieces), seed=seed).intdigest(). The
# stripe loop is section 5's; what is new is the carry of a partial 32-byte stripe between
# pieces and the tail of the published algorithm (8-, 4- and 1-byte steps).

cdef extern from *:
    """
    static const uint64_t SCAN_XXH_P5 = 0x27D4EB2F165667C5ULL;
    static inline uint32_t scan_load32(const uint8_t *p) { uint32_t w; memcpy(&w, p, 4); return w; }
    """
    const uint64_t SCAN_XXH_P5
    uint32_t scan_load32(const uint8_t *p) nogil


cdef class Xxh64:
    """Streaming xxHash64: Xxh64(seed).update(a).update(b).intdigest() == xxh64(a + b, seed).

    update() takes any C-contiguous bytes-like object (bytes, bytearray, a memoryview of guest
    RAM) and hashes it in place with the GIL released."""

    cdef uint64_t v1, v2, v3, v4, seed, total
    cdef uint8_t carry[32]
    cdef Py_ssize_t ncarry

    def __cinit__(self, uint64_t seed=0):
        self.seed = seed
        self.v1 = seed + SCAN_XXH_P1 + SCAN_XXH_P2
        self.v2 = seed + SCAN_XXH_P2
        self.v3 = seed
        self.v4 = seed - SCAN_XXH_P1
        self.total = 0
        self.ncarry = 0

    cdef inline void _stripes(self, const uint8_t *p, Py_ssize_t n) noexcept nogil:
        """Consume n bytes (a multiple of 32) as stripes."""
        cdef uint64_t v1 = self.v1, v2 = self.v2, v3 = self.v3, v4 = self.v4
        cdef Py_ssize_t i
        for i in range(0, n, 32):
            v1 = _xxh_round(v1, scan_load64(p + i))
            v2 = _xxh_round(v2, scan_load64(p + i + 8))
            v3 = _xxh_round(v3, scan_load64(p + i + 16))
            v4 = _xxh_round(v4, scan_load64(p + i + 24))
        self.v1, self.v2, self.v3, self.v4 = v1, v2, v3, v4

    def update(self, const uint8_t[::1] data not None):
        """Hash data after everything given so far; returns self."""
        cdef Py_ssize_t n = data.shape[0], take, whole
        cdef const uint8_t *p
        if n == 0:
            return self
        p = &data[0]
        with nogil:
            self.total += <uint64_t>n
            if self.ncarry:
                take = min(32 - self.ncarry, n)
                memcpy(self.carry + self.ncarry, p, take)
                self.ncarry += take
                p += take
                n -= take
                if self.ncarry == 32:
                    self._stripes(self.carry, 32)
                    self.ncarry = 0
            if n:
                whole = n & ~(<Py_ssize_t>31)
                self._stripes(p, whole)
                memcpy(self.carry, p + whole, n - whole)
                self.ncarry = n - whole
        return self

    def intdigest(self):
        """The hash of everything given so far (the state is not changed)."""
        cdef uint64_t h
        cdef const uint8_t *p = self.carry
        cdef Py_ssize_t left = self.ncarry
        if self.total >= 32:
            h = (_rotl64(self.v1, 1) + _rotl64(self.v2, 7) + _rotl64(self.v3, 12)
                 + _rotl64(self.v4, 18))
            h = _xxh_merge(h, self.v1)
            h = _xxh_merge(h, self.v2)
            h = _xxh_merge(h, self.v3)
            h = _xxh_merge(h, self.v4)
        else:
            h = self.seed + SCAN_XXH_P5
        h += self.total
        while left >= 8:
            h ^= _xxh_round(0, scan_load64(p))
            h = _rotl64(h, 27) * SCAN_XXH_P1 + SCAN_XXH_P4
            p += 8
            left -= 8
        if left >= 4:
            h ^= <uint64_t>scan_load32(p) * SCAN_XXH_P1
            h = _rotl64(h, 23) * SCAN_XXH_P2 + SCAN_XXH_P3
            p += 4
            left -= 4
        while left > 0:
            h ^= p[0] * SCAN_XXH_P5
            h = _rotl64(h, 11) * SCAN_XXH_P1
            p += 1
            left -= 1
        h ^= h >> 33
        h *= SCAN_XXH_P2
        h ^= h >> 29
        h *= SCAN_XXH_P3
        h ^= h >> 32
        return h


# --------------------------------------------------------------------------------------------
# 10. The walk: a bitmap window into a range table (docs/scan.md, "The walk")
# --------------------------------------------------------------------------------------------
# One pass over a window of the migration's bitmap does what the send path needs: take the
# dirty bits (clear them), coalesce consecutive pages into runs, test each page for zeros,
# and split the runs where the kind changes, so that every run is either a zero run (one
# ZERO_RUN record) or a data run (one RAM_RUN record, whose pages are one iovec of guest
# RAM for sendmsg). The result is a range table (first page, page count, zero flag per run)
# in the manner of Cloud Hypervisor's MemoryRangeTable, never a per-page list.
#
# Pages in a 2 MiB chunk the kernel never populated (GuestMemory.populated_chunks) are zero
# without being read: a chunk mask of 0 makes the walk emit them as zero pages untouched.

CHUNK_PAGES = 512  # 2 MiB: the granularity of the populated mask (8 bitmap words)

cdef enum:
    _CHUNK_SHIFT = 9
    _CHUNK_WORD_SHIFT = 3   # 8 words per chunk

cdef extern from *:
    """
    static const uint64_t SCAN_ALL_ONES = 0xFFFFFFFFFFFFFFFFULL;
    static inline int scan_clz64(uint64_t w) { return __builtin_clzll(w); }
    """
    const uint64_t SCAN_ALL_ONES
    int scan_clz64(uint64_t w) nogil


cdef struct _Runs:
    uint64_t *first
    uint64_t *npages
    uint8_t *zero
    Py_ssize_t count
    uint64_t max_run    # data runs are split at this many pages (zero runs are not)


cdef inline void _append(_Runs *r, uint64_t page, uint64_t n, uint8_t zero) noexcept nogil:
    """Add pages [page, page + n) of one kind; the caller guarantees room for n new runs."""
    cdef Py_ssize_t last = r.count - 1
    cdef uint64_t room
    if last >= 0 and r.zero[last] == zero and r.first[last] + r.npages[last] == page:
        if zero:
            r.npages[last] += n
            return
        room = r.max_run - r.npages[last]
        if room >= n:
            r.npages[last] += n
            return
        r.npages[last] += room
        page += room
        n -= room
    while n:  # new runs, each at most max_run pages if data
        r.first[r.count] = page
        if zero or n <= r.max_run:
            r.npages[r.count] = n
            r.zero[r.count] = zero
            r.count += 1
            return
        r.npages[r.count] = r.max_run
        r.zero[r.count] = zero
        r.count += 1
        page += r.max_run
        n -= r.max_run


cdef inline Py_ssize_t _next_set_word(const uint64_t *words, Py_ssize_t pos,
                                      Py_ssize_t end) noexcept nogil:
    """The first word in [pos, end) that is not zero, else end. Four words per test: the
    common case (a clean stretch) costs one well-predicted branch per 32 bytes."""
    while pos + 4 <= end and (words[pos] | words[pos + 1] | words[pos + 2] | words[pos + 3]) == 0:
        pos += 4
    while pos < end and words[pos] == 0:
        pos += 1
    return pos


cdef int _check_window(Py_ssize_t nwords, Py_ssize_t start, Py_ssize_t stop) except -1:
    if not 0 <= start <= stop <= nwords:
        raise ValueError(f"word window [{start}, {stop}) is outside the bitmap ({nwords} words)")
    return 0


cdef int _check_populated(Py_ssize_t pop_len, Py_ssize_t first_chunk, Py_ssize_t start_word,
                          Py_ssize_t stop_word) except -1:
    """The populated mask (chunks [first_chunk, first_chunk + pop_len)) must cover the
    chunks of words [start_word, stop_word)."""
    if start_word < stop_word and (
        first_chunk < 0
        or first_chunk > (start_word >> _CHUNK_WORD_SHIFT)
        or first_chunk + pop_len < ((stop_word + 7) >> _CHUNK_WORD_SHIFT)
    ):
        raise ValueError(
            f"populated covers chunks [{first_chunk}, {first_chunk + pop_len}) but words "
            f"[{start_word}, {stop_word}) need chunks [{start_word >> 3}, {(stop_word + 7) >> 3})"
        )
    return 0


def dirty_window(const uint64_t[::1] bitmap not None, Py_ssize_t from_word, Py_ssize_t limit_word,
                 uint64_t max_pages, populated=None, Py_ssize_t populated_first_chunk=0):
    """Where the next take should go: (start, stop, pages).

    start: the first word in [from_word, limit_word) with a set bit (limit_word if none).
    stop: the word after the one at which the set bits counted from start reach max_pages,
    or limit_word. pages: the bits counted in [start, stop). populated (optional, as in
    walk_runs): bits in never-populated chunks are not counted, as walk_runs does not
    count them against its max_pages. The caller re-arms dirty tracking for exactly those
    pages before walk_runs reads them (get, clear, copy)."""
    cdef Py_ssize_t start, stop, pop_len = 0
    cdef uint64_t pages = 0
    cdef const uint64_t *words = &bitmap[0] if bitmap.shape[0] else NULL
    cdef const uint8_t[::1] pop_view
    cdef const uint8_t *pop = NULL
    _check_window(bitmap.shape[0], from_word, limit_word)
    if populated is not None:
        pop_view = populated
        pop_len = pop_view.shape[0]
        _check_populated(pop_len, populated_first_chunk, from_word, limit_word)
        if pop_len:
            pop = &pop_view[0]
    with nogil:
        start = _next_set_word(words, from_word, limit_word) if words != NULL else limit_word
        stop = start
        while stop < limit_word and pages < max_pages:
            if pop == NULL or pop[(stop >> _CHUNK_WORD_SHIFT) - populated_first_chunk] != 0:
                pages += scan_popcount64(words[stop])
            stop += 1
    return start, stop, pages


def walk_runs(uint64_t[::1] bitmap not None, Py_ssize_t start_word, Py_ssize_t stop_word,
              mem, populated, Py_ssize_t populated_first_chunk, uint64_t max_pages,
              uint64_t max_run_pages, uint64_t[::1] run_first not None,
              uint64_t[::1] run_pages not None, uint8_t[::1] run_zero not None):
    """Take the dirty pages of bitmap words [start_word, stop_word) into a range table.

    Clears every word it takes (the caller holds the lock other writers of the bitmap take).
    mem: the slot's guest memory (any C-contiguous byte buffer), whose pages are tested for
    zeros; None: no test, every page is data (a bitmap-only walk). populated: None, or one
    byte per 2 MiB chunk of the slot starting at chunk populated_first_chunk, 0 for a chunk
    the kernel never populated: its pages are zero pages and are not read.
    Writes runs r = 0 .. nruns - 1 as (run_first[r], run_pages[r], run_zero[r]); data runs
    are at most max_run_pages long. Stops at stop_word, before a word once max_pages pages
    are taken (pages of never-populated chunks do not count: they cost nothing to read or
    send), or before a word whose pages might not fit in the run arrays.

    Returns (nruns, next_word, pages, zero_pages, read_pages): next_word is where the next
    walk should resume (the words before it are taken); read_pages counts pages whose
    memory was read by the zero test.
    """
    cdef Py_ssize_t nwords = bitmap.shape[0], pos, cap, pop_len = 0
    cdef uint64_t *words
    cdef uint64_t w, rest, span, page, end, taken = 0, zeros = 0, reads = 0, used = 0
    cdef uint64_t mem_pages = 0, bad_page = 0, chunk, p
    cdef bint has_mem = mem is not None
    cdef const uint8_t[::1] mem_view
    cdef const uint8_t[::1] pop_view
    cdef const uint8_t *base = NULL
    cdef const uint8_t *pop = NULL
    cdef int b, bad = 0
    cdef uint8_t z
    cdef _Runs runs

    _check_window(nwords, start_word, stop_word)
    if max_run_pages == 0:
        raise ValueError("max_run_pages must be at least 1")
    cap = min(run_first.shape[0], run_pages.shape[0], run_zero.shape[0])
    if mem is not None:
        mem_view = mem
        mem_pages = _mem_pages(mem_view)
        if mem_pages:
            base = &mem_view[0]
    if populated is not None:
        pop_view = populated
        pop_len = pop_view.shape[0]
        _check_populated(pop_len, populated_first_chunk, start_word, stop_word)
        if pop_len:
            pop = &pop_view[0]
    if cap == 0 or start_word == stop_word:
        return 0, start_word, 0, 0, 0
    words = &bitmap[0]
    runs.first = &run_first[0]
    runs.npages = &run_pages[0]
    runs.zero = &run_zero[0]
    runs.count = 0
    runs.max_run = max_run_pages

    with nogil:
        pos = start_word
        while pos < stop_word:
            pos = _next_set_word(words, pos, stop_word)
            if pos >= stop_word:
                break
            w = words[pos]
            if used >= max_pages or runs.count + scan_popcount64(w) > cap:
                break
            # A word never straddles a chunk (a chunk is 8 whole words).
            chunk = (<uint64_t>pos) >> _CHUNK_WORD_SHIFT
            z = pop != NULL and pop[chunk - populated_first_chunk] == 0
            if not z:
                used += scan_popcount64(w)  # never-populated pages cost nothing to send
            if has_mem and not z:
                # Every set bit must name a page inside mem (a slot's last word may be partial).
                end = ((<uint64_t>pos) << 6) + 63 - <uint64_t>scan_clz64(w)  # highest page
                if end >= mem_pages:
                    bad = 1
                    bad_page = end
                    break
            taken += scan_popcount64(w)
            words[pos] = 0
            page = (<uint64_t>pos) << 6
            while w != 0:
                b = scan_ctz64(w)
                rest = w >> b
                # Length of the run of set bits that starts at bit b.
                span = 64 - b if rest == (SCAN_ALL_ONES >> b) else <uint64_t>scan_ctz64(~rest)
                if span == 64:
                    w = 0
                else:
                    w &= ~(((<uint64_t>1 << span) - 1) << b)
                if z:
                    _append(&runs, page + b, span, 1)
                    zeros += span
                elif not has_mem:
                    _append(&runs, page + b, span, 0)
                else:
                    for p in range(page + b, page + b + span):
                        if _page_is_zero(base + (p << _PAGE_SHIFT)):
                            _append(&runs, p, 1, 1)
                            zeros += 1
                        else:
                            _append(&runs, p, 1, 0)
                    reads += span
            pos += 1
    if bad:
        raise ValueError(f"bitmap bit for page {bad_page} is outside mem ({mem_pages} pages)")
    return runs.count, pos, taken, zeros, reads


def zero_range(uint8_t[::1] mem not None, uint64_t first, uint64_t npages, populated,
               Py_ssize_t populated_first_chunk):
    """Make pages [first, first + npages) of mem zero, touching as little as possible.

    The destination's ZERO_RUN: pages in chunks the kernel never populated (populated mask
    0, same convention as walk_runs) are zero already and are neither read nor written; the
    others are tested and only those that are not zero are written. Returns (read_pages,
    written_pages)."""
    cdef uint64_t mem_pages = _mem_pages(mem), p, end, reads = 0, writes = 0, chunk
    cdef const uint8_t[::1] pop_view
    cdef const uint8_t *pop = NULL
    cdef Py_ssize_t pop_len = 0
    cdef uint8_t *base
    if npages > mem_pages or first > mem_pages - npages:
        raise ValueError(f"pages {first}+{npages} are outside mem ({mem_pages} pages)")
    if npages == 0:
        return 0, 0
    if populated is not None:
        pop_view = populated
        pop_len = pop_view.shape[0]
        if (populated_first_chunk < 0 or <uint64_t>populated_first_chunk > first >> _CHUNK_SHIFT
                or <uint64_t>(populated_first_chunk + pop_len)
                < ((first + npages + 511) >> _CHUNK_SHIFT)):
            raise ValueError(
                f"populated covers chunks [{populated_first_chunk}, "
                f"{populated_first_chunk + pop_len}) but pages {first}+{npages} need more"
            )
        pop = &pop_view[0]
    base = &mem[0]
    with nogil:
        p = first
        end = first + npages
        while p < end:
            chunk = p >> _CHUNK_SHIFT
            if pop != NULL and pop[chunk - populated_first_chunk] == 0:
                p = min(end, (chunk + 1) << _CHUNK_SHIFT)  # never populated: zero already
                continue
            reads += 1
            if not _page_is_zero(base + (p << _PAGE_SHIFT)):
                memset(base + (p << _PAGE_SHIFT), 0, _PAGE_SIZE)
                writes += 1
            p += 1
    return reads, writes


def take_new(uint64_t[::1] bitmap not None, const uint64_t[::1] old not None,
             uint64_t[::1] held not None):
    """held |= bitmap & ~old, then bitmap = old; returns how many bits moved to held.

    A background sync: what the sync added to the bitmap (everything not in the copy `old`
    taken just before it) is held back until the next ordinary sync."""
    cdef Py_ssize_t i
    cdef uint64_t w, moved = 0
    _check_same_length(bitmap.shape[0], old.shape[0], "bitmap and old")
    _check_same_length(bitmap.shape[0], held.shape[0], "bitmap and held")
    with nogil:
        for i in range(bitmap.shape[0]):
            w = bitmap[i] & ~old[i]
            moved += scan_popcount64(w)
            held[i] |= w
            bitmap[i] = old[i]
    return moved


# --------------------------------------------------------------------------------------------
# 11. The dirty rings a QEMU would have (pyvmm/dirty/ring_model.py)
# --------------------------------------------------------------------------------------------

from libc.stdint cimport int64_t


def ring_entry_pages(ring, nentries, first_fetch, count,
                     const uint64_t[::1] slot_first_page not None,
                     const uint64_t[::1] slot_pages not None, uint64_t[::1] out not None):
    """The pages named by the ring entries [first_fetch, first_fetch + count), in ring order.

    For entries harvest_ring has just taken: their slot and offset stay valid until
    KVM_RESET_DIRTY_RINGS. A page is numbered slot_first_page[slot] + offset (one flat
    numbering of every slot); an entry naming an unknown slot or an offset past the slot's
    end is skipped. Writes out[0:k] and returns k (out must hold count). The flags are not
    read or written.
    """
    cdef uint8_t[::1] ring_view
    cdef uint64_t n, mask, fetch, k, got = 0, offset
    cdef uint32_t slot_id
    cdef Py_ssize_t nslots = slot_pages.shape[0]
    cdef const kvm_dirty_gfn *entries
    cdef const kvm_dirty_gfn *e
    n = _as_index(nentries, "nentries", 1 << 32)
    if n == 0 or (n & (n - 1)) != 0:
        raise ValueError(f"nentries = {n} is not a power of two")
    fetch = _as_index(first_fetch, "first_fetch", 1 << 64)
    k = _as_index(count, "count", n + 1)
    if slot_first_page.shape[0] != nslots:
        raise ValueError(
            f"slot_first_page has {slot_first_page.shape[0]} entries but slot_pages has {nslots}"
        )
    if <uint64_t>out.shape[0] < k:
        raise ValueError(f"out holds {out.shape[0]} pages but count = {k}")
    try:
        ring_view = memoryview(ring).cast("B")
    except (TypeError, BufferError) as exc:
        raise ValueError(f"ring must be a writable C-contiguous buffer: {exc}") from None
    if <uint64_t>ring_view.shape[0] < n * sizeof(kvm_dirty_gfn):
        raise ValueError(f"ring has {ring_view.shape[0]} bytes, less than nentries = {n} x 16")
    entries = <const kvm_dirty_gfn *>&ring_view[0]
    mask = n - 1
    with nogil:
        while k > 0:
            e = &entries[fetch & mask]
            slot_id = e.slot & 0xffff
            offset = e.offset
            if slot_id < <uint32_t>nslots and offset < slot_pages[slot_id]:
                out[got] = slot_first_page[slot_id] + offset
                got += 1
            fetch += 1
            k -= 1
    return got


cdef inline void _model_reap(uint64_t[::1] armed, uint64_t[:, ::1] rings, int64_t[::1] fill,
                             uint64_t[::1] reaped, Py_ssize_t v) noexcept nogil:
    # Reap ring v: its entries count for vCPU v, and their pages are write-protected again.
    cdef int64_t j
    cdef uint64_t p
    for j in range(fill[v]):
        p = rings[v, j]
        armed[p >> 6] &= ~((<uint64_t>1) << (p & 63))
    reaped[v] += <uint64_t>fill[v]
    fill[v] = 0


cdef int _check_model(uint64_t[::1] armed, uint64_t[:, ::1] rings, int64_t[::1] fill,
                      uint64_t[::1] reaped) except -1:
    cdef Py_ssize_t v, nvcpus = rings.shape[0]
    cdef uint64_t limit = <uint64_t>armed.shape[0] * 64
    if fill.shape[0] != nvcpus or reaped.shape[0] != nvcpus:
        raise ValueError(
            f"fill has {fill.shape[0]} and reaped {reaped.shape[0]} entries, rings has {nvcpus} rows"
        )
    for v in range(nvcpus):
        if not 0 <= fill[v] <= rings.shape[1]:
            raise ValueError(f"fill[{v}] = {fill[v]} is outside [0, {rings.shape[1]}]")
        _check_pages_below(rings[v, :fill[v]], limit, "armed")
    return 0


def ring_model_push(const uint64_t[::1] pages not None, uint64_t[::1] armed not None,
                    uint64_t[:, ::1] rings not None, int64_t[::1] fill not None,
                    uint64_t[::1] reaped not None, Py_ssize_t vcpu, Py_ssize_t soft_limit,
                    bint reap_all_on_full):
    """vCPU `vcpu` wrote `pages`, in this order: push an entry for each page that is not
    armed (written since its last reap by any vCPU), as KVM pushes one for the first write
    to a write-protected page. When the ring holds soft_limit entries it is full and is
    reaped: that ring only, or every ring if reap_all_on_full. Reaping ring v adds its
    entries to reaped[v] and disarms their pages. Returns how many times the ring filled.

    armed:  bitmap over the flat page numbering; rings[v, :fill[v]]: ring v's pages.
    """
    cdef Py_ssize_t nvcpus = rings.shape[0], n = pages.shape[0], k, v
    cdef uint64_t p, bit
    cdef uint64_t *word
    cdef Py_ssize_t fulls = 0
    _check_model(armed, rings, fill, reaped)
    if not 0 <= vcpu < nvcpus:
        raise ValueError(f"vcpu = {vcpu} is out of range [0, {nvcpus})")
    if not 0 < soft_limit <= rings.shape[1]:
        raise ValueError(f"soft_limit = {soft_limit} is outside [1, {rings.shape[1]}]")
    if fill[vcpu] >= soft_limit:
        raise ValueError(f"ring {vcpu} holds {fill[vcpu]} entries, at or past soft_limit")
    _check_pages_below(pages, <uint64_t>armed.shape[0] * 64, "armed")
    with nogil:
        for k in range(n):
            p = pages[k]
            word = &armed[p >> 6]
            bit = (<uint64_t>1) << (p & 63)
            if word[0] & bit:
                continue
            word[0] |= bit
            rings[vcpu, fill[vcpu]] = p
            fill[vcpu] += 1
            if fill[vcpu] >= soft_limit:
                fulls += 1
                if reap_all_on_full:
                    for v in range(nvcpus):
                        _model_reap(armed, rings, fill, reaped, v)
                else:
                    _model_reap(armed, rings, fill, reaped, vcpu)
    return fulls


def ring_model_reap(uint64_t[::1] armed not None, uint64_t[:, ::1] rings not None,
                    int64_t[::1] fill not None, uint64_t[::1] reaped not None,
                    Py_ssize_t vcpu):
    """Reap ring `vcpu` (-1: every ring); returns the entries reaped."""
    cdef Py_ssize_t v, nvcpus = rings.shape[0]
    cdef uint64_t before = 0, after = 0
    _check_model(armed, rings, fill, reaped)
    if not -1 <= vcpu < nvcpus:
        raise ValueError(f"vcpu = {vcpu} is out of range [-1, {nvcpus})")
    with nogil:
        for v in range(nvcpus):
            before += reaped[v]
        for v in range(nvcpus):
            if vcpu == -1 or v == vcpu:
                _model_reap(armed, rings, fill, reaped, v)
        for v in range(nvcpus):
            after += reaped[v]
    return after - before

# --------------------------------------------------------------------------------------------
# 12. Heatmaps: a dirty bitmap downsampled to cells of guest RAM
# --------------------------------------------------------------------------------------------

def cell_counts(const uint64_t[::1] bitmap not None, first_page, npages, pages_per_cell,
                uint32_t[::1] out not None):
    """Add each set bit p < npages of `bitmap` to out[(first_page + p) // pages_per_cell].

    One heatmap row (docs/timeline.md): dirty pages per cell of guest RAM, slot after slot
    (a slot's first_page is the number of pages in the slots before it). Returns the bits
    counted. A cell of whole 64-page words, aligned, costs one popcount per word; any other
    cell size costs one step per set bit.
    """
    cdef uint64_t first = _as_index(first_page, "first_page", 1 << 52)
    cdef uint64_t n = _as_index(npages, "npages", <uint64_t>bitmap.shape[0] * 64 + 1)
    cdef uint64_t ppc = _as_index(pages_per_cell, "pages_per_cell", 1 << 40)
    if ppc == 0:
        raise ValueError("pages_per_cell = 0: a cell holds at least one page")
    cdef uint64_t cells_needed = (first + n + ppc - 1) // ppc if n else 0
    if <uint64_t>out.shape[0] < cells_needed:
        raise ValueError(f"out has {out.shape[0]} cells; these pages need {cells_needed}")
    cdef Py_ssize_t w, nwords = <Py_ssize_t>((n + 63) >> 6)
    cdef uint64_t word, page, total = 0
    cdef int bit
    with nogil:
        for w in range(nwords):
            word = bitmap[w]
            if word == 0:
                continue
            page = <uint64_t>w << 6
            if n - page < 64:  # the last, partial word
                word &= ((<uint64_t>1) << (n - page)) - 1
            if ppc % 64 == 0 and first % 64 == 0:
                bit = scan_popcount64(word)
                out[(first + page) // ppc] += bit
                total += bit
                continue
            while word:
                bit = scan_ctz64(word)
                out[(first + page + bit) // ppc] += 1
                total += 1
                word &= word - 1
    return total
