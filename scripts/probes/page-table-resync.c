/*
 * page-table-resync: does KVM's shadow MMU on kvm_pvm notice guest page-table edits made by the
 * VMM from the host side (through its mapping of guest RAM), and what does each way of forcing
 * a resync cost? This is the measurement behind `forkvm_kernel::pagetable` (see
 * docs/ARCHITECTURE.md, "Page tables that tell the truth"). The method forkvm uses is
 * "host-mprotect-toggle-4K/2M": the host mapping's protection lowered and restored, which makes
 * KVM's MMU notifier drop its shadow entries for those pages.
 *
 *   gcc -O2 -o page-table-resync scripts/probes/page-table-resync.c
 *   ./page-table-resync matrix sregs  # edit type x resync method -> SEEN / stale
 *   ./page-table-resync cost host-mprotect-toggle-4K 1000 200 sregs
 *   ./ptprobe check                 # return paths, fault reporting (IDT stubs and no IDT), vmcall/syscall in ring 0
 *   ./ptprobe matrix [sregs|iret]   # edit type x resync method x writer -> SEEN / stale
 *        (WRITER=3: helper vCPU writes the entry; WRITER=4: host writes + helper whole-table zap)
 *   ./ptprobe matrix-add            # permission *increases* with no resync
 *   ./ptprobe seq [N] | seqc [N]    # repeated edit cycles (unsync+sync protocol; secure root-C variant)
 *   ./ptprobe perm                  # which mappings a ring-0 stub may write through
 *   ./ptprobe abit                  # KVM sets A/D bits in guest PTEs; no SPTE for untouched neighbours
 *   ./ptprobe cost METHOD K N sregs # resync cost with K pages touched (method names: see mname[])
 *   ./ptprobe batch T N             # vCPU-0 ring-0 unsync of T tables + CR3-alternating sync
 *   ./ptprobe helperbatch T PER N   # helper vCPU writing PER entries in each of T tables (PER=0: whole-table zap)
 *   ./ptprobe vcpu2 K N | helpercost N | helperpriv | stubdummy K N | rtt N | r0loop N | r0start N | pvmmsr
 *
 * Guest (no kernel): ring-3 snippets at UCODE; `syscall` -> LSTAR stub `out 0x20; iretq`.
 * Exception vector v -> stub `out 0x40+v; iretq` (IDT, TSS with rsp0 and I/O bitmap).
 * Return to ring 3 either by KVM_SYNC_X86_SREGS (forkvm's way: rip/cs/ss rewritten) or, in
 * "iret" mode, by letting the stub's iretq pop a frame the VMM wrote on the ring-0 stack (only
 * KVM_SYNC_X86_REGS dirty, so no KVM_SET_SREGS at all on the return path).
 *
 * Memory: slot 0 = 64 MiB at gpa 0 (upper-level tables, code, data, 2 MiB pages);
 *         slot 1 = 2 MiB at gpa 0x4000000 holding the four 4 KiB leaf page tables for the test
 *         region [0x400000, 0xc00000); so the leaf tables can be zapped alone by deleting slot 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_X86_QUIRK_SLOT_ZAP_ALL
#define KVM_X86_QUIRK_SLOT_ZAP_ALL (1 << 7)
#endif

#define MEM_SIZE (64ull << 20)
#define PT_GPA 0x4000000ull
#define PT_SIZE (2ull << 20)

#define PML4A 0x1000
#define PDPT 0x2000
#define PD 0x3000
#define PML4B 0x4000
#define PML4C 0x9000 /* "kernel" root: like A/B plus the leaf-table window; used only while a ring-0 stub runs */
#define PDPTC 0xa000
#define PDC 0xb000
#define GDT 0x5000
#define IDT 0x6000
#define TSS 0x7000
#define STUBS 0x8000
#define SYSCALL_STUB 0x8000
#define EXC_STUBS 0x8100
#define R_RELOAD 0x8400       /* mov rax,cr3; mov cr3,rax; out 0x21; iretq */
#define R_INVLPG 0x8420       /* invlpg [rsi]; out 0x22; iretq */
#define R_WPTE 0x8440         /* mov [rdi],rsi; out 0x23; iretq */
#define R_WPTE_INV 0x8460     /* mov [rdi],rsi; invlpg [rdx]; out 0x24; iretq */
#define R_WPTE_RELOAD 0x8480  /* mov [rdi],rsi; mov rax,cr3; mov cr3,rax; out 0x25; iretq */
#define R_VMCALL 0x84a0       /* vmcall; out 0x26; iretq */
#define R_BATCH 0x84c0        /* loop {mov rax,[rdi]; mov rdx,[rdi+8]; mov [rax],rdx; rdi+=16} rcx times; out 0x27; iretq */
#define R_BATCH_RELOAD 0x8500 /* same, then mov cr3 reload; out 0x28; iretq */
#define R_NOP 0x8540          /* out 0x29; iretq */
#define R_RELOAD_IRET 0x8560  /* mov rax,cr3; mov cr3,rax; iretq  (no exit) */
#define R_INVLPG_IRET 0x8580  /* invlpg [rsi]; iretq (no exit) */
#define R_SYSCALL0 0x85a0     /* syscall (from ring 0: PVM hypercall ABI?); out 0x2a; iretq */
#define R0_STACK_TOP 0x20000
#define FRAME 0x1ff00        /* iret frame the VMM writes */
#define UCODE 0x100000
#define S_READ (UCODE + 0x00)  /* movzx eax, byte [rsi]; syscall */
#define S_WRITE (UCODE + 0x10) /* mov [rsi], dl; syscall */
#define S_EXEC (UCODE + 0x20)  /* call rsi; syscall */
#define S_NOP (UCODE + 0x30)   /* syscall */
#define S_TOUCH (UCODE + 0x40) /* rdx times: mov al,[rsi]; rsi += 4096 ; syscall */
#define USTACK 0x1f0000
#define BATCH_AREA 0x1c0000
#define TEST_BASE 0x400000ull
#define TEST_END 0xc00000ull
#define A 0x400000ull
#define B 0x401000ull
#define TOUCH_BASE 0x402000ull
#define Z 0x5ff000ull /* last entry of the first leaf table: target of the "harmless" edit (W toggled) */
#define TGT 0xe00000ull /* remap target, content 0x77 */
#define HUGE_VA 0x1000000ull /* pd[8]: a 2 MiB page, content 0x66 */

#define P 1ull
#define W 2ull
#define U 4ull
#define AD 0x60ull
#define PS 0x80ull
#define NX (1ull << 63)

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static void die(const char *w) { perror(w); exit(1); }
static int secure_pt; /* 1: roots A/B do not map the leaf tables (only root C does) */

struct vm {
    int kvm, vm, vcpu;
    uint8_t *mem, *ptmem;
    struct kvm_run *run;
    struct kvm_segment ucs, uds;
    uint64_t cr3;
    int iret_mode;
    int no_idt;
};

static uint64_t *pte(struct vm *g, uint64_t va) {
    if (va < TEST_BASE || va >= TEST_END) { fprintf(stderr, "pte(%llx)\n", (unsigned long long)va); exit(1); }
    return (uint64_t *)(g->ptmem + ((va - TEST_BASE) >> 12) * 8);
}
static uint64_t *pde(struct vm *g, uint64_t va) { return (uint64_t *)(g->mem + PD + (va >> 21) * 8); }

static void put(struct vm *g, uint64_t at, const void *b, size_t n) { memcpy(g->mem + at, b, n); }

