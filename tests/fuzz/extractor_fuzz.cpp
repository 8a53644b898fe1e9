// Fuzz target `extractor`: the extractor's entry policy (lib/artifact/extractor.cpp). The input
// is an uncompressed payload tar, extracted (Compression::kNone) into a fresh directory with the
// policy the store uses (read-only tree, unsafe modes refused, default limits) and the locale
// upgradectl sets (C.UTF-8); the directory is removed afterwards. The harness first rewrites the
// checksum of every ustar header it finds by walking the headers as tar does: a mutation
// would otherwise almost always break the checksum, and libarchive would refuse the header
// before the entry policy sees it. (Checksums are libarchive's business, not ours.)
//
// Invariants: every error is a refusal (kPolicyRefused) or a space limit (kNoSpace): a system
// call failing on what the extractor let through means its bookkeeping missed a case. Nothing
// appears, disappears or changes next to the destination (a canary file sits there: no hard
// link to it, no write through a symlink). After a success the tree holds only directories,
// regular files and symlinks, without setuid, setgid, sticky, world-writable or (read-only
// release) any write bits; every symlink resolves beneath the tree, and the statistics match the
// tree.

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <clocale>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_support.h"
#include "upgraded/artifact/extractor.h"
#include "upgraded/fs/beneath.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/remove_tree.h"

using namespace upgraded;
using namespace upgraded::artifact;

namespace {

constexpr const char* kCanary = "canary";
constexpr const char* kCanaryText = "nothing may touch this file";

// Hands the tar to the extractor in growing pieces, so that headers and data straddle reads.
class BytesSource final : public PayloadSource {
 public:
  explicit BytesSource(std::string_view bytes) : m_bytes(bytes) {}
  Result<std::span<const std::byte>> next() override {
    std::size_t n = std::min(m_bytes.size() - m_pos, m_piece);
    auto out = std::as_bytes(std::span(m_bytes.data() + m_pos, n));
    m_pos += n;
    m_piece = m_piece * 2 + 1;
    return out;
  }

 private:
  std::string_view m_bytes;
  std::size_t m_pos = 0;
  std::size_t m_piece = 511;
};

std::uint64_t octal(const char* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n && p[i] >= '0' && p[i] <= '7'; ++i)
    v = v * 8 + static_cast<std::uint64_t>(p[i] - '0');
  return v;
}

void fix_checksums(std::string& tar) {
  std::size_t pos = 0;
  while (pos + kTarBlock <= tar.size()) {
    char* h = tar.data() + pos;
    pos += kTarBlock;
    if (std::memcmp(h + 257, "ustar", 5) != 0) continue;
    std::memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (std::size_t i = 0; i < kTarBlock; ++i)
      sum += static_cast<unsigned char>(h[i]);
    std::snprintf(h + 148, 8, "%06o", sum);  // six digits, NUL, and the space left in place
    // Skip the member's data (links carry none); base-256 sizes are left alone.
    if (h[156] != '1' && h[156] != '2' && !(h[124] & 0x80)) {
      std::uint64_t size = octal(h + 124, 12);
      if (size > tar.size()) break;
      pos += (size + kTarBlock - 1) / kTarBlock * kTarBlock;
    }
  }
}

