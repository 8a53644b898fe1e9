#include "upgraded/artifact/container.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "upgraded/artifact/signatures.h"
#include "upgraded/policy/names.h"

namespace upgraded::artifact {
namespace {

constexpr std::size_t kReadSize = 1024 * 1024;
// Everything up to the payload's data: two headers, manifest and signature with padding, and the
// payload header.
constexpr std::size_t kPrefixCap =
    3 * kTarBlock + kMaxManifestSize + kTarBlock + kMaxSignatureFileSize + kTarBlock;
// The end of a canonical archive: payload padding (< 512), two zero blocks, record padding.
constexpr std::size_t kTailCap = 16 * 1024;

Error bad(const std::string& why) {
  return Error(ErrorCode::kVerificationFailed, "artifact container: " + why);
}

std::uint64_t pad512(std::uint64_t n) {
  return (n + kTarBlock - 1) / kTarBlock * kTarBlock;
}

bool all_zero(const char* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (p[i] != 0) return false;
  return true;
}

// The fields of a ustar header, for messages about the first byte that differs.
const char* field_at(std::size_t offset) {
  struct Field {
    std::size_t end;
    const char* name;
  };
  static constexpr Field kFields[] = {
      {100, "name"},    {108, "mode"},     {116, "uid"},      {124, "gid"},      {136, "size"},
      {148, "mtime"},   {156, "checksum"}, {157, "typeflag"}, {257, "linkname"}, {263, "magic"},
      {265, "version"}, {297, "uname"},    {329, "gname"},    {337, "devmajor"}, {345, "devminor"},
      {500, "prefix"},  {512, "padding"}};
  for (const auto& f : kFields)
    if (offset < f.end) return f.name;
  return "padding";
}

// The 512 bytes at `h` must be the canonical header of `name` with `size` bytes: no byte of an
// artifact outside its members' data is free (docs/artifact-format.md §2.2).
Result<void> check_header(const char* h, std::string_view name, std::uint64_t size) {
  auto want = canonical_header(name, size);
  for (std::size_t i = 0; i < kTarBlock; ++i)
    if (h[i] != want[i])
      return bad("header of '" + std::string(name) + "' is not canonical: its " + field_at(i) +
                 " field differs at byte " + std::to_string(i));
  return {};
}

// The bytes after the payload's data in a canonical container: zero padding to 512 and two zero
// blocks, then the end of the file.
std::uint64_t canonical_end(std::uint64_t data_end) {
  return pad512(data_end) + 2 * kTarBlock;
}

}  // namespace

struct ContainerReader::Impl {
  int fd = -1;
  bool raw = false;  // payload_at(): pread at payload_data_start, no archive parsing
  bool use_pread = true;
  std::uint64_t offset = 0;  // bytes handed to libarchive so far
  bool eof = false;
  // Not zeroed: every byte used was read into it first (zeroing 1 MiB was a tenth of a small
  // unpack's time, in page faults).
  std::unique_ptr<char[]> buf = std::make_unique_for_overwrite<char[]>(kReadSize);
  std::string prefix;
  bool keep_prefix = true;                               // until the payload starts
  std::vector<char> tail = std::vector<char>(kTailCap);  // ring: bytes [offset - kTailCap, offset)
  archive* a = nullptr;
  std::uint64_t payload_data_start = 0;
  std::uint64_t payload_size = 0;
  std::uint64_t payload_read = 0;
  std::optional<Error> io_error;

  int cancel_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);  // signalled by cancel()

  ~Impl() {
    if (a) archive_read_free(a);
    if (cancel_fd >= 0) ::close(cancel_fd);
  }

  // Reads the next block of the file into `buf`: 0 at end of file.
  Result<std::size_t> fill() {
    for (;;) {
      // Wait for data or for cancel(): a pipe whose writer stalls must not pin this thread.
      // (A regular file never blocks indefinitely, and a poll per read would cost time.)
      if (!use_pread) {
        pollfd fds[2] = {{fd, POLLIN, 0}, {cancel_fd, POLLIN, 0}};
        int ready = ::poll(fds, cancel_fd >= 0 ? 2 : 1, -1);
        if (ready < 0 && errno == EINTR) continue;
        if (ready < 0) return system_error(errno, "waiting for the artifact");
        if (cancel_fd >= 0 && (fds[1].revents & POLLIN))
          return Error(ErrorCode::kFailed, "reading the artifact was canceled");
      }
      ssize_t n = use_pread ? ::pread(fd, buf.get(), kReadSize, static_cast<off_t>(offset))
                            : ::read(fd, buf.get(), kReadSize);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return system_error(errno, "reading artifact");
      record(buf.get(), static_cast<std::size_t>(n));
      return static_cast<std::size_t>(n);
    }
  }

