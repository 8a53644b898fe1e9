#pragma once

// Verified streaming (docs/artifact-format.md §5): the payload is read chunk by chunk and each
// chunk's SHA-256 is compared with the signed list before the chunk is handed on. Consumers
// (the extractor, `verify`) therefore never see a byte that is not covered by a signature.

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "upgraded/artifact/container.h"
#include "upgraded/artifact/digest.h"
#include "upgraded/artifact/manifest.h"
#include "upgraded/result.h"

namespace upgraded::artifact {

/// Pull interface for payload bytes.
class PayloadSource {
 public:
  virtual ~PayloadSource() = default;
  /// The next piece of payload, valid until the next call. An empty span means the payload is
  /// complete and every check (size, chunk hashes, whole SHA-256, container end) has passed.
  virtual Result<std::span<const std::byte>> next() = 0;
};

/// Reads the payload of an opened container on a background thread, verifying each chunk before
/// queueing it: one SHA-256 pass over each byte. Memory is bounded to three chunk buffers.
class VerifiedPayloadStream final : public PayloadSource {
 public:
  VerifiedPayloadStream(ContainerReader& container, const PayloadInfo& info);
  ~VerifiedPayloadStream() override;
  VerifiedPayloadStream(const VerifiedPayloadStream&) = delete;
  VerifiedPayloadStream& operator=(const VerifiedPayloadStream&) = delete;

  Result<std::span<const std::byte>> next() override;

 private:
  void pump();
  Result<void> pump_chunks();

  ContainerReader& m_container;
  const PayloadInfo& m_info;

  std::mutex m_mutex;
  std::condition_variable m_cv;
  std::vector<std::unique_ptr<std::byte[]>> m_buffers;
  std::vector<std::size_t> m_lengths;
  std::deque<std::size_t> m_free;
  std::deque<std::size_t> m_ready;
  std::optional<std::size_t> m_held;
  std::optional<Error> m_error;
  bool m_done = false;
  bool m_stop = false;
  bool m_finished = false;
  std::thread m_thread;
};

}  // namespace upgraded::artifact
