#include "job.h"

#include <sys/eventfd.h>
#include <unistd.h>

namespace upgraded::daemon {

Job::Job(std::uint32_t id_, std::string type_, std::string app_, std::string version_, uid_t owner_)
    : id(id_),
      type(std::move(type_)),
      app(std::move(app_)),
      version(std::move(version_)),
      owner(owner_),
      m_event(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

bool Job::cancel_requested() const {
  std::lock_guard lock(m_mutex);
  return m_cancel;
}

bool Job::try_commit() {
  std::lock_guard lock(m_mutex);
  if (m_cancel) return false;
  m_committed = true;
  return true;
}

Job::CancelOutcome Job::request_cancel() {
  std::lock_guard lock(m_mutex);
  if (m_committed) return CancelOutcome::kTooLate;
  m_cancel = true;
  std::uint64_t one = 1;
  (void)!::write(m_event.get(), &one, sizeof one);
  return CancelOutcome::kAsked;
}

JobObject::JobObject(sdbus::IConnection& bus, std::shared_ptr<Job> job, CancelFn cancel)
    : AdaptorInterfaces(bus, job->path()), m_job(std::move(job)), m_cancel(std::move(cancel)) {
  registerAdaptor();
}

JobObject::~JobObject() {
  unregisterAdaptor();
}

void JobObject::update(const std::string& step, std::uint32_t progress) {
  std::vector<std::string> changed;
  if (step != m_job->step) {
    m_job->step = step;
    changed.push_back("Step");
  }
  if (progress != m_job->progress) {
    m_job->progress = progress;
    changed.push_back("Progress");
  }
  if (!changed.empty()) getObject().emitPropertiesChangedSignal(INTERFACE_NAME, changed);
}

void JobObject::set_state(const std::string& state) {
  if (state == m_job->state) return;
  m_job->state = state;
  getObject().emitPropertiesChangedSignal(INTERFACE_NAME, {"State"});
}

void JobObject::set_error(const std::string& error_name) {
  m_job->error = error_name;
  getObject().emitPropertiesChangedSignal(INTERFACE_NAME, {"Error"});
}

void JobObject::Cancel(sdbus::Result<>&& result) {
  const sdbus::Message* msg = getObject().getCurrentlyProcessedMessage();
  m_cancel(m_job, msg ? msg->getSender() : std::string(),
           std::make_shared<sdbus::Result<>>(std::move(result)));
}

}  // namespace upgraded::daemon