// A directory of our own, with the canary in it, for the whole process. tmpfs when there is
// one: extraction is mostly inode work, which costs far less there.
int work_dir() {
  static const int fd = [] {
    // As upgradectl runs: libarchive converts pax names through the C library's locale, and in
    // the "C" locale it refuses every non-ASCII one before the entry policy sees it.
    std::setlocale(LC_CTYPE, "C.UTF-8");
    const char* base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : nullptr;
    if (!base) base = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
    std::string tmpl = std::string(base) + "/upgraded-extractor-fuzz.XXXXXX";
    FUZZ_CHECK(::mkdtemp(tmpl.data()) != nullptr);
    static std::string path = tmpl;
    std::atexit([] { (void)fs::remove_tree(AT_FDCWD, path); });
    int dfd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    FUZZ_CHECK(dfd >= 0);
    int c = ::openat(dfd, kCanary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    FUZZ_CHECK(c >= 0);
    FUZZ_CHECK(::write(c, kCanaryText, std::strlen(kCanaryText)) ==
               static_cast<ssize_t>(std::strlen(kCanaryText)));
    ::close(c);
    return dfd;
  }();
  return fd;
}

struct TreeCount {
  std::uint64_t files = 0, directories = 0, symlinks = 0;
  std::vector<std::string> symlink_paths;
};

void walk(int dfd, const std::string& prefix, bool read_only, TreeCount& count) {
  int dup = ::fcntl(dfd, F_DUPFD_CLOEXEC, 0);
  FUZZ_CHECK(dup >= 0);
  DIR* dir = ::fdopendir(dup);
  FUZZ_CHECK(dir != nullptr);
  std::vector<std::string> names;
  while (dirent* de = ::readdir(dir))
    if (std::strcmp(de->d_name, ".") != 0 && std::strcmp(de->d_name, "..") != 0)
      names.emplace_back(de->d_name);
  ::closedir(dir);
  for (const auto& name : names) {
    std::string path = prefix + name;
    struct stat st {};
    FUZZ_CHECK(::fstatat(dfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0);
    if (S_ISLNK(st.st_mode)) {
      ++count.symlinks;
      count.symlink_paths.push_back(path);
      continue;
    }
    FUZZ_CHECK_MSG(S_ISREG(st.st_mode) || S_ISDIR(st.st_mode), path);
    FUZZ_CHECK_MSG((st.st_mode & (S_ISUID | S_ISGID | S_ISVTX | S_IWOTH)) == 0, path);
    if (read_only) FUZZ_CHECK_MSG((st.st_mode & 0222) == 0, path);
    if (S_ISREG(st.st_mode)) {
      ++count.files;
      continue;
    }
    ++count.directories;
    // Searchable by us whatever its mode (a 0000 directory is legal; ctest may run unprivileged).
    FUZZ_CHECK(::fchmodat(dfd, name.c_str(), (st.st_mode & 07777) | 0700, 0) == 0);
    int sub = ::openat(dfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    FUZZ_CHECK(sub >= 0);
    walk(sub, path + "/", read_only, count);
    ::close(sub);
  }
}

void check_surroundings(int base) {
  auto names = fs::list_names(base, ".");
  FUZZ_CHECK(names.ok());
  FUZZ_CHECK((*names == std::vector<std::string>{kCanary, "dest"}));
  struct stat st {};
  FUZZ_CHECK(::fstatat(base, kCanary, &st, AT_SYMLINK_NOFOLLOW) == 0);
  FUZZ_CHECK(S_ISREG(st.st_mode) && st.st_nlink == 1 && (st.st_mode & 07777) == 0644);
  auto text = fs::read_file(base, kCanary, 1024);
  FUZZ_CHECK(text.ok() && *text == kCanaryText);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int base = work_dir();
  FUZZ_CHECK(::mkdirat(base, "dest", 0700) == 0);
  int dest = ::openat(base, "dest", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  FUZZ_CHECK(dest >= 0);

  ExtractPolicy policy;  // what the store asks for (store.cpp: stage)
  policy.read_only = true;
  std::string tar(fuzz::as_text(data, size));
  fix_checksums(tar);
  BytesSource source(tar);
  auto stats = extract_payload(source, Compression::kNone, size, dest, policy);
  check_surroundings(base);

  if (!stats) {
    auto code = stats.error().code();
    FUZZ_CHECK_MSG(code == ErrorCode::kPolicyRefused || code == ErrorCode::kNoSpace,
                   stats.error().message());
  } else {
    struct stat root {};
    FUZZ_CHECK(::fstat(dest, &root) == 0 && (root.st_mode & 0222) == 0);
    FUZZ_CHECK(::fchmod(dest, (root.st_mode & 07777) | 0700) == 0);
    TreeCount count;
    walk(dest, "", policy.read_only, count);
    FUZZ_CHECK(count.files == stats->files + stats->hardlinks);
    FUZZ_CHECK(count.symlinks == stats->symlinks);
    FUZZ_CHECK(count.directories >= stats->directories);
    FUZZ_CHECK(stats->entries >=
               stats->files + stats->hardlinks + stats->symlinks + stats->directories);
    for (const auto& path : count.symlink_paths) {
      int fd = fs::resolve_beneath(dest, path.c_str());
      if (fd >= 0) ::close(fd);
      FUZZ_CHECK_MSG(fd >= 0 || errno == ENOENT || errno == ENOTDIR, path);
    }
  }
  ::close(dest);
  auto removed = fs::remove_tree(base, "dest");
  FUZZ_CHECK_MSG(removed.ok(), (removed ? std::string() : removed.error().message()));
  return 0;
}