  void record(const char* p, std::size_t n) {
    if (keep_prefix && prefix.size() < kPrefixCap)
      prefix.append(p, std::min(n, kPrefixCap - prefix.size()));
    for (std::size_t i = n > kTailCap ? n - kTailCap : 0; i < n; ++i)
      tail[(offset + i) % kTailCap] = p[i];
    offset += n;
  }

  static la_ssize_t read_cb(archive* ar, void* ud, const void** out) {
    auto* self = static_cast<Impl*>(ud);
    auto n = self->fill();
    if (!n) {
      self->io_error = n.error();
      archive_set_error(ar, EIO, "%s", n.error().message().c_str());
      return -1;
    }
    if (*n == 0) self->eof = true;
    *out = self->buf.get();
    return static_cast<la_ssize_t>(*n);
  }

  Error archive_failure(const std::string& doing) {
    if (io_error) return *io_error;
    const char* msg = archive_error_string(a);
    return bad(doing + ": " + (msg ? msg : "malformed tar"));
  }

  // Reads the next member, which must be a regular file called `name` of at most `max` bytes.
  Result<std::string> read_small_member(std::string_view name, std::size_t max) {
    archive_entry* entry = nullptr;
    int r = archive_read_next_header(a, &entry);
    if (r == ARCHIVE_EOF) return bad("missing member '" + std::string(name) + "'");
    if (r != ARCHIVE_OK) return archive_failure("reading header of '" + std::string(name) + "'");
    const char* path = archive_entry_pathname(entry);
    if (!path || name != path)
      return bad("expected member '" + std::string(name) + "', found " +
                 policy::quote(path ? path : ""));
    if (archive_entry_filetype(entry) != AE_IFREG || !archive_entry_size_is_set(entry))
      return bad("'" + std::string(name) + "' is not a regular file member");
    auto size = archive_entry_size(entry);
    if (size < 0 || static_cast<std::uint64_t>(size) > max)
      return bad("'" + std::string(name) + "' is larger than " + std::to_string(max) + " bytes");
    std::string data(static_cast<std::size_t>(size), '\0');
    std::size_t got = 0;
    while (got < data.size()) {
      la_ssize_t n = archive_read_data(a, data.data() + got, data.size() - got);
      if (n < 0) return archive_failure("reading '" + std::string(name) + "'");
      if (n == 0) return bad("'" + std::string(name) + "' is truncated");
      got += static_cast<std::size_t>(n);
    }
    return data;
  }
};

ContainerReader::ContainerReader() : m_impl(std::make_unique<Impl>()) {}
ContainerReader::~ContainerReader() = default;

Result<std::unique_ptr<ContainerReader>> ContainerReader::open(int fd) {
  std::unique_ptr<ContainerReader> self(new ContainerReader());
  Impl& im = *self->m_impl;
  im.fd = fd;
  struct stat st {};
  im.use_pread = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  im.a = archive_read_new();
  if (!im.a) return Error(ErrorCode::kFailed, "allocating archive reader");
  // Only uncompressed tar: no filter or format bidding on untrusted bytes.
  archive_read_set_format(im.a, ARCHIVE_FORMAT_TAR);
  if (archive_read_open(im.a, &im, nullptr, &Impl::read_cb, nullptr) != ARCHIVE_OK)
    return im.archive_failure("opening");
  auto manifest = im.read_small_member("manifest.json", kMaxManifestSize);
  if (!manifest) return manifest.error();
  auto sig = im.read_small_member("manifest.sig", kMaxSignatureFileSize);
  if (!sig) return sig.error();
  self->m_manifest = std::move(*manifest);
  self->m_signature = std::move(*sig);
  return self;
}

