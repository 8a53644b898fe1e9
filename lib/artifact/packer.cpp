#include "upgraded/artifact/packer.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "upgraded/artifact/container.h"
#include "upgraded/artifact/digest.h"
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

// Writes the compressed payload to a file and hashes it (whole and per chunk) on a thread of its
// own, from a few buffers that the compressing side fills and hands over in order.
class PayloadSink {
 public:
  static constexpr std::size_t kBufferSize = 1 << 20;
  static constexpr std::size_t kBuffers = 4;

  PayloadSink(int fd, std::uint64_t chunk_size) : m_fd(fd), m_chunk_size(chunk_size) {
    for (std::size_t i = 0; i < kBuffers; ++i)
      m_free.emplace_back(kBufferSize);
    m_thread = std::thread([this] { run(); });
  }

  ~PayloadSink() {
    {
      std::lock_guard lock(m_mutex);
      m_stop = true;
    }
    m_cv.notify_all();
    if (m_thread.joinable()) m_thread.join();
  }

  PayloadSink(const PayloadSink&) = delete;
  PayloadSink& operator=(const PayloadSink&) = delete;

  // An empty buffer of kBufferSize bytes to fill; waits while all of them are queued.
  Result<std::vector<std::byte>> take() {
    std::unique_lock lock(m_mutex);
    m_cv.wait(lock, [&] { return m_error || !m_free.empty(); });
    if (m_error) return *m_error;
    auto buf = std::move(m_free.front());
    m_free.pop_front();
    return buf;
  }

  // Queues the first `n` bytes of `buf` to be written and hashed after everything queued before.
  Result<void> put(std::vector<std::byte> buf, std::size_t n) {
    {
      std::lock_guard lock(m_mutex);
      if (m_error) return *m_error;
      m_queue.push_back({std::move(buf), n});
    }
    m_cv.notify_all();
    return {};
  }

  // Waits until everything queued is written and hashed, and ends the thread.
  Result<PayloadInfo> finish() {
    {
      std::lock_guard lock(m_mutex);
      m_closing = true;
    }
    m_cv.notify_all();
    m_thread.join();
    if (m_error) return *m_error;
    if (m_in_chunk > 0) m_chunks.push_back(m_chunk.finish());
    PayloadInfo info;
    info.compression = Compression::kZstd;
    info.size = m_size;
    info.sha256 = m_whole.finish();
    info.chunk_size = m_chunk_size;
    info.chunks = std::move(m_chunks);
    return info;
  }

 private:
  struct Piece {
    std::vector<std::byte> buf;
    std::size_t n;
  };

  void run() {
    for (;;) {
      Piece piece;
      {
        std::unique_lock lock(m_mutex);
        m_cv.wait(lock, [&] { return m_stop || m_closing || !m_queue.empty(); });
        if (m_stop || m_queue.empty()) return;
        piece = std::move(m_queue.front());
        m_queue.pop_front();
      }
      auto r = consume(std::span<const std::byte>(piece.buf.data(), piece.n));
      {
        std::lock_guard lock(m_mutex);
        if (!r && !m_error) m_error = r.error();
        m_free.push_back(std::move(piece.buf));
      }
      m_cv.notify_all();
      if (!r) return;
    }
  }

  Result<void> consume(std::span<const std::byte> data) {
    for (std::size_t done = 0; done < data.size();) {
      ssize_t w = ::write(m_fd, data.data() + done, data.size() - done);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return system_error(errno, "writing the payload");
      done += static_cast<std::size_t>(w);
    }
    m_size += data.size();
    if (m_size > kMaxPayloadSize)
      return Error(ErrorCode::kInvalidArgument, "payload is larger than 8 GiB - 1 byte");
    m_whole.update(data);
    while (!data.empty()) {
      std::size_t n =
          static_cast<std::size_t>(std::min<std::uint64_t>(data.size(), m_chunk_size - m_in_chunk));
      m_chunk.update(data.first(n));
      data = data.subspan(n);
      m_in_chunk += n;
      if (m_in_chunk == m_chunk_size) {
        m_chunks.push_back(m_chunk.finish());
        m_in_chunk = 0;
      }
    }
    return {};
  }

  const int m_fd;
  const std::uint64_t m_chunk_size;
  std::mutex m_mutex;
  std::condition_variable m_cv;
  std::deque<std::vector<std::byte>> m_free;
  std::deque<Piece> m_queue;
  bool m_closing = false;  // finish(): end once the queue is empty
  bool m_stop = false;     // destructor: end now
  std::optional<Error> m_error;
  // The sink thread's alone until it has ended.
  std::uint64_t m_size = 0;
  Sha256 m_whole, m_chunk;
  std::uint64_t m_in_chunk = 0;
  std::vector<Sha256Digest> m_chunks;
  std::thread m_thread;
};

