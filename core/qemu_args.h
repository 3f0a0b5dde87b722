// Understanding and rewriting a QEMU command line.
//
// `vmsave restore IMG -- qemu-system-x86_64 ...` hands us the user's own
// command line. We must find every memory backend in it, whichever of QEMU's
// syntaxes it was written in, rewrite some of their properties, and leave
// everything else byte-for-byte alone. The rules here follow QEMU 10's own
// parsers (softmmu/vl.c lookup_opt, util/keyval.c, util/qemu-option.c,
// util/cutils.c do_strtosz), not a guess at them.

#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lib/common.h"

namespace vmsave {

// A byte count in qemu_strtosz syntax: "4096", "512M", "1.5G", "0x1000".
// Suffixes B K M G T P E (either case) are binary multipliers; a fraction
// needs a suffix other than B; hex takes no fraction and no suffix.
Result<i64> parse_size(std::string_view text);

// The shortest exact spelling QEMU parses back to `bytes`: "512M", "1G",
// "1536M", "4096".
std::string format_size(i64 bytes);

// `v` as a value in a QEMU option string: each ',' doubled.
std::string escape_commas(std::string_view v);

// QEMU's boolean spellings (qapi_bool_parse): on/yes/true/y, off/no/false/n.
Result<bool> parse_bool(std::string_view text, std::string_view key);

// How strictly a key=value string is read. QEMU has two parsers:
//   kKeyval   util/keyval.c (-object, -machine, -accel): every element but an
//             implied first one must be key=value.
//   kQemuOpts util/qemu-option.c (-chardev, -mon, -m, "unix:" monitors): a
//             bare "key" means key=on and a bare "nokey" means key=off.
enum class KeyvalSyntax { kKeyval, kQemuOpts };

// One element of "key=value,key=value". Values are kept as written (after
// unescaping ",,") so that a rewrite changes only what it means to change.
struct KeyvalPair {
  std::string key;
  std::string value;
  bool has_value = true;  // false: a bare "key" (QemuOpts short boolean)
  bool implied = false;   // the first element, written without "key="
};

class KeyvalList {
 public:
  // Parses `text`; `implied_key` names the first element when it has no
  // "=" (e.g. "qom-type" for -object, "type" for -machine, "size" for -m).
  static Result<KeyvalList> parse(std::string_view text, std::string_view implied_key,
                                  KeyvalSyntax syntax);

  // The value of `key`; as in QEMU, the last occurrence wins. A bare "key"
  // reads as "on" and a bare "nokey" as key=off.
  std::optional<std::string> get(std::string_view key) const;
  Result<std::optional<bool>> get_bool(std::string_view key) const;
  Result<std::optional<i64>> get_size(std::string_view key) const;

  // Replaces the first occurrence in place (dropping later ones) or appends.
  void set(std::string_view key, std::string value);
  void erase(std::string_view key);

  // Re-emits the list, escaping commas in values as ",,".
  std::string format() const;

  std::vector<KeyvalPair> pairs;
};

// An -object argument. `props` holds every property except qom-type and id:
// strings when the object was written as key=value, JSON numbers, booleans
// and strings when it was written as JSON.
struct QemuObject {
  std::string qom_type;
  std::string id;
  nlohmann::json props = nlohmann::json::object();
  bool json_syntax = false;

  // Typed reads that accept both JSON-typed and string values.
  std::optional<std::string> get_string(const std::string& key) const;
  Result<std::optional<bool>> get_bool(const std::string& key) const;
  Result<std::optional<i64>> get_size(const std::string& key) const;

