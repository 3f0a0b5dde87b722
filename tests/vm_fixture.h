// A real QEMU guest for end-to-end tests.
//
// TestVm boots the test guest kit (scripts/build-guest-kit: Debian's cloud
// kernel plus an initramfs running tests/guest/memcheck.c) under
// qemu-system-x86_64, TCG by default (VMSAVE_TEST_ACCEL=kvm for KVM). Guest
// RAM lives in files under a private /dev/shm/vmsave-test-XXXXXX directory
// (memory-backend-file, share=on), so a test can hand ram_path() to vmsave;
// the QMP socket, serial log and QEMU's own log live in a second private
// directory under $TMPDIR (or /tmp).
//
// The guest prints `memcheck ok <iteration> <checksum>` on the serial console
// every ~200 ms after verifying all of its buffer, or `memcheck CORRUPT
// <offset>` if any byte differs from its pattern. The iteration counter is in
// guest memory, so after save/restore it continues from the saved value:
// wait_for_memcheck(saved + 1, ...) proves the restored guest runs on intact
// RAM. Serial lines end in "\r\n" (the guest's tty adds the \r); the parsing
// helpers strip it and find the memcheck text anywhere in a line.
//
// Cleanup is unconditional: the destructor SIGKILLs and reaps its QEMU and
// every other qemu-system-* process whose command line mentions either
// directory (clones restored by vmsave), then removes both directories. QEMU
// is started with PR_SET_PDEATHSIG=SIGKILL, so it also dies if the test
// process is killed (note: the signal fires when the *thread* that called
// start() exits). Directories left by a killed test process are swept by the
// next TestVm that is constructed.
//
// Typical use:
//   std::string why;
//   if (!guest_kit_available(&why)) skip(why);
//   TestVm vm({.ram_mib = 256, .memcheck_mib = 64});
//   std::string err;
//   REQUIRE_MESSAGE(vm.start(&err), err);
//   MemcheckLine line;
//   REQUIRE_MESSAGE(vm.wait_for_memcheck(3, 60, &line, &err), err);

#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace vmsave::test {

struct VmOptions {
  int64_t ram_mib = 256;  // guest RAM, split evenly across NUMA nodes
  int cpus = 1;
  int memcheck_mib = 64;        // MiB the guest fills and verifies
  int dirty_mib = 0;            // MiB the guest rewrites per pass (0: memory stays constant)
  int numa_nodes = 1;           // 2 => backends ram0, ram1 of ram_mib/2 each, one per -numa node
  bool shared_file_ram = true;  // false => anonymous RAM (no file to read)
  // Per NUMA node (overrides shared_file_ram when not empty): "file" (shared
  // file backend), "ram" (memory-backend-ram) or "memfd". With one entry the
  // backend is the machine's memory-backend.
  std::vector<std::string> node_backends;
  std::vector<std::string> extra_args;  // appended to the QEMU command line
  std::string file_backend_props;       // appended to each file backend, e.g. "dump=off"
  // QEMU runs in the RAM files' directory and names them relative to it
  // (mem-path=ram0), so vmsave, running elsewhere, must find them from there.
  bool relative_mem_path = false;
  // The NUMA nodes' file backends share ram0's file, node n at offset=
  // n * its size (as one file split with offset= between backends).
  bool one_ram_file = false;
};

struct MemcheckLine {
  int64_t iteration = 0;
  std::string checksum;  // 16 hex digits
};

// The directory holding vmlinuz and initrd.img: env VMSAVE_GUEST_DIR, else
// the VMSAVE_GUEST_DIR compile definition.
std::string guest_kit_dir();

// True if the kit, qemu-system-x86_64, /dev/shm (and /dev/kvm when asked
// for) are all there; otherwise `why` says what is missing, for a skip.
bool guest_kit_available(std::string* why);

// Ends the test case as a reported skip (exit 77) when the kit or QEMU is
// missing. Call first thing, before the case owns any resource.
void require_guest_kit();

class TestVm {
 public:
  explicit TestVm(VmOptions opts);
  ~TestVm();
  TestVm(const TestVm&) = delete;
  TestVm& operator=(const TestVm&) = delete;

  // The full QEMU argv (argv[0] = qemu-system-x86_64).
  std::vector<std::string> command() const;

  // Spawns QEMU and waits (up to 30 s) for its QMP socket to appear.
  [[nodiscard]] bool start(std::string* err);

  // Polls the serial log until its last `memcheck ok` line has an iteration
  // >= min_iteration. Fails at once on a `memcheck CORRUPT` line or if this
  // fixture's QEMU exited (not after kill_qemu(), so a test may wait for a
  // restored clone writing to the same log).
  [[nodiscard]] bool wait_for_memcheck(int64_t min_iteration, double timeout_s, MemcheckLine* out,
                                       std::string* err);

  std::optional<MemcheckLine> last_memcheck() const;
  bool has_corruption() const;

  std::string dir() const { return dir_; }
  std::string shm_dir() const { return shm_dir_; }
  std::string qmp_path() const { return dir_ + "/qmp.sock"; }
  std::string serial_path() const { return dir_ + "/serial.log"; }
  std::string qemu_log_path() const { return dir_ + "/qemu.log"; }
  std::string ram_path(int node = 0) const;
  const VmOptions& options() const { return opts_; }

  // The fixture's QEMU, or -1 when not running (never started, or killed).
  pid_t pid() const { return pid_; }

  // SIGKILL and reap this fixture's QEMU now.
  void kill_qemu();

  // The raw serial log, and its complete lines without the trailing "\r\n"
  // (count them with .size()).
  std::string serial_log() const;
  std::vector<std::string> serial_lines() const;

 private:
  VmOptions opts_;
  std::string dir_;
  std::string shm_dir_;
  std::string setup_error_;  // why a directory could not be made; start() reports it
  pid_t pid_ = -1;
};

// The qemu-system-* processes whose command line contains `needle` (never
// this process). An empty needle matches nothing.
std::vector<pid_t> qemu_pids_mentioning(const std::string& needle);

// SIGKILLs every qemu-system-* process whose command line contains `needle`
// (never this process), reaps it if it is our child and waits (up to 5 s) for
// the others to be gone. Returns how many were signalled. An empty needle
// matches nothing.
int kill_qemu_mentioning(const std::string& needle);

}  // namespace vmsave::test
