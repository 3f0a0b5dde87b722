// Tests for core/qemu_args: QEMU's size syntax, key=value strings, -object in
// both syntaxes, and the argv scanner restore relies on to find memory
// backends and QMP sockets without being fooled by option values.

#include "core/qemu_args.h"

#include <fcntl.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <filesystem>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/internal.h"
#include "io/fd.h"
#include "tests/test_util.h"

using namespace vmsave;

namespace {

QemuCommand cmd(std::vector<std::string> argv) {
  argv.insert(argv.begin(), "qemu-system-x86_64");
  auto c = QemuCommand::parse(std::move(argv));
  REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message()));
  return std::move(*c);
}

i64 size_of(std::string_view s) {
  auto r = parse_size(s);
  REQUIRE_MESSAGE(r.ok(), s, ": ", (r.ok() ? "" : r.error().message()));
  return *r;
}

}  // namespace

TEST_CASE("parse_size follows qemu_strtosz") {
  CHECK(size_of("0") == 0);
  CHECK(size_of("4096") == 4096);
  CHECK(size_of("1b") == 1);
  CHECK(size_of("1B") == 1);
  CHECK(size_of("4k") == 4096);
  CHECK(size_of("4K") == 4096);
  CHECK(size_of("512M") == 512 * kMiB);
  CHECK(size_of("512m") == 512 * kMiB);
  CHECK(size_of("1G") == kGiB);
  CHECK(size_of("2T") == 2 * 1024 * kGiB);
  CHECK(size_of("1P") == i64{1} << 50);
  CHECK(size_of("7E") == i64{7} << 60);
  CHECK(size_of("1.5G") == 3 * kGiB / 2);
  CHECK(size_of("1.5k") == 1536);
  CHECK(size_of("0.5M") == kMiB / 2);
  CHECK(size_of(".5M") == kMiB / 2);
  CHECK(size_of("1.M") == kMiB);
  CHECK(size_of("1.1K") == 1126);  // the fraction is truncated to a byte
  CHECK(size_of("1.0") == 1);      // a zero fraction needs no suffix
  CHECK(size_of("0x1000") == 4096);
  CHECK(size_of("0X1b") == 27);  // 'b' is a hex digit, not the byte suffix
  CHECK(size_of(" 64M") == 64 * kMiB);
  CHECK(size_of("9223372036854775807") == INT64_MAX);

  for (const char* bad : {"",
                          " ",
                          "M",
                          "-1",
                          "-0",
                          "1.5",
                          "1.5B",
                          "1e3",
                          "0x",
                          "0x20M",
                          "0x1.8",
                          "12Q",
                          "1MB",
                          "1 M",
                          "1M ",
                          "abc",
                          ".",
                          "1..5M",
                          "8E",
                          "9223372036854775808",
                          "99999999999999999999",
                          "0x8000000000000000"}) {
    CAPTURE(bad);
    auto r = parse_size(bad);
    CHECK_FALSE(r.ok());
    if (!r.ok()) CHECK(r.error().what.find("invalid size") != std::string::npos);
  }
}

TEST_CASE("format_size picks the shortest exact unit") {
  CHECK(format_size(0) == "0");
  CHECK(format_size(4096) == "4K");
  CHECK(format_size(4095) == "4095");
  CHECK(format_size(512 * kMiB) == "512M");
  CHECK(format_size(kGiB) == "1G");
  CHECK(format_size(1536 * kMiB) == "1536M");
  CHECK(format_size(i64{3} << 60) == "3E");
  for (i64 v : {i64{1}, i64{1023}, i64{1025}, 3 * kGiB / 2, i64{5} << 40, INT64_MAX}) {
    CHECK(size_of(format_size(v)) == v);
  }
}

TEST_CASE("parse_bool accepts QEMU's spellings") {
  for (const char* t : {"on", "yes", "true", "y"}) CHECK(*parse_bool(t, "k") == true);
  for (const char* f : {"off", "no", "false", "n"}) CHECK(*parse_bool(f, "k") == false);
  CHECK_FALSE(parse_bool("ON", "k").ok());
  CHECK_FALSE(parse_bool("1", "k").ok());
  CHECK_FALSE(parse_bool("", "k").ok());
}

