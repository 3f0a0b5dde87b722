// QEMU command-line understanding: sizes, key=value option strings, -object
// in both of its syntaxes, and an argv scanner that knows which options take
// a value.
//
// restore rewrites the user's QEMU command line (memory backends, -incoming,
// a QMP socket), so a misreading is not a cosmetic bug: treating the value of
// `-append "console=ttyS0 -object x"` as an option, or dropping a ",," escape
// from a mem-path, would start the wrong VM. Each rule below is QEMU 10's own
// (the function it mirrors is named), and anything QEMU would reject is
// rejected here too rather than guessed at.

#include "core/qemu_args.h"

#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <map>
#include <set>

namespace vmsave {

namespace {

constexpr std::string_view kSizeHint =
    "write bytes or a number with a K/M/G/T/P/E suffix, e.g. 4096, 512M or 1.5G";

Error size_error(std::string_view text, std::string detail) {
  return Error{fmt::format("invalid size '{}'", text), "", std::move(detail),
               std::string(kSizeHint)};
}

// 1024^n for QEMU's suffix letters, either case (util/cutils.c suffix_mul);
// 0 when `c` is not one.
i64 suffix_multiplier(char c) {
  constexpr std::string_view kSuffixes = "BKMGTPE";
  char upper = (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c;
  size_t pos = kSuffixes.find(upper);
  return pos == std::string_view::npos ? 0 : i64{1} << (10 * pos);
}

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

std::string_view strip_dashes(std::string_view name) {
  if (name.starts_with("--")) return name.substr(2);
  if (name.starts_with("-")) return name.substr(1);
  return name;
}

// The key a pair sets, and its value, with QemuOpts' short booleans applied
// ("server" -> server=on, "nowait" -> wait=off; util/qemu-option.c
// get_opt_name_value strips any "no" prefix of a bare key).
std::pair<std::string_view, std::string_view> effective(const KeyvalPair& p) {
  if (p.has_value) return {p.key, p.value};
  if (std::string_view(p.key).starts_with("no")) return {std::string_view(p.key).substr(2), "off"};
  return {p.key, "on"};
}

}  // namespace

std::string escape_commas(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

Result<i64> parse_size(std::string_view text) {
  // Mirrors do_strtosz (QEMU 8.1 and later). Leading blanks are skipped as
  // strtoull does; everything after the number must be a single suffix.
  size_t i = 0;
  while (i < text.size() && (text[i] == ' ' || text[i] == '\t')) i++;
  if (i == text.size()) return size_error(text, "empty");
  if (text[i] == '-') return size_error(text, "sizes cannot be negative");

  if (text.size() - i > 2 && text[i] == '0' && (text[i + 1] == 'x' || text[i + 1] == 'X')) {
    u64 v = 0;
    size_t j = i + 2, start = j;
    for (; j < text.size(); j++) {
      char c = text[j];
      int d = is_digit(c)              ? c - '0'
              : (c >= 'a' && c <= 'f') ? c - 'a' + 10
              : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                       : -1;
      if (d < 0) break;
      if (v > (u64{INT64_MAX} - d) / 16) return size_error(text, "too large");
      v = v * 16 + d;
    }
    if (j == start) return size_error(text, "no hex digits after 0x");
    if (j != text.size()) {
      return size_error(text, "a hex size takes no fraction or suffix (0x20M is not allowed)");
    }
    return static_cast<i64>(v);
  }

  u64 whole = 0;
  size_t j = i;
  for (; j < text.size() && is_digit(text[j]); j++) {
    if (whole > (u64{INT64_MAX} - (text[j] - '0')) / 10) return size_error(text, "too large");
    whole = whole * 10 + (text[j] - '0');
  }
  bool any_digit = j > i;
  // The fraction as digits/10^n, exact: 18 digits keep digits * 2^60 inside
  // 128 bits, and further digits cannot move the result by a whole byte
  // below the exabyte range (QEMU itself goes through a double here).
  unsigned __int128 frac_num = 0, frac_den = 1;
  if (j < text.size() && text[j] == '.') {
    j++;
    int n = 0;
    for (; j < text.size() && is_digit(text[j]); j++, any_digit = true) {
      if (n < 18) {
        frac_num = frac_num * 10 + (text[j] - '0');
        frac_den *= 10;
        n++;
      }
    }
  }
  if (!any_digit) return size_error(text, "not a number");

  i64 mul = 1;
  if (j < text.size()) {
    mul = suffix_multiplier(text[j]);
    if (mul == 0) return size_error(text, fmt::format("unknown suffix '{}'", text.substr(j)));
    j++;
  }
  if (j != text.size()) {
    return size_error(text, fmt::format("unexpected '{}' after the suffix", text.substr(j)));
  }
  if (frac_num != 0 && mul == 1) {
    return size_error(text, "a fractional size needs a K/M/G/T/P/E suffix");
  }
  if (whole > static_cast<u64>(INT64_MAX / mul)) return size_error(text, "too large");
  u64 frac_bytes = static_cast<u64>(frac_num * static_cast<u64>(mul) / frac_den);
  u64 total = whole * static_cast<u64>(mul);
  if (total > static_cast<u64>(INT64_MAX) - frac_bytes) return size_error(text, "too large");
  return static_cast<i64>(total + frac_bytes);
}

std::string format_size(i64 bytes) {
  // The largest unit dividing `bytes` gives the fewest digits; a fraction
  // ("1.5G") would be shorter still but is not exact for every value, and
  // one spelling rule is easier to read in a rewritten command line.
  static constexpr std::array<std::pair<char, int>, 6> kUnits = {
      {{'E', 60}, {'P', 50}, {'T', 40}, {'G', 30}, {'M', 20}, {'K', 10}}};
  if (bytes > 0) {
    for (auto [letter, shift] : kUnits) {
      i64 mul = i64{1} << shift;
      if (bytes % mul == 0) return fmt::format("{}{}", bytes / mul, letter);
    }
  }
  return std::to_string(bytes);
}

Result<bool> parse_bool(std::string_view text, std::string_view key) {
  if (text == "on" || text == "yes" || text == "true" || text == "y") return true;
  if (text == "off" || text == "no" || text == "false" || text == "n") return false;
  return Error{fmt::format("invalid value '{}' for '{}'", text, key), "",
               "expected on/off, yes/no or true/false"};
}

// ---------------------------------------------------------------------------
// -cpu

// The model and each property's final value, for comparison.
static std::pair<std::string, std::map<std::string, std::string>> cpu_spec(std::string_view text) {
  std::map<std::string, std::string> props, plus_minus;
  size_t end = std::min(text.find(','), text.size());
  std::string model(text.substr(0, end));
  while (end < text.size()) {
    size_t start = end + 1;
    end = std::min(text.find(',', start), text.size());
    std::string name(text.substr(start, end - start));
    if (name.empty()) continue;
    const bool sign = name[0] == '+' || name[0] == '-';
    std::string value = name[0] == '-' ? "off" : "on";
    if (sign) {
      name.erase(0, 1);
    } else if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    }
    std::replace(name.begin(), name.end(), '_', '-');
    if (auto b = parse_bool(value, name); b.ok()) value = *b ? "on" : "off";
    if (!sign)
      props[name] = value;
    else if (plus_minus[name] != "off")  // "-f" wins over "+f"
      plus_minus[name] = value;
  }
  for (auto& [name, value] : plus_minus) props[name] = value;
  return {model, props};
}

bool same_cpu(std::string_view a, std::string_view b) {
  return cpu_spec(a) == cpu_spec(b);
}

// ---------------------------------------------------------------------------
// key=value lists

Result<KeyvalList> KeyvalList::parse(std::string_view text, std::string_view implied_key,
                                     KeyvalSyntax syntax) {
  KeyvalList out;
  size_t i = 0;
  bool first = true;
  // A value runs to the next single ','; ",," is a literal comma.
  auto read_value = [&](std::string* v) {
    while (i < text.size()) {
      if (text[i] == ',') {
        if (i + 1 < text.size() && text[i + 1] == ',') {
          *v += ',';
          i += 2;
          continue;
        }
        i++;
        return;
      }
      *v += text[i++];
    }
  };
  while (i < text.size()) {
    size_t len = text.substr(i).find_first_of("=,");
    if (len == std::string_view::npos) len = text.size() - i;
    std::string_view key = text.substr(i, len);
    bool has_eq = i + len < text.size() && text[i + len] == '=';
    KeyvalPair p;
    if (!has_eq && first && !implied_key.empty() && len > 0) {
      p.key = implied_key;
      p.implied = true;
      read_value(&p.value);
    } else if (key.empty()) {
      return Error{fmt::format("empty parameter name in '{}'", text)};
    } else if (!has_eq) {
      if (syntax == KeyvalSyntax::kKeyval) {
        return Error{fmt::format("expected '=' after parameter '{}' in '{}'", key, text)};
      }
      p.key = key;
      p.has_value = false;
      i += len;
      if (i < text.size()) i++;  // the ','
    } else {
      p.key = key;
      i += len + 1;
      read_value(&p.value);
    }
    out.pairs.push_back(std::move(p));
    first = false;
  }
  return out;
}

std::optional<std::string> KeyvalList::get(std::string_view key) const {
  std::optional<std::string> v;
  for (const auto& p : pairs) {
    auto [k, val] = effective(p);
    if (k == key) v = std::string(val);
  }
  return v;
}

Result<std::optional<bool>> KeyvalList::get_bool(std::string_view key) const {
  auto v = get(key);
  if (!v) return std::optional<bool>();
  auto b = parse_bool(*v, key);
  VMSAVE_TRY(b);
  return std::optional<bool>(*b);
}

Result<std::optional<i64>> KeyvalList::get_size(std::string_view key) const {
  auto v = get(key);
  if (!v) return std::optional<i64>();
  auto n = parse_size(*v);
  VMSAVE_TRY(n);
  return std::optional<i64>(*n);
}

void KeyvalList::set(std::string_view key, std::string value) {
  bool done = false;
  std::vector<KeyvalPair> out;
  for (auto& p : pairs) {
    if (effective(p).first != key) {
      out.push_back(std::move(p));
    } else if (!done) {
      KeyvalPair q{std::string(key), std::move(value), true, p.implied};
      out.push_back(std::move(q));
      done = true;
    }
  }
  if (!done) out.push_back(KeyvalPair{std::string(key), std::move(value)});
  pairs = std::move(out);
}

void KeyvalList::erase(std::string_view key) {
  std::erase_if(pairs, [&](const KeyvalPair& p) { return effective(p).first == key; });
}

std::string KeyvalList::format() const {
  std::string out;
  for (size_t n = 0; n < pairs.size(); n++) {
    const auto& p = pairs[n];
    if (n) out += ',';
    // An implied value is only read back as one if it comes first and has no
    // '=' and is not empty (keyval.c: "val-no-key = / [^=,]* /").
    bool implied_ok =
        p.implied && n == 0 && !p.value.empty() && p.value.find('=') == std::string::npos;
    if (implied_ok) {
      out += escape_commas(p.value);
    } else if (!p.has_value) {
      out += p.key;
    } else {
      out += p.key + "=" + escape_commas(p.value);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// -object

std::optional<std::string> QemuObject::get_string(const std::string& key) const {
  auto it = props.find(key);
  if (it == props.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_boolean()) return std::string(it->get<bool>() ? "on" : "off");
  return it->dump();
}

Result<std::optional<bool>> QemuObject::get_bool(const std::string& key) const {
  auto it = props.find(key);
  if (it == props.end()) return std::optional<bool>();
  if (it->is_boolean()) return std::optional<bool>(it->get<bool>());
  if (it->is_string()) {
    auto b = parse_bool(it->get_ref<const std::string&>(), key);
    VMSAVE_TRY(b);
    return std::optional<bool>(*b);
  }
  return Error{fmt::format("object '{}': property '{}' is not a boolean", id, key), "", it->dump()};
}

Result<std::optional<i64>> QemuObject::get_size(const std::string& key) const {
  auto it = props.find(key);
  if (it == props.end()) return std::optional<i64>();
  if (it->is_number_unsigned()) {
    if (it->get<u64>() > static_cast<u64>(INT64_MAX)) {
      return Error{fmt::format("object '{}': {} is too large", id, key), "", it->dump()};
    }
    return std::optional<i64>(static_cast<i64>(it->get<u64>()));
  }
  if (it->is_number_integer()) {
    if (it->get<i64>() < 0) {
      return Error{fmt::format("object '{}': {} is negative", id, key), "", it->dump()};
    }
    return std::optional<i64>(it->get<i64>());
  }
  // QEMU reads JSON -object properties by their JSON types: "64M" is
  // refused there ("Parameter 'size' expects uint64"), after a fill.
  if (it->is_string() && json_syntax)
    return Error{fmt::format("object '{}': in JSON syntax, {} must be a number", id, key), "",
                 it->dump()}
        .fix(fmt::format("write the bytes as a number (\"{}\": 67108864), as QEMU wants there",
                         key));
  if (it->is_string()) {
    auto n = parse_size(it->get_ref<const std::string&>());
    if (!n) {
      Error e = n.error();
      e.what = fmt::format("object '{}': {}", id, e.what);
      return e;
    }
    return std::optional<i64>(*n);
  }
  return Error{fmt::format("object '{}': property '{}' is not a size", id, key), "", it->dump()};
}

void QemuObject::set(const std::string& key, nlohmann::json value) {
  props[key] = std::move(value);
}

void QemuObject::erase(const std::string& key) {
  props.erase(key);
}

Result<QemuObject> parse_object(std::string_view value) {
  QemuObject obj;
  // QEMU's object_option_parse: JSON exactly when the first byte is '{'.
  if (value.starts_with("{")) {
    obj.json_syntax = true;
    auto j = nlohmann::json::parse(value, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      return Error{"-object is not a valid JSON object", "", std::string(value)};
    }
    for (auto& [k, v] : j.items()) {
      if (k == "qom-type" || k == "id") {
        if (!v.is_string()) {
          return Error{fmt::format("-object: \"{}\" must be a string", k), "", std::string(value)};
        }
        (k == "id" ? obj.id : obj.qom_type) = v.get<std::string>();
      } else {
        obj.props[k] = v;
      }
    }
  } else {
    auto kv = KeyvalList::parse(value, "qom-type", KeyvalSyntax::kKeyval);
    if (!kv) {
      Error e = kv.error();
      e.what = "-object: " + e.what;
      return e;
    }
    for (const auto& p : kv->pairs) {
      if (p.key == "qom-type") {
        obj.qom_type = p.value;
      } else if (p.key == "id") {
        obj.id = p.value;
      } else {
        obj.props[p.key] = p.value;  // last wins, as in keyval.c
      }
    }
  }
  if (obj.qom_type.empty()) return Error{"-object has no qom-type", "", std::string(value)};
  if (obj.id.empty()) {
    return Error{fmt::format("-object {} has no id", obj.qom_type), "", std::string(value)};
  }
  return obj;
}

std::optional<std::string> json_string(const nlohmann::json& obj, const char* key) {
  auto it = obj.is_object() ? obj.find(key) : obj.end();
  if (it == obj.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

namespace {

// JSON property values spelled as keyval strings; nested objects and arrays
// become dotted keys ("a.b=1", "a.0=x"), keyval's own encoding of them.
void flatten(const std::string& key, const nlohmann::json& v, KeyvalList* out) {
  if (v.is_object()) {
    for (auto& [k, sub] : v.items()) flatten(key + "." + k, sub, out);
  } else if (v.is_array()) {
    for (size_t n = 0; n < v.size(); n++) flatten(key + "." + std::to_string(n), v[n], out);
  } else if (v.is_string()) {
    out->pairs.push_back({key, v.get<std::string>()});
  } else if (v.is_boolean()) {
    out->pairs.push_back({key, v.get<bool>() ? "on" : "off"});
  } else if (!v.is_null()) {
    out->pairs.push_back({key, v.dump()});
  }
}

std::string dump(const nlohmann::json& v) {
  return v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

std::string format_object(const QemuObject& obj) {
  if (obj.json_syntax) {
    std::string out = "{\"qom-type\":" + dump(obj.qom_type) + ",\"id\":" + dump(obj.id);
    for (auto& [k, v] : obj.props.items()) out += "," + dump(k) + ":" + dump(v);
    return out + "}";
  }
  KeyvalList kv;
  kv.pairs.push_back({"qom-type", obj.qom_type, true, true});
  kv.pairs.push_back({"id", obj.id});
  for (auto& [k, v] : obj.props.items()) flatten(k, v, &kv);
  return kv.format();
}

// ---------------------------------------------------------------------------
// argv scanning

bool qemu_option_is_flag(std::string_view name) {
  // Every option QEMU 10.0 declares without HAS_ARG, read out of the
  // qemu_options[] table in qemu-system-x86_64 10.0.2 (117 options, these 27
  // without a value). Options of other targets are in that table too, and
  // lookup_opt consumes the value before it checks the target, so they count.
  static constexpr std::string_view kFlags =
      " h help version mem-prealloc snapshot usb nographic full-screen win2k-hack no-fd-bootchk"
      " preconfig S s enable-kvm xen-attach xen-domid-restrict no-reboot no-shutdown daemonize"
      " only-migratable nodefaults semihosting old-param no-user-config enable-sync-profile"
      " perfmap jitdump ";
  // Flags removed before 10.0. QEMU now rejects them, but counting them as
  // flags keeps the rest of an old command line aligned, so the error the
  // user sees is QEMU's "invalid option", not a misread -object.
  static constexpr std::string_view kRemovedFlags =
      " no-acpi no-hpet singlestep audio-help curses sdl no-frame alt-grab ctrl-grab no-quit"
      " portrait async-teardown rtc-td-hack no-kvm no-kvm-irqchip no-kvm-pit"
      " no-kvm-pit-reinjection enable-nesting show-cursor virtfs_synth ";
  if (name.empty() || name.find(' ') != std::string_view::npos) return false;
  std::string word = " " + std::string(name) + " ";
  return kFlags.find(word) != std::string_view::npos ||
         kRemovedFlags.find(word) != std::string_view::npos;
}

Result<QemuCommand> QemuCommand::parse(std::vector<std::string> argv) {
  if (argv.empty()) return Error{"empty QEMU command line"};
  QemuCommand cmd(std::move(argv));
  VMSAVE_TRY(cmd.scan());
  return cmd;
}

Status QemuCommand::scan() {
  // vl.c qemu_init: an element not starting with '-' is a disk image;
  // lookup_opt treats "--x" as "-x" and takes argv[i + 1] as the value of a
  // HAS_ARG option, whatever it looks like.
  std::vector<QemuOption> opts;
  for (size_t i = 1; i < argv_.size();) {
    const std::string& a = argv_[i];
    if (a.empty() || a[0] != '-') {
      i++;
      continue;
    }
    QemuOption o{std::string(strip_dashes(a)), i, std::nullopt};
    if (qemu_option_is_flag(o.name)) {
      i++;
    } else {
      if (i + 1 >= argv_.size()) {
        return Error{fmt::format("QEMU option {} needs a value", a), "",
                     "it is the last element of the QEMU command line"}
            .fix("give it its value, or check its spelling (qemu-system-x86_64 -help lists "
                 "QEMU's options)");
      }
      o.value = argv_[i + 1];
      i += 2;
    }
    opts.push_back(std::move(o));
  }
  options_ = std::move(opts);
  return {};
}

void QemuCommand::replace_arg(size_t index, std::string value) {
  argv_.at(index) = std::move(value);
  // Replacing a value cannot unbalance the scan; replacing an option name
  // with one of a different arity could, and then the old scan is kept.
  (void)scan();
}

void QemuCommand::append(const std::vector<std::string>& args) {
  argv_.insert(argv_.end(), args.begin(), args.end());
  (void)scan();
}

bool QemuCommand::has_option(std::string_view name) const {
  name = strip_dashes(name);
  return std::any_of(options_.begin(), options_.end(),
                     [&](const QemuOption& o) { return o.name == name; });
}

std::vector<std::string> QemuCommand::option_values(std::string_view name) const {
  name = strip_dashes(name);
  std::vector<std::string> out;
  for (const auto& o : options_) {
    if (o.name == name && o.value) out.push_back(*o.value);
  }
  return out;
}

Result<std::vector<ObjectArg>> QemuCommand::objects() const {
  std::vector<ObjectArg> out;
  for (const auto& o : options_) {
    if (o.name != "object") continue;
    auto obj = parse_object(*o.value);
    VMSAVE_TRY(obj);
    out.push_back(ObjectArg{o.index + 1, std::move(*obj)});
  }
  return out;
}

namespace {

// A chardev's socket settings, from -chardev or a "unix:" monitor string.
Result<std::optional<QmpMonitor>> unix_socket(const KeyvalList& kv) {
  auto path = kv.get("path");
  if (!path || path->empty()) return std::optional<QmpMonitor>();
  // An abstract-namespace name is not a file we could connect to by path.
  auto abstract = kv.get_bool("abstract");
  VMSAVE_TRY(abstract);
  if (abstract->value_or(false)) return std::optional<QmpMonitor>();
  auto server = kv.get_bool("server");
  VMSAVE_TRY(server);
  auto wait = kv.get_bool("wait");
  VMSAVE_TRY(wait);
  QmpMonitor m;
  m.path = *path;
  m.server = server->value_or(false);
  m.wait = wait->value_or(true);
  return std::optional<QmpMonitor>(m);
}

// A chardev of the command: a -chardev, or a console option's chardev
// string in QEMU's legacy form (qemu_chr_parse_compat: "unix:PATH,..." a
// socket, "file:PATH" a file; "mon:" multiplexes a monitor onto it), as
// -chardev options.
struct Chardev {
  const QemuOption* from;
  std::string option;  // "-chardev id=ch0", "-serial"
  KeyvalList opts;     // "backend", "path", ...
};

Result<std::vector<Chardev>> chardevs_of(const std::vector<QemuOption>& options) {
  static constexpr std::string_view kConsoles[] = {
      "qmp", "qmp-pretty", "monitor", "serial", "parallel", "virtioconsole", "debugcon", "gdb"};
  std::vector<Chardev> out;
  for (const auto& o : options) {
    if (!o.value) continue;
    std::string_view v = *o.value;
    if (o.name == "chardev") {
      auto kv = KeyvalList::parse(v, "backend", KeyvalSyntax::kQemuOpts);
      VMSAVE_TRY(kv);
      out.push_back(Chardev{&o, "-chardev id=" + kv->get("id").value_or("?"), std::move(*kv)});
      continue;
    }
    if (std::find(std::begin(kConsoles), std::end(kConsoles), o.name) == std::end(kConsoles))
      continue;
    if (v.starts_with("mon:")) v.remove_prefix(4);
    Chardev c{&o, "-" + o.name, {}};
    if (v.starts_with("unix:")) {
      auto kv = KeyvalList::parse(v.substr(5), "path", KeyvalSyntax::kQemuOpts);
      VMSAVE_TRY(kv);
      c.opts = std::move(*kv);
      c.opts.set("backend", "socket");
    } else if (v.starts_with("file:") && v.size() > 5) {
      c.opts.set("backend", "file");
      c.opts.set("path", std::string(v.substr(5)));
    } else {
      continue;
    }
    out.push_back(std::move(c));
  }
  return out;
}

// A chardev's Unix socket, if it is one.
Result<std::optional<QmpMonitor>> socket_of(const Chardev& c) {
  if (c.opts.get("backend") != "socket") return std::optional<QmpMonitor>();
  return unix_socket(c.opts);
}

}  // namespace

Result<std::vector<QmpMonitor>> QemuCommand::qmp_monitors() const {
  auto all = chardevs_of(options_);
  VMSAVE_TRY(all);
  std::map<std::string, QmpMonitor> chardevs;
  for (const auto& c : *all) {
    if (c.from->name != "chardev") continue;
    auto m = socket_of(c);
    VMSAVE_TRY(m);
    auto id = c.opts.get("id");
    if (*m && id) {
      (*m)->chardev_id = *id;
      chardevs[*id] = **m;
    }
  }
  auto by_id = [&](const std::string& id) -> std::optional<QmpMonitor> {
    auto it = chardevs.find(id);
    if (it == chardevs.end()) return std::nullopt;
    return it->second;
  };

  std::vector<QmpMonitor> out;
  for (const auto& o : options_) {
    std::optional<QmpMonitor> m;
    bool pretty = false;
    if (o.name == "qmp" || o.name == "qmp-pretty") {
      // vl.c monitor_parse: "chardev:ID" names a -chardev, anything else is
      // a legacy chardev string (qemu_chr_parse_compat), "unix:" then
      // QemuOpts with "path" implied.
      pretty = o.name == "qmp-pretty";
      std::string_view v = *o.value;
      if (v.starts_with("chardev:")) {
        m = by_id(std::string(v.substr(8)));
      } else {
        for (const auto& c : *all)
          if (c.from == &o) {
            auto s = socket_of(c);
            VMSAVE_TRY(s);
            m = *s;
          }
      }
    } else if (o.name == "mon") {
      auto kv = KeyvalList::parse(*o.value, "chardev", KeyvalSyntax::kQemuOpts);
      VMSAVE_TRY(kv);
      if (kv->get("mode") != "control") continue;  // the default is HMP ("readline")
      auto p = kv->get_bool("pretty");
      VMSAVE_TRY(p);
      pretty = p->value_or(false);
      if (auto id = kv->get("chardev")) m = by_id(*id);
    }
    if (!m) continue;
    m->pretty = pretty;
    m->index = o.index + 1;
    out.push_back(std::move(*m));
  }
  return out;
}

Result<std::vector<ServerSocket>> QemuCommand::server_sockets() const {
  std::vector<ServerSocket> out;
  auto chardevs = chardevs_of(options_);
  VMSAVE_TRY(chardevs);
  for (const auto& c : *chardevs) {
    auto m = socket_of(c);
    VMSAVE_TRY(m);
    if (*m && (*m)->server) out.push_back(ServerSocket{(*m)->path, c.option});
  }
  for (const auto& o : options_) {
    if (!o.value) continue;
    std::string_view v = *o.value;
    if (o.name == "vnc" || (o.name == "display" && v.starts_with("vnc="))) {
      if (o.name == "display") v.remove_prefix(4);  // -display vnc=X[,...] is -vnc X[,...]
      auto kv = KeyvalList::parse(v, "vnc", KeyvalSyntax::kQemuOpts);
      VMSAVE_TRY(kv);
      auto display = kv->get("vnc");
      if (display && display->starts_with("unix:") && display->size() > 5)
        out.push_back(ServerSocket{display->substr(5), "-" + o.name});
    } else if (o.name == "netdev" && v.starts_with("{")) {
      auto j = nlohmann::json::parse(v, nullptr, false);
      auto server = j.is_object() ? j.find("server") : j.end();
      if (!j.is_object() || server == j.end() || *server != true ||
          json_string(j, "type") != "stream" || !j.contains("addr"))
        continue;
      auto path = json_string(j["addr"], "path");
      if (json_string(j["addr"], "type") == "unix" && path && !path->empty())
        out.push_back(ServerSocket{*path, "-netdev id=" + json_string(j, "id").value_or("")});
    } else if (o.name == "netdev") {
      auto kv = KeyvalList::parse(v, "type", KeyvalSyntax::kQemuOpts);
      VMSAVE_TRY(kv);
      auto server = kv->get_bool("server");
      VMSAVE_TRY(server);
      auto path = kv->get("addr.path");
      if (kv->get("type") == "stream" && server->value_or(false) &&
          kv->get("addr.type") == "unix" && path && !path->empty())
        out.push_back(ServerSocket{*path, "-netdev id=" + kv->get("id").value_or("?")});
    }
  }
  return out;
}

Result<std::vector<OutputFile>> QemuCommand::output_files() const {
  std::vector<OutputFile> out;
  auto chardevs = chardevs_of(options_);
  VMSAVE_TRY(chardevs);
  for (const auto& c : *chardevs) {
    auto path = c.opts.get("path");
    if (c.opts.get("backend") == "file" && path && !path->empty())
      out.push_back(OutputFile{*path, c.option});
    if (auto log = c.opts.get("logfile"); log && !log->empty())
      out.push_back(OutputFile{*log, c.option + " logfile"});
  }
  for (const auto& o : options_)
    if (o.name == "D" && o.value && !o.value->empty()) out.push_back(OutputFile{*o.value, "-D"});
  return out;
}

Result<std::vector<NicMac>> QemuCommand::nic_macs() const {
  std::vector<NicMac> out;
  int nics = 0;
  for (const auto& o : options_) {
    if (!o.value) continue;
    std::optional<std::string> id, netdev, mac;
    if (o.name == "device" && o.value->starts_with("{")) {
      auto j = nlohmann::json::parse(*o.value, nullptr, false);
      id = json_string(j, "id"), netdev = json_string(j, "netdev"), mac = json_string(j, "mac");
    } else if (o.name == "device") {
      auto kv = KeyvalList::parse(*o.value, "driver", KeyvalSyntax::kQemuOpts);
      VMSAVE_TRY(kv);
      id = kv->get("id"), netdev = kv->get("netdev"), mac = kv->get("mac");
    } else if (o.name == "nic") {
      auto kv = KeyvalList::parse(*o.value, "type", KeyvalSyntax::kQemuOpts);
      VMSAVE_TRY(kv);
      if (kv->get("type") == "none") continue;
      id = fmt::format("-nic #{}", ++nics), netdev = "", mac = kv->get("mac");
    } else {
      continue;
    }
    if (!netdev) continue;  // no network card
    NicMac n{id ? *id : "netdev=" + *netdev, mac.value_or(""), !mac};
    std::transform(n.mac.begin(), n.mac.end(), n.mac.begin(),
                   [](char c) { return c == '-' ? ':' : static_cast<char>(std::tolower(c)); });
    out.push_back(std::move(n));
  }
  // QEMU gives a card without mac= the first of 52:54:00:12:34:56.. that no
  // card has (qemu_macaddr_default_if_unset).
  std::set<std::string> taken;
  for (const auto& n : out) taken.insert(n.mac);
  int next = 0x56;
  for (auto& n : out) {
    if (!n.by_default) continue;
    while (next < 0x100 && taken.count(fmt::format("52:54:00:12:34:{:02x}", next))) next++;
    n.mac = fmt::format("52:54:00:12:34:{:02x}", next++);
  }
  return out;
}

Result<std::optional<QmpMonitor>> QemuCommand::qmp_socket() const {
  auto all = qmp_monitors();
  VMSAVE_TRY(all);
  for (auto& m : *all) {
    if (m.server) return std::optional<QmpMonitor>(std::move(m));
  }
  return std::optional<QmpMonitor>();
}

Result<std::optional<std::string>> QemuCommand::machine_option(std::string_view key) const {
  std::optional<std::string> v;
  for (const auto& o : options_) {
    if (o.name != "machine" && o.name != "M") continue;
    auto kv = KeyvalList::parse(*o.value, "type", KeyvalSyntax::kQemuOpts);
    if (!kv) {
      Error e = kv.error();
      e.what = "-machine: " + e.what;
      return e;
    }
    if (auto x = kv->get(key)) v = std::move(x);
  }
  return v;
}

Result<std::optional<std::string>> QemuCommand::memory_option(std::string_view key) const {
  std::optional<std::string> value;
  for (const auto& o : options_) {
    if (o.name != "m") continue;
    auto kv = KeyvalList::parse(*o.value, "size", KeyvalSyntax::kQemuOpts);
    if (!kv) {
      Error e = kv.error();
      e.what = "-m: " + e.what;
      return e;
    }
    if (auto v = kv->get(key)) value = std::move(v);
  }
  return value;
}

Result<std::optional<i64>> QemuCommand::memory_size() const {
  auto spelled = memory_option("size");
  if (!spelled) return spelled.error();
  const std::optional<std::string>& size = *spelled;
  if (!size) return std::optional<i64>();
  if (size->empty()) return Error{"-m: missing 'size' value"};
  auto n = parse_size(*size);
  if (!n) {
    Error e = n.error();
    e.what = "-m: " + e.what;
    return e;
  }
  // vl.c set_memory_options: a size ending in a digit is in MiB ("-m 512",
  // also "-m 0x200"); one ending in a suffix is what the suffix says.
  i64 bytes = *n;
  if (is_digit(size->back())) {
    if (bytes > INT64_MAX / kMiB) return Error{fmt::format("-m: size {} MiB is too large", *size)};
    bytes *= kMiB;
  }
  return std::optional<i64>(bytes);
}

Result<i64> QemuCommand::cpu_count() const {
  std::map<std::string, i64> smp;  // all -smp merged, the last of each key winning
  for (const auto& o : options_) {
    if (o.name != "smp") continue;
    auto kv = KeyvalList::parse(*o.value, "cpus", KeyvalSyntax::kQemuOpts);
    if (!kv) return Error{"-smp: " + kv.error().what};
    for (const char* key : {"cpus", "maxcpus", "drawers", "books", "sockets", "dies", "clusters",
                            "modules", "cores", "threads"}) {
      auto v = kv->get(key);
      if (!v) continue;
      i64 n = 0;
      auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
      if (ec != std::errc() || end != v->data() + v->size() || n <= 0)
        return Error{fmt::format("-smp: bad {} value: {}", key, *v)};
      smp[key] = n;
    }
  }
  if (smp.contains("cpus")) return smp["cpus"];
  if (smp.contains("maxcpus")) return smp["maxcpus"];
  i64 n = 1;
  for (auto& [key, v] : smp) n *= v;
  return n;
}

}  // namespace vmsave
