#include "support/store_fixture.h"

#include <fcntl.h>
#include <unistd.h>

#include <stdexcept>

#include "upgraded/artifact/packer.h"
#include "upgraded/fs/durable.h"
#include "upgraded/policy/version.h"

namespace upgraded::test {

StoreFixture::StoreFixture(std::vector<std::string> versions) : m_key(make_key(m_dir, "release")) {
  make_dirs(m_dir / "keys");
  write_file(m_dir / "keys/release.pem", read_file(m_key.public_path));
  m_ring = keyring_of({m_key});
  for (const auto& v : versions) {
    std::string src = m_dir / ("src-" + v);
    make_dirs(src + "/bin");
    make_dirs(src + "/share/doc");
    write_file(src + "/bin/hello", "#!/bin/sh\necho hello " + v + "\n", 0755);
    std::string data;
    for (int i = 0; i < 2000; ++i)
      data += v + ":" + std::to_string(i) + "\n";
    write_file(src + "/share/data", data);
    write_file(src + "/share/doc/VERSION", v + "\n");
    ::symlink("../share/doc/VERSION", (src + "/bin/VERSION").c_str());
    artifact::PackOptions o;
    o.key_paths = {m_key.private_path};
    o.app = "hello";
    o.version = v;
    o.output = artifact(v);
    o.source_dir = src;
    o.created = 1700000000;
    auto r = artifact::pack(o);
    if (!r) throw std::runtime_error(r.error().message());
  }
  auto ref = store::Store::open(options(m_dir / "reference"));
  if (!ref) throw std::runtime_error(ref.error().message());
  for (const auto& v : versions) {
    stage(*ref, v);
    m_trees[v] = tree_hash(ref->app_root("hello") + "/releases/" + v);
  }
}

store::StoreOptions StoreFixture::options(const std::string& root) const {
  store::StoreOptions o;
  o.root = root;
  o.extract.limits.free_space_reserve = 0;
  return o;
}

void StoreFixture::stage(const store::Store& store, const std::string& version) const {
  UniqueFd fd(::open(artifact(version).c_str(), O_RDONLY | O_CLOEXEC));
  auto r = store.stage(fd.get(), m_ring, artifact::TrustPolicy{});
  if (!r) throw std::runtime_error("staging " + version + ": " + r.error().message());
}

std::vector<std::string> check_store_invariants(const std::string& app_root,
                                                const std::map<std::string, std::string>& trees,
                                                const std::optional<std::string>& floor_before) {
  std::vector<std::string> bad;
  if (!exists(app_root + "/state.json")) {
    // An app whose first stage never committed: nothing of it may remain.
    for (const auto& [path, desc] : snapshot(app_root, false))
      if (path != "." && path != ".lock" && path != "releases" && path != "manifests" &&
          path != "staging")
        bad.push_back("no state.json, but " + path + " exists");
    return bad;
  }
  auto text = read_file(app_root + "/state.json");
  auto st = store::parse_state(text);
  if (!st) {
    bad.push_back("state.json: " + st.error().message());
    return bad;
  }
  char buf[4096];
  ssize_t n = ::readlink((app_root + "/current").c_str(), buf, sizeof buf);
  if (st->current) {
    std::string want = "releases/" + *st->current;
    if (n < 0)
      bad.push_back("current is missing, state says " + *st->current);
    else if (std::string(buf, static_cast<std::size_t>(n)) != want)
      bad.push_back("current -> " + std::string(buf, static_cast<std::size_t>(n)) +
                    ", state says " + want);
    auto it = trees.find(*st->current);
    if (it == trees.end())
      bad.push_back("current names an unknown version");
    else if (tree_hash(app_root + "/" + want) != it->second)
      bad.push_back("the tree of current " + *st->current + " is not complete/exact");
  } else if (n >= 0 || exists(app_root + "/current")) {
    bad.push_back("current exists but state has no current release");
  }
  for (const auto& [v, rec] : st->releases) {
    if (!exists(app_root + "/releases/" + v)) bad.push_back("release " + v + " has no tree");
    if (!exists(app_root + "/manifests/" + v + ".json"))
      bad.push_back("release " + v + " has no manifest");
    auto it = trees.find(v);
    if (it != trees.end() && tree_hash(app_root + "/releases/" + v) != it->second)
      bad.push_back("the tree of " + v + " is not exact");
  }
  for (const auto& [path, desc] : snapshot(app_root, false)) {
    if (path.rfind("releases/", 0) == 0 && path.find('/', 9) == std::string::npos &&
        !st->releases.count(path.substr(9)))
      bad.push_back("orphan tree " + path);
    if (path.rfind("manifests/", 0) == 0 && path.ends_with(".json") &&
        !st->releases.count(path.substr(10, path.size() - 15)))
      bad.push_back("orphan manifest " + path);
    if (path == "journal.json" || path == "current.new") bad.push_back("leftover " + path);
    if (path.find(".tmp.") != std::string::npos) bad.push_back("leftover " + path);
  }
  if (floor_before && (!st->floor || policy::compare_versions(*st->floor, *floor_before) < 0))
    bad.push_back("the floor went down");
  return bad;
}

}  // namespace upgraded::test
