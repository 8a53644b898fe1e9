#include "config.h"

#include <dirent.h>
#include <sys/stat.h>

#include <toml++/toml.h>
#include <algorithm>

#include "upgraded/policy/names.h"

namespace upgraded::daemon {
namespace {

Error bad(const std::string& file, const toml::node& node, const std::string& what) {
  return Error(ErrorCode::kInvalidArgument,
               file + ":" + std::to_string(node.source().begin.line) + ": " + what);
}

Result<std::uint64_t> unsigned_value(const std::string& file, const std::string& key,
                                     const toml::node& node, std::uint64_t min, std::uint64_t max) {
  auto v = node.value_exact<std::int64_t>();
  if (!v || *v < 0 || static_cast<std::uint64_t>(*v) < min || static_cast<std::uint64_t>(*v) > max)
    return bad(
        file, node,
        key + " must be an integer from " + std::to_string(min) + " to " + std::to_string(max));
  return static_cast<std::uint64_t>(*v);
}

Result<bool> bool_value(const std::string& file, const std::string& key, const toml::node& node) {
  auto v = node.value_exact<bool>();
  if (!v) return bad(file, node, key + " must be true or false");
  return *v;
}

Result<void> apply(Config& c, const std::string& file, const toml::table& doc) {
  constexpr std::uint64_t kMax = std::uint64_t(1) << 62;
  for (auto&& [section_key, section] : doc) {
    std::string name(section_key.str());
    const toml::table* t = section.as_table();
    if (!t) return bad(file, section, "'" + name + "' must be a section ([" + name + "])");
    if (name == "apps") {
      for (auto&& [app_key, app_node] : *t) {
        std::string app(app_key.str());
        if (auto r = policy::validate_app_name(app); !r)
          return bad(file, app_node, r.error().message());
        const toml::table* at = app_node.as_table();
        if (!at) return bad(file, app_node, "[apps." + app + "] must be a section");
        for (auto&& [k, v] : *at) {
          if (k.str() != "root")
            return bad(file, v, "unknown key '" + std::string(k.str()) + "' in [apps." + app + "]");
          auto s = v.value_exact<std::string>();
          if (!s || s->empty() || s->front() != '/' || s->find("/../") != std::string::npos ||
              s->ends_with("/.."))
            return bad(file, v, "apps." + app + ".root must be an absolute path without '..'");
          c.app_roots[app] = *s;
        }
      }
      continue;
    }
    for (auto&& [k, v] : *t) {
      std::string key = name + "." + std::string(k.str());
      auto& l = c.extract.limits;
      auto number = [&](std::uint64_t min, std::uint64_t max) {
        return unsigned_value(file, key, v, min, max);
      };
      if (key == "trust.threshold") {
        auto n = number(1, 64);
        if (!n) return n.error();
        c.threshold = static_cast<unsigned>(*n);
      } else if (key == "store.keep") {
        auto n = number(1, 10000);
        if (!n) return n.error();
        c.keep = *n;
      } else if (key == "store.max_bytes") {
        auto n = number(0, kMax);
        if (!n) return n.error();
        c.max_bytes = *n == 0 ? std::nullopt : std::optional<std::uint64_t>(*n);
      } else if (key == "activation.job_timeout_s") {
        auto n = number(1, 86400);
        if (!n) return n.error();
        c.job_timeout_s = static_cast<std::uint32_t>(*n);
      } else if (key == "extract.max_entries") {
        auto n = number(1, kMax);
        if (!n) return n.error();
        l.max_entries = *n;
      } else if (key == "extract.max_total_bytes") {
        auto n = number(1, kMax);
        if (!n) return n.error();
        l.max_total_bytes = *n;
      } else if (key == "extract.max_file_size") {
        auto n = number(1, kMax);
        if (!n) return n.error();
        l.max_file_size = *n;
      } else if (key == "extract.max_expansion_ratio") {
        auto n = number(1, kMax);
        if (!n) return n.error();
        l.max_expansion_ratio = *n;
      } else if (key == "extract.free_space_reserve") {
        auto n = number(0, kMax);
        if (!n) return n.error();
        l.free_space_reserve = *n;
      } else if (key == "extract.free_inode_reserve") {
        auto n = number(0, kMax);
        if (!n) return n.error();
        l.free_inode_reserve = *n;
      } else if (key == "extract.helper_ids") {
        auto n = number(1000, 4294967294ULL - Config::kHelperIds);
        if (!n) return n.error();
        c.helper_ids = static_cast<std::uint32_t>(*n);
      } else if (key == "extract.strip_unsafe_modes") {
        auto b = bool_value(file, key, v);
        if (!b) return b.error();
        c.extract.unsafe_modes =
            *b ? artifact::UnsafeModes::kStrip : artifact::UnsafeModes::kRefuse;
      } else {
        return bad(file, v, "unknown setting '" + key + "'");
      }
    }
  }
  return {};
}

Result<void> read_file_into(Config& c, const std::string& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) {
    if (errno == ENOENT) return {};
    return system_error(errno, "reading " + file);
  }
  try {
    toml::table doc = toml::parse_file(file);
    c.files.push_back(file);
    return apply(c, file, doc);
  } catch (const toml::parse_error& e) {
    return Error(ErrorCode::kInvalidArgument, file + ":" + std::to_string(e.source().begin.line) +
                                                  ": " + std::string(e.description()));
  }
}

}  // namespace

std::string Config::path(const std::string& absolute) const {
  if (root == "/") return absolute;
  return root + absolute;
}

store::StoreOptions Config::store_options() const {
  store::StoreOptions so;
  so.root = state_dir();
  for (const auto& [app, app_root] : app_roots)
    so.app_roots[app] = path(app_root);
  so.extract = extract;
  return so;
}

Result<Config> load_config(const std::string& root) {
  Config c;
  c.root = root.empty() ? "/" : root;
  while (c.root.size() > 1 && c.root.back() == '/')
    c.root.pop_back();
  UPGRADED_TRY(read_file_into(c, c.config_dir() + "/upgraded.conf"));
  std::string dropins = c.config_dir() + "/upgraded.conf.d";
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dropins.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n.size() > 5 && n.ends_with(".conf") && n.front() != '.') names.push_back(n);
    }
    ::closedir(d);
  } else if (errno != ENOENT) {
    return system_error(errno, "reading " + dropins);
  }
  std::sort(names.begin(), names.end());
  for (const auto& n : names)
    UPGRADED_TRY(read_file_into(c, dropins + "/" + n));
  return c;
}

}  // namespace upgraded::daemon
