/* memcheck: the workload of vmsave's test guest. It fills N MiB of guest RAM
 * with a pseudo-random pattern that can be recomputed from (MiB block index,
 * generation), then re-verifies all of it every ~200 ms and prints one line
 * per pass on the serial console:
 *
 *   memcheck start <N>
 *   memcheck ok <iteration> <checksum>     (checksum: 16 hex digits)
 *   memcheck CORRUPT <byte offset>         (first mismatching byte)
 *
 * The iteration counter and the per-block generation table are ordinary
 * variables in guest memory, so after a save and restore the counter carries
 * on from where it was, and any page that came back wrong shows up as CORRUPT
 * on the next pass. With DIRTY_MIB > 0 every pass first rewrites the next
 * DIRTY_MIB MiB (round-robin) with a new generation, so memory keeps changing
 * while a save runs and verification stays exact.
 *
 * Usage: memcheck N [DIRTY_MIB]. Built static (gcc -static -O2) by
 * scripts/build-guest-kit; it runs as the guest's only program besides init.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum { kWordsPerMib = (1 << 20) / 8 };
static const uint64_t kSeed = 0x766d736176652121ull; /* "vmsave!!" */
static const long kPassPauseNs = 200L * 1000 * 1000;

/* splitmix64's finalizer: turns (block, generation) into a well-mixed,
 * never-zero xorshift state. */
static uint64_t block_state(uint64_t block, uint64_t gen) {
  uint64_t z = kSeed ^ (block * 0x9e3779b97f4a7c15ull) ^ (gen << 40) ^ gen;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z ? z : kSeed;
}

/* xorshift64: one cheap step per 8-byte word (this runs under TCG, where a
 * pass over 64 MiB costs a few hundred ms). */
static inline uint64_t next_word(uint64_t* s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  *s = x;
  return x;
}

static void fill_block(uint64_t* words, uint64_t block, uint64_t gen) {
  uint64_t s = block_state(block, gen);
  uint64_t* w = words + block * kWordsPerMib;
  for (size_t i = 0; i < kWordsPerMib; i++) w[i] = next_word(&s);
}

static void say(const char* line) {
  /* One write per line so each line reaches the console whole and at once. */
  size_t len = strlen(line);
  while (len > 0) {
    ssize_t n = write(STDOUT_FILENO, line, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    line += n;
    len -= (size_t)n;
  }
}

static int parse_mib(const char* s, long* out) {
  char* end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < 0 || v > (1L << 20)) return -1;
  *out = v;
  return 0;
}

int main(int argc, char** argv) {
  long mib = 0, dirty_mib = 0;
  if (argc < 2 || argc > 3 || parse_mib(argv[1], &mib) || mib < 1 ||
      (argc == 3 && parse_mib(argv[2], &dirty_mib))) {
    fprintf(stderr, "usage: memcheck N_MIB [DIRTY_MIB]\n");
    return 2;
  }
  if (dirty_mib > mib) dirty_mib = mib;

  size_t bytes = (size_t)mib << 20;
  uint64_t* words =
      mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  uint64_t* gens = calloc((size_t)mib, sizeof(uint64_t));
  if (words == MAP_FAILED || !gens) {
    fprintf(stderr, "memcheck: cannot allocate %ld MiB: %s\n", mib, strerror(errno));
    return 1;
  }
  for (long b = 0; b < mib; b++) fill_block(words, (uint64_t)b, 0);

  char line[128];
  snprintf(line, sizeof line, "memcheck start %ld\n", mib);
  say(line);

  uint64_t iteration = 0;
  long next_dirty = 0;
  for (;;) {
    iteration++;
    for (long i = 0; i < dirty_mib; i++) {
      gens[next_dirty]++;
      fill_block(words, (uint64_t)next_dirty, gens[next_dirty]);
      next_dirty = (next_dirty + 1) % mib;
    }

    uint64_t checksum = 0;
    int64_t bad = -1;
    for (long b = 0; b < mib && bad < 0; b++) {
      uint64_t s = block_state((uint64_t)b, gens[b]);
      const uint64_t* w = words + (size_t)b * kWordsPerMib;
      for (size_t i = 0; i < kWordsPerMib; i++) {
        uint64_t want = next_word(&s);
        if (w[i] != want) {
          /* First differing byte within the word (x86 is little-endian). */
          uint64_t diff = w[i] ^ want;
          int byte = __builtin_ctzll(diff) / 8;
          bad = ((int64_t)b << 20) + (int64_t)i * 8 + byte;
          break;
        }
        checksum = (checksum ^ w[i]) * 0x100000001b3ull;
      }
    }
    if (bad >= 0) {
      snprintf(line, sizeof line, "memcheck CORRUPT %" PRId64 "\n", bad);
    } else {
      snprintf(line, sizeof line, "memcheck ok %" PRIu64 " %016" PRIx64 "\n", iteration, checksum);
    }
    say(line);

    struct timespec pause = {0, kPassPauseNs};
    while (clock_nanosleep(CLOCK_MONOTONIC, 0, &pause, &pause) == EINTR) {
    }
  }
}
