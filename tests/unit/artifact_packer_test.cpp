#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <random>

#include "support/artifact_builder.h"
#include "support/test_dir.h"
#include "upgraded/artifact/packer.h"
#include "upgraded/artifact/unpack.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::artifact;
using namespace upgraded::test;

namespace {

// This process's threads (a sanitizer may have one of its own).
int thread_count() {
  std::string status = read_file("/proc/self/status");
  auto at = status.find("Threads:");
  return at == std::string::npos ? -1 : std::atoi(status.c_str() + at + 8);
}

class Packer : public ::testing::Test {
 protected:
  void SetUp() override {
    make_dirs(t / "src/bin");
    make_dirs(t / "src/share/doc");
    make_dirs(t / "src/empty");
    write_file(t / "src/bin/hello", "#!/bin/sh\necho v1\n", 0755);
    write_file(t / "src/share/doc/README", "read me\n");
    std::string big;
    for (unsigned long i = 0; i < 300000; ++i)
      big += std::to_string(i * 7919) + (i % 13 ? " " : "\n");
    write_file(t / "src/share/data.txt", big);
    ::symlink("../share/doc/README", (t / "src/bin/readme").c_str());
    ::link((t / "src/share/doc/README").c_str(), (t / "src/share/README.hard").c_str());
    make_dirs(t / "keys");
    write_file(t / "keys/release.pem", read_file(key.public_path));
  }

  PackOptions options(const std::string& out) {
    PackOptions o;
    o.key_paths = {key.private_path};
    o.app = "hello";
    o.version = "1.0.0";
    o.output = out;
    o.source_dir = t / "src";
    o.chunk_size = kMinChunkSize;
    return o;
  }

  // A tree that spans several zstd jobs (8 MiB of tar each at level 3), so that the workers
  // really split the work: a few hundred files, some larger than 1 MiB, incompressible and
  // compressible, empty files, symlinks and hardlinks.
  void make_big_tree(const std::string& root) {
    std::mt19937_64 rng(20261129);
    auto random_bytes = [&](std::size_t n) {
      std::string s(n, '\0');
      for (std::size_t i = 0; i < n; i += 8) {
        std::uint64_t v = rng();
        std::memcpy(s.data() + i, &v, std::min<std::size_t>(8, n - i));
      }
      return s;
    };
    auto text = [&](std::size_t n) {
      std::string s;
      while (s.size() < n)
        s += "word" + std::to_string(rng() % 5000) + ((rng() % 12) ? " " : "\n");
      s.resize(n);
      return s;
    };
    for (int d = 0; d < 10; ++d)
      make_dirs(root + "/d" + std::to_string(d));
    for (int i = 0; i < 300; ++i) {
      std::string path = root + "/d" + std::to_string(i % 10) + "/f" + std::to_string(i);
      std::size_t size = i % 25 == 0 ? (1u << 20) + rng() % (3u << 20) : rng() % (40u << 10);
      if (i % 37 == 0) size = 0;
      write_file(path, i % 2 ? random_bytes(size) : text(size), i % 7 ? 0644 : 0755);
    }
    for (int i = 0; i < 20; ++i) {
      std::string d = root + "/d" + std::to_string(i % 10);
      ASSERT_EQ(
          ::symlink(("f" + std::to_string(i)).c_str(), (d + "/link" + std::to_string(i)).c_str()),
          0);
      ASSERT_EQ(
          ::link((root + "/d" + std::to_string(i % 10) + "/f" + std::to_string(i + 100)).c_str(),
                 (d + "/hard" + std::to_string(i)).c_str()),
          0);
    }
  }

  Result<UnpackResult> unpack(const std::string& artifact, const std::string& dest) {
    UniqueFd fd(::open(artifact.c_str(), O_RDONLY | O_CLOEXEC));
    auto parent = fs::open_directory(t.path());
    return unpack_artifact(fd.get(), ring, TrustPolicy{}, ExtractPolicy{}, parent->get(), dest);
  }

  TempDir t;
  TestKey key = make_key(t, "release");
  Keyring ring = keyring_of({key});
};

}  // namespace

