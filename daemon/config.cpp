#include "config.h"

#include <dirent.h>
#include <sys/stat.h>

#include <toml++/toml.h>
#include <algorithm>
#include <cctype>

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

constexpr std::uint64_t kMax = std::uint64_t(1) << 62;

// Every numeric setting: its key, its range, and where it goes.
struct NumberSetting {
  const char* key;
  std::uint64_t min, max;
  void (*apply)(Config&, std::uint64_t);
};
const NumberSetting kNumberSettings[] = {
    {"trust.threshold", 1, 64, [](Config& c, std::uint64_t n) { c.threshold = unsigned(n); }},
    {"store.keep", 1, 10000, [](Config& c, std::uint64_t n) { c.keep = n; }},
    {"store.max_bytes", 0, kMax,
     [](Config& c, std::uint64_t n) {
       c.max_bytes = n == 0 ? std::nullopt : std::optional<std::uint64_t>(n);
     }},
    {"activation.job_timeout_s", 1, 86400,
     [](Config& c, std::uint64_t n) { c.job_timeout_s = std::uint32_t(n); }},
    {"extract.max_entries", 1, kMax,
     [](Config& c, std::uint64_t n) { c.extract.limits.max_entries = n; }},
    {"extract.max_total_bytes", 1, kMax,
     [](Config& c, std::uint64_t n) { c.extract.limits.max_total_bytes = n; }},
    {"extract.max_file_size", 1, kMax,
     [](Config& c, std::uint64_t n) { c.extract.limits.max_file_size = n; }},
    {"extract.max_expansion_ratio", 1, kMax,
     [](Config& c, std::uint64_t n) { c.extract.limits.max_expansion_ratio = n; }},
    {"extract.free_space_reserve", 0, kMax,
     [](Config& c, std::uint64_t n) { c.extract.limits.free_space_reserve = n; }},
    {"extract.free_inode_reserve", 0, kMax,
     [](Config& c, std::uint64_t n) { c.extract.limits.free_inode_reserve = n; }},
    {"limits.verifications", 1, 64,
     [](Config& c, std::uint64_t n) { c.verifications = std::uint32_t(n); }},
    {"limits.queued_installs", 0, 4096,
     [](Config& c, std::uint64_t n) { c.queued_installs = std::uint32_t(n); }},
    {"limits.authorizations_per_user", 1, 1024,
     [](Config& c, std::uint64_t n) { c.authorizations_per_user = std::uint32_t(n); }},
    {"extract.helper_ids", 1000, 4294967294ULL - Config::kHelperIds,
     [](Config& c, std::uint64_t n) { c.helper_ids = std::uint32_t(n); }},
};

