#include "log.h"

#include <sys/stat.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace upgraded::daemon {
namespace {

// systemd's documented test: stderr is the journal when JOURNAL_STREAM names its device:inode.
bool stderr_is_journal() {
  const char* js = std::getenv("JOURNAL_STREAM");
  if (!js) return false;
  struct stat st {};
  if (::fstat(STDERR_FILENO, &st) != 0) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(js, "%llu:%llu", &dev, &ino) != 2) return false;
  return dev == st.st_dev && ino == st.st_ino;
}

}  // namespace

void log(Level level, const LogContext& c, const std::string& message) {
  static const bool skip_stderr = stderr_is_journal();
  std::vector<std::string> fields;
  fields.push_back("MESSAGE=" + message);
  fields.push_back("PRIORITY=" + std::to_string(static_cast<int>(level)));
  fields.push_back("SYSLOG_IDENTIFIER=upgraded");
  if (!c.app.empty()) fields.push_back("UPGRADED_APP=" + c.app);
  if (!c.version.empty()) fields.push_back("UPGRADED_VERSION=" + c.version);
  if (!c.job.empty()) fields.push_back("UPGRADED_JOB=" + c.job);
  if (c.message_id) fields.push_back(std::string("MESSAGE_ID=") + c.message_id);
  std::vector<iovec> iov;
  for (auto& f : fields)
    iov.push_back(iovec{f.data(), f.size()});
  bool journaled = ::sd_journal_sendv(iov.data(), static_cast<int>(iov.size())) >= 0;
  if (journaled && skip_stderr) return;
  static std::mutex m;
  std::lock_guard lock(m);
  std::string line = "<" + std::to_string(static_cast<int>(level)) + ">" + message;
  if (!c.job.empty()) line += " [job " + c.job + "]";
  line += "\n";
  (void)!::write(STDERR_FILENO, line.data(), line.size());
}

}  // namespace upgraded::daemon
