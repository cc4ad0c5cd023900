/* /init of scripts/verifier-check's initramfs: load imaptap's BPF programs on the booted kernel.
 *
 * Reads /spec (written by scripts/verifier-check): units, each a variant of the kernel program
 * compiled by bcc on the host, with its maps and the bytecode of its programs.  In the bytecode,
 * ld_imm64 instructions that refer to a map (src_reg BPF_PSEUDO_MAP_FD or _VALUE) carry the map's
 * index in the unit; they get the descriptor of the map created here.  Each program is loaded
 * with BPF_PROG_LOAD, so the verifier of this kernel decides.  One line per result on the
 * console, prefixed "IMAPTAP-VC ", then the machine powers off.
 *
 * spec := u32 nunits, unit*
 * unit := char label[32], u32 nmaps, map*, u32 nprogs, prog*
 * map  := char name[16], u32 type, key_size, value_size, max_entries, flags
 * prog := char name[32], u32 prog_type, u32 insn_cnt, struct bpf_insn[insn_cnt]
 * (all little endian, as the host and the guest are x86_64).
 *
 * Built with gcc -static by scripts/verifier-check.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#define P "IMAPTAP-VC "
#define MAXMAPS 64
#define LOG_BIG (64u << 20)
#define LOG_TAIL_LINES 80

static unsigned char *spec;
static size_t spec_len, pos;

static void finish(int code)
{
    printf(P "DONE %d\n", code);
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}

static void *take(size_t n)
{
    if (pos + n > spec_len) {
        printf(P "ERROR spec truncated at %zu\n", pos);
        finish(2);
    }
    void *p = spec + pos;
    pos += n;
    return p;
}

static uint32_t u32(void)
{
    uint32_t v;
    memcpy(&v, take(4), 4);
    return v;
}

static long sys_bpf(int cmd, union bpf_attr *attr)
{
    return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

/* Print the last LOG_TAIL_LINES lines of a verifier log. */
static void log_tail(const char *label, const char *prog, char *log)
{
    size_t len = strlen(log);
    int lines = 0;
    size_t start = len;
    while (start > 0) {
        if (log[start - 1] == '\n' && start != len && ++lines >= LOG_TAIL_LINES)
            break;
        start--;
    }
    char *line = log + start;
    while (*line) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        printf(P "LOG %s %s | %s\n", label, prog, line);
        if (!nl)
            break;
        line = nl + 1;
    }
}

