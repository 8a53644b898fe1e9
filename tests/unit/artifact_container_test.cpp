// The outer container and the verifier: every byte of an artifact is either signed, hashed, or
// required to have one exact value, so no single-byte change can go unnoticed.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstring>

#include <atomic>
#include <chrono>
#include <thread>

#include "support/artifact_builder.h"
#include "support/raw_tar.h"
#include "support/test_dir.h"
#include "upgraded/artifact/container.h"
#include "upgraded/artifact/extractor.h"
#include "upgraded/artifact/unpack.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::artifact;
using namespace upgraded::test;

namespace {

// The mutation tests below try every offset in the plain build. Under the sanitizers they are
// there to catch memory errors on the refusal paths, which a sample of offsets reaches as well
// (each run still tries offsets in every part of the artifact); a full pass costs minutes there.
#ifdef UPGRADED_SANITIZE
constexpr std::size_t kStride = 7;
#else
constexpr std::size_t kStride = 1;
#endif

// Incompressible, reproducible bytes (a linear congruential generator).
std::string pseudo_random(std::size_t size, std::uint32_t seed) {
  std::string out;
  out.reserve(size);
  while (out.size() < size) {
    seed = seed * 1664525u + 1013904223u;
    out += static_cast<char>(seed >> 24);
  }
  return out;
}

class Container : public ::testing::Test {
 protected:
  void SetUp() override {
    make_dirs(t / "work");
    write_file(t / "sentinel", "untouched");
    payload = zstd_compress(
        raw_tar({dir("bin"), file("bin/hello", "#!/bin/sh\necho hello\n", 0755),
                 file("README", std::string(3000, 'r')), symlink_to("link", "README")}));
    BuildOptions o;
    o.compression = Compression::kZstd;
    build_artifact(t / "good.upd", {key}, payload, o);
    good = read_file(t / "good.upd");
  }

  // Verifies the artifact at `path` completely (signatures, manifest, every payload byte).
  Result<void> verify(const std::string& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    auto a = open_verified(fd.get(), ring, TrustPolicy{});
    if (!a) return a.error();
    return verify_payload(*a);
  }

  // Unpacks into work/out and returns the result; the caller checks what is on disk.
  Result<UnpackResult> unpack(const std::string& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    auto work = fs::open_directory(t / "work");
    return unpack_artifact(fd.get(), ring, TrustPolicy{}, ExtractPolicy{}, work->get(), "out");
  }

  void expect_nothing_extracted() {
    EXPECT_TRUE(snapshot(t / "work").size() == 1) << "work/ must stay empty";
    EXPECT_EQ(read_file(t / "sentinel"), "untouched");
  }

  TempDir t;
  TestKey key = make_key(t, "release");
  Keyring ring = keyring_of({key});
  std::string payload;
  std::string good;
};

}  // namespace

TEST_F(Container, AcceptsTheUntouchedArtifact) {
  ASSERT_TRUE(verify(t / "good.upd").ok());
  auto r = unpack(t / "good.upd");
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(read_file(t / "work/out/bin/hello"), "#!/bin/sh\necho hello\n");
}

TEST_F(Container, RejectsEverySingleByteChangeAtEveryOffset) {
  ASSERT_GT(good.size(), 2000u);
  int checked = 0;
  for (unsigned char mask : {0x01, 0xff}) {
    for (std::size_t i = 0; i < good.size(); i += kStride) {
      std::string bad = good;
      bad[i] = static_cast<char>(bad[i] ^ mask);
      write_file(t / "bad.upd", bad);
      auto v = verify(t / "bad.upd");
      ASSERT_FALSE(v.ok()) << "flip ^" << int(mask) << " at offset " << i << " was accepted";
      EXPECT_EQ(v.error().code(), ErrorCode::kVerificationFailed)
          << i << ": " << v.error().message();
      auto u = unpack(t / "bad.upd");
      ASSERT_FALSE(u.ok()) << "flip at offset " << i << " was unpacked";
      ASSERT_FALSE(exists(t / "work/out")) << i;
      ++checked;
    }
  }
  expect_nothing_extracted();
  EXPECT_EQ(checked, static_cast<int>(2 * ((good.size() + kStride - 1) / kStride)));
  std::printf("single-byte changes rejected: %d (2 per offset of a %zu-byte artifact, every %zu)\n",
              checked, good.size(), kStride);
}

