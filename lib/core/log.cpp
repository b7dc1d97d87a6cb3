#include "rhine/core/log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <mutex>

#include "rhine/core/error.h"

namespace rhine {
namespace {

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::trace: return spdlog::level::trace;
    case LogLevel::debug: return spdlog::level::debug;
    case LogLevel::info: return spdlog::level::info;
    case LogLevel::warn: return spdlog::level::warn;
    case LogLevel::error: return spdlog::level::err;
    case LogLevel::off: return spdlog::level::off;
  }
  return spdlog::level::info;
}

std::mutex g_init_mutex;

}  // namespace

LogLevel parse_log_level(std::string_view name) {
  std::string s(name);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "trace") return LogLevel::trace;
  if (s == "debug") return LogLevel::debug;
  if (s == "info") return LogLevel::info;
  if (s == "warn" || s == "warning") return LogLevel::warn;
  if (s == "error" || s == "err") return LogLevel::error;
  if (s == "off" || s == "none") return LogLevel::off;
  RHINE_FAIL("log", "unknown log level", name, "use trace, debug, info, warn, error or off");
}

std::string_view to_string(LogLevel level) {
  switch (level) {
    case LogLevel::trace: return "trace";
    case LogLevel::debug: return "debug";
    case LogLevel::info: return "info";
    case LogLevel::warn: return "warn";
    case LogLevel::error: return "error";
    case LogLevel::off: return "off";
  }
  return "info";
}

void init_logging(const LogOptions& options) {
  LogLevel level = LogLevel::info;
  if (options.level) {
    level = *options.level;
  } else if (const char* env = std::getenv("RHINE_LOG_LEVEL"); env && *env) {
    try {
      level = parse_log_level(env);
    } catch (const Error&) {
      RHINE_FAIL("log", "RHINE_LOG_LEVEL is not a log level", env,
                 "use trace, debug, info, warn, error or off");
    }
  }

  std::lock_guard<std::mutex> lock(g_init_mutex);
  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  if (!options.file.empty()) {
    try {
      sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.file));
    } catch (const spdlog::spdlog_ex& e) {
      RHINE_FAIL("log", "cannot open the log file", options.file,
                 std::string("check the directory exists and is writable (") + e.what() + ")");
    }
  }
  auto logger = std::make_shared<spdlog::logger>("rhine", sinks.begin(), sinks.end());
  std::string pattern = "[%H:%M:%S.%e] [%^%l%$] ";
  if (options.rank >= 0) pattern += "[rank " + std::to_string(options.rank) + "] ";
  logger->set_pattern(pattern + "%v");
  logger->set_level(to_spdlog(level));
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(std::move(logger));
}

void set_log_level(LogLevel level) { spdlog::set_level(to_spdlog(level)); }

LogLevel log_level() {
  switch (spdlog::get_level()) {
    case spdlog::level::trace: return LogLevel::trace;
    case spdlog::level::debug: return LogLevel::debug;
    case spdlog::level::info: return LogLevel::info;
    case spdlog::level::warn: return LogLevel::warn;
    case spdlog::level::err: return LogLevel::error;
    case spdlog::level::critical: return LogLevel::error;
    default: return LogLevel::off;
  }
}

void log(LogLevel level, std::string_view message) {
  spdlog::default_logger_raw()->log(to_spdlog(level), "{}", message);
}

}  // namespace rhine