static void set_slot(struct vm *g, int slot, uint64_t gpa, uint64_t size, void *hva, uint32_t flags) {
    struct kvm_userspace_memory_region r = {.slot = slot, .flags = flags, .guest_phys_addr = gpa,
                                            .memory_size = size, .userspace_addr = (uintptr_t)hva};
    if (ioctl(g->vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION");
}

static void build(struct vm *g, int iret_mode, int disable_zap_all_quirk) {
    memset(g, 0, sizeof *g);
    g->iret_mode = iret_mode;
    g->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (g->kvm < 0) die("/dev/kvm");
    g->vm = ioctl(g->kvm, KVM_CREATE_VM, 0);
    if (g->vm < 0) die("KVM_CREATE_VM");
    if (disable_zap_all_quirk) {
        int q = ioctl(g->vm, KVM_CHECK_EXTENSION, KVM_CAP_DISABLE_QUIRKS2);
        if (!(q & KVM_X86_QUIRK_SLOT_ZAP_ALL)) { fprintf(stderr, "SLOT_ZAP_ALL quirk not disableable (mask %x)\n", q); exit(1); }
        struct kvm_enable_cap cap = {.cap = KVM_CAP_DISABLE_QUIRKS2, .args = {KVM_X86_QUIRK_SLOT_ZAP_ALL}};
        if (ioctl(g->vm, KVM_ENABLE_CAP, &cap) < 0) die("KVM_ENABLE_CAP DISABLE_QUIRKS2");
    }
    g->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    g->ptmem = mmap(NULL, PT_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    set_slot(g, 0, 0, MEM_SIZE, g->mem, 0);
    set_slot(g, 1, PT_GPA, PT_SIZE, g->ptmem, 0);

    /* page tables */
    uint64_t *pml4 = (void *)(g->mem + PML4A), *pdpt = (void *)(g->mem + PDPT), *pd = (void *)(g->mem + PD);
    pml4[0] = PDPT | P | W | U | 0x20;
    pdpt[0] = PD | P | W | U | 0x20;
    for (unsigned i = 0; i < 512; i++) {
        uint64_t a = (uint64_t)i << 21;
        if (a < MEM_SIZE) pd[i] = a | P | W | U | AD | PS;
    }
    pd[PT_GPA >> 21] = PT_GPA | P | W | U | AD | PS; /* the leaf tables, mapped so ring 0 can write them */
    for (int t = 0; t < 4; t++) pd[(TEST_BASE >> 21) + t] = (PT_GPA + t * 0x1000) | P | W | U | 0x20;
    for (uint64_t va = TEST_BASE; va < TEST_END; va += 4096) *pte(g, va) = va | P | W | U | AD;
    memcpy(g->mem + PDC, g->mem + PD, 4096);
    if (secure_pt) pd[PT_GPA >> 21] = 0;
    memcpy(g->mem + PML4B, g->mem + PML4A, 4096);
    *(uint64_t *)(g->mem + PML4C) = PDPTC | P | W | U | 0x20;
    *(uint64_t *)(g->mem + PDPTC) = PDC | P | W | U | 0x20;

    /* data */
    g->mem[A] = 0x11;
    uint8_t bcode[] = {0xb8, 0x0b, 0x0b, 0, 0, 0xc3}; /* mov eax,0xb0b; ret */
    put(g, B, bcode, sizeof bcode);
    memset(g->mem + TGT, 0x77, 4096);
    memset(g->mem + HUGE_VA, 0x66, 4096);

    /* GDT, TSS, IDT */
    uint64_t *gdt = (void *)(g->mem + GDT);
    uint64_t tss_limit = 0x68 + 16;
    gdt[1] = 0x00af9b000000ffffull; gdt[2] = 0x00cf93000000ffffull; gdt[3] = 0x00cffb000000ffffull;
    gdt[4] = 0x00cff3000000ffffull; gdt[5] = 0x00affb000000ffffull;
    gdt[6] = (tss_limit & 0xffff) | ((uint64_t)(TSS & 0xffffff) << 16) | (0x89ull << 40);
    gdt[7] = 0;
    uint8_t *tss = g->mem + TSS;
    *(uint64_t *)(tss + 4) = R0_STACK_TOP;
    *(uint16_t *)(tss + 102) = 0x68;
    memset(tss + 0x68, 0xff, 17);
    for (int p = 0x20; p < 0x30; p++) tss[0x68 + p / 8] &= ~(1 << (p % 8));
    for (int p = 0x40; p < 0x60; p++) tss[0x68 + p / 8] &= ~(1 << (p % 8));
    uint64_t *idt = (void *)(g->mem + IDT);
    for (int v = 0; v < 32; v++) {
        uint64_t h = EXC_STUBS + v * 8;
        uint64_t dpl = (v == 3 || v == 4) ? 3 : 0;
        idt[2 * v] = (h & 0xffff) | (0x08ull << 16) | ((0x8eull | (dpl << 5)) << 40) | (((h >> 16) & 0xffff) << 48);
        idt[2 * v + 1] = h >> 32;
    }

    /* stubs */
    uint8_t sc[] = {0xe6, 0x20, 0x48, 0xcf};
    put(g, SYSCALL_STUB, sc, sizeof sc);
    for (int v = 0; v < 32; v++) { uint8_t e[] = {0xe6, 0x40 + v, 0x48, 0xcf}; put(g, EXC_STUBS + v * 8, e, 4); }
#define STUB(at, ...) do { uint8_t s_[] = {__VA_ARGS__}; put(g, at, s_, sizeof s_); } while (0)
    STUB(R_RELOAD, 0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8, 0xe6, 0x21, 0x48, 0xcf);
    STUB(R_INVLPG, 0x0f, 0x01, 0x3e, 0xe6, 0x22, 0x48, 0xcf);
    STUB(R_WPTE, 0x48, 0x89, 0x37, 0xe6, 0x23, 0x48, 0xcf);
    STUB(R_WPTE_INV, 0x48, 0x89, 0x37, 0x0f, 0x01, 0x3a, 0xe6, 0x24, 0x48, 0xcf);
    STUB(R_WPTE_RELOAD, 0x48, 0x89, 0x37, 0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8, 0xe6, 0x25, 0x48, 0xcf);
    STUB(R_VMCALL, 0x0f, 0x01, 0xc1, 0xe6, 0x26, 0x48, 0xcf);
    STUB(R_BATCH, 0x48, 0x8b, 0x07, 0x48, 0x8b, 0x57, 0x08, 0x48, 0x89, 0x10, 0x48, 0x83, 0xc7, 0x10, 0x48, 0xff,
         0xc9, 0x75, 0xed, 0xe6, 0x27, 0x48, 0xcf);
    STUB(R_BATCH_RELOAD, 0x48, 0x8b, 0x07, 0x48, 0x8b, 0x57, 0x08, 0x48, 0x89, 0x10, 0x48, 0x83, 0xc7, 0x10, 0x48,
         0xff, 0xc9, 0x75, 0xed, 0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8, 0xe6, 0x28, 0x48, 0xcf);
    STUB(R_NOP, 0xe6, 0x29, 0x48, 0xcf);
    STUB(R_RELOAD_IRET, 0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8, 0x48, 0xcf);
    STUB(R_INVLPG_IRET, 0x0f, 0x01, 0x3e, 0x48, 0xcf);
    STUB(0x85c0, 0xe6, 0x29, 0xeb, 0xfc); /* out 0x29; jmp back */
    STUB(0x85e0, 0xe6, 0x2b, 0xeb, 0xfc); /* out 0x2b (port closed in the TSS bitmap? no: 0x20-0x2f open) */
    STUB(R_SYSCALL0, 0x0f, 0x05, 0xe6, 0x2a, 0x48, 0xcf);

    /* ring-3 snippets */
    STUB(S_READ, 0x0f, 0xb6, 0x06, 0x0f, 0x05);
    STUB(S_WRITE, 0x88, 0x16, 0x0f, 0x05);
    STUB(S_EXEC, 0xff, 0xd6, 0x0f, 0x05);
    STUB(S_NOP, 0x0f, 0x05);
    STUB(S_TOUCH, 0x8a, 0x06, 0x48, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00, 0x48, 0xff, 0xca, 0x75, 0xf2, 0x0f, 0x05);

    /* vCPU */
    g->vcpu = ioctl(g->vm, KVM_CREATE_VCPU, 0);
    if (g->vcpu < 0) die("KVM_CREATE_VCPU");
    g->run = mmap(NULL, ioctl(g->kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED, g->vcpu, 0);
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + 256 * sizeof(struct kvm_cpuid_entry2));
    c->nent = 256;
    if (ioctl(g->kvm, KVM_GET_SUPPORTED_CPUID, c) < 0) die("GET_SUPPORTED_CPUID");
    if (ioctl(g->vcpu, KVM_SET_CPUID2, c) < 0) die("SET_CPUID2");
    free(c);
    struct kvm_sregs sr;
    ioctl(g->vcpu, KVM_GET_SREGS, &sr);
    sr.gdt.base = GDT; sr.gdt.limit = 63;
    sr.idt.base = IDT; sr.idt.limit = g->no_idt ? 0 : 32 * 16 - 1;
    struct kvm_segment seg = {.limit = 0xffffffff, .present = 1, .dpl = 3, .s = 1, .l = 1, .g = 1, .type = 11, .selector = 0x2b};
    g->ucs = seg;
    seg.type = 3; seg.l = 0; seg.db = 1; seg.selector = 0x23;
    g->uds = seg;
    sr.cs = g->ucs; sr.ds = sr.es = sr.fs = sr.gs = sr.ss = g->uds;
    sr.tr = (struct kvm_segment){.base = TSS, .limit = tss_limit, .selector = 0x30, .type = 11, .present = 1};
    sr.cr3 = g->cr3 = PML4A;
    sr.cr4 = 0x40620;
    sr.cr0 = 0x80010033;
    sr.efer = 0xd01; /* SCE | LME | LMA | NXE */
    if (getenv("CR0")) sr.cr0 = strtoull(getenv("CR0"), 0, 0);
    if (getenv("EFER")) sr.efer = strtoull(getenv("EFER"), 0, 0);
    if (getenv("NOTR")) { struct kvm_sregs d; ioctl(g->vcpu, KVM_GET_SREGS, &d); sr.tr = d.tr; }
    if (getenv("NOIDT")) sr.idt.limit = 0;
    if (ioctl(g->vcpu, KVM_SET_SREGS, &sr) < 0) die("SET_SREGS");
    struct { struct kvm_msrs h; struct kvm_msr_entry e[3]; } m = {.h = {.nmsrs = 3}};
    m.e[0].index = 0xC0000081; m.e[0].data = (0x18ull << 48) | (0x08ull << 32);
    m.e[1].index = 0xC0000082; m.e[1].data = SYSCALL_STUB;
    m.e[2].index = 0xC0000084; m.e[2].data = 0x47700;
    if (ioctl(g->vcpu, KVM_SET_MSRS, &m) != 3) die("SET_MSRS");
    struct kvm_regs rg = {.rip = S_NOP, .rsp = USTACK, .rflags = 2};
    if (ioctl(g->vcpu, KVM_SET_REGS, &rg) < 0) die("SET_REGS");
    g->run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
    if (getenv("VALID_REGS_ONLY")) g->run->kvm_valid_regs = KVM_SYNC_X86_REGS;
}

static void destroy(struct vm *g) {
    close(g->vcpu); close(g->vm); close(g->kvm);
    munmap(g->mem, MEM_SIZE); munmap(g->ptmem, PT_SIZE);
}

struct ex {
    int kind; /* 0 = syscall, 1 = exception, 2 = stub port, 3 = other exit */
    int port, vector;
    uint64_t rax, cr2, err, frip, exit_reason;
};

static struct ex do_run(struct vm *g) {
    struct ex e = {0};
    if (ioctl(g->vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    struct kvm_run *r = g->run;
    g->run->kvm_dirty_regs = 0;
    e.exit_reason = r->exit_reason;
    if (r->exit_reason != KVM_EXIT_IO) { e.kind = 3; e.frip = r->s.regs.regs.rip; return e; }
    e.port = r->io.port;
    e.rax = r->s.regs.regs.rax;
    if (e.port == 0x20) e.kind = 0;
    else if (e.port >= 0x40 && e.port < 0x60) {
        e.kind = 1; e.vector = e.port - 0x40;
        e.cr2 = r->s.regs.sregs.cr2;
        uint64_t *f = (uint64_t *)(g->mem + r->s.regs.regs.rsp);
        int has = (e.vector == 8 || (e.vector >= 10 && e.vector <= 14) || e.vector == 17);
        e.err = has ? f[0] : ~0ull;
        e.frip = f[has ? 1 : 0];
    } else e.kind = 2;
    return e;
}

/* vCPU is stopped in ring 0 (after a stub's `out`): arrange to continue in ring 3 at rip. */
static void to_user(struct vm *g, uint64_t rip, uint64_t rsi, uint64_t rdx) {
    struct kvm_regs *R = &g->run->s.regs.regs;
    struct kvm_sregs *S = &g->run->s.regs.sregs;
    R->rsi = rsi; R->rdx = rdx;
    if (g->iret_mode) {
        uint64_t *f = (uint64_t *)(g->mem + FRAME);
        f[0] = rip; f[1] = 0x2b; f[2] = 2; f[3] = USTACK; f[4] = 0x23;
        R->rsp = FRAME;
        g->run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
    } else {
        R->rip = rip; R->rsp = USTACK; R->rflags = 2;
        S->cs = g->ucs; S->ss = g->uds;
        S->cr3 = g->cr3;
        g->run->kvm_dirty_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
    }
}

/* vCPU stopped in ring 0: run a ring-0 stub (stays in ring 0, only rip/regs change). */
static struct ex ring0(struct vm *g, uint64_t stub, uint64_t rdi, uint64_t rsi, uint64_t rdx, uint64_t rcx, uint64_t rax) {
    struct kvm_regs *R = &g->run->s.regs.regs;
    R->rip = stub; R->rdi = rdi; R->rsi = rsi; R->rdx = rdx; R->rcx = rcx; R->rax = rax;
    R->rsp = FRAME - 64; /* any ring-0 stack */
    g->run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
    return do_run(g);
}

static struct ex step(struct vm *g, uint64_t rip, uint64_t rsi, uint64_t rdx) {
    to_user(g, rip, rsi, rdx);
    return do_run(g);
}

static void show(const char *what, struct ex e) {
    if (e.kind == 0) printf("%s: syscall exit, rax=%#llx\n", what, (unsigned long long)e.rax);
    else if (e.kind == 1) printf("%s: exception vector %d err=%#llx cr2=%#llx rip=%#llx\n", what, e.vector,
                                 (unsigned long long)e.err, (unsigned long long)e.cr2, (unsigned long long)e.frip);
    else if (e.kind == 2) printf("%s: port %#x exit rax=%#llx\n", what, e.port, (unsigned long long)e.rax);
    else printf("%s: exit_reason %llu rip=%#llx\n", what, (unsigned long long)e.exit_reason, (unsigned long long)e.frip);
}

static void expect_port(struct ex e, int port, const char *what) {
    if (e.kind != 2 || e.port != port) { show(what, e); fprintf(stderr, "%s: expected port %#x\n", what, port); exit(1); }
}

/* ---------------------------------------------------------------- resync methods */
enum { M_NONE, M_SREGS_SAME, M_SREGS_ALT, M_R0_RELOAD, M_R0_INVLPG, M_SLOT_ALL, M_SLOT_PT, M_DIRTYLOG, M_VMCALL,
       M_R0_RELOAD_IRET, M_R0_INVLPG_IRET, M_SREGS_FRESH, M_SREGS_ROLE,
       M_SYNC_ALT, M_R0DUMMY_SYNC_ALT, M_R0_NOP, M_R0DUMMY_ROOTC, M_R0DUMMY_NOSYNC, M_HOST_MPROT4K, M_HOST_MPROT2M, M_NMETHODS };
static const char *mname[] = {"none", "sregs-same-cr3", "sregs-alt-cr3", "ring0-movcr3", "ring0-invlpg",
                              "memslot0-readd", "memslot1(PTs)-readd(quirk off)", "dirtylog-toggle", "vmcall-PVM_HC_TLB_FLUSH",
                              "ring0-movcr3-iret(no exit)", "ring0-invlpg-iret(no exit)",
                              "sregs-fresh-pml4", "sregs-toggle-cr0.wp",
                              "syncregs-alt-cr3", "r0dummy+syncregs-alt-cr3", "ring0-nop-stub", "r0dummy-under-rootC+return-to-A", "r0dummy-no-cr3-change(incorrect)", "host-mprotect-toggle-4K", "host-mprotect-toggle-2M"};

/* Performs the resync for `va`. The vCPU is stopped in ring 0. For the *_IRET methods the caller
 * must use resync_and_return() instead (the stub itself returns to ring 3). */
static char resync_err[128];
static int resync(struct vm *g, int m, uint64_t va) {
    struct ex e;
    switch (m) {
    case M_NONE: break;
    case M_SREGS_SAME:
    case M_SREGS_ALT: {
        struct kvm_sregs s = g->run->s.regs.sregs; /* current (ring 0) state */
        if (m == M_SREGS_ALT) g->cr3 = g->cr3 == PML4A ? PML4B : PML4A;
        s.cr3 = g->cr3;
        if (ioctl(g->vcpu, KVM_SET_SREGS, &s) < 0) die("SET_SREGS");
        g->run->s.regs.sregs.cr3 = g->cr3;
        break;
    }
    case M_SREGS_FRESH: { /* a PML4 page never used as a table before (16 of them, cycled) */
        static int next;
        uint64_t np = 0x30000 + (next++ % 16) * 0x1000;
        memcpy(g->mem + np, g->mem + PML4A, 4096);
        struct kvm_sregs s = g->run->s.regs.sregs;
        s.cr3 = g->cr3 = np;
        if (ioctl(g->vcpu, KVM_SET_SREGS, &s) < 0) die("SET_SREGS");
        g->run->s.regs.sregs.cr3 = g->cr3;
        break;
    }
    case M_SYNC_ALT: /* the CR3 change rides on the KVM_SYNC_X86_SREGS return to ring 3 */
        if (g->iret_mode) { fprintf(stderr, "syncregs-alt needs sregs mode\n"); exit(1); }
        g->cr3 = g->cr3 == PML4A ? PML4B : PML4A;
        break;
    case M_R0DUMMY_NOSYNC:
    case M_R0DUMMY_SYNC_ALT: { /* ring 0 rewrites the (already host-edited) PTE of va, then CR3 alternates */
        if (g->iret_mode) { fprintf(stderr, "needs sregs mode\n"); exit(1); }
        e = ring0(g, R_WPTE, PT_GPA + ((va - TEST_BASE) >> 12) * 8, *pte(g, va), va, 0, 0);
        if (!(e.kind == 2 && e.port == 0x23)) { show("r0dummy", e); exit(1); }
        if (m == M_R0DUMMY_SYNC_ALT) g->cr3 = g->cr3 == PML4A ? PML4B : PML4A;
        break;
    }
    case M_R0DUMMY_ROOTC: { /* stub runs under root C (maps the tables), return to ring 3 under A: C->A syncs */
        if (g->iret_mode) { fprintf(stderr, "needs sregs mode\n"); exit(1); }
        struct kvm_regs *R = &g->run->s.regs.regs;
        R->rip = R_WPTE; R->rdi = PT_GPA + ((va - TEST_BASE) >> 12) * 8; R->rsi = *pte(g, va); R->rsp = FRAME - 64;
        g->run->s.regs.sregs.cr3 = PML4C;
        g->run->kvm_dirty_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
        e = do_run(g);
        if (!(e.kind == 2 && e.port == 0x23)) { show("r0dummy rootC", e); exit(1); }
        g->cr3 = PML4A;
        break;
    }
    case M_R0_NOP:
        e = ring0(g, R_NOP, 0, 0, 0, 0, 0);
        if (!(e.kind == 2 && e.port == 0x29)) { show("r0nop", e); exit(1); }
        break;
    case M_SREGS_ROLE: {
        struct kvm_sregs s = g->run->s.regs.sregs;
        s.cr0 &= ~(1ull << 16);
        if (ioctl(g->vcpu, KVM_SET_SREGS, &s) < 0) die("SET_SREGS");
        s.cr0 |= 1ull << 16;
        if (ioctl(g->vcpu, KVM_SET_SREGS, &s) < 0) die("SET_SREGS");
        break;
    }
    case M_R0_RELOAD:
    case M_R0_INVLPG:
        e = m == M_R0_RELOAD ? ring0(g, R_RELOAD, 0, 0, 0, 0, 0) : ring0(g, R_INVLPG, 0, va, 0, 0, 0);
        if (!(e.kind == 2 && e.port == (m == M_R0_RELOAD ? 0x21 : 0x22))) {
            if (e.kind == 1) sprintf(resync_err, "stub faulted #%d err=%#llx at rip %#llx", e.vector, (unsigned long long)e.err, (unsigned long long)e.frip);
            else sprintf(resync_err, "stub exit %llu port %#x", (unsigned long long)e.exit_reason, e.port);
            return -1;
        }
        break;
    case M_SLOT_ALL:
        set_slot(g, 0, 0, 0, g->mem, 0);
        set_slot(g, 0, 0, MEM_SIZE, g->mem, 0);
        break;
    case M_SLOT_PT:
        set_slot(g, 1, PT_GPA, 0, g->ptmem, 0);
        set_slot(g, 1, PT_GPA, PT_SIZE, g->ptmem, 0);
        break;
    case M_HOST_MPROT4K:
    case M_HOST_MPROT2M: {
        uint64_t len = m == M_HOST_MPROT4K ? 4096 : (2u << 20);
        uint64_t at = va & ~(len - 1);
        if (mprotect(g->mem + at, len, PROT_READ)) die("mprotect");
        if (mprotect(g->mem + at, len, PROT_READ | PROT_WRITE)) die("mprotect");
        break;
    }
    case M_DIRTYLOG:
        set_slot(g, 0, 0, MEM_SIZE, g->mem, KVM_MEM_LOG_DIRTY_PAGES);
        set_slot(g, 0, 0, MEM_SIZE, g->mem, 0);
        break;
    case M_VMCALL:
        e = ring0(g, R_VMCALL, 0, 0, 0, 0, 0x17088203);
        if (!(e.kind == 2 && e.port == 0x26)) show("vmcall", e);
        break;
    default: fprintf(stderr, "bad method\n"); exit(1);
    }
    return 0;
}

/* Resync, then run ring-3 snippet `rip`. */
static struct ex resync_and_step(struct vm *g, int m, uint64_t va, uint64_t rip, uint64_t rsi, uint64_t rdx) {
    if (m == M_R0_RELOAD_IRET || m == M_R0_INVLPG_IRET) {
        if (!g->iret_mode) { fprintf(stderr, "*_IRET methods need iret mode\n"); exit(1); }
        to_user(g, rip, rsi, rdx); /* writes the frame */
        struct kvm_regs *R = &g->run->s.regs.regs;
        R->rip = m == M_R0_RELOAD_IRET ? R_RELOAD_IRET : R_INVLPG_IRET;
        R->rsi = m == M_R0_INVLPG_IRET ? va : rsi;
        if (m == M_R0_INVLPG_IRET && rsi != va) { fprintf(stderr, "invlpg-iret: rsi clash\n"); exit(1); }
        return do_run(g);
    }
    if (resync(g, m, va) < 0) { struct ex bad = {.kind = 4}; return bad; }
    return step(g, rip, rsi, rdx);
}

/* ---------------------------------------------------------------- edits */
enum { E_UNMAP, E_RDONLY, E_NX, E_MAPNEW, E_REMAP, E_HUGE_UNMAP, E_PDE_NEW, E_SPLIT, E_ADD_W, E_CLEAR_NX, E_NEDITS };
static const char *ename[] = {"1 clear P (4K)", "2 clear W", "3 set NX", "4 map not-present", "5 remap", "6 clear P of 2M PDE",
                              "7 PDE 0 -> new table", "8 split 2M PDE->table", "9 set W (after a #PF)", "10 clear NX (after #PF)"};
#define NEWPDE_VA 0x1400000ull
#define SPLIT_VA 0x1600000ull

struct helper { int fd; struct kvm_run *run; };
static struct helper make_helper(struct vm *g);
static double helper_zap(struct vm *g, struct helper *h, int n);
static double helper_write(struct vm *g, struct helper *h, int npairs);

/* The edit is done by: 0 = host write; 1 = ring-0 stub write; 2 = ring-0 write+invlpg; 3 = ring-0 write+movcr3 */
static const char *run_edit(struct vm *g, int edit, int m, int writer, char *detail) {
    struct ex e;
    int pdelevel = edit == E_HUGE_UNMAP || edit == E_PDE_NEW || edit == E_SPLIT;
    uint64_t va = (edit == E_NX || edit == E_CLEAR_NX) ? B : edit == E_HUGE_UNMAP ? HUGE_VA : edit == E_PDE_NEW ? NEWPDE_VA : edit == E_SPLIT ? SPLIT_VA : A;
    uint64_t *ent = pdelevel ? pde(g, va) : pte(g, va);
    uint64_t ent_gva = pdelevel ? PD + (va >> 21) * 8 : PT_GPA + ((va - TEST_BASE) >> 12) * 8;
    uint64_t nv = 0;
    e = do_run(g); /* initial: S_NOP at start */
    if (e.kind != 0) { show("start", e); return "ERR"; }
    switch (edit) {
    case E_UNMAP:
        e = step(g, S_READ, A, 0);
        if (e.kind != 0 || (e.rax & 0xff) != 0x11) { show("pre", e); return "ERR"; }
        nv = *ent & ~P;
        break;
    case E_RDONLY:
        e = step(g, S_WRITE, A, 0x22);
        if (e.kind != 0 || g->mem[A] != 0x22) { show("pre", e); return "ERR"; }
        nv = *ent & ~W;
        break;
    case E_NX:
        e = step(g, S_EXEC, B, 0);
        if (e.kind != 0 || (e.rax & 0xffff) != 0xb0b) { show("pre", e); return "ERR"; }
        nv = *ent | NX;
        break;
    case E_MAPNEW:
        *ent = 0;
        e = step(g, S_READ, A, 0);
        if (e.kind != 1 || e.vector != 14) { show("pre", e); return "ERR"; }
        nv = TGT | P | W | U | AD;
        break;
    case E_REMAP:
        e = step(g, S_READ, A, 0);
        if (e.kind != 0 || (e.rax & 0xff) != 0x11) { show("pre", e); return "ERR"; }
        nv = TGT | P | W | U | AD;
        break;
    case E_HUGE_UNMAP:
        e = step(g, S_READ, HUGE_VA, 0);
        if (e.kind != 0 || (e.rax & 0xff) != 0x66) { show("pre", e); return "ERR"; }
        nv = *ent & ~P;
        break;
    case E_ADD_W:
        *ent &= ~W;
        e = step(g, S_READ, A, 0); /* shadow PTE exists, read-only */
        e = step(g, S_WRITE, A, 0x22);
        if (e.kind != 1 || e.vector != 14) { show("pre", e); return "ERR"; }
        nv = *ent | W;
        break;
    case E_CLEAR_NX:
        *ent |= NX;
        e = step(g, S_READ, B, 0); /* shadow PTE exists, NX */
        e = step(g, S_EXEC, B, 0);
        if (e.kind != 1 || e.vector != 14) { show("pre", e); return "ERR"; }
        nv = *ent & ~NX;
        break;
    case E_PDE_NEW: {
        *ent = 0;
        e = step(g, S_READ, va, 0);
        if (e.kind != 1 || e.vector != 14) { show("pre", e); return "ERR"; }
        uint64_t *t = (uint64_t *)(g->ptmem + 0x4000);
        t[0] = TGT | P | W | U | AD;
        nv = (PT_GPA + 0x4000) | P | W | U | 0x20;
        break;
    }
    case E_SPLIT: {
        memset(g->mem + SPLIT_VA, 0x55, 4096);
        e = step(g, S_READ, va, 0);
        if (e.kind != 0 || (e.rax & 0xff) != 0x55) { show("pre", e); return "ERR"; }
        uint64_t *t = (uint64_t *)(g->ptmem + 0x5000);
        t[0] = TGT | P | W | U | AD;
        for (int i = 1; i < 512; i++) t[i] = (SPLIT_VA + i * 4096ull) | P | W | U | AD;
        nv = (PT_GPA + 0x5000) | P | W | U | 0x20;
        break;
    }
    }
    if (writer == 4) { /* host writes; helper does one misaligned same-value store into another entry of the table */
        *ent = nv;
        struct helper h = make_helper(g);
        uint64_t *pairs = (uint64_t *)(g->mem + BATCH_AREA);
        pairs[0] = pdelevel ? PD + ((0x1200000ull >> 21) * 8) : PT_GPA + ((va - TEST_BASE) >> 21) * 0x1000 + 0x1ff * 8;
        helper_zap(g, &h, 1);
        munmap(h.run, ioctl(g->kvm, KVM_GET_VCPU_MMAP_SIZE, 0)); close(h.fd);
    } else if (writer == 3) { /* the helper vCPU writes the entry */
        struct helper h = make_helper(g); /* created after vCPU 0 ran: fine, it starts in ring 0 */
        uint64_t *pairs = (uint64_t *)(g->mem + BATCH_AREA);
        pairs[0] = ent_gva; pairs[1] = nv;
        helper_write(g, &h, 1);
        munmap(h.run, ioctl(g->kvm, KVM_GET_VCPU_MMAP_SIZE, 0)); close(h.fd);
        if (*ent != nv) { strcpy(detail, "helper write did not land"); return "ERR"; }
    } else if (writer == 0) *ent = nv;
    else if (writer == 2) { /* host write, then a ring-0 rewrite (same value) of another entry of the same table */
        *ent = nv;
        uint64_t dva = pdelevel ? 0x1200000ull : TEST_BASE + 0x1ff000;
        uint64_t *dent = pdelevel ? pde(g, dva) : pte(g, dva);
        uint64_t dgva = pdelevel ? PD + (dva >> 21) * 8 : PT_GPA + ((dva - TEST_BASE) >> 12) * 8;
        e = ring0(g, R_WPTE, dgva, *dent, dva, 0, 0);
        if (e.kind != 2 || e.port != 0x23) { show("ring0 dummy write", e); return "ERR"; }
    } else {
        static const uint64_t stub[] = {0, R_WPTE, R_WPTE_INV, R_WPTE_RELOAD};
        static const int port[] = {0, 0x23, 0x24, 0x25};
        e = ring0(g, stub[writer], ent_gva, nv, va, 0, 0);
        if (e.kind != 2 || e.port != port[writer]) { show("ring0 write", e); return "ERR"; }
        if (*ent != nv) { sprintf(detail, "ring-0 write did not land (%llx)", (unsigned long long)*ent); return "ERR"; }
    }
    switch (edit) {
    case E_UNMAP: case E_HUGE_UNMAP: case E_REMAP: case E_MAPNEW: case E_PDE_NEW: case E_SPLIT:
        e = resync_and_step(g, m, va, S_READ, va, 0);
        break;
    case E_RDONLY: case E_ADD_W:
        e = resync_and_step(g, m, va, S_WRITE, A, 0x33);
        break;
    case E_NX: case E_CLEAR_NX:
        e = resync_and_step(g, m, va, S_EXEC, B, 0);
        break;
    }
    if (e.kind == 1) sprintf(detail, "#%d err=%#llx cr2=%#llx", e.vector, (unsigned long long)e.err, (unsigned long long)e.cr2);
    else if (e.kind == 0) sprintf(detail, "rax=%#llx", (unsigned long long)e.rax);
    else if (e.kind == 4) { strcpy(detail, resync_err); return "n/a"; }
    else { sprintf(detail, "exit %llu port %#x", (unsigned long long)e.exit_reason, e.port); return "ERR"; }
    switch (edit) {
    case E_UNMAP: case E_HUGE_UNMAP: return e.kind == 1 && e.vector == 14 ? "SEEN" : "stale";
    case E_RDONLY:
        if (e.kind == 1 && e.vector == 14) return "SEEN";
        return g->mem[A] == 0x33 ? "stale" : "??";
    case E_NX: return e.kind == 1 && e.vector == 14 ? "SEEN" : "stale";
    case E_ADD_W: return e.kind == 0 && g->mem[A] == 0x33 ? "SEEN" : "stale";
    case E_CLEAR_NX: return e.kind == 0 && (e.rax & 0xffff) == 0xb0b ? "SEEN" : "stale";
    case E_MAPNEW: case E_PDE_NEW:
        if (e.kind == 0 && (e.rax & 0xff) == 0x77) return "SEEN";
        return "stale";
    case E_SPLIT:
        if (e.kind == 0 && (e.rax & 0xff) == 0x77) return "SEEN";
        if (e.kind == 0 && (e.rax & 0xff) == 0x55) return "stale";
        return "??";
    case E_REMAP:
        if (e.kind == 0 && (e.rax & 0xff) == 0x77) return "SEEN";
        if (e.kind == 0 && (e.rax & 0xff) == 0x11) return "stale";
        return "??";
    }
    return "??";
}

static void matrix_add(void) {
    for (int edit = E_ADD_W; edit <= E_CLEAR_NX; edit++) {
        char detail[128] = "";
        struct vm g;
        build(&g, 0, 0);
        const char *res = run_edit(&g, edit, M_NONE, 0, detail);
        printf("host-write   none   %-24s %-6s %s\n", ename[edit], res, detail);
        destroy(&g);
    }
}

static void matrix(int iret_mode) {
    printf("return path: %s\n", iret_mode ? "iretq (only KVM_SYNC_X86_REGS dirty)" : "KVM_SYNC_X86_SREGS (forkvm style)");
    int methods[] = {M_NONE, M_SREGS_SAME, M_SREGS_ALT, M_SYNC_ALT, M_SREGS_FRESH, M_SREGS_ROLE, M_R0_RELOAD, M_R0_INVLPG,
                     M_SLOT_ALL, M_SLOT_PT, M_DIRTYLOG, M_R0_RELOAD_IRET, M_R0_INVLPG_IRET, M_HOST_MPROT4K, M_HOST_MPROT2M};
    const char *wname[] = {"host-write", "ring0-write", "host+r0dummy", "helper-vcpu", "host+helperzap"};
    int wfirst = getenv("WRITER") ? atoi(getenv("WRITER")) : 0, wlast = getenv("WRITER") ? atoi(getenv("WRITER")) : 2;
    for (int w = wfirst; w <= wlast; w++)
        for (unsigned mi = 0; mi < sizeof methods / sizeof methods[0]; mi++) {
            int m = methods[mi];
            if (!iret_mode && (m == M_R0_RELOAD_IRET || m == M_R0_INVLPG_IRET)) continue;
            if (iret_mode && m == M_SYNC_ALT) continue;
            if (w && (m == M_R0_RELOAD || m == M_R0_INVLPG || m == M_R0_RELOAD_IRET || m == M_R0_INVLPG_IRET)) continue;
            for (int edit = 0; edit < E_NEDITS; edit++) {
                char detail[128] = "";
                struct vm g;
                build(&g, iret_mode, m == M_SLOT_PT);
                const char *res = run_edit(&g, edit, m, w, detail);
                printf("%-12s %-32s %-20s %-6s %s\n", wname[w], mname[m], ename[edit], res, detail);
                fflush(stdout);
                destroy(&g);
            }
        }
}

/* ---------------------------------------------------------------- checks */
static void check(void) {
    struct vm g;
    struct ex e;
    for (int mode = 0; mode < 2; mode++) {
        build(&g, mode, 0);
        e = do_run(&g); show(mode ? "[iret] first run (S_NOP)" : "[sregs] first run (S_NOP)", e);
        e = step(&g, S_READ, A, 0); show("  read A", e);
        e = step(&g, S_EXEC, B, 0); show("  call B", e);
        *pte(&g, A + 0x10000) = 0;
        e = step(&g, S_READ, A + 0x10000, 0); show("  read not-present page", e);
        {
            struct kvm_sregs s; ioctl(g.vcpu, KVM_GET_SREGS, &s);
            printf("    KVM_GET_SREGS: cr2=%#llx cs.dpl=%d; sync-regs rip=%#llx rsp=%#llx\n", (unsigned long long)s.cr2, s.cs.dpl,
                   (unsigned long long)g.run->s.regs.regs.rip, (unsigned long long)g.run->s.regs.regs.rsp);
        }
        e = step(&g, S_WRITE, UCODE + 0x800, 0x90); show("  write to a writable page", e);
        *pte(&g, A + 0x20000) &= ~W;
        e = step(&g, S_WRITE, A + 0x20000, 1); show("  write read-only page", e);
        *pte(&g, A + 0x30000) |= NX;
        uint8_t ret = 0xc3; put(&g, A + 0x30000, &ret, 1);
        e = step(&g, S_EXEC, A + 0x30000, 0); show("  call NX page", e);
        e = step(&g, S_READ, 0x8000000, 0); show("  read beyond PD mappings", e);
        e = step(&g, S_NOP, 0, 0); show("  nop", e);
        e = ring0(&g, R_NOP, 0, 0, 0, 0, 0); show("  ring0 nop stub", e);
        e = ring0(&g, R_VMCALL, 0, 0, 0, 0, 0x17088203); show("  ring0 vmcall PVM_HC_TLB_FLUSH", e);
        e = ring0(&g, R_VMCALL, 0, 0, 0, 0, 9 /*KVM_HC_CLOCK_PAIRING*/); show("  ring0 vmcall 9", e);
        e = ring0(&g, R_SYSCALL0, 0, 0, 0, 0, 0x17088203); show("  ring0 syscall rax=PVM_HC_TLB_FLUSH", e);
        e = step(&g, S_NOP, 0, 0); show("  nop", e);
        destroy(&g);
    }
    /* no IDT */
    memset(&g, 0, sizeof g);
    {
        struct vm h; h.no_idt = 1;
        build(&h, 0, 0); /* build() zeroes: set no_idt after and reapply */
        h.no_idt = 1;
        struct kvm_sregs s; ioctl(h.vcpu, KVM_GET_SREGS, &s); s.idt.limit = 0; ioctl(h.vcpu, KVM_SET_SREGS, &s);
        e = do_run(&h); show("[no IDT] first run", e);
        *pte(&h, A) = 0;
        e = step(&h, S_READ, A, 0); show("[no IDT] read not-present page", e);
        struct kvm_sregs s2; ioctl(h.vcpu, KVM_GET_SREGS, &s2);
        struct kvm_regs r2; ioctl(h.vcpu, KVM_GET_REGS, &r2);
        printf("    KVM_GET_SREGS cr2=%#llx rip=%#llx\n", (unsigned long long)s2.cr2, (unsigned long long)r2.rip);
        destroy(&h);
    }
}

/* ---------------------------------------------------------------- costs */
static int cmpd(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
static double median(double *v, int n) { qsort(v, n, sizeof *v, cmpd); return v[n / 2]; }
static double pct(double *v, int n, double p) { qsort(v, n, sizeof *v, cmpd); return v[(int)(n * p)]; }

static void cost(int m, int k, int n, int iret_mode) {
    struct vm g;
    build(&g, iret_mode, m == M_SLOT_PT);
    struct ex e = do_run(&g);
    if (e.kind != 0) { show("start", e); exit(1); }
    double *t_nop = calloc(n, 8), *t_res = calloc(n, 8), *t_t1 = calloc(n, 8), *t_t2 = calloc(n, 8), *t_rn = calloc(n, 8);
    /* first touch (cold) */
    double c0 = now_us();
    e = step(&g, S_TOUCH, TOUCH_BASE, k);
    double cold = now_us() - c0;
    if (e.kind != 0) { show("touch", e); exit(1); }
    for (int i = 0; i < n + 5; i++) {
        int j = i - 5; /* 5 warm-up iterations */
        double t0 = now_us();
        e = step(&g, S_TOUCH, TOUCH_BASE, k);
        double t1 = now_us();
        if (e.kind != 0) { show("touch1", e); exit(1); }
        *pte(&g, Z) ^= W; /* the "edit": an untouched page's PTE */
        double t2 = now_us();
        if (m == M_R0_RELOAD_IRET || m == M_R0_INVLPG_IRET) {
            e = resync_and_step(&g, m, Z, S_NOP, Z, 0); /* resync folded into the return */
        } else {
            if (resync(&g, m, Z) < 0) { printf("%s: %s\n", mname[m], resync_err); exit(1); }
            double t3 = now_us();
            if (j >= 0) t_res[j] = t3 - t2;
            e = step(&g, S_NOP, Z, 0);
        }
        double t4 = now_us();
        if (e.kind != 0) { show("nop", e); exit(1); }
        e = step(&g, S_NOP, 0, 0); /* plain round trip: the floor, same run */
        double t5 = now_us();
        e = step(&g, S_TOUCH, TOUCH_BASE, k);
        double t6 = now_us();
        if (e.kind != 0) { show("touch2", e); exit(1); }
        if (j >= 0) {
            t_t1[j] = t1 - t0; t_rn[j] = t4 - t2; t_nop[j] = t5 - t4; t_t2[j] = t6 - t5;
            if (m == M_R0_RELOAD_IRET || m == M_R0_INVLPG_IRET) t_res[j] = (t4 - t2) - (t5 - t4);
        }
    }
    double mn = median(t_nop, n), mrn = median(t_rn, n);
    printf("%-32s %s K=%-4d n=%d | floor(nop rt) %7.1f | resync %7.1f (p90 %7.1f) | resync+nop rt %7.1f (+%6.1f) | "
           "touch before %8.1f  after %8.1f (+%8.1f) | cold touch %.0f\n",
           mname[m], iret_mode ? "iret " : "sregs", k, n, mn, median(t_res, n), pct(t_res, n, 0.9), mrn, mrn - mn,
           median(t_t1, n), median(t_t2, n), median(t_t2, n) - median(t_t1, n), cold);
    destroy(&g);
}

/* Batching: T leaf tables (each fully shadowed: all 512 pages touched), one PTE edited by the host in each,
 * then one ring-0 stub writes one entry of each table (unsync), then the return to ring 3 alternates CR3 (sync).
 * Also: cost of the ring-0 write loop itself on a plain data page (emulation cost per instruction). */
#define BIG_FIRST 8   /* PD indexes [8, 8+T) get 4 KiB tables at PT_GPA + 0x10000 + i*0x1000 */
static void batch(int T, int n) {
    struct vm g;
    build(&g, 0, 0);
    for (int i = 0; i < T; i++) {
        uint64_t base = (uint64_t)(BIG_FIRST + i) << 21;
        uint64_t *t = (uint64_t *)(g.ptmem + 0x10000 + i * 0x1000);
        for (int j = 0; j < 512; j++) t[j] = (base + j * 4096ull) | P | W | U | AD;
        *pde(&g, base) = (PT_GPA + 0x10000 + i * 0x1000) | P | W | U | 0x20;
    }
    struct ex e = do_run(&g);
    uint64_t first = (uint64_t)BIG_FIRST << 21;
    double c0 = now_us();
    e = step(&g, S_TOUCH, first, 512 * T);
    double cold = now_us() - c0;
    if (e.kind != 0) { show("touch", e); exit(1); }
    double *tb = calloc(n, 8), *ts = calloc(n, 8), *tf = calloc(n, 8), *tt = calloc(n, 8), *tw = calloc(n, 8), *tn = calloc(n, 8);
    uint64_t *pairs = (uint64_t *)(g.mem + BATCH_AREA);
    for (int it = 0; it < n + 3; it++) {
        for (int i = 0; i < T; i++) {
            uint64_t *t = (uint64_t *)(g.ptmem + 0x10000 + i * 0x1000);
            t[511] ^= W; /* host edit */
            pairs[2 * i] = PT_GPA + 0x10000 + i * 0x1000 + 510 * 8; /* ring-0 rewrite of another entry, same value */
            pairs[2 * i + 1] = t[510];
        }
        double t0 = now_us();
        e = ring0(&g, R_BATCH, BATCH_AREA, 0, 0, T, 0);
        double t1 = now_us();
        expect_port(e, 0x27, "batch");
        g.cr3 = g.cr3 == PML4A ? PML4B : PML4A;
        e = step(&g, S_NOP, 0, 0);
        double t2 = now_us();
        e = step(&g, S_NOP, 0, 0);
        double t3 = now_us();
        e = step(&g, S_TOUCH, first, 512 * T);
        double t4 = now_us();
        e = step(&g, S_TOUCH, first, 512 * T);
        double t5 = now_us();
        /* emulation cost: the same loop writing T*8 words of a plain data page */
        for (int i = 0; i < 8 * T; i++) { pairs[2 * i] = 0x1d0000 + i * 8; pairs[2 * i + 1] = i; }
        double t6 = now_us();
        e = ring0(&g, R_BATCH, BATCH_AREA, 0, 0, 8 * T, 0);
        double t7 = now_us();
        e = ring0(&g, R_NOP, 0, 0, 0, 0, 0);
        double t8 = now_us();
        e = step(&g, S_NOP, 0, 0);
        if (it >= 3) {
            int j = it - 3;
            tb[j] = t1 - t0; ts[j] = (t2 - t1) - (t3 - t2); tf[j] = t3 - t2; tt[j] = (t4 - t3) - (t5 - t4);
            tw[j] = t7 - t6; tn[j] = t8 - t7;
        }
    }
    printf("T=%2d tables (%d pages shadowed): ring-0 stub writing 1 entry/table %.1f us | extra on the CR3-alternating return (sync) %.1f us "
           "| floor syscall rt %.1f | re-touch penalty %.1f us | ring-0 loop writing %d plain words %.1f us vs ring-0 nop %.1f (=> %.2f us/write) | cold touch %.0f us\n",
           T, 512 * T, median(tb, n), median(ts, n), median(tf, n), median(tt, n), 8 * T, median(tw, n), median(tn, n),
           (median(tw, n) - median(tn, n)) / (8 * T), cold);
    destroy(&g);
}

/* ---------------------------------------------------------------- repeated cycles */
static void seq(int variant, int cycles) {
    static const char *vn[] = {"host-write + r0dummy + syncregs-alt each cycle", "r0dummy only in cycle 0, then host-write + syncregs-alt",
                               "host-write + syncregs-alt (never r0dummy)", "host-write + syncregs-alt, then r0dummy after the check (pre-unsync for next cycle)"};
    struct vm g;
    build(&g, 0, 0);
    struct ex e = do_run(&g);
    int ok = 0, bad = 0;
    char trace[256] = "";
    for (int i = 0; i < cycles; i++) {
        uint64_t target = (i & 1) ? A : TGT;
        uint8_t want = (i & 1) ? 0x11 : 0x77;
        *pte(&g, A) = target | P | W | U | AD;
        if (variant == 0 || (variant == 1 && i == 0)) {
            e = ring0(&g, R_WPTE, PT_GPA, *pte(&g, A), A, 0, 0);
            expect_port(e, 0x23, "dummy");
        }
        g.cr3 = g.cr3 == PML4A ? PML4B : PML4A;
        e = step(&g, S_READ, A, 0);
        int good = e.kind == 0 && (e.rax & 0xff) == want;
        good ? ok++ : bad++;
        if (strlen(trace) < 200) strcat(trace, good ? "+" : "-");
        if (variant == 3) { e = ring0(&g, R_WPTE, PT_GPA, *pte(&g, A), A, 0, 0); expect_port(e, 0x23, "dummy"); }
    }
    printf("seq[%d] %s: %d seen, %d stale  %s\n", variant, vn[variant], ok, bad, trace);
    destroy(&g);
}

static void seqc(int cycles) {
    secure_pt = 1;
    struct vm g;
    build(&g, 0, 0);
    secure_pt = 0;
    struct ex e = do_run(&g);
    e = step(&g, S_READ, PT_GPA, 0);
    printf("seqc: ring-3 read of the leaf-table window under root A: %s\n", e.kind == 1 ? "faults (good)" : "READABLE");
    int ok = 0, bad = 0;
    char trace[256] = "";
    for (int i = 0; i < cycles; i++) {
        uint64_t target = (i % 3 == 0) ? A : (i % 3 == 1) ? TGT : 0;
        *pte(&g, A) = target ? (target | P | W | U | AD) : 0;
        if (resync(&g, M_R0DUMMY_ROOTC, A) < 0) exit(1);
        e = step(&g, S_READ, A, 0);
        int good = target == 0 ? (e.kind == 1 && e.vector == 14)
                               : (e.kind == 0 && (e.rax & 0xff) == (target == A ? 0x11 : 0x77));
        good ? ok++ : bad++;
        if (strlen(trace) < 200) strcat(trace, good ? "+" : "-");
    }
    printf("seqc: host-write + r0dummy under root C + return under A (P/remap/unmap cycle): %d seen, %d stale %s\n", ok, bad, trace);
    destroy(&g);
}

/* ---------------------------------------------------------------- ring-0 write permissions */
static void perm(void) {
    struct { const char *name; uint64_t flags; int wp; } c[] = {
        {"PT window user+writable, CR0.WP=1", P | W | U | AD | PS, 1},
        {"PT window user read-only, CR0.WP=1", P | U | AD | PS, 1},
        {"PT window user read-only, CR0.WP=0", P | U | AD | PS, 0},
        {"PT window supervisor+writable, CR0.WP=1", P | W | AD | PS, 1},
        {"PT window supervisor read-only, CR0.WP=0", P | AD | PS, 0},
    };
    for (unsigned i = 0; i < sizeof c / sizeof c[0]; i++) {
        struct vm g;
        build(&g, 0, 0);
        *pde(&g, PT_GPA) = PT_GPA | c[i].flags;
        if (!c[i].wp) {
            struct kvm_sregs s; ioctl(g.vcpu, KVM_GET_SREGS, &s); s.cr0 &= ~(1ull << 16);
            if (ioctl(g.vcpu, KVM_SET_SREGS, &s) < 0) { printf("%s: SET_SREGS WP=0 refused\n", c[i].name); destroy(&g); continue; }
        }
        struct ex e = do_run(&g);
        uint64_t nv = *pte(&g, A) | NX;
        e = ring0(&g, R_WPTE, PT_GPA, nv, A, 0, 0);
        printf("%-44s ring-0 write: ", c[i].name);
        if (e.kind == 2 && e.port == 0x23) printf("ok (landed=%d)", *pte(&g, A) == nv);
        else if (e.kind == 1) printf("#%d err=%#llx cr2=%#llx", e.vector, (unsigned long long)e.err, (unsigned long long)e.cr2);
        else printf("exit %llu", (unsigned long long)e.exit_reason);
        e = step(&g, S_WRITE, PT_GPA + 8, 0x5);
        printf(" | ring-3 write: ");
        if (e.kind == 0) printf("ok");
        else if (e.kind == 1) printf("#%d err=%#llx", e.vector, (unsigned long long)e.err);
        else printf("exit %llu", (unsigned long long)e.exit_reason);
        e = step(&g, S_READ, PT_GPA + 8, 0);
        printf(" | ring-3 read: ");
        if (e.kind == 0) printf("ok\n");
        else if (e.kind == 1) printf("#%d err=%#llx\n", e.vector, (unsigned long long)e.err);
        else printf("exit %llu\n", (unsigned long long)e.exit_reason);
        destroy(&g);
    }
}

/* "Pre-unsync in the syscall stub": LSTAR -> stub that rewrites one entry of the leaf table that holds Z
 * (mov rax,[pte]; mov [pte],rax) before its `out`. The VMM edits Z's PTE from the host and returns to ring 3
 * with CR3 alternated (rides on the sync-regs return). No extra KVM_RUN. */
/* A second vCPU that lives in ring 0 (created there, never runs ring 3) under root C, used only to write
 * page-table entries: its writes are emulated by KVM, which zaps the SPTE of each written entry. */
static struct helper make_helper(struct vm *g) {
    struct helper h;
    h.fd = ioctl(g->vm, KVM_CREATE_VCPU, 1);
    if (h.fd < 0) die("KVM_CREATE_VCPU 1");
    h.run = mmap(NULL, ioctl(g->kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED, h.fd, 0);
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + 256 * sizeof(struct kvm_cpuid_entry2));
    c->nent = 256;
    ioctl(g->kvm, KVM_GET_SUPPORTED_CPUID, c);
    if (ioctl(h.fd, KVM_SET_CPUID2, c) < 0) die("SET_CPUID2 helper");
    free(c);
    struct kvm_sregs sr;
    ioctl(g->vcpu, KVM_GET_SREGS, &sr); /* vCPU 0's system state (it has not run yet or is in ring 0) */
    struct kvm_segment cs = g->ucs, ds = g->uds;
    cs.dpl = 0; cs.selector = 0x08; ds.dpl = 0; ds.selector = 0x10;
    sr.cs = cs; sr.ss = sr.ds = sr.es = ds;
    sr.cr3 = PML4C;
    if (ioctl(h.fd, KVM_SET_SREGS, &sr) < 0) die("SET_SREGS helper");
    struct kvm_regs rg = {.rip = 0x8640, .rsp = 0x1e000, .rflags = 2};
    ioctl(h.fd, KVM_SET_REGS, &rg);
    h.run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    /* helper loop at 0x8640: out 0x2c (wait for work); then the batch loop over rcx pairs at [rdi]; jmp back */
    uint8_t code[] = {0xe6, 0x2c, /* out 0x2c */
                      0x48, 0x85, 0xc9, 0x74, 0xf9, /* test rcx,rcx; jz -7 (back to out) */
                      0x48, 0x8b, 0x07, 0x48, 0x8b, 0x57, 0x08, 0x48, 0x89, 0x10, 0x48, 0x83, 0xc7, 0x10, 0x48, 0xff, 0xc9,
                      0x75, 0xed, /* loop */
                      0xeb, 0xe6 /* jmp to out */};
    put(g, 0x8640, code, sizeof code);
    /* zap loop at 0x8680: for each pair, a 2-byte same-value store at offset 3 of the entry at [rdi]
     * (a "misaligned" page-table write: KVM zaps the whole shadow page of that table) */
    uint8_t zap[] = {0xe6, 0x2d, 0x48, 0x85, 0xc9, 0x74, 0xf9,
                     0x48, 0x8b, 0x07, 0x66, 0x8b, 0x50, 0x03, 0x66, 0x89, 0x50, 0x03, 0x48, 0x83, 0xc7, 0x10, 0x48, 0xff, 0xc9,
                     0x75, 0xec, 0xeb, 0xe3};
    put(g, 0x8680, zap, sizeof zap);
    if (ioctl(h.fd, KVM_RUN, 0) < 0) die("helper first run");
    if (h.run->exit_reason != KVM_EXIT_IO || h.run->io.port != 0x2c) { fprintf(stderr, "helper: exit %u\n", h.run->exit_reason); exit(1); }
    return h;
}
static double helper_run(struct vm *g, struct helper *h, uint64_t rip, int port, int npairs) {
    h->run->s.regs.regs.rip = rip;
    h->run->s.regs.regs.rdi = BATCH_AREA; h->run->s.regs.regs.rcx = npairs;
    h->run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
    double t0 = now_us();
    if (ioctl(h->fd, KVM_RUN, 0) < 0) die("helper run");
    double t1 = now_us();
    if (h->run->exit_reason != KVM_EXIT_IO || h->run->io.port != port) { fprintf(stderr, "helper: exit %u port %x\n", h->run->exit_reason, h->run->io.port); exit(1); }
    return t1 - t0;
}
static double helper_zap(struct vm *g, struct helper *h, int n) { return helper_run(g, h, 0x8682, 0x2d, n); }
static double helper_write(struct vm *g, struct helper *h, int npairs) {
    h->run->s.regs.regs.rip = 0x8642;
    h->run->s.regs.regs.rdi = BATCH_AREA; h->run->s.regs.regs.rcx = npairs;
    h->run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
    double t0 = now_us();
    if (ioctl(h->fd, KVM_RUN, 0) < 0) die("helper run");
    double t1 = now_us();
    if (h->run->exit_reason != KVM_EXIT_IO || h->run->io.port != 0x2c) { fprintf(stderr, "helper: exit %u port %x\n", h->run->exit_reason, h->run->io.port); exit(1); }
    return t1 - t0;
}

static void vcpu2(int k, int n) {
    secure_pt = 1; /* roots A/B do not map the leaf tables */
    struct vm g;
    build(&g, 0, 0);
    secure_pt = 0;
    struct helper h = make_helper(&g);
    struct ex e = do_run(&g);
    e = step(&g, S_TOUCH, TOUCH_BASE, k);
    uint64_t *pairs = (uint64_t *)(g.mem + BATCH_AREA);
    /* correctness: unmap / remap / map cycle on A, each followed by helper write + CR3-alternating return */
    int ok = 0, bad = 0;
    char trace[128] = "";
    for (int i = 0; i < 60; i++) {
        uint64_t target = (i % 3 == 0) ? A : (i % 3 == 1) ? TGT : 0;
        *pte(&g, A) = target ? (target | P | W | U | AD) : 0;
        if (getenv("DUMMY_OTHER")) { pairs[0] = PT_GPA + 0x1ff * 8; pairs[1] = *pte(&g, TEST_BASE + 0x1ff000); }
        else { pairs[0] = PT_GPA; pairs[1] = *pte(&g, A); }
        helper_write(&g, &h, 1);
        if (getenv("NO_ALT")) g.cr3 = g.cr3 == PML4A ? PML4B : PML4A; /* undo the flip below */
        g.cr3 = g.cr3 == PML4A ? PML4B : PML4A;
        e = step(&g, S_READ, A, 0);
        int good = target == 0 ? (e.kind == 1 && e.vector == 14) : (e.kind == 0 && (e.rax & 0xff) == (target == A ? 0x11 : 0x77));
        good ? ok++ : bad++;
        if (strlen(trace) < 100) strcat(trace, good ? "+" : "-");
    }
    printf("helper-vCPU protocol correctness: %d ok, %d wrong %s\n", ok, bad, trace);
    *pte(&g, A) = A | P | W | U | AD;
    e = step(&g, S_NOP, 0, 0);
    double *a = calloc(n, 8), *b = calloc(n, 8), *c = calloc(n, 8), *d = calloc(n, 8), *tt = calloc(n, 8);
    for (int i = 0; i < n + 3; i++) {
        double t0 = now_us();
        e = step(&g, S_NOP, 0, 0);
        double t1 = now_us();
        *pte(&g, Z) ^= W;
        pairs[0] = PT_GPA + ((Z - TEST_BASE) >> 12) * 8; pairs[1] = *pte(&g, Z);
        double hw = helper_write(&g, &h, 1);
        g.cr3 = g.cr3 == PML4A ? PML4B : PML4A;
        double t2 = now_us();
        e = step(&g, S_NOP, 0, 0);
        double t3 = now_us();
        double t4 = now_us();
        e = step(&g, S_TOUCH, TOUCH_BASE, k);
        double t5 = now_us();
        e = step(&g, S_TOUCH, TOUCH_BASE, k);
        double t6 = now_us();
        if (i >= 3) { int j = i - 3; a[j] = t1 - t0; b[j] = hw; c[j] = (t3 - t2) - (t1 - t0); d[j] = t2 - t1; tt[j] = (t5 - t4) - (t6 - t5); }
    }
    printf("K=%d: floor syscall rt %.1f | helper vCPU run (1 PTE write) %.1f us | whole host-side resync %.1f | extra on CR3-alternating return %.1f | re-touch penalty %.1f\n",
           k, median(a, n), median(b, n), median(d, n), median(c, n), median(tt, n));
    destroy(&g);
}

/* Helper-vCPU batching: T fully shadowed leaf tables; per iteration the host toggles W on `per` entries of
 * each table and the helper vCPU rewrites those entries (emulated writes -> KVM zaps each written SPTE). */
static void helperbatch(int T, int per, int n) {
    secure_pt = 1;
    struct vm g;
    build(&g, 0, 0);
    secure_pt = 0;
    for (int i = 0; i < T; i++) {
        uint64_t base = (uint64_t)(BIG_FIRST + i) << 21;
        uint64_t *t = (uint64_t *)(g.ptmem + 0x10000 + i * 0x1000);
        for (int j = 0; j < 512; j++) t[j] = (base + j * 4096ull) | P | W | U | AD;
        *pde(&g, base) = (PT_GPA + 0x10000 + i * 0x1000) | P | W | U | 0x20;
        /* root C must map the new tables' window too: it already maps all of slot 1 via pd_C[32] */
        *(uint64_t *)(g.mem + PDC + ((base >> 21) * 8)) = *pde(&g, base);
    }
    struct helper h = make_helper(&g);
    struct ex e = do_run(&g);
    uint64_t first = (uint64_t)BIG_FIRST << 21;
    e = step(&g, S_TOUCH, first, 512 * T);
    uint64_t *pairs = (uint64_t *)(g.mem + BATCH_AREA);
    double *a = calloc(n, 8), *b = calloc(n, 8), *c = calloc(n, 8), *d = calloc(n, 8);
    int wrong = 0;
    for (int it = 0; it < n + 3; it++) {
        int np = 0;
        int zapmode = per == 0;
        for (int i = 0; i < T; i++) {
            uint64_t *t = (uint64_t *)(g.ptmem + 0x10000 + i * 0x1000);
            if (zapmode) { /* host edits entry `it`; helper zaps the table's shadow page */
                int idx = it % 512;
                t[idx] ^= W;
                pairs[2 * np] = PT_GPA + 0x10000 + i * 0x1000 + 511 * 8;
                np++;
                continue;
            }
            for (int j = 0; j < per; j++) {
                int idx = (j * 509 + it) % 512;
                t[idx] ^= W;
                pairs[2 * np] = PT_GPA + 0x10000 + i * 0x1000 + idx * 8;
                pairs[2 * np + 1] = t[idx];
                np++;
            }
        }
        double hw = zapmode ? helper_zap(&g, &h, np) : helper_write(&g, &h, np);
        double t0 = now_us();
        e = step(&g, S_NOP, 0, 0);
        double t1 = now_us();
        e = step(&g, S_NOP, 0, 0);
        double t2 = now_us();
        e = step(&g, S_TOUCH, first, 512 * T);
        double t3 = now_us();
        e = step(&g, S_TOUCH, first, 512 * T);
        double t4 = now_us();
        /* spot check: a write to the first edited page of table 0 faults iff its W is clear */
        {
            int idx = zapmode ? it % 512 : (0 * 509 + it) % 512;
            uint64_t va = first + idx * 4096ull;
            int writable = (((uint64_t *)(g.ptmem + 0x10000))[idx] & W) != 0;
            e = step(&g, S_WRITE, va, 0);
            int faulted = e.kind == 1;
            if (faulted == writable) wrong++;
        }
        if (it >= 3) { int j = it - 3; a[j] = hw; b[j] = (t1 - t0) - (t2 - t1); c[j] = t2 - t1; d[j] = (t3 - t2) - (t4 - t3); }
    }
    if (per == 0) printf("helper vCPU whole-table zap (1 misaligned store per table): T=%d: helper run %.1f us | return extra %.1f | floor %.1f | re-touch of all %d pages penalty %.1f us | wrong %d\n",
           T, median(a, n), median(b, n), median(c, n), 512 * T, median(d, n), wrong);
    else printf("helper vCPU: T=%d tables x %d PTEs = %d writes: helper run %.1f us (%.2f us/PTE) | return extra %.1f | floor %.1f | re-touch penalty %.1f us | wrong %d\n",
           T, per, T * per, median(a, n), median(a, n) / (T * per), median(b, n), median(c, n), median(d, n), wrong);
    destroy(&g);
}

/* Accessed bit: does KVM set A in the guest PTE when it shadows it, and does it ever create an SPTE for a
 * gpte with A=0 (prefetch of neighbours)? X = A + 0x1000 (same 8-entry prefetch group as A). */
static void abit(void) {
    for (int preset = 0; preset < 2; preset++) {
        struct vm g;
        build(&g, 0, 0);
        uint64_t X = A + 0x1000 * 3;
        for (int i = 0; i < 8; i++) *pte(&g, A + i * 0x1000ull) = (A + i * 0x1000ull) | P | W | U | (preset ? AD : 0);
        memset(g.mem + X, 0x3c, 1);
        struct ex e = do_run(&g);
        e = step(&g, S_READ, A, 0);
        printf("[neighbours written with A=%d] after guest read of A: PTE(A)=%#llx PTE(X)=%#llx\n", preset,
               (unsigned long long)*pte(&g, A), (unsigned long long)*pte(&g, X));
        *pte(&g, X) &= ~P; /* host unmaps X, no resync */
        e = step(&g, S_READ, X, 0);
        printf("   host clears P of untouched neighbour X, no resync, guest reads X: %s\n",
               e.kind == 1 ? "faults (no stale SPTE)" : "reads old page (STALE prefetched SPTE)");
        e = step(&g, S_NOP, 0, 0);
        e = step(&g, S_WRITE, A + 0x1000 * 5, 1);
        printf("   after a guest write to A+5 pages: PTE=%#llx (D set by KVM: %s)\n", (unsigned long long)*pte(&g, A + 0x5000),
               (*pte(&g, A + 0x5000) & 0x40) ? "yes" : "no");
        destroy(&g);
    }
}

static void helperpriv(void) {
    struct vm g;
    build(&g, 0, 0);
    struct ex e = do_run(&g);
    struct helper h = make_helper(&g);
    uint64_t stubs[] = {R_RELOAD, R_INVLPG}; /* (vmcall: KVM_RUN never returns, spins; not tried) */
    const char *nm[] = {"mov rax,cr3; mov cr3,rax", "invlpg [rsi]"};
    for (int i = 0; i < 2; i++) {
        h.run->s.regs.regs.rip = stubs[i]; h.run->s.regs.regs.rsi = A; h.run->s.regs.regs.rax = 0x17088203;
        h.run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
        ioctl(h.fd, KVM_RUN, 0);
        printf("helper vCPU (born in ring 0): %-26s -> exit %u port %#x rax=%#llx\n", nm[i], h.run->exit_reason,
               h.run->exit_reason == KVM_EXIT_IO ? h.run->io.port : 0, (unsigned long long)h.run->s.regs.regs.rax);
        if (h.run->exit_reason != KVM_EXIT_IO) break;
    }
    (void)e;
    destroy(&g);
}

static void helpercost(int n) {
    double *a = calloc(n, 8), *b = calloc(n, 8), *c = calloc(30, 8);
    for (int round = 0; round < 3; round++) {
        for (int with = 0; with < 2; with++) {
            struct vm g;
            build(&g, 0, 0);
            struct ex e = do_run(&g);
            if (with) { double t0 = now_us(); struct helper h = make_helper(&g); c[round] = now_us() - t0; (void)h; }
            for (int i = 0; i < n; i++) { double t0 = now_us(); e = step(&g, S_NOP, 0, 0); (with ? b : a)[i] = now_us() - t0; }
            destroy(&g);
        }
        printf("syscall rt without helper vCPU %.1f us, with helper vCPU present %.1f us; helper creation (CREATE_VCPU+CPUID+SREGS+REGS+first run) %.0f us\n",
               median(a, n), median(b, n), c[round]);
    }
}

static void stubdummy(int k, int n) {
    struct vm g;
    build(&g, 0, 0);
    uint64_t ptea = PT_GPA + ((Z - TEST_BASE) >> 12) * 8;
    uint8_t st[24] = {0x48, 0xa1};
    memcpy(st + 2, &ptea, 8);
    st[10] = 0x48; st[11] = 0xa3; memcpy(st + 12, &ptea, 8);
    st[20] = 0xe6; st[21] = 0x20; st[22] = 0x48; st[23] = 0xcf;
    put(&g, 0x8600, st, sizeof st);
    struct ex e = do_run(&g);
    e = step(&g, S_TOUCH, TOUCH_BASE, k);
    double *a = calloc(n, 8), *b = calloc(n, 8), *c = calloc(n, 8);
    for (int pass = 0; pass < 2; pass++) {
        struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } m = {.h = {.nmsrs = 1}};
        m.e[0].index = 0xC0000082; m.e[0].data = pass ? 0x8600 : SYSCALL_STUB;
        if (ioctl(g.vcpu, KVM_SET_MSRS, &m) != 1) die("LSTAR");
        e = step(&g, S_NOP, 0, 0);
        for (int i = 0; i < n + 3; i++) {
            if (pass && !getenv("NOEDIT")) { *pte(&g, Z) ^= W; g.cr3 = g.cr3 == PML4A ? PML4B : PML4A; }
            double t0 = now_us();
            e = step(&g, S_NOP, 0, 0);
            double t1 = now_us();
            if (e.kind != 0) { show("stubdummy", e); exit(1); }
            if (i >= 3) (pass ? b : a)[i - 3] = t1 - t0;
        }
    }
    /* correctness: Z's W bit toggled each iteration; check a write to Z faults iff W clear */
    int ok = 0, bad = 0;
    for (int i = 0; i < 40; i++) {
        *pte(&g, Z) ^= W; g.cr3 = g.cr3 == PML4A ? PML4B : PML4A;
        int writable = (*pte(&g, Z) & W) != 0;
        e = step(&g, S_WRITE, Z, 1);
        int faulted = e.kind == 1 && e.vector == 14;
        (faulted == !writable) ? ok++ : bad++;
        if (faulted) { e = step(&g, S_NOP, 0, 0); } /* get back to a syscall exit so the stub runs */
    }
    for (int i = 0; i < n; i++) c[i] = 0;
    printf("K=%d: plain syscall rt %.1f us; syscall rt with stub pre-unsync + host edit + CR3-alternating return %.1f us (+%.1f); correctness %d ok / %d wrong\n",
           k, median(a, n), median(b, n), median(b, n) - median(a, n), ok, bad);
    destroy(&g);
}

static void pvmmsr(void) {
    struct vm g;
    build(&g, 0, 0);
    uint32_t idx[] = {0x4b564df0, 0x4b564df1, 0x4b564df2, 0x4b564df3, 0x4b564df4, 0x4b564df5, 0x4b564df6, 0x4b564df7, 0x4b564df8};
    for (unsigned i = 0; i < sizeof idx / 4; i++) {
        struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } m = {.h = {.nmsrs = 1}};
        m.e[0].index = idx[i];
        int r = ioctl(g.vcpu, KVM_GET_MSRS, &m);
        printf("GET_MSRS %#x -> %d (value %#llx)\n", idx[i], r, (unsigned long long)m.e[0].data);
    }
    struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } m = {.h = {.nmsrs = 1}};
    m.e[0].index = 0x4b564df7; m.e[0].data = PML4C;
    int r = ioctl(g.vcpu, KVM_SET_MSRS, &m);
    printf("SET_MSRS MSR_PVM_SWITCH_CR3=%#x -> %d\n", PML4C, r);
    struct ex e = do_run(&g);
    struct kvm_sregs s; ioctl(g.vcpu, KVM_GET_SREGS, &s);
    printf("after syscall: cr3 in ring 0 = %#llx (A=%#x C=%#x)\n", (unsigned long long)s.cr3, PML4A, PML4C);
    destroy(&g);
}

static void r0start(int n) {
    struct vm g;
    build(&g, 1, 0);
    struct kvm_sregs sr; ioctl(g.vcpu, KVM_GET_SREGS, &sr);
    struct kvm_segment cs = g.ucs, ds = g.uds;
    cs.dpl = 0; cs.selector = 0x08; ds.dpl = 0; ds.selector = 0x10;
    sr.cs = cs; sr.ss = ds;
    if (ioctl(g.vcpu, KVM_SET_SREGS, &sr) < 0) die("SET_SREGS ring0 start");
    struct kvm_regs rg = {.rip = 0x85c0, .rsp = FRAME - 64, .rflags = 2};
    ioctl(g.vcpu, KVM_SET_REGS, &rg);
    double *a = calloc(n, 8);
    struct ex e;
    for (int i = 0; i < n; i++) { double t0 = now_us(); e = do_run(&g); a[i] = now_us() - t0; if (e.kind != 2) { show("r0start", e); exit(1); } }
    printf("vCPU created in ring 0: out-loop exit round trip %.1f us\n", median(a, n));
    /* now go to ring 3 via the iret path and back via syscall */
    g.run->s.regs.regs.rip = R_NOP + 2; /* the iretq */
    for (int i = 0; i < n; i++) { double t0 = now_us(); e = step(&g, S_NOP, 0, 0); a[i] = now_us() - t0; if (e.kind != 0) { show("r0start->r3", e); exit(1); } }
    printf("  then ring-3 syscall round trips (iret return): %.1f us\n", median(a, n));
    e = ring0(&g, 0x85c0, 0, 0, 0, 0, 0);
    for (int i = 0; i < n; i++) { double t0 = now_us(); e = do_run(&g); a[i] = now_us() - t0; }
    printf("  then ring-0 out-loop again: %.1f us\n", median(a, n));
    destroy(&g);
}

static void rtt(int n) {
    /* ring-3 syscall round trip: iret return path, with and without SREGS in kvm_valid_regs */
    for (int mode = 0; mode < 4; mode++) {
        struct vm g;
        build(&g, mode & 1, 0);
        if (mode & 2) g.run->kvm_valid_regs = KVM_SYNC_X86_REGS;
        struct ex e = do_run(&g);
        double *a = calloc(n, 8);
        for (int i = 0; i < n; i++) {
            double t0 = now_us();
            if (!(mode & 1)) { /* sregs return needs the current sregs in the run area */
                if (mode & 2) { struct kvm_sregs s; ioctl(g.vcpu, KVM_GET_SREGS, &s); g.run->s.regs.sregs = s; }
            }
            e = step(&g, S_NOP, 0, 0);
            a[i] = now_us() - t0;
            if (e.kind != 0) { show("rtt", e); exit(1); }
        }
        printf("syscall round trip, return by %s, kvm_valid_regs=%s: %.1f us (p10 %.1f, p90 %.1f)\n", mode & 1 ? "iretq" : "SYNC_SREGS",
               mode & 2 ? "REGS" : "REGS|SREGS", median(a, n), pct(a, n, 0.1), pct(a, n, 0.9));
        destroy(&g);
    }
}

static void r0loop(int n) {
    struct vm g;
    build(&g, 0, 0);
    struct ex e = do_run(&g);
    double *a = calloc(n, 8), *b = calloc(n, 8), *c = calloc(n, 8), *d = calloc(n, 8);
    for (int i = 0; i < n; i++) {
        double t0 = now_us();
        e = ring0(&g, R_NOP, 0, 0, 0, 0, 0);
        double t1 = now_us();
        e = ring0(&g, R_NOP, 0, 0, 0, 0, 0);
        double t2 = now_us();
        e = ring0(&g, R_WPTE, PT_GPA + 8 * 300, *pte(&g, TEST_BASE + 300 * 4096), 0, 0, 0);
        double t3 = now_us();
        if (e.kind != 2) show("wpte", e);
        e = step(&g, S_NOP, 0, 0);
        double t4 = now_us();
        a[i] = t1 - t0; b[i] = t2 - t1; c[i] = t3 - t2; d[i] = t4 - t3;
    }
    e = ring0(&g, 0x85c0, 0, 0, 0, 0, 0);
    for (int i = 0; i < n; i++) { double t0 = now_us(); e = do_run(&g); a[i] = now_us() - t0; if (e.kind != 2) show("loop", e); }
    printf("ring0 out-loop, no registers set between runs: %.1f us\n", median(a, n));
    {   /* same, but IOPL=3 in rflags so no TSS bitmap check should be needed */
        struct kvm_regs *R = &g.run->s.regs.regs; R->rflags = getenv("RFL") ? strtoul(getenv("RFL"), 0, 0) : 0x3002; g.run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
        e = do_run(&g);
        for (int i = 0; i < n; i++) { double t0 = now_us(); e = do_run(&g); b[i] = now_us() - t0; }
        printf("ring0 out-loop with IOPL=3: %.1f us\n", median(b, n));
        for (int i = 0; i < n; i++) { double t0 = now_us(); g.run->kvm_dirty_regs = KVM_SYNC_X86_REGS; e = do_run(&g); b[i] = now_us() - t0; }
        printf("ring0 out-loop with IOPL=3, REGS marked dirty each run: %.1f us\n", median(b, n));
        R->rflags = 0x2; g.run->kvm_dirty_regs = KVM_SYNC_X86_REGS; e = do_run(&g);
    }
    printf("ring0 nop right after a ring-3 syscall exit: %.1f us; ring0 nop after ring0 nop: %.1f us; "
           "ring0 PTE write (table not shadowed) after ring0: %.1f us; ring-3 syscall round trip: %.1f us\n",
           median(a, n), median(b, n), median(c, n), median(d, n));
    destroy(&g);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) { fprintf(stderr, "usage: see source header\n"); return 2; }
    if (!strcmp(argv[1], "check")) check();
    else if (!strcmp(argv[1], "seq")) { for (int v = 0; v < 4; v++) seq(v, argc > 2 ? atoi(argv[2]) : 40); }
    else if (!strcmp(argv[1], "perm")) perm();
    else if (!strcmp(argv[1], "r0start")) r0start(argc > 2 ? atoi(argv[2]) : 300);
    else if (!strcmp(argv[1], "pvmmsr")) pvmmsr();
    else if (!strcmp(argv[1], "helperbatch")) helperbatch(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    else if (!strcmp(argv[1], "helpercost")) helpercost(atoi(argv[2]));
    else if (!strcmp(argv[1], "abit")) abit();
    else if (!strcmp(argv[1], "helperpriv")) helperpriv();
    else if (!strcmp(argv[1], "vcpu2")) vcpu2(atoi(argv[2]), atoi(argv[3]));
    else if (!strcmp(argv[1], "stubdummy")) stubdummy(atoi(argv[2]), atoi(argv[3]));
    else if (!strcmp(argv[1], "rtt")) rtt(argc > 2 ? atoi(argv[2]) : 300);
    else if (!strcmp(argv[1], "r0loop")) r0loop(argc > 2 ? atoi(argv[2]) : 300);
    else if (!strcmp(argv[1], "seqc")) seqc(argc > 2 ? atoi(argv[2]) : 40);
    else if (!strcmp(argv[1], "matrix-add")) matrix_add();
    else if (!strcmp(argv[1], "matrix")) matrix(argc > 2 && !strcmp(argv[2], "iret"));
    else if (!strcmp(argv[1], "cost")) {
        int m = -1;
        for (int i = 0; i < M_NMETHODS; i++) if (!strcmp(argv[2], mname[i])) m = i;
        if (m < 0) m = atoi(argv[2]);
        cost(m, atoi(argv[3]), atoi(argv[4]), argc > 5 && !strcmp(argv[5], "iret"));
    } else if (!strcmp(argv[1], "batch")) batch(atoi(argv[2]), atoi(argv[3]));
    else { fprintf(stderr, "unknown mode\n"); return 2; }
    return 0;
}
