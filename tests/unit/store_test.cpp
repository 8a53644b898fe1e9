#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include <nlohmann/json.hpp>
#include "support/store_fixture.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/remove_tree.h"
#include "upgraded/policy/version.h"

#include "upgraded/store/views_cache.h"

using namespace upgraded;
using namespace upgraded::store;
using namespace upgraded::test;

namespace {

StoreFixture& fixture() {
  static StoreFixture f;  // building artifacts once keeps the suite fast
  return f;
}

class AStore : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = Store::open(fixture().options(t / "state"));
    ASSERT_TRUE(s.ok()) << s.error().message();
    store.emplace(std::move(*s));
  }
  std::string app_root() const { return store->app_root("hello"); }
  Result<StageResult> stage(const std::string& v) {
    UniqueFd fd(::open(fixture().artifact(v).c_str(), O_RDONLY | O_CLOEXEC));
    return store->stage(fd.get(), fixture().keyring(), artifact::TrustPolicy{});
  }
  AppState state() { return *store->state("hello"); }
  /// A copy of the tree at `from` (symlinks as symlinks) at `to`.
  static void copy_tree(const std::string& from, const std::string& to) {
    std::filesystem::copy(
        from, to,
        std::filesystem::copy_options::recursive | std::filesystem::copy_options::copy_symlinks);
  }
  /// Another app: a copy of hello's directory under `name`, in the apps directory.
  void copy_app(const std::string& name) { copy_tree(app_root(), t / ("state/apps/" + name)); }
  /// Another Store over the same files (another process, as far as files go), with `set` applied
  /// to its options.
  std::optional<Store> open_with(const std::function<void(StoreOptions&)>& set) {
    auto o = fixture().options(t / "state");
    set(o);
    auto s = Store::open(o);
    if (!s) {
      ADD_FAILURE() << s.error().message();
      return std::nullopt;
    }
    return std::move(*s);
  }
  void expect_consistent() {
    auto bad = check_store_invariants(app_root(), fixture().trees());
    EXPECT_TRUE(bad.empty()) << ::testing::PrintToString(bad);
  }
  std::string link() {
    char buf[256];
    ssize_t n = ::readlink((app_root() + "/current").c_str(), buf, sizeof buf);
    return n < 0 ? "" : std::string(buf, static_cast<std::size_t>(n));
  }

  TempDir t;
  std::optional<Store> store;
};

}  // namespace

TEST_F(AStore, StagesAReleaseAsAReadOnlyTreeWithoutTouchingCurrent) {
  auto r = stage("1.0.0");
  ASSERT_TRUE(r.ok()) << r.error().message();
  AppState st = state();
  ASSERT_EQ(st.releases.count("1.0.0"), 1u);
  EXPECT_EQ(st.releases["1.0.0"].status, ReleaseStatus::kStaged);
  EXPECT_FALSE(st.current.has_value());
  EXPECT_FALSE(exists(app_root() + "/current"));
  struct stat sb {};
  ASSERT_EQ(::stat((app_root() + "/releases/1.0.0/bin/hello").c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0555u) << "release files are read-only";
  ASSERT_EQ(::stat((app_root() + "/releases/1.0.0/share").c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0555u);
  ASSERT_EQ(::stat((app_root() + "/releases/1.0.0").c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0555u);
  auto m = store->manifest("hello", "1.0.0");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->version, "1.0.0");
  expect_consistent();
}

TEST_F(AStore, SwitchesCurrentWithARelativeSymlinkAndRemembersTheRollbackTarget) {
  ASSERT_TRUE(stage("1.0.0").ok());
  ASSERT_TRUE(stage("1.1.0").ok());
  auto lock = store->lock("hello");
  ASSERT_TRUE(lock.ok());
  ASSERT_TRUE(store->switch_to(*lock, "1.0.0").ok());
  EXPECT_EQ(link(), "releases/1.0.0");
  ASSERT_TRUE(store->switch_to(*lock, "1.1.0").ok());
  EXPECT_EQ(link(), "releases/1.1.0");
  AppState st = state();
  EXPECT_EQ(st.current, "1.1.0");
  EXPECT_EQ(st.previous, "1.0.0");
  EXPECT_EQ(st.releases["1.1.0"].status, ReleaseStatus::kActive);
  EXPECT_EQ(read_file(app_root() + "/current/share/doc/VERSION"), "1.1.0\n");
  // Rollback is a switch back: no extraction, the tree is already there.
  ASSERT_TRUE(store->switch_to(*lock, "1.0.0").ok());
  EXPECT_EQ(read_file(app_root() + "/current/share/doc/VERSION"), "1.0.0\n");
  EXPECT_EQ(state().previous, "1.1.0");
  auto missing = store->switch_to(*lock, "9.9.9");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code(), ErrorCode::kNotFound);
  EXPECT_EQ(link(), "releases/1.0.0");
  expect_consistent();
}

TEST_F(AStore, RefusesADuplicateVersionAndLeavesTheInstalledOneAlone) {
  ASSERT_TRUE(stage("1.0.0").ok());
  auto before = snapshot(app_root());
  auto again = stage("1.0.0");
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code(), ErrorCode::kExists);
  EXPECT_EQ(snapshot(app_root()), before);
}

TEST_F(AStore, RefusesAFloorAboveTheCurrentRelease) {
  ASSERT_TRUE(stage("1.0.0").ok());
  ASSERT_TRUE(stage("1.1.0").ok());
  auto lock = store->lock("hello");
  ASSERT_TRUE(store->switch_to(*lock, "1.0.0").ok());
  auto above = store->raise_floor(*lock, "1.1.0");
  ASSERT_FALSE(above.ok());
  EXPECT_EQ(above.error().code(), ErrorCode::kPolicyRefused);
  EXPECT_NE(above.error().message().find("activate a release at or above it first"),
            std::string::npos);
  EXPECT_EQ(state().floor, std::nullopt);
  ASSERT_TRUE(store->raise_floor(*lock, "1.0.0").ok());
  ASSERT_TRUE(store->raise_floor(*lock, "1.00.0").ok()) << "equal: nothing to do";
  EXPECT_EQ(state().floor, "1.0.0");
  // An interrupted activation may still switch back: it is finished first.
  ASSERT_TRUE(
      store->begin_activation(*lock, PendingActivation{"activate", "1.0.0", "1.1.0", "", ""}).ok());
  ASSERT_TRUE(store->switch_to(*lock, "1.1.0").ok());
  auto pending = store->raise_floor(*lock, "1.1.0");
  ASSERT_FALSE(pending.ok());
  EXPECT_NE(pending.error().message().find("interrupted activation"), std::string::npos);
  EXPECT_EQ(state().floor, "1.0.0");
  ASSERT_TRUE(store->end_activation(*lock).ok());
  EXPECT_TRUE(store->raise_floor(*lock, "1.1.0").ok());
}

