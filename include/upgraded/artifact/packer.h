#pragma once

// Building artifacts (`upgradectl pack`). The output is reproducible: the same inputs give a
// byte-identical artifact (entries sorted by name, owners 0:0 without names, every mtime set to
// the `created` time, multi-threaded zstd whose output does not depend on the number of
// workers, Ed25519's deterministic signatures), whatever the number of threads or CPUs.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "upgraded/artifact/manifest.h"
#include "upgraded/result.h"

namespace upgraded::artifact {

struct PackOptions {
  std::vector<std::string> key_paths;  ///< PEM private keys; each adds one signature
  std::string app;
  std::string version;
  std::optional<std::string> extra_manifest_path;  ///< JSON with author fields (units, hooks...)
  std::string output;
  std::optional<std::string> source_dir;    ///< build payload.tar.zst from this tree, or
  std::optional<std::string> payload_path;  ///< wrap this .tar/.tar.zst/.tar.xz/.tar.gz as is
  /// Release time (Unix seconds). Unset: the newest mtime in the input, so unchanged inputs give
  /// an unchanged artifact.
  std::optional<std::int64_t> created;
  int zstd_level = 3;
  std::uint64_t chunk_size = kDefaultChunkSize;
  /// zstd compression workers for a directory payload; 0: the number of online CPUs. The
  /// artifact is the same byte for byte whatever the number.
  unsigned threads = 0;
};

struct PackResult {
  Manifest manifest;
  std::vector<std::string> key_ids;
  std::uint64_t artifact_size = 0;
};

/// Builds, signs and writes the artifact to `options.output` (atomically: a temporary sibling
/// is renamed into place). An existing output is replaced.
Result<PackResult> pack(const PackOptions& options);

struct DirPayloadOptions {
  int zstd_level = 3;
  unsigned threads = 1;  ///< zstd workers, at least 1: the output is the same for any number
  std::uint64_t chunk_size = kDefaultChunkSize;  ///< a power of two, kMinChunkSize..kMaxChunkSize
  std::int64_t mtime = 0;                        ///< of every entry
};

/// Writes a reproducible tar of `dir`, compressed with multi-threaded zstd, to `out_fd` (from
/// its current offset), and hashes the compressed bytes as they are written: returns the
/// payload's size, SHA-256 and chunk hashes (`chunk_size` chunks: more than kMaxChunks of them
/// is for the caller to handle). The tree is read, compressed and hashed at the same time, on
/// `threads` zstd workers and one thread that writes and hashes; memory stays bounded (a few
/// MiB of buffers, plus zstd's per-worker job buffers). Regular files, directories, symlinks and
/// hardlinks are stored; any other file type is an error. Every thread has ended on return.
Result<PayloadInfo> write_payload_from_dir(const std::string& dir, int out_fd,
                                           const DirPayloadOptions& options);

/// Hashes a payload file: size, whole SHA-256 and the SHA-256 of each `chunk_size` chunk.
Result<PayloadInfo> describe_payload(int fd, Compression compression, std::uint64_t chunk_size);

/// Signs `manifest_bytes` with every key and writes the container to `output` atomically. The
/// low-level step of `pack`, public so that tests can build artifacts with arbitrary manifests.
Result<std::vector<std::string>> sign_and_write(const std::string& manifest_bytes,
                                                const std::vector<std::string>& key_paths,
                                                int payload_fd, const PayloadInfo& payload,
                                                const std::string& output);

}  // namespace upgraded::artifact