  // `value` may be a string, number or bool; format_object spells it in the
  // object's own syntax (a number becomes "1073741824" in key=value form).
  void set(const std::string& key, nlohmann::json value);
  void erase(const std::string& key);
};

// Parses an -object value: JSON when it starts with '{' (exactly QEMU's
// test), key=value with an implied qom-type otherwise. qom-type and id are
// required, as QEMU requires them.
Result<QemuObject> parse_object(std::string_view value);

// A string member of a JSON option value (-device, -netdev, -blockdev {...}),
// or none when `obj` is no object, or the member is absent or of another
// type: QEMU says what is wrong with those.
std::optional<std::string> json_string(const nlohmann::json& obj, const char* key);

// Re-emits an object in the syntax it came in: JSON stays JSON, key=value
// stays key=value (commas escaped). qom-type and id come first.
std::string format_object(const QemuObject& obj);

// An -object on the command line: `index` is the argv index of its value.
struct ObjectArg {
  size_t index;
  QemuObject object;
};

// A QMP monitor on a Unix socket that the command line creates, in any of
//   -qmp unix:PATH[,server=on|,server][,wait=off|,nowait]
//   -qmp-pretty unix:PATH,...
//   -qmp chardev:ID              + -chardev socket,id=ID,path=PATH,server=on
//   -mon chardev=ID,mode=control + -chardev socket,id=ID,path=PATH,server=on
struct QmpMonitor {
  std::string path;
  bool server = false;     // false: QEMU connects out to PATH as a client
  bool wait = true;        // server mode only: QEMU blocks at startup for a client
  bool pretty = false;     // replies are pretty-printed over several lines
  size_t index = 0;        // argv index of the -qmp/-qmp-pretty/-mon value
  std::string chardev_id;  // empty for -qmp unix:...
};

// A Unix socket path QEMU listens on. QEMU removes whatever is at the path
// first: a running VM's socket, or a file named there by mistake.
struct ServerSocket {
  std::string path;
  std::string option;  // how the command names it: "-monitor", "-chardev id=ch0"
};

// A file QEMU writes: a serial console's, a chardev's log, its own (-D).
struct OutputFile {
  std::string path;
  std::string option;  // "-chardev id=serial0", "-serial", "-D"
};

// A network card's MAC address: as the command sets it (lower case, colons),
// else QEMU's default (52:54:00:12:34:56 and up, the first not taken).
struct NicMac {
  std::string card;  // "net0" (its id), else "netdev=n0" or "-nic #1"
  std::string mac;
  bool by_default = false;
};

// One option occurrence: argv[index] is "-name" or "--name"; its value, if
// the option takes one, is argv[index + 1].
struct QemuOption {
  std::string name;  // without leading dashes
  size_t index = 0;
  std::optional<std::string> value;
};

// A QEMU command line, argv[0] being the program. Scanning follows QEMU's own
// loop: an element not starting with '-' is a disk image; "-opt" and "--opt"
// are the same; an option's value is always the next element, so
// `-append "... -object x"` is one option with one value, never an -object.
// (QEMU has no "-opt=value" form: "-m=1G" is an invalid option there.)
class QemuCommand {
 public:
  // Fails on an empty argv or an option that takes a value but ends argv.
  static Result<QemuCommand> parse(std::vector<std::string> argv);

  const std::vector<std::string>& argv() const { return argv_; }
  const std::vector<QemuOption>& options() const { return options_; }

  // Every -object, in order, parsed.
  Result<std::vector<ObjectArg>> objects() const;

  // Replaces argv[index] (typically an option's value) and rescans.
  void replace_arg(size_t index, std::string value);
  // Appends elements (e.g. "-incoming", "defer") and rescans.
  void append(const std::vector<std::string>& args);

  // `name` with or without leading dashes.
  bool has_option(std::string_view name) const;
  std::vector<std::string> option_values(std::string_view name) const;

  // Every QMP monitor on a Unix socket, in command-line order.
  Result<std::vector<QmpMonitor>> qmp_monitors() const;
  // The first QMP monitor vmsave can connect to (server mode).
  Result<std::optional<QmpMonitor>> qmp_socket() const;
  // Every Unix socket path QEMU will listen on, in command-line order.
  Result<std::vector<ServerSocket>> server_sockets() const;
  // Every file QEMU writes its output to (chardev files and logfiles, -D).
  Result<std::vector<OutputFile>> output_files() const;
  // The MAC address of every network card, in command-line order: -device
  // with netdev= (key=value or JSON), and -nic.
  Result<std::vector<NicMac>> nic_macs() const;

  // A -machine/-M property, all occurrences merged, last wins ("type" is the
  // implied key: "-machine q35,accel=kvm", "-M pc", "-machine type=q35").
  Result<std::optional<std::string>> machine_option(std::string_view key) const;
  Result<std::optional<std::string>> machine_type() const { return machine_option("type"); }

  // Guest RAM from -m in bytes; a plain number means MiB ("-m 512",
  // "-m size=1G,slots=2,maxmem=4G", "-m 1536M"). nullopt: no -m.
  Result<std::optional<i64>> memory_size() const;
  // Another -m property ("slots", "maxmem"), all occurrences merged.
  Result<std::optional<std::string>> memory_option(std::string_view key) const;

  // Guest CPUs at start from -smp, as QEMU counts them: cpus=N (or the
  // bare number), else maxcpus, else the product of the topology given
  // (missing members 1); 1 without -smp.
  Result<i64> cpu_count() const;

  bool daemonize() const { return has_option("daemonize"); }

 private:
  explicit QemuCommand(std::vector<std::string> argv) : argv_(std::move(argv)) {}
  Status scan();

  std::vector<std::string> argv_;
  std::vector<QemuOption> options_;
};

// Whether two -cpu values make the same CPU: the same model, and every
// property ending at the same value however it was spelled, as QEMU's x86
// parser (target/i386/cpu.c x86_cpu_parse_featurestr) reads them. "+f" is
// f=on and "-f" is f=off, and "-f" wins over "+f" whatever their order;
// otherwise the last f=V wins. '_' in a name is '-'. A boolean is any of
// QEMU's spellings. "qemu64,+ssse3,-x2apic" and "qemu64,x2apic=off,ssse3=on"
// are one CPU.
bool same_cpu(std::string_view a, std::string_view b);

// True when QEMU's option `name` (without dashes) takes no value. Options
// QEMU does not know are assumed to take one.
bool qemu_option_is_flag(std::string_view name);

}  // namespace vmsave
