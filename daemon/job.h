#pragma once

// A job: one mutating operation on one app, run on its own thread, visible on the bus as
// /org/upgraded1/job/<id> until it ends.

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "org.upgraded1.Job.adaptor.h"
#include "upgraded/fs/unique_fd.h"

namespace upgraded::daemon {

class Job {
 public:
  Job(std::uint32_t id, std::string type, std::string app, std::string version, uid_t owner);

  const std::uint32_t id;
  const std::string type;         ///< install, activate, rollback, remove, recover
  const std::string app;          ///< a set's: its apps, comma-separated
  std::vector<std::string> apps;  ///< the apps it holds (set before it starts)
  const std::string version;
  const uid_t owner;  ///< who started it (may cancel it)
  std::string path() const { return "/org/upgraded1/job/" + std::to_string(id); }

  /// Readable once a cancel was asked for (an eventfd, for poll()).
  int cancel_fd() const { return m_event.get(); }
  bool cancel_requested() const;
  /// The job's thread, at its point of no return: false if a cancel came first (then nothing
  /// may change); otherwise cancels are refused from now on.
  bool try_commit();
  enum class CancelOutcome { kAsked, kTooLate };
  CancelOutcome request_cancel();

  // Loop thread only: what the bus sees.
  std::string state = "running";
  std::uint32_t progress = 0;
  std::string step = "queued";
  std::string error;  ///< D-Bus error name once failed or canceled

 private:
  mutable std::mutex m_mutex;
  bool m_cancel = false;
  bool m_committed = false;
  UniqueFd m_event;
};

/// The bus object of a job. Lives on the loop thread.
class JobObject final : public sdbus::AdaptorInterfaces<org::upgraded1::Job_adaptor> {
 public:
  /// `cancel(job, sender, reply)` authorizes and carries out Cancel(), and answers `reply`.
  using CancelReply = std::shared_ptr<sdbus::Result<>>;
  using CancelFn = std::function<void(const std::shared_ptr<Job>&, const std::string& sender,
                                      CancelReply reply)>;
  JobObject(sdbus::IConnection& bus, std::shared_ptr<Job> job, CancelFn cancel);
  ~JobObject();
  /// Sets Step and Progress (and State) and announces the change.
  void update(const std::string& step, std::uint32_t progress);
  void set_state(const std::string& state);
  void set_error(const std::string& error_name);

 private:
  void Cancel(sdbus::Result<>&& result) override;
  std::uint32_t Id() override { return m_job->id; }
  std::string Type() override { return m_job->type; }
  std::string App() override { return m_job->app; }
  std::string Version() override { return m_job->version; }
  std::string State() override { return m_job->state; }
  std::uint32_t Progress() override { return m_job->progress; }
  std::string Step() override { return m_job->step; }
  std::string Error() override { return m_job->error; }

  std::shared_ptr<Job> m_job;
  CancelFn m_cancel;
};

}  // namespace upgraded::daemon