TEST_F(Container, RejectsEveryTruncation) {
  std::size_t checked = 0;
  for (std::size_t len = 0; len < good.size(); len += kStride, ++checked) {
    write_file(t / "short.upd", good.substr(0, len));
    auto v = verify(t / "short.upd");
    ASSERT_FALSE(v.ok()) << "truncated to " << len << " bytes was accepted";
    ASSERT_FALSE(unpack(t / "short.upd").ok()) << len;
    ASSERT_FALSE(exists(t / "work/out"));
  }
  expect_nothing_extracted();
  std::printf("truncations rejected: %zu of a %zu-byte artifact\n", checked, good.size());
}

TEST_F(Container, RejectsAppendedData) {
  for (std::string tail :
       std::initializer_list<std::string>{std::string("x"), std::string(512, 'x'),
                                          std::string(20000, '\0'), std::string(1, '\0'), good}) {
    write_file(t / "long.upd", good + tail);
    auto v = verify(t / "long.upd");
    ASSERT_FALSE(v.ok()) << "appended " << tail.size() << " bytes";
    EXPECT_EQ(v.error().code(), ErrorCode::kVerificationFailed);
    ASSERT_FALSE(unpack(t / "long.upd").ok());
  }
  expect_nothing_extracted();
}

TEST_F(Container, RejectsZeroPaddingToAFullTarRecord) {
  // GNU tar pads archives to 10240-byte records unless told -b1: one canonical length only, so
  // that an artifact has exactly one byte sequence.
  std::size_t padded = (good.size() + 10239) / 10240 * 10240;
  ASSERT_GT(padded, good.size());
  write_file(t / "padded.upd", good + std::string(padded - good.size(), '\0'));
  auto v = verify(t / "padded.upd");
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.error().message().find("data after the end"), std::string::npos)
      << v.error().message();
}

