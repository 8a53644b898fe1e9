#include "upgraded/artifact/packer.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <set>

#include "upgraded/artifact/container.h"
#include "upgraded/artifact/encoding.h"
#include "upgraded/artifact/keys.h"
#include "upgraded/artifact/signatures.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/policy/names.h"

namespace upgraded::artifact {
namespace {

using ArchivePtr = std::unique_ptr<archive, decltype(&archive_write_free)>;
using EntryPtr = std::unique_ptr<archive_entry, decltype(&archive_entry_free)>;
using ResolverPtr =
    std::unique_ptr<archive_entry_linkresolver, decltype(&archive_entry_linkresolver_free)>;

Error archive_error(archive* a, const std::string& doing) {
  const char* msg = archive_error_string(a);
  return Error(ErrorCode::kFailed, doing + ": " + (msg ? msg : "libarchive error"));
}

class DirWriter {
 public:
  DirWriter(archive* a, std::int64_t mtime)
      : m_archive(a),
        m_mtime(mtime),
        m_resolver(archive_entry_linkresolver_new(), &archive_entry_linkresolver_free) {
    archive_entry_linkresolver_set_strategy(m_resolver.get(), ARCHIVE_FORMAT_TAR_PAX_RESTRICTED);
  }

  Result<void> walk(int dirfd, const std::string& rel) {
    auto names = fs::list_names(dirfd, ".");  // bytewise order: reproducible
    if (!names) return names.error();
    for (const auto& name : *names) {
      std::string path = rel.empty() ? name : rel + "/" + name;
      struct stat st {};
      if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
        return system_error(errno, "inspecting " + policy::quote(path));
      if (S_ISDIR(st.st_mode)) {
        UPGRADED_TRY(add(path, st, dirfd, name));
        int child = ::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (child < 0) return system_error(errno, "opening " + policy::quote(path));
        UniqueFd owner(child);
        UPGRADED_TRY(walk(child, path));
      } else if (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)) {
        UPGRADED_TRY(add(path, st, dirfd, name));
      } else {
        return Error(ErrorCode::kInvalidArgument,
                     policy::quote(path) + " is not a regular file, directory or symlink");
      }
    }
    return {};
  }

 private:
  Result<void> add(const std::string& path, const struct stat& st, int dirfd,
                   const std::string& name) {
    EntryPtr e(archive_entry_new(), &archive_entry_free);
    archive_entry_set_pathname(e.get(), path.c_str());
    archive_entry_copy_stat(e.get(), &st);
    // Normalize everything that would make the payload depend on where it was built.
    archive_entry_set_uid(e.get(), 0);
    archive_entry_set_gid(e.get(), 0);
    archive_entry_set_mtime(e.get(), m_mtime, 0);
    archive_entry_unset_atime(e.get());
    archive_entry_unset_ctime(e.get());
    archive_entry_unset_birthtime(e.get());
    archive_entry_set_perm(e.get(), st.st_mode & 07777);
    if (S_ISLNK(st.st_mode)) {
      std::vector<char> target(static_cast<std::size_t>(st.st_size) + 2);
      ssize_t n = ::readlinkat(dirfd, name.c_str(), target.data(), target.size() - 1);
      if (n < 0) return system_error(errno, "reading symlink " + policy::quote(path));
      target[static_cast<std::size_t>(n)] = 0;
      archive_entry_set_symlink(e.get(), target.data());
      archive_entry_set_size(e.get(), 0);
    }
    if (S_ISDIR(st.st_mode)) archive_entry_set_size(e.get(), 0);
    // Inode numbers differ between checkouts; only the link structure is kept. Device/inode are
    // set to a counter per distinct inode so hardlinks still resolve.
    archive_entry* entry = e.release();
    archive_entry* spare = nullptr;
    bool regular = S_ISREG(st.st_mode);
    if (regular && st.st_nlink > 1) {
      archive_entry_linkify(m_resolver.get(), &entry, &spare);
    }
    EntryPtr owned(entry, &archive_entry_free);
    EntryPtr owned_spare(spare, &archive_entry_free);
    if (!entry) return {};
    archive_entry_set_dev(entry, 0);
    archive_entry_set_ino(entry, 0);
    archive_entry_set_nlink(entry, 1);
    if (archive_write_header(m_archive, entry) != ARCHIVE_OK)
      return archive_error(m_archive, "adding " + policy::quote(path));
    if (regular && archive_entry_size(entry) > 0) {
      int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
      if (fd < 0) return system_error(errno, "opening " + policy::quote(path));
      UniqueFd owner(fd);
      std::vector<char> buf(1 << 20);
      std::int64_t left = archive_entry_size(entry);
      while (left > 0) {
        ssize_t n = ::read(fd, buf.data(),
                           std::min<std::int64_t>(left, static_cast<std::int64_t>(buf.size())));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return system_error(errno, "reading " + policy::quote(path));
        if (n == 0) return Error(ErrorCode::kFailed, policy::quote(path) + " shrank while packing");
        if (archive_write_data(m_archive, buf.data(), static_cast<std::size_t>(n)) != n)
          return archive_error(m_archive, "writing " + policy::quote(path));
        left -= n;
      }
    }
    return {};
  }