TEST_F(Packer, RoundTripsATreeExactly) {
  auto r = pack(options(t / "a.upd"));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_GT(r->manifest.payload.chunks.size(), 1u) << "the test should span several chunks";
  auto u = unpack(t / "a.upd", "out");
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(tree_hash(t / "src"), tree_hash(t / "out"));
  EXPECT_EQ(u->stats.hardlinks, 1u);
  struct stat a {
  }, b{};
  ::stat((t / "out/share/doc/README").c_str(), &a);
  ::stat((t / "out/share/README.hard").c_str(), &b);
  EXPECT_EQ(a.st_ino, b.st_ino) << "hardlinks stay hardlinks";
  EXPECT_EQ(a.st_uid, ::geteuid()) << "owners are never taken from the archive";
}

TEST_F(Packer, IsReproducible) {
  ASSERT_TRUE(pack(options(t / "a.upd")).ok());
  ASSERT_TRUE(pack(options(t / "b.upd")).ok());
  EXPECT_EQ(read_file(t / "a.upd"), read_file(t / "b.upd"));
  // A copy of the tree made later (new inodes, new ctimes, same content and mtimes) packs the
  // same when the release time is given explicitly.
  auto o1 = options(t / "c.upd");
  o1.created = 1700000000;
  auto o2 = options(t / "d.upd");
  o2.created = 1700000000;
  ASSERT_EQ(std::system(("cp -a " + t / "src" + " " + t / "copy").c_str()), 0);
  o2.source_dir = t / "copy";
  ASSERT_TRUE(pack(o1).ok());
  ASSERT_TRUE(pack(o2).ok());
  EXPECT_EQ(read_file(t / "c.upd"), read_file(t / "d.upd"));
  // ... and a changed byte changes the artifact.
  write_file(t / "copy/share/doc/README", "read me!\n");
  ASSERT_TRUE(pack(o2).ok());
  EXPECT_NE(read_file(t / "c.upd"), read_file(t / "d.upd"));
}

TEST_F(Packer, WrapsAPrebuiltPayloadAsIs) {
  ASSERT_EQ(std::system(("tar -C " + t / "src" + " -cf " + t / "p.tar .").c_str()), 0);
  ASSERT_EQ(std::system(("zstd -q -19 " + t / "p.tar -o " + t / "p.tar.zst").c_str()), 0);
  ASSERT_EQ(std::system(("xz -k " + t / "p.tar").c_str()), 0);
  ASSERT_EQ(std::system(("gzip -k " + t / "p.tar").c_str()), 0);
  int n = 0;
  for (const char* name : {"p.tar", "p.tar.zst", "p.tar.xz", "p.tar.gz"}) {
    auto o = options(t / (std::string(name) + ".upd"));
    o.source_dir.reset();
    o.payload_path = t / name;
    auto r = pack(o);
    ASSERT_TRUE(r.ok()) << name << ": " << r.error().message();
    // The payload member is the input file byte for byte.
    UniqueFd fd(::open((t / (std::string(name) + ".upd")).c_str(), O_RDONLY | O_CLOEXEC));
    auto a = open_verified(fd.get(), ring, TrustPolicy{});
    ASSERT_TRUE(a.ok());
    EXPECT_EQ(a->manifest.payload.size, read_file(t / name).size());
    auto u = unpack(t / (std::string(name) + ".upd"), std::string("out-") + std::to_string(n++));
    ASSERT_TRUE(u.ok()) << name << ": " << u.error().message();
    EXPECT_EQ(tree_hash(t / "src"), tree_hash(t / ("out-" + std::to_string(n - 1))));
  }
}

TEST_F(Packer, RefusesAPayloadWhoseNameAndContentDisagree) {
  ASSERT_EQ(std::system(("tar -C " + t / "src" + " -cf " + t / "p.tar .").c_str()), 0);
  ASSERT_EQ(std::system(("cp " + t / "p.tar " + t / "fake.tar.zst").c_str()), 0);
  auto o = options(t / "x.upd");
  o.source_dir.reset();
  o.payload_path = t / "fake.tar.zst";
  auto r = pack(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("does not start like a zstd"), std::string::npos);
  EXPECT_FALSE(exists(t / "x.upd"));
}

