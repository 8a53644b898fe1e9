#include "event_loop.h"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <sdbus-c++/sdbus-c++.h>

#include "log.h"

namespace upgraded::daemon {

Result<std::unique_ptr<EventLoop>> EventLoop::create(sdbus::IConnection& bus) {
  std::unique_ptr<EventLoop> loop(new EventLoop(bus));
  int wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) return system_error(errno, "eventfd");
  loop->m_wake.reset(wake);
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (int e = ::pthread_sigmask(SIG_BLOCK, &mask, nullptr); e != 0)
    return system_error(e, "blocking signals");
  int sfd = ::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) return system_error(errno, "signalfd");
  loop->m_signal.reset(sfd);
  // The watchdog is pinged at half its interval, from the loop: a stuck loop stops the pings.
  std::uint64_t usec = 0;
  if (::sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
    int tfd = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (tfd < 0) return system_error(errno, "timerfd");
    loop->m_watchdog.reset(tfd);
    itimerspec its{};
    std::uint64_t half = usec / 2;
    its.it_interval.tv_sec = static_cast<time_t>(half / 1000000);
    its.it_interval.tv_nsec = static_cast<long>(half % 1000000) * 1000;
    its.it_value = its.it_interval;
    if (::timerfd_settime(tfd, 0, &its, nullptr) != 0) return system_error(errno, "timerfd");
  }
  return loop;
}

void EventLoop::join_tasks() {
  for (auto& [id, thread] : m_tasks)
    if (thread.joinable()) thread.join();
  m_tasks.clear();
}

void EventLoop::post(std::function<void()> fn) {
  {
    std::lock_guard lock(m_mutex);
    m_posted.push_back(std::move(fn));
  }
  std::uint64_t one = 1;
  (void)!::write(m_wake.get(), &one, sizeof one);
}

void EventLoop::run_task(std::function<std::function<void()>()> work) {
  const std::uint64_t id = m_next_task++;
  m_tasks[id] = std::thread([this, id, work = std::move(work)] {
    std::function<void()> then;
    try {
      then = work();
    } catch (const std::exception& e) {
      log(Level::kError, std::string("internal error in a task, ignoring: ") + e.what());
    }
    post([this, id, then = std::move(then)] {
      if (auto it = m_tasks.find(id); it != m_tasks.end()) {
        it->second.join();  // it posted this as its last act
        m_tasks.erase(it);
      }
      if (then) then();
    });
  });
}

void EventLoop::run_posted() {
  std::deque<std::function<void()>> work;
  {
    std::lock_guard lock(m_mutex);
    work.swap(m_posted);
  }
  for (auto& fn : work) {
    // One failing closure must not take the daemon down with it.
    try {
      fn();
    } catch (const std::exception& e) {
      log(Level::kError, std::string("internal error, ignoring: ") + e.what());
    }
  }
}

void EventLoop::ping_watchdog() {
  if (!m_watchdog) return;
  std::uint64_t v;
  if (::read(m_watchdog.get(), &v, sizeof v) == sizeof v) ::sd_notify(0, "WATCHDOG=1");
}

Result<void> EventLoop::run(const std::function<void()>& on_terminate) {
  try {
    return run_until_stopped(on_terminate);
  } catch (const sdbus::Error& e) {
    // The bus went away (dbus-daemon stopped or died): nothing more can arrive or be answered.
    return Error(ErrorCode::kFailed,
                 "lost the connection to the bus: " + e.getMessage() + " (" + e.getName() + ")");
  }
}

Result<void> EventLoop::run_until_stopped(const std::function<void()>& on_terminate) {
  while (!m_stop) {
    // A bounded batch of bus messages, then the posted work and the watchdog: a flood of calls
    // must not starve the jobs' updates or get the daemon killed by its watchdog.
    m_bus_busy = false;
    for (int i = 0; m_bus.processPendingRequest(); ++i) {
      if (i == 63) {
        m_bus_busy = true;
        break;
      }
    }
    run_posted();
    ping_watchdog();
    if (m_stop) break;
    auto pd = m_bus.getEventLoopPollData();
    pollfd fds[4] = {{pd.fd, pd.events, 0},
                     {m_wake.get(), POLLIN, 0},
                     {m_signal.get(), POLLIN, 0},
                     {m_watchdog.get(), POLLIN, 0}};
    int timeout = -1;
    if (auto rel = pd.getRelativeTimeout()) timeout = static_cast<int>((rel->count() + 999) / 1000);
    // More bus messages may be buffered already: then poll only to collect the other events.
    if (pd.fd >= 0 && m_bus_busy) timeout = 0;
    int n = ::poll(fds, m_watchdog ? 4 : 3, timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      return system_error(errno, "poll");
    }
    if (fds[1].revents & POLLIN) {
      std::uint64_t v;
      (void)!::read(m_wake.get(), &v, sizeof v);
    }
    if (fds[2].revents & POLLIN) {
      signalfd_siginfo si;
      while (::read(m_signal.get(), &si, sizeof si) == sizeof si)
        on_terminate();
    }
    if (m_watchdog && (fds[3].revents & POLLIN)) ping_watchdog();
  }
  return {};
}

}  // namespace upgraded::daemon
