// upgraded.conf and its drop-ins: defaults, overrides in order, and refusals that name the file
// and line.

#include <gtest/gtest.h>

#include "config.h"
#include "support/test_dir.h"

using namespace upgraded;
using namespace upgraded::test;

namespace {

class DaemonConfig : public ::testing::Test {
 protected:
  void SetUp() override { make_dirs(t / "etc/upgraded/upgraded.conf.d"); }
  void conf(const std::string& name, const std::string& text) {
    write_file(t / ("etc/upgraded/" + name), text);
  }
  TempDir t;
};

}  // namespace

TEST_F(DaemonConfig, DefaultsWithoutAnyFileAndPathsUnderTheRoot) {
  auto c = daemon::load_config(t.path());
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_TRUE(c->files.empty());
  EXPECT_EQ(c->threshold, 1u);
  EXPECT_EQ(c->keep, 3u);
  EXPECT_FALSE(c->max_bytes);
  EXPECT_EQ(c->keys_dir(), t / "etc/upgraded/keys.d");
  EXPECT_EQ(c->state_dir(), t / "var/lib/upgraded");
  auto host = daemon::load_config("/nonexistent-root-for-test");
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(daemon::Config{}.state_dir(), "/var/lib/upgraded");
}

TEST_F(DaemonConfig, DropInsOverrideKeyByKeyInLexicalOrder) {
  conf("upgraded.conf",
       "[trust]\nthreshold = 2\n[store]\nkeep = 5\nmax_bytes = 1000\n"
       "[apps.ozone]\nroot = \"/opt/ozone\"\n");
  conf("upgraded.conf.d/20-late.conf", "[store]\nkeep = 7\n");
  conf("upgraded.conf.d/10-early.conf",
       "[store]\nkeep = 6\n[activation]\njob_timeout_s = 30\n"
       "[limits]\nverifications = 2\nqueued_installs = 0\nauthorizations_per_user = 3\n");
  conf("upgraded.conf.d/ignored.txt", "this is not read");
  auto c = daemon::load_config(t.path());
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->threshold, 2u);
  EXPECT_EQ(c->keep, 7u);
  EXPECT_EQ(c->max_bytes, 1000u);
  EXPECT_EQ(c->job_timeout_s, 30u);
  EXPECT_EQ(c->verifications, 2u);
  EXPECT_EQ(c->queued_installs, 0u);
  EXPECT_EQ(c->authorizations_per_user, 3u);
  EXPECT_EQ(c->app_roots.at("ozone"), "/opt/ozone");
  ASSERT_EQ(c->files.size(), 3u);
  EXPECT_NE(c->files[1].find("10-early.conf"), std::string::npos);
}

TEST_F(DaemonConfig, AppPolicyForHooksAndFinalization) {
  conf("upgraded.conf",
       "[apps.db]\ndata_dirs = [\"/var/lib/db\", \"/var/log/db\"]\nuser = \"db\"\n"
       "group = \"db-data\"\nauto_finalize_after_s = 604800\n"
       "instances = [\"1\", \"eu-west:2\", \"a\\\\x2db\"]\nmax_unavailable = 2\n");
  conf("upgraded.conf.d/10.conf", "[apps.db]\ndata_dirs = [\"/srv/db\"]\n");
  auto c = daemon::load_config(t.path());
  ASSERT_TRUE(c.ok()) << c.error().message();
  const auto& p = c->app_policies.at("db");
  EXPECT_EQ(p.data_dirs, std::vector<std::string>{"/srv/db"});  // a drop-in replaces the list
  EXPECT_EQ(p.user, "db");
  EXPECT_EQ(p.group, "db-data");
  EXPECT_EQ(p.auto_finalize_after_s, 604800u);
  EXPECT_EQ(p.instances, (std::vector<std::string>{"1", "eu-west:2", "a\\x2db"}));
  EXPECT_EQ(p.max_unavailable, 2u);
  EXPECT_EQ(c->app_policies.count("web"), 0u);
  EXPECT_EQ(daemon::AppPolicy{}.max_unavailable, 1u) << "the default";
  EXPECT_FALSE(c->app_roots.count("db"));
}