  archive* m_archive;
  std::int64_t m_mtime;
  ResolverPtr m_resolver;
};

Result<std::int64_t> newest_mtime(int dirfd, const std::string& rel) {
  struct stat self {};
  if (::fstat(dirfd, &self) != 0) return system_error(errno, "inspecting " + policy::quote(rel));
  std::int64_t newest = self.st_mtim.tv_sec;
  auto names = fs::list_names(dirfd, ".");
  if (!names) return names.error();
  std::vector<std::string> dirs;
  for (const auto& name : *names) {
    struct stat st {};
    if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    newest = std::max<std::int64_t>(newest, st.st_mtim.tv_sec);
    if (S_ISDIR(st.st_mode)) dirs.push_back(name);
  }
  for (const auto& name : dirs) {
    int child = ::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (child < 0) return system_error(errno, "opening " + policy::quote(rel + "/" + name));
    UniqueFd owner(child);
    auto sub = newest_mtime(child, rel + "/" + name);
    if (!sub) return sub.error();
    newest = std::max(newest, *sub);
  }
  return newest;
}

Result<Compression> payload_compression(const std::string& path, int fd) {
  struct Kind {
    const char* suffix;
    Compression c;
  };
  static constexpr Kind kKinds[] = {{".tar.zst", Compression::kZstd}, {".tzst", Compression::kZstd},
                                    {".tar.xz", Compression::kXz},    {".txz", Compression::kXz},
                                    {".tar.gz", Compression::kGzip},  {".tgz", Compression::kGzip},
                                    {".tar", Compression::kNone}};
  std::optional<Compression> by_name;
  for (const auto& k : kKinds)
    if (path.ends_with(k.suffix)) {
      by_name = k.c;
      break;
    }
  if (!by_name)
    return Error(
        ErrorCode::kInvalidArgument,
        "payload " + policy::quote(path) + " must end in .tar, .tar.zst, .tar.xz or .tar.gz");
  unsigned char head[512] = {};
  ssize_t n = ::pread(fd, head, sizeof head, 0);
  if (n < 0) return system_error(errno, "reading payload");
  auto starts = [&](std::initializer_list<unsigned char> magic) {
    return static_cast<std::size_t>(n) >= magic.size() &&
           std::equal(magic.begin(), magic.end(), head);
  };
  bool ok = false;
  switch (*by_name) {
    case Compression::kZstd:
      ok = starts({0x28, 0xb5, 0x2f, 0xfd});
      break;
    case Compression::kXz:
      ok = starts({0xfd, '7', 'z', 'X', 'Z', 0x00});
      break;
    case Compression::kGzip:
      ok = starts({0x1f, 0x8b});
      break;
    case Compression::kNone:
      ok = n == 512 && std::memcmp(head + 257, "ustar", 5) == 0;
      break;
  }
  if (!ok)
    return Error(ErrorCode::kInvalidArgument, "payload " + policy::quote(path) +
                                                  " does not start like a " +
                                                  std::string(to_string(*by_name)) + " tar file");
  return *by_name;
}

UniqueFd temp_file_near(const std::string& output) {
  auto [dir, base] = fs::split_parent(output);
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  return UniqueFd(fd);
}

}  // namespace

