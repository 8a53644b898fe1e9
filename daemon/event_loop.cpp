#include "event_loop.h"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <sdbus-c++/sdbus-c++.h>

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

void EventLoop::post(std::function<void()> fn) {
  {
    std::lock_guard lock(m_mutex);
    m_posted.push_back(std::move(fn));
  }
  std::uint64_t one = 1;
  (void)!::write(m_wake.get(), &one, sizeof one);
}

void EventLoop::run_posted() {
  std::deque<std::function<void()>> work;
  {
    std::lock_guard lock(m_mutex);
    work.swap(m_posted);
  }
  for (auto& fn : work)
    fn();
}

Result<void> EventLoop::run(const std::function<void()>& on_terminate) {
  while (!m_stop) {
    while (m_bus.processPendingRequest()) {
    }
    run_posted();
    if (m_stop) break;
    auto pd = m_bus.getEventLoopPollData();
    pollfd fds[4] = {{pd.fd, pd.events, 0},
                     {m_wake.get(), POLLIN, 0},
                     {m_signal.get(), POLLIN, 0},
                     {m_watchdog.get(), POLLIN, 0}};
    int timeout = -1;
    if (auto rel = pd.getRelativeTimeout()) timeout = static_cast<int>((rel->count() + 999) / 1000);
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
    if (m_watchdog && (fds[3].revents & POLLIN)) {
      std::uint64_t v;
      (void)!::read(m_watchdog.get(), &v, sizeof v);
      ::sd_notify(0, "WATCHDOG=1");
    }
  }
  return {};
}

}  // namespace upgraded::daemon