TEST_CASE("keyval: escapes, implied keys, last wins") {
  auto kv = KeyvalList::parse("memory-backend-file,id=ram0,mem-path=/a,,b/c,,,size=1G", "qom-type",
                              KeyvalSyntax::kKeyval);
  REQUIRE(kv.ok());
  CHECK(kv->get("qom-type") == "memory-backend-file");
  CHECK(kv->get("id") == "ram0");
  CHECK(kv->get("mem-path") == "/a,b/c,");
  CHECK(*kv->get_size("size") == kGiB);
  CHECK(kv->format() == "memory-backend-file,id=ram0,mem-path=/a,,b/c,,,size=1G");

  // The implied key may also be spelled out.
  auto explicit_kv =
      KeyvalList::parse("qom-type=memory-backend-ram,id=r", "qom-type", KeyvalSyntax::kKeyval);
  REQUIRE(explicit_kv.ok());
  CHECK(explicit_kv->get("qom-type") == "memory-backend-ram");

  // An implied value may itself contain escaped commas.
  auto implied = KeyvalList::parse("/x,,y,server=on", "path", KeyvalSyntax::kQemuOpts);
  REQUIRE(implied.ok());
  CHECK(implied->get("path") == "/x,y");

  auto last = KeyvalList::parse("a=1,b=2,a=3,", "", KeyvalSyntax::kKeyval);
  REQUIRE(last.ok());
  CHECK(last->get("a") == "3");
  CHECK(last->pairs.size() == 3);

  // Keyval (-object) has no short booleans; QemuOpts (-chardev) has.
  CHECK_FALSE(
      KeyvalList::parse("memory-backend-ram,id=r,share", "qom-type", KeyvalSyntax::kKeyval).ok());
  CHECK_FALSE(KeyvalList::parse("a=1,,,=2", "", KeyvalSyntax::kKeyval).ok());
  auto flags =
      KeyvalList::parse("socket,id=m,path=/s,server,nowait", "backend", KeyvalSyntax::kQemuOpts);
  REQUIRE(flags.ok());
  CHECK(*flags->get_bool("server") == true);
  CHECK(*flags->get_bool("wait") == false);
  CHECK_FALSE(flags->get("nowait"));
  CHECK(flags->format() == "socket,id=m,path=/s,server,nowait");

  CHECK_FALSE(flags->get_bool("path").ok());  // "/s" is not a boolean
}

TEST_CASE("keyval: set and erase keep everything else") {
  auto kv = KeyvalList::parse("socket,id=m,path=/s,server,nowait,path=/t", "backend",
                              KeyvalSyntax::kQemuOpts);
  REQUIRE(kv.ok());
  kv->set("path", "/new,dir/q");
  kv->set("wait", "on");
  kv->set("logfile", "/l");
  CHECK(kv->format() == "socket,id=m,path=/new,,dir/q,server,wait=on,logfile=/l");
  kv->erase("server");
  CHECK(kv->format() == "socket,id=m,path=/new,,dir/q,wait=on,logfile=/l");
  // A replaced implied value that could no longer be read as one is spelled out.
  kv->set("backend", "a=b");
  CHECK(kv->format().starts_with("backend=a=b,id=m"));
}

TEST_CASE("-object in keyval syntax") {
  auto o = parse_object("memory-backend-file,id=ram0,size=1G,mem-path=/dev/shm/a,,b,share=on");
  REQUIRE(o.ok());
  CHECK_FALSE(o->json_syntax);
  CHECK(o->qom_type == "memory-backend-file");
  CHECK(o->id == "ram0");
  CHECK(o->get_string("mem-path") == "/dev/shm/a,b");
  CHECK(*o->get_size("size") == kGiB);
  CHECK(*o->get_bool("share") == true);
  CHECK(!*o->get_bool("prealloc"));
  CHECK(!o->get_string("nope"));

  auto typed = parse_object("qom-type=memory-backend-ram,id=r1,size=512M");
  REQUIRE(typed.ok());
  CHECK(typed->qom_type == "memory-backend-ram");
  CHECK(*typed->get_size("size") == 512 * kMiB);

  CHECK_FALSE(parse_object("memory-backend-ram,size=1G").ok());  // no id
  CHECK_FALSE(parse_object("id=x,size=1G").ok());                // no qom-type
  CHECK_FALSE(parse_object("memory-backend-ram,id=r,share").ok());
  auto bad_size = parse_object("memory-backend-ram,id=r,size=lots");
  REQUIRE(bad_size.ok());
  CHECK_FALSE(bad_size->get_size("size").ok());
}

