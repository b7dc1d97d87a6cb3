#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/log.h"

using Catch::Matchers::Contains;

TEST_CASE("log levels parse and print", "[log]") {
  CHECK(rhine::parse_log_level("DEBUG") == rhine::LogLevel::debug);
  CHECK(rhine::parse_log_level("warning") == rhine::LogLevel::warn);
  CHECK(rhine::to_string(rhine::LogLevel::error) == "error");
  CHECK_THROWS_WITH(rhine::parse_log_level("loud"),
                    "[log] unknown log level, got \"loud\"; use trace, debug, info, warn, error or off");
}

TEST_CASE("init_logging takes the level from the option, then RHINE_LOG_LEVEL", "[log]") {
  ::setenv("RHINE_LOG_LEVEL", "debug", 1);
  rhine::init_logging();
  CHECK(rhine::log_level() == rhine::LogLevel::debug);
  rhine::init_logging({rhine::LogLevel::warn});
  CHECK(rhine::log_level() == rhine::LogLevel::warn);
  ::setenv("RHINE_LOG_LEVEL", "chatty", 1);
  CHECK_THROWS_WITH(rhine::init_logging(), Contains("[log] RHINE_LOG_LEVEL is not a log level, got \"chatty\""));
  ::unsetenv("RHINE_LOG_LEVEL");
  rhine::init_logging();
  CHECK(rhine::log_level() == rhine::LogLevel::info);
}

TEST_CASE("init_logging writes to a file with the rank prefix", "[log]") {
  auto path = std::filesystem::temp_directory_path() / ("rhine_log_" + std::to_string(::getpid()) + ".txt");
  rhine::LogOptions o;
  o.level = rhine::LogLevel::info;
  o.file = path.string();
  o.rank = 1;
  rhine::init_logging(o);
  rhine::log(rhine::LogLevel::debug, "hidden");
  rhine::log(rhine::LogLevel::warn, "visible message");  // warn flushes
  std::string text = rhine::read_file(path.string(), "test");
  CHECK_THAT(text, Contains("[rank 1] visible message"));
  CHECK_THAT(text, !Contains("hidden"));
  rhine::init_logging({rhine::LogLevel::info});
  std::filesystem::remove(path);
  o.file = "/dev/null/x.log";  // a path under a file can never be created
  CHECK_THROWS_WITH(rhine::init_logging(o), Contains("[log] cannot open the log file"));
}