Result<void> write_payload_from_dir(const std::string& dir, int out_fd, Compression compression,
                                    int level, std::int64_t mtime) {
  auto root = fs::open_directory(dir);
  if (!root) return root.error();
  ArchivePtr a(archive_write_new(), &archive_write_free);
  if (!a) return Error(ErrorCode::kFailed, "allocating archive writer");
  int r = archive_write_set_format_pax_restricted(a.get());
  switch (compression) {
    case Compression::kZstd:
      if (r == ARCHIVE_OK) r = archive_write_add_filter_zstd(a.get());
      if (r == ARCHIVE_OK)
        r = archive_write_set_filter_option(a.get(), "zstd", "compression-level",
                                            std::to_string(level).c_str());
      break;
    case Compression::kXz:
      if (r == ARCHIVE_OK) r = archive_write_add_filter_xz(a.get());
      break;
    case Compression::kGzip:
      if (r == ARCHIVE_OK) r = archive_write_add_filter_gzip(a.get());
      // gzip headers carry a timestamp unless told not to.
      if (r == ARCHIVE_OK)
        r = archive_write_set_filter_option(a.get(), "gzip", "timestamp", nullptr);
      break;
    case Compression::kNone:
      break;
  }
  if (r == ARCHIVE_OK) r = archive_write_set_bytes_per_block(a.get(), 10240);
  if (r == ARCHIVE_OK) r = archive_write_open_fd(a.get(), out_fd);
  if (r != ARCHIVE_OK) return archive_error(a.get(), "opening payload writer");
  DirWriter writer(a.get(), mtime);
  UPGRADED_TRY(writer.walk(root->get(), ""));
  if (archive_write_close(a.get()) != ARCHIVE_OK)
    return archive_error(a.get(), "finishing payload");
  return {};
}