TEST_CASE("-object in JSON syntax") {
  auto o =
      parse_object(R"({"qom-type":"memory-backend-file","id":"ram0","size":1073741824,)"
                   R"("mem-path":"/dev/shm/x","share":true,"prealloc":"off","align":2097152})");
  REQUIRE(o.ok());
  CHECK(o->json_syntax);
  CHECK(o->qom_type == "memory-backend-file");
  CHECK(o->id == "ram0");
  CHECK(*o->get_size("size") == kGiB);
  CHECK(*o->get_size("align") == 2 * kMiB);
  CHECK(*o->get_bool("share") == true);
  CHECK(*o->get_bool("prealloc") == false);
  CHECK(o->get_string("mem-path") == "/dev/shm/x");
  CHECK(o->get_string("size") == "1073741824");
  CHECK_FALSE(o->get_bool("size").ok());
  CHECK_FALSE(o->get_size("share").ok());

  CHECK_FALSE(parse_object(R"({"qom-type":"memory-backend-ram"})").ok());
  CHECK_FALSE(parse_object(R"({"qom-type":"x","id":3})").ok());
  CHECK_FALSE(parse_object(R"({"qom-type":"x","id":"a",)").ok());
  CHECK_FALSE(parse_object(R"(["qom-type"])").ok());
  CHECK_FALSE(parse_object(R"({"qom-type":"x","id":"a","size":-1})")->get_size("size").ok());
  // QEMU reads JSON properties by type: a size as a string it refuses
  // ("Parameter 'size' expects uint64"), so vmsave does before QEMU starts.
  auto spelled = parse_object(R"({"qom-type":"x","id":"a","size":"64M"})")->get_size("size");
  REQUIRE_FALSE(spelled.ok());
  CHECK(spelled.error().message() ==
        "object 'a': in JSON syntax, size must be a number: \"64M\"; write the bytes as a "
        "number (\"size\": 67108864), as QEMU wants there");
}

TEST_CASE("-object round trips in its own syntax") {
  SUBCASE("keyval") {
    auto o = parse_object("memory-backend-file,id=ram0,mem-path=/x,,y,share=on,size=1G");
    REQUIRE(o.ok());
    std::string again = format_object(*o);
    CHECK(again == "memory-backend-file,id=ram0,mem-path=/x,,y,share=on,size=1G");
    o->set("mem-path", "/new,path");
    o->set("size", 2 * kGiB);
    o->set("prealloc", false);
    o->erase("share");
    again = format_object(*o);
    CHECK(again == "memory-backend-file,id=ram0,mem-path=/new,,path,prealloc=off,size=2147483648");
    auto back = parse_object(again);
    REQUIRE(back.ok());
    CHECK(back->get_string("mem-path") == "/new,path");
    CHECK(*back->get_size("size") == 2 * kGiB);
    CHECK(*back->get_bool("prealloc") == false);
    CHECK(!back->props.contains("share"));
  }
  SUBCASE("json") {
    auto o = parse_object(R"({"qom-type":"memory-backend-file","id":"ram0","size":1073741824,)"
                          R"("mem-path":"/dev/shm/a,b","share":true})");
    REQUIRE(o.ok());
    std::string again = format_object(*o);
    CHECK(again.starts_with(R"({"qom-type":"memory-backend-file","id":"ram0",)"));
    CHECK(again.find(",,") == std::string::npos);  // JSON has no comma escaping
    auto back = parse_object(again);
    REQUIRE(back.ok());
    CHECK(back->json_syntax);
    CHECK(back->props == o->props);
    o->set("mem-path", "/new");
    o->set("size", 2 * kGiB);
    back = parse_object(format_object(*o));
    REQUIRE(back.ok());
    CHECK(back->props["size"] == 2 * kGiB);  // still a JSON number
    CHECK(back->props["share"] == true);     // still a JSON bool
    CHECK(back->props["mem-path"] == "/new");
  }
  SUBCASE("nested JSON values become dotted keys in keyval") {
    QemuObject o{"memory-backend-ram", "r", nlohmann::json::object(), false};
    o.set("host-nodes", nlohmann::json::array({0, 1}));
    CHECK(format_object(o) == "memory-backend-ram,id=r,host-nodes.0=0,host-nodes.1=1");
  }
}

TEST_CASE("option values are never options: the -append trap") {
  auto c = cmd({"-kernel", "/k", "-append", "console=ttyS0 -object memory-backend-ram,id=evil",
                "-name", "-object", "--object", "memory-backend-ram,id=real,size=64M", "disk.img",
                "-nographic", "-object",
                "{\"qom-type\":\"memory-backend-file\",\"id\":\"j\","
                "\"size\":1048576,\"mem-path\":\"/m\"}"});
  auto objs = c.objects();
  REQUIRE(objs.ok());
  REQUIRE(objs->size() == 2);
  CHECK((*objs)[0].object.id == "real");
  CHECK((*objs)[0].index == 8);
  CHECK((*objs)[1].object.id == "j");
  CHECK((*objs)[1].index == 12);
  CHECK(c.option_values("name") == std::vector<std::string>{"-object"});
  CHECK(c.has_option("nographic"));
  CHECK(c.has_option("-nographic"));
  CHECK_FALSE(c.has_option("incoming"));

  // Rewriting a backend touches exactly its value.
  QemuObject o = (*objs)[1].object;
  o.set("mem-path", "/restored");
  c.replace_arg((*objs)[1].index, format_object(o));
  auto again = c.objects();
  REQUIRE(again.ok());
  CHECK((*again)[1].object.get_string("mem-path") == "/restored");
  CHECK(c.argv()[4] == "console=ttyS0 -object memory-backend-ram,id=evil");
}