// systemd's relaxed rule for User=/Group= names, minus what it allows only with warnings.
bool valid_account_name(const std::string& s) {
  if (s.empty() || s.size() > 32) return false;
  if (!std::isalpha(static_cast<unsigned char>(s[0])) && s[0] != '_') return false;
  for (char ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_' && ch != '.' && ch != '-')
      return false;
  return true;
}

// Hooks may write their app's data directories: never the daemon's own configuration or state,
// nor an app's store (its releases, state.json), nor anything containing them.
Result<void> check_data_dirs(const Config& c) {
  auto overlap = [](const std::string& a, const std::string& b) {
    return a == b || a.starts_with(b + "/") || b.starts_with(a + "/");
  };
  std::vector<std::pair<std::string, std::string>> kept{{"/etc/upgraded", "the configuration"},
                                                        {"/var/lib/upgraded", "the store"}};
  for (const auto& [app, r] : c.app_roots)
    kept.emplace_back(r, "the store of " + app);
  for (const auto& [app, p] : c.app_policies)
    for (const auto& d : p.data_dirs)
      for (const auto& [path, what] : kept)
        if (overlap(d, path))
          return Error(ErrorCode::kInvalidArgument, "apps." + app + ".data_dirs: '" + d +
                                                        "' overlaps " + what + " (" + path +
                                                        "), which hooks must not write");
  return {};
}

Result<void> apply(Config& c, const std::string& file, const toml::table& doc) {
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
        AppPolicy& policy = c.app_policies[app];
        for (auto&& [k, v] : *at) {
          const std::string key(k.str());
          const std::string where = "apps." + app + "." + key;
          auto absolute_path = [&](const toml::node& n) -> Result<std::string> {
            auto s = n.value_exact<std::string>();
            // Paths go to the C library, where a NUL ends them before what was checked here.
            if (s && s->find('\0') != std::string::npos)
              return bad(file, n, where + " contains a NUL character");
            if (!s || s->empty() || s->front() != '/' || s->find("/../") != std::string::npos ||
                s->ends_with("/.."))
              return bad(file, n, where + " must be an absolute path without '..'");
            return *s;
          };
          if (key == "root") {
            auto p = absolute_path(v);
            if (!p) return p.error();
            c.app_roots[app] = *p;
          } else if (key == "data_dirs") {
            const toml::array* a = v.as_array();
            if (!a || a->size() > 64)
              return bad(file, v, where + " must be an array of at most 64 absolute paths");
            policy.data_dirs.clear();
            for (auto&& item : *a) {
              auto p = absolute_path(item);
              if (!p) return p.error();
              // Each component a plain name: "//", "/./" and a trailing "/" would let systemd
              // simplify the path into something broader than it reads.
              bool plain = p->size() > 1 && p->back() != '/';
              for (std::size_t pos = 1; plain && pos <= p->size();) {
                auto next = p->find('/', pos);
                if (next == std::string::npos) next = p->size();
                std::string_view part(p->data() + pos, next - pos);
                plain = !part.empty() && part != "." && part != "..";
                pos = next + 1;
              }
              for (char ch : *p)
                plain = plain && static_cast<unsigned char>(ch) >= 0x20 && ch != 0x7f;
              if (!plain)
                return bad(file, item,
                           where +
                               " must be a plain absolute path: not '/', no empty, '.' or "
                               "'..' component, no trailing '/', no control character");
              policy.data_dirs.push_back(*p);
            }
          } else if (key == "user" || key == "group") {
            auto s = v.value_exact<std::string>();
            if (!s || !valid_account_name(*s))
              return bad(file, v,
                         where +
                             " must be a user or group name ([A-Za-z_][A-Za-z0-9_.-]*, at most 32 "
                             "characters)");
            (key == "user" ? policy.user : policy.group) = *s;
          } else if (key == "instances") {
            // Appended to a template's "name@" before its suffix: the characters of a unit
            // name but '@', each instance once.
            const toml::array* a = v.as_array();
            if (!a || a->empty() || a->size() > 256)
              return bad(file, v, where + " must be an array of 1 to 256 instance names");
            policy.instances.clear();
            for (auto&& item : *a) {
              auto s = item.value_exact<std::string>();
              bool ok = s && !s->empty() && s->size() <= 64;
              for (char ch : ok ? *s : std::string())
                ok = ok && (std::isalnum(static_cast<unsigned char>(ch)) ||
                            std::string_view(":_.\\-").find(ch) != std::string_view::npos);
              if (!ok)
                return bad(file, item,
                           where +
                               " entries must be instance names of 1 to 64 characters from "
                               "[A-Za-z0-9:_.\\-]");
              if (std::find(policy.instances.begin(), policy.instances.end(), *s) !=
                  policy.instances.end())
                return bad(file, item, where + " lists '" + *s + "' twice");
              policy.instances.push_back(*s);
            }
          } else if (key == "max_unavailable") {
            auto n = unsigned_value(file, where, v, 1, 256);
            if (!n) return n.error();
            policy.max_unavailable = static_cast<std::uint32_t>(*n);
          } else if (key == "auto_finalize_after_s") {
            auto n = unsigned_value(file, where, v, 1, 10ULL * 366 * 86400);
            if (!n) return n.error();
            policy.auto_finalize_after_s = *n;
          } else {
            return bad(file, v, "unknown key '" + key + "' in [apps." + app + "]");
          }
        }
      }
      continue;
    }
    for (auto&& [k, v] : *t) {
      std::string key = name + "." + std::string(k.str());
      if (key == "extract.strip_unsafe_modes") {
        auto b = bool_value(file, key, v);
        if (!b) return b.error();
        c.extract.unsafe_modes =
            *b ? artifact::UnsafeModes::kStrip : artifact::UnsafeModes::kRefuse;
        continue;
      }
      const NumberSetting* setting = nullptr;
      for (const auto& candidate : kNumberSettings)
        if (key == candidate.key) setting = &candidate;
      if (!setting) return bad(file, v, "unknown setting '" + key + "'");
      auto n = unsigned_value(file, key, v, setting->min, setting->max);
      if (!n) return n.error();
      setting->apply(c, *n);
    }
  }
  return {};
}

Error parse_failure(const std::string& file, const toml::parse_error& e) {
  return Error(ErrorCode::kInvalidArgument, file + ":" + std::to_string(e.source().begin.line) +
                                                ": " + std::string(e.description()));
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
    return parse_failure(file, e);
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
  // (data_dirs are host paths too: AppPolicy's callers take them under root with path())
  so.extract = extract;
  // Only the daemon lists the store again and again; the CLI sets this back (one-shot).
  so.cache_states = true;
  return so;
}

Result<void> apply_config_text(Config& config, std::string_view text, const std::string& file) {
  try {
    toml::table doc = toml::parse(text, file);
    return apply(config, file, doc);
  } catch (const toml::parse_error& e) {
    return parse_failure(file, e);
  }
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
  UPGRADED_TRY(check_data_dirs(c));
  return c;
}

}  // namespace upgraded::daemon
