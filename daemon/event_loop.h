#pragma once

// The daemon's one event loop: the bus connection, work posted by job threads, SIGTERM/SIGINT
// (signalfd) and the systemd watchdog (timerfd). Everything that touches the bus runs on this
// thread; job threads only post() to it.

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "upgraded/fs/unique_fd.h"
#include "upgraded/result.h"

namespace sdbus {
class IConnection;
}

namespace upgraded::daemon {

class EventLoop {
 public:
  /// Blocks SIGTERM and SIGINT in the calling thread (call before starting other threads, so
  /// they inherit the mask) and reads them from a signalfd instead.
  static Result<std::unique_ptr<EventLoop>> create(sdbus::IConnection& bus);

  /// Joins the tasks still running (their continuations are dropped).
  ~EventLoop() { join_tasks(); }
  void join_tasks();

  /// Runs `fn` on the loop's thread soon. Thread-safe.
  void post(std::function<void()> fn);
  /// Runs `work` on a thread of its own (for anything that may block: reading a caller's file),
  /// then the closure it returns on the loop's thread. Loop thread only.
  void run_task(std::function<std::function<void()>()> work);
  /// Tasks started and not yet finished.
  std::size_t pending_tasks() const { return m_tasks.size(); }
  /// Runs until stop(). `on_terminate` is called (on the loop) for each SIGTERM or SIGINT.
  /// Losing the bus ends it with an error (never an exception).
  Result<void> run(const std::function<void()>& on_terminate);
  void stop() { m_stop = true; }

 private:
  explicit EventLoop(sdbus::IConnection& bus) : m_bus(bus) {}
  Result<void> run_until_stopped(const std::function<void()>& on_terminate);
  void run_posted();
  void ping_watchdog();

  sdbus::IConnection& m_bus;
  UniqueFd m_wake;    // eventfd
  UniqueFd m_signal;  // signalfd
  UniqueFd m_watchdog;
  std::mutex m_mutex;
  std::deque<std::function<void()>> m_posted;
  bool m_stop = false;
  bool m_bus_busy = false;
  std::uint64_t m_next_task = 0;
  std::map<std::uint64_t, std::thread> m_tasks;  // loop thread only
};

}  // namespace upgraded::daemon