TEST_F(DaemonConfig, RefusesUnknownKeysWrongTypesAndBadValuesNamingFileAndLine) {
  struct Case {
    std::string text, expect;
  } cases[] = {
      {"[store]\nkepp = 3\n", "upgraded.conf:2: unknown setting 'store.kepp'"},
      {"[trust]\nthreshold = \"2\"\n", "threshold must be an integer"},
      {"[trust]\nthreshold = 0\n", "threshold must be an integer from 1"},
      {"[limits]\nverifications = 0\n", "verifications must be an integer from 1 to 64"},
      {"[extract]\nstrip_unsafe_modes = 1\n", "must be true or false"},
      {"[apps.ozone]\nroot = \"opt/ozone\"\n", "must be an absolute path"},
      {"[apps.ozone]\nroot = \"/opt/../etc\"\n", "without '..'"},
      {"[apps.\"../x\"]\nroot = \"/opt/x\"\n", ""},
      {"[store\nkeep = 3\n", "upgraded.conf:1:"},
      {"[apps.db]\ndata_dirs = \"/var/lib/db\"\n", "must be an array of at most 64"},
      {"[apps.db]\ndata_dirs = [\"var/lib/db\"]\n", "apps.db.data_dirs must be an absolute path"},
      {"[apps.db]\ndata_dirs = [\"/var/lib/../../etc\"]\n", "without '..'"},
      {"[apps.db]\ndata_dirs = [\"/\"]\n", "must be a plain absolute path"},
      {"[apps.db]\ndata_dirs = [\"//\"]\n", "must be a plain absolute path"},
      {"[apps.db]\ndata_dirs = [\"/var//lib\"]\n", "must be a plain absolute path"},
      {"[apps.db]\ndata_dirs = [\"/var/./lib\"]\n", "must be a plain absolute path"},
      {"[apps.db]\ndata_dirs = [\"/var/lib/db/\"]\n", "must be a plain absolute path"},
      {"[apps.db]\ndata_dirs = [\"/var/lib/db\\u0001\"]\n", "must be a plain absolute path"},
      {"[apps.db]\ndata_dirs = [\"/var\"]\n", "overlaps the store (/var/lib/upgraded)"},
      {"[apps.db]\ndata_dirs = [\"/var/lib/upgraded/apps/db\"]\n", "overlaps the store"},
      {"[apps.db]\ndata_dirs = [\"/etc\"]\n", "overlaps the configuration"},
      {"[apps.db]\nroot = \"/opt/db\"\n[apps.x]\ndata_dirs = [\"/opt/db/releases\"]\n",
       "overlaps the store of db (/opt/db)"},
      {"[apps.db]\ndata_dirs = [1]\n", "must be an absolute path"},
      {"[apps.db]\nuser = \"root\\nUser=x\"\n", "must be a user or group name"},
      {"[apps.db]\ngroup = \"-x\"\n", "must be a user or group name"},
      {"[apps.db]\nuser = 0\n", "must be a user or group name"},
      {"[apps.db]\nauto_finalize_after_s = 0\n", "auto_finalize_after_s must be an integer from 1"},
      {"[apps.db]\nauto_finalize_after_s = -5\n", "auto_finalize_after_s"},
      {"[apps.db]\nhooks_user = \"db\"\n", "unknown key 'hooks_user' in [apps.db]"},
      {"[apps.db]\ninstances = \"1\"\n", "instances must be an array of 1 to 256"},
      {"[apps.db]\ninstances = []\n", "instances must be an array of 1 to 256"},
      {"[apps.db]\ninstances = [1]\n", "instances entries must be instance names"},
      {"[apps.db]\ninstances = [\"\"]\n", "instances entries must be instance names"},
      {"[apps.db]\ninstances = [\"a@b\"]\n", "instances entries must be instance names"},
      {"[apps.db]\ninstances = [\"a/b\"]\n", "instances entries must be instance names"},
      {"[apps.db]\ninstances = [\"" + std::string(65, 'x') + "\"]\n",
       "instances entries must be instance names of 1 to 64"},
      {"[apps.db]\ninstances = [\"1\", \"2\", \"1\"]\n", "apps.db.instances lists '1' twice"},
      {"[apps.db]\nmax_unavailable = 0\n", "max_unavailable must be an integer from 1 to 256"},
      {"[apps.db]\nmax_unavailable = 257\n", "max_unavailable must be an integer from 1 to 256"},
      {"[apps.db]\nmax_unavailable = \"2\"\n", "max_unavailable must be an integer"},
      {"threshold = 1\n", "must be a section"},
  };
  for (const auto& c : cases) {
    conf("upgraded.conf", c.text);
    auto r = daemon::load_config(t.path());
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(r.error().message().find(c.expect), std::string::npos)
        << c.text << " -> " << r.error().message();
  }
}