static int prog_load(uint32_t type, const char *name, struct bpf_insn *insns, uint32_t cnt,
                     uint32_t level, char *log, uint32_t log_size)
{
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.prog_type = type;
    a.insn_cnt = cnt;
    a.insns = (uint64_t)(uintptr_t)insns;
    a.license = (uint64_t)(uintptr_t)"GPL";
    a.log_level = level;
    a.log_buf = (uint64_t)(uintptr_t)log;
    a.log_size = level ? log_size : 0;
    memcpy(a.prog_name, name, strnlen(name, sizeof(a.prog_name) - 1));
    if (log && log_size)
        log[0] = 0;
    return (int)sys_bpf(BPF_PROG_LOAD, &a);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (getpid() != 1) {
        /* It powers the machine off when done: only ever the init of a throwaway guest. */
        fprintf(stderr, "verifier-loader: only runs as /init of scripts/verifier-check's guest\n");
        return 2;
    }
    struct utsname u;
    uname(&u);
    printf(P "KERNEL %s %s\n", u.release, u.version);

    struct rlimit inf = {RLIM_INFINITY, RLIM_INFINITY};
    setrlimit(RLIMIT_MEMLOCK, &inf); /* before 5.11, BPF memory is charged to memlock */

    int fd = open("/spec", O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        printf(P "ERROR /spec: %s\n", strerror(errno));
        finish(2);
    }
    spec_len = (size_t)st.st_size;
    spec = malloc(spec_len);
    size_t got = 0;
    while (got < spec_len) {
        ssize_t r = read(fd, spec + got, spec_len - got);
        if (r <= 0) {
            printf(P "ERROR reading /spec\n");
            finish(2);
        }
        got += (size_t)r;
    }
    close(fd);

    char *log = malloc(LOG_BIG);
    uint32_t nunits = u32();
    for (uint32_t un = 0; un < nunits; un++) {
        char label[33] = {0};
        memcpy(label, take(32), 32);
        uint32_t nmaps = u32();
        int fds[MAXMAPS];
        if (nmaps > MAXMAPS) {
            printf(P "ERROR %s: %u maps\n", label, nmaps);
            finish(2);
        }
        for (uint32_t i = 0; i < nmaps; i++) {
            char name[17] = {0};
            memcpy(name, take(16), 16);
            union bpf_attr a;
            memset(&a, 0, sizeof(a));
            a.map_type = u32();
            a.key_size = u32();
            a.value_size = u32();
            a.max_entries = u32();
            a.map_flags = u32();
            strncpy(a.map_name, name, sizeof(a.map_name) - 1);
            fds[i] = (int)sys_bpf(BPF_MAP_CREATE, &a);
            if (fds[i] < 0)
                printf(P "MAP %s %s FAILED type=%u errno=%d (%s)\n", label, name, a.map_type, errno,
                       strerror(errno));
            else
                printf(P "MAP %s %s ok type=%u\n", label, name, a.map_type);
        }
        uint32_t nprogs = u32();
        for (uint32_t p = 0; p < nprogs; p++) {
            char name[33] = {0};
            memcpy(name, take(32), 32);
            uint32_t type = u32();
            uint32_t cnt = u32();
            struct bpf_insn *insns = malloc((size_t)cnt * sizeof(*insns));
            memcpy(insns, take((size_t)cnt * sizeof(*insns)), (size_t)cnt * sizeof(*insns));
            int bad = 0;
            for (uint32_t i = 0; i < cnt; i++) {
                struct bpf_insn *in = &insns[i];
                if (in->code == (BPF_LD | BPF_IMM | BPF_DW) &&
                    (in->src_reg == BPF_PSEUDO_MAP_FD || in->src_reg == BPF_PSEUDO_MAP_VALUE)) {
                    uint32_t idx = (uint32_t)in->imm;
                    if (idx >= nmaps || fds[idx] < 0)
                        bad = 1;
                    else
                        in->imm = fds[idx];
                }
            }
            if (bad) {
                printf(P "PROG %s %s REJECTED a map it uses could not be created\n", label, name);
                free(insns);
                continue;
            }
            /* BPF_LOG_STATS (4, since 5.2) only: "processed N insns ...", a line.  A log buffer
             * too small fails a load (ENOSPC) on old kernels, so without a log if it did. */
            int pfd = prog_load(type, name, insns, cnt, 4, log, LOG_BIG);
            if (pfd < 0 && errno == ENOSPC)
                pfd = prog_load(type, name, insns, cnt, 0, NULL, 0);
            if (pfd >= 0) {
                close(pfd);
                char stats[256] = "";
                char *q = strstr(log, "processed ");
                if (q) {
                    size_t n = strcspn(q, "\n");
                    if (n >= sizeof(stats))
                        n = sizeof(stats) - 1;
                    memcpy(stats, q, n);
                    stats[n] = 0;
                }
                printf(P "PROG %s %s LOADED insns=%u %s\n", label, name, cnt, stats);
            } else {
                int e = errno;
                prog_load(type, name, insns, cnt, 1, log, LOG_BIG);
                int e2 = errno;
                printf(P "PROG %s %s REJECTED errno=%d (%s) insns=%u\n", label, name, e, strerror(e), cnt);
                if (e2 == ENOSPC)
                    printf(P "LOG %s %s | (the log overflowed %u bytes; its start follows)\n", label,
                           name, LOG_BIG);
                log[LOG_BIG - 1] = 0;
                log_tail(label, name, log);
            }
            free(insns);
        }
        for (uint32_t i = 0; i < nmaps; i++)
            if (fds[i] >= 0)
                close(fds[i]);
    }
    finish(0);
    return 0;
}
