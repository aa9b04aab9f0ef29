/* The guest's ABI in C: a mirror of pkfuse/vmm/abi.py, which is the specification.
 *
 * Every constant and every struct field here has the name it has there;
 * tests/vmm/test_guest_abi.py compiles a host program with this header and
 * compares each #define's value and each field's offset and size with
 * abi.py's constants and dtypes. Change both together.
 */
#ifndef PKFUSE_GUEST_ABI_H
#define PKFUSE_GUEST_ABI_H

#include <stddef.h>
#include <stdint.h>

#define PAGE_SIZE 0x1000ULL

/* layout (guest-physical) */
#define CONFIG_GPA 0x1000ULL
#define VCPU_STATE_GPA 0x2000ULL
#define VCPU_STATE_STRIDE 256ULL
#define GDT_GPA 0x8000ULL
#define TSS_GPA 0x9000ULL
#define PML4_GPA 0x10000ULL
#define PDPT_GPA 0x11000ULL
#define PD_GPA 0x12000ULL
#define MAX_GIB 64ULL
#define STACK_BOTTOM 0x80000ULL
#define STACK_TOP 0x100000ULL
#define STACK_SIZE 0x4000ULL
#define GUEST_TEXT_GPA 0x100000ULL
#define GUEST_TEXT_MAX 0x100000ULL
#define RING_GPA 0x200000ULL
#define RING_STRIDE 0x20000ULL
#define RING_ENTRIES 16ULL
#define BUFFER_SIZE 0x1000ULL
#define RING_BUFFERS_OFFSET 0x1000ULL
#define RECORDS_GPA 0x400000ULL
#define RECORDS_SIZE 0x200000ULL
#define RECORDS_OFFSET 0x1000ULL
#define RECORD_SIZE 64ULL
#define RECORDS_CAPACITY 32704ULL
#define DIRTY_GPA 0x600000ULL
#define MAX_VCPUS 16ULL
#define MIN_RAM 0x800000ULL
#define RAM_ALIGN 0x200000ULL

/* segments (GDT selectors) */
#define SEL_KERNEL_CODE 0x08ULL
#define SEL_KERNEL_DATA 0x10ULL
#define SEL_USER_DATA 0x23ULL
#define SEL_USER_CODE 0x2bULL
#define SEL_TSS 0x30ULL
#define GDT_ENTRIES 8ULL

/* ports (OUT at CPL 3, IOPL 3) */
#define PORT_STARTED 0x510
#define PORT_DONE 0x511
#define PORT_ERROR 0x512

#define ERROR_NONE 0
#define ERROR_CONFIG 1
#define ERROR_ROLLBACK 2
#define ERROR_TORN 3
#define ERROR_LOST 4

#define MODE_RUN 1
#define MODE_FILL 2

#define CONFIG_MAGIC 0x3154534555474b50ULL /* "PKGUEST1" little-endian */
#define CONFIG_VERSION 2

struct config {
    uint64_t magic;
    uint32_t version;
    uint32_t nr_vcpus;
    uint64_t ram_size;
    uint8_t vm_uuid[16];
    uint32_t mode;
    uint32_t dma_every;
    uint64_t dirty_gpa;
    uint64_t dirty_pages;
    uint64_t fill_value;
    uint32_t ring_entries;
    uint32_t dma_length;
    uint64_t seed;
    uint64_t reserved[5];
};
_Static_assert(sizeof(struct config) == 128, "CONFIG is 128 bytes");

struct vcpu_state {
    uint64_t counter;
    uint64_t checksum;
    uint64_t pages;
    uint64_t boots;
    uint64_t dma_posted;
    uint64_t dma_completed;
    uint64_t dma_ok;
    uint64_t dma_errors;
    uint32_t error;
    uint32_t started;
    uint64_t error_value;
    uint64_t reserved[6];
};
_Static_assert(sizeof(struct vcpu_state) == 128, "VCPU_STATE is 128 bytes");

#define RING_MAGIC 0x3130474e49524b50ULL /* "PKRING01" little-endian */

struct ring_header {
    uint64_t magic;
    uint32_t entries;
    uint32_t vcpu;
    uint64_t produced;
    uint64_t consumed;
    uint64_t reserved[4];
};
_Static_assert(sizeof(struct ring_header) == 64, "RING_HEADER is 64 bytes");

#define DMA_WRITE 1
#define DMA_READ 2
#define DESC_FREE 0
#define DESC_POSTED 1
#define DESC_DONE 2
#define DESC_FAULT 3

struct descriptor {
    uint64_t seq;
    uint64_t buffer_gpa;
    uint32_t op;
    uint32_t length;
    uint32_t status;
    uint32_t reserved0;
    uint64_t result;
    uint64_t reserved[3];
};
_Static_assert(sizeof(struct descriptor) == 64, "DESCRIPTOR is 64 bytes");

#define DESCRIPTORS_OFFSET 64ULL

/* the records region: written by the device only (the guest never touches it) */
#define RECORDS_MAGIC 0x3130534345524b50ULL /* "PKRECS01" little-endian */

struct records_header {
    uint64_t magic;
    uint32_t capacity;
    uint32_t record_size;
    uint64_t count;
    uint32_t writer_rid;
    uint32_t reserved0;
    uint64_t reserved[4];
};
_Static_assert(sizeof(struct records_header) == 64, "RECORDS_HEADER is 64 bytes");

struct record {
    uint64_t seq;
    uint64_t time_ns;
    uint32_t rid;
    uint32_t pid;
    uint64_t payload[4];
    uint64_t check;
};
_Static_assert(sizeof(struct record) == 64, "RECORD is 64 bytes");

#define RECORD_PAYLOAD_OFFSET 24ULL
#define RECORD_CHECK_OFFSET 56ULL

/* the guest's arithmetic */
#define K 0x9e3779b97f4a7c15ULL
#define U64 0xffffffffffffffffULL

#endif
