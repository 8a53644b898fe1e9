#include "upgraded/artifact/payload_stream.h"

#include <algorithm>

#include "upgraded/artifact/encoding.h"

namespace upgraded::artifact {
namespace {

constexpr std::size_t kBuffers = 3;

}  // namespace

VerifiedPayloadStream::VerifiedPayloadStream(ContainerReader& container, const PayloadInfo& info)
    : m_container(container), m_info(info) {
  // No bigger than the payload, and not zeroed: every byte handed on was read into the buffer
  // first, and untouched pages cost nothing (three zeroed 1 MiB buffers were a quarter of a small
  // unpack's time, all in page faults).
  const std::size_t size =
      static_cast<std::size_t>(std::min<std::uint64_t>(m_info.chunk_size, m_info.size));
  const std::size_t count = std::min<std::size_t>(kBuffers, m_info.chunks.size());
  m_lengths.resize(count);
  for (std::size_t i = 0; i < count; ++i) {
    m_buffers.push_back(std::make_unique_for_overwrite<std::byte[]>(size));
    m_free.push_back(i);
  }
  m_thread = std::thread([this] { pump(); });
}

VerifiedPayloadStream::~VerifiedPayloadStream() {
  {
    std::lock_guard lock(m_mutex);
    m_stop = true;
  }
  m_cv.notify_all();
  if (!m_finished) m_container.cancel();  // the reader may be waiting on a stalled pipe
  m_thread.join();
}

void VerifiedPayloadStream::pump() {
  auto r = pump_chunks();
  std::lock_guard lock(m_mutex);
  if (!r) m_error = r.error();
  m_done = true;
  m_cv.notify_all();
}

// Each byte is hashed once, with its chunk: the signed chunk list covers every byte, so the
// whole-payload SHA-256 would prove nothing more (docs/artifact-format.md, "Why the chunk hashes
// suffice"). The chunk is read with pread straight into the buffer that is handed on.
Result<void> VerifiedPayloadStream::pump_chunks() {
  Sha256 chunk_hash;
  const std::size_t count = m_info.chunks.size();
  for (std::size_t i = 0; i < count; ++i) {
    std::size_t slot;
    {
      std::unique_lock lock(m_mutex);
      m_cv.wait(lock, [&] { return m_stop || !m_free.empty(); });
      if (m_stop) return Error(ErrorCode::kFailed, "payload stream stopped");
      slot = m_free.front();
      m_free.pop_front();
    }
    std::uint64_t start = static_cast<std::uint64_t>(i) * m_info.chunk_size;
    std::size_t want =
        static_cast<std::size_t>(std::min<std::uint64_t>(m_info.chunk_size, m_info.size - start));
    std::span<std::byte> buf(m_buffers[slot].get(), want);
    std::size_t got = 0;
    while (got < want) {
      auto n = m_container.read_payload(buf.subspan(got));
      if (!n) return n.error();
      if (*n == 0)
        return Error(ErrorCode::kVerificationFailed,
                     "payload ends at byte " + std::to_string(start + got) + ", manifest says " +
                         std::to_string(m_info.size));
      got += *n;
    }
    chunk_hash.update(buf);
    if (chunk_hash.finish() != m_info.chunks[i])
      return Error(ErrorCode::kVerificationFailed,
                   "payload chunk " + std::to_string(i + 1) + " of " + std::to_string(count) +
                       " (bytes " + std::to_string(start) + "-" + std::to_string(start + want - 1) +
                       ") does not match its signed SHA-256");
    // Everything about the artifact is checked before its last byte is released.
    if (i + 1 == count) UPGRADED_TRY(m_container.finish());
    {
      std::lock_guard lock(m_mutex);
      m_lengths[slot] = want;
      m_ready.push_back(slot);
    }
    m_cv.notify_all();
  }
  return {};
}

Result<std::span<const std::byte>> VerifiedPayloadStream::next() {
  std::unique_lock lock(m_mutex);
  if (m_held) {
    m_free.push_back(*m_held);
    m_held.reset();
    m_cv.notify_all();
  }
  m_cv.wait(lock, [&] { return !m_ready.empty() || m_done; });
  if (m_error) return *m_error;
  if (m_ready.empty()) {
    m_finished = true;
    return std::span<const std::byte>();
  }
  std::size_t slot = m_ready.front();
  m_ready.pop_front();
  m_held = slot;
  return std::span<const std::byte>(m_buffers[slot].get(), m_lengths[slot]);
}

}  // namespace upgraded::artifact
