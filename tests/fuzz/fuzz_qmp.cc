// libFuzzer target: QMP message handling. The input is everything a peer
// says on the QMP socket: greeting, replies, events, garbage. A server
// thread on a real Unix socket sends it and hangs up; the client connects
// (greeting, qmp_capabilities), runs a command, waits for an event and
// collects events, which drives framing, JSON parsing, id matching and the
// error paths. The ids the client uses are "vmsave-1" (qmp_capabilities)
// and "vmsave-2" (query-status); the seed corpus has replies with both.

#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <string>
#include <thread>

#include "core/qmp.h"

using namespace vmsave;

namespace {

std::string g_dir, g_path;
int g_listen = -1;

void serve(const uint8_t* data, size_t size) {
  int c = ::accept4(g_listen, nullptr, nullptr, SOCK_CLOEXEC);
  if (c < 0) return;
  size_t off = 0;
  while (off < size) {
    ssize_t n = ::send(c, data + off, size - off, MSG_NOSIGNAL);
    if (n <= 0) break;  // the client gave up and closed
    off += n;
  }
  ::shutdown(c, SHUT_WR);
  char buf[4096];
  while (::recv(c, buf, sizeof(buf), 0) > 0) {
  }
  ::close(c);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* base = getenv("VMSAVE_FUZZ_DIR");
  std::string tmpl = std::string(base ? base : "/tmp") + "/vmsave-fuzz-XXXXXX";
  if (!mkdtemp(tmpl.data())) abort();
  g_dir = tmpl;
  g_path = g_dir + "/qmp.sock";
  g_listen = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (g_path.size() >= sizeof(addr.sun_path)) abort();
  memcpy(addr.sun_path, g_path.data(), g_path.size());
  if (::bind(g_listen, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) abort();
  if (::listen(g_listen, 4) < 0) abort();
  atexit([] {
    unlink(g_path.c_str());
    rmdir(g_dir.c_str());
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::thread server(serve, data, size);
  {
    auto c = QmpClient::connect(g_path, 2);
    if (c.ok()) {
      auto r = c->execute("query-status", nullptr, 2);
      if (r.ok()) (void)r->dump();
      auto ev = c->wait_event("STOP", 2);
      (void)ev;
      auto evs = c->take_events();
      for (auto& e : evs) (void)e.dump();
      (void)c->greeting().dump();
    } else {
      (void)c.error().message();
    }
  }  // the client's socket closes here, so the server's drain loop ends
  server.join();
  return 0;
}