TEST_F(Packer, MergesAuthorFieldsAndRefusesBadOnes) {
  write_file(t / "extra.json",
             R"({"units": ["hello.service"], "health": {"min_ready_s": 2, "deadline_s": 30},
                 "hooks": {"migrate": {"path": "bin/hello", "timeout_s": 60}}, "notes": "v1"})");
  auto o = options(t / "a.upd");
  o.extra_manifest_path = t / "extra.json";
  auto r = pack(o);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->manifest.units, std::vector<std::string>{"hello.service"});
  EXPECT_EQ(r->manifest.hooks.at("migrate").timeout_s, 60u);
  write_file(t / "extra.json", R"({"version": "9.9"})");
  o.output = t / "c.upd";
  EXPECT_FALSE(pack(o).ok());
  EXPECT_FALSE(exists(t / "c.upd"));
}

TEST_F(Packer, RefusesBadNamesAndSpecialFilesWithoutWritingOutput) {
  auto o = options(t / "a.upd");
  o.app = "../evil";
  EXPECT_FALSE(pack(o).ok());
  o = options(t / "a.upd");
  o.version = "1/2";
  EXPECT_FALSE(pack(o).ok());
  ASSERT_EQ(::mkfifo((t / "src/fifo").c_str(), 0644), 0);
  int threads_before = thread_count();
  auto r = pack(options(t / "a.upd"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("fifo"), std::string::npos);
  EXPECT_FALSE(exists(t / "a.upd"));
  EXPECT_EQ(snapshot(t.path()).count(".a.upd.tmp"), 0u);
  EXPECT_EQ(thread_count(), threads_before) << "a thread is left running";
}

TEST_F(Packer, SignsWithSeveralKeysForThresholds) {
  TestKey second = make_key(t, "second");
  auto o = options(t / "a.upd");
  o.key_paths.push_back(second.private_path);
  auto r = pack(o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->key_ids.size(), 2u);
  UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto a = open_verified(fd.get(), keyring_of({key, second}), TrustPolicy{2});
  ASSERT_TRUE(a.ok()) << a.error().message();
  o.key_paths.push_back(key.private_path);
  EXPECT_FALSE(pack(o).ok()) << "the same key twice is refused";
}

TEST_F(Packer, GivesTheSameBytesWhateverTheNumberOfThreads) {
  make_big_tree(t / "big");
  std::string first;
  for (unsigned threads : {1u, 2u, 4u, 0u}) {
    auto o = options(t / ("t" + std::to_string(threads) + ".upd"));
    o.source_dir = t / "big";
    o.created = 1700000000;
    o.threads = threads;
    auto r = pack(o);
    ASSERT_TRUE(r.ok()) << threads << " threads: " << r.error().message();
    std::string bytes = read_file(o.output);
    if (first.empty()) {
      first = bytes;
      EXPECT_GT(r->manifest.payload.size, 8u << 20) << "the payload should span several zstd jobs";
    } else {
      EXPECT_TRUE(bytes == first) << threads << " threads give another artifact than 1 thread";
    }
  }
  // The hashes in the manifest are those of the payload as written, and it unpacks to the tree.
  UniqueFd fd(::open((t / "t2.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto a = open_verified(fd.get(), ring, TrustPolicy{});
  ASSERT_TRUE(a.ok()) << a.error().message();
  auto v = verify_payload(*a);
  ASSERT_TRUE(v.ok()) << v.error().message();
  auto u = unpack(t / "t4.upd", "out");
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(tree_hash(t / "big"), tree_hash(t / "out"));
  EXPECT_EQ(u->stats.hardlinks, 20u);
  EXPECT_EQ(u->stats.symlinks, 20u);
}

TEST_F(Packer, AWriteErrorMidwayStopsEveryThreadAndLeavesNoOutput) {
  make_big_tree(t / "big");
  auto o = options(t / "a.upd");
  o.source_dir = t / "big";
  o.threads = 2;
  // Files may grow to 2 MiB: writing the temporary payload fails (EFBIG) part of the way.
  struct sigaction ignore {
  }, old{};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ignore, &old), 0);
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  rlimit small = saved;
  small.rlim_cur = 2u << 20;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  int threads_before = thread_count();
  auto r = pack(o);
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::sigaction(SIGXFSZ, &old, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("writing the payload"), std::string::npos)
      << r.error().message();
  EXPECT_FALSE(exists(t / "a.upd"));
  for (const auto& [path, what] : snapshot(t.path()))
    EXPECT_FALSE(path.starts_with(".a.upd")) << path << " is left over";
  EXPECT_EQ(thread_count(), threads_before) << "a thread is left running";
}