// The activation record keeps how far a one-by-one or rolling got and the units it covers; a
// record it cannot trust is an error, never a guess (recovery would restore the wrong units).
TEST_F(AStore, JournalsHowManyUnitsAOneByOneTouchedAndRefusesARecordItCannotTrust) {
  ASSERT_TRUE(stage("1.0.0").ok());
  auto lock = store->lock("hello");
  PendingActivation p{"activate", "", "1.0.0", "", "", "starting", 2};
  ASSERT_TRUE(store->begin_activation(*lock, p).ok());
  auto read = store->pending_activation("hello");
  ASSERT_TRUE(read.ok() && *read);
  EXPECT_EQ((*read)->units_touched, 2u);
  EXPECT_EQ((*read)->step, "starting");
  p.units_touched.reset();
  ASSERT_TRUE(store->begin_activation(*lock, p).ok());
  read = store->pending_activation("hello");
  ASSERT_TRUE(read.ok() && *read);
  EXPECT_EQ((*read)->units_touched, std::nullopt) << "absent: every unit";
  // The units it covers, templates expanded: kept as they are.
  p.units_touched = 2;
  p.units = {"tablet@1.service", "tablet@2.service", "api.service"};
  p.from_units = {"tablet@1.service", "tablet@4.service"};
  p.max_unavailable = 2;
  ASSERT_TRUE(store->begin_activation(*lock, p).ok());
  read = store->pending_activation("hello");
  ASSERT_TRUE(read.ok() && *read);
  EXPECT_EQ((*read)->units, p.units);
  EXPECT_EQ((*read)->from_units, p.from_units);
  EXPECT_EQ((*read)->max_unavailable, 2u);
  EXPECT_EQ((*read)->units_touched, 2u);
  const std::string record = app_root() + "/activation.json";
  for (const char* bad : {"0", "257", "-1", "1.5", "\"2\"", "null", "18446744073709551616"}) {
    write_file(record,
               std::string(R"({"op":"activate","from":"","to":"1.0.0","previous":"",)") +
                   R"("started":"2026-01-01T00:00:00Z","step":"starting","units_touched":)" + bad +
                   "}\n");
    auto r = store->pending_activation("hello");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.error().message().find("activation.json is corrupt"), std::string::npos) << bad;
  }
  std::string too_many = "[";
  for (int i = 0; i < 257; ++i)
    too_many += (i ? ",\"t@" : "\"t@") + std::to_string(i) + ".service\"";
  too_many += "]";
  for (const std::string& bad :
       {std::string("[]"), std::string("\"a.service\""), std::string("[\"a.service\",2]"),
        std::string("[\"../x\"]"), std::string("[\"a.servic\"]"), std::string("{}"), too_many}) {
    write_file(record, std::string(R"({"op":"activate","from":"","to":"1.0.0","previous":"",)") +
                           R"("started":"2026-01-01T00:00:00Z","step":"starting","units":)" + bad +
                           "}\n");
    auto r = store->pending_activation("hello");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.error().message().find("activation.json is corrupt"), std::string::npos) << bad;
  }
  for (const char* bad : {R"("from_units":[])", R"("from_units":["x"])", R"("max_unavailable":0)",
                          R"("max_unavailable":257)", R"("max_unavailable":"2")"}) {
    write_file(record, std::string(R"({"op":"activate","from":"","to":"1.0.0","previous":"",)") +
                           R"("started":"2026-01-01T00:00:00Z","step":"starting",)" + bad + "}\n");
    auto r = store->pending_activation("hello");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.error().message().find("activation.json is corrupt"), std::string::npos) << bad;
  }
  ASSERT_TRUE(store->end_activation(*lock).ok());
}

// A set's record: written, read back, replaced, removed; a record it cannot trust is an error.
TEST_F(AStore, JournalsASetAndRefusesASetRecordItCannotTrust) {
  PendingSet set{"set-1764450000-42",
                 {{"web", "1.0.0", "2.0.0"}, {"db", "", "1.0.0"}},
                 1,
                 false,
                 "2026-11-29T20:00:00Z"};
  auto none = store->pending_sets();
  ASSERT_TRUE(none.ok()) << none.error().message();
  EXPECT_TRUE(none->empty());
  ASSERT_TRUE(store->begin_set(set).ok());
  auto read = store->pending_sets();
  ASSERT_TRUE(read.ok()) << read.error().message();
  ASSERT_EQ(read->size(), 1u);
  EXPECT_EQ((*read)[0].id, set.id);
  EXPECT_EQ((*read)[0].members, set.members);
  EXPECT_EQ((*read)[0].completed, 1u);
  EXPECT_FALSE((*read)[0].undoing);
  EXPECT_EQ((*read)[0].started, set.started);
  set.undoing = true;
  ASSERT_TRUE(store->begin_set(set).ok());
  EXPECT_TRUE((*store->pending_sets())[0].undoing) << "replaced";
  ASSERT_TRUE(store->end_set(set.id).ok());
  EXPECT_TRUE(store->pending_sets()->empty());
  EXPECT_TRUE(store->end_set(set.id).ok()) << "removing twice is no error";
  // What begin_set refuses to write.
  for (auto bad : {PendingSet{"set-1", {}, 0, false, ""},
                   PendingSet{"x-1", {{"web", "", "1.0.0"}}, 0, false, ""},
                   PendingSet{"set-1/../2", {{"web", "", "1.0.0"}}, 0, false, ""},
                   PendingSet{"set-1", {{"web", "", "1.0.0"}}, 2, false, ""}})
    EXPECT_FALSE(store->begin_set(bad).ok()) << bad.id;
  // A good record next to the bad ones below.
  ASSERT_TRUE(store->begin_set(set).ok());
  const std::string record = t / "state/sets/set-7.json";
  const std::string ok_member = R"({"app":"web","from":"1.0.0","to":"2.0.0"})";
  for (const std::string& bad : std::vector<std::string>{
           "not json",
           R"({"id":"set-8","members":[)" + ok_member +
               R"(],"completed":0,"undoing":false,"started":"x"})",
           R"({"id":"set-7","members":[],"completed":0,"undoing":false,"started":"x"})",
           R"({"id":"set-7","members":[)" + ok_member +
               R"(],"completed":2,"undoing":false,"started":"x"})",
           R"({"id":"set-7","members":[)" + ok_member + "," + ok_member +
               R"(],"completed":0,"undoing":false,"started":"x"})",
           R"({"id":"set-7","members":[{"app":"../x","from":"","to":"1.0.0"}],"completed":0,)"
           R"("undoing":false,"started":"x"})",
           R"({"id":"set-7","members":[{"app":"web","from":"","to":"not a version!"}],)"
           R"("completed":0,"undoing":false,"started":"x"})",
           R"({"id":"set-7","members":[)" + ok_member +
               R"(],"completed":0,"undoing":"no","started":"x"})",
           R"({"id":"set-7","members":[)" + ok_member +
               R"(],"completed":0,"undoing":false,"started":"x","more":1})",
           R"({"id":"set-7","members":[{"app":"web","from":"","to":"1.0.0","x":1}],)"
           R"("completed":0,"undoing":false,"started":"x"})"}) {
    write_file(record, bad);
    std::vector<Error> corrupt;
    auto r = store->pending_sets(&corrupt);
    ASSERT_TRUE(r.ok()) << "one bad record hides no other";
    EXPECT_EQ(r->size(), 1u) << bad;
    ASSERT_EQ(corrupt.size(), 1u) << bad;
    EXPECT_EQ(corrupt[0].message(), "sets/set-7.json is corrupt");
  }
  // A temporary file of an interrupted write is not a record.
  ::unlink(record.c_str());
  write_file(t / "state/sets/.set-7.json.tmp", "partial");
  std::vector<Error> corrupt;
  EXPECT_EQ(store->pending_sets(&corrupt)->size(), 1u);
  EXPECT_TRUE(corrupt.empty());
}

