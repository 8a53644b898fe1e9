#pragma once

// Output for people: aligned tables, colour only on a terminal (and never with NO_COLOR), and a
// progress line that redraws itself on a terminal and prints plain lines otherwise.

#include <cstdint>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace upgradectl {

/// True when stdout is a terminal and NO_COLOR is not set.
bool use_color();
std::string human_size(std::uint64_t bytes);
/// A release or history status, coloured on a terminal (good/done green, bad/failed red).
std::string colored_status(const std::string& status);

/// Rows of cells printed in aligned columns. The cells are kept in one buffer: a listing of
/// thousands of releases would otherwise allocate a string per cell.
class Table {
 public:
  explicit Table(std::initializer_list<std::string_view> header);
  /// A row of as many cells as the header has (missing ones are empty, extra ones dropped).
  void add(std::initializer_list<std::string_view> row);
  void print() const;
  bool empty() const { return m_rows == 0; }

 private:
  void append(std::initializer_list<std::string_view> row);
  std::size_t m_columns;
  std::size_t m_rows = 0;                   ///< not counting the header
  std::string m_text;                       ///< every cell, header first, one after the other
  std::vector<std::uint32_t> m_ends;        ///< where each cell ends in m_text
  std::vector<std::uint32_t> m_cell_width;  ///< each cell's visible_width
  std::vector<std::size_t> m_width;         ///< each column's width on a terminal
};

/// `s` with every control character (C0, DEL, C1) replaced by '?': a string from elsewhere that
/// a terminal can print but not act on. `s` itself when there is nothing to replace (no copy),
/// else the result, in `scratch`.
std::string_view printable(std::string_view s, std::string& scratch);

/// `upgradectl list`'s row for one release, to `out` (as_json: the stable schema of
/// docs/upgradectl.md) or to `table`: only the form that is printed is built (thousands of rows).
void add_release_row(bool as_json, nlohmann::json& out, Table& table, const std::string& app,
                     const std::string& version, const std::string& status, const std::string& role,
                     const std::string& staged_at, bool pinned, std::uint64_t size,
                     bool pre_finalized = false);
/// Prints `out` with --json, else `table`, or `empty` when the one to print has no rows.
void print_rows(bool json, const nlohmann::json& out, const Table& table, const std::string& empty);

/// A job's progress on stderr: a redrawn bar with the step's name on a terminal, one line per
/// step otherwise, nothing with `quiet`. Thread-safe (updates come from the bus thread).
class Progress {
 public:
  Progress(std::string what, bool quiet);
  void update(const std::string& step, unsigned percent);
  void finish(bool ok);

 private:
  std::mutex m_mutex;
  std::string m_what;
  bool m_quiet, m_tty;
  std::string m_last_step;
  bool m_drawn = false;
};

}  // namespace upgradectl