TEST_CASE("flags take no value, everything else takes one") {
  auto c = cmd({"-S", "-nodefaults", "-no-user-config", "-enable-kvm", "-s", "-snapshot",
                "-daemonize", "-no-reboot", "-no-shutdown", "-preconfig", "-only-migratable",
                "--nographic", "-incoming", "defer", "-object", "memory-backend-ram,id=r,size=1M"});
  CHECK(c.daemonize());
  CHECK(c.option_values("incoming") == std::vector<std::string>{"defer"});
  auto objs = c.objects();
  REQUIRE(objs.ok());
  CHECK(objs->size() == 1);
  CHECK(c.options().size() == 14);

  // An unknown option is assumed to take a value, like every QEMU option
  // that is not a flag.
  auto u = cmd({"-future-option", "-object", "-m", "1G"});
  CHECK(u.option_values("future-option") == std::vector<std::string>{"-object"});
  CHECK_FALSE(u.has_option("object"));

  // QEMU has no -opt=value form: "-m=1G" is an (unknown) option of its own.
  auto eq = cmd({"-m=1G", "x"});
  CHECK_FALSE(eq.has_option("m"));

  CHECK_FALSE(QemuCommand::parse({"qemu", "-m"}).ok());
  // A misspelt flag at the end reads as an option without its value: the
  // error says both.
  auto typo = QemuCommand::parse({"qemu", "-nodefaultz"});
  REQUIRE_FALSE(typo.ok());
  CHECK(typo.error().message() ==
        "QEMU option -nodefaultz needs a value: it is the last element of the QEMU command line; "
        "give it its value, or check its spelling (qemu-system-x86_64 -help lists QEMU's "
        "options)");
  CHECK_FALSE(QemuCommand::parse({}).ok());
  CHECK(QemuCommand::parse({"qemu", "-nographic"}).ok());

  c.append({"-incoming", "fd:3"});
  CHECK(c.option_values("incoming") == std::vector<std::string>{"defer", "fd:3"});
}

TEST_CASE("QMP sockets in every form") {
  SUBCASE("-qmp unix: with server=on,wait=off") {
    auto c = cmd({"-qmp", "unix:/run/q,,1.sock,server=on,wait=off"});
    auto m = c.qmp_socket();
    REQUIRE(m.ok());
    REQUIRE(m->has_value());
    CHECK((*m)->path == "/run/q,1.sock");
    CHECK((*m)->server);
    CHECK_FALSE((*m)->wait);
    CHECK_FALSE((*m)->pretty);
    CHECK((*m)->index == 2);
  }
  SUBCASE("legacy short booleans") {
    auto c = cmd({"-qmp", "unix:/q.sock,server,nowait"});
    auto m = c.qmp_socket();
    REQUIRE(m.ok());
    REQUIRE(m->has_value());
    CHECK((*m)->path == "/q.sock");
    CHECK((*m)->server);
    CHECK_FALSE((*m)->wait);
  }
  SUBCASE("server without wait=off blocks QEMU at startup") {
    auto c = cmd({"-qmp", "unix:/q.sock,server=on"});
    auto m = c.qmp_socket();
    REQUIRE(m.ok());
    REQUIRE(m->has_value());
    CHECK((*m)->wait);
  }
  SUBCASE("-qmp-pretty") {
    auto c = cmd({"--qmp-pretty", "unix:/p.sock,server=on,wait=off"});
    auto m = c.qmp_socket();
    REQUIRE(m.ok());
    REQUIRE(m->has_value());
    CHECK((*m)->pretty);
    CHECK((*m)->path == "/p.sock");
  }
  SUBCASE("-chardev + -mon mode=control") {
    auto c = cmd({"-chardev", "socket,id=mon0,path=/c.sock,server=on,wait=off", "-mon",
                  "chardev=mon0,mode=control,pretty=on"});
    auto m = c.qmp_socket();
    REQUIRE(m.ok());
    REQUIRE(m->has_value());
    CHECK((*m)->path == "/c.sock");
    CHECK((*m)->chardev_id == "mon0");
    CHECK((*m)->pretty);
    CHECK((*m)->index == 4);
  }
  SUBCASE("-chardev + -qmp chardev:ID") {
    auto c =
        cmd({"-chardev", "socket,path=/d.sock,id=qmp1,server=on,wait=off", "-qmp", "chardev:qmp1"});
    auto m = c.qmp_socket();
    REQUIRE(m.ok());
    REQUIRE(m->has_value());
    CHECK((*m)->path == "/d.sock");
  }
  SUBCASE("not QMP, or not one we can connect to") {
    // HMP monitors, a -mon in the default readline mode, client-mode sockets,
    // TCP and abstract sockets.
    auto c = cmd({"-monitor", "unix:/hmp.sock,server=on,wait=off", "-chardev",
                  "socket,id=h,path=/h.sock,server=on,wait=off", "-mon", "chardev=h", "-qmp",
                  "unix:/client.sock", "-qmp", "tcp:localhost:4444,server=on,wait=off", "-qmp",
                  "unix:/abs,abstract=on,server=on", "-append", "-qmp unix:/fake.sock,server=on"});
    auto m = c.qmp_socket();
    REQUIRE(m.ok());
    CHECK_FALSE(m->has_value());
    auto all = c.qmp_monitors();
    REQUIRE(all.ok());
    REQUIRE(all->size() == 1);  // the client-mode one
    CHECK_FALSE((*all)[0].server);
    CHECK((*all)[0].path == "/client.sock");
  }
  SUBCASE("bad boolean") {
    auto c = cmd({"-qmp", "unix:/q.sock,server=maybe"});
    CHECK_FALSE(c.qmp_socket().ok());
  }
}

