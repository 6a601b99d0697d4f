/*
 * forkvm's vDSO: the clock calls a program makes most (clock_gettime, gettimeofday, time)
 * answered in guest user mode. Without it each call is a syscall, an exit to the VMM that
 * costs tens of microseconds on kvm_pvm: a progress bar or an event loop reading the clock
 * thousands of times would spend seconds there.
 *
 * The VMM keeps the clock page (the page just below this object, see vdso.lds) filled
 * with a reference point: a TSC value and what each clock read at that moment. A read
 * extrapolates from it with the TSC, which the guest reads natively. When the page is not
 * enabled, or for clocks it does not carry (CPU-time clocks), the call is a real syscall.
 *
 * Built freestanding (no libc) and position independent, with no relocations: the loader
 * maps it as is.
 */

typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

struct timespec64 {
	s64 tv_sec;
	s64 tv_nsec;
};

struct timeval64 {
	s64 tv_sec;
	s64 tv_usec;
};

struct timezone32 {
	int tz_minuteswest;
	int tz_dsttime;
};

/* Must match `ClockPage` in crates/kernel/src/vdso.rs. */
struct clock_page {
	u32 seq; /* odd while the VMM rewrites the page */
	u32 enabled; /* 0: every call is a syscall */
	u64 tsc; /* the reference TSC value */
	u64 mult; /* nanoseconds per TSC tick, 32.32 fixed point */
	u64 realtime_ns; /* each clock at the reference point */
	u64 monotonic_ns;
	u64 monotonic_raw_ns;
	u64 boottime_ns;
	u64 tai_ns;
};

extern const volatile struct clock_page forkvm_clock_page __attribute__((visibility("hidden")));

#define CLOCK_REALTIME 0
#define CLOCK_MONOTONIC 1
#define CLOCK_MONOTONIC_RAW 4
#define CLOCK_REALTIME_COARSE 5
#define CLOCK_MONOTONIC_COARSE 6
#define CLOCK_BOOTTIME 7
#define CLOCK_TAI 11

#define NSEC_PER_SEC 1000000000UL

#define SYS_gettimeofday 96
#define SYS_time 201
#define SYS_clock_gettime 228
#define SYS_clock_getres 229
#define SYS_getcpu 309

#define barrier() __asm__ __volatile__("" ::: "memory")

static inline long syscall2(long nr, long a, long b)
{
	long ret;
	__asm__ __volatile__("syscall"
			     : "=a"(ret)
			     : "0"(nr), "D"(a), "S"(b)
			     : "rcx", "r11", "memory");
	return ret;
}

static inline long syscall3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ __volatile__("syscall"
			     : "=a"(ret)
			     : "0"(nr), "D"(a), "S"(b), "d"(c)
			     : "rcx", "r11", "memory");
	return ret;
}

/* The TSC, not read ahead of earlier loads (lfence orders rdtsc, as Linux's vDSO does). */
static inline u64 rdtsc_ordered(void)
{
	u32 lo, hi;
	__asm__ __volatile__("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
	return ((u64)hi << 32) | lo;
}

/* Reads `clock` in nanoseconds; 0 when the page cannot answer it. */
static int read_ns(int clock, u64 *ns)
{
	const volatile struct clock_page *page = &forkvm_clock_page;
	u32 seq;
	u64 base, now;
	do {
		seq = page->seq;
		barrier();
		if (seq & 1)
			continue;
		if (!page->enabled)
			return 0;
		switch (clock) {
		case CLOCK_REALTIME:
		case CLOCK_REALTIME_COARSE:
			base = page->realtime_ns;
			break;
		case CLOCK_MONOTONIC:
		case CLOCK_MONOTONIC_COARSE:
			base = page->monotonic_ns;
			break;
		case CLOCK_MONOTONIC_RAW:
			base = page->monotonic_raw_ns;
			break;
		case CLOCK_BOOTTIME:
			base = page->boottime_ns;
			break;
		case CLOCK_TAI:
			base = page->tai_ns;
			break;
		default:
			return 0;
		}
		now = rdtsc_ordered();
		/* A TSC read below the reference (it cannot run backwards) counts as no time. */
		u64 ticks = now > page->tsc ? now - page->tsc : 0;
		*ns = base + (u64)(((unsigned __int128)ticks * page->mult) >> 32);
		barrier();
	} while (seq & 1 || page->seq != seq);
	return 1;
}

int __vdso_clock_gettime(int clock, struct timespec64 *ts)
{
	u64 ns;
	if (!read_ns(clock, &ns))
		return syscall2(SYS_clock_gettime, clock, (long)ts);
	ts->tv_sec = ns / NSEC_PER_SEC;
	ts->tv_nsec = ns % NSEC_PER_SEC;
	return 0;
}

int __vdso_gettimeofday(struct timeval64 *tv, struct timezone32 *tz)
{
	u64 ns;
	if (!read_ns(CLOCK_REALTIME, &ns))
		return syscall2(SYS_gettimeofday, (long)tv, (long)tz);
	if (tv) {
		tv->tv_sec = ns / NSEC_PER_SEC;
		tv->tv_usec = ns % NSEC_PER_SEC / 1000;
	}
	if (tz) {
		tz->tz_minuteswest = 0;
		tz->tz_dsttime = 0;
	}
	return 0;
}

s64 __vdso_time(s64 *t)
{
	u64 ns;
	if (!read_ns(CLOCK_REALTIME, &ns))
		return syscall2(SYS_time, (long)t, 0);
	s64 sec = ns / NSEC_PER_SEC;
	if (t)
		*t = sec;
	return sec;
}

int __vdso_clock_getres(int clock, struct timespec64 *res)
{
	u64 ns;
	if (!read_ns(clock, &ns))
		return syscall2(SYS_clock_getres, clock, (long)res);
	if (res) {
		res->tv_sec = 0;
		res->tv_nsec = 1;
	}
	return 0;
}

long __vdso_getcpu(unsigned *cpu, unsigned *node, void *unused)
{
	return syscall3(SYS_getcpu, (long)cpu, (long)node, (long)unused);
}

int clock_gettime(int, struct timespec64 *) __attribute__((weak, alias("__vdso_clock_gettime")));
int gettimeofday(struct timeval64 *, struct timezone32 *)
	__attribute__((weak, alias("__vdso_gettimeofday")));
s64 time(s64 *) __attribute__((weak, alias("__vdso_time")));
int clock_getres(int, struct timespec64 *) __attribute__((weak, alias("__vdso_clock_getres")));
long getcpu(unsigned *, unsigned *, void *) __attribute__((weak, alias("__vdso_getcpu")));