// zstd in multi-threaded mode (ZSTD_c_nbWorkers >= 1): `workers` threads compress jobs of a size
// fixed by the level, while the caller feeds input. The jobs, hence the output, are the same
// whatever the number of workers (tests/unit/artifact_packer_test.cpp checks it), unlike
// single-threaded mode (nbWorkers 0), whose frames differ. The output goes to a PayloadSink.
class ZstdStream {
 public:
  explicit ZstdStream(PayloadSink& sink) : m_sink(sink) {}
  ~ZstdStream() { ZSTD_freeCCtx(m_cctx); }  // waits for the workers
  ZstdStream(const ZstdStream&) = delete;
  ZstdStream& operator=(const ZstdStream&) = delete;

  Result<void> init(int level, unsigned workers) {
    m_cctx = ZSTD_createCCtx();
    if (!m_cctx) return Error(ErrorCode::kFailed, "allocating the zstd compressor");
    auto set = [&](ZSTD_cParameter p, int value, const char* what) -> Result<void> {
      std::size_t r = ZSTD_CCtx_setParameter(m_cctx, p, value);
      if (ZSTD_isError(r))
        return Error(ErrorCode::kFailed, std::string("setting zstd's ") + what + " to " +
                                             std::to_string(value) + ": " + ZSTD_getErrorName(r));
      return {};
    };
    ZSTD_bounds b = ZSTD_cParam_getBounds(ZSTD_c_nbWorkers);
    int n = std::clamp(static_cast<int>(std::min(workers, 1024u)), 1, std::max(b.upperBound, 1));
    UPGRADED_TRY(set(ZSTD_c_compressionLevel, level, "compression level"));
    UPGRADED_TRY(set(ZSTD_c_checksumFlag, 0, "checksum flag"));  // the manifest hashes it all
    // A libzstd without multi-threading refuses this: no silently different bytes.
    UPGRADED_TRY(set(ZSTD_c_nbWorkers, n, "number of workers"));
    return {};
  }

  Result<void> write(const void* data, std::size_t size) {
    ZSTD_inBuffer in{data, size, 0};
    return drive(in, ZSTD_e_continue);
  }

  // Ends the frame and hands the last bytes to the sink.
  Result<void> finish() {
    ZSTD_inBuffer in{nullptr, 0, 0};
    UPGRADED_TRY(drive(in, ZSTD_e_end));
    if (m_filled > 0) UPGRADED_TRY(m_sink.put(std::exchange(m_buf, {}), m_filled));
    m_filled = 0;
    return {};
  }

  // Makes every later write fail at once (an error elsewhere: stop compressing).
  void fail(const Error& e) {
    if (!m_error) m_error = e;
  }
  const std::optional<Error>& error() const { return m_error; }

 private:
  Result<void> drive(ZSTD_inBuffer& in, ZSTD_EndDirective mode) {
    if (m_error) return *m_error;
    auto r = drive_unchecked(in, mode);
    if (!r) fail(r.error());
    return r;
  }

  Result<void> drive_unchecked(ZSTD_inBuffer& in, ZSTD_EndDirective mode) {
    for (;;) {
      if (m_buf.empty()) {
        auto buf = m_sink.take();
        if (!buf) return buf.error();
        m_buf = std::move(*buf);
        m_filled = 0;
      }
      ZSTD_outBuffer out{m_buf.data(), m_buf.size(), m_filled};
      // Waits inside when every worker is busy and the output buffer has room.
      std::size_t left = ZSTD_compressStream2(m_cctx, &out, &in, mode);
      if (ZSTD_isError(left))
        return Error(ErrorCode::kFailed,
                     std::string("compressing the payload: ") + ZSTD_getErrorName(left));
      m_filled = out.pos;
      if (m_filled == m_buf.size()) {
        UPGRADED_TRY(m_sink.put(std::exchange(m_buf, {}), m_filled));
        m_filled = 0;
      }
      if (mode == ZSTD_e_continue ? in.pos == in.size : left == 0) return {};
    }
  }

  PayloadSink& m_sink;
  ZSTD_CCtx* m_cctx = nullptr;
  std::vector<std::byte> m_buf;  // being filled; empty when none is held
  std::size_t m_filled = 0;
  std::optional<Error> m_error;
};

// libarchive's client writer: the uncompressed tar goes to zstd. A failure stays in the stream,
// which refuses every later write, and the walk ends on it (DirWriter checks after each call):
// libarchive is not told, because an archive in its fatal state is freed without closing its
// client writer, whose buffers then leak.
la_ssize_t write_tar(archive*, void* stream, const void* data, std::size_t size) {
  (void)static_cast<ZstdStream*>(stream)->write(data, size);
  return static_cast<la_ssize_t>(size);
}

class DirWriter {
 public:
  DirWriter(archive* a, const ZstdStream& stream, std::int64_t mtime)
      : m_archive(a),
        m_stream(stream),
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
    if (m_stream.error()) return *m_stream.error();
    if (regular && archive_entry_size(entry) > 0) {
      int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
      if (fd < 0) return system_error(errno, "opening " + policy::quote(path));
      UniqueFd owner(fd);
      std::int64_t left = archive_entry_size(entry);
      while (left > 0) {
        ssize_t n = ::read(fd, m_buf.data(),
                           std::min<std::int64_t>(left, static_cast<std::int64_t>(m_buf.size())));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return system_error(errno, "reading " + policy::quote(path));
        if (n == 0) return Error(ErrorCode::kFailed, policy::quote(path) + " shrank while packing");
        if (archive_write_data(m_archive, m_buf.data(), static_cast<std::size_t>(n)) != n)
          return archive_error(m_archive, "writing " + policy::quote(path));
        if (m_stream.error()) return *m_stream.error();
        left -= n;
      }
    }
    return {};
  }

  archive* m_archive;
  const ZstdStream& m_stream;
  std::int64_t m_mtime;
  ResolverPtr m_resolver;
  std::vector<char> m_buf = std::vector<char>(1 << 20);  // file contents on their way to the tar
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