TEST_CASE("every Unix socket QEMU listens on, in JSON and -display too") {
  auto c =
      cmd({"-display", "vnc=unix:/v.sock,lossy=on",  //
           "-netdev",
           R"({"id":"y","type":"stream","server":true,"addr":{"type":"unix","path":"/n.sock"}})",
           "-netdev",
           R"({"id":"z","type":"stream","server":false,"addr":{"type":"unix","path":"/c.sock"}})",
           "-netdev", R"({"id":"w","type":"stream","server":"on"})"});  // QEMU refuses it
  auto all = c.server_sockets();
  REQUIRE(all.ok());
  std::vector<std::string> got;
  for (auto& s : *all) got.push_back(s.option + " " + s.path);
  CHECK(got == std::vector<std::string>{"-display /v.sock", "-netdev id=y /n.sock"});
}

TEST_CASE("every Unix socket QEMU listens on, in every form") {
  auto c = cmd({"-chardev", "socket,id=ch0,path=/a.sock,server=on,wait=off",  //
                "-chardev", "socket,id=ch1,path=/client.sock",                // QEMU connects
                "-chardev", "socket,id=ch2,path=/abs,abstract=on,server=on",  // no file
                "-chardev", "file,id=f0,path=/serial.log",                    // not a socket
                "-qmp",     "unix:/q.sock,server,nowait",                     //
                "-monitor", "unix:path=/m.sock,server=on,wait=off",           //
                "-serial",  "mon:unix:/s.sock,server=on,wait=off",            //
                "-serial",  "tcp::4444,server=on",                            // a port
                "-gdb",     "unix:/g.sock,server=on,wait=off",                //
                "-vnc",     "unix:/v.sock",                                   //
                "-vnc",     "127.0.0.1:5",                                    //
                "-netdev",  "stream,id=n0,server=on,addr.type=unix,addr.path=/n.sock",
                "-netdev",  "user,id=n1"});
  auto all = c.server_sockets();
  REQUIRE_MESSAGE(all.ok(), (all.ok() ? "" : all.error().message()));
  std::vector<std::string> got;
  for (auto& s : *all) got.push_back(s.option + " " + s.path);
  CHECK(got == std::vector<std::string>{"-chardev id=ch0 /a.sock", "-qmp /q.sock",
                                        "-monitor /m.sock", "-serial /s.sock", "-gdb /g.sock",
                                        "-vnc /v.sock", "-netdev id=n0 /n.sock"});
  CHECK_FALSE(cmd({"-chardev", "socket,id=x,path=/x,server=maybe"}).server_sockets().ok());
}

TEST_CASE("the files QEMU writes its output to") {
  auto c = cmd({"-chardev", "file,id=serial0,path=/s.log,append=on",                  //
                "-chardev", "socket,id=ch0,path=/a.sock,server=on,logfile=/ch0.log",  //
                "-chardev", "pipe,id=p0,path=/fifo",                                  // not a file
                "-serial", "file:/s2.log",                                            //
                "-monitor", "mon:file:/m.log",                                        //
                "-serial", "stdio",                                                   //
                "-D", "/qemu.log"});
  auto all = c.output_files();
  REQUIRE(all.ok());
  std::vector<std::string> got;
  for (auto& f : *all) got.push_back(f.option + " " + f.path);
  CHECK(got == std::vector<std::string>{"-chardev id=serial0 /s.log",
                                        "-chardev id=ch0 logfile /ch0.log", "-serial /s2.log",
                                        "-monitor /m.log", "-D /qemu.log"});
}

