/* The guest program: what runs on every vCPU of a pkfuse VM, at CPL 3, with no kernel.
 *
 * The contract is pkfuse/vmm/abi.py (its docstring orders the stores of the
 * step; abi.h mirrors its constants and structs). Entry: RDI = vCPU index,
 * RSI = CONFIG's gpa, RSP = this vCPU's stack top, 64-bit mode, paging on
 * (identity map), IOPL 3 and a TSS I/O bitmap so that `out` works at CPL 3
 * (under PVM the IOPL reads 0: the bitmap is what lets it through). No IDT: any
 * fault is a triple fault, i.e. the VM shuts down (a guest bug is an exit,
 * never a hang).
 *
 * Every store to shared state (the vCPU state block, the ring, its buffers,
 * the dirty area) goes through a volatile pointer, so the compiler emits
 * each one, in program order; x86 keeps stores in order (TSO), so a kill at
 * any instant leaves RAM in one of the states abi.py lists.
 *
 * A start (at _start) over an existing state is a cold boot; how the guest
 * takes over such a state, in order:
 *   1. CONFIG checked (ERROR_CONFIG, error_value = the offset of the bad
 *      field); a state with a sticky error (ERROR_ROLLBACK, ERROR_TORN, ERROR_LOST)
 *      stops again with it; an old ERROR_CONFIG is cleared;
 *   2. step 4 completed if it was torn (checksum = F(counter + 1) but the
 *      counter not yet stored), ERROR_TORN if the checksum is neither;
 *   3. the ring header initialized if its magic is missing (produced and
 *      consumed 0, every descriptor free, the vCPU's DMA counters zeroed,
 *      the magic last); otherwise a torn post (produced stored, dma_posted
 *      not) or a torn collection (dma_ok/dma_errors counted, dma_completed
 *      or the descriptor's DESC_FREE not stored) is completed;
 *   4. `boots` + 1 unless the state is fresh (never started, no step),
 *      `started` + 1, then OUT PORT_STARTED.
 * A resumed vCPU (registers restored mid-loop) does none of this.
 */
#include "abi.h"

typedef volatile struct vcpu_state vstate;
typedef volatile struct ring_header vring;
typedef volatile struct descriptor vdesc;
typedef volatile uint64_t vq;

void guest_main(uint64_t vcpu, const volatile struct config *cfg) __attribute__((noreturn, used));

/* The entry point, first in the binary (guest.ld puts .text.start first). */
__asm__(".section .text.start, \"ax\", @progbits\n"
        ".globl _start\n"
        "_start:\n"
        "    call guest_main\n"
        "    ud2\n"
        ".previous\n");

