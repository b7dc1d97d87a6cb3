#pragma once
/// \file
/// Logging. Rhine logs through spdlog's default logger; `init_logging` sets
/// it up once (level, optional file). Programs that link Rhine may log with
/// spdlog directly (`spdlog::info(...)`) and share the same sink and level.

#include <optional>
#include <string>
#include <string_view>

namespace rhine {

enum class LogLevel { trace, debug, info, warn, error, off };

/// Logging options. The level comes from, in order: `level` when set, the
/// environment variable RHINE_LOG_LEVEL, then `info`.
struct LogOptions {
  std::optional<LogLevel> level;
  /// Also append every message to this file (empty: terminal only).
  std::string file;
  /// Prefix each line with the process rank, for data-parallel runs (-1: no prefix).
  int rank = -1;
};

/// "trace", "debug", "info", "warn"/"warning", "error", "off" (case-insensitive).
/// Throws rhine::Error naming the bad value and the accepted ones.
LogLevel parse_log_level(std::string_view name);
std::string_view to_string(LogLevel level);

/// Configures spdlog's default logger (stderr, plus a file when asked).
/// Safe to call again: the latest options win.
void init_logging(const LogOptions& options = {});

void set_log_level(LogLevel level);
LogLevel log_level();

/// Logs one message at `level` through the default logger.
void log(LogLevel level, std::string_view message);

}  // namespace rhine
