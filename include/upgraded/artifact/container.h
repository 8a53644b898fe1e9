#pragma once

// The outer container of a .upd artifact: an uncompressed ustar archive with exactly three
// members (manifest.json, manifest.sig, payload.tar[.zst|.xz|.gz]) in canonical layout. See
// docs/artifact-format.md §2. libarchive parses the headers; this module additionally insists on
// the canonical byte layout, so that every byte of an artifact is either signed, hashed, or
// required to have one exact value.

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "upgraded/artifact/manifest.h"
#include "upgraded/result.h"

namespace upgraded::artifact {

inline constexpr std::size_t kTarBlock = 512;

/// The one header block a member `name` of `size` bytes may have (docs/artifact-format.md
/// §2.2): every field is fixed - mode 0644, owner 0:0 without names, mtime 0, a ustar header
/// as `tar --format=ustar --owner=0 --group=0 --numeric-owner --mode=0644 --mtime=@0` writes it.
/// Readers compare the whole block with this; `pack` writes it.
std::array<char, kTarBlock> canonical_header(std::string_view name, std::uint64_t size);

/// Sequential reader of an artifact's container. Reads from offset 0 of `fd` with pread (or
/// read() for pipes), never rereads a byte, and never touches the fd's file offset for files.
/// Where the payload's data starts in a canonical container whose manifest.json and
/// manifest.sig have these sizes (three 512-byte headers, data padded to 512).
inline std::uint64_t canonical_payload_offset(std::uint64_t manifest_size,
                                              std::uint64_t signature_size) {
  auto pad = [](std::uint64_t n) { return (n + 511) / 512 * 512; };
  return 3 * 512 + pad(manifest_size) + pad(signature_size);
}

class ContainerReader {
 public:
  ~ContainerReader();
  ContainerReader(const ContainerReader&) = delete;
  ContainerReader& operator=(const ContainerReader&) = delete;

  /// Reads the first two members. Nothing in them is trusted yet. Errors: kVerificationFailed.
  static Result<std::unique_ptr<ContainerReader>> open(int fd);
  /// A reader of the payload member's data alone, at `offset` in the regular file `fd`, that
  /// parses nothing: for a process that must not parse unverified bytes (the daemon's
  /// extraction helper), which hands every byte to the chunk verifier first. The payload's
  /// header block (right before `offset`) must be byte for byte the canonical one for `info`;
  /// read_payload() serves `info.size` bytes; finish() compares the end of the file with the
  /// canonical end. Nothing before the header is read. Errors: kVerificationFailed.
  static Result<std::unique_ptr<ContainerReader>> payload_at(int fd, std::uint64_t offset,
                                                             const PayloadInfo& info);

  const std::string& manifest_bytes() const { return m_manifest; }
  const std::string& signature_bytes() const { return m_signature; }

  /// Positions at the payload member, checking its header against the (verified) manifest
  /// and the canonical layout of everything before it.
  Result<void> begin_payload(const PayloadInfo& info);
  /// Reads up to `out.size()` payload bytes; 0 means the member is complete.
  Result<std::size_t> read_payload(std::span<std::byte> out);
  /// Makes a read that is waiting for data (a pipe whose writer stalled) fail with "canceled",
  /// now and from now on. Thread-safe; used to stop a reading thread.
  void cancel();

  /// After the whole payload: the archive must end here, in canonical form (zero padding to
  /// 512 bytes, two zero blocks, nothing after).
  Result<void> finish();

 private:
  ContainerReader();
  struct Impl;
  std::unique_ptr<Impl> m_impl;
  std::string m_manifest;
  std::string m_signature;
};

/// Writes a canonical container to `out_fd`: the three members with their canonical headers;
/// the payload is copied from `payload_fd` (offset 0, `payload_size` bytes) and handed to
/// writeback as it goes (the caller's fsync then waits less).
Result<void> write_container(int out_fd, std::string_view manifest, std::string_view signature,
                             int payload_fd, std::uint64_t payload_size, Compression compression);

}  // namespace upgraded::artifact