static inline void outl(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline vstate *state_of(uint64_t vcpu)
{
    return (vstate *)(uintptr_t)(VCPU_STATE_GPA + vcpu * VCPU_STATE_STRIDE);
}

static inline vring *ring_of(uint64_t vcpu)
{
    return (vring *)(uintptr_t)(RING_GPA + vcpu * RING_STRIDE);
}

static inline vdesc *descriptor_of(vring *ring, uint64_t seq)
{
    return (vdesc *)((uintptr_t)ring + DESCRIPTORS_OFFSET) + seq % RING_ENTRIES;
}

static inline uint64_t buffer_gpa(uint64_t vcpu, uint64_t slot)
{
    return RING_GPA + vcpu * RING_STRIDE + RING_BUFFERS_OFFSET + slot * BUFFER_SIZE;
}

/* F(n) = sum over i = 1..n of (i * K + vcpu), mod 2^64 */
static uint64_t checksum_of(uint64_t n, uint64_t vcpu)
{
    uint64_t triangle = (n % 2 == 0) ? (n / 2) * (n + 1) : n * ((n + 1) / 2);
    return K * triangle + vcpu * n;
}

/* The step's pattern: the qword at gpa in pass/seq g is gpa ^ ((g + 1) * K). */
static inline uint64_t pattern_key(uint64_t generation)
{
    return (generation + 1) * K;
}

/* Stop here: the detail into the state (value first, so a nonzero error always has
 * its value), then PORT_ERROR for ever (the VMM stops the vCPU at the first). */
static void __attribute__((noreturn)) stop(vstate *st, uint32_t code, uint64_t value)
{
    if (st) {
        st->error_value = value;
        st->error = code;
    }
    for (;;)
        outl(PORT_ERROR, code);
}

/* 0 when CONFIG is valid for this vCPU, else 1 + the offset of the first bad field. */
static uint64_t check_config(const volatile struct config *cfg, uint64_t vcpu)
{
#define BAD(field) (offsetof(struct config, field) + 1)
    if (cfg->magic != CONFIG_MAGIC)
        return BAD(magic);
    if (cfg->version != CONFIG_VERSION)
        return BAD(version);
    uint64_t nr = cfg->nr_vcpus;
    if (nr < 1 || nr > MAX_VCPUS || vcpu >= nr)
        return BAD(nr_vcpus);
    uint64_t ram = cfg->ram_size;
    if (ram % RAM_ALIGN || ram < MIN_RAM || ram > (MAX_GIB << 30))
        return BAD(ram_size);
    if (cfg->mode != MODE_RUN && cfg->mode != MODE_FILL)
        return BAD(mode);
    uint64_t dirty = cfg->dirty_gpa;
    if (dirty < DIRTY_GPA || dirty % PAGE_SIZE || dirty > ram)
        return BAD(dirty_gpa);
    if (cfg->dirty_pages > (ram - dirty) / PAGE_SIZE / nr)
        return BAD(dirty_pages);
    if (cfg->ring_entries != RING_ENTRIES)
        return BAD(ring_entries);
    uint64_t len = cfg->dma_length;
    if (len % 8 || len < 8 || len > BUFFER_SIZE)
        return BAD(dma_length);
    return 0;
#undef BAD
}

/* ------------------------------------------------------------------ DMA */

struct dma {
    uint64_t vcpu;
    vstate *st;
    vring *ring;
    uint64_t length; /* bytes per request */
    uint64_t seed;
};

static inline uint64_t dma_key(const struct dma *d, uint64_t seq)
{
    return pattern_key(d->seed + seq);
}

/* The ring at the first start: everything but the magic, then the magic. */
static void ring_init(const struct dma *d)
{
    vring *r = d->ring;
    r->entries = RING_ENTRIES;
    r->vcpu = d->vcpu;
    r->produced = 0;
    r->consumed = 0;
    for (int k = 0; k < 4; k++)
        r->reserved[k] = 0;
    vq *desc = (vq *)((uintptr_t)r + DESCRIPTORS_OFFSET);
    for (uint64_t i = 0; i < RING_ENTRIES * sizeof(struct descriptor) / 8; i++)
        desc[i] = 0;
    d->st->dma_posted = 0;
    d->st->dma_completed = 0;
    d->st->dma_ok = 0;
    d->st->dma_errors = 0;
    r->magic = RING_MAGIC;
}

/* A cold boot: complete what a kill cut between the stores of a post or a collection. */
static void ring_recover(const struct dma *d)
{
    vstate *st = d->st;
    vring *r = d->ring;
    if (st->dma_posted + 1 == r->produced)
        st->dma_posted = r->produced;
    uint64_t c = st->dma_completed;
    if (st->dma_ok + st->dma_errors == c + 1)
        st->dma_completed = ++c;
    if (c > 0) {
        vdesc *last = descriptor_of(r, c - 1);
        if (last->seq == c - 1 && (last->status == DESC_DONE || last->status == DESC_FAULT))
            last->status = DESC_FREE;
    }
}

/* Is the completed descriptor what the device must have done? */
static int dma_check(const struct dma *d, vdesc *desc, uint64_t seq)
{
    uint64_t gpa = buffer_gpa(d->vcpu, seq % RING_ENTRIES);
    if (desc->seq != seq || desc->status != DESC_DONE || desc->buffer_gpa != gpa || desc->length != d->length)
        return 0;
    uint32_t op = desc->op;
    if (op != DMA_WRITE && op != DMA_READ)
        return 0;
    uint64_t key = dma_key(d, seq), sum = 0, ok = 1;
    vq *buf = (vq *)(uintptr_t)gpa;
    for (uint64_t i = 0; i < d->length / 8; i++) {
        uint64_t want = (gpa + 8 * i) ^ key;
        sum += want;
        if (op == DMA_WRITE && buf[i] != want)
            ok = 0;
    }
    return ok && desc->result == sum;
}

/* Collect the completed descriptors in order: count, advance, free. */
static void dma_collect(const struct dma *d)
{
    vstate *st = d->st;
    vring *r = d->ring;
    for (int n = 0; n < (int)RING_ENTRIES; n++) {
        uint64_t c = st->dma_completed;
        uint64_t consumed = r->consumed;
        if (c >= consumed || c >= r->produced)
            return;
        vdesc *desc = descriptor_of(r, c);
        if (dma_check(d, desc, c))
            st->dma_ok = st->dma_ok + 1;
        else
            st->dma_errors = st->dma_errors + 1;
        st->dma_completed = c + 1;
        desc->status = DESC_FREE;
    }
}

/* Post one descriptor if a slot is free (never waits: nobody may serve the ring). */
static void dma_post(const struct dma *d)
{
    vstate *st = d->st;
    vring *r = d->ring;
    uint64_t p = r->produced;
    if (p - st->dma_completed >= RING_ENTRIES)
        return;
    vdesc *desc = descriptor_of(r, p);
    uint64_t gpa = buffer_gpa(d->vcpu, p % RING_ENTRIES);
    uint32_t op = (p % 2 == 0) ? DMA_WRITE : DMA_READ;
    desc->status = DESC_FREE;
    desc->seq = p;
    desc->buffer_gpa = gpa;
    desc->op = op;
    desc->length = d->length;
    desc->reserved0 = 0;
    desc->result = 0;
    if (op == DMA_READ) {
        uint64_t key = dma_key(d, p);
        vq *buf = (vq *)(uintptr_t)gpa;
        for (uint64_t i = 0; i < d->length / 8; i++)
            buf[i] = (gpa + 8 * i) ^ key;
    }
    desc->status = DESC_POSTED;
    r->produced = p + 1;
    st->dma_posted = p + 1;
}

/* ------------------------------------------------------------------ modes */

static void write_page(uint64_t gpa, uint64_t pass)
{
    uint64_t key = pattern_key(pass);
    vq *q = (vq *)(uintptr_t)gpa;
    for (uint64_t i = 0; i < PAGE_SIZE / 8; i++)
        q[i] = (gpa + 8 * i) ^ key;
}

/* Step 1's check: RAM holds what the registers hold, else ERROR_ROLLBACK naming the field. */
static inline void check_state(vstate *st, uint64_t counter, uint64_t sum, uint64_t pages)
{
    if (st->counter != counter)
        stop(st, ERROR_ROLLBACK, offsetof(struct vcpu_state, counter));
    if (st->checksum != sum)
        stop(st, ERROR_ROLLBACK, offsetof(struct vcpu_state, checksum));
    if (st->pages != pages)
        stop(st, ERROR_ROLLBACK, offsetof(struct vcpu_state, pages));
}

/* Step 2's check, from the second pass on: the page still holds the previous pass
 * (or a prefix of this one: a kill in the middle of its write), else ERROR_LOST at the
 * first qword that holds neither -- unless RAM and registers disagree: a vCPU restored
 * from another instant finds pages of another pass, and that is a rollback. */
static inline void check_page(vstate *st, uint64_t gpa, uint64_t counter, uint64_t sum, uint64_t pages,
                              uint64_t pass)
{
    uint64_t now = pattern_key(pass), before = pattern_key(pass - 1);
    vq *q = (vq *)(uintptr_t)gpa;
    for (uint64_t i = 0; i < PAGE_SIZE / 8; i++) {
        uint64_t x = q[i] ^ (gpa + 8 * i);
        if (x != before && x != now) {
            check_state(st, counter, sum, pages);
            stop(st, ERROR_LOST, gpa + 8 * i);
        }
    }
}

/* MODE_RUN: the step of abi.py, for ever. counter, checksum and pages live in registers.
 * The check of step 1 is made again before each store of the state block (a vCPU restored
 * from registers of another instant may resume anywhere in a step: it is caught before its
 * first store there, not one step later, when its own stores would have made RAM agree). */
static void __attribute__((noreturn)) run(uint64_t vcpu, vstate *st, const struct dma *dma, uint64_t area,
                                          uint64_t dirty_pages, uint64_t dma_every)
{
    uint64_t counter = st->counter, sum = st->checksum, pages = st->pages;
    for (;;) {
        /* 1. RAM must hold what the registers hold */
        check_state(st, counter, sum, pages);
        /* 2. one page of the area, then the page count */
        if (dirty_pages) {
            uint64_t page = area + (pages % dirty_pages) * PAGE_SIZE, pass = pages / dirty_pages;
            if (pass)
                check_page(st, page, counter, sum, pages, pass);
            write_page(page, pass);
            check_state(st, counter, sum, pages);
            st->pages = ++pages;
        }
        /* 3. the ring */
        if (dma_every && (counter + 1) % dma_every == 0) {
            dma_collect(dma);
            dma_post(dma);
        }
        /* 4. checksum, then counter */
        check_state(st, counter, sum, pages);
        sum += (counter + 1) * K + vcpu;
        st->checksum = sum;
        if (st->counter != counter)
            stop(st, ERROR_ROLLBACK, offsetof(struct vcpu_state, counter));
        st->counter = ++counter;
    }
}

/* MODE_FILL: the whole area at once, then DONE for ever (the VMM stops the vCPU). */
static void __attribute__((noreturn)) fill(uint64_t vcpu, uint64_t area, uint64_t dirty_pages, uint64_t value)
{
    uint64_t n = dirty_pages * (PAGE_SIZE / 8);
    void *dst = (void *)(uintptr_t)area;
    __asm__ volatile("rep stosq" : "+D"(dst), "+c"(n) : "a"(value) : "memory");
    for (;;)
        outl(PORT_DONE, vcpu);
}

void guest_main(uint64_t vcpu, const volatile struct config *cfg)
{
    vstate *st = vcpu < MAX_VCPUS ? state_of(vcpu) : 0;
    uint64_t bad = check_config(cfg, vcpu);
    if (bad)
        stop(st, ERROR_CONFIG, bad - 1);
    uint32_t error = st->error;
    if (error == ERROR_CONFIG) {
        st->error = ERROR_NONE;
        st->error_value = 0;
    } else if (error != ERROR_NONE) {
        stop(st, error, st->error_value);
    }

    int fresh = st->started == 0 && st->counter == 0 && st->checksum == 0 && st->pages == 0 && st->boots == 0;
    uint64_t n = st->counter, c = st->checksum;
    if (c != checksum_of(n, vcpu)) {
        if (c != checksum_of(n + 1, vcpu))
            stop(st, ERROR_TORN, offsetof(struct vcpu_state, checksum));
        st->counter = n + 1; /* the torn step 4 */
    }

    struct dma dma = {.vcpu = vcpu, .st = st, .ring = ring_of(vcpu), .length = cfg->dma_length, .seed = cfg->seed};
    if (dma.ring->magic != RING_MAGIC)
        ring_init(&dma);
    else
        ring_recover(&dma);

    if (!fresh)
        st->boots = st->boots + 1;
    st->started = st->started + 1;
    outl(PORT_STARTED, vcpu);

    uint64_t dirty_pages = cfg->dirty_pages;
    uint64_t area = cfg->dirty_gpa + vcpu * dirty_pages * PAGE_SIZE;
    if (cfg->mode == MODE_FILL)
        fill(vcpu, area, dirty_pages, cfg->fill_value);
    run(vcpu, st, &dma, area, dirty_pages, cfg->dma_every);
}
