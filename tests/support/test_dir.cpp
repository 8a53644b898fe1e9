#include "support/test_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <utility>
#include <vector>

#include "upgraded/artifact/digest.h"
#include "upgraded/artifact/encoding.h"
#include "upgraded/fs/beneath.h"
#include "upgraded/fs/remove_tree.h"

namespace upgraded::test {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/upgraded-test.XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back(0);
  if (!::mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed");
  m_path = buf.data();
}

TempDir::~TempDir() {
  auto [parent, name] =
      std::pair(m_path.substr(0, m_path.rfind('/')), m_path.substr(m_path.rfind('/') + 1));
  int fd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)fs::remove_tree(fd, name);
    ::close(fd);
  }
}

void write_file(const std::string& path, const std::string& content, unsigned mode) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  out.close();
  ::chmod(path.c_str(), mode);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

void make_dirs(const std::string& path) {
  for (std::size_t pos = path.find('/', 1);; pos = path.find('/', pos + 1)) {
    ::mkdir(path.substr(0, pos).c_str(), 0755);
    if (pos == std::string::npos) break;
  }
}

bool set_default_acl(const std::string& dir, unsigned owner, unsigned group, unsigned other) {
  // The kernel's xattr form (linux/posix_acl_xattr.h): a little-endian version, then a tag,
  // permissions and id per entry.
  std::string blob;
  auto put = [&](std::uint32_t v, int bytes) {
    for (int i = 0; i < bytes; ++i)
      blob.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  put(2, 4);
  for (auto [tag, perm] : {std::pair{0x01u, owner}, {0x04u, group}, {0x20u, other}}) {
    put(tag, 2);
    put(perm, 2);
    put(0xffffffffu, 4);
  }
  if (::setxattr(dir.c_str(), "system.posix_acl_default", blob.data(), blob.size(), 0) == 0)
    return true;
  if (errno == EOPNOTSUPP) return false;
  throw std::system_error(errno, std::generic_category(), "setting a default ACL on " + dir);
}

namespace {

void walk(const std::string& root, const std::string& rel, std::map<std::string, std::string>& out,
          bool with_mtime) {
  std::string dir = rel.empty() ? root : root + "/" + rel;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  std::vector<std::string> names;
  while (dirent* de = ::readdir(d))
    if (std::strcmp(de->d_name, ".") && std::strcmp(de->d_name, ".."))
      names.emplace_back(de->d_name);
  ::closedir(d);
  for (const auto& n : names) {
    std::string r = rel.empty() ? n : rel + "/" + n;
    std::string full = root + "/" + r;
    struct stat st {};
    if (::lstat(full.c_str(), &st) != 0) continue;
    std::ostringstream desc;
    desc << std::oct << st.st_mode << std::dec;
    if (!S_ISDIR(st.st_mode)) desc << " size=" << st.st_size;  // directory sizes vary by filesystem
    if (with_mtime) desc << " mtime=" << st.st_mtim.tv_sec << "." << st.st_mtim.tv_nsec;
    if (S_ISLNK(st.st_mode)) {
      char buf[4096];
      ssize_t n2 = ::readlink(full.c_str(), buf, sizeof buf);
      desc << " -> " << std::string(buf, n2 > 0 ? static_cast<std::size_t>(n2) : 0);
    } else if (S_ISREG(st.st_mode)) {
      auto content = read_file(full);
      desc << " sha256=" << artifact::to_hex(artifact::Sha256::of(artifact::as_bytes(content)));
    }
    out[r] = desc.str();
    if (S_ISDIR(st.st_mode)) walk(root, r, out, with_mtime);
  }
}

}  // namespace

std::map<std::string, std::string> snapshot(const std::string& root, bool with_mtime) {
  std::map<std::string, std::string> out;
  struct stat st {};
  if (::lstat(root.c_str(), &st) == 0) {
    std::ostringstream desc;
    desc << std::oct << st.st_mode;
    if (with_mtime) desc << " mtime=" << std::dec << st.st_mtim.tv_sec;
    out["."] = desc.str();
  }
  walk(root, "", out, with_mtime);
  return out;
}

std::string tree_hash(const std::string& root) {
  std::map<std::string, std::string> entries;
  walk(root, "", entries, false);
  std::string all;
  for (const auto& [k, v] : entries)
    all += k + "\t" + v + "\n";
  return artifact::to_hex(artifact::Sha256::of(artifact::as_bytes(all)));
}

bool in_ci() {
  const char* ci = std::getenv("CI");
  return ci && (std::strcmp(ci, "true") == 0 || std::strcmp(ci, "1") == 0);
}

}  // namespace upgraded::test

namespace {
// UPGRADED_TEST_BENEATH=walk runs a test binary with the openat2 fallback forced
// (tests/CMakeLists.txt registers some suites a second time so).
const bool kBeneathImplChosen = [] {
  const char* v = std::getenv("UPGRADED_TEST_BENEATH");
  if (v && std::string(v) == "walk")
    upgraded::fs::set_beneath_impl(upgraded::fs::BeneathImpl::kWalk);
  return true;
}();
}  // namespace
