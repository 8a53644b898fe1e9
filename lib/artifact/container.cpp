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

// Checks that the 512 bytes at `h` are the one canonical header block for a regular member
// `name` of `size` bytes (docs/artifact-format.md §2.2). libarchive has already checked the
// checksum's value; this pins the bytes it tolerates (terminators, extension headers).
Result<void> check_header(const char* h, std::string_view name, std::uint64_t size) {
  std::string where = "header of '" + std::string(name) + "'";
  if (std::memcmp(h, name.data(), name.size()) != 0 ||
      !all_zero(h + name.size(), 100 - name.size()))
    return bad(where + ": name field is not canonical");
  char size_field[13];
  std::snprintf(size_field, sizeof size_field, "%011llo", static_cast<unsigned long long>(size));
  if (std::memcmp(h + 124, size_field, 11) != 0 || (h[135] != 0 && h[135] != ' '))
    return bad(where + ": size field is not canonical");
  for (int i = 148; i < 154; ++i)
    if (h[i] < '0' || h[i] > '7') return bad(where + ": checksum field is not canonical");
  if (h[154] != 0 || h[155] != ' ') return bad(where + ": checksum field is not canonical");
  if (h[156] != '0' && h[156] != 0) return bad(where + ": not a regular file member");
  if (!all_zero(h + 157, 100)) return bad(where + ": has a link name");
  bool posix = std::memcmp(h + 257,
                           "ustar\0"
                           "00",
                           8) == 0;
  bool gnu = std::memcmp(h + 257, "ustar  \0", 8) == 0;
  if (!posix && !gnu) return bad(where + ": not a ustar header");
  if (!all_zero(h + 345, kTarBlock - 345))
    return bad(where + ": prefix or extension fields are set");
  return {};
}

}  // namespace

struct ContainerReader::Impl {
  int fd = -1;
  bool raw = false;  // payload_at(): pread at payload_data_start, no archive parsing
  bool use_pread = true;
  std::uint64_t offset = 0;  // bytes handed to libarchive so far
  bool eof = false;
  std::vector<char> buf = std::vector<char>(kReadSize);
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
      ssize_t n = use_pread ? ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(offset))
                            : ::read(fd, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return system_error(errno, "reading artifact");
      record(buf.data(), static_cast<std::size_t>(n));
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
    *out = self->buf.data();
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

std::unique_ptr<ContainerReader> ContainerReader::payload_at(int fd, std::uint64_t offset,
                                                             const PayloadInfo& info) {
  std::unique_ptr<ContainerReader> self(new ContainerReader());
  Impl& im = *self->m_impl;
  im.fd = fd;
  im.raw = true;
  im.keep_prefix = false;
  im.payload_data_start = offset;
  im.payload_size = info.size;
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
  if (im.raw) return {};
  archive_entry* entry = nullptr;
  int r = archive_read_next_header(im.a, &entry);
  if (r == ARCHIVE_OK) return bad("unexpected member after the payload");
  if (r != ARCHIVE_EOF) return im.archive_failure("reading the end of the archive");
  // Read what libarchive did not need, up to one tail window more than canonical.
  while (!im.eof) {
    auto n = im.fill();
    if (!n) return n.error();
    if (*n == 0) break;
    if (im.offset > im.payload_data_start + im.payload_size + kTailCap)
      return bad("data after the end of the archive");
  }
  std::uint64_t data_end = im.payload_data_start + im.payload_size;
  // Two zero blocks end the archive; the file may stop there (what pack writes) or be padded to
  // a full 10240-byte record (GNU tar's default). Any other length is truncation or appending.
  std::uint64_t minimal_end = pad512(data_end) + 2 * kTarBlock;
  std::uint64_t record_end = (minimal_end + kTarRecord - 1) / kTarRecord * kTarRecord;
  for (std::uint64_t pos = data_end; pos < im.offset; ++pos)
    if (im.tail[pos % kTailCap] != 0)
      return bad(pos >= minimal_end ? "data after the end of the archive"
                                    : "end of archive is not canonical (non-zero padding)");
  if (im.offset < minimal_end || (im.offset > minimal_end && im.offset < record_end))
    return bad("artifact is truncated");
  if (im.offset > record_end) return bad("data after the end of the archive");
  return {};
}

Result<void> write_container(int out_fd, std::string_view manifest, std::string_view signature,
                             int payload_fd, std::uint64_t payload_size, Compression compression,
                             std::int64_t mtime) {
  std::unique_ptr<archive, decltype(&archive_write_free)> a(archive_write_new(),
                                                            &archive_write_free);
  std::unique_ptr<archive_entry, decltype(&archive_entry_free)> entry(archive_entry_new(),
                                                                      &archive_entry_free);
  if (!a || !entry) return Error(ErrorCode::kFailed, "allocating archive writer");
  auto fail = [&](const char* doing) {
    const char* msg = archive_error_string(a.get());
    return Error(ErrorCode::kFailed, std::string(doing) + ": " + (msg ? msg : "libarchive error"));
  };
  if (archive_write_set_format_ustar(a.get()) != ARCHIVE_OK ||
      archive_write_add_filter_none(a.get()) != ARCHIVE_OK ||
      archive_write_set_bytes_per_block(a.get(), kTarRecord) != ARCHIVE_OK ||
      archive_write_set_bytes_in_last_block(a.get(), 1) != ARCHIVE_OK ||
      archive_write_open_fd(a.get(), out_fd) != ARCHIVE_OK)
    return fail("opening container writer");
  auto add = [&](std::string_view name, std::uint64_t size) -> Result<void> {
    archive_entry_clear(entry.get());
    archive_entry_set_pathname(entry.get(), std::string(name).c_str());
    archive_entry_set_filetype(entry.get(), AE_IFREG);
    archive_entry_set_perm(entry.get(), 0644);
    archive_entry_set_size(entry.get(), static_cast<la_int64_t>(size));
    archive_entry_set_mtime(entry.get(), mtime, 0);
    archive_entry_set_uid(entry.get(), 0);
    archive_entry_set_gid(entry.get(), 0);
    if (archive_write_header(a.get(), entry.get()) != ARCHIVE_OK) return fail("writing header");
    return {};
  };
  auto data = [&](std::string_view bytes) -> Result<void> {
    if (archive_write_data(a.get(), bytes.data(), bytes.size()) !=
        static_cast<la_ssize_t>(bytes.size()))
      return fail("writing member data");
    return {};
  };
  UPGRADED_TRY(add("manifest.json", manifest.size()));
  UPGRADED_TRY(data(manifest));
  UPGRADED_TRY(add("manifest.sig", signature.size()));
  UPGRADED_TRY(data(signature));
  UPGRADED_TRY(add(payload_member_name(compression), payload_size));
  std::vector<char> buf(kReadSize);
  std::uint64_t done = 0;
  while (done < payload_size) {
    ssize_t n =
        ::pread(payload_fd, buf.data(), std::min<std::uint64_t>(buf.size(), payload_size - done),
                static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return system_error(errno, "reading payload");
    if (n == 0) return Error(ErrorCode::kFailed, "payload shrank while packing");
    UPGRADED_TRY(data(std::string_view(buf.data(), static_cast<std::size_t>(n))));
    done += static_cast<std::uint64_t>(n);
  }
  if (archive_write_close(a.get()) != ARCHIVE_OK) return fail("finishing container");
  return {};
}

}  // namespace upgraded::artifact
