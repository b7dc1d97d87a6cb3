#include "rhine/train/plot.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"

namespace rhine::train {
namespace {

constexpr double kPanelW = 520, kPanelH = 360, kLeft = 62, kRight = 16, kTop = 36, kBottom = 48;
const char* const kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  return out;
}

std::string tick_label(double v) {
  if (v != 0 && (std::fabs(v) >= 1e5 || std::fabs(v) < 1e-3)) return fmt::format("{:.1e}", v);
  auto s = fmt::format("{:.4f}", v);
  s.erase(s.find_last_not_of('0') + 1);
  if (s.back() == '.') s.pop_back();
  return s;
}

void render_panel(std::string& svg, const PlotPanel& p, double x0) {
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
  for (const auto& s : p.series)
    for (const auto& [x, y] : s.points)
      if (std::isfinite(x) && std::isfinite(y)) {
        xmin = std::min(xmin, x), xmax = std::max(xmax, x);
        ymin = std::min(ymin, y), ymax = std::max(ymax, y);
      }
  const bool empty = !std::isfinite(xmin);
  if (empty) xmin = 0, xmax = 1, ymin = 0, ymax = 1;
  if (xmax == xmin) xmax = xmin + 1;
  if (ymax == ymin) ymin -= 0.5, ymax += 0.5;
  const auto xt = nice_ticks(xmin, xmax, 6), yt = nice_ticks(ymin, ymax, 6);
  xmin = std::min(xmin, xt.front()), xmax = std::max(xmax, xt.back());
  ymin = std::min(ymin, yt.front()), ymax = std::max(ymax, yt.back());
  const double w = kPanelW - kLeft - kRight, h = kPanelH - kTop - kBottom;
  auto X = [&](double x) { return x0 + kLeft + (x - xmin) / (xmax - xmin) * w; };
  auto Y = [&](double y) { return kTop + h - (y - ymin) / (ymax - ymin) * h; };

  svg += fmt::format("<text x=\"{:.1f}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>\n",
                     x0 + kLeft + w / 2, escape(p.title));
  svg += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" stroke=\"#444\"/>\n",
                     x0 + kLeft, kTop, w, h);
  for (double t : xt) {
    svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#ddd\"/>\n", X(t),
                       kTop, kTop + h);
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n", X(t),
                       kTop + h + 15, tick_label(t));
  }
  for (double t : yt) {
    svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>\n",
                       x0 + kLeft, Y(t), x0 + kLeft + w);
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\" text-anchor=\"end\">{}</text>\n",
                       x0 + kLeft - 5, Y(t) + 4, tick_label(t));
  }
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\n",
                     x0 + kLeft + w / 2, kPanelH - 12, escape(p.x_label));
  svg += fmt::format(
      "<text x=\"{0:.1f}\" y=\"{1:.1f}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 {0:.1f} {1:.1f})\">{2}</text>\n",
      x0 + 16, kTop + h / 2, escape(p.y_label));
  if (empty)
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"13\" text-anchor=\"middle\" fill=\"#888\">no data yet</text>\n",
                       x0 + kLeft + w / 2, kTop + h / 2);
  for (std::size_t i = 0; i < p.series.size(); ++i) {
    const auto& s = p.series[i];
    const char* colour = kColours[i % (sizeof kColours / sizeof *kColours)];
    std::string pts;
    std::size_t n = 0;
    for (const auto& [x, y] : s.points)
      if (std::isfinite(x) && std::isfinite(y)) pts += fmt::format("{:.1f},{:.1f} ", X(x), Y(y)), ++n;
    if (n == 1) {
      const auto& [x, y] = s.points.front();
      svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", X(x), Y(y), colour);
    } else if (n > 1) {
      if (!pts.empty()) pts.pop_back();
      svg += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\" points=\"{}\"/>\n", colour, pts);
    }
    const double ly = kTop + 14 + 16 * static_cast<double>(i);
    svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"{3}\" stroke-width=\"2\"/>\n",
                       x0 + kLeft + w - 110, ly - 4, x0 + kLeft + w - 92, colour);
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\">{}</text>\n", x0 + kLeft + w - 88, ly,
                       escape(s.name));
  }
}

}  // namespace

std::vector<double> nice_ticks(double lo, double hi, int n) {
  RHINE_CHECK(std::isfinite(lo) && std::isfinite(hi) && hi > lo && n >= 2, "plot", "bad tick range",
              (std::vector<double>{lo, hi, double(n)}), "");
  const double raw = (hi - lo) / (n - 1);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> ticks;
  for (double t = std::floor(lo / step) * step; t <= hi + step * 1e-9; t += step)
    ticks.push_back(std::fabs(t) < step * 1e-9 ? 0.0 : t);
  if (ticks.back() < hi) ticks.push_back(ticks.back() + step);
  return ticks;
}

std::string render_svg(const std::vector<PlotPanel>& panels) {
  const double width = kPanelW * static_cast<double>(std::max<std::size_t>(1, panels.size()));
  std::string svg = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0:.0f}\" height=\"{1:.0f}\" viewBox=\"0 0 {0:.0f} {1:.0f}\" "
      "font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width, kPanelH);
  for (std::size_t i = 0; i < panels.size(); ++i) render_panel(svg, panels[i], kPanelW * static_cast<double>(i));
  return svg + "</svg>\n";
}

std::size_t plot_metrics(const std::string& metrics_jsonl, const std::string& svg_path) {
  std::ifstream in(metrics_jsonl);
  RHINE_CHECK(in.good(), "plot", "cannot open metrics file", metrics_jsonl, "run the trainer with out_dir set");
  PlotSeries loss{"loss", {}}, avg{"moving average", {}};
  std::map<std::string, PlotSeries> bpb;
  std::string line;
  std::size_t n_steps = 0;
  double ema = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    Json j;
    try {
      j = Json::parse(line);
    } catch (const std::exception&) {
      continue;  // a line torn by a crash: skip it
    }
    const auto type = j.value("type", "");
    if (type == "step" && j.contains("loss") && j["loss"].is_number()) {
      const double s = j.value("step", 0.0), l = j["loss"].get<double>();
      loss.points.emplace_back(s, l);
      if (std::isfinite(l)) {
        ema = avg.points.empty() ? l : 0.9 * ema + 0.1 * l;
        avg.points.emplace_back(s, ema);
      }
      ++n_steps;
    } else if (type == "eval" && j.contains("languages") && j["languages"].is_object()) {
      const double s = j.value("step", 0.0);
      for (const auto& [lang, v] : j["languages"].items())
        if (v.is_object() && v.contains("bpb") && v["bpb"].is_number()) {
          bpb[lang].name = lang;
          bpb[lang].points.emplace_back(s, v["bpb"].get<double>());
        }
    }
  }
  PlotPanel left{"training loss", "step", "loss (nats/token)", {loss, avg}};
  PlotPanel right{"held-out bits per byte", "step", "bits per byte", {}};
  for (auto& [lang, s] : bpb) right.series.push_back(std::move(s));
  write_file_atomic(svg_path, render_svg({left, right}));
  return n_steps;
}

}  // namespace rhine::train