TEST_F(Container, RejectsEveryHeaderChangeEvenWithAMatchingChecksum) {
  // A tar header's checksum catches one changed byte but not a changed field plus a fixed-up
  // checksum. Every header field is pinned, so even that is refused: mode, owner, mtime, names,
  // device numbers are not free to differ between two copies of one artifact.
  auto fix_checksum = [](std::string& bytes, std::size_t header) {
    std::memset(&bytes[header + 148], ' ', 8);
    unsigned sum = 0;
    for (std::size_t i = 0; i < 512; ++i)
      sum += static_cast<unsigned char>(bytes[header + i]);
    char field[8];
    std::snprintf(field, sizeof field, "%06o", sum);
    std::memcpy(&bytes[header + 148], field, 6);
    bytes[header + 154] = '\0';
  };
  UniqueFd fd(::open((t / "good.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto c = ContainerReader::open(fd.get());
  ASSERT_TRUE(c.ok());
  const std::size_t headers[] = {
      0, 512 + ((*c)->manifest_bytes().size() + 511) / 512 * 512,
      canonical_payload_offset((*c)->manifest_bytes().size(), (*c)->signature_bytes().size()) -
          512};
  int checked = 0;
  for (std::size_t h : headers) {
    for (std::size_t i = 0; i < 512; i += (i < 156 ? 1 : kStride)) {
      if (i >= 148 && i < 156) continue;  // the checksum field itself
      for (char value : {'0', '7', ' ', '\0', 'x'}) {
        if (good[h + i] == value) continue;
        std::string bad = good;
        bad[h + i] = value;
        fix_checksum(bad, h);
        write_file(t / "bad.upd", bad);
        auto v = verify(t / "bad.upd");
        ASSERT_FALSE(v.ok()) << "header at " << h << ", byte " << i << " = " << int(value);
        ++checked;
      }
    }
  }
  std::printf("header changes with a valid checksum rejected: %d\n", checked);
}

TEST_F(Container, PayloadAtReadsOnlyThePayloadAndComparesItsHeaderAndTheEnd) {
  UniqueFd fd(::open((t / "good.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto c = ContainerReader::open(fd.get());
  ASSERT_TRUE(c.ok());
  auto manifest = parse_manifest((*c)->manifest_bytes());
  ASSERT_TRUE(manifest.ok());
  const std::uint64_t offset =
      canonical_payload_offset((*c)->manifest_bytes().size(), (*c)->signature_bytes().size());
  auto read_all = [&](const std::string& bytes) -> Result<std::string> {
    write_file(t / "at.upd", bytes);
    UniqueFd f(::open((t / "at.upd").c_str(), O_RDONLY | O_CLOEXEC));
    auto r = ContainerReader::payload_at(f.get(), offset, manifest->payload);
    if (!r) return r.error();
    std::string out(manifest->payload.size, '\0');
    std::size_t got = 0;
    while (got < out.size()) {
      auto n = (*r)->read_payload(std::as_writable_bytes(std::span(out)).subspan(got));
      if (!n) return n.error();
      if (*n == 0) break;
      got += *n;
    }
    UPGRADED_TRY((*r)->finish());
    return out;
  };
  auto whole = read_all(good);
  ASSERT_TRUE(whole.ok()) << whole.error().message();
  EXPECT_EQ(*whole, payload);
  // What lies before the payload's header is not read at all.
  std::string head_changed = good;
  head_changed[100] ^= 1;
  head_changed[600] ^= 1;
  EXPECT_TRUE(read_all(head_changed).ok());
  // The header, the padding and the end are compared with their canonical bytes.
  for (std::size_t at : {std::size_t(offset - 512 + 130), std::size_t(offset - 512 + 300),
                         std::size_t(good.size() - 1)}) {
    std::string bad = good;
    bad[at] ^= 1;
    auto r = read_all(bad);
    ASSERT_FALSE(r.ok()) << at;
    EXPECT_EQ(r.error().code(), ErrorCode::kVerificationFailed) << r.error().message();
  }
  EXPECT_FALSE(read_all(good + std::string(1, '\0')).ok());
  EXPECT_FALSE(read_all(good.substr(0, good.size() - 1)).ok());
}

TEST_F(Container, GnuTarMakesTheCanonicalHeader) {
  // docs/artifact-format.md §2.2 names the tar command whose headers are canonical.
  make_dirs(t / "m");
  write_file(t / "m/manifest.json", std::string(777, 'j'));
  std::string cmd = "tar -C " + (t / "m") +
                    " --format=ustar --owner=0 --group=0 --numeric-owner --mode=0644 "
                    "--mtime=@0 -b1 -cf " +
                    (t / "m.tar") + " manifest.json";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::string tar = read_file(t / "m.tar");
  ASSERT_GE(tar.size(), 512u);
  auto want = canonical_header("manifest.json", 777);
  EXPECT_EQ(tar.substr(0, 512), std::string(want.data(), want.size()));
  EXPECT_EQ(tar.size(), 512u + 1024u + 1024u);  // header, padded data, two zero blocks
}

TEST_F(Container, RejectsEmptyAndForeignFiles) {
  std::string zip("PK\x03\x04", 4);
  zip += std::string(200, 'z');
  for (const auto& [name, content] : std::vector<std::pair<std::string, std::string>>{
           {"empty", ""},
           {"text", "hello world\n"},
           {"zip", zip},
           {"zeros", std::string(10240, '\0')},
           {"zstd-of-artifact", zstd_compress(good)},
           {"plain-tar", raw_tar({file("manifest.json", "{}"), file("payload.tar", "x")})}}) {
    write_file(t / name, content);
    auto v = verify(t / name);
    ASSERT_FALSE(v.ok()) << name;
    EXPECT_EQ(v.error().code(), ErrorCode::kVerificationFailed)
        << name << ": " << v.error().message();
    ASSERT_FALSE(unpack(t / name).ok()) << name;
  }
  expect_nothing_extracted();
}

TEST_F(Container, RejectsAManifestFromOneArtifactWithThePayloadOfAnother) {
  std::string other_payload = zstd_compress(
      raw_tar({dir("bin"), file("bin/hello", "#!/bin/sh\necho evil!\n", 0755),
               file("README", std::string(3000, 'r')), symlink_to("link", "README")}));
  BuildOptions o;
  o.compression = Compression::kZstd;
  build_artifact(t / "other.upd", {key}, other_payload, o);
  // Take manifest.json and manifest.sig from good.upd, the payload from other.upd.
  auto take = [&](const std::string& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    auto c = ContainerReader::open(fd.get());
    EXPECT_TRUE(c.ok());
    return std::pair((*c)->manifest_bytes(), (*c)->signature_bytes());
  };
  auto [manifest, sig] = take(t / "good.upd");
  write_file(t / "other.payload", other_payload);
  UniqueFd pfd(::open((t / "other.payload").c_str(), O_RDONLY | O_CLOEXEC));
  UniqueFd out(::open((t / "mixed.upd").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  ASSERT_TRUE(
      write_container(out.get(), manifest, sig, pfd.get(), other_payload.size(), Compression::kZstd)
          .ok());
  auto v = verify(t / "mixed.upd");
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.error().code(), ErrorCode::kVerificationFailed);
  ASSERT_FALSE(unpack(t / "mixed.upd").ok());
  expect_nothing_extracted();
}

TEST_F(Container, ReadsEachByteOnceSoALaterChangeToTheFileCannotChangeWhatIsInstalled) {
  // A payload larger than the reader's 1 MiB window: its start is read (and kept) when the
  // manifest is, the rest later.
  std::string content = pseudo_random(4u << 20, 12345);
  std::string tar = raw_tar({file("blob", content)});
  build_artifact(t / "big.upd", {key}, tar);
  std::string original = read_file(t / "big.upd");
  std::size_t data_at = original.find(tar.substr(0, 512));
  ASSERT_NE(data_at, std::string::npos);

  auto tamper = [&](std::size_t offset) {
    UniqueFd w(::open((t / "big.upd").c_str(), O_WRONLY | O_CLOEXEC));
    char c = static_cast<char>(original[offset] ^ 0x55);
    ASSERT_EQ(::pwrite(w.get(), &c, 1, static_cast<off_t>(offset)), 1);
  };
  auto extract_after_tampering = [&](std::size_t offset,
                                     const std::string& dest) -> Result<ExtractStats> {
    write_file(t / "big.upd", original);
    UniqueFd fd(::open((t / "big.upd").c_str(), O_RDONLY | O_CLOEXEC));
    auto a = open_verified(fd.get(), ring, TrustPolicy{});
    EXPECT_TRUE(a.ok());
    tamper(offset);  // after the signature check, before the payload is consumed
    make_dirs(t / dest);
    auto d = fs::open_directory(t / dest);
    VerifiedPayloadStream stream(*a->container, a->manifest.payload);
    return extract_payload(stream, a->manifest.payload.compression, a->manifest.payload.size,
                           d->get(), ExtractPolicy{});
  };

  // A byte not yet read when it changes: the reader sees the new byte and refuses it.
  auto late = extract_after_tampering(data_at + (3u << 20), "late");
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().code(), ErrorCode::kVerificationFailed);
  EXPECT_NE(late.error().message().find("does not match its signed SHA-256"), std::string::npos)
      << late.error().message();
  // A byte already read when it changes: what is installed is what was verified.
  auto early = extract_after_tampering(data_at + 512 + 100, "early");
  ASSERT_TRUE(early.ok()) << early.error().message();
  EXPECT_EQ(read_file(t / "early/blob"), content);
}

TEST_F(Container, StreamsFromAPipeInOnePass) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  std::thread writer([&] {
    std::size_t off = 0;
    while (off < good.size()) {
      ssize_t n = ::write(p[1], good.data() + off, good.size() - off);
      if (n <= 0) break;
      off += static_cast<std::size_t>(n);
    }
    ::close(p[1]);
  });
  auto work = fs::open_directory(t / "work");
  auto r = unpack_artifact(p[0], ring, TrustPolicy{}, ExtractPolicy{}, work->get(), "out");
  writer.join();
  ::close(p[0]);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(read_file(t / "work/out/README"), std::string(3000, 'r'));
}

TEST_F(Container, DoesNotHangOnAStalledPipeAfterARefusal) {
  // A payload refused at its first entry, sent through a pipe whose writer then stalls without
  // closing it: the reading thread must be released rather than keep unpack (and, in the
  // daemon, the app's lock) waiting forever.
  std::string noise = pseudo_random(1u << 20, 7);
  build_artifact(t / "evil.upd", {key}, raw_tar({file("../evil", "x"), file("big", noise)}));
  std::string bytes = read_file(t / "evil.upd");
  ::signal(SIGPIPE, SIG_IGN);
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  std::atomic<bool> release{false};
  std::thread writer([&] {
    std::size_t sent = 0, first = 300 * 1024;
    while (sent < first) {
      ssize_t n = ::write(p[1], bytes.data() + sent, first - sent);
      if (n <= 0) break;
      sent += static_cast<std::size_t>(n);
    }
    while (!release)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ::close(p[1]);
  });
  auto work = fs::open_directory(t / "work");
  auto t0 = std::chrono::steady_clock::now();
  auto r = unpack_artifact(p[0], ring, TrustPolicy{}, ExtractPolicy{}, work->get(), "out");
  auto took = std::chrono::steady_clock::now() - t0;
  ::close(p[0]);  // the writer may be blocked on a full pipe: let its write fail (EPIPE)
  release = true;
  writer.join();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kPolicyRefused) << r.error().message();
  EXPECT_LT(took, std::chrono::seconds(5));
  expect_nothing_extracted();
}

TEST_F(Container, InspectShowsTheManifestWithoutTrustingIt) {
  // A wrong key is no obstacle to inspect, and it never claims verification.
  UniqueFd fd(::open((t / "good.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto info = inspect_artifact(fd.get());
  ASSERT_TRUE(info.ok());
  ASSERT_TRUE(info->manifest.has_value());
  EXPECT_EQ(info->manifest->app, "hello");
  ASSERT_EQ(info->signatures.size(), 1u);
  EXPECT_EQ(info->signatures[0].key_id, key.id);
}
