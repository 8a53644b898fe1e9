// Fuzz target `container`: the outer ustar of an artifact (lib/artifact/container.cpp), over a
// memfd, read the two ways the code reads it:
// - as the helper's --read-head step and `upgradectl verify` do: ContainerReader::open, then
//   begin_payload, read_payload to the end and finish;
// - as the extraction helper does: ContainerReader::payload_at the offset the canonical layout
//   gives for the two sizes the head step reported, then read_payload and finish.
// The payload's description comes from the container's own manifest.json when that parses
// (seeds are real artifacts), or else from the bytes where a canonical payload header would be,
// so that mutated containers still reach the canonical-layout checks.
//
// Invariants: errors are kVerificationFailed; a container accepted up to the payload has every
// member exactly where the canonical layout puts it, under its one canonical header
// (docs/artifact-format.md §2); one accepted by finish() ends with the canonical zeros, nothing
// after. Whatever the whole reading accepts, the payload-only reading accepts with the same
// bytes. The same bytes read through a pipe (read(2) instead of pread) get the same verdicts.

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <optional>
#include <string>

#include "fuzz_support.h"
#include "upgraded/artifact/container.h"
#include "upgraded/artifact/manifest.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"

using namespace upgraded;
using namespace upgraded::artifact;

namespace {

constexpr std::size_t kPipeSize = 1 << 20;

// What a run got to: the verdict of each step and the bytes it produced.
struct Outcome {
  std::string stage;  // where it stopped: "open", "begin", "read", "finish" or "ok"
  std::string message;
  std::string manifest, signature, payload;
  bool operator==(const Outcome&) const = default;
};

Outcome failed(Outcome out, const char* stage, const Error& e) {
  FUZZ_CHECK_MSG(e.code() == ErrorCode::kVerificationFailed, e.message());
  out.stage = stage;
  out.message = e.message();
  return out;
}

PayloadInfo describe(std::string_view input, const std::string& manifest,
                     const std::string& signature) {
  if (auto m = parse_manifest(manifest)) return m->payload;
  PayloadInfo info;
  info.compression = Compression::kZstd;
  info.size = 0;
  std::uint64_t header = canonical_payload_offset(manifest.size(), signature.size()) - kTarBlock;
  if (input.size() < header + kTarBlock) return info;
  std::string_view h = input.substr(header, kTarBlock);
  std::string name(h.substr(0, 100).data(), strnlen(h.data(), 100));
  for (auto c : {Compression::kZstd, Compression::kXz, Compression::kGzip, Compression::kNone})
    if (name == payload_member_name(c)) info.compression = c;
  for (char c : h.substr(124, 11)) {
    if (c < '0' || c > '7') break;
    info.size = info.size * 8 + static_cast<std::uint64_t>(c - '0');
  }
  return info;
}

bool same_block(std::string_view input, std::uint64_t at, const std::array<char, kTarBlock>& b) {
  return input.size() >= at + kTarBlock &&
         input.substr(at, kTarBlock) == std::string_view(b.data(), b.size());
}

// After the payload's data: zero padding to a block, two zero blocks, and nothing else.
void check_end(std::string_view input, std::uint64_t data_end) {
  FUZZ_CHECK(input.size() == (data_end + kTarBlock - 1) / kTarBlock * kTarBlock + 2 * kTarBlock);
  for (char c : input.substr(data_end))
    FUZZ_CHECK(c == 0);
}

Result<void> read_all(ContainerReader& r, const PayloadInfo& info, Outcome& out) {
  std::string buf(7777, '\0');  // an odd size: reads that straddle tar blocks
  for (;;) {
    auto n = r.read_payload(std::as_writable_bytes(std::span(buf.data(), buf.size())));
    if (!n) return n.error();
    if (*n == 0) return {};
    FUZZ_CHECK(*n <= buf.size());
    out.payload.append(buf.data(), *n);
    FUZZ_CHECK(out.payload.size() <= info.size);
  }
}

// `info`: the payload's description, guessed (describe) from this run's head when empty.
Outcome run(std::string_view input, int fd, std::optional<PayloadInfo>& info) {
  Outcome out;
  auto reader = ContainerReader::open(fd);
  if (!reader) return failed(out, "open", reader.error());
  ContainerReader& r = **reader;
  out.manifest = r.manifest_bytes();
  out.signature = r.signature_bytes();
  FUZZ_CHECK(out.manifest.size() <= kMaxManifestSize);
  if (!info) info = describe(input, out.manifest, out.signature);
  if (auto b = r.begin_payload(*info); !b) return failed(out, "begin", b.error());

  // Everything before the payload's data is where the canonical layout says.
  std::uint64_t sig_header = kTarBlock + (out.manifest.size() + 511) / 512 * 512;
  std::uint64_t data_start = canonical_payload_offset(out.manifest.size(), out.signature.size());
  FUZZ_CHECK(input.size() >= data_start);
  FUZZ_CHECK(same_block(input, 0, canonical_header("manifest.json", out.manifest.size())));
  FUZZ_CHECK(input.substr(kTarBlock, out.manifest.size()) == out.manifest);
  FUZZ_CHECK(same_block(input, sig_header, canonical_header("manifest.sig", out.signature.size())));
  FUZZ_CHECK(input.substr(sig_header + kTarBlock, out.signature.size()) == out.signature);
  FUZZ_CHECK(same_block(input, data_start - kTarBlock,
                        canonical_header(payload_member_name(info->compression), info->size)));

  if (auto p = read_all(r, *info, out); !p) return failed(out, "read", p.error());
  if (auto f = r.finish(); !f) return failed(out, "finish", f.error());

  FUZZ_CHECK(out.payload.size() == info->size);
  FUZZ_CHECK(input.substr(data_start, info->size) == out.payload);
  check_end(input, data_start + info->size);
  out.stage = "ok";
  return out;
}

// The extraction helper's reading: the payload alone, at the offset the daemon computes.
Outcome run_payload_only(std::string_view input, int fd, std::uint64_t offset,
                         const PayloadInfo& info) {
  Outcome out;
  auto reader = ContainerReader::payload_at(fd, offset, info);
  if (!reader) return failed(out, "open", reader.error());
  FUZZ_CHECK(same_block(input, offset - kTarBlock,
                        canonical_header(payload_member_name(info.compression), info.size)));
  if (auto p = read_all(**reader, info, out); !p) return failed(out, "read", p.error());
  if (auto f = (*reader)->finish(); !f) return failed(out, "finish", f.error());
  FUZZ_CHECK(out.payload.size() == info.size);
  FUZZ_CHECK(input.substr(offset, info.size) == out.payload);
  check_end(input, offset + info.size);
  out.stage = "ok";
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto input = fuzz::as_text(data, size);
  UniqueFd memfd(::memfd_create("container-fuzz", MFD_CLOEXEC));
  FUZZ_CHECK(memfd.get() >= 0);
  FUZZ_CHECK(fs::write_all(memfd.get(), std::as_bytes(std::span(input.data(), input.size()))));

  std::optional<PayloadInfo> info;
  Outcome by_pread = run(input, memfd.get(), info);

  if (by_pread.stage != "open") {
    std::uint64_t offset =
        canonical_payload_offset(by_pread.manifest.size(), by_pread.signature.size());
    Outcome raw = run_payload_only(input, memfd.get(), offset, *info);
    if (by_pread.stage == "ok") {
      FUZZ_CHECK_MSG(raw.stage == "ok", raw.message);
      FUZZ_CHECK(raw.payload == by_pread.payload);
    }
  }

  // The pipe run, with the description the first run used (it cannot reread the input to guess
  // it), for one input in four: it costs as much as the first (the reader's 1 MiB buffer).
  if (size <= kPipeSize && std::hash<std::string_view>()(input) % 4 == 0) {
    int p[2];
    FUZZ_CHECK(::pipe2(p, O_CLOEXEC) == 0);
    UniqueFd rd(p[0]), wr(p[1]);
    FUZZ_CHECK(
        ::fcntl(wr.get(), F_SETPIPE_SZ, static_cast<int>(std::max<std::size_t>(size, 4096))) >= 0);
    FUZZ_CHECK(fs::write_all(wr.get(), std::as_bytes(std::span(input.data(), input.size()))));
    wr.reset();
    Outcome by_read = run(input, rd.get(), info);
    FUZZ_CHECK_MSG(by_read == by_pread, (by_read.stage + " " + by_read.message + " vs " +
                                         by_pread.stage + " " + by_pread.message));
  }
  return 0;
}