Result<void> check_chunk_size(std::uint64_t chunk_size) {
  if (chunk_size < kMinChunkSize || chunk_size > kMaxChunkSize ||
      (chunk_size & (chunk_size - 1)) != 0)
    return Error(ErrorCode::kInvalidArgument,
                 "chunk size must be a power of two from 64 KiB to 16 MiB");
  return {};
}

unsigned online_cpus() {
  long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<unsigned>(n) : 1u;
}

UniqueFd temp_file_near(const std::string& output) {
  auto [dir, base] = fs::split_parent(output);
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  return UniqueFd(fd);
}

}  // namespace

Result<PayloadInfo> write_payload_from_dir(const std::string& dir, int out_fd,
                                           const DirPayloadOptions& o) {
  UPGRADED_TRY(check_chunk_size(o.chunk_size));
  auto root = fs::open_directory(dir);
  if (!root) return root.error();
  // Declared in this order so that they end in the reverse one: the archive (whose end may still
  // write through the stream), the stream (zstd's workers), the sink (its thread).
  PayloadSink sink(out_fd, o.chunk_size);
  ZstdStream stream(sink);
  UPGRADED_TRY(stream.init(o.zstd_level, o.threads));
  ArchivePtr a(archive_write_new(), &archive_write_free);
  if (!a) return Error(ErrorCode::kFailed, "allocating archive writer");
  int r = archive_write_set_format_pax_restricted(a.get());
  // No blocking: each piece of tar goes straight to the stream, and nothing pads the end (the tar
  // ends with its two zero blocks, as with the zstd filter before).
  if (r == ARCHIVE_OK) r = archive_write_set_bytes_per_block(a.get(), 0);
  if (r == ARCHIVE_OK) r = archive_write_set_bytes_in_last_block(a.get(), 1);
  if (r == ARCHIVE_OK)
    r = archive_write_open2(a.get(), &stream, nullptr, &write_tar, nullptr, nullptr);
  if (r != ARCHIVE_OK) return archive_error(a.get(), "opening payload writer");
  auto fail = [&](const Error& e) -> Error {
    stream.fail(e);  // so that freeing the archive does not compress its end
    return e;
  };
  DirWriter writer(a.get(), stream, o.mtime);
  if (auto w = writer.walk(root->get(), ""); !w) return fail(stream.error().value_or(w.error()));
  if (archive_write_close(a.get()) != ARCHIVE_OK)
    return fail(stream.error().value_or(archive_error(a.get(), "finishing payload")));
  if (auto f = stream.finish(); !f) return f.error();
  return sink.finish();
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
  UPGRADED_TRY(check_chunk_size(info.chunk_size));
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
  std::optional<PayloadInfo> info;
  if (o.source_dir) {
    auto root = fs::open_directory(*o.source_dir);
    if (!root) return root.error();
    std::int64_t created = 0;
    if (o.created) {
      created = *o.created;
    } else {
      auto newest = newest_mtime(root->get(), *o.source_dir);
      if (!newest) return newest.error();
      created = *newest;
    }
    m.created = format_rfc3339(created);
    payload_fd = temp_file_near(o.output);
    if (!payload_fd)
      return system_error(errno, "creating a temporary payload next to " + policy::quote(o.output));
    DirPayloadOptions d;
    d.zstd_level = o.zstd_level;
    d.threads = o.threads > 0 ? o.threads : online_cpus();
    d.chunk_size = o.chunk_size;
    d.mtime = created;
    auto written = write_payload_from_dir(*o.source_dir, payload_fd.get(), d);
    if (!written) return written.error();
    if (written->chunks.size() <= kMaxChunks)
      info = std::move(*written);  // else hashed again below, in larger chunks
  } else {
    int fd = ::open(o.payload_path->c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return system_error(errno, "opening payload " + policy::quote(*o.payload_path));
    payload_fd.reset(fd);
    auto c = payload_compression(*o.payload_path, fd);
    if (!c) return c.error();
    struct stat st {};
    if (::fstat(fd, &st) != 0) return system_error(errno, "inspecting payload");
    m.created = format_rfc3339(o.created.value_or(st.st_mtim.tv_sec));
    auto described = describe_payload(fd, *c, o.chunk_size);
    if (!described) return described.error();
    info = std::move(*described);
  }
  if (!info) {
    auto described = describe_payload(payload_fd.get(), Compression::kZstd, o.chunk_size);
    if (!described) return described.error();
    info = std::move(*described);
  }
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
