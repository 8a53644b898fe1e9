// Failing fsync, rename and write, and a full disk: each store operation is run once per call
// site with that call failing. The operation must return a clear error and leave the previous
// state intact with no leftovers - or, if the failure came after its commit point, succeed and
// leave a consistent store.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cstring>
#include <functional>

#include "support/raw_tar.h"
#include "support/store_fixture.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::store;
using namespace upgraded::test;
using upgraded::fs::FaultInjection;
using upgraded::fs::FaultOp;

namespace {

StoreFixture& fixture() {
  static StoreFixture f;
  return f;
}

struct Op {
  std::string name;
  std::function<Result<void>(const Store&)> run;
};

Result<void> stage(const Store& s, const std::string& v) {
  UniqueFd fd(::open(fixture().artifact(v).c_str(), O_RDONLY | O_CLOEXEC));
  auto r = s.stage(fd.get(), fixture().keyring(), artifact::TrustPolicy{});
  if (!r) return r.error();
  return {};
}

template <typename F>
std::function<Result<void>(const Store&)> locked(F f) {
  return [f](const Store& s) -> Result<void> {
    auto l = s.lock("hello");
    if (!l) return l.error();
    return f(s, *l);
  };
}

std::vector<Op> ops() {
  return {
      {"stage", [](const Store& s) { return stage(s, "1.2.0"); }},
      {"switch", locked([](const Store& s, const AppLock& l) { return s.switch_to(l, "1.1.0"); })},
      {"remove", locked([](const Store& s, const AppLock& l) { return s.remove(l, "1.1.0"); })},
      {"gc", locked([](const Store& s, const AppLock& l) -> Result<void> {
         auto r = s.gc(l, GcPolicy{1, {}});
         if (!r) return r.error();
         return {};
       })},
      {"pin",
       locked([](const Store& s, const AppLock& l) { return s.set_pinned(l, "1.1.0", true); })},
      {"floor", locked([](const Store& s, const AppLock& l) { return s.raise_floor(l, "1.0.0"); })},
  };
}

void setup(const Store& s) {
  fixture().stage(s, "1.0.0");
  fixture().stage(s, "1.1.0");
  auto l = s.lock("hello");
  ASSERT_TRUE(s.switch_to(*l, "1.0.0").ok());
}

}  // namespace

TEST(StoreFaults, EveryFailingSyncRenameOrWriteLeavesTheStoreIntactOrCommitted) {
  int injected = 0, intact = 0, committed = 0;
  for (const auto& op : ops()) {
    for (auto [kind, err] : {std::pair{FaultOp::kSync, EIO}, std::pair{FaultOp::kRename, EIO},
                             std::pair{FaultOp::kWrite, ENOSPC}}) {
      for (int n = 1;; ++n) {
        TempDir t;
        auto s = Store::open(fixture().options(t / "state"));
        ASSERT_TRUE(s.ok());
        setup(*s);
        std::string app = s->app_root("hello");
        auto before_state = s->state("hello");
        auto before = snapshot(app, false);
        FaultInjection::arm(kind, n, err);
        auto r = op.run(*s);
        int calls = FaultInjection::calls(kind);
        FaultInjection::disarm();
        if (calls < n) {
          ASSERT_TRUE(r.ok()) << op.name << " without a fault: " << r.error().message();
          break;
        }
        ++injected;
        std::string where = op.name + " with call " + std::to_string(n) + " of kind " +
                            std::to_string(static_cast<int>(kind)) + " failing";
        if (!r.ok()) {
          ++intact;
          EXPECT_NE(r.error().message().find(std::strerror(err)), std::string::npos)
              << where << ": " << r.error().message();
          EXPECT_EQ(snapshot(app, false), before) << where << ": " << r.error().message();
          EXPECT_EQ(*s->state("hello"), *before_state) << where;
        } else {
          ++committed;
        }
        auto reopened = Store::open(fixture().options(t / "state"));
        ASSERT_TRUE(reopened.ok() && reopened->recover_all().ok()) << where;
        auto bad = check_store_invariants(app, fixture().trees());
        EXPECT_TRUE(bad.empty()) << where << ": " << ::testing::PrintToString(bad);
      }
    }
  }
  std::printf("faults injected: %d (%d refused with the store intact, %d after the commit point)\n",
              injected, intact, committed);
  EXPECT_GT(injected, 40);
}

TEST(StoreFaults, AFullDiskRefusesTheStageAndKeepsEverythingElse) {
  UPGRADED_REQUIRE_ROOT();
  TempDir t;
  make_dirs(t / "small");
  ASSERT_EQ(::mount("tmpfs", (t / "small").c_str(), "tmpfs", 0, "size=3m"), 0)
      << std::strerror(errno);
  auto s = Store::open(fixture().options(t / "small/state"));
  ASSERT_TRUE(s.ok());
  setup(*s);
  std::string app = s->app_root("hello");
  auto before = snapshot(app, false);
  // A release bigger than what is left.
  std::string blob;
  for (unsigned long i = 0; blob.size() < (6u << 20); ++i)
    blob += std::to_string(i * 2654435761ul);
  TestKey key = make_key(t, "big");
  BuildOptions o;
  o.version = "3.0.0";
  o.compression = artifact::Compression::kZstd;
  build_artifact(t / "big.upd", {key}, zstd_compress(raw_tar({file("blob", blob)})), o);
  UniqueFd fd(::open((t / "big.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto r = s->stage(fd.get(), keyring_of({key}), artifact::TrustPolicy{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kNoSpace) << r.error().message();
  EXPECT_EQ(snapshot(app, false), before);
  auto bad = check_store_invariants(app, fixture().trees());
  EXPECT_TRUE(bad.empty()) << ::testing::PrintToString(bad);
  ::umount2((t / "small").c_str(), MNT_DETACH);
}