TEST_F(AStore, ChangesNothingForABadArtifact) {
  write_file(t / "bad.upd", read_file(fixture().artifact("1.0.0")).substr(0, 3000));
  UniqueFd fd(::open((t / "bad.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto before = snapshot(t / "state");
  auto r = store->stage(fd.get(), fixture().keyring(), artifact::TrustPolicy{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kVerificationFailed);
  EXPECT_EQ(snapshot(t / "state"), before) << "not even an app directory is created";
}

TEST_F(AStore, EnforcesAVersionFloorThatNeverGoesDown) {
  ASSERT_TRUE(stage("1.1.0").ok());
  {
    auto lock = store->lock("hello");
    ASSERT_TRUE(store->raise_floor(*lock, "1.1.0").ok());
    auto lower = store->raise_floor(*lock, "1.0.0");
    ASSERT_FALSE(lower.ok());
    EXPECT_EQ(lower.error().code(), ErrorCode::kPolicyRefused);
    EXPECT_EQ(state().floor, "1.1.0");
  }
  auto old = stage("1.0.0");
  ASSERT_FALSE(old.ok());
  EXPECT_EQ(old.error().code(), ErrorCode::kPolicyRefused);
  EXPECT_NE(old.error().message().find("floor"), std::string::npos);
  EXPECT_FALSE(exists(app_root() + "/releases/1.0.0"));
  EXPECT_TRUE(stage("1.2.0").ok());
  auto lock = store->lock("hello");
  ASSERT_TRUE(store->record_finalized_data_format(*lock, 3).ok());
  EXPECT_FALSE(store->record_finalized_data_format(*lock, 2).ok());
  EXPECT_EQ(state().finalized_data_format, 3u);
  expect_consistent();
}

TEST_F(AStore, LetsOnlyOneHolderMutateAnAppAtATime) {
  ASSERT_TRUE(stage("1.0.0").ok());
  auto first = store->lock("hello");
  ASSERT_TRUE(first.ok());
  auto second = store->lock("hello");
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code(), ErrorCode::kBusy);
  // Another process is refused too (flock is per open file description).
  std::string cmd = "flock -n " + app_root() + "/.lock true";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  auto staged = stage("1.1.0");
  ASSERT_FALSE(staged.ok());
  EXPECT_EQ(staged.error().code(), ErrorCode::kBusy);
  EXPECT_FALSE(exists(app_root() + "/releases/1.1.0"));
  first = Error(ErrorCode::kFailed, "released");
  EXPECT_TRUE(store->lock("hello").ok());
}

TEST_F(AStore, RemovesReleasesButNeverTheCurrentOrAPinnedOne) {
  for (auto v : {"1.0.0", "1.1.0", "1.2.0"})
    ASSERT_TRUE(stage(v).ok());
  auto lock = store->lock("hello");
  ASSERT_TRUE(store->switch_to(*lock, "1.1.0").ok());
  auto cur = store->remove(*lock, "1.1.0");
  ASSERT_FALSE(cur.ok());
  EXPECT_EQ(cur.error().code(), ErrorCode::kPolicyRefused);
  ASSERT_TRUE(store->set_pinned(*lock, "1.2.0", true).ok());
  EXPECT_FALSE(store->remove(*lock, "1.2.0").ok());
  ASSERT_TRUE(store->remove(*lock, "1.0.0").ok());
  EXPECT_FALSE(exists(app_root() + "/releases/1.0.0"));
  EXPECT_FALSE(exists(app_root() + "/manifests/1.0.0.json"));
  EXPECT_EQ(state().releases.count("1.0.0"), 0u);
  EXPECT_EQ(store->remove(*lock, "1.0.0").error().code(), ErrorCode::kNotFound);
  expect_consistent();
}

TEST_F(AStore, CollectsGarbageButKeepsCurrentPreviousPinnedAndLastKnownGood) {
  for (auto v : {"1.0.0", "1.1.0", "1.2.0", "2.0.0"})
    ASSERT_TRUE(stage(v).ok());
  auto lock = store->lock("hello");
  ASSERT_TRUE(store->switch_to(*lock, "1.0.0").ok());
  ASSERT_TRUE(store->set_status(*lock, "1.0.0", ReleaseStatus::kGood).ok());  // last known-good
  ASSERT_TRUE(store->switch_to(*lock, "1.2.0").ok());                         // previous: 1.0.0
  ASSERT_TRUE(store->switch_to(*lock, "2.0.0").ok());                         // previous: 1.2.0
  auto report = store->gc(*lock, GcPolicy{1, {}});
  ASSERT_TRUE(report.ok()) << report.error().message();
  EXPECT_EQ(report->removed, std::vector<std::string>{"1.1.0"});
  AppState st = state();
  EXPECT_EQ(st.versions_in_order(), (std::vector<std::string>{"1.0.0", "1.2.0", "2.0.0"}));
  // A byte budget removes the oldest unprotected first, too.
  ASSERT_TRUE(store->set_status(*lock, "2.0.0", ReleaseStatus::kGood).ok());  // LKG moves on
  auto budget = store->gc(*lock, GcPolicy{10, 1});
  ASSERT_TRUE(budget.ok());
  EXPECT_EQ(budget->removed, std::vector<std::string>{"1.0.0"});
  EXPECT_GT(budget->freed_bytes, 0u);
  EXPECT_EQ(state().versions_in_order(), (std::vector<std::string>{"1.2.0", "2.0.0"}));
  expect_consistent();
}

TEST_F(AStore, MarksReleasesGoodOrBad) {
  ASSERT_TRUE(stage("1.0.0").ok());
  auto lock = store->lock("hello");
  ASSERT_TRUE(store->set_status(*lock, "1.0.0", ReleaseStatus::kGood).ok());
  EXPECT_EQ(state().last_known_good, "1.0.0");
  ASSERT_TRUE(store->set_status(*lock, "1.0.0", ReleaseStatus::kBad).ok());
  EXPECT_EQ(state().releases["1.0.0"].status, ReleaseStatus::kBad);
  EXPECT_FALSE(state().last_known_good.has_value());
}

TEST_F(AStore, PutsAnAppWithItsOwnRootWhereItSays) {
  auto o = fixture().options(t / "state2");
  o.app_roots["hello"] = t / "opt/hello";
  make_dirs(t / "opt");
  auto s = Store::open(o);
  ASSERT_TRUE(s.ok());
  UniqueFd fd(::open(fixture().artifact("1.0.0").c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(s->stage(fd.get(), fixture().keyring(), artifact::TrustPolicy{}).ok());
  EXPECT_TRUE(exists(t / "opt/hello/releases/1.0.0/bin/hello"));
  EXPECT_FALSE(exists(t / "state2/apps/hello"));
  auto apps = s->apps();
  ASSERT_TRUE(apps.ok());
  EXPECT_EQ(*apps, std::vector<std::string>{"hello"});
}

TEST_F(AStore, RecoversFromLeftoversWhenTheAppIsNextLockedAndOnlyThen) {
  ASSERT_TRUE(stage("1.0.0").ok());
  {
    auto lock = store->lock("hello");
    ASSERT_TRUE(store->switch_to(*lock, "1.0.0").ok());
  }
  make_dirs(app_root() + "/releases/.partial.deadbeef/bin");
  write_file(app_root() + "/releases/.partial.deadbeef/bin/x", "half");
  write_file(app_root() + "/manifests/9.9.9.json", "{}");  // a manifest without a release
  ::symlink("releases/nope", (app_root() + "/current.new").c_str());
  write_file(app_root() + "/.state.json.tmp.1234", "{");
  {
    auto garbage_only = Store::open(fixture().options(t / "state"));
    EXPECT_FALSE(*garbage_only->needs_recovery("hello")) << "what it lists is still accurate";
  }
  // An interrupted stage (of 9.9.9, the manifest above) leaves its journal.
  write_file(app_root() + "/journal.json",
             R"({"op":"stage","txid":"deadbeef","versions":["9.9.9"]})");
  auto before = snapshot(app_root(), false);
  auto reopened = Store::open(fixture().options(t / "state"));
  ASSERT_TRUE(reopened.ok()) << reopened.error().message();
  EXPECT_TRUE(*reopened->needs_recovery("hello"));
  // Opening, listing and reading touch nothing: the next operation on the app recovers it.
  ASSERT_TRUE(reopened->apps().ok() && reopened->state("hello").ok());
  EXPECT_EQ(snapshot(app_root(), false), before);
  ASSERT_TRUE(reopened->lock("hello").ok());
  expect_consistent();
  EXPECT_EQ(link(), "releases/1.0.0");
  EXPECT_FALSE(*reopened->needs_recovery("hello"));
}

TEST_F(AStore, WithItsStateCacheSeesEveryReplacedOrRewrittenStateFile) {
  ASSERT_TRUE(stage("1.0.0").ok());
  auto cached = open_with([](StoreOptions& o) { o.cache_states = true; });
  ASSERT_TRUE(cached);
  ASSERT_FALSE(cached->state("hello")->releases.at("1.0.0").pinned);
  {
    auto lock = store->lock("hello");  // another Store: another process, as far as files go
    ASSERT_TRUE(store->set_pinned(*lock, "1.0.0", true).ok());
  }
  EXPECT_TRUE(cached->state("hello")->releases.at("1.0.0").pinned);
  // Replaced behind its back with the same size (pinned false <-> true changes the size, so a
  // floor of the same length is used): still seen.
  std::string text = read_file(app_root() + "/state.json");
  auto pos = text.find("\"floor\": null");
  ASSERT_NE(pos, std::string::npos) << text;
  text.replace(pos, 13, "\"floor\":\"1.0\"");
  write_file(app_root() + "/state.json.new", text);
  ASSERT_EQ(
      ::rename((app_root() + "/state.json.new").c_str(), (app_root() + "/state.json").c_str()), 0);
  EXPECT_EQ(cached->state("hello")->floor, "1.0");
  // Rewritten in place, same inode and size, within the same second: a file this fresh is never
  // served from the cache (on a kernel with coarse timestamps its times would not change).
  auto again = text;
  again.replace(pos, 13, "\"floor\":\"0.9\"");
  {
    std::ofstream out(app_root() + "/state.json", std::ios::in | std::ios::out | std::ios::binary);
    out << again;
  }
  EXPECT_EQ(cached->state("hello")->floor, "0.9");
  ASSERT_EQ(::unlink((app_root() + "/state.json").c_str()), 0);
  EXPECT_EQ(cached->state("hello").error().code(), ErrorCode::kNotFound);
}

TEST_F(AStore, StartsAnUnknownAppFromAnEmptyStateButNeverOneItCannotRead) {
  ASSERT_TRUE(stage("1.0.0").ok());
  bool is_new = true;
  auto known = store->state_or_new("hello", &is_new);
  ASSERT_TRUE(known.ok()) << known.error().message();
  EXPECT_FALSE(is_new);
  EXPECT_EQ(*known, state());
  auto fresh = store->state_or_new("newcomer", &is_new);
  ASSERT_TRUE(fresh.ok()) << fresh.error().message();
  EXPECT_TRUE(is_new);
  EXPECT_EQ(fresh->app, "newcomer");
  EXPECT_TRUE(fresh->releases.empty());
  EXPECT_FALSE(fresh->current.has_value());
  // A state.json that cannot be parsed is an error, never a fresh start (its floor would be
  // lost).
  make_dirs(t / "state/apps/broken");
  write_file(t / "state/apps/broken/state.json", "{not json");
  auto broken = store->state_or_new("broken", &is_new);
  ASSERT_FALSE(broken.ok());
  EXPECT_FALSE(is_new);
  EXPECT_NE(broken.error().code(), ErrorCode::kNotFound);
}

TEST_F(AStore, ListsEveryStateInOnePassAndNamesTheOneItCannotRead) {
  ASSERT_TRUE(stage("1.0.0").ok());
  make_dirs(t / "state/apps/broken");
  write_file(t / "state/apps/broken/state.json", "{not json");
  make_dirs(t / "state/apps/empty");  // a first stage that never committed: no state
  make_dirs(t / "state/apps/fifo");
  ASSERT_EQ(::mkfifo((t / "state/apps/fifo/state.json").c_str(), 0644), 0);
  make_dirs(t / "state/apps/loop");
  ASSERT_EQ(::symlink("state.json", (t / "state/apps/loop/state.json").c_str()), 0);
  auto cached = open_with([](StoreOptions& o) { o.cache_states = true; });
  ASSERT_TRUE(cached);
  for (int pass = 0; pass < 2; ++pass) {  // read, then (the same files) from the cache
    auto all = cached->states();
    ASSERT_TRUE(all.ok()) << all.error().message();
    ASSERT_EQ(all->size(), 4u);
    // Each broken one with its error (a FIFO never opened: that would block), the others read.
    for (std::size_t i : {0u, 1u, 3u}) {
      const auto& broken = (*all)[i];
      EXPECT_EQ(broken.state, nullptr) << broken.app;
      ASSERT_TRUE(broken.error.has_value()) << broken.app;
      EXPECT_NE(broken.error->message().find(broken.app), std::string::npos)
          << broken.error->message();
    }
    EXPECT_EQ((*all)[0].app, "broken");
    EXPECT_EQ((*all)[1].app, "fifo");
    EXPECT_NE((*all)[1].error->message().find("not a regular file"), std::string::npos);
    EXPECT_EQ((*all)[3].app, "loop");
    EXPECT_EQ((*all)[2].app, "hello");
    ASSERT_NE((*all)[2].state, nullptr);
    EXPECT_EQ(*(*all)[2].state, state());
    EXPECT_FALSE((*all)[2].error.has_value());
  }
  {
    auto lock = store->lock("hello");  // another Store: another process, as far as files go
    ASSERT_TRUE(store->set_pinned(*lock, "1.0.0", true).ok());
  }
  auto after = cached->states();
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE((*after)[2].state->releases.at("1.0.0").pinned);
}

TEST_F(AStore, KeepsItsListingInACacheThatNoChangeOnDiskGetsPast) {
  ASSERT_TRUE(stage("1.0.0").ok());
  ASSERT_TRUE(stage("1.1.0").ok());
  {
    auto lock = store->lock("hello");
    ASSERT_TRUE(store->switch_to(*lock, "1.0.0").ok());
  }
  make_dirs(t / "state/apps/empty");  // no state: not listed
  auto listing = open_with([](StoreOptions& o) { o.persist_views = true; });
  ASSERT_TRUE(listing);
  const std::string cache = t / "state/views.cache";
  auto entries = [&] {
    std::string bytes = read_file(cache);
    return views_cache::decode(
        std::span(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()));
  };
  auto versions = [&] {
    auto v = listing->views();
    EXPECT_TRUE(v.ok()) << v.error().message();
    std::vector<std::string> out;
    for (const auto& [app, view] : *v)
      for (const auto& r : view.releases)
        out.push_back(app + " " + r.version + " " + r.role + (r.pinned ? " pinned" : "") +
                      (view.needs_recovery ? " recovering" : ""));
    return out;
  };
  const std::vector<std::string> real = {"hello 1.0.0 current", "hello 1.1.0 "};

  // Just changed: listed, but not kept (a change within the same timestamp tick could go
  // unnoticed).
  fs::FaultInjection::disarm();
  EXPECT_EQ(versions(), real);
  EXPECT_FALSE(exists(cache)) << "nothing settled enough to keep";
  std::this_thread::sleep_for(std::chrono::milliseconds(3100));
  EXPECT_EQ(versions(), real);
  auto kept = entries();
  ASSERT_TRUE(kept.has_value());
  ASSERT_EQ(kept->entries.count("hello"), 1u);
  EXPECT_EQ(kept->entries.count("empty"), 1u);
  struct stat sb {};
  ASSERT_EQ(::stat((app_root() + "/state.json").c_str(), &sb), 0);
  EXPECT_EQ(kept->entries.at("hello").state, views_cache::key_of(sb));
  ASSERT_EQ(::stat(cache.c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0600u) << "it may list apps others cannot reach";
  EXPECT_EQ(fs::FaultInjection::calls(fs::FaultOp::kSync), 0) << "a listing syncs nothing";

  // The cache is what is listed while the files are the same: a forged entry shows.
  auto forge = [&](unsigned mode, std::int64_t later = 0, std::string derivation = "") {
    auto forged = *kept;
    forged.entries["hello"].releases = views_cache::encode_releases(
        {ListedRelease{"7.7.7", ReleaseStatus::kGood, "current", "x", false, 1}});
    forged.written += later;
    if (!derivation.empty()) forged.derivation = derivation;
    auto bytes = views_cache::encode(forged);
    ::unlink(cache.c_str());
    write_file(cache, std::string(bytes.begin(), bytes.end()), mode);
  };
  forge(0644);
  EXPECT_EQ(versions(), std::vector<std::string>{"hello 7.7.7 current"});
  // ... but not one that others may write, one written by other code, or one from the future
  // (the clock was stepped back since: a file could now get the times an entry has).
  forge(0664);
  EXPECT_EQ(versions(), real);
  forge(0600, 0, "another build");
  EXPECT_EQ(versions(), real);
  forge(0600, 3600);
  EXPECT_EQ(versions(), real);
  // Garbage is ignored, and replaced; so is what a listing killed mid-write left, once old.
  write_file(cache, "\xa2garbage", 0600);
  const std::string old_leftover = t / "state/.views.cache.0123456789abcdef";
  const std::string new_leftover = t / "state/.views.cache.fedcba9876543210";
  write_file(old_leftover, "half");
  write_file(new_leftover, "half");
  struct timespec times[2] = {{0, UTIME_OMIT}, {std::time(nullptr) - 120, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, old_leftover.c_str(), times, 0), 0);
  EXPECT_EQ(versions(), real);
  EXPECT_TRUE(entries().has_value());
  EXPECT_FALSE(exists(old_leftover));
  EXPECT_TRUE(exists(new_leftover)) << "perhaps another listing's, being written";

  // state.json rewritten in place, same inode and size: seen.
  forge(0644);
  std::string text = read_file(app_root() + "/state.json");
  auto pos = text.find("\"pinned\": false");
  ASSERT_NE(pos, std::string::npos) << text;
  text.replace(pos, 15, "\"pinned\":  true");
  {
    std::ofstream out(app_root() + "/state.json", std::ios::in | std::ios::out | std::ios::binary);
    out << text;
  }
  EXPECT_EQ(versions(), (std::vector<std::string>{"hello 1.0.0 current pinned", "hello 1.1.0 "}));
  // An interrupted stage's journal (the state unchanged): the app needs recovery.
  forge(0644);
  write_file(app_root() + "/journal.json", R"({"op":"stage","txid":"deadbeef","versions":[]})");
  EXPECT_EQ(versions(), (std::vector<std::string>{"hello 1.0.0 current pinned recovering",
                                                  "hello 1.1.0  recovering"}));
  // `current` swapped behind the state's back.
  ::unlink((app_root() + "/journal.json").c_str());
  forge(0644);
  ::unlink((app_root() + "/current").c_str());
  ASSERT_EQ(::symlink("releases/1.1.0", (app_root() + "/current").c_str()), 0);
  EXPECT_EQ(versions(), (std::vector<std::string>{"hello 1.0.0 current pinned recovering",
                                                  "hello 1.1.0  recovering"}));
  // An app removed: gone from the listing and from the cache.
  ASSERT_TRUE(fs::remove_tree(AT_FDCWD, t / "state/apps/empty").ok());
  versions();
  EXPECT_EQ(entries()->entries.count("empty"), 0u);
}

// Enough apps for the listing to share taking their keys between two threads (views.cpp:
// take_keys): it lists what the same store lists without its cache, in the same order, read or
// from the cache; and of two apps that cannot be inspected it names the first, whichever thread
// met which.
TEST_F(AStore, ListsManyAppsAsWithoutItsCacheAndNamesTheFirstItCannotInspect) {
  ASSERT_TRUE(stage("1.0.0").ok());
  ASSERT_TRUE(stage("1.1.0").ok());
  for (int i = 0; i < 400; ++i) {
    char name[16];
    std::snprintf(name, sizeof name, "a%03d", i);
    copy_app(name);
  }
  auto listing = open_with([](StoreOptions& o) { o.persist_views = true; });
  auto plain = open_with([](StoreOptions& o) { o.persist_views = false; });
  ASSERT_TRUE(listing && plain);
  auto rows = [](Store& s) {
    auto v = s.views();
    EXPECT_TRUE(v.ok()) << v.error().message();
    std::vector<std::string> out;
    for (const auto& [app, view] : *v)
      for (const auto& r : view.releases)
        out.push_back(app + " " + r.version + " " + r.role);
    return out;
  };
  const auto expected = rows(*plain);
  ASSERT_EQ(expected.size(), 401u * 2);
  EXPECT_EQ(expected.front(), "a000 1.0.0 ");
  EXPECT_EQ(expected.back(), "hello 1.1.0 ");
  EXPECT_EQ(rows(*listing), expected) << "read";
  std::this_thread::sleep_for(std::chrono::milliseconds(3100));  // settled: kept in the cache
  EXPECT_EQ(rows(*listing), expected) << "read, then kept";
  ASSERT_TRUE(exists(t / "state/views.cache"));
  EXPECT_EQ(rows(*listing), expected) << "from the cache";

  for (const char* loop : {"a123", "a345"}) {
    const std::string path = t / ("state/apps/" + std::string(loop));
    ASSERT_TRUE(fs::remove_tree(AT_FDCWD, path).ok());
    ASSERT_EQ(::symlink(loop, path.c_str()), 0);  // fstatat: ELOOP
  }
  for (int i = 0; i < 20; ++i) {
    auto v = listing->views();
    ASSERT_FALSE(v.ok());
    EXPECT_NE(v.error().message().find("inspecting 'a123'"), std::string::npos)
        << v.error().message();
  }
}

TEST_F(AStore, ListsWithoutItsCacheWhenTheCacheCannotBeWritten) {
  ASSERT_TRUE(stage("1.0.0").ok());
  auto listing = open_with([](StoreOptions& o) { o.persist_views = true; });
  ASSERT_TRUE(listing);
  make_dirs(t / "state/views.cache");  // not a file: neither read nor replaced
  for (int i = 0; i < 2; ++i) {
    auto v = listing->views();
    ASSERT_TRUE(v.ok()) << v.error().message();
    ASSERT_EQ(v->size(), 1u);
    EXPECT_EQ((*v)[0].second.releases.at(0).version, "1.0.0");
  }
  struct stat sb {};
  ASSERT_EQ(::stat((t / "state/views.cache").c_str(), &sb), 0);
  EXPECT_TRUE(S_ISDIR(sb.st_mode));
}

// For the daemon's listings (cache_states), which inspect no app whose directory inotify watches
// and saw no change since its state was checked (docs/state.md).
class WatchedStates : public AStore {
 protected:
  void SetUp() override {
    AStore::SetUp();
    // inotify is used only where every change is made through this kernel.
    struct statfs sf {};
    ASSERT_EQ(::statfs(t.path().c_str(), &sf), 0);
    const auto type = static_cast<unsigned long>(sf.f_type);
    if (type != 0xEF53 && type != 0x01021994 && type != 0x58465342 && type != 0x9123683E &&
        type != 0xF2F52010 && type != 0x2FC12FC1)
      return skip("the test directory is not on ext2/3/4, tmpfs, xfs, btrfs, f2fs or zfs");
    UniqueFd probe(::inotify_init1(IN_CLOEXEC));
    if (!probe) return skip(std::string("no inotify instance: ") + std::strerror(errno));
    ASSERT_TRUE(stage("1.0.0").ok());
    cached = open_with([](StoreOptions& o) { o.cache_states = true; });
    ASSERT_TRUE(cached);
  }
  /// Skipped where watches are not used, except under CI=true (root, ext4): there, a failure.
  void skip(const std::string& why) { UPGRADED_SKIP_UNLESS_CI(why); }
  const std::string apps = t / "state/apps";
  std::optional<Store> cached;
  /// "app:pinned" of every app the daemon's store lists.
  std::vector<std::string> listing() {
    auto all = cached->states();
    EXPECT_TRUE(all.ok()) << all.error().message();
    std::vector<std::string> out;
    for (const auto& l : *all) {
      EXPECT_NE(l.state, nullptr) << l.app;
      if (l.state) out.push_back(l.app + ":" + (l.state->releases.at("1.0.0").pinned ? "p" : "-"));
    }
    return out;
  }
  /// Rewrites state.json at `path` in place, its size unchanged.
  void edit_pinned(const std::string& path, bool pinned) {
    std::string text = read_file(path);
    auto pos = text.find(pinned ? "\"pinned\": false" : "\"pinned\":  true");
    ASSERT_NE(pos, std::string::npos) << text;
    text.replace(pos, 15, pinned ? "\"pinned\":  true" : "\"pinned\": false");
    std::ofstream out(path, std::ios::in | std::ios::out | std::ios::binary);
    out << text;
  }
  void edit_in_place(const std::string& app, bool pinned) {
    edit_pinned(apps + "/" + app + "/state.json", pinned);
  }
  /// Two seconds after its last write a state is settled: cached, and served uninspected.
  static void settle() { std::this_thread::sleep_for(std::chrono::milliseconds(3100)); }
};

// Every change is seen all the same: in place, by rename, apps created, removed and renamed, and
// after the kernel dropped events.
TEST_F(WatchedStates, AreInspectedOnlyForTheAppsThatChanged) {
  for (const char* name : {"a1", "a2", "a3", "a4"})
    copy_app(name);
  make_dirs(t / "elsewhere");
  copy_app("../../elsewhere/linked-target");
  ASSERT_EQ(::symlink("../../elsewhere/linked-target", (apps + "/linked").c_str()), 0);
  const std::vector<std::string> all = {"a1:-", "a2:-", "a3:-", "a4:-", "hello:-", "linked:-"};

  settle();
  EXPECT_EQ(listing(), all);
  EXPECT_EQ(cached->states_inspected(), 6u) << "the first listing inspects every app";
  EXPECT_EQ(listing(), all);
  EXPECT_EQ(cached->states_inspected(), 1u) << "only the app behind a symlink (not watched)";

  // In place, same size: seen, and inspected until it has settled again.
  edit_in_place("a2", true);
  EXPECT_EQ(listing(),
            (std::vector<std::string>{"a1:-", "a2:p", "a3:-", "a4:-", "hello:-", "linked:-"}));
  EXPECT_EQ(cached->states_inspected(), 2u);
  settle();
  listing();
  EXPECT_EQ(listing(),
            (std::vector<std::string>{"a1:-", "a2:p", "a3:-", "a4:-", "hello:-", "linked:-"}));
  EXPECT_EQ(cached->states_inspected(), 1u);
  // Replaced by a rename, as every write of the store does.
  {
    auto lock = store->lock("hello");
    ASSERT_TRUE(store->set_pinned(*lock, "1.0.0", true).ok());
  }
  EXPECT_EQ(listing(),
            (std::vector<std::string>{"a1:-", "a2:p", "a3:-", "a4:-", "hello:p", "linked:-"}));
  // Created, removed, renamed (the watch follows the directory: a change under its new name
  // is seen), and the symlinked app changed.
  copy_app("a5");
  ASSERT_TRUE(fs::remove_tree(AT_FDCWD, apps + "/a1").ok());
  ASSERT_EQ(::rename((apps + "/a3").c_str(), (apps + "/b3").c_str()), 0);
  edit_in_place("linked", true);
  EXPECT_EQ(listing(),
            (std::vector<std::string>{"a2:p", "a4:-", "a5:p", "b3:-", "hello:p", "linked:p"}));
  settle();
  listing();
  EXPECT_EQ(cached->states_inspected(), 3u)
      << "a5 and hello, written within two seconds of the listing before, are inspected once "
         "more now that they settled; linked, every time";
  listing();
  EXPECT_EQ(cached->states_inspected(), 1u);
  edit_in_place("b3", true);
  EXPECT_EQ(listing(),
            (std::vector<std::string>{"a2:p", "a4:-", "a5:p", "b3:p", "hello:p", "linked:p"}));
  settle();
  listing();

  // More events than the kernel queues (it drops the rest and says so): everything inspected.
  // Two files in turn: the kernel merges an event identical to the one before it.
  std::ifstream limit("/proc/sys/fs/inotify/max_queued_events");
  unsigned max_events = 16384;
  limit >> max_events;
  if (max_events >= 1u << 20)
    return skip("fs.inotify.max_queued_events is " + std::to_string(max_events) +
                ": too many to overflow");
  write_file(apps + "/a2/x", "");
  write_file(apps + "/a2/y", "");
  for (unsigned i = 0; i <= max_events / 2 + 1; ++i) {
    ASSERT_EQ(::utimensat(AT_FDCWD, (apps + "/a2/x").c_str(), nullptr, 0), 0);
    ASSERT_EQ(::utimensat(AT_FDCWD, (apps + "/a2/y").c_str(), nullptr, 0), 0);
  }
  edit_in_place("a4", true);
  EXPECT_EQ(listing(),
            (std::vector<std::string>{"a2:p", "a4:p", "a5:p", "b3:p", "hello:p", "linked:p"}));
  EXPECT_EQ(cached->states_inspected(), 6u);
}

// What no watch of an app directory covers is inspected every time: a state.json that is a
// symlink, or that has a second name elsewhere. An apps directory replaced by another is watched
// afresh; an app directory created before its state was written is listed once it is.
TEST_F(WatchedStates, AreInspectedWhereNoWatchCoversAChange) {
  make_dirs(t / "elsewhere");
  copy_app("sl");
  copy_app("hl");
  ASSERT_EQ(::rename((apps + "/sl/state.json").c_str(), (t / "elsewhere/sl.json").c_str()), 0);
  ASSERT_EQ(::symlink("../../../elsewhere/sl.json", (apps + "/sl/state.json").c_str()), 0);
  ASSERT_EQ(::link((apps + "/hl/state.json").c_str(), (t / "elsewhere/hl.json").c_str()), 0);
  make_dirs(apps + "/late");
  settle();
  EXPECT_EQ(listing(), (std::vector<std::string>{"hello:-", "hl:-", "sl:-"}));
  EXPECT_EQ(listing(), (std::vector<std::string>{"hello:-", "hl:-", "sl:-"}));
  EXPECT_EQ(cached->states_inspected(), 3u) << "hl, sl and late (no state yet)";
  edit_pinned(t / "elsewhere/sl.json", true);
  edit_pinned(t / "elsewhere/hl.json", true);
  EXPECT_EQ(listing(), (std::vector<std::string>{"hello:-", "hl:p", "sl:p"}));
  std::filesystem::copy_file(app_root() + "/state.json", apps + "/late/state.json");
  EXPECT_EQ(listing(), (std::vector<std::string>{"hello:-", "hl:p", "late:-", "sl:p"}));

  // The apps directory replaced by a copy: the copy is what is listed, and watched.
  ASSERT_EQ(::rename(apps.c_str(), (apps + ".old").c_str()), 0);
  copy_tree(apps + ".old", apps);
  ASSERT_TRUE(fs::remove_tree(AT_FDCWD, apps + "/late").ok());
  EXPECT_EQ(listing(), (std::vector<std::string>{"hello:-", "hl:p", "sl:p"}));
  settle();
  listing();
  listing();
  EXPECT_EQ(cached->states_inspected(), 1u) << "sl (the copy's hl is a file of its own)";
  edit_in_place("hello", true);
  edit_pinned(apps + ".old/hl/state.json", false);  // the old directory's: nothing listed
  EXPECT_EQ(listing(), (std::vector<std::string>{"hello:p", "hl:p", "sl:p"}));

  // An app directory replaced by another under the same name: the new one is watched.
  ASSERT_EQ(::rename((apps + "/hello").c_str(), (t / "hello-old").c_str()), 0);
  copy_tree(t / "hello-old", t / "hello-new");
  ASSERT_EQ(::rename((t / "hello-new").c_str(), (apps + "/hello").c_str()), 0);
  EXPECT_EQ(listing(), (std::vector<std::string>{"hello:p", "hl:p", "sl:p"}));
  settle();
  listing();
  listing();
  EXPECT_EQ(cached->states_inspected(), 1u) << "sl";
  edit_in_place("hello", false);
  EXPECT_EQ(listing(), (std::vector<std::string>{"hello:-", "hl:p", "sl:p"}));
}

TEST_F(AStore, NeverTouchesAnotherAppWhenLockingOne) {
  ASSERT_TRUE(stage("1.0.0").ok());
  make_dirs(t / "state/apps/other/releases/.partial.cafe/tree");
  write_file(t / "state/apps/other/journal.json", "{not json");
  // Another process holds the other app's lock: locking this one neither waits nor fails.
  UniqueFd other(
      ::open((t / "state/apps/other/.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_EQ(::flock(other.get(), LOCK_EX), 0);
  auto before = snapshot(t / "state/apps/other", false);
  auto s = Store::open(fixture().options(t / "state"));
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(s->lock("hello").ok());
  EXPECT_EQ(snapshot(t / "state/apps/other", false), before);
  auto busy = s->lock("other");
  ASSERT_FALSE(busy.ok());
  EXPECT_EQ(busy.error().code(), ErrorCode::kBusy);
}

TEST_F(AStore, WaitsForABusyAppsLockAsLongAsAskedAndNoLonger) {
  ASSERT_TRUE(stage("1.0.0").ok());
  UniqueFd holder(::open((app_root() + "/.lock").c_str(), O_RDWR | O_CLOEXEC));
  ASSERT_EQ(::flock(holder.get(), LOCK_EX), 0);
  auto t0 = std::chrono::steady_clock::now();
  auto refused = store->lock("hello", std::chrono::milliseconds(200));
  auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), ErrorCode::kBusy);
  EXPECT_NE(refused.error().message().find("waited 0.2"), std::string::npos)
      << refused.error().message();
  EXPECT_GE(waited, std::chrono::milliseconds(200));
  EXPECT_LT(waited, std::chrono::milliseconds(2000));
  // Released while waiting: taken.
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    holder.reset();
  });
  auto taken = store->lock("hello", std::chrono::seconds(10));
  release.join();
  EXPECT_TRUE(taken.ok()) << taken.error().message();
}

TEST_F(AStore, KeepsServingOtherAppsWhenOneAppsStateIsCorrupt) {
  ASSERT_TRUE(stage("1.0.0").ok());
  auto o = fixture().options(t / "state");
  make_dirs(t / "state/apps/broken");
  write_file(t / "state/apps/broken/state.json", "{not json");
  auto reopened = Store::open(o);
  ASSERT_TRUE(reopened.ok()) << reopened.error().message();
  ASSERT_TRUE(reopened->recover_all().ok());
  ASSERT_EQ(reopened->recovery_errors().count("broken"), 1u);
  EXPECT_NE(reopened->recovery_errors().at("broken").message().find("corrupt"), std::string::npos);
  EXPECT_FALSE(reopened->lock("broken").ok());
  EXPECT_TRUE(reopened->lock("hello").ok());
  EXPECT_EQ(read_file(t / "state/apps/broken/state.json"), "{not json") << "nothing is guessed";
}

TEST_F(AStore, NeverDeletesReleasesBecauseTheStateFileIsMissing) {
  ASSERT_TRUE(stage("1.0.0").ok());
  ASSERT_EQ(::unlink((app_root() + "/state.json").c_str()), 0);
  auto reopened = Store::open(fixture().options(t / "state"));
  ASSERT_TRUE(reopened.ok() && reopened->recover_all().ok());
  EXPECT_TRUE(exists(app_root() + "/releases/1.0.0/bin/hello"));
}

// The listing ListAllReleasesByFileDescriptor hands over (docs/dbus-api.md): what the daemon
// writes decodes to the same apps; anything it never writes is refused whole.
TEST(Listing, RoundTripsAndRefusesWhatTheDaemonNeverWrites) {
  using nlohmann::json;
  const std::vector<ListedRelease> a_releases = {
      {"1.0.0", ReleaseStatus::kGood, "previous", "2026-11-21T10:00:00Z", false, 24576},
      {"1.1.0", ReleaseStatus::kActive, "current", "2026-11-21T11:00:00Z", true, 25600}};
  const std::vector<ListedRelease> b_releases = {
      {"2.0.0", ReleaseStatus::kStaged, "", "2026-11-22T10:00:00Z", false, 1}};
  auto a = views_cache::encode_releases(a_releases), b = views_cache::encode_releases(b_releases);
  auto bytes = views_cache::encode_listing({{"alpha", false, a}, {"beta", true, b}});
  auto decoded = views_cache::decode_listing(bytes);
  ASSERT_TRUE(decoded.has_value());
  EXPECT_EQ(*decoded, (std::vector<views_cache::ListedApp>{{"alpha", false, a_releases},
                                                           {"beta", true, b_releases}}));
  auto none = views_cache::decode_listing(views_cache::encode_listing({}));
  ASSERT_TRUE(none.has_value());
  EXPECT_TRUE(none->empty());

  auto refused = [](const std::vector<std::uint8_t>& doc) {
    return !views_cache::decode_listing(doc).has_value();
  };
  EXPECT_TRUE(refused(views_cache::encode_listing({{"beta", true, b}, {"alpha", false, a}})))
      << "apps out of order";
  EXPECT_TRUE(refused(views_cache::encode_listing({{"alpha", false, a}, {"alpha", false, a}})))
      << "an app twice";
  EXPECT_TRUE(refused(views_cache::encode_listing({{"../etc", false, a}}))) << "a bad app name";
  auto bad_version =
      views_cache::encode_releases({{"1.0.0\n\033[2J", ReleaseStatus::kGood, "", "", false, 1}});
  EXPECT_TRUE(refused(views_cache::encode_listing({{"alpha", false, bad_version}})));
  for (const std::string role : {"current\033[2J", "other", "\n"}) {
    auto shown = views_cache::encode_releases(
        {{"1.0.0", ReleaseStatus::kGood, role, "2026-11-21T10:00:00Z", false, 1}});
    EXPECT_TRUE(refused(views_cache::encode_listing({{"alpha", false, shown}}))) << role;
  }
  // staged_at is whatever state.json says (the printer makes it printable).
  auto odd_time = views_cache::encode_releases(
      {{"1.0.0", ReleaseStatus::kGood, "", "2026-11-21 10:00\033[2J", false, 1}});
  auto odd = views_cache::decode_listing(views_cache::encode_listing({{"alpha", false, odd_time}}));
  ASSERT_TRUE(odd.has_value());
  EXPECT_EQ(odd->at(0).releases.at(0).staged_at, "2026-11-21 10:00\033[2J");
  const std::uint8_t garbage[] = {0xff, 0x00};
  EXPECT_TRUE(refused(views_cache::encode_listing({{"alpha", false, garbage}})));
  auto with_tail = bytes;
  with_tail.push_back(0);
  EXPECT_TRUE(refused(with_tail)) << "a byte after the document";
  EXPECT_TRUE(refused({bytes.begin(), bytes.end() - 1})) << "truncated";
  auto shaped = [&](json doc) { return refused(json::to_cbor(doc)); };
  auto entry = json::array({"alpha", false, json::binary(a)});
  EXPECT_TRUE(shaped(json::array({2, json::array({entry})}))) << "another format";
  EXPECT_TRUE(shaped(json::array({-1, json::array({entry})})));
  EXPECT_TRUE(shaped(json::array({1, json::array({entry}), 1}))) << "a third value";
  EXPECT_TRUE(shaped(json::array({1})));
  EXPECT_TRUE(shaped(json::array({1, json::array({json::array({"alpha", false})})})));
  EXPECT_TRUE(
      shaped(json::array({1, json::array({json::array({"alpha", false, json::binary(a), 1})})})));
  EXPECT_TRUE(shaped(json::array({1, json::array({json::array({"alpha", 0, json::binary(a)})})})));
  EXPECT_TRUE(shaped(json::array({1, json::array({json::array({"alpha", false, a})})})))
      << "releases as an array, not a byte string";
  EXPECT_TRUE(shaped(json{{"format", 1}, {"apps", json::array()}}));
  EXPECT_FALSE(shaped(json::array({1, json::array({entry})}))) << "the control";
}