Result<PayloadInfo> describe_payload(int fd, Compression compression, std::uint64_t chunk_size) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return system_error(errno, "inspecting payload");
  PayloadInfo info;
  info.compression = compression;
  info.size = static_cast<std::uint64_t>(st.st_size);
  if (info.size == 0) return Error(ErrorCode::kInvalidArgument, "payload is empty");
  if (info.size > kMaxPayloadSize)
    return Error(ErrorCode::kInvalidArgument, "payload is larger than 8 GiB - 1 byte");
  info.chunk_size = chunk_size;
  while ((info.size + info.chunk_size - 1) / info.chunk_size > kMaxChunks)
    info.chunk_size *= 2;
  if (info.chunk_size < kMinChunkSize || info.chunk_size > kMaxChunkSize ||
      (info.chunk_size & (info.chunk_size - 1)) != 0)
    return Error(ErrorCode::kInvalidArgument,
                 "chunk size must be a power of two from 64 KiB to 16 MiB");
  std::vector<std::byte> buf(info.chunk_size);
  Sha256 whole, chunk;
  std::uint64_t offset = 0;
  while (offset < info.size) {
    std::size_t want =
        static_cast<std::size_t>(std::min<std::uint64_t>(info.chunk_size, info.size - offset));
    std::size_t got = 0;
    while (got < want) {
      ssize_t n = ::pread(fd, buf.data() + got, want - got, static_cast<off_t>(offset + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return system_error(errno, "reading payload");
      if (n == 0) return Error(ErrorCode::kFailed, "payload shrank while hashing");
      got += static_cast<std::size_t>(n);
    }
    std::span<const std::byte> piece(buf.data(), want);
    whole.update(piece);
    chunk.update(piece);
    info.chunks.push_back(chunk.finish());
    offset += want;
  }
  info.sha256 = whole.finish();
  return info;
}

Result<std::vector<std::string>> sign_and_write(const std::string& manifest_bytes,
                                                const std::vector<std::string>& key_paths,
                                                int payload_fd, const PayloadInfo& payload,
                                                const std::string& output) {
  if (key_paths.empty())
    return Error(ErrorCode::kInvalidArgument, "at least one signing key is needed");
  std::vector<Signature> sigs;
  std::vector<std::string> ids;
  for (const auto& path : key_paths) {
    auto key = PrivateKey::load(path);
    if (!key) return key.error();
    if (std::find(ids.begin(), ids.end(), key->id()) != ids.end())
      return Error(ErrorCode::kInvalidArgument, "key '" + path + "' is given twice");
    auto sig = key->sign(as_bytes(manifest_bytes));
    if (!sig) return sig.error();
    sigs.push_back(Signature{key->id(), key->algorithm(), std::move(*sig)});
    ids.push_back(key->id());
  }
  std::string sig_text = serialize_signatures(sigs);

  auto [dir, base] = fs::split_parent(output);
  std::random_device rd;
  std::string tmp =
      (dir == "." ? "" : dir + "/") + "." + base + ".tmp." + std::to_string(rd() % 1000000u);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return system_error(errno, "creating " + policy::quote(tmp));
  UniqueFd out(fd);
  auto fail = [&](const Error& e) -> Result<std::vector<std::string>> {
    ::unlink(tmp.c_str());
    return e;
  };
  if (auto r = write_container(fd, manifest_bytes, sig_text, payload_fd, payload.size,
                               payload.compression);
      !r)
    return fail(r.error());
  if (auto r = fs::sync_fd(fd, policy::quote(tmp)); !r) return fail(r.error());
  out.reset();
  if (::rename(tmp.c_str(), output.c_str()) != 0)
    return fail(system_error(errno, "renaming to " + policy::quote(output)));
  auto dfd = fs::open_directory(dir);
  if (dfd) (void)fs::sync_fd(dfd->get(), "output directory");
  return ids;
}

Result<PackResult> pack(const PackOptions& o) {
  if (auto r = policy::validate_app_name(o.app); !r) return r.error();
  if (auto r = policy::validate_version(o.version); !r) return r.error();
  if (o.source_dir.has_value() == o.payload_path.has_value())
    return Error(ErrorCode::kInvalidArgument, "give either a source directory or --payload");

  Manifest m;
  m.app = o.app;
  m.version = o.version;
  if (o.extra_manifest_path) {
    auto text = fs::read_file(AT_FDCWD, *o.extra_manifest_path, kMaxManifestSize);
    if (!text) return text.error();
    UPGRADED_TRY(apply_manifest_extras(m, *text));
  }

  UniqueFd payload_fd;
  Compression compression = Compression::kZstd;
  std::int64_t created = 0;
  if (o.source_dir) {
    auto root = fs::open_directory(*o.source_dir);
    if (!root) return root.error();
    if (o.created) {
      created = *o.created;
    } else {
      auto newest = newest_mtime(root->get(), *o.source_dir);
      if (!newest) return newest.error();
      created = *newest;
    }
    payload_fd = temp_file_near(o.output);
    if (!payload_fd)
      return system_error(errno, "creating a temporary payload next to " + policy::quote(o.output));
    UPGRADED_TRY(write_payload_from_dir(*o.source_dir, payload_fd.get(), compression, o.zstd_level,
                                        created));
  } else {
    int fd = ::open(o.payload_path->c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return system_error(errno, "opening payload " + policy::quote(*o.payload_path));
    payload_fd.reset(fd);
    auto c = payload_compression(*o.payload_path, fd);
    if (!c) return c.error();
    compression = *c;
    struct stat st {};
    if (::fstat(fd, &st) != 0) return system_error(errno, "inspecting payload");
    created = o.created.value_or(st.st_mtim.tv_sec);
  }
  m.created = format_rfc3339(created);
  auto info = describe_payload(payload_fd.get(), compression, o.chunk_size);
  if (!info) return info.error();
  m.payload = std::move(*info);
  std::string manifest_bytes = serialize_manifest(m);
  if (manifest_bytes.size() > kMaxManifestSize)
    return Error(ErrorCode::kInvalidArgument, "manifest would be larger than 1 MiB");
  auto ids = sign_and_write(manifest_bytes, o.key_paths, payload_fd.get(), m.payload, o.output);
  if (!ids) return ids.error();
  struct stat st {};
  ::stat(o.output.c_str(), &st);
  return PackResult{std::move(m), std::move(*ids), static_cast<std::uint64_t>(st.st_size)};
}

}  // namespace upgraded::artifact