Result<std::unique_ptr<ContainerReader>> ContainerReader::payload_at(int fd, std::uint64_t offset,
                                                                     const PayloadInfo& info) {
  if (offset < 3 * kTarBlock || offset % kTarBlock != 0)
    return Error(ErrorCode::kInvalidArgument,
                 "the payload cannot start at byte " + std::to_string(offset) + " of a container");
  std::unique_ptr<ContainerReader> self(new ContainerReader());
  Impl& im = *self->m_impl;
  im.fd = fd;
  im.raw = true;
  im.keep_prefix = false;
  im.payload_data_start = offset;
  im.payload_size = info.size;
  // The header is compared, not parsed: it must be the canonical one for this payload.
  char header[kTarBlock];
  std::size_t got = 0;
  while (got < sizeof header) {
    ssize_t n = ::pread(fd, header + got, sizeof header - got,
                        static_cast<off_t>(offset - kTarBlock + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return system_error(errno, "reading the payload's header");
    if (n == 0) return bad("artifact is truncated");
    got += static_cast<std::size_t>(n);
  }
  UPGRADED_TRY(check_header(header, payload_member_name(info.compression), info.size));
  return self;
}

void ContainerReader::cancel() {
  std::uint64_t one = 1;
  if (m_impl->cancel_fd >= 0) (void)!::write(m_impl->cancel_fd, &one, sizeof one);
}

Result<void> ContainerReader::begin_payload(const PayloadInfo& info) {
  Impl& im = *m_impl;
  archive_entry* entry = nullptr;
  auto name = payload_member_name(info.compression);
  int r = archive_read_next_header(im.a, &entry);
  if (r == ARCHIVE_EOF) return bad("missing member '" + std::string(name) + "'");
  if (r != ARCHIVE_OK) return im.archive_failure("reading payload header");
  const char* path = archive_entry_pathname(entry);
  if (!path || name != path)
    return bad("expected member '" + std::string(name) + "', found " +
               policy::quote(path ? path : ""));
  if (archive_entry_size(entry) < 0 ||
      static_cast<std::uint64_t>(archive_entry_size(entry)) != info.size)
    return bad("payload member size differs from the signed manifest");

  // Canonical layout of everything up to here (the prefix holds it all).
  std::uint64_t sig_header = kTarBlock + pad512(m_manifest.size());
  std::uint64_t payload_header = sig_header + kTarBlock + pad512(m_signature.size());
  std::uint64_t data_start = payload_header + kTarBlock;
  if (im.prefix.size() < data_start) return bad("artifact is truncated");
  const char* p = im.prefix.data();
  UPGRADED_TRY(check_header(p, "manifest.json", m_manifest.size()));
  if (!all_zero(p + kTarBlock + m_manifest.size(), sig_header - kTarBlock - m_manifest.size()))
    return bad("padding after manifest.json is not zero");
  UPGRADED_TRY(check_header(p + sig_header, "manifest.sig", m_signature.size()));
  std::uint64_t sig_end = sig_header + kTarBlock + m_signature.size();
  if (!all_zero(p + sig_end, payload_header - sig_end))
    return bad("padding after manifest.sig is not zero");
  UPGRADED_TRY(check_header(p + payload_header, name, info.size));
  im.payload_data_start = data_start;
  im.payload_size = info.size;
  im.payload_read = 0;
  im.keep_prefix = false;
  std::string().swap(im.prefix);  // release ~1 MiB; the prefix is no longer needed
  return {};
}

Result<std::size_t> ContainerReader::read_payload(std::span<std::byte> out) {
  Impl& im = *m_impl;
  if (im.raw) {
    std::uint64_t left = im.payload_size - im.payload_read;
    std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(out.size(), left));
    if (want == 0) return std::size_t{0};
    for (;;) {
      ssize_t n = ::pread(im.fd, out.data(), want,
                          static_cast<off_t>(im.payload_data_start + im.payload_read));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return system_error(errno, "reading the payload");
      if (n == 0) return bad("payload member is truncated");
      im.payload_read += static_cast<std::uint64_t>(n);
      return static_cast<std::size_t>(n);
    }
  }
  la_ssize_t n = archive_read_data(im.a, out.data(), out.size());
  if (n < 0) return im.archive_failure("reading payload");
  im.payload_read += static_cast<std::uint64_t>(n);
  return static_cast<std::size_t>(n);
}

Result<void> ContainerReader::finish() {
  Impl& im = *m_impl;
  if (im.payload_read != im.payload_size) return bad("payload member is truncated");
  const std::uint64_t data_end = im.payload_data_start + im.payload_size;
  const std::uint64_t end = canonical_end(data_end);
  if (im.raw) {
    // Only zeros may follow, and exactly that many: read one byte more than canonical.
    std::vector<char> rest(static_cast<std::size_t>(end - data_end) + 1);
    std::size_t got = 0;
    while (got < rest.size()) {
      ssize_t n =
          ::pread(im.fd, rest.data() + got, rest.size() - got, static_cast<off_t>(data_end + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return system_error(errno, "reading the end of the artifact");
      if (n == 0) break;
      got += static_cast<std::size_t>(n);
    }
    if (got < rest.size() - 1) return bad("artifact is truncated");
    if (got == rest.size()) return bad("data after the end of the archive");
    if (!all_zero(rest.data(), got)) return bad("end of archive is not canonical (non-zero bytes)");
    return {};
  }
  archive_entry* entry = nullptr;
  int r = archive_read_next_header(im.a, &entry);
  if (r == ARCHIVE_OK) return bad("unexpected member after the payload");
  if (r != ARCHIVE_EOF) return im.archive_failure("reading the end of the archive");
  // Read what libarchive did not need, up to one tail window more than canonical.
  while (!im.eof) {
    auto n = im.fill();
    if (!n) return n.error();
    if (*n == 0) break;
    if (im.offset > end + kTailCap) return bad("data after the end of the archive");
  }
  for (std::uint64_t pos = data_end; pos < im.offset; ++pos)
    if (im.tail[pos % kTailCap] != 0)
      return bad(pos >= end ? "data after the end of the archive"
                            : "end of archive is not canonical (non-zero padding)");
  if (im.offset < end) return bad("artifact is truncated");
  if (im.offset > end) return bad("data after the end of the archive");
  return {};
}

std::array<char, kTarBlock> canonical_header(std::string_view name, std::uint64_t size) {
  std::array<char, kTarBlock> h{};
  auto put = [&](std::size_t offset, std::string_view text) {
    std::memcpy(h.data() + offset, text.data(), text.size());
  };
  put(0, name.substr(0, 100));
  put(100, "0000644");  // each numeric field: octal digits, then NUL
  put(108, "0000000");
  put(116, "0000000");
  char size_field[13];
  std::snprintf(size_field, sizeof size_field, "%011llo",
                static_cast<unsigned long long>(size & kMaxPayloadSize));
  put(124, std::string_view(size_field, 11));
  put(136, "00000000000");
  h[156] = '0';
  put(257, std::string_view("ustar\0"
                            "00",
                            8));
  put(329, "0000000");
  put(337, "0000000");
  // The checksum: the sum of all bytes with the field taken as spaces; six digits, NUL, space.
  unsigned sum = 8 * ' ';
  for (std::size_t i = 0; i < kTarBlock; ++i)
    sum += static_cast<unsigned char>(h[i]);
  char sum_field[8];
  std::snprintf(sum_field, sizeof sum_field, "%06o", sum);
  put(148, std::string_view(sum_field, 6));
  h[154] = '\0';
  h[155] = ' ';
  return h;
}

Result<void> write_container(int out_fd, std::string_view manifest, std::string_view signature,
                             int payload_fd, std::uint64_t payload_size, Compression compression) {
  if (payload_size == 0 || payload_size > kMaxPayloadSize)
    return Error(ErrorCode::kInvalidArgument, "the payload must have 1 byte to 8 GiB - 1");
  auto write_all = [&](const char* p, std::size_t n) -> Result<void> {
    while (n > 0) {
      ssize_t w = ::write(out_fd, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return system_error(errno, "writing the artifact");
      p += w;
      n -= static_cast<std::size_t>(w);
    }
    return {};
  };
  static const char kZeros[2 * kTarBlock] = {};
  auto pad = [&](std::uint64_t size) {
    return write_all(kZeros, static_cast<std::size_t>(pad512(size) - size));
  };
  auto member = [&](std::string_view name, std::string_view data) -> Result<void> {
    auto h = canonical_header(name, data.size());
    UPGRADED_TRY(write_all(h.data(), h.size()));
    UPGRADED_TRY(write_all(data.data(), data.size()));
    return pad(data.size());
  };
  UPGRADED_TRY(member("manifest.json", manifest));
  UPGRADED_TRY(member("manifest.sig", signature));
  auto h = canonical_header(payload_member_name(compression), payload_size);
  UPGRADED_TRY(write_all(h.data(), h.size()));
  // Every 8 MiB copied is handed to writeback at once, so that the caller's fsync has less left
  // to wait for. (copy_file_range was no faster on ext4, and the fsync after it was slower.)
  const off_t start = ::lseek(out_fd, 0, SEEK_CUR);
  constexpr std::uint64_t kWriteBehind = 8u << 20;
  std::uint64_t flushed = 0;
  std::vector<char> buf(kReadSize);
  std::uint64_t done = 0;
  while (done < payload_size) {
    ssize_t n =
        ::pread(payload_fd, buf.data(), std::min<std::uint64_t>(buf.size(), payload_size - done),
                static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return system_error(errno, "reading payload");
    if (n == 0) return Error(ErrorCode::kFailed, "payload shrank while packing");
    UPGRADED_TRY(write_all(buf.data(), static_cast<std::size_t>(n)));
    done += static_cast<std::uint64_t>(n);
    if (start >= 0 && (done - flushed >= kWriteBehind || done == payload_size)) {
      ::sync_file_range(out_fd, start + static_cast<off_t>(flushed),
                        static_cast<off_t>(done - flushed), SYNC_FILE_RANGE_WRITE);
      flushed = done;
    }
  }
  UPGRADED_TRY(pad(payload_size));
  return write_all(kZeros, sizeof kZeros);
}

}  // namespace upgraded::artifact