TEST_CASE("network cards' MAC addresses by card, QEMU's defaults filled in") {
  auto c =
      cmd({"-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52-54-00-AA-00-01",
           "-device", "e1000,id=net1,netdev=n1", "-device", "virtio-rng-pci",  // no card
           "-nic", "none", "-nic", "user,model=virtio,mac=52:54:00:12:34:56",  //
           "-device", R"({"driver":"e1000","netdev":"n2","id":"net2"})"});
  auto all = c.nic_macs();
  REQUIRE(all.ok());
  std::vector<std::string> got;
  for (auto& n : *all) got.push_back(n.card + " " + n.mac + (n.by_default ? " (default)" : ""));
  // The first default is :56, which -nic #1 has: the next ones are free.
  CHECK(got ==
        std::vector<std::string>{"netdev=n0 52:54:00:aa:00:01", "net1 52:54:00:12:34:57 (default)",
                                 "-nic #1 52:54:00:12:34:56", "net2 52:54:00:12:34:58 (default)"});
}

TEST_CASE("-m forms") {
  auto mem = [](std::vector<std::string> args) {
    auto r = cmd(std::move(args)).memory_size();
    REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message()));
    return *r;
  };
  CHECK(mem({"-m", "512"}) == 512 * kMiB);  // plain numbers are MiB
  CHECK(mem({"-m", "512M"}) == 512 * kMiB);
  CHECK(mem({"-m", "1G"}) == kGiB);
  CHECK(mem({"-m", "1.5G"}) == 3 * kGiB / 2);
  CHECK(mem({"-m", "0x200"}) == 512 * kMiB);  // ends in a digit: MiB, as QEMU
  CHECK(mem({"-m", "4096k"}) == 4 * kMiB);
  CHECK(mem({"-m", "size=1G,slots=2,maxmem=4G"}) == kGiB);
  CHECK(mem({"-m", "2G,slots=2,maxmem=8G"}) == 2 * kGiB);
  CHECK(mem({"-m", "size=256"}) == 256 * kMiB);
  CHECK(mem({"--m", "128", "-m", "maxmem=4G", "-m", "768"}) == 768 * kMiB);  // merged, last wins
  CHECK(mem({"-nographic"}) == std::nullopt);

  CHECK_FALSE(cmd({"-m", "1.5"}).memory_size().ok());
  CHECK_FALSE(cmd({"-m", "lots"}).memory_size().ok());
  CHECK_FALSE(cmd({"-m", "size="}).memory_size().ok());
  CHECK_FALSE(cmd({"-m", "99999999999999"}).memory_size().ok());
}

TEST_CASE("-machine and -M") {
  auto c = cmd({"-machine", "q35,accel=kvm,memory-backend=pc.ram"});
  CHECK(*c.machine_type() == "q35");
  CHECK(*c.machine_option("memory-backend") == "pc.ram");
  CHECK(*c.machine_option("accel") == "kvm");

  CHECK(*cmd({"-M", "pc"}).machine_type() == "pc");
  CHECK(*cmd({"-machine", "type=pc-q35-10.0,accel=tcg"}).machine_type() == "pc-q35-10.0");
  auto merged = cmd({"-M", "pc,accel=kvm", "-machine", "q35", "-machine", "dump-guest-core=off"});
  CHECK(*merged.machine_type() == "q35");
  CHECK(*merged.machine_option("accel") == "kvm");
  CHECK(*cmd({"-nographic"}).machine_type() == std::nullopt);
}

TEST_CASE("the flag table matches the installed QEMU") {
  // A flag QEMU gained or an option that lost its value would silently shift
  // every later option in the scan; this catches it when QEMU is upgraded.
  const std::string qemu = "/usr/bin/qemu-system-x86_64";
  if (::access(qemu.c_str(), X_OK) != 0) test::skip(qemu + " is not installed");
  auto help = test::run_program({qemu, "-help"}, 30);
  REQUIRE(help.status == 0);
  std::set<std::string> names;
  std::istringstream lines(help.out);
  for (std::string l; std::getline(lines, l);) {
    // "-name ...", "--preconfig", "-fda/-fdb file", "-h or -help": the first word.
    size_t b = l.find_first_not_of('-');
    if (b == 0 || b == std::string::npos) continue;
    size_t e =
        l.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", b);
    names.insert(l.substr(b, e == std::string::npos ? e : e - b));
  }
  REQUIRE(names.size() > 80);
  // QEMU must never get far enough to start a guest, whatever happens.
  const std::vector<std::string> inert = {qemu,   "-machine",    "none", "-display",
                                          "none", "-nodefaults", "-S"};
  // -jitdump writes jit-PID.dump into the working directory: not the checkout's.
  test::TempDir scratch;
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(scratch.path());
  struct Back {
    std::filesystem::path to;
    ~Back() { std::filesystem::current_path(to); }
  } back{cwd};
  for (const auto& name : names) {
    CAPTURE(name);
    auto argv = inert;
    argv.push_back("-" + name);
    if (qemu_option_is_flag(name)) {
      // A flag followed by -version: QEMU exits at once (version, help, or
      // "not supported for this target"), never complaining of a missing value.
      argv.push_back("-version");
      auto r = test::run_program(argv, 10);
      CHECK(r.err.find("requires an argument") == std::string::npos);
      CHECK(r.status < 128);  // not killed by the timeout
    } else {
      // Last on the line, an option with a value is rejected before anything runs.
      auto r = test::run_program(argv, 10);
      CHECK_MESSAGE(r.err.find("requires an argument") != std::string::npos, r.err);
    }
  }
}

