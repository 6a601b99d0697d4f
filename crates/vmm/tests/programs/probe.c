/* A static test program for the KVM integration tests: argv[1] selects one behaviour. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile int zero = 0;

/* Deep recursion with big frames, until the stack's guard gap. */
static int recurse(int depth) {
    volatile char frame[4096];
    frame[0] = (char)depth;
    return recurse(depth + 1) + frame[0];
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "hello";
    if (!strcmp(mode, "hello")) {
        printf("hello from ring 3\n");
        return 0;
    }
    if (!strcmp(mode, "exit")) return atoi(argv[2]);
    if (!strcmp(mode, "wild")) { *(volatile int *)0x700000000ull = 1; return 0; }
    if (!strcmp(mode, "null")) { *(volatile int *)8 = 1; return 0; }
    if (!strcmp(mode, "ud2")) { __builtin_trap(); }
    if (!strcmp(mode, "int3")) { __asm__ volatile("int3"); return 0; }
    if (!strcmp(mode, "div0")) { return 10 / zero; }
    if (!strcmp(mode, "port")) { __asm__ volatile("outb %%al, $0x99" ::"a"(0)); return 0; }
    if (!strcmp(mode, "forge")) { __asm__ volatile("outb %%al, $0x20" ::"a"(39)); return 0; }
    /* Memory the page tables must refuse. */
    if (!strcmp(mode, "write-read-only")) {
        volatile char *p = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 1;
        p[4096] = 1;
        mprotect((void *)p, 4096, PROT_READ);
        p[4096] = 2; /* the other page stays writable */
        printf("%d\n", p[0]);
        fflush(stdout);
        p[0] = 3;
        return 0;
    }
    if (!strcmp(mode, "execute-data")) {
        unsigned char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 0xc3; /* ret */
        ((void (*)(void))p)();
        return 0;
    }
    if (!strcmp(mode, "execute-after-mprotect")) {
        unsigned char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 0xc3;
        mprotect(p, 4096, PROT_READ | PROT_EXEC);
        ((void (*)(void))p)();
        printf("ran\n");
        return 0;
    }
    if (!strcmp(mode, "unmapped")) { *(volatile int *)0x3000000 = 1; return 0; }
    if (!strcmp(mode, "after-munmap")) {
        volatile int *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 1;
        munmap((void *)p, 4096);
        return p[0];
    }
    if (!strcmp(mode, "read-page-tables")) { return *(volatile int *)0x10000; }
    if (!strcmp(mode, "stack-overflow")) { return recurse(1); }
    /* Forged endings: the stub ports and stubs used from ring 3. */
    if (!strcmp(mode, "in-syscall-port")) { __asm__ volatile("inb $0x20, %%al" ::: "rax"); return 0; }
    if (!strcmp(mode, "out-exception-port")) { __asm__ volatile("outb %%al, $0x4e" ::"a"(0)); return 0; }
    if (!strcmp(mode, "jump-to-exception-stub")) {
        /* A page-fault frame claiming rip 0xdeadbeef, where a real exception would put it,
           then straight into the page-fault stub. */
        uint64_t *frame = (uint64_t *)(0x20000 - 48);
        frame[0] = 4; frame[1] = 0xdeadbeef; frame[2] = 0x2b; frame[3] = 0x202;
        frame[4] = 0x1000; frame[5] = 0x23;
        __asm__ volatile("mov %0, %%rsp; jmp *%1" ::"r"(frame), "r"(0x16100ull + 14 * 8));
        return 0;
    }
    if (!strcmp(mode, "loop")) { for (;;) __asm__ volatile(""); }
    if (!strcmp(mode, "efault")) {
        long w = syscall(SYS_write, 1, (void *)0x7f0000000000ull, 10);
        int we = errno;
        long r = syscall(SYS_read, 0, (void *)0x8, 10);
        int re = errno;
        long o = syscall(SYS_write, 1, (void *)-1ull, 2);
        int oe = errno;
        printf("write=%ld/%d read=%ld/%d overflow=%ld/%d\n", w, we, r, re, o, oe);
        return 0;
    }
    if (!strcmp(mode, "malloc")) {
        size_t total = 0;
        while (malloc(1 << 20)) total++;
        printf("allocated %zu MiB then ENOMEM\n", total);
        return 0;
    }
    if (!strcmp(mode, "sleep")) {
        struct timespec a, b, d = {0, 100 * 1000 * 1000};
        clock_gettime(CLOCK_MONOTONIC, &a);
        nanosleep(&d, NULL);
        clock_gettime(CLOCK_MONOTONIC, &b);
        long ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
        printf("slept %s\n", ms >= 100 && ms < 1000 ? "ok" : "wrong");
        return 0;
    }
    if (!strcmp(mode, "avx")) {
        uint32_t out[8];
        __asm__ volatile("vpcmpeqd %%ymm0, %%ymm0, %%ymm0\n\tvpaddd %%ymm0, %%ymm0, %%ymm1\n\tvmovdqu %%ymm1, %0"
                         : "=m"(out)::"xmm0", "xmm1");
        printf("avx %d\n", (int)out[7]);
        return 0;
    }
    if (!strcmp(mode, "mmap")) {
        char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return 2;
        int clean = 1;
        for (int i = 0; i < 1 << 20; i += 4096) clean &= p[i] == 0;
        memset(p, 7, 1 << 20);
        munmap(p, 1 << 20);
        char *q = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (int i = 0; i < 1 << 20; i += 4096) clean &= q[i] == 0;
        printf("mmap %s\n", clean ? "zeroed" : "dirty");
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 99;
}
