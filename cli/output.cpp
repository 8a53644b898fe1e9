#include "output.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace upgradectl {
namespace {

// Width on screen of UTF-8 text without escape sequences (one column per code point).
std::size_t visible_width(std::string_view s) {
  // Plain ASCII, the common case, is one column per byte.
  if (std::all_of(s.begin(), s.end(), [](char c) { return c != '\033' && (c & 0x80) == 0; }))
    return s.size();
  std::size_t n = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\033') {
      while (i < s.size() && s[i] != 'm')
        ++i;
      continue;
    }
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) ++n;
  }
  return n;
}

}  // namespace

bool use_color() {
  static const bool color = ::isatty(STDOUT_FILENO) && !std::getenv("NO_COLOR");
  return color;
}

std::string human_size(std::uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  if (u == 0) return std::to_string(n) + " B";  // without formatting a double
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  return buf;
}

std::string colored_status(const std::string& s) {
  if (!use_color()) return s;
  if (s == "good" || s == "done") return "\033[32m" + s + "\033[0m";
  if (s == "bad" || s == "failed") return "\033[31m" + s + "\033[0m";
  if (s == "rolled-back") return "\033[33m" + s + "\033[0m";
  return s;
}

Table::Table(std::initializer_list<std::string_view> header)
    : m_columns(header.size()), m_width(header.size(), 0) {
  append(header);
}

void Table::add(std::initializer_list<std::string_view> row) {
  append(row);
  ++m_rows;
}

void Table::append(std::initializer_list<std::string_view> row) {
  auto cell = row.begin();
  for (std::size_t i = 0; i < m_columns; ++i) {
    std::size_t width = 0;
    if (cell != row.end()) {
      m_text.append(*cell);
      width = visible_width(*cell);
      m_width[i] = std::max(m_width[i], width);
      ++cell;
    }
    m_ends.push_back(static_cast<std::uint32_t>(m_text.size()));
    m_cell_width.push_back(static_cast<std::uint32_t>(width));
  }
}

void Table::print() const {
  std::string line;
  std::size_t start = 0;
  for (std::size_t r = 0; r <= m_rows; ++r) {
    line.clear();
    if (r == 0 && use_color()) line += "\033[1m";
    for (std::size_t i = 0; i < m_columns; ++i) {
      std::size_t end = m_ends[r * m_columns + i];
      std::string_view cell(m_text.data() + start, end - start);
      start = end;
      line += cell;
      if (i + 1 < m_columns) line.append(m_width[i] - m_cell_width[r * m_columns + i] + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ')
      line.pop_back();
    if (r == 0 && use_color()) line += "\033[0m";
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stdout);
  }
}

namespace {

// The length of the first control character (C0, DEL, or a C1 as UTF-8: 0xC2 0x80-0x9F) at
// `i` in `s`, or 0.
std::size_t control_at(std::string_view s, std::size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x20 || c == 0x7f) return 1;
  if (c == 0xc2 && i + 1 < s.size() && static_cast<unsigned char>(s[i + 1]) >= 0x80 &&
      static_cast<unsigned char>(s[i + 1]) <= 0x9f)
    return 2;
  return 0;
}

}  // namespace

std::string_view printable(std::string_view s, std::string& scratch) {
  std::size_t i = 0;
  while (i < s.size() && control_at(s, i) == 0)
    ++i;
  if (i == s.size()) return s;  // the common case: nothing to replace, nothing copied
  scratch.assign(s.substr(0, i));
  while (i < s.size()) {
    if (std::size_t n = control_at(s, i)) {
      scratch += '?';
      i += n;
    } else {
      scratch += s[i++];
    }
  }
  return scratch;
}

void add_release_row(bool as_json, nlohmann::json& out, Table& table, const std::string& app,
                     const std::string& version, const std::string& status, const std::string& role,
                     const std::string& staged_at, bool pinned, std::uint64_t size,
                     bool pre_finalized) {
  if (!as_json) {
    // Thousands of rows: a cell is copied only when it must be changed.
    std::string a, v, s, r, t;
    std::string_view shown_status = printable(status, s);
    std::string colored;
    if (use_color()) shown_status = colored = colored_status(std::string(shown_status));
    std::string_view shown_role = printable(role, r);
    std::string marked;
    if (pre_finalized) shown_role = marked = std::string(shown_role) + " (pre-finalized)";
    table.add({printable(app, a), printable(version, v), shown_status, shown_role,
               printable(staged_at, t), pinned ? "yes" : "", human_size(size)});
    return;
  }
  out.push_back({{"app", app},
                 {"version", version},
                 {"status", status},
                 {"role", role},
                 {"staged_at", staged_at},
                 {"pinned", pinned},
                 {"size", size},
                 {"pre_finalized", pre_finalized}});
}

void print_rows(bool json, const nlohmann::json& out, const Table& table,
                const std::string& empty) {
  if (json)
    std::printf("%s\n", out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  else if (table.empty())
    std::printf("%s\n", empty.c_str());
  else
    table.print();
}

Progress::Progress(std::string what, bool quiet)
    : m_what(std::move(what)), m_quiet(quiet), m_tty(::isatty(STDERR_FILENO)) {}

void Progress::update(const std::string& step, unsigned percent) {
  std::lock_guard lock(m_mutex);
  if (m_quiet) return;
  if (m_tty) {
    constexpr unsigned kWidth = 30;
    unsigned filled = std::min(percent, 100u) * kWidth / 100;
    std::fprintf(stderr, "\r\033[K%s [%s%s] %3u%% %s", m_what.c_str(),
                 std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
                 percent, step.c_str());
    m_drawn = true;
  } else if (step != m_last_step) {
    std::fprintf(stderr, "%s: %s (%u%%)\n", m_what.c_str(), step.c_str(), percent);
  }
  m_last_step = step;
}

void Progress::finish(bool ok) {
  std::lock_guard lock(m_mutex);
  if (m_quiet) return;
  if (m_tty && m_drawn) std::fprintf(stderr, "\r\033[K");
  if (ok && (m_tty || m_last_step != "done")) std::fprintf(stderr, "%s: done\n", m_what.c_str());
}

}  // namespace upgradectl