TEST_CASE("cpu_count counts CPUs as QEMU does: cpus, else maxcpus, else the topology") {
  auto count = [](std::vector<std::string> tail) {
    tail.insert(tail.begin(), "qemu-system-x86_64");
    auto cmd = QemuCommand::parse(tail);
    REQUIRE(cmd.ok());
    auto n = cmd->cpu_count();
    return n.ok() ? *n : -1;
  };
  CHECK(count({}) == 1);
  CHECK(count({"-smp", "4"}) == 4);
  CHECK(count({"-smp", "2,sockets=1,cores=2"}) == 2);
  CHECK(count({"-smp", "sockets=2,cores=2,threads=2"}) == 8);
  CHECK(count({"-smp", "maxcpus=6"}) == 6);
  CHECK(count({"-smp", "2,maxcpus=8"}) == 2);
  CHECK(count({"-smp", "1", "-smp", "cpus=3"}) == 3);  // merged, the last winning
  CHECK(count({"-smp", "cores=x"}) == -1);
}

TEST_CASE("same_cpu reads -cpu as QEMU's x86 parser does, not as spelled") {
  // What QEMU 10.0 made of each (qom-get of the CPU's property).
  CHECK(same_cpu("qemu64", "qemu64"));
  CHECK(same_cpu("qemu64,+ssse3", "qemu64,ssse3=on"));
  CHECK(same_cpu("qemu64,ssse3=yes,x2apic=off", "qemu64,-x2apic,ssse3=true"));
  CHECK(same_cpu("qemu64,lahf_lm=off", "qemu64,lahf-lm=off"));
  CHECK(same_cpu("qemu64,ssse3=off,ssse3=on", "qemu64,ssse3=on"));  // the last wins
  CHECK(same_cpu("qemu64,+ssse3,ssse3=off", "qemu64,ssse3=on"));    // "+f" over f=V
  CHECK(same_cpu("qemu64,-ssse3,+ssse3", "qemu64,ssse3=off"));      // "-f" over "+f"
  CHECK(same_cpu("qemu64,+ssse3,-ssse3", "qemu64,-ssse3"));
  CHECK(same_cpu("max,model-id=Foo", "max,model-id=Foo"));
  CHECK_FALSE(same_cpu("qemu64", "max"));
  CHECK_FALSE(same_cpu("qemu64,+ssse3", "qemu64"));
  CHECK_FALSE(same_cpu("qemu64,+ssse3", "qemu64,-ssse3"));
  CHECK_FALSE(same_cpu("qemu64,ssse3=on,ssse3=off", "qemu64,ssse3=on"));
  CHECK_FALSE(same_cpu("max,model-id=Foo", "max,model-id=Bar"));
}

TEST_CASE(
    "qemu_args: the disk files whose locks QEMU checks, in each syntax, and whether it writes "
    "them") {
  auto files = [](const QemuCommand& c) {
    std::vector<std::string> out;
    for (const DiskFile& d : locked_disk_files(c))
      out.push_back(d.path + (d.write ? " w" : " r") + (d.locked ? "" : " unlocked"));
    return out;
  };
  CHECK(files(cmd({"-drive",    "file=a.raw,format=raw,if=virtio",
                   "-drive",    "file=b.qcow2,readonly=on,if=virtio",
                   "-drive",    "file.driver=file,file.filename=c.raw,format=raw",
                   "-drive",    "file=d.raw,snapshot=on",
                   "-drive",    "file=e.raw,file.locking=off",
                   "-drive",    "file=json:{\"driver\":\"file\",,\"filename\":\"x\"}",
                   "-drive",    "file=nbd://host/x",
                   "-drive",    "file=k.raw,force-share=on,readonly=on",
                   "-drive",    "file=l.iso,media=cdrom",
                   "-drive",    "file=m,,n.raw,if=virtio",
                   "-blockdev", "driver=file,filename=f.raw,node-name=f",
                   "-blockdev", "{\"driver\":\"file\",\"filename\":\"g.raw\",\"node-name\":\"g\"}",
                   "-blockdev", "{\"driver\":\"file\",\"filename\":\"h.raw\",\"locking\":\"off\"}",
                   "-blockdev", "driver=qcow2,file=f,node-name=q",
                   "-hda",      "i.raw",
                   "-cdrom",    "j.iso"})) ==
        std::vector<std::string>{"a.raw w", "b.qcow2 r", "c.raw w", "d.raw r", "e.raw w unlocked",
                                 "l.iso r", "m,n.raw w", "f.raw r", "g.raw r", "h.raw r unlocked",
                                 "i.raw w", "j.iso r"});
  // A drive a -device shares for writing (share-rw=on) is let be, as QEMU
  // lets another writer be; a -pflash file is written.
  CHECK(files(cmd({"-drive", "file=s.raw,format=raw,if=none,id=s0", "-device",
                   "virtio-blk-pci,drive=s0,share-rw=on", "-pflash", "vars.fd"})) ==
        std::vector<std::string>{"vars.fd w"});
  // -snapshot: QEMU writes an overlay, and opens the disk itself read-only,
  // except where a drive says snapshot=off.
  CHECK(files(cmd({"-snapshot", "-hda", "i.raw", "-drive", "file=a.raw,snapshot=off", "-drive",
                   "file=b.raw"})) == std::vector<std::string>{"a.raw w", "b.raw r", "i.raw r"});
}

TEST_CASE(
    "qemu_args: a disk another process holds the way QEMU does is refused before QEMU starts") {
  test::TempDir dir;
  const std::string disk = dir / "disk.raw";
  test::write_pattern_file(disk, 1 << 20, "zero", 0);
  // QEMU's locks: a read lock on byte 100 + n for each permission n it
  // holds (1: write), and on 200 + n for each it denies others.
  auto hold = [&](off_t at) {
    UniqueFd fd(::open(disk.c_str(), O_RDONLY | O_CLOEXEC));
    struct flock fl {};
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = at;
    fl.l_len = 1;
    REQUIRE(::fcntl(fd.get(), F_OFD_SETLK, &fl) == 0);
    return fd;
  };
  NullReporter quiet;
  const QemuCommand writes = cmd({"-drive", "file=" + disk + ",format=raw,if=virtio"});
  const QemuCommand reads = cmd({"-drive", "file=" + disk + ",format=raw,if=virtio,readonly=on"});
  CHECK(check_disks_free(writes, quiet).ok());
  {
    // A VM writing it: neither a writer nor a reader may open it.
    UniqueFd writer = hold(101);
    for (const QemuCommand* c : {&writes, &reads}) {
      Status st = check_disks_free(*c, quiet);
      REQUIRE_FALSE(st.ok());
      CHECK(st.error().message() ==
            "a disk image of the QEMU command is in use (" + disk +
                "): another process (a QEMU: the VM it was saved from, still running?) is "
                "writing it; stop that VM, or give this one its own copy of the disk (an "
                "overlay: qemu-img create -f qcow2 -b DISK -F FORMAT NEW.qcow2)");
    }
  }
  {
    // A VM reading it and denying writes (a shared read-only base): others
    // may read it too, not write it.
    UniqueFd reader = hold(100), no_writers = hold(201);
    CHECK(check_disks_free(reads, quiet).ok());
    Status st = check_disks_free(writes, quiet);
    REQUIRE_FALSE(st.ok());
    CHECK(test::contains(st.error().message(), "uses it and lets no one else write it"));
  }
  CHECK(check_disks_free(writes, quiet).ok());  // the locks went with their descriptors
  {
    // locking=off: QEMU would let it be, and so does vmsave, but not silently.
    struct Collect : NullReporter {
      std::vector<std::string> said;
      void warn(const std::string& m) override { said.push_back(m); }
    } rep;
    const QemuCommand unlocked =
        cmd({"-drive", "file=" + disk + ",format=raw,if=virtio,file.locking=off"});
    CHECK(check_disks_free(unlocked, rep).ok());
    CHECK(rep.said.empty());
    UniqueFd writer = hold(101);
    CHECK(check_disks_free(unlocked, rep).ok());
    REQUIRE(rep.said.size() == 1);
    CHECK(rep.said[0] == "another process (a QEMU) uses disk image " + disk +
                             ", and locking=off lets this VM write it too: the file systems on "
                             "it will break; give this VM its own copy of the disk");
  }
}
